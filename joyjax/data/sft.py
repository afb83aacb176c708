"""The SFT input pipeline: conversation rows -> rendered, masked token ids -> packed rows -> per-process batches.

Built like the pretraining pipeline (``pipeline.py``: random-access source, per-process slice, seeded shuffle,
repeat, exact resume from the iterator state), with conversations instead of documents:

1. ``open_rows(data.path)``: JSON lines / Parquet / ArrayRecord rows as dicts (``sources.py``).
2. ``[process_index::process_count]`` -> ``shuffle(data.seed)`` -> ``repeat(data.num_epochs or forever)``.
3. ``SftEncode``: ``chat.to_messages`` -> mode -> ``chat.render`` (``sft.train_on``; template from
   ``data.chat_template``) -> int32 ids and per-token trainable flags.
   Mode: a row's own ``"thinking": true | false`` wins; a conversation without any reasoning is rendered in
   non-thinking mode (a thinking-mode render would only teach an empty think block); otherwise thinking mode
   for a ``sft.thinking_ratio`` fraction of conversations, chosen by a 64-bit hash of (row index, data.seed):
   a pure function of the row, so every epoch, process and resume renders a row the same way.
4. ``SftPackIterDataset``: WHOLE conversations, greedily, in order, into rows of ``data.seq_len + 1`` tokens.
   A conversation that does not fit the rest of the row starts the next row (the row is padded: segment 0,
   ``tokenizer.pad_id``); segment ids 1, 2, ... per conversation in a row, positions restarting at 0 per
   conversation. A conversation longer than a row (``sft.overlong``): ``truncate`` keeps its first
   ``seq_len + 1`` tokens (a row of its own), ``skip`` drops it; both counted.
5. ``to_sft_example`` -> ``batch``: exactly ``joyjax.batch.LM_KEYS``, int32 ``[batch, seq_len]``, with
   ``loss_mask[p] = 1`` iff target ``p + 1`` is trainable and in the same conversation as input ``p``; so the
   pretraining step and ``losses.lm`` train SFT unchanged (the loss is the mean over the batch's masked tokens).

A conversation with no trainable token after rendering (e.g. a template without the assistant markers the
spans come from, or ``train_on`` that selects nothing) is a DataError naming file and row, or with
``data.skip_malformed`` skipped and counted, never trained on silently. One whose trainable tokens all fall
past the cut of ``truncate`` is skipped and counted as overlong. Malformed rows (bad JSON, a row
``to_messages`` refuses) are DataErrors naming file and row, or skipped and counted.

Counters travel with the rows (so they are exact and survive worker processes and resume):
``metrics()`` -> ``data/sft_conversations`` (packed), ``data/sft_truncated``, ``data/sft_skipped_overlong``,
``data/skipped_malformed``, totals over the batches this iterator returned, saved in its state.

Iterator state (``SftIterator.get_state()``): ``{"version": 1, "layout": {...}, "grain": {...}, "counts":
{...}}``; ``grain`` for worker_count=0 is ``{"parent": <state before the held conversation>, "held": bool}``:
a conversation read but not yet placed (it did not fit the last row) is re-read on restore.

Evaluation (``make_sft_eval_dataset``): the conversations of ``data.eval_path``, or the ``data.eval_fraction``
held out of ``data.path`` by ``pipeline.HeldOut`` (training never reads them), unshuffled, rendered and packed
like training; ``iter()`` starts over.

``data.add_bos`` / ``data.add_eos`` do not apply: the chat template writes BOS and the end-of-turn EOS.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from joyjax.batch import LM_KEYS
from joyjax.errors import ConfigError, DataError
from joyjax.data import chat
from joyjax.data.pipeline import (DataIterator, HeldOut, _mix64, _per_process_batch, held_out, process_epochs,
                                  with_workers)
from joyjax.data.sources import DocumentSource, _FIX, open_rows
from joyjax.data.tokenizer import Tokenizer

# Per-row counters (summed into the iterator's metrics, never part of a batch the step sees).
COUNTERS = {"n_conversations": "data/sft_conversations", "n_truncated": "data/sft_truncated",
            "n_overlong": "data/sft_skipped_overlong", "n_malformed": "data/skipped_malformed"}
_SALT = 0x7468696E6B696E67        # "thinking": separates the mode hash from HeldOut's


def check_sft_config(config) -> None:
  """ConfigError naming the key when the data cannot be SFT data (no files, or plain text files); the ``sft.*``
  values themselves are checked by ``config.validate``."""
  if not config.data.path:
    raise ConfigError("config key 'data.path': SFT needs conversation files (JSON lines or Parquet rows with "
                      "'messages', or 'prompt' and 'response'); the embedded corpus is for pretraining")
  if config.data.format == "text":
    raise ConfigError("config key 'data.format': text files hold documents, not conversation rows; use auto, "
                      "jsonl, parquet or arrayrecord")


def open_conversations(config, path: str | None = None) -> DocumentSource:
  """The rows of ``data.path`` (or ``path``) as dicts. Malformed rows raise here and are skipped and counted by
  the pipeline (``data.skip_malformed``), so every skip is counted in the stream."""
  return open_rows(path or config.data.path, format=config.data.format, skip_malformed=False)


def thinking_mode(index: int, ratio: float, seed: int) -> bool:
  """The mode of row ``index`` when neither the row nor its content decides: thinking for a ``ratio``
  fraction of rows, by a 64-bit hash of (index, seed)."""
  h = _mix64(np.asarray([int(index)], np.uint64) ^ _mix64(np.asarray([int(seed) % 2**64 ^ _SALT], np.uint64)))
  return float(int(h[0]) >> 11) / 2.0**53 < ratio


class _Rows:
  """Random access to the rows of ``source`` as ``{"index", "row"}`` (``index``: the row's index in the whole
  source), ``None`` for a blank or held-out row, or a counted skip ``{"skip": "malformed"}``.

  ``indices``: read only these rows (an eval subset); ``held``: rows read as None (held out of training)."""

  def __init__(self, source: DocumentSource, *, skip_malformed: bool, indices: np.ndarray | None = None,
               held: HeldOut | None = None):
    self.source, self.skip_malformed, self.held = source, skip_malformed, held
    self.indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.source) if self.indices is None else len(self.indices)

  def __getitem__(self, k):
    i = int(k) if self.indices is None else int(self.indices[int(k)])
    if self.held is not None and self.held.contains(i):
      return None
    try:
      row = self.source[i]
    except DataError:
      if self.skip_malformed:
        return {"skip": "malformed"}
      raise
    return None if row is None else {"index": i, "row": row}


class SftEncode:
  """``{"index", "row"}`` -> ``{"ids": int32[n], "trainable": int32[n], "truncated": 0 | 1}`` (``n`` at most
  ``row_len``), or a counted skip ``{"skip": "malformed" | "overlong"}``. Picklable for grain workers."""

  def __init__(self, tokenizer: Tokenizer, template: chat.ChatTemplate | None, source: DocumentSource, *,
               row_len: int, thinking_ratio: float, seed: int, train_on: str, overlong: str, skip_malformed: bool):
    self.tokenizer, self.template, self.source = tokenizer, template, source
    self.row_len, self.thinking_ratio, self.seed = row_len, thinking_ratio, seed
    self.train_on, self.overlong, self.skip_malformed = train_on, overlong, skip_malformed

  def _malformed(self, message: str):
    if self.skip_malformed:
      return {"skip": "malformed"}
    raise DataError(message)

  def thinking(self, index: int, row: dict, messages: list[dict], where: str) -> bool:
    if "thinking" in row:
      if not isinstance(row["thinking"], bool):
        raise DataError(f"{where}: field 'thinking' is {row['thinking']!r}, not true or false; {_FIX}")
      return row["thinking"]
    if not any(m.get("reasoning_content") for m in messages):
      return False
    return thinking_mode(index, self.thinking_ratio, self.seed)

  def __call__(self, item: dict) -> dict:
    if "skip" in item:
      return item
    index, row = item["index"], item["row"]
    where = self.source.where(index)
    try:
      messages = chat.to_messages(row, where=where)
      mode = self.thinking(index, row, messages, where)
    except DataError as e:
      return self._malformed(str(e))
    try:
      r = chat.render(messages, self.tokenizer, thinking=mode, train_on=self.train_on, template=self.template)
    except DataError as e:
      return self._malformed(f"{where}: {e}; {_FIX}")
    ids = np.asarray(r.ids, np.int32)
    trainable = np.asarray(r.loss_mask, np.int32)
    if not trainable[1:].any():  # token 0 is never a target
      return self._malformed(
          f"{where}: the conversation has no trainable token after rendering (sft.train_on={self.train_on}, "
          f"template {self.template.origin if self.template else 'builtin'}): the template marks no assistant "
          f"turn; {_FIX}")
    truncated = 0
    if ids.size > self.row_len:
      if self.overlong == "skip" or not trainable[1:self.row_len].any():
        return {"skip": "overlong"}
      ids, trainable, truncated = ids[:self.row_len], trainable[:self.row_len], 1
    return {"ids": ids, "trainable": trainable, "truncated": truncated}


class SftPackIterDataset(grain.IterDataset):
  """Packs encoded conversations (``SftEncode``) whole into rows of ``row_len`` tokens (module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int = 0):
    super().__init__(parent)
    if row_len < 3:
      raise ValueError(f"row_len must be >= 3 (seq_len >= 2), got {row_len}")
    self._row_len, self._pad_id = int(row_len), int(pad_id)

  def __iter__(self) -> "SftPackIterator":
    return SftPackIterator(self._parent.__iter__(), row_len=self._row_len, pad_id=self._pad_id)

  def __str__(self) -> str:
    return f"SftPackIterDataset(row_len={self._row_len})"


class SftPackIterator(grain.DatasetIterator):
  """Rows ``{"tokens", "segment_ids", "positions", "trainable"}`` (int32 ``[row_len]``) plus this row's
  counters (``COUNTERS``, int32 scalars). State ``{"parent", "held"}``: see the module docstring."""

  def __init__(self, parent: grain.DatasetIterator, *, row_len: int, pad_id: int):
    super().__init__(parent)
    self._row_len, self._pad_id = row_len, pad_id
    self._held: dict | None = None      # a conversation read that did not fit the previous row
    self._held_state: Any = None        # parent state from just before it was read
    self._exhausted = False

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    n = self._row_len
    row = {"tokens": np.full(n, self._pad_id, np.int32), "segment_ids": np.zeros(n, np.int32),
           "positions": np.zeros(n, np.int32), "trainable": np.zeros(n, np.int32)}
    counts = dict.fromkeys(COUNTERS, 0)
    fill = segment = 0
    while fill < n:
      if self._held is None:
        if self._exhausted:
          break
        state = self._parent.get_state()
        try:
          item = next(self._parent)
        except StopIteration:
          self._exhausted = True
          break
        if "skip" in item:
          counts["n_overlong" if item["skip"] == "overlong" else "n_malformed"] += 1
          continue
        self._held, self._held_state = item, state
      ids = self._held["ids"]
      if fill + ids.size > n:
        break  # starts the next row
      segment += 1
      row["tokens"][fill:fill + ids.size] = ids
      row["trainable"][fill:fill + ids.size] = self._held["trainable"]
      row["segment_ids"][fill:fill + ids.size] = segment
      row["positions"][fill:fill + ids.size] = np.arange(ids.size, dtype=np.int32)
      fill += ids.size
      counts["n_conversations"] += 1
      counts["n_truncated"] += int(self._held["truncated"])
      self._held = None
    if fill == 0:
      raise StopIteration
    row.update({k: np.asarray(v, np.int32) for k, v in counts.items()})
    return row

  def get_state(self) -> dict[str, Any]:
    if self._held is None:
      return {"parent": self._parent.get_state(), "held": False}
    return {"parent": self._held_state, "held": True}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._held, self._held_state, self._exhausted = None, None, False
    if state["held"]:
      self._held_state = self._parent.get_state()
      self._held = next(self._parent)  # the same conversation as before: the parent is deterministic

  def __str__(self) -> str:
    return f"SftPackIterator(row_len={self._row_len})"


def to_sft_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row of ``seq_len + 1`` tokens -> the ``seq_len``-long example (``LM_KEYS``, plus the counters)."""
  tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
  same = (seg[1:] == seg[:-1]) & (seg[:-1] != 0)
  out = {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1], "positions": pos[:-1],
         "loss_mask": (same & (row["trainable"][1:] != 0)).astype(np.int32)}
  out.update({k: row[k] for k in COUNTERS})
  return out


def _lm_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: batch[k] for k in LM_KEYS}


def _encoder(config, tokenizer: Tokenizer, source: DocumentSource) -> SftEncode:
  d, s = config.data, config.sft
  return SftEncode(tokenizer, chat.template_from_config(config), source, row_len=d.seq_len + 1,
                   thinking_ratio=s.thinking_ratio, seed=d.seed, train_on=s.train_on, overlong=s.overlong,
                   skip_malformed=d.skip_malformed)


def make_sft_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                     batch_size: int | None = None, source: DocumentSource | None = None) -> grain.IterDataset:
  """The grain ``IterDataset`` of SFT batches, counters included (``make_sft_iterator`` wraps its iterator)."""
  d = config.data
  check_sft_config(config)
  batch = _per_process_batch(config, process_count, batch_size)
  source = source if source is not None else open_conversations(config)
  ds = grain.MapDataset.source(_Rows(source, skip_malformed=d.skip_malformed, held=held_out(config)))
  ds = process_epochs(config, ds, process_index=process_index, process_count=process_count, what="conversations",
                      where=f"data.path ({d.path}) has {len(source)} rows")
  ds = ds.map(_encoder(config, tokenizer, source))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=128))
  it = SftPackIterDataset(it, row_len=d.seq_len + 1, pad_id=tokenizer.pad_id)
  it = it.map(to_sft_example).batch(batch, drop_remainder=True)
  return with_workers(config, it)


def make_sft_eval_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                          batch_size: int | None = None,
                          source: DocumentSource | None = None) -> grain.IterDataset | None:
  """The evaluation batches of this process (``LM_KEYS`` only); None without an eval set. ``source``: the
  already opened training rows, for ``data.eval_fraction``."""
  d = config.data
  held = held_out(config)
  if held is None and not d.eval_path:
    return None
  check_sft_config(config)
  batch = _per_process_batch(config, process_count, batch_size)
  if d.eval_path:
    rows_source = open_conversations(config, d.eval_path)
    rows = _Rows(rows_source, skip_malformed=d.skip_malformed)
    where = f"data.eval_path ({d.eval_path}) has {len(rows_source)} rows"
  else:
    rows_source = source if source is not None else open_conversations(config)
    rows = _Rows(rows_source, skip_malformed=d.skip_malformed, indices=held.indices(len(rows_source)))
    where = (f"data.eval_fraction={d.eval_fraction} holds out {len(rows)} of the {len(rows_source)} rows of "
             f"data.path ({d.path}); raise data.eval_fraction")
  ds = grain.MapDataset.source(rows)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} has no evaluation conversations: {where}")
  ds = ds.repeat(None).map(_encoder(config, tokenizer, rows_source))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  it = SftPackIterDataset(it, row_len=d.seq_len + 1, pad_id=tokenizer.pad_id)
  return it.map(to_sft_example).batch(batch, drop_remainder=True).map(_lm_only)


def _sft_layout(config, tokenizer: Tokenizer, source: DocumentSource, process_index: int, process_count: int,
            batch: int) -> dict[str, Any]:
  d, s = config.data, config.sft
  template = chat.template_from_config(config)
  return {
      "pipeline": "sft", "path": d.path, "format": d.format, "rows": len(source), "seq_len": d.seq_len,
      "shuffle": d.shuffle, "seed": d.seed, "num_epochs": d.num_epochs, "worker_count": d.worker_count,
      "skip_malformed": d.skip_malformed, "eval_fraction": d.eval_fraction,
      "tokenizer": tokenizer.fingerprint[:16],
      "chat_template": template.fingerprint[:16] if template is not None else "builtin",
      "thinking_ratio": s.thinking_ratio, "train_on": s.train_on, "overlong": s.overlong,
      "process_index": process_index, "process_count": process_count, "batch_size": batch,
  }


class SftIterator(DataIterator):
  """Batches of ``LM_KEYS`` (int32 ``[batch, seq_len]``); ``get_state`` / ``set_state`` as ``DataIterator``
  plus the counters; ``metrics()``: the counters (module docstring) over the batches returned so far."""

  def __init__(self, inner: grain.DatasetIterator, *, layout: dict[str, Any], source: DocumentSource):
    super().__init__(inner, layout=layout, source=source)
    self._counts = dict.fromkeys(COUNTERS.values(), 0)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = super().__next__()
    for k, name in COUNTERS.items():
      self._counts[name] += int(np.sum(batch[k]))
    return _lm_only(batch)

  def get_state(self) -> dict[str, Any]:
    return {**super().get_state(), "counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    super().set_state(state)
    self._counts = {name: int(state.get("counts", {}).get(name, 0)) for name in COUNTERS.values()}

  def metrics(self) -> dict[str, int]:
    return dict(self._counts)

  def __str__(self) -> str:
    return "joyjax.SftIterator"


def make_sft_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                      batch_size: int | None = None) -> SftIterator:
  """The checkpointable SFT batch iterator of this process (``batch_size`` per process; None =
  ``train.batch_size // process_count``); ends after ``data.num_epochs`` epochs (0 = never)."""
  check_sft_config(config)
  source = open_conversations(config)
  ds = make_sft_dataset(config, tokenizer, process_index=process_index, process_count=process_count,
                        batch_size=batch_size, source=source)
  batch = _per_process_batch(config, process_count, batch_size)
  layout = _sft_layout(config, tokenizer, source, process_index, process_count, batch)
  return SftIterator(ds.__iter__(), layout=layout, source=source)

