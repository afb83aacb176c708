"""RL tasks, rewards, the pass-rate curriculum and the prompt stream (joyjax/rl/envs.py, joyjax/rl/prompts.py)."""

import json
import math
import re

import numpy as np
import pytest

from chat_data import chat_tokenizer
from conftest import tiny_config
from joyjax.data import chat
from joyjax.errors import ConfigError, DataError
from joyjax.rl import envs
from joyjax.rl.prompts import Curriculum, PromptStream

EOS = "<|eos|>"  # chat_tokenizer's EOS string


@pytest.fixture(scope="module")
def tok():
  return chat_tokenizer(512)


def cfg_with(**rl):
  over = {"model.vocab_size": 640, "train.eval_every": 0}
  over.update({(k if "." in k else f"rl.{k}"): v for k, v in rl.items()})
  return tiny_config(over)


def arith(args=""):
  return envs.make_env(cfg_with(env="arithmetic", env_args=args).rl)


# ------------------------------------------------------------------------------------------ arithmetic


def test_arithmetic_prompts_are_deterministic_and_right():
  env = arith()
  ps = env.prompts()
  assert len(ps) == 100 and [p.index for p in ps] == list(range(100))
  assert ps[0].messages == [{"role": "user", "content": "What is 0 + 0?"}] and ps[0].answer == "0"
  assert ps[37].messages[0]["content"] == "What is 3 + 7?" and ps[37].answer == "10" and ps[37].domain == "+"
  assert [p.answer for p in arith().prompts()] == [p.answer for p in ps]
  for p in arith("ops=+-*,max_operand=5").prompts():
    a, op, b = re.fullmatch(r"What is (\d+) (.) (\d+)\?", p.messages[0]["content"]).groups()
    assert p.domain == op and int(p.answer) == eval(f"{a} {op} {b}")  # noqa: S307 (digits and one operator)
  assert len(arith("ops=+-*,max_operand=5").prompts()) == 3 * 36
  sub = arith("num_prompts=10,seed=1").prompts()
  assert len(sub) == 10 and [p.index for p in sub] == list(range(10))
  assert [p.messages for p in sub] == [p.messages for p in arith("num_prompts=10,seed=1").prompts()]
  assert [p.messages for p in sub] != [p.messages for p in arith("num_prompts=10,seed=2").prompts()]


def test_arithmetic_score_and_format():
  env = arith("ops=+-")
  p = next(q for q in env.prompts() if q.messages[0]["content"] == "What is 3 + 9?")
  assert env.score(p, "12") == 1.0 and env.score(p, " 12.") == 1.0 and env.score(p, "\n12\n") == 1.0
  for wrong in ("13", "12 apples", "", "twelve", "1 2", "12..", "The answer is 12."):
    assert env.score(p, wrong) == 0.0, wrong
  neg = next(q for q in env.prompts() if q.messages[0]["content"] == "What is 2 - 7?")
  assert neg.answer == "-5" and env.score(neg, "-5.") == 1.0 and env.score(neg, "5") == 0.0
  assert env.format_ok("12") and env.format_ok(" -3.") and env.format_ok("13")
  assert not env.format_ok("twelve") and not env.format_ok("") and not env.format_ok("12 apples")


def test_thinking_and_non_thinking_replies(tok):
  env = arith()
  p = env.prompts()[39]  # 3 + 9
  think = envs.make_reward(cfg_with(thinking=True).rl, env, tokenizer=tok)
  plain = envs.make_reward(cfg_with(thinking=False).rl, env, tokenizer=tok)
  assert envs.response_answer("3 + 9 = 12.</think>12" + EOS, thinking=True, tokenizer=tok) == "12"
  assert think(p, "3 + 9 = 12.</think>\n\n12" + EOS, 9, 32)[1] == {"correct": 1.0, "format": 1.0,
                                                                    "length_penalty": 0.0}
  assert think(p, "3 + 9 = 12.</think>13" + EOS, 9, 32)[1]["correct"] == 0.0
  # an unclosed think block has no answer, even when it says the right number
  assert envs.response_answer("3 + 9 = 12", thinking=True, tokenizer=tok) is None
  assert think(p, "3 + 9 = 12" + EOS, 9, 32) == (0.0, {"correct": 0.0, "format": 0.0, "length_penalty": 0.0})
  assert think(p, "3 + 9 = 12" + EOS + "</think>12", 9, 32)[1]["correct"] == 0.0  # closed only after EOS
  assert plain(p, "12" + EOS, 2, 32)[1]["correct"] == 1.0
  assert plain(p, "12" + EOS + "junk", 2, 32)[1]["correct"] == 1.0  # read up to EOS
  assert plain(p, "12", 2, 32)[1]["correct"] == 1.0  # cut at max_new_tokens without EOS
  assert plain(p, "<think>hmm</think>12" + EOS, 6, 32)[1] == {"correct": 0.0, "format": 0.0, "length_penalty": 0.0}


def test_arithmetic_demonstrations_render_and_parse_back(tok):
  env = arith()
  rows = env.demonstrations(5, seed=3)
  assert rows == env.demonstrations(5, seed=3) and len(rows) == 5
  reward = envs.make_reward(cfg_with().rl, env, tokenizer=tok)
  for row in rows:
    user, answer = row["messages"]
    p = next(q for q in env.prompts() if q.messages == [user])
    assert answer["content"] == p.answer and answer["role"] == "assistant"
    for thinking in (False, True):
      r = chat.render(row["messages"], tok, thinking=thinking)
      trained = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if m])
      expect = (answer["reasoning_content"] + "</think>" if thinking else "") + p.answer + EOS
      assert trained == expect
      assert chat.parse(r.text, tok)[-1]["content"] == p.answer
      prompt_ids = chat.render_prompt([user], tok, thinking=thinking)
      assert r.ids[:len(prompt_ids)] == prompt_ids
      response = tok.decode(r.ids[len(prompt_ids):])
      rew = envs.make_reward(cfg_with(thinking=thinking).rl, env, tokenizer=tok)
      assert rew(p, response, len(r.ids) - len(prompt_ids), 32)[1]["correct"] == 1.0
  assert reward(env.prompts()[0], "0" + EOS, 1, 32)[0] == 1.0
  # drawn only among the given indices (e.g. the training prompts)
  some = env.demonstrations(20, seed=0, indices=[4, 5])
  assert {r["messages"][0]["content"] for r in some} == {"What is 0 + 4?", "What is 0 + 5?"}


# ------------------------------------------------------------------------------------------ string


def test_string_task():
  env = envs.make_env(cfg_with(env="string", env_args="alphabet=abc,min_len=1,max_len=3").rl)
  ps = env.prompts()
  assert len(ps) == 3 * (3 + 9 + 27)  # fewer than the default 300: every distinct problem
  assert {p.domain for p in ps} == {"reverse", "upper", "repeat"}
  by_q = {p.messages[0]["content"]: p for p in ps}
  rev, up, rep = by_q["Reverse: abc"], by_q["Uppercase: abc"], by_q["Repeat twice: abc"]
  assert (rev.answer, up.answer, rep.answer) == ("cba", "ABC", "abcabc")
  assert env.score(rev, "cba") == 1.0 and env.score(rev, " cba.") == 1.0
  assert env.score(rev, "CBA") == 0.0 and env.score(rev, "abc") == 0.0 and env.score(up, "ABC\n") == 1.0
  assert env.format_ok("cba") and env.format_ok("ABC") and not env.format_ok("") and not env.format_ok("xyz")
  assert not env.format_ok("c b a")
  default = envs.make_env(cfg_with(env="string", env_args="").rl).prompts()
  assert len(default) == 300 and len({p.messages[0]["content"] for p in default}) == 300
  one = envs.make_env(cfg_with(env="string", env_args="tasks=reverse,num_prompts=7,seed=5").rl)
  assert len(one.prompts()) == 7 and {p.domain for p in one.prompts()} == {"reverse"}
  for row in one.demonstrations(3, 0):
    q, a = row["messages"][0]["content"], row["messages"][1]["content"]
    assert a == q.removeprefix("Reverse: ")[::-1]


@pytest.mark.parametrize("env,args,named", [
    ("arithmetic", "max_operand=abc", "max_operand"),
    ("arithmetic", "max_operand", "max_operand"),        # not key=value
    ("arithmetic", "colour=red", "colour"),
    ("arithmetic", "ops=/", "ops"),
    ("arithmetic", "num_prompts=101", "num_prompts"),
    ("arithmetic", "seed=1,seed=2", "seed"),
    ("string", "tasks=reverse+shout", "tasks"),
    ("string", "alphabet=aB", "alphabet"),
    ("string", "min_len=3,max_len=2", "max_len"),
    ("string", "max_operand=3", "max_operand"),
])
def test_env_args_errors_name_the_option(env, args, named):
  with pytest.raises(ConfigError, match="rl.env_args") as e:
    envs.make_env(cfg_with(env=env, env_args=args).rl)
  assert named in str(e.value)
  if args in ("colour=red", "max_operand=3"):  # an unknown option: the message lists the allowed ones
    assert "its options are" in str(e.value) and "num_prompts" in str(e.value)


def test_unknown_task_name():
  with pytest.raises(ConfigError, match=r"rl\.env.*unknown task 'sudoku'.*package\.module:factory"):
    envs.make_env(cfg_with(env="sudoku").rl)


# ------------------------------------------------------------------------------------------ user code

USER_TASK = '''
from joyjax.rl import envs

class Echo(envs.Env):
  name = "echo"
  def __init__(self, words):
    super().__init__()
    self.words = words.split("+")
  def _build_prompts(self):
    return [envs.Prompt(i, [{"role": "user", "content": "Say " + w}], w, "say")
            for i, w in enumerate(self.words)]
  def score(self, prompt, response):
    return float(response.strip() == prompt.answer)
  def format_ok(self, response):
    return response.strip().isalpha()

def factory(words="red+green"):
  return Echo(words)

def half(prompt, answer):
  return 0.5 if answer.strip() == prompt.answer else 0.0

def not_a_task():
  return 42

not_callable = 3
'''


def test_user_task_and_reward_fn(tmp_path, monkeypatch, tok):
  (tmp_path / "rl_user_task_a.py").write_text(USER_TASK)
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = cfg_with(env="rl_user_task_a:factory", env_args="words=red+blue+green")
  env = envs.make_env(cfg.rl)
  assert [p.answer for p in env.prompts()] == ["red", "blue", "green"] and env.name == "echo"
  assert envs.make_reward(cfg.rl, env)(env.prompts()[1], "blue", 1, 8)[0] == 1.0
  cfg = cfg_with(env="rl_user_task_a:factory", reward_fn="rl_user_task_a:half", format_weight=0.25)
  env = envs.make_env(cfg.rl)
  assert [p.answer for p in env.prompts()] == ["red", "green"]
  reward = envs.make_reward(cfg.rl, env, tokenizer=tok)
  assert reward(env.prompts()[0], "red" + EOS, 1, 8) == (0.75, {"correct": 0.5, "format": 1.0,
                                                                 "length_penalty": 0.0})
  assert reward(env.prompts()[0], "blue" + EOS, 1, 8)[0] == 0.25
  # the stream serves a user task like a built-in one
  stream = PromptStream(cfg_with(env="rl_user_task_a:factory", prompts_per_step=2, **{"data.eval_fraction": 0.0}),
                        tok, env)
  assert sorted(next(stream)["prompt_index"].tolist()) == [0, 1]


def test_user_code_errors(tmp_path, monkeypatch):
  (tmp_path / "rl_user_task_b.py").write_text(USER_TASK)
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ConfigError, match=r"'rl\.env'.*cannot import module 'no_such_rl_module'.*PYTHONPATH"):
    envs.make_env(cfg_with(env="no_such_rl_module:factory").rl)
  with pytest.raises(ConfigError, match=r"'rl\.env'.*has no attribute 'make'"):
    envs.make_env(cfg_with(env="rl_user_task_b:make").rl)
  with pytest.raises(ConfigError, match=r"'rl\.env'.*not a callable"):
    envs.make_env(cfg_with(env="rl_user_task_b:not_callable").rl)
  with pytest.raises(ConfigError, match=r"'rl\.env_args'.*does not take.*colour"):
    envs.make_env(cfg_with(env="rl_user_task_b:factory", env_args="colour=red").rl)
  with pytest.raises(ConfigError, match=r"'rl\.env'.*without prompts, score, format_ok"):
    envs.make_env(cfg_with(env="rl_user_task_b:not_a_task").rl)
  env = arith()
  with pytest.raises(ConfigError, match=r"'rl\.reward_fn'.*cannot import module 'no_such_rl_module'"):
    envs.make_reward(cfg_with(reward_fn="no_such_rl_module:f").rl, env)
  with pytest.raises(ConfigError, match=r"'rl\.reward_fn'.*has no attribute 'nope'"):
    envs.make_reward(cfg_with(reward_fn="rl_user_task_b:nope").rl, env)


# ------------------------------------------------------------------------------------------ rewards


def test_format_weight_and_length_shaping(tok):
  env = arith()
  p = env.prompts()[39]  # 3 + 9 = 12
  reward = envs.make_reward(cfg_with(format_weight=0.5, length_weight=0.2).rl, env, tokenizer=tok)
  r, info = reward(p, "12" + EOS, 8, 32)  # correct: 1 + 0.5 * 1 - 0.2 * 8 / 32
  assert r == pytest.approx(1.45) and info == {"correct": 1.0, "format": 1.0, "length_penalty": pytest.approx(0.05)}
  assert reward(p, "12" + EOS, 32, 32)[0] == pytest.approx(1.3)  # longer, the same accuracy: less reward
  assert reward(p, "13" + EOS, 8, 32) == (0.5, {"correct": 0.0, "format": 1.0, "length_penalty": 0.0})  # no
  assert reward(p, "thirteen" + EOS, 8, 32) == (0.0, {"correct": 0.0, "format": 0.0, "length_penalty": 0.0})
  no_shaping = envs.make_reward(cfg_with().rl, env, tokenizer=tok)
  assert no_shaping(p, "12" + EOS, 32, 32) == (1.0, {"correct": 1.0, "format": 1.0, "length_penalty": 0.0})


# ------------------------------------------------------------------------------------------ curriculum


def test_curriculum_weights_by_hand():
  c = Curriculum(3, start=0.8, end=0.2, width=0.2, total_steps=10)
  np.testing.assert_allclose(c.weights(0), [math.exp(-0.09 / 0.08)] * 3)  # all unseen (0.5); mu_0 = 0.8
  c.record([0, 0, 1], [1.0, 0.6, 0.2])  # pass rates 0.8, 0.2, unseen 0.5
  np.testing.assert_allclose(c.pass_rates(), [0.8, 0.2, 0.5])
  np.testing.assert_allclose(c.weights(0), [1.0, math.exp(-4.5), math.exp(-1.125)])
  np.testing.assert_allclose(c.weights(5), [math.exp(-1.125), math.exp(-1.125), 1.0])   # mu = 0.5
  np.testing.assert_allclose(c.weights(10), [math.exp(-4.5), 1.0, math.exp(-1.125)])
  np.testing.assert_allclose(c.weights(1000), c.weights(10))  # stays at the end
  state = json.loads(json.dumps(c.get_state()))
  assert state == {"sums": [1.6, 0.2, 0.0], "counts": [2, 1, 0]}
  d = Curriculum(3, start=0.8, end=0.2, width=0.2, total_steps=10)
  d.set_state(state)
  np.testing.assert_allclose(d.weights(3), c.weights(3))
  with pytest.raises(DataError, match="3 prompts, the task has 4"):
    Curriculum(4, start=0.8, end=0.2, width=0.2, total_steps=10).set_state(state)
  with pytest.raises(ValueError):
    c.record([3], [1.0])


def test_curriculum_draws_prompts_near_the_target_more_often(tok):
  cfg = cfg_with(curriculum=True, prompts_per_step=2, **{"data.eval_fraction": 0.0, "train.steps": 10**6})
  stream = PromptStream(cfg, tok, arith())
  easy = np.arange(0, 100, 2)  # pass rate 0.8 = mu_0; the odd ones 0.0 (weight exp(-8))
  stream.record(np.arange(100), np.where(np.arange(100) % 2 == 0, 0.8, 0.0))
  drawn = np.concatenate([next(stream)["prompt_index"] for _ in range(300)])
  assert np.isin(drawn, easy).mean() > 0.97
  assert len(set(drawn.tolist())) > 40  # spread over the easy ones
  off = PromptStream(cfg_with(prompts_per_step=2, **{"data.eval_fraction": 0.0}), tok, arith())
  off.record(np.arange(100), np.where(np.arange(100) % 2 == 0, 0.8, 0.0))  # ignored when off
  drawn = np.concatenate([next(off)["prompt_index"] for _ in range(300)])
  assert 0.4 < np.isin(drawn, easy).mean() < 0.6


# ------------------------------------------------------------------------------------------ stream


def test_stream_batches_are_left_padded_renders(tok):
  cfg = cfg_with(prompts_per_step=4, max_prompt_len=20)
  env = arith()
  stream = PromptStream(cfg, tok, env)
  assert iter(stream) is stream
  b = next(stream)
  assert b["prompt_tokens"].shape == (4, 20) and b["prompt_tokens"].dtype == np.int32
  assert b["prompt_lens"].dtype == np.int32 and b["prompt_index"].dtype == np.int32
  assert len(set(b["prompt_index"].tolist())) == 4
  for row, n, i in zip(b["prompt_tokens"], b["prompt_lens"], b["prompt_index"]):
    ids = chat.render_prompt(env.prompts()[i].messages, tok, thinking=False)
    assert n == len(ids) and row[20 - n:].tolist() == ids and not row[:20 - n].any()
    assert stream.prompt(i) == env.prompts()[i]
  think = next(PromptStream(cfg_with(prompts_per_step=4, max_prompt_len=20, thinking=True), tok, env))
  row, n = think["prompt_tokens"][0], think["prompt_lens"][0]
  assert tok.decode(row[20 - n:]).endswith("<｜Assistant｜><think>")


def test_held_out_prompts_are_never_trained_on(tok):
  cfg = cfg_with(prompts_per_step=8, **{"data.eval_fraction": 0.2})
  stream = PromptStream(cfg, tok, arith())
  held = set(stream.held_indices.tolist())
  assert 10 <= len(held) <= 30 and len(held) + len(stream.train_indices) == 100
  seen = set()
  for _ in range(200):
    seen |= set(next(stream)["prompt_index"].tolist())
  assert not seen & held and seen == set(stream.train_indices.tolist())
  # the same split in another run with another seed
  other = PromptStream(cfg_with(prompts_per_step=8, **{"data.eval_fraction": 0.2, "data.seed": 7}), tok, arith())
  assert set(other.held_indices.tolist()) == held
  batches = stream.held_out()
  assert len(batches) == -(-len(held) // 8)
  assert all(b["prompt_tokens"].shape == (8, 64) and b["valid"].shape == (8,) for b in batches)
  valid = np.concatenate([b["prompt_index"][b["valid"] == 1] for b in batches])
  assert valid.tolist() == sorted(held) and int(sum(b["valid"].sum() for b in batches)) == len(held)
  again = stream.held_out()
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
  assert PromptStream(cfg_with(**{"data.eval_fraction": 0.0}), tok, arith()).held_out() == []


@pytest.mark.parametrize("curriculum", [False, True])
def test_state_round_trip_is_exact(tok, curriculum):
  cfg = cfg_with(prompts_per_step=4, curriculum=curriculum, **{"train.steps": 20})
  a = PromptStream(cfg, tok, arith())
  rng = np.random.default_rng(0)
  for _ in range(3):
    b = next(a)
    a.record(b["prompt_index"], rng.uniform(size=4))
  state = json.loads(json.dumps(a.get_state()))
  expect = []
  for _ in range(5):
    b = next(a)
    expect.append(b)
    a.record(b["prompt_index"], rng.uniform(size=4) if curriculum else np.zeros(4))
  restored = PromptStream(cfg, tok, arith())
  restored.set_state(state)
  rng = np.random.default_rng(0)
  [rng.uniform(size=4) for _ in range(3)]
  for e in expect:
    b = next(restored)
    assert all(np.array_equal(b[k], e[k]) for k in e)
    restored.record(b["prompt_index"], rng.uniform(size=4) if curriculum else np.zeros(4))
  with pytest.raises(DataError, match="prompts_per_step: saved 4, now 8"):
    PromptStream(cfg_with(prompts_per_step=8), tok, arith()).set_state(state)


def test_process_slices_concatenate_to_the_global_batch(tok):
  cfg = cfg_with(prompts_per_step=6, curriculum=True, **{"data.eval_fraction": 0.1})
  one = PromptStream(cfg, tok, arith())
  two = [PromptStream(cfg, tok, arith(), process_index=i, process_count=2) for i in range(2)]
  for _ in range(4):
    full, parts = next(one), [next(s) for s in two]
    assert parts[0]["prompt_tokens"].shape == (3, 64)
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  for full, p0, p1 in zip(one.held_out(), *(s.held_out() for s in two)):
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), full[k])
  with pytest.raises(ConfigError, match="rl.prompts_per_step"):
    PromptStream(cfg, tok, arith(), process_index=0, process_count=4)


def test_too_long_prompt_is_a_data_error(tok):
  with pytest.raises(DataError, match=r"prompt 0 is \d+ tokens.*rl\.max_prompt_len=8; raise rl\.max_prompt_len"):
    PromptStream(cfg_with(max_prompt_len=8), tok, arith())
  with pytest.raises(ConfigError, match="only 2 training prompts"):
    PromptStream(cfg_with(prompts_per_step=4, **{"data.eval_fraction": 0.0}), tok, arith("num_prompts=2"))
