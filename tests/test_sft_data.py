"""SFT input pipeline: whole conversations packed with segment ids, positions and assistant-only loss masks;
overlong truncate / skip counted; exact resume; the thinking ratio; per-process split; eval split; bad rows.

Every batch is taken apart again (rows rebuilt from inputs + the last target, segments decoded and parsed back
to their conversation) and compared with the conversation rendered on its own, so the expected values come from
the chat format's definition, not from the packer.
"""

import collections
import json

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chat_data as cd
from configs import base
from joyjax.batch import LM_KEYS
from joyjax.config import validate
from joyjax.errors import ConfigError, DataError
from joyjax.data import chat, sft
from joyjax.data.pipeline import HeldOut


@pytest.fixture(scope="module")
def tok():
  return cd.chat_tokenizer()


def _cfg(path, **overrides):
  c = base.get_config()
  c.train.batch_size = 2
  c.data.path = str(path)
  c.data.seq_len = 96
  for key, v in overrides.items():
    group, name = key.split("__")
    c[group][name] = v
  return c


def _tagged(convs):
  """The conversations with "#i " before the first question: each one recognisable in the stream."""
  for i, c in enumerate(convs):
    u = next(m for m in c if m["role"] == "user")
    u["content"] = f"#{i} " + u["content"]
  return convs


def _key(conv):
  """Identity of a conversation whatever its mode (reasoning dropped)."""
  return json.dumps([{k: v for k, v in m.items() if k != "reasoning_content"} for m in conv], sort_keys=True)


def _segments(batch, tok):
  """Every (tokens, positions, loss_mask) segment of a batch. The row is inputs + the last target; its last token
  belongs to the last input's segment unless it is padding (the pad token never occurs in a conversation)."""
  out = []
  for b in range(batch["inputs"].shape[0]):
    row = np.concatenate([batch["inputs"][b], batch["targets"][b][-1:]])
    last = batch["segment_ids"][b][-1] if row[-1] != tok.pad_id else 0
    seg = np.concatenate([batch["segment_ids"][b], [last]])
    pos = np.concatenate([batch["positions"][b], [batch["positions"][b][-1] + 1]])
    mask = np.concatenate([batch["loss_mask"][b], [0]])
    assert np.all(row[seg == 0] == tok.pad_id) and np.all(mask[seg == 0] == 0)
    ids = sorted(set(seg.tolist()) - {0})
    assert ids == list(range(1, len(ids) + 1))
    for s in ids:
      where = np.flatnonzero(seg == s)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
      out.append((row[where], pos[where], mask[where]))
  return out


def _check_whole(batches, tok, convs, seq_len, *, overlong="truncate"):
  """Each segment is one whole conversation (or its first seq_len + 1 tokens when truncated), rendered in one
  mode, with positions 0.. and loss_mask[k] = trainable(token k + 1) inside the conversation. Returns the list
  of (conversation index, thinking) in stream order."""
  index = collections.defaultdict(list)
  for i, conv in enumerate(convs):
    index[_key(conv)].append(i)
  seen = []
  for batch in batches:
    assert sorted(batch) == sorted(LM_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (2, seq_len) for v in batch.values())
    for tokens, pos, mask in _segments(batch, tok):
      parsed = chat.parse(tok.decode(tokens), tok)
      thinking = any("reasoning_content" in m for m in parsed)
      full = None
      for i in index.get(_key(parsed), []):
        full = chat.render(convs[i], tok, thinking=thinking)
        break
      if full is None:  # truncated: the segment is a prefix of a conversation's rendering
        assert overlong == "truncate" and len(tokens) == seq_len + 1
        cands = [i for i, c in enumerate(convs)
                 for th in (True, False) if chat.render(c, tok, thinking=th).ids[:seq_len + 1] == tokens.tolist()]
        assert cands, "a segment that is no conversation"
        i = cands[0]
        full = chat.render(convs[i], tok, thinking=thinking)
      elif full.ids != tokens.tolist():  # cut inside its last assistant turn (parse reads what is there)
        assert overlong == "truncate" and full.ids[:seq_len + 1] == tokens.tolist()
      assert np.array_equal(pos, np.arange(len(tokens)))
      assert mask.tolist() == full.loss_mask[1:len(tokens)] + [0]
      seen.append((i, thinking))
  return seen


def test_batches_hold_whole_conversations_with_positions_and_masks(tmp_path, tok):
  convs = _tagged(cd.conversations(60))
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  it = sft.make_sft_iterator(_cfg(path, data__num_epochs=1, data__shuffle=False), tok)
  batches = list(it)
  seen = _check_whole(batches, tok, convs, 96)
  assert [i for i, _ in seen] == list(range(len(seen)))  # in order, each once (the last partial batch dropped)
  assert len(seen) >= 56
  lengths = [len(chat.render(c, tok, thinking=t).ids) for c, (_, t) in zip(convs, seen)]
  m = it.metrics()
  assert m["data/sft_conversations"] == len(seen)
  assert m["data/sft_truncated"] == len([n for n in lengths if n > 97]) > 0
  # every loss-masked target is an assistant token: the masked tokens of a batch decode to assistant text only
  for batch in batches[:5]:
    text = tok.decode(batch["targets"][batch["loss_mask"] == 1])
    assert "<｜User｜>" not in text and "What is" not in text and "Repeat the word" not in text


def test_packing_hand_computed_example():
  """row_len 8; conversations of 3, 4, 2, 8 and 5 tokens and two skips: the 2 does not fit after 3 + 4 and
  starts row 2; the 8 fills row 3; the 5 row 4. A skip counts in the row being filled when it is read."""
  def conv(n, first):
    return {"ids": np.arange(first, first + n, dtype=np.int32), "trainable": np.ones(n, np.int32), "truncated": 0}
  items = [conv(3, 10), conv(4, 20), {"skip": "overlong"}, conv(2, 30), conv(8, 40), {"skip": "malformed"},
           conv(5, 50)]
  items[4]["truncated"] = 1
  rows = list(sft.SftPackIterDataset(grain.MapDataset.source(items).to_iter_dataset(), row_len=8, pad_id=0))
  assert [r["tokens"].tolist() for r in rows] == [
      [10, 11, 12, 20, 21, 22, 23, 0], [30, 31, 0, 0, 0, 0, 0, 0], list(range(40, 48)), [50, 51, 52, 53, 54, 0, 0, 0]]
  assert [r["segment_ids"].tolist() for r in rows] == [
      [1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]
  assert [r["positions"].tolist() for r in rows] == [
      [0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 0, 0, 0, 0, 0], list(range(8)), [0, 1, 2, 3, 4, 0, 0, 0]]
  counts = [{k: int(r[k]) for k in sft.COUNTERS} for r in rows]
  assert counts == [{"n_conversations": 2, "n_truncated": 0, "n_overlong": 1, "n_malformed": 0},
                    {"n_conversations": 1, "n_truncated": 0, "n_overlong": 0, "n_malformed": 0},
                    {"n_conversations": 1, "n_truncated": 1, "n_overlong": 0, "n_malformed": 0},
                    {"n_conversations": 1, "n_truncated": 0, "n_overlong": 0, "n_malformed": 1}]
  ex = sft.to_sft_example({**rows[0], "trainable": np.array([0, 0, 1, 1, 0, 1, 1, 0], np.int32)})
  # target p+1 trainable and in the same conversation as input p: 10->11 no (11 untrainable); 11->12 yes;
  # 12->20 no (20 trainable, but another conversation); 20->21 no; 21->22, 22->23 yes; 23->pad no
  assert ex["loss_mask"].tolist() == [0, 1, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("overlong", ["truncate", "skip"])
def test_overlong_conversations_are_truncated_or_skipped_and_counted(tmp_path, tok, overlong):
  convs = _tagged([cd.conversation(i, turns=1 + 3 * (i % 3 == 0), system=True) for i in range(30)])
  lengths = [len(chat.render(c, tok).ids) for c in convs]
  long = [i for i, n in enumerate(lengths) if n > 65]
  assert 5 <= len(long) <= 20
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  cfg = _cfg(path, data__seq_len=64, data__num_epochs=1, data__shuffle=False, sft__overlong=overlong,
             sft__thinking_ratio=1.0)
  it = sft.make_sft_iterator(cfg, tok)
  batches = list(it)
  seen = _check_whole(batches, tok, convs, 64, overlong=overlong)
  last = max(i for i, _ in seen)
  got_long = [i for i, _ in seen if i in long]
  m = it.metrics()
  if overlong == "skip":
    assert not got_long and m["data/sft_skipped_overlong"] == len([i for i in long if i < last])
    assert m["data/sft_truncated"] == 0
  else:
    assert got_long == [i for i in long if i <= last] and m["data/sft_truncated"] == len(got_long)
    assert m["data/sft_skipped_overlong"] == 0


def test_truncation_that_leaves_nothing_to_train_skips_and_counts(tmp_path, tok):
  long_system = {"role": "system", "content": " ".join(["apple river stone"] * 40)}
  convs = _tagged([cd.conversation(0), [long_system] + cd.conversation(1), cd.conversation(2), cd.conversation(3)])
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  it = sft.make_sft_iterator(_cfg(path, data__seq_len=48, data__num_epochs=1, data__shuffle=False,
                                  train__batch_size=1), tok)
  seen = [i for b in it for i, _ in _check_whole([{k: np.repeat(v, 2, 0) for k, v in b.items()}], tok, convs, 48)]
  assert 1 not in seen and it.metrics()["data/sft_skipped_overlong"] == 1


def test_a_template_that_marks_nothing_is_an_error_naming_the_row(tmp_path, tok):
  """A template that renders no assistant text gives no span: never trained on silently."""
  src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
  directory = cd.write_tokenizer_dir(tmp_path / "tok", tok, src)
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(cd.conversations(8)))
  cfg = _cfg(path, data__tokenizer=directory, data__shuffle=False)
  with pytest.raises(DataError, match=r"c\.jsonl, line 1: the conversation has no trainable token") as e:
    next(sft.make_sft_iterator(cfg, tok))
  assert "\n" not in str(e.value)
  cfg = _cfg(path, data__tokenizer=directory, data__shuffle=False, data__skip_malformed=True, data__num_epochs=1)
  it = sft.make_sft_iterator(cfg, tok)
  assert list(it) == []


def test_resume_from_a_saved_state_gives_the_same_next_batches(tmp_path, tok):
  convs = _tagged(cd.conversations(50))
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  cfg = _cfg(path, data__seq_len=64)
  it = sft.make_sft_iterator(cfg, tok)
  states, batches = [], []
  for _ in range(40):  # past the first epoch: the reshuffled second one too
    states.append(it.get_state())
    batches.append(next(it))
  assert {s["grain"]["held"] for s in states} == {True, False}  # both kinds of state are exercised
  for k in (0, 3, 17, 31):
    again = sft.make_sft_iterator(cfg, tok)
    again.set_state(json.loads(json.dumps(states[k])))  # JSON-able, as saved with a checkpoint
    assert again.metrics() == states[k]["counts"]
    for want in batches[k:k + 5]:
      got = next(again)
      assert all(np.array_equal(got[key], want[key]) for key in LM_KEYS)
  other = sft.make_sft_iterator(_cfg(path, data__seq_len=64, sft__thinking_ratio=0.3), tok)
  with pytest.raises(DataError, match="thinking_ratio"):
    other.set_state(states[3])


def test_thinking_ratio_and_the_row_field(tmp_path, tok):
  assert abs(np.mean([sft.thinking_mode(i, 0.3, 7) for i in range(20000)]) - 0.3) < 0.015
  assert [sft.thinking_mode(i, 0.3, 7) for i in range(50)] == [sft.thinking_mode(i, 0.3, 7) for i in range(50)]
  assert [sft.thinking_mode(i, 0.3, 7) for i in range(50)] != [sft.thinking_mode(i, 0.3, 8) for i in range(50)]
  n = 400
  convs = _tagged(cd.conversations(n, seed=5, mixed=False))
  forced = [True if i % 10 == 1 else False if i % 10 == 2 else None for i in range(n)]
  plain = [i for i in range(n) if i % 10 == 3]  # no reasoning at all: non-thinking unless forced
  for i in plain:
    convs[i] = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in convs[i]]
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs, thinking=forced))
  it = sft.make_sft_iterator(_cfg(path, sft__thinking_ratio=0.25, data__num_epochs=1, data__seq_len=128,
                                  train__batch_size=2), tok)
  seen = dict(_check_whole(list(it), tok, convs, 128))
  assert len(seen) > 0.9 * n
  for i, thinking in seen.items():
    if forced[i] is not None:
      assert thinking == forced[i]
    elif i in plain:
      assert not thinking
    else:
      assert thinking == sft.thinking_mode(i, 0.25, 0)
  free = [t for i, t in seen.items() if forced[i] is None and i not in plain]
  assert abs(np.mean(free) - 0.25) < 0.08  # 3 standard deviations of ~280 draws


def test_prompt_response_rows_and_parquet_read_like_messages(tmp_path, tok):
  rows = cd.prompt_response_rows(20)
  for i, r in enumerate(rows):
    r["prompt"] = f"#{i} " + r["prompt"]
  jsonl = cd.write_jsonl(tmp_path / "pr.jsonl", rows)
  table = pa.Table.from_pylist([{"messages": chat.to_messages(r, where=""), "id": k} for k, r in enumerate(rows)])
  pq.write_table(table, tmp_path / "m.parquet", row_group_size=7)
  out = []
  for path in (jsonl, str(tmp_path / "m.parquet")):
    it = sft.make_sft_iterator(_cfg(path, data__shuffle=False, data__num_epochs=1, sft__thinking_ratio=1.0), tok)
    out.append([b for b in it])
  assert len(out[0]) == len(out[1]) >= 2
  for a, b in zip(*out):
    assert all(np.array_equal(a[k], b[k]) for k in LM_KEYS)
  convs = [chat.to_messages(r, where="") for r in rows]
  assert len(_check_whole(out[0], tok, convs, 96)) >= 15


def test_processes_read_disjoint_conversations(tmp_path, tok):
  convs = _tagged(cd.conversations(40, mixed=False))
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  seen = []
  for p in range(2):
    it = sft.make_sft_iterator(_cfg(path, data__num_epochs=1, data__seq_len=128), tok, process_index=p,
                               process_count=2, batch_size=1)
    seen.append({i for b in it for i, _ in _check_whole([{k: np.repeat(v, 2, 0) for k, v in b.items()}], tok,
                                                        convs, 128)})
  assert not seen[0] & seen[1]
  assert seen[0] <= set(range(0, 40, 2)) and seen[1] <= set(range(1, 40, 2))
  assert len(seen[0] | seen[1]) >= 34


def test_eval_split_is_never_trained_on(tmp_path, tok):
  convs = _tagged(cd.conversations(80, mixed=False))
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(convs))
  cfg = _cfg(path, data__eval_fraction=0.2, data__seq_len=128)
  train = sft.make_sft_iterator(cfg, tok)
  trained = {i for _ in range(60) for i, _ in _check_whole([next(train)], tok, convs, 128)}
  held = set(HeldOut(0.2).indices(80).tolist())
  assert held and not trained & held and len(trained) > 50
  ev = sft.make_sft_eval_dataset(cfg, tok, source=train.source)
  first = [b for _, b in zip(range(6), iter(ev))]
  assert {i for i, _ in _check_whole(first, tok, convs, 128)} == held
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, iter(ev)) for k in LM_KEYS)  # starts over
  evpath = cd.write_jsonl(tmp_path / "e.jsonl", cd.messages_rows(convs[:5]))
  ev = sft.make_sft_eval_dataset(_cfg(path, data__eval_path=evpath, data__seq_len=128), tok)
  assert {i for i, _ in _check_whole([next(iter(ev))], tok, convs, 128)} <= set(range(5))
  assert sft.make_sft_eval_dataset(_cfg(path), tok) is None


def test_malformed_rows_name_file_and_row_or_are_skipped_and_counted(tmp_path, tok):
  good = [json.dumps(r) for r in cd.messages_rows(cd.conversations(6, mixed=False))]
  bad = [
      ("{not json", r"line 3: invalid JSON"),
      (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "line 3: the conversation has no assistant"),
      (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
       r"line 3: message 2 \(assistant\) is empty"),
      (json.dumps({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
       "line 3: message 1: role 'bot'"),
      (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
       r"line 3: message 1 \(user\): content is int"),
      (json.dumps({"messages": [{"role": "user", "content": "<｜User｜>"}, {"role": "assistant", "content": "a"}]}),
       "line 3: message 1 \\(user\\) contains the control token"),
      (json.dumps({"prompt": "q", "response": "a", "thinking": "yes"}), "line 3: field 'thinking' is 'yes'"),
  ]
  for line, message in bad:
    path = cd.write_jsonl(tmp_path / "c.jsonl", good[:2] + [line] + good[2:])
    with pytest.raises(DataError, match=message) as e:
      list(sft.make_sft_iterator(_cfg(path, data__shuffle=False, data__num_epochs=1), tok))
    assert "c.jsonl" in str(e.value) and "\n" not in str(e.value) and "skip_malformed" in str(e.value)
  path = cd.write_jsonl(tmp_path / "c.jsonl", good[:2] + [line for line, _ in bad] + good[2:])
  it = sft.make_sft_iterator(_cfg(path, data__shuffle=False, data__num_epochs=1, data__skip_malformed=True,
                                  train__batch_size=1), tok)
  list(it)
  assert it.metrics()["data/skipped_malformed"] == len(bad)
  assert it.metrics()["data/sft_conversations"] == 6


def test_config_errors_name_the_key(tmp_path, tok):
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(cd.conversations(4)))
  # the sft.* values are checked with the rest of the config (config.validate, run by every config load)
  for key, value, match in (("sft__train_on", "users", "sft.train_on"), ("sft__overlong", "cut", "sft.overlong"),
                            ("sft__thinking_ratio", 1.5, "sft.thinking_ratio")):
    with pytest.raises(ConfigError, match=match):
      validate(_cfg(path, **{key: value}))
  # SFT without conversation files: by the SFT pipeline
  with pytest.raises(ConfigError, match="data.path"):
    sft.make_sft_iterator(_cfg(path, data__path=""), tok)


# Starts worker processes; test_resume_from_a_saved_state_gives_the_same_next_batches is the in-process case.
@pytest.mark.slow
def test_worker_processes_resume_exactly_with_their_counters(tmp_path, tok):
  path = cd.write_jsonl(tmp_path / "c.jsonl", cd.messages_rows(cd.conversations(40)))
  cfg = _cfg(path, data__seq_len=64, data__worker_count=2)
  it = sft.make_sft_iterator(cfg, tok)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  counts = it.metrics()
  it.close()
  fresh = sft.make_sft_iterator(cfg, tok)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(3)]
  fresh.close()
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, expected) for k in LM_KEYS)
  assert all(sorted(b) == sorted(LM_KEYS) and all(type(v) is np.ndarray for v in b.values()) for b in got)
  assert fresh.metrics() == counts and counts["data/sft_conversations"] >= 6
