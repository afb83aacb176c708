"""End-to-end command-line flows on the tiny model: a Hugging Face checkpoint -> ``joyjax convert --hf-dir``
-> ``joyjax train --config.train.init_from=...``, then ``joyjax sample --checkpoint`` on that run."""

import os

import jax
import numpy as np
import pytest

from conftest import DATA_CACHE
from joyjax import cli, model
from joyjax.config import load_config
from joyjax.convert import hf
from joyjax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.py")


def overrides(out_dir, *extra):
  # A negligible learning rate and no router-bias update: the trained params must be those loaded.
  return [f"--config.train.output_dir={out_dir}", "--config.train.steps=2", "--config.data.seq_len=32",
          "--config.train.batch_size=8", "--config.checkpoint.every=0", "--config.train.sample_prompt=",
          f"--config.data.cache_dir={DATA_CACHE}", "--config.data.tokenizer_vocab_size=1024",
          "--config.optim.name=adamw", "--config.optim.lr=1e-30", "--config.train.router_bias_rate=0.0", *extra]


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_convert_then_init_from_then_sample(tmp_path, capsys):
  # A Hugging Face checkpoint of the tiny architecture (random weights, seed 7).
  cfg0 = load_config(TINY)
  params = jax.tree.map(np.asarray, model.init(cfg0, jax.random.key(7)))
  hf.export_checkpoint(cfg0, params, str(tmp_path / "hf"), dtype="float32")

  (tmp_path / "imported").mkdir()  # an existing empty --out is fine (a non-empty one is refused)
  cli.main(["convert", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
  assert "train with --config.train.init_from=" in capsys.readouterr().out

  run = tmp_path / "run"
  r = train(load_config(TINY, overrides(run, f"--config.train.init_from={tmp_path / 'imported'}")),
            stream=open(os.devnull, "w"))
  assert sorted(r.losses) == [1, 2] and not r.interrupted
  got = jax.tree.map(np.asarray, r.state["params"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=jax.tree_util.keystr(path))
  # (A fresh init is seed train.seed = 0, not these seed-7 weights: equality means init_from was used.)

  # joyjax sample on the run: the stored config and tokenizer, greedy by default: the direct sampler's text.
  cli.main(["sample", "--checkpoint", str(run), "--prompt", "def ", "--max-tokens", "6"])
  first = capsys.readouterr().out
  assert first.startswith("def ") and len(first.strip()) > len("def")
  from joyjax.data.pipeline import build_tokenizer
  from joyjax.train.sample import sample_text
  cfg = load_config(TINY, overrides(run))
  assert first.rstrip("\n") == sample_text(cfg, got, build_tokenizer(cfg), "def ", max_tokens=6)
