"""The pretraining input pipeline: documents -> tokens -> packed rows -> per-process batches (grain).

Order of operations and why:

1. ``MapDataset.source(documents)``: random access, so shuffle and resume are by index, never by seeking.
2. ``[process_index::process_count]``: each process reads only its own documents (disjoint, covering all).
3. ``shuffle(data.seed)``: a seeded global permutation of this process's documents; each epoch is
   reshuffled differently (grain folds the epoch into the seed).
4. ``repeat(data.num_epochs or forever)``.
5. ``map(tokenize)`` -> ``to_iter_dataset`` (threads read and tokenize ahead; ``None`` rows, i.e. skipped
   malformed or blank ones, are dropped here).
6. ``PackIterDataset`` (``packing.py``) -> ``to_example`` -> ``batch(per_process_batch, drop_remainder)``:
   every batch has the same static shape, so the jitted step never recompiles.
7. ``mp_prefetch(data.worker_count)`` when > 0: worker processes run steps 5-6 on interleaved slices.

Iterator state (``DataIterator.get_state()``), a JSON-able dict; save it with the checkpoint
(e.g. ``orbax.checkpoint.args.JsonSave``) and pass it back to ``set_state`` on resume::

    {"version": 1,
     "layout": {...},   # data settings the state is only valid for; set_state refuses a mismatch
     "grain": {...}}    # grain's own iterator state: for worker_count=0,
                        #   {"parent": {"next_index": <int>}, "offset": <int>}: the index (into this
                        #   process's shuffled, repeated document sequence) of the next document to
                        #   read, or of the document being split across rows with the token offset into it
                        #   (-1 = none); for worker_count>0, grain's per-worker states.

A restored iterator yields exactly the batches the uninterrupted one would have: the document order is a
pure function of (data, seed, process slice) and the packer rebuilds its one partial document from
the saved index and offset.

Evaluation data (``make_eval_dataset``): the documents of ``data.eval_path``, or the ``data.eval_fraction``
of the training corpus's documents held out by ``HeldOut`` (document i is held out when a 64-bit hash of i
falls below the fraction: a pure function of the index, so the split is the same in every run, process and
resume, whatever ``data.seed``). Training reads a held-out document as ``None`` (dropped like a blank row),
so it never sees one and every other document keeps its place in the order. The eval set is read in index
order, unshuffled, split over processes as training is, packed and batched like training: every fresh
iterator yields the same batches.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from joyjax.errors import ConfigError
from joyjax.data import corpus as _corpus
from joyjax.data import packing
from joyjax.data.sources import DataError, DocumentSource, files_fingerprint, open_source
from joyjax.data.tokenizer import (
    TRAIN_SAMPLE_BYTES,
    Tokenizer,
    cached_train_tokenizer,
    check_vocab_fits,
    load_tokenizer,
)

STATE_VERSION = 1
_MAX_SAMPLE_DOCS = 100_000        # tokenizer training reads at most this many evenly spaced documents


def open_corpus(config) -> DocumentSource:
  """The documents of ``config.data``: the user's files, or the embedded corpus when ``data.path`` is ""."""
  d = config.data
  if not d.path:
    path = _corpus.build_embedded_corpus(d.cache_dir)
    return open_source(path, format="jsonl", text_key="text", skip_malformed=d.skip_malformed)
  return open_source(d.path, format=d.format, text_key=d.text_key, skip_malformed=d.skip_malformed)


def corpus_fingerprint(config, source: DocumentSource) -> str:
  """Identity of the corpus for cache keys: file names, sizes and mtimes, and how they are read."""
  d = config.data
  if not d.path:  # the embedded corpus file name already keys python version, stdlib and cap
    return "embedded:" + os.path.basename(source.files[0])
  return f"{d.format}|{d.text_key}|" + files_fingerprint(source.files)


def _sample_texts(source: DocumentSource, max_bytes: int = TRAIN_SAMPLE_BYTES):
  """Evenly spaced documents, in index order, until ``max_bytes`` characters: deterministic, cheap."""
  n = len(source)
  step = max(1, n // _MAX_SAMPLE_DOCS)
  total = 0
  for i in range(0, n, step):
    text = source[i]
    if text is None:
      continue
    yield text
    total += len(text)
    if total >= max_bytes:
      return


def build_tokenizer(config, source: DocumentSource | None = None) -> Tokenizer:
  """The tokenizer of ``config``: loaded from ``data.tokenizer``, or (when "") a byte-level BPE of
  ``data.tokenizer_vocab_size`` trained on the corpus at first run and cached in ``data.cache_dir``.

  Raises ConfigError naming ``model.vocab_size`` and the tokenizer key when the vocabulary does not fit.
  """
  d = config.data
  if d.tokenizer:
    tok = load_tokenizer(d.tokenizer)
    check_vocab_fits(tok, config.model.vocab_size, source=f"'data.tokenizer' ({d.tokenizer})")
    return tok
  if d.tokenizer_vocab_size > config.model.vocab_size:  # before spending time on training
    raise ConfigError(
        f"config keys 'data.tokenizer_vocab_size' and 'model.vocab_size': data.tokenizer_vocab_size="
        f"{d.tokenizer_vocab_size} is larger than model.vocab_size={config.model.vocab_size}; lower "
        "data.tokenizer_vocab_size or raise model.vocab_size")
  source = source if source is not None else open_corpus(config)
  tok = cached_train_tokenizer(lambda: _sample_texts(source), vocab_size=d.tokenizer_vocab_size,
                               cache_dir=d.cache_dir, fingerprint=corpus_fingerprint(config, source))
  check_vocab_fits(tok, config.model.vocab_size,
                   source=f"'data.tokenizer_vocab_size' ({d.tokenizer_vocab_size})")
  return tok


class Encode:
  """Document text -> int32 token array with BOS / EOS per config (picklable for grain workers)."""

  def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
    self.tokenizer = tokenizer
    self.prefix = [tokenizer.bos_id] if add_bos else []
    self.suffix = [tokenizer.eos_id] if add_eos else []

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray(self.prefix + self.tokenizer.encode(text) + self.suffix, dtype=np.int32)


def _per_process_batch(config, process_count: int, batch_size: int | None) -> int:
  if batch_size is not None:
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    return batch_size
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ConfigError(f"config key 'train.batch_size': {global_batch} sequences do not split evenly over "
                      f"{process_count} processes; use a multiple of {process_count}")
  return global_batch // process_count


def _check_specials(config, tokenizer: Tokenizer) -> None:
  for key, tid, kind in (("add_bos", tokenizer.bos_id, "BOS"), ("add_eos", tokenizer.eos_id, "EOS")):
    if config.data[key] and tid is None:
      raise ConfigError(f"config key 'data.{key}': the tokenizer ({tokenizer.origin}) has no {kind} token; "
                        f"set data.{key}=False or use a tokenizer that defines one")


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a fixed, well-mixed 64-bit hash of each (non-negative) integer in ``x``."""
  x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class HeldOut:
  """The documents ``data.eval_fraction`` holds out of the training corpus: document ``i`` iff
  ``mix64(i) < fraction * 2**64``. A pure function of the index (not of the seed, the corpus size or the
  process), so about ``fraction`` of any corpus, the same documents in every run and after every resume."""

  _CHUNK = 1 << 20

  def __init__(self, fraction: float):
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
      raise ConfigError(f"config key 'data.eval_fraction': must be in [0, 1) (0 = none), got {fraction}")
    self.fraction = fraction
    self._threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))

  def contains(self, index) -> bool:
    return bool(_mix64(np.asarray([index]))[0] < self._threshold)

  def indices(self, n: int) -> np.ndarray:
    """The held-out indices among ``range(n)``, ascending."""
    parts = [np.flatnonzero(_mix64(np.arange(a, min(a + self._CHUNK, n))) < self._threshold) + a
             for a in range(0, n, self._CHUNK)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


class _WithoutHeldOut:
  """Random access to ``source`` with the held-out documents read as ``None`` (never read at all): grain
  drops them like blank rows, and every other document keeps its index, hence its place in the order."""

  def __init__(self, source: DocumentSource, held: HeldOut):
    self.source, self.held = source, held

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> str | None:
    return None if self.held.contains(index) else self.source[index]


class _Subset:
  """Random access to the documents ``indices`` of ``source`` (in that order)."""

  def __init__(self, source: DocumentSource, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index) -> str | None:
    return self.source[int(self.indices[int(index)])]


def held_out(config) -> HeldOut | None:
  """The held-out split of ``config.data`` (None when ``data.eval_fraction`` is 0)."""
  d = config.data
  if d.eval_fraction == 0:
    return None
  return HeldOut(d.eval_fraction)  # config.validate refuses it together with data.eval_path


def make_eval_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                      batch_size: int | None = None,
                      source: DocumentSource | None = None) -> grain.IterDataset | None:
  """The evaluation batches of this process (see the module docstring); None without an eval set.

  ``iter()`` of the result starts over: the same batches every time. The documents repeat when more batches
  are read than one pass fills (an evaluation reads ``train.eval_batches``). ``source``: the already opened
  training corpus, for ``data.eval_fraction``.
  """
  d = config.data
  held = held_out(config)
  if held is None and not d.eval_path:
    return None
  _check_specials(config, tokenizer)
  batch = _per_process_batch(config, process_count, batch_size)
  if d.eval_path:
    docs = open_source(d.eval_path, format=d.format, text_key=d.text_key, skip_malformed=d.skip_malformed)
    where = f"data.eval_path ({d.eval_path}) has {len(docs)} rows"
  else:
    corpus = source if source is not None else open_corpus(config)
    docs = _Subset(corpus, held.indices(len(corpus)))
    where = (f"data.eval_fraction={d.eval_fraction} holds out {len(docs)} of the {len(corpus)} documents of "
             f"data.path ({d.path or 'embedded corpus'}); raise data.eval_fraction")
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} has no evaluation documents: {where}")
  ds = ds.repeat(None).map(Encode(tokenizer, d.add_bos, d.add_eos))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  it = packing.PackIterDataset(it, row_len=d.seq_len + 1, pad_id=tokenizer.pad_id)
  return it.map(packing.to_example).batch(batch, drop_remainder=True)


def process_epochs(config, ds: grain.MapDataset, *, process_index: int, process_count: int, what: str,
                   where: str, one_pass: bool = False) -> grain.MapDataset:
  """Steps 2-4 of the module docstring, shared by the pretraining, SFT and DPO pipelines: this process's
  slice of ``ds``, shuffled with ``data.seed`` and repeated ``data.num_epochs`` times (0 = forever); with
  ``one_pass``, the slice once in index order. A process left with nothing is a DataError ("process i of n
  has no <what>: <where>")."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} has no {what}: {where}")
  if one_pass:
    return ds.repeat(1)
  d = config.data
  if d.shuffle:
    ds = ds.shuffle(seed=d.seed % 2**32)
  return ds.repeat(None if d.num_epochs == 0 else d.num_epochs)


def with_workers(config, it: grain.IterDataset) -> grain.IterDataset:
  """Step 7: ``data.worker_count`` worker processes run the pipeline before this point (none when 0)."""
  if config.data.worker_count == 0:
    return it
  # grain's worker processes read absl flags; outside absl.app.run nothing has parsed them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))


def make_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                 batch_size: int | None = None, source: DocumentSource | None = None) -> grain.IterDataset:
  """The grain ``IterDataset`` of batches (see module docstring); ``make_iterator`` wraps its iterator."""
  d = config.data
  _check_specials(config, tokenizer)
  batch = _per_process_batch(config, process_count, batch_size)
  source = source if source is not None else open_corpus(config)
  held = held_out(config)
  ds = grain.MapDataset.source(source if held is None else _WithoutHeldOut(source, held))
  ds = process_epochs(config, ds, process_index=process_index, process_count=process_count, what="documents",
                      where=f"data.path ({d.path or 'embedded corpus'}) has {len(source)} rows")
  ds = ds.map(Encode(tokenizer, d.add_bos, d.add_eos))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=128))
  it = packing.PackIterDataset(it, row_len=d.seq_len + 1, pad_id=tokenizer.pad_id)
  it = it.map(packing.to_example)
  it = it.batch(batch, drop_remainder=True)
  return with_workers(config, it)


# Layout keys written only when they differ from these values (states written before the key existed match).
_LAYOUT_DEFAULTS = {"eval_fraction": 0.0}


def _layout(config, tokenizer, source, process_index, process_count, batch) -> dict[str, Any]:
  d = config.data
  return {
      "path": d.path or "embedded:" + os.path.basename(source.files[0]),
      "format": d.format, "text_key": d.text_key, "documents": len(source),
      "seq_len": d.seq_len, "shuffle": d.shuffle, "seed": d.seed, "num_epochs": d.num_epochs,
      "add_bos": d.add_bos, "add_eos": d.add_eos, "worker_count": d.worker_count,
      "tokenizer": tokenizer.fingerprint[:16],
      "process_index": process_index, "process_count": process_count, "batch_size": batch,
      # Only when set, so the states of runs without a held-out split (and their checkpoints) stay valid.
      **({"eval_fraction": d.eval_fraction} if d.eval_fraction else {}),
  }


class DataIterator(grain.DatasetIterator):
  """Batches ``{'inputs','targets','segment_ids','positions','loss_mask'}``, int32 ``[batch, seq_len]``.

  ``get_state()`` / ``set_state(state)``: see the module docstring for the format. ``metrics()`` returns
  counters for logging (``data/skipped_malformed``: rows skipped in this process so far).
  """

  def __init__(self, inner: grain.DatasetIterator, *, layout: dict[str, Any], source: DocumentSource):
    super().__init__(inner)
    self.layout = layout
    self.source = source

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    # With worker processes grain hands over shared-memory arrays; copy them out so the segments are
    # released now rather than at interpreter exit (where grain's cleanup prints errors).
    return {k: v if type(v) is np.ndarray else np.array(v, copy=True) for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "layout": dict(self.layout), "grain": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "grain" not in state:
      raise DataError(f"data iterator state is not a joyjax v{STATE_VERSION} state (got keys "
                      f"{sorted(state) if isinstance(state, dict) else type(state).__name__})")
    saved = state.get("layout", {})
    keys = [*self.layout, *(k for k in saved if k not in self.layout)]
    now = lambda k: self.layout.get(k, _LAYOUT_DEFAULTS.get(k))  # noqa: E731
    then = lambda k: saved.get(k, _LAYOUT_DEFAULTS.get(k))  # noqa: E731
    diff = [f"{k}: saved {then(k)!r}, now {now(k)!r}" for k in keys if then(k) != now(k)]
    if diff:
      raise DataError("the saved data iterator state does not match the current data settings ("
                      + "; ".join(diff) + "). Exact resume needs the same data, tokenizer, data.* keys, "
                      "batch size and process count; restore those, or restart without the data state "
                      "to continue with a new data order")
    self._parent.set_state(state["grain"])

  def metrics(self) -> dict[str, int]:
    return self.source.metrics()

  def __str__(self) -> str:
    return "joyjax.DataIterator"


def make_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                  batch_size: int | None = None) -> DataIterator:
  """The checkpointable batch iterator of this process.

  ``batch_size`` is per process; ``None`` = ``train.batch_size // process_count``. Yields dicts of int32
  numpy arrays ``[batch, data.seq_len]``; ends after ``data.num_epochs`` epochs (0 = never), dropping the
  last partial batch.
  """
  source = open_corpus(config)
  ds = make_dataset(config, tokenizer, process_index=process_index, process_count=process_count,
                    batch_size=batch_size, source=source)
  batch = _per_process_batch(config, process_count, batch_size)
  layout = _layout(config, tokenizer, source, process_index, process_count, batch)
  return DataIterator(ds.__iter__(), layout=layout, source=source)
