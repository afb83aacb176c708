"""RL tasks and rewards: a small interface, prompts in and rewards out.

**Tasks** (``Env``): ``prompts()`` (a deterministic list of ``Prompt``: chat messages, the expected answer, a
domain label), ``score(prompt, response)`` (the verifiable check: 1.0 right, 0.0 wrong, or partial credit),
``format_ok(response)`` (the answer is in the expected form, right or wrong) and ``demonstrations(n, seed)``
(SFT rows answering prompts correctly in the expected form: they teach a tiny model the task's format
before RL). ``score`` and ``format_ok`` see the ANSWER text: the model's reply with its reasoning removed
(``response_answer``); the reward function does that parsing.

Built-in tasks (``rl.env``), their options in ``rl.env_args`` ("key=value,key=value"):

* ``arithmetic``: "What is 3 + 4?" -> "7". Options ``max_operand`` (operands 0..max_operand, default 9),
  ``ops`` (a subset of "+-*", default "+"), ``num_prompts`` (default: every distinct problem, ``len(ops) x
  (max_operand + 1)^2``, e.g. 100 for the defaults; fewer: a subset chosen by ``seed``), ``seed`` (default 0).
  The check: the answer, stripped of surrounding white space and one trailing period, is the integer
  (" 7." is right; "7 apples" is not). Domain: the operator.
* ``string``: "Reverse: abc" -> "cba", "Uppercase: abc" -> "ABC", "Repeat twice: abc" -> "abcabc". Options
  ``tasks`` (sub-tasks joined by "+", default "reverse+upper+repeat"), ``alphabet`` (distinct lowercase
  letters, default "abcde"), ``min_len`` / ``max_len`` (string lengths, default 2 / 4), ``num_prompts``
  (default 300, or every distinct problem when there are fewer), ``seed`` (default 0). The check: exact
  (case-sensitive) after stripping white space and one trailing period. Domain: the sub-task.

Either task's problems are numbered (sub-task / operator, then operands or length, then the string); a subset
is ``num_prompts`` distinct numbers drawn with ``seed``, in ascending order. An unknown option or a malformed
value is a ConfigError naming ``rl.env_args``, the option and the allowed ones.

A user task: ``rl.env = "package.module:factory"``; ``factory(**env_args)`` is called with the options as
keyword STRING values and returns an object with ``prompts()``, ``score(prompt, response)`` and
``format_ok(response)`` (subclass ``Env`` to get ``demonstrations`` too). Importing it runs the user's code:
only ever a path the user named on the command line or in the config (as the config file itself is).

**Rewards** (``make_reward`` -> ``RewardFn``): ``reward_fn(prompt, response_text, num_tokens, max_tokens) ->
(reward, {"correct": score, "format": 0 | 1, "length_penalty": p})`` with::

    reward = score + rl.format_weight * format_ok - p,
    p = rl.length_weight * num_tokens / max_tokens   if rl.length_weight > 0 and score >= 1, else 0

``score`` is the task's check, or ``rl.reward_fn`` ("package.module:function", called ``fn(prompt, answer)
-> float``) in its place. The length term (the JoyAI report's length-aware shaping: the same accuracy with
fewer tokens) applies to correct answers only, so a wrong answer is never paid for being short; with 0 / 1
scores and ``rl.length_weight`` < 1 a correct answer in the expected form still earns more than any wrong
one. ``num_tokens`` is the reply's generated tokens, ``max_tokens`` the most it could have (rl.max_new_tokens).

**Thinking mode** (``rl.thinking``): the prompt ends with ``<｜Assistant｜><think>``, so the reply is
``{reasoning}</think>{answer}{eos}``; the answer is what the chat format's ``parse`` reads as the content. A
reply without ``</think>`` never finished thinking: it has NO answer (score 0, format 0; ``rl.reward_fn`` is
not called). In non-thinking mode the prompt ends with the empty think block and the whole reply (up to EOS,
a tool-call block or a new turn marker) is the answer. ``response_text`` must be decoded with special tokens
kept (``skip_special_tokens=False``): ``</think>`` and EOS are special tokens of a chat tokenizer.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from joyjax.errors import ConfigError, DataError
from joyjax.data import chat
from joyjax.data.tokenizer import Tokenizer

ARITHMETIC_OPS = "+-*"
STRING_TASKS = {"reverse": "Reverse: {s}", "upper": "Uppercase: {s}", "repeat": "Repeat twice: {s}"}
_MAX_PROBLEMS = 2**62  # problem numbers are int64


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt of a task: ``index`` (its position in ``prompts()``), ``messages`` (chat messages: a user turn,
  optionally a system message first), ``answer`` (the expected answer in the expected form), ``domain`` (a
  label of its kind, e.g. the operator: FiberPO-Domain's domains)."""
  index: int
  messages: list[dict]
  answer: str
  domain: str

  @property
  def question(self) -> str:
    """The text of the last user message."""
    return [m["content"] for m in self.messages if m["role"] == "user"][-1]


class Env:
  """A task: subclass and implement ``_build_prompts``, ``score`` and ``format_ok`` (``reasoning`` optional).

  ``prompts()`` is computed once; ``demonstrations`` answers prompts with ``prompt.answer`` (and the
  ``reasoning`` as the reasoning content, shown in thinking mode only).
  """

  name = "env"

  def __init__(self):
    self._prompts: list[Prompt] | None = None

  def _build_prompts(self) -> list[Prompt]:
    raise NotImplementedError

  def prompts(self) -> list[Prompt]:
    if self._prompts is None:
      self._prompts = self._build_prompts()
    return self._prompts

  def score(self, prompt: Prompt, response: str) -> float:
    """The verifiable check of the answer text ``response`` (reasoning already removed)."""
    raise NotImplementedError

  def format_ok(self, response: str) -> bool:
    """Whether the answer text is in the expected form (right or wrong)."""
    raise NotImplementedError

  def reasoning(self, prompt: Prompt) -> str:
    """A short worked reasoning for ``prompt`` (the demonstrations' thinking); "" = none."""
    return ""

  def demonstrations(self, n: int, seed: int = 0, *, indices: Sequence[int] | None = None) -> list[dict]:
    """``n`` SFT rows ``{"messages": [..., {"role": "assistant", "content": answer, "reasoning_content":
    ...}]}`` for prompts drawn with ``seed`` (without replacement while they last) among ``indices`` (default
    all; pass the training prompts to keep held-out answers out of SFT data)."""
    prompts = self.prompts()
    pool = np.arange(len(prompts)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(pool) == 0:
      raise ValueError("demonstrations: no prompts to draw from")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])[:n] if n > 0 else pool[:0]
    rows = []
    for i in order:
      p = prompts[int(i)]
      answer = {"role": "assistant", "content": p.answer}
      r = self.reasoning(p)
      if r:
        answer["reasoning_content"] = r
      rows.append({"messages": [dict(m) for m in p.messages] + [answer]})
    return rows


# ------------------------------------------------------------------------------------------ options


def parse_env_args(text: str) -> dict[str, str]:
  """``"key=value,key=value"`` -> ``{key: value}`` (strings; blanks around keys and values dropped)."""
  out: dict[str, str] = {}
  for part in text.split(","):
    if not part.strip():
      continue
    key, sep, value = part.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
      raise ConfigError(f"config key 'rl.env_args': {part.strip()!r} is not key=value; write the task's options "
                        f"as 'key=value,key=value', got {text!r}")
    if key in out:
      raise ConfigError(f"config key 'rl.env_args': option {key!r} is given twice in {text!r}")
    out[key] = value
  return out


def _bad_option(env: str, key: str, value: str, why: str) -> ConfigError:
  return ConfigError(f"config key 'rl.env_args': option {key}={value!r} of task {env!r}: {why}")


class _Options:
  """Typed reads of a task's string options; unknown keys -> ConfigError naming the allowed ones."""

  def __init__(self, env: str, args: dict[str, str], allowed: Sequence[str]):
    unknown = sorted(set(args) - set(allowed))
    if unknown:
      raise ConfigError(f"config key 'rl.env_args': task {env!r} has no option {unknown[0]!r}; its options are "
                        f"{', '.join(allowed)}")
    self.env, self.args = env, args

  def integer(self, key: str, default: int | None, minimum: int) -> int | None:
    if key not in self.args:
      return default
    v = self.args[key]
    try:
      x = int(v)
    except ValueError:
      raise _bad_option(self.env, key, v, "must be an integer") from None
    if x < minimum:
      raise _bad_option(self.env, key, v, f"must be >= {minimum}")
    return x

  def text(self, key: str, default: str) -> str:
    return self.args.get(key, default)


def _choose(total: int, num: int | None, seed: int, env: str) -> np.ndarray:
  """Problem numbers: all of ``range(total)`` (num None), else ``num`` distinct ones drawn with ``seed``,
  ascending."""
  if total > _MAX_PROBLEMS:
    raise ConfigError(f"config key 'rl.env_args': task {env!r} has {total} distinct problems, more than this "
                      f"task numbers ({_MAX_PROBLEMS}); make the problems smaller")
  if num is None:
    return np.arange(total, dtype=np.int64)
  if num > total:
    raise _bad_option(env, "num_prompts", str(num), f"the options give only {total} distinct problems; "
                                                    f"use at most {total}")
  if num == total:
    return np.arange(total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False)).astype(np.int64)


def _strip_answer(text: str) -> str:
  text = text.strip()
  return text[:-1].rstrip() if text.endswith(".") else text


# ------------------------------------------------------------------------------------------ built-in tasks

_INTEGER = re.compile(r"[+-]?\d+")


class ArithmeticEnv(Env):
  """``a op b`` with operands 0..max_operand, op in ``ops``; the answer is the integer (module docstring)."""

  name = "arithmetic"
  OPTIONS = ("max_operand", "ops", "num_prompts", "seed")

  def __init__(self, *, max_operand: int = 9, ops: str = "+", num_prompts: int | None = None, seed: int = 0):
    super().__init__()
    if not ops or any(o not in ARITHMETIC_OPS for o in ops) or len(set(ops)) != len(ops):
      raise _bad_option(self.name, "ops", ops, f"must be distinct operators out of {ARITHMETIC_OPS!r}")
    if max_operand < 0:
      raise _bad_option(self.name, "max_operand", str(max_operand), "must be >= 0")
    self.max_operand, self.ops, self.seed = max_operand, ops, seed
    self._numbers = _choose(len(ops) * (max_operand + 1) ** 2, num_prompts, seed, self.name)

  @classmethod
  def from_args(cls, args: dict[str, str]) -> "ArithmeticEnv":
    o = _Options(cls.name, args, cls.OPTIONS)
    return cls(max_operand=o.integer("max_operand", 9, 0), ops=o.text("ops", "+"),
               num_prompts=o.integer("num_prompts", None, 1), seed=o.integer("seed", 0, 0))

  def _build_prompts(self) -> list[Prompt]:
    n = self.max_operand + 1
    out = []
    for i, k in enumerate(self._numbers.tolist()):
      op, rest = self.ops[k // (n * n)], k % (n * n)
      a, b = divmod(rest, n)
      value = a + b if op == "+" else a - b if op == "-" else a * b
      out.append(Prompt(index=i, messages=[{"role": "user", "content": f"What is {a} {op} {b}?"}],
                        answer=str(value), domain=op))
    return out

  def score(self, prompt: Prompt, response: str) -> float:
    text = _strip_answer(response)
    return 1.0 if _INTEGER.fullmatch(text) and int(text) == int(prompt.answer) else 0.0

  def format_ok(self, response: str) -> bool:
    return bool(_INTEGER.fullmatch(_strip_answer(response)))

  def reasoning(self, prompt: Prompt) -> str:
    question = prompt.question.removeprefix("What is ").removesuffix("?")
    return f"{question} = {prompt.answer}."


class StringEnv(Env):
  """Reverse / uppercase / repeat a short string over a small alphabet (module docstring)."""

  name = "string"
  OPTIONS = ("tasks", "alphabet", "min_len", "max_len", "num_prompts", "seed")
  DEFAULT_NUM_PROMPTS = 300

  def __init__(self, *, tasks: str = "reverse+upper+repeat", alphabet: str = "abcde", min_len: int = 2,
               max_len: int = 4, num_prompts: int | None = None, seed: int = 0):
    super().__init__()
    names = [t.strip() for t in tasks.split("+")]
    if not tasks or any(t not in STRING_TASKS for t in names) or len(set(names)) != len(names):
      raise _bad_option(self.name, "tasks", tasks, f"must be distinct sub-tasks joined by '+', out of "
                                                   f"{', '.join(STRING_TASKS)}")
    if (not alphabet or len(set(alphabet)) != len(alphabet)
        or any(not ("a" <= ch <= "z") for ch in alphabet)):
      raise _bad_option(self.name, "alphabet", alphabet, "must be distinct lowercase letters a-z")
    if not 1 <= min_len <= max_len:
      raise _bad_option(self.name, "max_len", str(max_len), f"must be >= min_len ({min_len}) >= 1")
    self.tasks, self.alphabet, self.min_len, self.max_len, self.seed = names, alphabet, min_len, max_len, seed
    self._per_len = [len(alphabet) ** n for n in range(min_len, max_len + 1)]
    per_task = sum(self._per_len)
    total = len(names) * per_task
    if num_prompts is None:  # the default: DEFAULT_NUM_PROMPTS, or all there are when fewer
      num_prompts = min(self.DEFAULT_NUM_PROMPTS, total)
    self._numbers = _choose(total, num_prompts, seed, self.name)

  @classmethod
  def from_args(cls, args: dict[str, str]) -> "StringEnv":
    o = _Options(cls.name, args, cls.OPTIONS)
    return cls(tasks=o.text("tasks", "reverse+upper+repeat"), alphabet=o.text("alphabet", "abcde"),
               min_len=o.integer("min_len", 2, 1), max_len=o.integer("max_len", 4, 1),
               num_prompts=o.integer("num_prompts", None, 1), seed=o.integer("seed", 0, 0))

  def _problem(self, k: int) -> tuple[str, str]:
    per_task = sum(self._per_len)
    task, k = self.tasks[k // per_task], k % per_task
    length = self.min_len
    for count in self._per_len:
      if k < count:
        break
      k -= count
      length += 1
    chars = []
    for _ in range(length):
      k, d = divmod(k, len(self.alphabet))
      chars.append(self.alphabet[d])
    return task, "".join(reversed(chars))

  @staticmethod
  def solve(task: str, s: str) -> str:
    return s[::-1] if task == "reverse" else s.upper() if task == "upper" else s + s

  def _build_prompts(self) -> list[Prompt]:
    out = []
    for i, k in enumerate(self._numbers.tolist()):
      task, s = self._problem(k)
      out.append(Prompt(index=i, messages=[{"role": "user", "content": STRING_TASKS[task].format(s=s)}],
                        answer=self.solve(task, s), domain=task))
    return out

  def score(self, prompt: Prompt, response: str) -> float:
    return 1.0 if _strip_answer(response) == prompt.answer else 0.0

  def format_ok(self, response: str) -> bool:
    text = _strip_answer(response)
    letters = set(self.alphabet) | set(self.alphabet.upper())
    return bool(text) and len(text) <= 2 * self.max_len and set(text) <= letters

  def reasoning(self, prompt: Prompt) -> str:
    return f"{prompt.domain} gives {prompt.answer}."


BUILTIN_ENVS = {ArithmeticEnv.name: ArithmeticEnv, StringEnv.name: StringEnv}


# ------------------------------------------------------------------------------------------ user code


def load_object(path: str, key: str, what: str) -> Any:
  """The object ``"package.module:name"`` names (importing the module: user code the user named); ConfigError
  naming config key ``key`` when the module or the attribute is missing."""
  module_name, sep, attr = path.partition(":")
  module_name, attr = module_name.strip(), attr.strip()
  if not sep or not module_name or not attr:
    raise ConfigError(f"config key {key!r}: {path!r} is not 'package.module:{what}'")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
      raise  # the user's module exists but imports something missing: its own error says what
    raise ConfigError(f"config key {key!r}: cannot import module {module_name!r} (from {path!r}); put its "
                      f"directory on PYTHONPATH or fix the path 'package.module:{what}'") from None
  try:
    obj = getattr(module, attr)
  except AttributeError:
    raise ConfigError(f"config key {key!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                      f"no attribute {attr!r}; fix the name after ':' in {path!r}") from None
  if not callable(obj):
    raise ConfigError(f"config key {key!r}: {path!r} is a {type(obj).__name__}, not a callable {what}")
  return obj


def make_env(rl_cfg) -> Env:
  """The task ``rl.env`` with the options ``rl.env_args`` (module docstring)."""
  name = rl_cfg.env.strip()
  args = parse_env_args(rl_cfg.env_args)
  if name in BUILTIN_ENVS:
    return BUILTIN_ENVS[name].from_args(args)
  if ":" not in name:
    raise ConfigError(f"config key 'rl.env': unknown task {name!r}; use {' or '.join(BUILTIN_ENVS)}, or "
                      f"'package.module:factory' for a task of your own")
  factory = load_object(name, "rl.env", "factory")
  try:
    inspect.signature(factory).bind(**args)
  except TypeError as e:
    raise ConfigError(f"config key 'rl.env_args': {name} does not take the options {sorted(args)} ({e})") from None
  except ValueError:  # no signature to check (a builtin): the call itself will say
    pass
  env = factory(**args)
  missing = [m for m in ("prompts", "score", "format_ok") if not callable(getattr(env, m, None))]
  if missing:
    raise ConfigError(f"config key 'rl.env': {name} returned a {type(env).__name__} without "
                      f"{', '.join(missing)}; a task needs prompts(), score(prompt, response), format_ok(response)")
  return env


# ------------------------------------------------------------------------------------------ rewards


def response_answer(response: str, *, thinking: bool, tokenizer: Tokenizer | None = None) -> str | None:
  """The answer text of a generated reply (module docstring): in thinking mode the content after
  ``</think>``, None when the reply never closes its think block; the reply's content otherwise. Read with
  ``chat.parse`` (stops at the tokenizer's EOS string, a tool-call block or a turn marker)."""
  opening = chat.THINK if thinking else chat.THINK + chat.END_THINK
  reply = chat.parse(chat.ASSISTANT + opening + response, tokenizer)[0]
  if thinking:  # the turn as parse reads it: up to EOS or the next turn marker
    _, eos = chat.bos_eos(tokenizer)
    if chat.END_THINK not in chat._TURN.split(response.split(eos, 1)[0], 1)[0]:
      return None
  return reply["content"]


class RewardFn:
  """``(prompt, response_text, num_tokens, max_tokens) -> (reward, info)`` (module docstring)."""

  def __init__(self, check: Callable[[Prompt, str], float], format_ok: Callable[[str], bool], *,
               format_weight: float = 0.0, length_weight: float = 0.0, thinking: bool = False,
               tokenizer: Tokenizer | None = None, check_name: str = "the task's score"):
    self.check, self.format_ok = check, format_ok
    self.format_weight, self.length_weight = float(format_weight), float(length_weight)
    self.thinking, self.tokenizer, self.check_name = thinking, tokenizer, check_name

  def __call__(self, prompt: Prompt, response_text: str, num_tokens: int,
               max_tokens: int) -> tuple[float, dict[str, float]]:
    answer = response_answer(response_text, thinking=self.thinking, tokenizer=self.tokenizer)
    if answer is None:
      score, fmt = 0.0, 0.0
    else:
      score = float(self.check(prompt, answer))
      if not math.isfinite(score):
        raise DataError(f"{self.check_name} returned {score} for prompt {prompt.index}; a reward must be finite")
      fmt = 1.0 if self.format_ok(answer) else 0.0
    penalty = 0.0
    if self.length_weight > 0 and score >= 1.0:
      penalty = self.length_weight * float(num_tokens) / float(max(max_tokens, 1))
    reward = score + self.format_weight * fmt - penalty
    return reward, {"correct": score, "format": fmt, "length_penalty": penalty}


def make_reward(rl_cfg, env, *, tokenizer: Tokenizer | None = None) -> RewardFn:
  """The reward of ``rl`` for ``env``: its check (or ``rl.reward_fn``), format and length terms (module
  docstring). ``tokenizer`` names the EOS string the replies end with (default DeepSeek's)."""
  check, check_name = env.score, f"task {getattr(env, 'name', rl_cfg.env)!r}'s score"
  if rl_cfg.reward_fn:
    check, check_name = load_object(rl_cfg.reward_fn, "rl.reward_fn", "function"), rl_cfg.reward_fn
  return RewardFn(check, env.format_ok, format_weight=rl_cfg.format_weight, length_weight=rl_cfg.length_weight,
                  thinking=rl_cfg.thinking, tokenizer=tokenizer, check_name=check_name)
