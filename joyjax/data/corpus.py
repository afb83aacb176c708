"""The embedded default corpus: the Python standard library's own ``.py`` sources.

Why this corpus: it is on every machine that runs joyjax (no download, works offline), it is real,
varied, structured text that a tiny model visibly learns in minutes, and its license (PSF) allows it.

It is materialised once into ``data.cache_dir`` as JSON lines (``{"text": source, "path": relpath}``)
and from then on read like any user ``.jsonl``. Selection is deterministic for a given Python install:
candidate files (test directories, ``site-packages``, codec tables and generated giants excluded) are
ordered by a hash of their relative path, which spreads the pick across packages instead of taking the
alphabet's first letters, and taken while they fit under ``max_bytes``. The cache file name keys the
Python version, the stdlib location, ``max_bytes`` and ``CORPUS_VERSION``, so a different interpreter
gets its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile

CORPUS_VERSION = 1               # bump when the selection rule changes: invalidates cached corpora
DEFAULT_MAX_BYTES = 4 << 20      # a few MB: thousands of training rows, a BPE trains on it in seconds
MAX_FILE_BYTES = 200_000         # skips generated giants (pydoc_data/topics.py) that are not code
# encodings/: mostly generated codec tables (hex maps), poor training text.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _candidates(root: str) -> list[str]:
  """Relative paths (``/`` separated) of stdlib ``.py`` files that are not tests or third-party."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
    for f in sorted(filenames):
      if f.endswith(".py") and not f.startswith("test_"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
  return out


def select_stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> list[tuple[str, str]]:
  """``[(relpath, source), ...]`` chosen deterministically, total UTF-8 size at most ``max_bytes``."""
  root = root or stdlib_root()
  order = sorted(_candidates(root), key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
  picked, total = [], 0
  for rel in order:
    path = os.path.join(root, rel)
    try:
      size = os.path.getsize(path)
      if size == 0 or size > MAX_FILE_BYTES or total + size > max_bytes:
        continue
      with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):  # unreadable or not UTF-8: skipped the same way every time
      continue
    picked.append((rel, text))
    total += len(text.encode("utf-8"))
  return picked


def atomic_write(path: str, data: bytes) -> None:
  """Temp file in the same directory + rename: a kill mid-write never leaves a truncated cache file."""
  d = os.path.dirname(path) or "."
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def corpus_path(cache_dir: str, max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> str:
  """Where the embedded corpus for this interpreter and cap lives (whether or not it exists yet)."""
  root = root or stdlib_root()
  key = f"{CORPUS_VERSION}|{sys.version}|{os.path.abspath(root)}|{max_bytes}"
  tag = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{tag}.jsonl")


def build_embedded_corpus(cache_dir: str, max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> str:
  """Path of the embedded corpus jsonl in ``cache_dir``; written (atomically) on first call only."""
  path = corpus_path(cache_dir, max_bytes, root)
  if os.path.exists(path):
    return path
  files = select_stdlib_files(max_bytes, root)
  if not files:
    raise RuntimeError(f"no Python sources found under {root or stdlib_root()!r} for the embedded corpus; "
                       "set data.path to your own data")
  lines = [json.dumps({"text": text, "path": "stdlib/" + rel}, ensure_ascii=False) for rel, text in files]
  atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
  return path
