"""Streaming safetensors I/O with numpy memory maps.

Reading maps each file and materialises one tensor at a time, so converting a checkpoint never holds it twice.
Writing streams tensor by tensor into shards of bounded size, with the standard ``*.index.json``.
bfloat16 and float8 come from ml_dtypes, so no framework is needed.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from joyjax.errors import CheckpointFormatError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _read_header(path: str) -> tuple[dict, int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointFormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointFormatError(f"{path}: header length {n} exceeds the file size {size}: the file is truncated")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  data_start = 8 + n
  for name, info in header.items():
    end = info["data_offsets"][1]
    if data_start + end > size:
      raise CheckpointFormatError(f"{path}: tensor {name!r} extends past the end of the file: the file is truncated; "
                                  "download or copy it again")
  return header, data_start


class SafetensorsReader:
  """All tensors of a checkpoint directory (single file or sharded with an index), read lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
      if not files:
        raise CheckpointFormatError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for fname in files:
      path = os.path.join(directory, fname)
      if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: listed in model.safetensors.index.json but missing")
      header, start = _read_header(path)
      for name, info in header.items():
        self._where[name] = (path, info, start)

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a numpy array backed by a memory map (no copy until used)."""
    path, info, start = self._where[name]
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = (end - begin) // dtype.itemsize
    arr = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=(count,))
    return arr.reshape(info["shape"])


class ShardedWriter:
  """Writes tensors one at a time into ``model-XXXXX-of-YYYYY.safetensors`` shards plus an index.

  Each shard's header is written once its tensors are known: tensors are buffered up to ``max_shard_bytes``,
  so memory stays at one shard, never the whole model.
  """

  def __init__(self, directory: str, max_shard_bytes: int = 2 << 30):
    os.makedirs(directory, exist_ok=True)
    self.directory = directory
    self.max_shard_bytes = max_shard_bytes
    self._pending: list[tuple[str, np.ndarray]] = []
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    self._total = 0

  def add(self, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending.append((name, array))
    self._pending_bytes += array.nbytes
    self._total += array.nbytes

  def _flush(self) -> None:
    idx = len(self._shards)
    path = os.path.join(self.directory, f".shard-{idx:05d}.tmp")
    header, offset = {}, 0
    for name, arr in self._pending:
      header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                      "data_offsets": [offset, offset + arr.nbytes]}
      offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for _, arr in self._pending:
        f.write(arr.tobytes())
    self._shards.append([n for n, _ in self._pending])
    self._pending, self._pending_bytes = [], 0

  def close(self) -> None:
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    weight_map = {}
    for i, names in enumerate(self._shards):
      final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      os.replace(os.path.join(self.directory, f".shard-{i:05d}.tmp"), os.path.join(self.directory, final))
      weight_map.update({name: final for name in names})
    if n > 1:
      index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
      with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
