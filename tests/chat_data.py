"""Deterministic synthetic conversations for tests (chat format, SFT pipeline, the SFT / DPO end-to-end runs).

Every example is a pure function of (index, seed). Tasks, each answered in a fixed format a test can check:

* ``add``:    "What is 12 + 7?"                -> thinking "12 + 7 = 19."        -> "The answer is 19."
* ``repeat``: "Repeat the word apple 3 times." -> thinking "apple, 3 times."     -> "apple apple apple"
* ``tool`` (in ``conversation(..., tool=True)``): the assistant calls ``calculator`` with
  ``{"a": 6, "b": 7, "op": "*"}``, the tool answers "42", the assistant says "The answer is 42."

``answer(question)`` gives the expected answer of any generated question (for greedy-sample checks).
Files: ``write_jsonl(path, rows)`` with rows from ``messages_rows`` (the OpenAI ``messages`` layout) or
``prompt_response_rows`` (``{"prompt", "response", "reasoning"}``). ``chat_tokenizer()`` is a small byte-level
BPE trained on generated text with the chat markers added as special tokens (one id each, so span edges fall
on token edges); ``write_tokenizer_dir`` puts a tokenizer and a chat template where ``load_template`` finds it.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re

from joyjax.data import chat
from joyjax.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "café", "数据")
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful calculator.\nShow your work.")


def qa(rng: random.Random) -> tuple[str, str, str]:
  """(question, reasoning, answer) of one random task."""
  if rng.random() < 0.5:
    a, b = rng.randint(0, 60), rng.randint(0, 40)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"The answer is {a + b}."
  w, n = rng.choice(WORDS), rng.randint(1, 4)
  return f"Repeat the word {w} {n} times.", f"{w}, {n} times.", " ".join([w] * n)


def answer(question: str) -> str:
  """The expected answer to a question ``qa`` generates."""
  m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
  if m:
    return f"The answer is {int(m.group(1)) + int(m.group(2))}."
  m = re.fullmatch(r"Repeat the word (\S+) (\d+) times\.", question)
  if m:
    return " ".join([m.group(1)] * int(m.group(2)))
  raise ValueError(f"not a generated question: {question!r}")


def conversation(i: int, *, seed: int = 0, system: bool = False, turns: int = 1, tool: bool = False,
                 reasoning: bool = True) -> list[dict]:
  """Conversation ``i``: an optional system prompt, ``turns`` question/answer pairs (with reasoning), and
  optionally a tool-calling exchange at the end."""
  rng = random.Random(f"{seed}/{i}")
  msgs: list[dict] = []
  if system:
    msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
  for _ in range(turns):
    q, r, a = qa(rng)
    msgs.append({"role": "user", "content": q})
    msgs.append({"role": "assistant", "content": a, **({"reasoning_content": r} if reasoning else {})})
  if tool:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    args = json.dumps({"a": a, "b": b, "op": "*"})
    msgs.append({"role": "user", "content": f"Use the calculator: {a} * {b}"})
    msgs.append({"role": "assistant", "content": "",
                 **({"reasoning_content": "I should call the calculator."} if reasoning else {}),
                 "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": args}}]})
    msgs.append({"role": "tool", "content": str(a * b)})
    msgs.append({"role": "assistant", "content": f"The answer is {a * b}."})
  return msgs


def conversations(n: int, *, seed: int = 0, mixed: bool = True) -> list[list[dict]]:
  """``n`` conversations; ``mixed`` varies system prompts (every 3rd), 1-3 turns and tool use (every 5th)."""
  if not mixed:
    return [conversation(i, seed=seed) for i in range(n)]
  return [conversation(i, seed=seed, system=i % 3 == 0, turns=1 + i % 3 if i % 2 else 1, tool=i % 5 == 4)
          for i in range(n)]


def messages_rows(convs: list[list[dict]], *, thinking: list | None = None) -> list[dict]:
  """Rows in the OpenAI ``messages`` layout (with a per-row ``"thinking"`` field where ``thinking[i]`` is not
  None)."""
  rows = []
  for i, c in enumerate(convs):
    row = {"messages": c}
    if thinking is not None and thinking[i] is not None:
      row["thinking"] = thinking[i]
    rows.append(row)
  return rows


def prompt_response_rows(n: int, *, seed: int = 0) -> list[dict]:
  """Rows ``{"prompt", "response", "reasoning"}``, one question each."""
  rows = []
  for i in range(n):
    q, r, a = qa(random.Random(f"pr{seed}/{i}"))
    rows.append({"prompt": q, "response": a, "reasoning": r})
  return rows


def write_jsonl(path, rows: list) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)


def _texts(n: int = 400):
  rng = random.Random(1234)
  for _ in range(n):
    q, r, a = qa(rng)
    yield f"{rng.choice(SYSTEMS)} {q} {r} {a} Use the calculator: {rng.randint(2, 9)} * {rng.randint(2, 9)} " \
          '{"a": 6, "b": 7, "op": "*"} calculator function ```json'


@functools.lru_cache(maxsize=None)
def chat_tokenizer(vocab_size: int = 512) -> Tokenizer:
  """A small BPE on generated text, the chat markers added as special tokens (ids after the BPE's)."""
  return chat.add_chat_tokens(train_tokenizer(_texts(), vocab_size))


def write_tokenizer_dir(directory, tokenizer: Tokenizer, template: str | None = None, *,
                        jinja_file: bool = False) -> str:
  """``directory`` with ``tokenizer.json`` and ``tokenizer_config.json`` (BOS / EOS names, and ``template`` as
  its ``chat_template``, or as ``chat_template.jinja`` when ``jinja_file``)."""
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  cfg = {"bos_token": tokenizer.hf.id_to_token(tokenizer.bos_id),
         "eos_token": {"content": tokenizer.hf.id_to_token(tokenizer.eos_id)}}
  if template is not None and not jinja_file:
    cfg["chat_template"] = template
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, ensure_ascii=False)
  if template is not None and jinja_file:
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(template)
  return str(directory)
