"""Document readers: JSON lines, Parquet, plain text and ArrayRecord as grain random-access sources.

Every reader is a grain ``RandomAccessDataSource`` (``__len__`` / ``__getitem__``) whose elements are the
documents as ``str``. Random access (rather than streaming) is what lets grain's index sampler give a
seeded global shuffle and an exact, seek-free resume: the iterator state is just "the next index".

Formats (``data.format``; ``auto`` picks per file by extension, see ``detect_format``):

* ``jsonl``: one JSON object per line, the document in field ``data.text_key``. An index of line start
  offsets (8 bytes per line) is built once when the source opens; blank lines are not rows.
* ``parquet``: the column ``data.text_key`` (string). Rows are read one row group at a time and the last
  few decoded row groups are cached, so a global shuffle over a huge Parquet file re-reads row groups;
  for corpora much larger than memory convert to ArrayRecord, which has per-record random access.
* ``text``: ONE DOCUMENT PER FILE (the whole file, UTF-8). Blank lines inside a file are kept: they are
  part of the document (source code, prose paragraphs), not separators.
* ``arrayrecord``: each record is either a JSON object with ``data.text_key`` or raw UTF-8 text; which
  one is decided per file from its first record (a JSON object means JSON rows).

``data.path`` is a comma-separated list of files, directories (read recursively) and globs; ``gs://`` and
other remote schemes go through ``etils.epath`` where the matching filesystem package is installed.

Whole rows (``open_rows``): conversation and preference data need every field of a row, not one text field.
A source opened with ``text_key=None`` returns each row as a ``dict`` (a JSON object; a Parquet row with
all its columns, nested lists and structs as Python lists and dicts; an ArrayRecord JSON record). Plain text
files hold documents, not rows, and cannot be opened this way. ``DocumentSource.where(i)`` names row i
("file, line 5") for error messages raised after the row was read.

A malformed row (bad JSON, missing text field, text that is not a string or not UTF-8) raises
``DataError`` naming the file, the row and the fix; with ``skip_malformed=True`` the source returns
``None`` for it (grain's ``to_iter_dataset`` drops ``None``) and counts it in ``skipped`` / ``metrics()``.
"""

from __future__ import annotations

import bisect
import glob as _glob
import hashlib
import json
import os
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np

from joyjax.config import DATA_FORMATS
from joyjax.errors import DataError

FORMATS = DATA_FORMATS[1:]  # data.format values that name a reader (the first, "auto", picks by extension)
_FIX = "fix or remove the row, or set data.skip_malformed=True to skip and count such rows"
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip")


class _Malformed(Exception):
  """Raised by a shard for one bad row; the source turns it into DataError or a counted skip."""


# ------------------------------------------------------------------ paths


def _is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def _epath(path: str):
  from etils import epath  # imported lazily: only remote paths need it
  return epath.Path(path)


def detect_format(path: str) -> str | None:
  """The format implied by a file name, or None when the extension says nothing."""
  name = os.path.basename(path).lower()
  if name.endswith(_COMPRESSED):
    raise DataError(f"{path}: compressed files cannot be read by random access (needed for a seeded "
                    "shuffle and exact resume); decompress it, or convert it to Parquet or ArrayRecord")
  if name.endswith((".jsonl", ".json", ".ndjson")):
    return "jsonl"
  if name.endswith((".parquet", ".pq")):
    return "parquet"
  if name.endswith((".txt", ".text", ".md")):
    return "text"
  if "arrayrecord" in name or "array_record" in name:  # also sharded names like x.array_record-00000-of-00008
    return "arrayrecord"
  return None


def _has_magic(s: str) -> bool:
  return _glob.has_magic(s)


def _walk_local(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith((".", "_")))
  return out


def _expand_one(part: str) -> tuple[list[str], bool]:
  """Files named by one path / directory / glob, and whether they came from a walk or glob (not named)."""
  if _is_remote(part):
    p = _epath(part)
    if _has_magic(part):
      # epath globs relative to a base directory: split at the first component with a wildcard.
      comps = part.split("/")
      i = next(k for k, c in enumerate(comps) if _has_magic(c))
      base, pattern = "/".join(comps[:i]), "/".join(comps[i:])
      return sorted(str(x) for x in _epath(base).glob(pattern) if x.is_file()), True
    if p.is_dir():
      return sorted(str(x) for x in p.rglob("*") if x.is_file() and not x.name.startswith((".", "_"))), True
    return ([part] if p.exists() else []), False
  part = os.path.expanduser(_local(part))
  if _has_magic(part):
    return sorted(f for f in _glob.glob(part, recursive=True) if os.path.isfile(f)), True
  if os.path.isdir(part):
    return _walk_local(part), True
  return ([part] if os.path.isfile(part) else []), False


def expand_paths(spec: str, fmt: str = "auto") -> list[tuple[str, str]]:
  """``[(file, format), ...]`` for a comma-separated list of files, directories and globs, in order.

  Files found by a directory walk or a glob whose format cannot be told from the extension are skipped
  (``_SUCCESS``, ``README``...) when ``fmt`` is ``auto``; a file named explicitly must have a known
  extension (or ``data.format`` must be set).
  """
  if fmt != "auto" and fmt not in FORMATS:
    raise DataError(f"data.format must be auto | {' | '.join(FORMATS)}, got {fmt!r}")
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise DataError("data.path is empty; give file(s), directories or globs, or '' for the embedded corpus")
  seen, out = set(), []
  for part in parts:
    files, found = _expand_one(part)
    if not files:
      where = "" if _is_remote(part) or os.path.isabs(_local(part)) else f" (relative to {os.getcwd()})"
      raise DataError(f"data.path entry {part!r} matches no file{where}; set --config.data.path to files, "
                      "directories or globs, comma separated ('' = the embedded corpus)")
    kept = 0
    for f in files:
      kind = fmt if fmt != "auto" else detect_format(f)
      if kind is None:
        if found:
          continue
        raise DataError(f"{f}: cannot tell the format from the extension; set data.format to one of "
                        f"{', '.join(FORMATS)}")
      kept += 1
      if f not in seen:
        seen.add(f)
        out.append((f, kind))
    if not kept:
      raise DataError(f"data.path entry {part!r} matches no file with a known extension "
                      "(.jsonl .json .parquet .txt .md *array_record*); set data.format to read them anyway")
  return out


def files_fingerprint(files: Sequence[str]) -> str:
  """Cheap identity of a set of files: path, size and modification time of each (no content read).

  Used to key caches (the trained tokenizer); touching or replacing a file changes it.
  """
  h = hashlib.sha256()
  for f in files:
    if _is_remote(f):
      st = _epath(f).stat()
      h.update(f"{f}\0{st.length}\0{getattr(st, 'mtime', 0)}\n".encode())
    else:
      st = os.stat(_local(f))
      h.update(f"{os.path.abspath(_local(f))}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


# ------------------------------------------------------------------ byte access


class _ByteReader:
  """Positional reads from one file, safe from many grain prefetch threads at once.

  Local files use ``os.pread`` (no shared file position, so no lock); remote files one handle and a lock.
  Handles are opened lazily and dropped on pickling, so sources travel to grain worker processes.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = None
    self._fh = None
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def size(self) -> int:
    if _is_remote(self.path):
      return int(_epath(self.path).stat().length)
    return os.path.getsize(_local(self.path))

  def pread(self, offset: int, size: int) -> bytes:
    if not _is_remote(self.path) and hasattr(os, "pread"):
      if self._fd is None:
        with self._lock:
          if self._fd is None:
            self._fd = os.open(_local(self.path), os.O_RDONLY)
      return os.pread(self._fd, size, offset)
    with self._lock:
      if self._fh is None:
        self._fh = _epath(self.path).open("rb") if _is_remote(self.path) else open(_local(self.path), "rb")
      self._fh.seek(offset)
      return self._fh.read(size)

  def read_all(self) -> bytes:
    if _is_remote(self.path):
      return _epath(self.path).read_bytes()
    with open(_local(self.path), "rb") as f:
      return f.read()

  def __del__(self):
    try:
      if self._fd is not None:
        os.close(self._fd)
      if self._fh is not None:
        self._fh.close()
    except Exception:  # interpreter shutdown
      pass


def _text_from_json(raw: bytes, text_key: str | None) -> str | dict:
  """The text field ``text_key`` of a JSON row, or the whole row (a dict) when ``text_key`` is None."""
  try:
    obj = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise _Malformed(f"invalid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")
  if text_key is None:
    return obj
  if text_key not in obj:
    fields = ", ".join(sorted(map(str, obj))[:10])
    raise _Malformed(f"no field {text_key!r} (fields: {fields}); "
                     "set data.text_key to the field holding the text")
  text = obj[text_key]
  if not isinstance(text, str):
    raise _Malformed(f"field {text_key!r} is {type(text).__name__}, not a string")
  return text


# ------------------------------------------------------------------ shards: one file (or file list) each


class _JsonlShard:
  """One JSON-lines file; row j is line j + 1 (blank lines are rows that read as None, never malformed)."""

  unit = "line"
  _CHUNK = 16 << 20

  def __init__(self, path: str, text_key: str):
    self.path, self.text_key = path, text_key
    self._reader = _ByteReader(path)
    self._size = self._reader.size()
    starts, pos = [np.zeros(1, np.int64)], 0
    while pos < self._size:  # find newlines chunk by chunk: the file never sits in memory whole
      chunk = self._reader.pread(pos, self._CHUNK)
      if not chunk:
        break
      starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A).astype(np.int64) + pos + 1)
      pos += len(chunk)
    s = np.concatenate(starts)
    self._starts = s[s < self._size]

  def __len__(self) -> int:
    return len(self._starts)

  def name(self, j: int) -> str:
    return self.path

  def read(self, j: int) -> str | None:
    start = int(self._starts[j])
    end = int(self._starts[j + 1]) if j + 1 < len(self._starts) else self._size
    raw = self._reader.pread(start, end - start).strip()
    if not raw:
      return None
    return _text_from_json(raw, self.text_key)


class _ParquetShard:
  """One Parquet file; rows are decoded one row group at a time with a small LRU cache of row groups."""

  unit = "row"
  cache_row_groups = 4

  def __init__(self, path: str, text_key: str):
    import pyarrow as pa
    self.path, self.text_key = path, text_key
    self._lock = threading.Lock()
    self._cache: OrderedDict = OrderedDict()
    pf = self._file()
    schema = pf.schema_arrow
    if text_key is None:  # whole rows: every column
      pass
    elif text_key not in schema.names:
      raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}); "
                      "set data.text_key to the column holding the text")
    t = schema.field(text_key).type if text_key is not None else pa.string()
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"):
      raise DataError(f"{path}: column {text_key!r} has type {t}, not string; "
                      "set data.text_key to a string column")
    md = pf.metadata
    self._offsets = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])

  def __getstate__(self):
    return {"path": self.path, "text_key": self.text_key, "_offsets": self._offsets}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._cache = OrderedDict()

  def _file(self):
    import pyarrow.parquet as pq
    if "_pf" not in self.__dict__:
      src = _epath(self.path).open("rb") if _is_remote(self.path) else _local(self.path)
      self._pf = pq.ParquetFile(src)
    return self._pf

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def name(self, j: int) -> str:
    return self.path

  def read(self, j: int) -> str | dict | None:
    g = int(np.searchsorted(self._offsets, j, side="right")) - 1
    with self._lock:  # ParquetFile is not thread-safe; the cache is shared by prefetch threads
      col = self._cache.get(g)
      if col is None:
        if self.text_key is None:  # whole rows: the row group as a table
          col = self._file().read_row_group(g)
        else:
          col = self._file().read_row_group(g, columns=[self.text_key]).column(0).combine_chunks()
        self._cache[g] = col
        while len(self._cache) > self.cache_row_groups:
          self._cache.popitem(last=False)
      else:
        self._cache.move_to_end(g)
    if self.text_key is None:
      return col.slice(j - int(self._offsets[g]), 1).to_pylist()[0]
    text = col[j - int(self._offsets[g])].as_py()
    if text is None:
      raise _Malformed(f"column {self.text_key!r} is null")
    return text


class _TextShard:
  """Plain text files, ONE DOCUMENT PER FILE: row j is the whole of file j."""

  unit = "file"

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self._readers = [_ByteReader(p) for p in self.paths]
    self.path = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} text files"

  def __len__(self) -> int:
    return len(self.paths)

  def name(self, j: int) -> str:
    return self.paths[j]

  def read(self, j: int) -> str | None:
    raw = self._readers[j].read_all()
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Malformed(f"not valid UTF-8 ({e}); re-encode the file as UTF-8") from None


class _ArrayRecordShard:
  """One ArrayRecord file; records are JSON objects with the text field or raw UTF-8 text.

  Which of the two is decided once from record 0: a JSON object means every record is a JSON row (so a
  later record that fails to parse is malformed, not silently read as text).
  """

  unit = "record"

  def __init__(self, path: str, text_key: str):
    from grain.sources import ArrayRecordDataSource
    self.path, self.text_key = path, text_key
    self._ds = ArrayRecordDataSource([path])
    self._json = None
    if len(self._ds):
      try:
        self._json = isinstance(json.loads(self._ds[0]), dict)
      except (ValueError, UnicodeDecodeError):
        self._json = False

  def __len__(self) -> int:
    return len(self._ds)

  def name(self, j: int) -> str:
    return self.path

  def read(self, j: int) -> str | None:
    raw = self._ds[j]
    if self._json or self.text_key is None:  # whole rows are JSON records
      return _text_from_json(raw, self.text_key)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Malformed(f"not valid UTF-8 ({e})") from None


# ------------------------------------------------------------------ the source


class DocumentSource:
  """A grain ``RandomAccessDataSource`` of documents (``str``) over shards of one or several formats.

  ``source[i]`` is document i in file order (files in the order ``data.path`` lists them, globs and
  directories sorted). It is ``None`` for a blank JSON line, and for a malformed row when
  ``skip_malformed`` is set (that row is then counted once in ``skipped``); otherwise a malformed row
  raises ``DataError``. Opened for whole rows (``open_rows``), the elements are dicts instead of strings.
  """

  def __init__(self, shards: Sequence, *, skip_malformed: bool = False):
    self.shards = list(shards)
    self.skip_malformed = skip_malformed
    self._starts = [0]
    for s in self.shards:
      self._starts.append(self._starts[-1] + len(s))
    self._skipped: set[tuple[int, int]] = set()
    self._lock = threading.Lock()

  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_lock")
    return d

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def files(self) -> list[str]:
    out = []
    for s in self.shards:
      out.extend(getattr(s, "paths", [s.path]))
    return out

  def __len__(self) -> int:
    return self._starts[-1]

  def __repr__(self) -> str:
    return f"DocumentSource({len(self)} rows in {len(self.files)} files)"

  def where(self, index) -> str:
    """Row ``index`` for messages: "file, line 5" (JSON lines), "file, row 5" (Parquet) or the text file."""
    i = int(index)
    k = bisect.bisect_right(self._starts, i) - 1
    shard, j = self.shards[k], i - self._starts[k]
    return f"{shard.name(j)}, {shard.unit} {j + 1}" if shard.unit != "file" else shard.name(j)

  def __getitem__(self, index) -> str | dict | None:
    i = int(index)
    if not 0 <= i < len(self):
      raise IndexError(f"document index {i} out of range for {len(self)} rows")
    k = bisect.bisect_right(self._starts, i) - 1
    shard, j = self.shards[k], i - self._starts[k]
    try:
      return shard.read(j)
    except _Malformed as e:
      where = self.where(i)
      if not self.skip_malformed:
        raise DataError(f"{where}: {e}; {_FIX}") from None
      with self._lock:
        self._skipped.add((k, j))
      return None

  @property
  def skipped(self) -> int:
    """Distinct malformed rows skipped so far by this process (rows read by grain workers not included)."""
    return len(self._skipped)

  def metrics(self) -> dict[str, int]:
    return {"data/skipped_malformed": self.skipped}


def _make_shards(files: Sequence[tuple[str, str]], text_key: str | None) -> list:
  shards, texts = [], []
  for f, kind in files:
    if kind == "text" and text_key is None:
      raise DataError(f"{f}: a plain-text file holds one document, not rows of fields; give JSON lines, Parquet "
                      "or ArrayRecord (JSON records) files")
    if kind == "text":  # consecutive text files share one shard: one row per file
      texts.append(f)
      continue
    if texts:
      shards.append(_TextShard(texts))
      texts = []
    try:
      if kind == "jsonl":
        shards.append(_JsonlShard(f, text_key))
      elif kind == "parquet":
        shards.append(_ParquetShard(f, text_key))
      elif kind == "arrayrecord":
        shards.append(_ArrayRecordShard(f, text_key))
      else:
        raise DataError(f"{f}: unknown format {kind!r}")
    except DataError:
      raise
    except Exception as e:  # pyarrow / array_record errors: say which file and what format was assumed
      raise DataError(f"{f}: cannot open as {kind} ({type(e).__name__}: {e}); check the file, or set "
                      "data.format if the extension is misleading") from e
  if texts:
    shards.append(_TextShard(texts))
  return shards


def open_source(path: str, *, format: str = "auto", text_key: str = "text",
                skip_malformed: bool = False) -> DocumentSource:
  """Opens ``path`` (comma-separated files / directories / globs) as one ``DocumentSource``."""
  return DocumentSource(_make_shards(expand_paths(path, format), text_key), skip_malformed=skip_malformed)


def open_rows(path: str, *, format: str = "auto", skip_malformed: bool = False) -> DocumentSource:
  """Opens ``path`` (as ``open_source``) for whole rows: each element is the row as a dict (module docstring)."""
  return DocumentSource(_make_shards(expand_paths(path, format), None), skip_malformed=skip_malformed)


def JsonlSource(paths: str, *, text_key: str = "text", skip_malformed: bool = False) -> DocumentSource:
  """JSON-lines documents (field ``text_key``) from ``paths`` whatever their extension."""
  return open_source(paths, format="jsonl", text_key=text_key, skip_malformed=skip_malformed)


def ParquetSource(paths: str, *, text_key: str = "text", skip_malformed: bool = False) -> DocumentSource:
  """Parquet documents (string column ``text_key``) from ``paths``."""
  return open_source(paths, format="parquet", text_key=text_key, skip_malformed=skip_malformed)


def TextSource(paths: str, *, skip_malformed: bool = False) -> DocumentSource:
  """Plain-text documents, one document per file, from ``paths``."""
  return open_source(paths, format="text", skip_malformed=skip_malformed)


def ArrayRecordSource(paths: str, *, text_key: str = "text", skip_malformed: bool = False) -> DocumentSource:
  """ArrayRecord documents (JSON rows with ``text_key`` or raw UTF-8 records) from ``paths``."""
  return open_source(paths, format="arrayrecord", text_key=text_key, skip_malformed=skip_malformed)
