"""Sequence packing: token documents -> full rows of ``seq_len + 1`` tokens with segment ids and positions.

Rule (greedy, in document order, deterministic):

* Documents are appended to the current row; each piece of a document in a row is a segment
  (ids 1, 2, 3, ... within the row, 0 = padding) and its positions count 0, 1, 2, ... from the piece start.
* A document that does not fit in the rest of the row is split: the row is filled to the end and the
  document continues in the next row as a new segment whose positions restart at 0. (Restarting rather
  than continuing keeps positions below ``seq_len``, inside the rotary range the model trained on.)
* The continuation starts with the LAST token placed in the previous row (one token of overlap): the
  training pair (token -> next token) that straddles the row boundary is then seen once, in the next row.
  So every next-token pair inside a document is trained exactly once.
* A row is padded only when one slot is left (a single token can be no pair's input within its segment)
  and at the end of a finite dataset. Documents of fewer than 2 tokens carry no pair and are dropped.

``to_example`` shifts a row into the model's view: ``inputs = row[:-1]``, ``targets = row[1:]``,
``segment_ids`` / ``positions`` of the inputs, and ``loss_mask`` = 1 where the target belongs to the same
(non-padding) segment as the input: 0 at document boundaries and on padding.

Resume: the packer's state is the parent iterator's state from just before the document currently being
split was fetched, plus the offset into that document. Restoring refetches that one document (the
parent is deterministic) and continues; no buffer is saved.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from joyjax.batch import LM_KEYS

ROW_KEYS = ("tokens", "segment_ids", "positions")


class PackIterDataset(grain.IterDataset):
  """Packs an ``IterDataset`` of 1-D int token arrays into dicts of ``row_len`` int32 arrays (ROW_KEYS)."""

  def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int = 0):
    super().__init__(parent)
    if row_len < 3:
      raise ValueError(f"row_len must be >= 3 (seq_len >= 2), got {row_len}")
    self._row_len, self._pad_id = int(row_len), int(pad_id)

  def __iter__(self) -> "PackIterator":
    return PackIterator(self._parent.__iter__(), row_len=self._row_len, pad_id=self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(row_len={self._row_len})"


class PackIterator(grain.DatasetIterator):
  """Iterator of ``PackIterDataset``; state ``{"parent": <parent state>, "offset": int}`` (see module doc)."""

  def __init__(self, parent: grain.DatasetIterator, *, row_len: int, pad_id: int):
    super().__init__(parent)
    self._row_len, self._pad_id = row_len, pad_id
    self._doc: np.ndarray | None = None  # the document being split across rows
    self._doc_state: Any = None          # parent state from just before self._doc was fetched
    self._offset = 0                     # first token of self._doc the next row takes
    self._exhausted = False

  def _fetch(self) -> None:
    """Loads the next document of >= 2 tokens into ``self._doc`` (StopIteration at the end)."""
    while True:
      state = self._parent.get_state()
      doc = np.asarray(next(self._parent), dtype=np.int32).reshape(-1)
      if doc.size >= 2:
        self._doc, self._doc_state, self._offset = doc, state, 0
        return

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    n = self._row_len
    tokens = np.full(n, self._pad_id, np.int32)
    seg = np.zeros(n, np.int32)
    pos = np.zeros(n, np.int32)
    fill, segment = 0, 0
    while n - fill >= 2:
      if self._doc is None:
        if self._exhausted:
          break
        try:
          self._fetch()
        except StopIteration:
          self._exhausted = True
          break
      doc, off = self._doc, self._offset
      take = min(n - fill, doc.size - off)
      segment += 1
      tokens[fill:fill + take] = doc[off:off + take]
      seg[fill:fill + take] = segment
      pos[fill:fill + take] = np.arange(take, dtype=np.int32)
      fill += take
      if off + take == doc.size:
        self._doc = None
      else:
        self._offset = off + take - 1  # one token of overlap: see module docstring
    if fill == 0:
      raise StopIteration
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": -1}
    return {"parent": self._doc_state, "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._doc_state, self._offset, self._exhausted = None, None, 0, False
    if state["offset"] >= 0:
      self._fetch()  # the same document as before: the parent is deterministic
      self._offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackIterator(row_len={self._row_len})"


def to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row of ``seq_len + 1`` tokens -> the ``seq_len``-long training example (``joyjax.batch.LM_KEYS``)."""
  tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
  same = (seg[1:] == seg[:-1]) & (seg[:-1] != 0)
  return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "segment_ids": seg[:-1],
      "positions": pos[:-1],
      "loss_mask": same.astype(np.int32),
  }
