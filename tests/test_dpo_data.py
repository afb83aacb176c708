"""data/dpo.py: preference rows -> rendered pairs -> packed DPO batches.

* Row layouts (prompt string, messages + assistant dicts, implicit-prompt lists, multi-turn) give the expected
  conversations; bad rows (empty or whitespace chosen, empty assistant message, identical responses, missing
  field, a wrong type, identical once rendered) are DataErrors naming the file and line, or skipped and counted.
* The batch layout: each pair's chosen (sequence 2j + 1) and rejected (2j + 2) whole and adjacent in one row,
  each sequence rebuilt from the batch equals ``chat.render`` of its conversation, segment ids per sequence,
  positions from 0, the loss mask exactly on the rendered response's tokens, ``pair_index`` the source line,
  static shapes, pair slots capped at ``dpo.pairs_per_batch``.
* Overlong pairs: ``fit_pair``'s rule on hand-made lengths; truncate keeps the prompt's tail and the response's
  head (counted), skip drops (counted).
* Exact resume, process slices (disjoint pairs, unique sequence ids), the held-out split, precomputed
  reference log-probs at each sequence's first token.
"""

import json

import numpy as np
import pytest

import dpo_data
from chat_data import chat_tokenizer
from conftest import tiny_config
from joyjax.batch import DPO_KEYS, DPO_REF_KEY
from joyjax.data import chat
from joyjax.data import dpo
from joyjax.errors import DataError

TOK = chat_tokenizer()


def _config(path, **over):
  base = {"data.path": str(path), "data.seq_len": 96, "train.batch_size": 4, "dpo.pairs_per_batch": 6,
          "data.eval_fraction": 0.0, "train.eval_every": 0}
  base.update(over)
  return tiny_config(base)


def _write(tmp_path, rows, name="pairs.jsonl"):
  return dpo_data.write_jsonl(tmp_path / name, rows)


def _sequences(batch):
  """{sequence id: (row, ids, loss mask over ids, pair_index)} rebuilt from a batch (ids = inputs + last target)."""
  out = {}
  for r in range(batch["inputs"].shape[0]):
    for sid in np.unique(batch["sequence_ids"][r]):
      if sid == 0:
        continue
      at = np.flatnonzero(batch["sequence_ids"][r] == sid)
      assert np.all(np.diff(at) == 1), "a sequence is contiguous"
      ids = np.concatenate([batch["inputs"][r, at], batch["targets"][r, at[-1:]]])
      mask = np.concatenate([[0], batch["loss_mask"][r, at]])
      np.testing.assert_array_equal(batch["positions"][r, at], np.arange(len(at)))
      assert len(np.unique(batch["segment_ids"][r, at])) == 1 and batch["segment_ids"][r, at[0]] > 0
      assert len(np.unique(batch["pair_index"][r, at])) == 1
      out[int(sid)] = (r, ids, mask, int(batch["pair_index"][r, at[0]]), at)
  return out


def _rendered(row, thinking=True):
  c, r, th = dpo.pair_conversations(row, where="test", thinking=thinking)
  return (chat.render(c, TOK, thinking=th, train_on="last"), chat.render(r, TOK, thinking=th, train_on="last"))


# ------------------------------------------------------------------------------------------ rows


def test_row_layouts_give_prompt_plus_response():
  q_user = {"role": "user", "content": "What is 1 + 2?"}
  good = {"role": "assistant", "content": "The answer is 3.", "reasoning_content": "1 + 2 = 3."}
  bad = {"role": "assistant", "content": "I do not know."}
  want_c, want_r = [q_user, good], [q_user, bad]
  rows = [{"prompt": "What is 1 + 2?", "chosen": good, "rejected": bad},
          {"messages": [q_user], "chosen": good, "rejected": "I do not know."},
          {"chosen": [q_user, good], "rejected": [q_user, bad]},                  # implicit prompt
          {"prompt": [q_user], "chosen": [q_user, good], "rejected": [q_user, bad]},  # lists repeating the prompt
          {"prompt": "What is 1 + 2?", "chosen": [good], "rejected": [bad], "thinking": False}]
  for k, row in enumerate(rows):
    c, r, th = dpo.pair_conversations(row, where="f", thinking=True)
    assert (c, r) == (want_c, want_r), k
    assert th is (k != 4)
  c, _, _ = dpo.pair_conversations({"prompt": "q", "system": "Be brief.", "chosen": "a", "rejected": "b"},
                                   where="f", thinking=True)
  assert c == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
               {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row,match", [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "  \n"}, "'rejected' is empty"),
    ({"prompt": "q", "chosen": {"role": "assistant", "content": ""}, "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": [], "rejected": "b"}, "'chosen' must end with an assistant"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "same response"),
    ({"prompt": "q", "chosen": "a"}, "missing rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt is int"),
    ({"prompt": "q", "chosen": 7, "rejected": "b"}, "'chosen' is int"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "thinking": "yes"}, "'thinking' is str"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role 'robot'"),
])
def test_malformed_rows(row, match):
  with pytest.raises(DataError, match=match) as e:
    dpo.pair_conversations(row, where="pairs.jsonl, line 4", thinking=True)
  assert str(e.value).startswith("pairs.jsonl, line 4:")


def test_identical_once_rendered_is_malformed():
  """Responses that differ only in reasoning render the same in non-thinking mode."""
  row = {"prompt": "q", "thinking": False, "chosen": {"role": "assistant", "content": "a", "reasoning_content": "x"},
         "rejected": {"role": "assistant", "content": "a", "reasoning_content": "y"}}
  render = dpo.RenderPairs(TOK, seq_len=96, overlong="truncate", thinking=True, where=lambda i: f"f, line {i + 1}",
                           skip_malformed=False)
  with pytest.raises(DataError, match=r"f, line 8: 'chosen' and 'rejected' render to the same tokens"):
    render((7, row))


def test_malformed_rows_in_a_file_name_the_line_or_are_skipped_and_counted(tmp_path):
  rows = dpo_data.preference_rows(12)
  rows[2] = {"prompt": "q", "chosen": "", "rejected": "b"}
  rows[5] = {"prompt": "q", "chosen": "same", "rejected": "same"}
  lines = [json.dumps(r) for r in rows]
  lines[8] = "{not json"
  path = dpo_data.write_jsonl(tmp_path / "bad.jsonl", lines)
  it = dpo.make_dpo_iterator(_config(path, **{"data.shuffle": False}), TOK, one_pass=True)
  with pytest.raises(DataError, match=r"bad\.jsonl, line 3: field 'chosen' is empty"):
    list(it)
  it = dpo.make_dpo_iterator(_config(path, **{"data.skip_malformed": True, "data.shuffle": False}), TOK,
                             one_pass=True)
  seen = {s[3] for b in it for s in _sequences(b).values()}
  assert seen == set(range(12)) - {2, 5, 8}
  assert it.metrics()["data/skipped_malformed"] == 3


# ------------------------------------------------------------------------------------------ layout


def test_batch_layout_masks_and_ids_equal_the_rendered_pairs(tmp_path):
  rows = dpo_data.preference_rows(40, style="mixed", thinking=(None, False, True))
  cfg = _config(_write(tmp_path, rows), **{"data.seq_len": 160})
  it = dpo.make_dpo_iterator(cfg, TOK)
  batches = [next(it) for _ in range(3)]
  assert it.metrics()["data/dpo_truncated"] == 0
  seen = 0
  for batch in batches:
    assert set(batch) == set(DPO_KEYS)
    assert all(v.shape == (4, 160) and v.dtype == np.int32 for v in batch.values())
    seqs = _sequences(batch)
    pairs = len(seqs) // 2
    assert 1 <= pairs <= 6 and set(seqs) == set(range(1, 2 * pairs + 1))  # slots used in order
    for j in range(pairs):
      (rc, ids_c, mask_c, pi, at_c), (rr, ids_r, mask_r, pi2, at_r) = seqs[2 * j + 1], seqs[2 * j + 2]
      assert rc == rr and pi == pi2 and at_r[0] == at_c[-1] + 1   # one row, adjacent, chosen first
      row = rows[pi]
      thinking = row.get("thinking", True)
      want_c, want_r = _rendered(row, thinking)
      np.testing.assert_array_equal(ids_c, want_c.ids)
      np.testing.assert_array_equal(ids_r, want_r.ids)
      np.testing.assert_array_equal(mask_c[1:], want_c.loss_mask[1:])
      np.testing.assert_array_equal(mask_r[1:], want_r.loss_mask[1:])
      # The loss tokens are exactly the response: (reasoning</think>)answer<eos>.
      resp = TOK.decode(ids_c[mask_c == 1])
      reasoning = row["chosen"]["reasoning_content"] if isinstance(row["chosen"], dict) else None
      ans = dpo_data.chosen_answer(row)
      if thinking and reasoning is None and isinstance(row["chosen"], list):
        reasoning = row["chosen"][-1]["reasoning_content"]
      head = f"{reasoning}</think>" if thinking and reasoning else ("</think>" if thinking else "")
      assert resp == f"{head}{ans}<|eos|>", (resp, row)
    assert np.all(batch["loss_mask"][batch["sequence_ids"] == 0] == 0)
    assert np.all(batch["pair_index"][batch["sequence_ids"] == 0] == -1)
    seen += pairs
  assert seen >= 10


def test_pair_slots_cap_and_full_rows(tmp_path):
  """Two pair slots per batch: exactly two pairs each; long pairs that fill rows close a batch early."""
  rows = dpo_data.preference_rows(10)
  it = dpo.make_dpo_iterator(_config(_write(tmp_path, rows), **{"dpo.pairs_per_batch": 2}), TOK)
  for _ in range(4):
    assert set(np.unique(next(it)["sequence_ids"])) == {0, 1, 2, 3, 4}
  long = [{"prompt": "What is 1 + 2? " * 2, "chosen": "The answer is 3. " * 2, "rejected": "I do not know. " * 2}
          for _ in range(6)]
  lens = [len(r.ids) for r in _rendered(long[0])]
  assert 96 // 2 < sum(lens) - 2 <= 96   # one pair per row
  it = dpo.make_dpo_iterator(_config(_write(tmp_path, long, "long.jsonl"), **{"train.batch_size": 2}), TOK)
  assert set(np.unique(next(it)["sequence_ids"])) == {0, 1, 2, 3, 4}   # 2 rows: 2 pairs of the 6 slots


# ------------------------------------------------------------------------------------------ overlong


def test_fit_pair_rule_by_hand():
  def seq(p, r):
    return np.arange(p + r, dtype=np.int32) + 100 * p, np.array([0] * p + [1] * r, np.int32)
  # Budget 40. Prompts 30, responses 6 and 9: k = max(10, 20 - 9) = 11 -> prompts keep their last 11; rest 18,
  # shorter response 6 <= 9: kept whole, the longer gets 12 >= 9: whole. 11 + 6 + 11 + 9 = 37 <= 40.
  c, cm, r, rm, cut = dpo.fit_pair(*seq(30, 6), *seq(30, 9), 40)
  assert cut and len(c) == 17 and len(r) == 20
  np.testing.assert_array_equal(c, seq(30, 6)[0][19:])        # the prompt's tail, the whole response
  # Prompts 5, responses 30 and 50: k = max(10, 20 - 50) = 10 -> whole prompts; rest 30, both > 15: cut to 15.
  c, cm, r, rm, cut = dpo.fit_pair(*seq(5, 30), *seq(5, 50), 40)
  assert (len(c), len(r)) == (20, 20) and cm.sum() == rm.sum() == 15
  np.testing.assert_array_equal(r, seq(5, 50)[0][:20])        # the response's head
  # Responses 4 and 50: the short one whole, the long one the rest: 5 + 4 + 5 + 26 = 40.
  c, cm, r, rm, _ = dpo.fit_pair(*seq(5, 4), *seq(5, 50), 40)
  assert (len(c), len(r), int(rm.sum())) == (9, 31, 26)
  # A pair that fits is returned as is.
  assert dpo.fit_pair(*seq(5, 4), *seq(5, 6), 40)[4] is False


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_overlong_pairs_truncated_or_skipped_and_counted(tmp_path, mode):
  rows = dpo_data.preference_rows(8, layouts=("prompt",))
  rows[3] = {"prompt": "Please repeat this. " * 20, "chosen": "The answer is 3. " * 30,
             "rejected": "I do not know. " * 30}
  cfg = _config(_write(tmp_path, rows), **{"dpo.overlong": mode, "data.shuffle": False, "data.seq_len": 64})
  it = dpo.make_dpo_iterator(cfg, TOK, one_pass=True)
  seqs = {}
  for b in it:
    seqs.update({(s[3], sid % 2): s for sid, s in _sequences(b).items()})
  m = it.metrics()
  if mode == "skip":
    assert 3 not in {k[0] for k in seqs} and m["data/dpo_skipped_overlong"] == 1 and m["data/dpo_truncated"] == 0
    return
  assert m["data/dpo_truncated"] == 1 and m["data/dpo_skipped_overlong"] == 0
  want_c, want_r = _rendered(rows[3])
  _, ids_c, mask_c, _, _ = seqs[(3, 1)]
  _, ids_r, mask_r, _, _ = seqs[(3, 0)]
  assert len(ids_c) + len(ids_r) <= 64 + 2
  fc, fcm, fr, frm, cut = dpo.fit_pair(np.asarray(want_c.ids), np.asarray(want_c.loss_mask), np.asarray(want_r.ids),
                                       np.asarray(want_r.loss_mask), 66)
  assert cut
  np.testing.assert_array_equal(ids_c, fc)
  np.testing.assert_array_equal(ids_r, fr)
  # The kept chosen is a tail of the prompt then a head of the response, with >= 1 token of each.
  p = want_c.loss_mask.index(1)
  k = int(np.flatnonzero(mask_c)[0])
  assert k >= 1 and mask_c.sum() >= 1
  np.testing.assert_array_equal(ids_c[:k], want_c.ids[p - k:p])
  np.testing.assert_array_equal(ids_c[k:], want_c.ids[p:p + len(ids_c) - k])


# ------------------------------------------------------------------------------------------ resume, processes


def test_exact_resume(tmp_path):
  rows = dpo_data.preference_rows(30, style="mixed")
  cfg = _config(_write(tmp_path, rows), **{"dpo.pairs_per_batch": 5})
  it = dpo.make_dpo_iterator(cfg, TOK)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  it2 = dpo.make_dpo_iterator(cfg, TOK)
  it2.set_state(json.loads(json.dumps(state)))
  for w in want:
    got = next(it2)
    for k in DPO_KEYS:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  other = dpo.make_dpo_iterator(_config(cfg.data.path, **{"dpo.pairs_per_batch": 4}), TOK)
  with pytest.raises(DataError, match="pairs"):
    other.set_state(state)


def test_process_slices_are_disjoint_with_unique_sequence_ids(tmp_path):
  rows = dpo_data.preference_rows(16)
  cfg = _config(_write(tmp_path, rows), **{"data.shuffle": False})
  seen = []
  for p in range(2):
    it = dpo.make_dpo_iterator(cfg, TOK, process_index=p, process_count=2, one_pass=True)
    batches = list(it)
    ids = set(np.concatenate([np.unique(b["sequence_ids"]) for b in batches])) - {0}
    assert ids <= set(range(6 * p + 1, 6 * p + 7))   # 3 pair slots per process, offset 6 for process 1
    assert all(b["inputs"].shape == (2, 96) for b in batches)
    seen.append({s[3] for b in batches for s in _sequences(b).values()})
  assert seen[0] & seen[1] == set() and seen[0] | seen[1] == set(range(16))


def test_held_out_pairs_never_train(tmp_path):
  rows = dpo_data.preference_rows(60)
  cfg = _config(_write(tmp_path, rows), **{"data.eval_fraction": 0.2})
  ev = dpo.make_dpo_eval_dataset(cfg, TOK)
  first, again = next(iter(ev)), next(iter(ev))
  for k in DPO_KEYS:
    np.testing.assert_array_equal(first[k], again[k])
  one = dpo.make_dpo_eval_dataset(cfg, TOK, one_pass=True)
  held = {s[3] for b in one for s in _sequences(b).values()}
  assert 4 <= len(held) <= 20
  train = {s[3] for b in dpo.make_dpo_iterator(cfg, TOK, one_pass=True) for s in _sequences(b).values()}
  assert train & held == set() and train | held == set(range(60))


def test_precomputed_reference_sits_at_each_sequence_start(tmp_path):
  rows = dpo_data.preference_rows(9)
  ref = {i: (-10.0 - i, -20.0 - i) for i in range(9)}
  cfg = _config(_write(tmp_path, rows), **{"data.shuffle": False})
  batches = list(dpo.make_dpo_iterator(cfg, TOK, reference=ref, one_pass=True))
  for b in batches:
    assert b[DPO_REF_KEY].dtype == np.float32
    for sid, (r, _, _, pi, at) in _sequences(b).items():
      want = ref[pi][0 if sid % 2 else 1]
      assert b[DPO_REF_KEY][r, at[0]] == np.float32(want) and np.all(b[DPO_REF_KEY][r, at[1:]] == 0)
  del ref[4]
  with pytest.raises(DataError, match="line 5: no precomputed reference"):
    list(dpo.make_dpo_iterator(cfg, TOK, reference=ref, one_pass=True))
