"""The preference (DPO) input pipeline: pair rows -> rendered chosen / rejected -> packed batches (grain).

**Rows** (``data.path``: JSON lines, Parquet or ArrayRecord JSON records, read whole by ``sources.open_rows``)::

    {"prompt": str | [messages], "chosen": R, "rejected": R}     # optional "system": str, "thinking": bool
    {"messages": [messages], "chosen": R, "rejected": R}          # the conversation before the responses
    {"chosen": [messages], "rejected": [messages]}                # implicit prompt: their common first messages

A response R is a string (the assistant's content), an assistant message (``{"role": "assistant", "content",
"reasoning_content", "tool_calls"}``) or a list of messages ending with an assistant message; a list that
starts with the prompt's messages has them removed. ``thinking`` (else ``dpo.thinking``) picks the mode of
``chat.render``. Each side renders as prompt + response with ``train_on="last"``: the loss mask covers the
final assistant turn only (the response; with a list, earlier messages of the list are context).

**Bad rows** raise ``DataError`` naming the file and row (``source.where``), or with ``data.skip_malformed``
are skipped and counted (``data/skipped_malformed``): a missing field, an empty chosen or rejected (no
content, reasoning or tool call; whitespace counts as empty), chosen and rejected the same (as messages, or
as tokens once rendered, e.g. when they differ only in reasoning rendered non-thinking), a response whose
rendering has no trainable token (a template the assistant span cannot be found in).

**Overlong pairs.** A sequence of n ids takes n - 1 positions (inputs ids[:-1] predict targets ids[1:]); a
pair must fit in ONE row: (n_chosen - 1) + (n_rejected - 1) <= data.seq_len, i.e. B = seq_len + 2 ids in all.
``dpo.overlong = "skip"`` drops a longer pair (counted: ``data/dpo_skipped_overlong``); ``"truncate"`` keeps
(counted: ``data/dpo_truncated``), with each sequence split into its prompt (ids before the first trainable
one) and its response (the rest):

1. each prompt keeps its LAST k tokens, k = min(prompt, max(B // 4, B // 2 - longest response)): the whole
   prompt when the longer response leaves room in half the budget, else at least a quarter of the budget;
2. the responses keep their FIRST tokens within the rest R = B - both kept prompts: the shorter one whole if it
   is at most R // 2 and the longer one cut to the remainder, else both cut to R // 2.

Every kept sequence then has >= 1 prompt token and >= 1 trainable response token.

**Packing and batch layout** (``joyjax.batch.DPO_KEYS``): per process, batches of ``train.batch_size /
processes`` rows of ``data.seq_len`` tokens and ``dpo_pairs_per_batch / processes`` pair slots. Pairs are
taken in order and placed whole (chosen then rejected, adjacent) in the first row with room (first fit); the
batch closes when its pair slots are full or the next pair fits in no row (that pair opens the next batch).
Pair slot j of process p is sequences s + 2j + 1 (chosen) and s + 2j + 2 (rejected), s = p * 2 * pairs per
process, so ids are unique in the global batch; unused slots have no tokens (the loss masks them out). Each
sequence has its own segment id in its row (attention stays inside it) and positions from 0; ``loss_mask``
is 1 where the target is a response token; ``pair_index`` is the pair's row in the source on both sequences'
tokens (-1 elsewhere); with precomputed reference log-probs, ``DPO_REF_KEY`` carries each sequence's at its
first token.

**Order and resume** (as ``pipeline.py``): ``MapDataset.source`` -> process slice -> ``shuffle(data.seed)``
-> ``repeat(data.num_epochs or forever)`` -> render -> ``PairPackIterDataset``. The packer's state is the
parent's state from before the pair waiting for the next batch was fetched (or the current one when none
waits); the iterator state (``pipeline.DataIterator``) has the same format as pretraining's, with this
pipeline's layout. Held-out pairs: ``data.eval_path`` or ``data.eval_fraction`` (``pipeline.HeldOut``), as for
pretraining. ``one_pass=True`` reads every pair of the split once, in index order (the reference pass of
``dpo.reference = "precomputed"``); its last batch may have empty slots.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Mapping

import grain
import numpy as np

from joyjax.batch import DPO_KEYS, DPO_REF_KEY, dpo_pairs_per_batch
from joyjax.data import chat, pipeline, sources
from joyjax.data.tokenizer import Tokenizer
from joyjax.config import OVERLONG_RULES
from joyjax.errors import ConfigError, DataError



# ------------------------------------------------------------------------------------------ rows


def _response_messages(value, key: str, where: str) -> list[dict]:
  """A row's ``chosen`` / ``rejected`` as a list of messages ending with a non-empty assistant message."""
  if isinstance(value, str):
    msgs = [{"role": "assistant", "content": value}]
  elif isinstance(value, dict):
    msgs = [value]
  elif isinstance(value, list):
    msgs = list(value)
  else:
    raise DataError(f"{where}: field {key!r} is {type(value).__name__}, not a string, an assistant message or a "
                    f"list of messages; {sources._FIX}")
  last = msgs[-1] if msgs else None
  if not isinstance(last, dict) or last.get("role", "assistant") != "assistant":
    raise DataError(f"{where}: field {key!r} must end with an assistant message; {sources._FIX}")
  text = [last.get(k) for k in ("content", "reasoning_content", "reasoning")]
  if not any(isinstance(t, str) and t.strip() for t in text) and not last.get("tool_calls"):
    raise DataError(f"{where}: field {key!r} is empty (no content, reasoning or tool call); {sources._FIX}")
  return [dict(m, role="assistant") if m is last and "role" not in m else m for m in msgs]


def _prompt_messages(row: dict, where: str) -> list[dict] | None:
  """The prompt's messages (None: implicit, the common first messages of chosen and rejected)."""
  if "messages" in row:
    prompt = row["messages"]
  elif "prompt" in row:
    prompt = row["prompt"]
  else:
    return None
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  if not isinstance(prompt, list):
    raise DataError(f"{where}: the prompt is {type(prompt).__name__}, not a string or a list of messages; "
                    f"{sources._FIX}")
  system = row.get("system")
  if isinstance(system, str) and system:
    prompt = [{"role": "system", "content": system}] + prompt
  return prompt


def pair_conversations(row, *, where: str, thinking: bool) -> tuple[list[dict], list[dict], bool]:
  """A preference row -> (chosen conversation, rejected conversation, thinking), each normalised and checked
  by ``chat.to_messages`` and ending with the response (module docstring); DataError naming ``where``."""
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; {sources._FIX}")
  missing = [k for k in ("chosen", "rejected") if k not in row]
  if missing:
    fields = ", ".join(sorted(map(str, row))[:10])
    raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (and 'prompt' or 'messages'); "
                    f"missing {', '.join(missing)} (fields: {fields}); {sources._FIX}")
  flag = row.get("thinking")
  if flag is not None and not isinstance(flag, bool):
    raise DataError(f"{where}: field 'thinking' is {type(flag).__name__}, not true or false; {sources._FIX}")
  thinking = thinking if flag is None else flag
  prompt = _prompt_messages(row, where)
  chosen = _response_messages(row["chosen"], "chosen", where)
  rejected = _response_messages(row["rejected"], "rejected", where)
  if prompt is None:  # implicit prompt: the messages chosen and rejected share
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
      k += 1
    prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
  else:
    n = len(prompt)
    chosen = chosen[n:] if len(chosen) > n and chosen[:n] == prompt else chosen
    rejected = rejected[n:] if len(rejected) > n and rejected[:n] == prompt else rejected
  c = chat.to_messages({"messages": prompt + chosen}, where=where)
  r = chat.to_messages({"messages": prompt + rejected}, where=where)
  if c == r:
    raise DataError(f"{where}: 'chosen' and 'rejected' are the same response (nothing to prefer); {sources._FIX}")
  return c, r, thinking


# ------------------------------------------------------------------------------------------ overlong pairs


def _split_prompt(mask) -> int:
  """The prompt's length: the ids before the first trainable one."""
  nz = np.flatnonzero(np.asarray(mask))
  return int(nz[0]) if nz.size else len(mask)


def fit_pair(chosen, chosen_mask, rejected, rejected_mask, budget: int):
  """(chosen, chosen_mask, rejected, rejected_mask, truncated) with len(chosen) + len(rejected) <= ``budget``
  ids (``data.seq_len + 2``) by the module docstring's rule; the inputs as they are when they fit."""
  if len(chosen) + len(rejected) <= budget:
    return chosen, chosen_mask, rejected, rejected_mask, False
  if budget < 4:
    raise ValueError(f"a pair needs a budget of at least 4 ids, got {budget}")
  pc, pr = _split_prompt(chosen_mask), _split_prompt(rejected_mask)
  rc, rr = len(chosen) - pc, len(rejected) - pr
  k = max(budget // 4, budget // 2 - max(rc, rr))
  kc, kr = min(pc, k), min(pr, k)
  rest = budget - kc - kr
  lo = min(rc, rr)
  cap = rest - lo if lo <= rest // 2 else rest // 2

  def cut(ids, mask, p, kp, r):
    keep = slice(p - kp, p + min(r, cap))
    return ids[keep], mask[keep]

  c_ids, c_mask = cut(chosen, chosen_mask, pc, kc, rc)
  r_ids, r_mask = cut(rejected, rejected_mask, pr, kr, rr)
  return c_ids, c_mask, r_ids, r_mask, True


# ------------------------------------------------------------------------------------------ rendering


class RenderPairs:
  """grain map: ``(source index, row)`` -> the rendered pair ``{"index", "chosen", "chosen_mask", "rejected",
  "rejected_mask"[, "ref"]}`` (int32 id / mask arrays; ``ref`` float32 [2]), or None for a skipped pair.

  Counts (``counts()``, this process's reads so far): ``skipped_malformed`` (with ``skip_malformed``),
  ``truncated`` and ``skipped_overlong`` pairs. ``reference``: {source index: (chosen, rejected)} reference
  log-probs to carry in the batch (``dpo.reference = "precomputed"``).
  """

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, overlong: str, thinking: bool, where: Callable,
               skip_malformed: bool, template=None, reference: Mapping[int, tuple[float, float]] | None = None):
    if overlong not in OVERLONG_RULES:
      raise ConfigError(f"config key 'dpo.overlong': must be one of {OVERLONG_RULES}, got {overlong!r}")
    self.tokenizer, self.template = tokenizer, template
    self.budget, self.overlong, self.thinking = int(seq_len) + 2, overlong, bool(thinking)
    self.where, self.skip_malformed, self.reference = where, bool(skip_malformed), reference
    self._counts = {"skipped_malformed": 0, "truncated": 0, "skipped_overlong": 0}
    self._lock = threading.Lock()

  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_lock")
    return d

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _count(self, key: str) -> None:
    with self._lock:
      self._counts[key] += 1

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def _render(self, conv, thinking: bool, side: str, where: str):
    r = chat.render(conv, self.tokenizer, thinking=thinking, train_on="last", template=self.template)
    ids, mask = np.asarray(r.ids, np.int32), np.asarray(r.loss_mask, np.int32)
    if not mask[1:].any():
      raise DataError(f"{where}: the {side} response renders with no trainable token (the chat template marks no "
                      f"assistant span in it); {sources._FIX}")
    return ids, mask

  def __call__(self, item):
    index, row = item
    where = self.where(index)
    try:
      c, r, thinking = pair_conversations(row, where=where, thinking=self.thinking)
      c_ids, c_mask = self._render(c, thinking, "chosen", where)
      r_ids, r_mask = self._render(r, thinking, "rejected", where)
      if np.array_equal(c_ids, r_ids):
        raise DataError(f"{where}: 'chosen' and 'rejected' render to the same tokens (thinking={thinking}); "
                        f"{sources._FIX}")
    except DataError:
      if not self.skip_malformed:
        raise
      self._count("skipped_malformed")
      return None
    if len(c_ids) + len(r_ids) > self.budget:
      if self.overlong == "skip":
        self._count("skipped_overlong")
        return None
      c_ids, c_mask, r_ids, r_mask, _ = fit_pair(c_ids, c_mask, r_ids, r_mask, self.budget)
      self._count("truncated")
    out = {"index": np.int64(index), "chosen": c_ids, "chosen_mask": c_mask, "rejected": r_ids,
           "rejected_mask": r_mask}
    if self.reference is not None:
      ref = self.reference.get(int(index))
      if ref is None:
        raise DataError(f"{where}: no precomputed reference log-probs for this pair (dpo.reference=precomputed); "
                        "recompute them for this data (precompute_reference)")
      out["ref"] = np.asarray(ref, np.float32)
    return out


# ------------------------------------------------------------------------------------------ packing


class PairPackIterDataset(grain.IterDataset):
  """Packs rendered pairs (``RenderPairs``) into whole batches: dicts of ``[rows, seq_len]`` arrays
  (``joyjax.batch.DPO_KEYS``, plus ``DPO_REF_KEY`` when ``with_reference``); see the module docstring."""

  def __init__(self, parent: grain.IterDataset, *, rows: int, seq_len: int, pairs: int, sequence_offset: int = 0,
               pad_id: int = 0, with_reference: bool = False):
    super().__init__(parent)
    if rows < 1 or pairs < 1 or seq_len < 2:
      raise ValueError(f"need rows >= 1, pairs >= 1, seq_len >= 2; got {rows}, {pairs}, {seq_len}")
    self._kw = dict(rows=int(rows), seq_len=int(seq_len), pairs=int(pairs), sequence_offset=int(sequence_offset),
                    pad_id=int(pad_id), with_reference=bool(with_reference))

  def __iter__(self) -> "PairPackIterator":
    return PairPackIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f"PairPackIterDataset({self._kw})"


class PairPackIterator(grain.DatasetIterator):
  """Iterator of ``PairPackIterDataset``; state ``{"parent": <parent state>, "pending": bool}``: the parent's
  state from before the waiting pair was fetched (``pending``), or its current state."""

  def __init__(self, parent: grain.DatasetIterator, *, rows: int, seq_len: int, pairs: int, sequence_offset: int,
               pad_id: int, with_reference: bool):
    super().__init__(parent)
    self._rows, self._seq, self._pairs, self._offset = rows, seq_len, pairs, sequence_offset
    self._pad, self._with_ref = pad_id, with_reference
    self._pending: dict | None = None   # a pair fetched that did not fit in the last batch
    self._pending_state: Any = None
    self._exhausted = False

  def _fetch(self) -> None:
    state = self._parent.get_state()
    self._pending, self._pending_state = next(self._parent), state

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    b, s = self._rows, self._seq
    out = {k: np.zeros((b, s), np.int32) for k in DPO_KEYS}
    out["inputs"][:] = self._pad
    out["targets"][:] = self._pad
    out["pair_index"][:] = -1
    if self._with_ref:
      out[DPO_REF_KEY] = np.zeros((b, s), np.float32)
    fill, segments, placed = [0] * b, [0] * b, 0
    while placed < self._pairs:
      if self._pending is None:
        if self._exhausted:
          break
        try:
          self._fetch()
        except StopIteration:
          self._exhausted = True
          break
      pair = self._pending
      need = len(pair["chosen"]) - 1 + len(pair["rejected"]) - 1
      if need > s:
        raise DataError(f"a pair of {need} positions does not fit in data.seq_len={s} (not fitted by RenderPairs)")
      row = next((r for r in range(b) if fill[r] + need <= s), None)
      if row is None:
        break  # the pair waits for the next batch
      for side, ids_key, mask_key in ((1, "chosen", "chosen_mask"), (2, "rejected", "rejected_mask")):
        ids, mask = pair[ids_key], pair[mask_key]
        n, at = len(ids) - 1, fill[row]
        sl = slice(at, at + n)
        segments[row] += 1
        out["inputs"][row, sl], out["targets"][row, sl] = ids[:-1], ids[1:]
        out["segment_ids"][row, sl] = segments[row]
        out["positions"][row, sl] = np.arange(n, dtype=np.int32)
        out["loss_mask"][row, sl] = mask[1:]
        out["sequence_ids"][row, sl] = self._offset + 2 * placed + side
        out["pair_index"][row, sl] = int(pair["index"])
        if self._with_ref:
          out[DPO_REF_KEY][row, at] = pair["ref"][side - 1]
        fill[row] += n
      placed += 1
      self._pending = None
    if placed == 0:
      raise StopIteration
    return out

  def get_state(self) -> dict[str, Any]:
    if self._pending is not None:
      return {"parent": self._pending_state, "pending": True}
    return {"parent": self._parent.get_state(), "pending": False}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending, self._pending_state, self._exhausted = None, None, False
    if state["pending"]:
      self._fetch()  # the same pair as before: the parent is deterministic

  def __str__(self) -> str:
    return f"PairPackIterator(rows={self._rows}, seq_len={self._seq}, pairs={self._pairs})"


# ------------------------------------------------------------------------------------------ datasets


class _IndexedRows:
  """Random access to ``(source index, row)`` of ``rows`` (or of its ``indices``, in that order); None rows
  (blank, skipped malformed or held out) stay None, so grain drops them."""

  def __init__(self, rows, indices=None):
    self.rows = rows
    self.indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.rows) if self.indices is None else len(self.indices)

  def __getitem__(self, i):
    j = int(i) if self.indices is None else int(self.indices[int(i)])
    row = self.rows[j]
    return None if row is None else (j, row)


def open_pairs(config, *, path: str | None = None) -> sources.DocumentSource:
  """The preference rows of ``data.path`` (or ``path``), whole (``sources.open_rows``)."""
  d = config.data
  path = d.path if path is None else path
  if not path:
    raise ConfigError("config key 'data.path': DPO reads preference rows {prompt | messages, chosen, rejected} "
                      "from files; set data.path (JSON lines, Parquet or ArrayRecord)")
  return sources.open_rows(path, format=d.format, skip_malformed=d.skip_malformed)


def dpo_batch_shape(config, process_count: int = 1) -> tuple[int, int]:
  """(rows, pair slots) of one process's batch; ConfigError when the global ones do not split evenly."""
  rows = pipeline._per_process_batch(config, process_count, None)
  pairs = dpo_pairs_per_batch(config)
  if pairs % process_count:
    raise ConfigError(f"config key 'dpo.pairs_per_batch': {pairs} pairs do not split evenly over {process_count} "
                      f"processes; use a multiple of {process_count}")
  return rows, pairs // process_count


def _renderer(config, tokenizer, source, reference) -> RenderPairs:
  d, p = config.data, config.dpo
  return RenderPairs(tokenizer, seq_len=d.seq_len, overlong=p.overlong, thinking=p.thinking, where=source.where,
                     skip_malformed=d.skip_malformed, template=chat.template_from_config(config),
                     reference=reference)


def _packed(config, tokenizer, ds: grain.MapDataset, render: RenderPairs, *, process_index: int,
            process_count: int, threads: int) -> grain.IterDataset:
  rows, pairs = dpo_batch_shape(config, process_count)
  it = ds.map(render).to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16 * threads))
  return PairPackIterDataset(it, rows=rows, seq_len=config.data.seq_len, pairs=pairs,
                             sequence_offset=process_index * 2 * pairs, pad_id=tokenizer.pad_id,
                             with_reference=render.reference is not None)


def make_dpo_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                     source: sources.DocumentSource | None = None,
                     reference: Mapping[int, tuple[float, float]] | None = None, one_pass: bool = False,
                     render: RenderPairs | None = None) -> grain.IterDataset:
  """This process's training batches (module docstring): shuffled and repeated per ``data.*``, or with
  ``one_pass`` every training pair once in index order (the reference pass)."""
  d = config.data
  source = source if source is not None else open_pairs(config)
  render = render if render is not None else _renderer(config, tokenizer, source, reference)
  held = pipeline.held_out(config)
  ds = grain.MapDataset.source(_IndexedRows(source if held is None else pipeline._WithoutHeldOut(source, held)))
  ds = pipeline.process_epochs(config, ds, process_index=process_index, process_count=process_count,
                               what="preference rows", where=f"data.path ({d.path}) has {len(source)} rows",
                               one_pass=one_pass)
  return _packed(config, tokenizer, ds, render, process_index=process_index, process_count=process_count, threads=8)


def make_dpo_eval_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                          source: sources.DocumentSource | None = None,
                          reference: Mapping[int, tuple[float, float]] | None = None,
                          one_pass: bool = False) -> grain.IterDataset | None:
  """The held-out pairs' batches (``data.eval_path``, or the ``data.eval_fraction`` of ``data.path``) in index
  order, repeated (``iter()`` starts over: the same batches every time) or, with ``one_pass``, once. None
  without an eval set. ``source``: the already opened training rows (or a DPO iterator's ``source``), for
  ``data.eval_fraction``."""
  d = config.data
  held = pipeline.held_out(config)
  if held is None and not d.eval_path:
    return None
  if isinstance(source, _PairMetrics):  # a DPO iterator's ``source``: its rows
    source = source.source
  if d.eval_path:
    rows = open_pairs(config, path=d.eval_path)
    ds = grain.MapDataset.source(_IndexedRows(rows))
    where = f"data.eval_path ({d.eval_path}) has {len(rows)} rows"
  else:
    rows = source if source is not None else open_pairs(config)
    ds = grain.MapDataset.source(_IndexedRows(rows, held.indices(len(rows))))
    where = (f"data.eval_fraction={d.eval_fraction} holds out {len(ds)} of the {len(rows)} rows of data.path "
             f"({d.path}); raise data.eval_fraction")
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} has no evaluation pairs: {where}")
  ds = ds.repeat(1 if one_pass else None)
  return _packed(config, tokenizer, ds, _renderer(config, tokenizer, rows, reference), process_index=process_index,
                 process_count=process_count, threads=2)


class _PairMetrics:
  """The counters of a DPO iterator: the source's skipped malformed rows plus the renderer's counts."""

  def __init__(self, source: sources.DocumentSource, render: RenderPairs):
    self.source, self.render = source, render

  def metrics(self) -> dict[str, int]:
    c = self.render.counts()
    return {"data/skipped_malformed": self.source.skipped + c["skipped_malformed"],
            "data/dpo_truncated": c["truncated"], "data/dpo_skipped_overlong": c["skipped_overlong"]}


def _dpo_layout(config, tokenizer, source, process_index, process_count, one_pass, reference) -> dict[str, Any]:
  d, p = config.data, config.dpo
  rows, pairs = dpo_batch_shape(config, process_count)
  return {"objective": "dpo", "path": d.path, "format": d.format, "rows": len(source), "seq_len": d.seq_len,
          "shuffle": d.shuffle and not one_pass, "seed": d.seed, "num_epochs": 1 if one_pass else d.num_epochs,
          "tokenizer": tokenizer.fingerprint[:16], "chat_template": d.chat_template, "overlong": p.overlong,
          "thinking": p.thinking, "process_index": process_index, "process_count": process_count,
          "batch_rows": rows, "pairs": pairs, "eval_fraction": d.eval_fraction,
          "reference": "precomputed" if reference is not None else "none",
          "files": os.path.basename(source.files[0]) if source.files else ""}


def make_dpo_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                      reference: Mapping[int, tuple[float, float]] | None = None,
                      one_pass: bool = False) -> pipeline.DataIterator:
  """The checkpointable batch iterator of this process (``get_state`` / ``set_state`` as pretraining's;
  ``metrics()``: ``data/skipped_malformed``, ``data/dpo_truncated``, ``data/dpo_skipped_overlong``)."""
  source = open_pairs(config)
  render = _renderer(config, tokenizer, source, reference)
  ds = make_dpo_dataset(config, tokenizer, process_index=process_index, process_count=process_count, source=source,
                        render=render, one_pass=one_pass)
  layout = _dpo_layout(config, tokenizer, source, process_index, process_count, one_pass, reference)
  return pipeline.DataIterator(ds.__iter__(), layout=layout, source=_PairMetrics(source, render))
