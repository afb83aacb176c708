"""``python -m joyjax.train --config configs/tiny.py [--config.KEY=VALUE ...]``: the same as ``joyjax train``."""

import sys

from joyjax.cli import main

if __name__ == "__main__":
  main(["train", *sys.argv[1:]])
