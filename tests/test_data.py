"""Data pipeline: sources, tokenizer cache, embedded corpus, packing, shuffle, sharding and exact resume.

Expected values come from the definitions (a hand-packed example; documents rebuilt from the packed
stream and compared with the original text), never from the code's own earlier output.
"""

import json
import os
import random

import grain
import numpy as np
import pytest

from configs import base
from joyjax.batch import LM_KEYS
from joyjax.errors import ConfigError
from joyjax import data
from joyjax.data import corpus as corpus_mod
from joyjax.data import tokenizer as tok_mod
from joyjax.data.packing import PackIterDataset, to_example

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega def return class import yield café naïve 数据 ✓").split()


def _make_docs(n=36, seed=0):
  rng = random.Random(seed)
  docs = []
  for k in range(n):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 90))]
    docs.append(f"doc {k}: " + " ".join(words) + ("\n\n  indented line\n" if k % 5 == 0 else ""))
  docs[7] = "a document quoting <|eos|> and <|bos|> literally"
  return docs


DOCS = _make_docs()


@pytest.fixture(scope="module")
def tok():
  return data.train_tokenizer(DOCS * 3, 300)


def _cfg(tmp_path, path="", **data_overrides):
  c = base.get_config()
  c.model.vocab_size = 512
  c.train.batch_size = 2
  d = c.data
  d.path = str(path)
  d.cache_dir = str(tmp_path / "cache")
  d.seq_len = 16
  d.tokenizer_vocab_size = 300
  for k, v in data_overrides.items():
    d[k] = v
  return c


# ------------------------------------------------------------------ writers for every format


def _write_jsonl(path, docs, key="text"):
  with open(path, "w", encoding="utf-8") as f:
    for i, t in enumerate(docs):
      f.write(json.dumps({"id": i, key: t}, ensure_ascii=False) + "\n")
  return path


def _write_parquet(path, docs, row_group_size=10):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=row_group_size)
  return path


def _write_text_dir(path, docs):
  os.makedirs(path)
  for i, t in enumerate(docs):
    with open(os.path.join(path, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(t)
  return path


def _write_arrayrecord(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    w.write(r)
  w.close()
  return path


def _all(source):
  return [t for t in (source[i] for i in range(len(source))) if t is not None]


def _rows(example_batches):
  """Full packed rows (tokens, segment ids) rebuilt from shifted examples, in stream order."""
  for b in example_batches:
    for r in range(b["inputs"].shape[0]):
      seg_in, mask = b["segment_ids"][r], b["loss_mask"][r]
      tokens = np.append(b["inputs"][r], b["targets"][r][-1])
      # The last row token is in the last input's segment iff that pair is trained; else it is padding
      # (the packer never starts a one-token piece in the last slot).
      seg = np.append(seg_in, seg_in[-1] if mask[-1] else 0)
      yield tokens, seg


def _rebuild(example_batches, tok):
  """Documents (as text) reassembled from the packed stream: a piece starting with BOS starts a new
  document; any other piece continues the previous one after its one token of overlap."""
  docs = []
  for tokens, seg in _rows(example_batches):
    for s in range(1, seg.max() + 1):
      piece = tokens[seg == s]
      assert len(piece) >= 2
      if piece[0] == tok.bos_id:
        docs.append(list(piece))
      else:
        assert s == 1, "a continuation must open its row"
        assert docs and docs[-1][-1] == piece[0], "continuation must overlap the previous row by one token"
        docs[-1].extend(piece[1:])
  out = []
  for ids in docs:
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    out.append(tok.decode(ids[1:-1]))
  return out


# ------------------------------------------------------------------ sources


def test_every_format_reads_the_same_documents_and_tokens(tmp_path, tok):
  paths = {
      "jsonl": _write_jsonl(tmp_path / "d.jsonl", DOCS),
      "parquet": _write_parquet(tmp_path / "d.parquet", DOCS),
      "text": _write_text_dir(tmp_path / "txt", DOCS),
      "arrayrecord": _write_arrayrecord(tmp_path / "d.array_record",
                                        [json.dumps({"text": t}).encode() for t in DOCS]),
      "arrayrecord_raw": _write_arrayrecord(tmp_path / "raw.arrayrecord", [t.encode() for t in DOCS]),
  }
  first = None
  for name, p in paths.items():
    src = data.open_source(str(p))
    assert _all(src) == DOCS, name
    c = _cfg(tmp_path, p, shuffle=False, num_epochs=1)
    batches = list(data.make_iterator(c, tok, batch_size=1))
    assert _rebuild(batches, tok) == DOCS, name
    if first is None:
      first = batches
    else:
      assert len(batches) == len(first)
      for a, b in zip(first, batches):
        for k in LM_KEYS:
          np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
  # Comma-separated lists and globs mix formats; explicit format overrides the extension.
  mixed = data.open_source(f"{paths['jsonl']},{tmp_path}/*.parquet")
  assert _all(mixed) == DOCS + DOCS
  assert _all(data.JsonlSource(str(_write_jsonl(tmp_path / "d.data", DOCS[:3])))) == DOCS[:3]


def test_path_errors_name_the_path(tmp_path):
  with pytest.raises(data.DataError, match="nothing_here"):
    data.open_source(str(tmp_path / "nothing_here.jsonl"))
  (tmp_path / "x.bin").write_text("hi")
  with pytest.raises(data.DataError, match=r"x\.bin.*data\.format"):
    data.open_source(str(tmp_path / "x.bin"))
  with pytest.raises(data.DataError, match="decompress"):
    data.detect_format("a.jsonl.gz")


def test_malformed_rows_name_file_and_row_or_are_skipped_and_counted(tmp_path, tok):
  good = DOCS[:6]
  p = tmp_path / "bad.jsonl"
  lines = [json.dumps({"text": t}) for t in good]
  lines.insert(2, "{not json")                    # line 3
  lines.insert(4, json.dumps({"body": "x"}))      # line 5: missing text key
  lines.insert(6, json.dumps({"text": 42}))       # line 7: not a string
  p.write_text("\n".join(lines) + "\n")
  src = data.open_source(str(p))
  for line, what in ((3, "invalid JSON"), (5, "no field 'text'"), (7, "field .text. is int, not a string")):
    with pytest.raises(data.DataError, match=rf"bad\.jsonl, line {line}: {what}.*skip_malformed=True"):
      src[line - 1]
  with pytest.raises(data.DataError, match=r"bad\.jsonl, line 3"):  # through the whole pipeline
    list(data.make_iterator(_cfg(tmp_path, p, shuffle=False, num_epochs=1), tok, batch_size=1))

  c = _cfg(tmp_path, p, shuffle=False, num_epochs=1, skip_malformed=True)
  it = data.make_iterator(c, tok, batch_size=1)
  assert _rebuild(list(it), tok) == good
  assert it.metrics() == {"data/skipped_malformed": 3}

  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["ok", None, "fine"]}), tmp_path / "n.parquet")
  with pytest.raises(data.DataError, match=r"n\.parquet, row 2: column 'text' is null"):
    data.open_source(str(tmp_path / "n.parquet"))[1]
  with pytest.raises(data.DataError, match=r"no column 'body'.*data\.text_key"):
    data.open_source(str(tmp_path / "n.parquet"), text_key="body")
  _write_arrayrecord(tmp_path / "b.array_record", [b'{"text": "a"}', b"{oops", b'{"text": "c"}'])
  with pytest.raises(data.DataError, match=r"b\.array_record, record 2: invalid JSON"):
    data.open_source(str(tmp_path / "b.array_record"))[1]
  src = data.open_source(str(tmp_path / "b.array_record"), skip_malformed=True)
  assert _all(src) == ["a", "c"] and src.skipped == 1


# ------------------------------------------------------------------ packing


def _pack(docs, row_len, pad_id=0):
  ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset()
  return PackIterDataset(ds, row_len=row_len, pad_id=pad_id)


def test_packing_hand_computed_example():
  # row_len 6 (seq_len 5); doc B (7 tokens) splits with one token of overlap; the 1-slot tail is padding.
  rows = list(_pack([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12], [13]], row_len=6, pad_id=99))
  expect = [
      ([1, 2, 3, 4, 5, 6], [1, 1, 1, 2, 2, 2], [0, 1, 2, 0, 1, 2]),
      ([6, 7, 8, 9, 10, 99], [1, 1, 1, 1, 1, 0], [0, 1, 2, 3, 4, 0]),
      ([11, 12, 99, 99, 99, 99], [1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]),  # [13]: one token, dropped
  ]
  assert len(rows) == len(expect)
  for row, (t, s, p) in zip(rows, expect):
    np.testing.assert_array_equal(row["tokens"], t)
    np.testing.assert_array_equal(row["segment_ids"], s)
    np.testing.assert_array_equal(row["positions"], p)
  ex = [to_example(r) for r in rows]
  np.testing.assert_array_equal(ex[0]["inputs"], [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(ex[0]["targets"], [2, 3, 4, 5, 6])
  np.testing.assert_array_equal(ex[0]["segment_ids"], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(ex[0]["positions"], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(ex[0]["loss_mask"], [1, 1, 0, 1, 1])  # 3 -> 4 crosses documents
  np.testing.assert_array_equal(ex[1]["loss_mask"], [1, 1, 1, 1, 0])  # 10 -> pad
  np.testing.assert_array_equal(ex[2]["loss_mask"], [1, 0, 0, 0, 0])
  for e in ex:
    assert all(v.dtype == np.int32 and v.shape == (5,) for v in e.values())


def test_packing_never_crosses_documents_and_trains_every_pair_once():
  rng = np.random.default_rng(0)
  lengths = [int(n) for n in rng.integers(2, 60, size=40)] + [100, 3, 2]  # includes docs > 5 rows
  docs = [[1000 * (k + 1) + i for i in range(n)] for k, n in enumerate(lengths)]
  pairs = []
  for row in _pack(docs, row_len=17):
    e = to_example(row)
    m = e["loss_mask"].astype(bool)
    assert (e["inputs"][m] // 1000 == e["targets"][m] // 1000).all()     # same document
    assert (e["targets"][m] == e["inputs"][m] + 1).all()                # the true next token
    for s in range(1, row["segment_ids"].max() + 1):                     # positions restart per segment
      np.testing.assert_array_equal(row["positions"][row["segment_ids"] == s],
                                    np.arange((row["segment_ids"] == s).sum()))
    pairs += list(e["inputs"][m])
  expected = [t for d in docs for t in d[:-1]]
  assert sorted(pairs) == sorted(expected)  # each within-document pair exactly once: nothing lost


def test_packing_state_restores_mid_document():
  docs = [[1000 * (k + 1) + i for i in range(n)] for k, n in enumerate([5, 40, 3, 33, 2, 18])]
  full = [r["tokens"] for r in _pack(docs, row_len=8)]
  for k in range(len(full)):
    it = iter(_pack(docs, row_len=8))
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(_pack(docs, row_len=8))
    fresh.set_state(state)
    rest = [r["tokens"] for r in fresh]
    assert len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
      np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ pipeline


@pytest.fixture
def jsonl(tmp_path):
  return _write_jsonl(tmp_path / "corpus.jsonl", DOCS)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in LM_KEYS)


def test_batches_have_the_documented_shape(tmp_path, jsonl, tok):
  b = next(data.make_iterator(_cfg(tmp_path, jsonl), tok))
  assert sorted(b) == sorted(LM_KEYS)
  for v in b.values():
    assert v.dtype == np.int32 and v.shape == (2, 16)


def test_shuffle_is_deterministic_by_seed(tmp_path, jsonl, tok):
  def order(seed, shuffle=True):
    c = _cfg(tmp_path, jsonl, seed=seed, shuffle=shuffle, num_epochs=1)
    return _rebuild(list(data.make_iterator(c, tok, batch_size=1)), tok)
  a, b, other = order(0), order(0), order(1)
  assert a == b
  assert a != other and sorted(a) == sorted(other) == sorted(DOCS)
  assert order(0, shuffle=False) == DOCS
  two = _rebuild(list(data.make_iterator(_cfg(tmp_path, jsonl, num_epochs=2), tok, batch_size=1)), tok)
  assert two[:len(DOCS)] == a and sorted(two[len(DOCS):]) == sorted(DOCS) and two[len(DOCS):] != a


def test_iterator_state_round_trip_gives_identical_next_batches(tmp_path, jsonl, tok):
  c = _cfg(tmp_path, jsonl, num_epochs=1)
  per_epoch = len(list(data.make_iterator(c, tok, batch_size=8)))
  c.data.num_epochs = 0  # shuffled, repeating forever
  for skip in (3, per_epoch + 1):  # the second one saves and resumes across an epoch boundary
    it = data.make_iterator(c, tok, batch_size=8)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _take(it, 2)
    fresh = data.make_iterator(c, tok, batch_size=8)
    fresh.set_state(state)
    assert _same(_take(fresh, 2), expected)
    assert not _same(expected, _take(data.make_iterator(c, tok, batch_size=8), 2))  # it did move on
  c.data.seed = 1
  with pytest.raises(data.DataError, match="seed: saved 0, now 1"):
    data.make_iterator(c, tok, batch_size=8).set_state(state)


def test_processes_read_disjoint_slices_covering_all_documents(tmp_path, jsonl, tok):
  c = _cfg(tmp_path, jsonl, num_epochs=1)
  seen = [_rebuild(list(data.make_iterator(c, tok, process_index=i, process_count=2, batch_size=1)), tok)
          for i in range(2)]
  assert seen[0] and seen[1]
  assert sorted(seen[0] + seen[1]) == sorted(DOCS)
  assert not set(seen[0]) & set(seen[1])
  c.train.batch_size = 3
  with pytest.raises(ConfigError, match="train.batch_size"):
    data.make_iterator(c, tok, process_count=2)


# ------------------------------------------------------------------ tokenizer


def test_training_is_deterministic(tok):
  # Hosts that each train (no shared cache_dir) must end up with the same tokenizer.
  assert data.train_tokenizer(DOCS * 3, 300).fingerprint == tok.fingerprint


def test_special_token_strings_in_text_are_plain_text(tok):
  ids = tok.encode(DOCS[7])
  assert tok.eos_id not in ids and tok.bos_id not in ids
  assert tok.decode(ids) == DOCS[7]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_tokenizer_is_trained_once_then_loaded_from_cache(tmp_path, jsonl, monkeypatch):
  c = _cfg(tmp_path, jsonl)
  first = data.build_tokenizer(c)
  assert first.origin == "trained" and first.vocab_size <= 300
  files = os.listdir(c.data.cache_dir)
  assert len(files) == 1 and files[0].startswith("tokenizer-bpe300-")  # no temp file left behind

  def no_training(*a, **k):
    raise AssertionError("retrained although cached")

  monkeypatch.setattr(tok_mod, "train_tokenizer", no_training)
  second = data.build_tokenizer(c)
  assert second.origin == "cache" and second.fingerprint == first.fingerprint
  assert second.encode(DOCS[3]) == first.encode(DOCS[3])


def test_vocab_size_checks_name_both_keys(tmp_path, jsonl, tok):
  c = _cfg(tmp_path, jsonl)
  c.model.vocab_size = 280
  with pytest.raises(ConfigError, match=r"data\.tokenizer_vocab_size.*model\.vocab_size"):
    data.build_tokenizer(c)
  tok.save(str(tmp_path / "tk" / "tokenizer.json"))
  c.data.tokenizer = str(tmp_path / "tk")
  c.model.vocab_size = 100
  with pytest.raises(ConfigError, match=r"model\.vocab_size.*data\.tokenizer"):
    data.build_tokenizer(c)
  c.model.vocab_size = 512
  loaded = data.build_tokenizer(c)
  assert loaded.encode(DOCS[1]) == tok.encode(DOCS[1]) and loaded.bos_id == tok.bos_id


def test_loads_a_deepseek_style_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
  hf.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=280, special_tokens=specials,
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                   show_progress=False))
  hf.save(str(tmp_path / "tokenizer.json"))
  t = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": specials[1]}}))
  assert data.load_tokenizer(str(tmp_path)).bos_id == 1  # tokenizer_config.json wins


# ------------------------------------------------------------------ embedded corpus


def test_embedded_corpus_is_deterministic_and_excludes_tests(tmp_path):
  a = data.build_embedded_corpus(str(tmp_path / "a"), max_bytes=300_000)
  b = data.build_embedded_corpus(str(tmp_path / "b"), max_bytes=300_000)
  assert os.path.basename(a) == os.path.basename(b)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  mtime = os.stat(a).st_mtime_ns
  assert data.build_embedded_corpus(str(tmp_path / "a"), max_bytes=300_000) == a
  assert os.stat(a).st_mtime_ns == mtime  # materialised once
  rows = [json.loads(line) for line in open(a, encoding="utf-8")]
  assert len(rows) > 5 and sum(len(r["text"].encode()) for r in rows) <= 300_000
  for r in rows:
    parts = r["path"].split("/")
    assert r["path"].endswith(".py") and not {"test", "tests", "site-packages"} & set(parts)
  assert _all(data.open_source(a)) == [r["text"] for r in rows]
  assert [t for _, t in corpus_mod.select_stdlib_files(300_000)] == [r["text"] for r in rows]


# Starts worker processes; test_iterator_state_round_trip_gives_identical_next_batches is the in-process case.
@pytest.mark.slow
def test_worker_processes_resume_exactly(tmp_path, jsonl, tok):
  c = _cfg(tmp_path, jsonl, worker_count=2)
  it = data.make_iterator(c, tok, batch_size=4)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  it.close()
  fresh = data.make_iterator(c, tok, batch_size=4)
  fresh.set_state(state)
  got = _take(fresh, 2)
  fresh.close()
  assert _same(got, expected)
  assert all(type(v) is np.ndarray and v.dtype == np.int32 for b in got for v in b.values())
