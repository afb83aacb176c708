"""Deterministic synthetic preference pairs for tests (DPO data pipeline, DPO step, the DPO end-to-end run).

Every pair is a pure function of (index, seed). The questions are ``chat_data.qa``'s (the SFT tasks: "What is
12 + 7?", "Repeat the word apple 3 times."); the CHOSEN response is the correct one in the SFT format (thinking
"12 + 7 = 19.", answer "The answer is 19."); the REJECTED one, by ``style``:

* ``refuse``: thinking "I am not sure.", answer "I do not know." (a signal any model can learn to prefer
  against on held-out questions: the end-to-end test's default);
* ``wrong``:  the right format with a wrong result (sum off by 1-3, or the word repeated one time more or less);
* ``mixed``:  even pairs ``refuse``, odd pairs ``wrong``.

Row layouts (``layout``), all of ``joyjax.data.dpo``'s accepted shapes:

* ``prompt``:   ``{"prompt": str, "chosen": str, "rejected": str}`` (no reasoning: content only);
* ``messages``: ``{"messages": [system?, user], "chosen": {assistant message}, "rejected": {...}}`` with
  ``reasoning_content``;
* ``list``:     ``{"chosen": [user, assistant], "rejected": [user, assistant]}`` (implicit prompt);
* ``multi``:    ``{"messages": [user, assistant, user], "chosen": [assistant], "rejected": [assistant]}`` (a
  second turn; the first answer is context).

``thinking``: a per-row ``"thinking"`` flag (True / False), or None for none (the config's ``dpo.thinking``).
``preference_rows(n, ...)`` cycles the layouts; ``write_jsonl`` writes them; ``chosen_answer(row)`` gives the
chosen answer of a row (for greedy-sample checks).
"""

from __future__ import annotations

import random
import re

from chat_data import SYSTEMS, answer, qa, write_jsonl  # noqa: F401 - write_jsonl is re-exported

LAYOUTS = ("prompt", "messages", "list", "multi")
STYLES = ("refuse", "wrong", "mixed")


def wrong(question: str, rng: random.Random) -> tuple[str, str]:
  """(reasoning, answer) in the right format with a wrong result."""
  m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
  if m:
    a, b = int(m.group(1)), int(m.group(2))
    s = a + b + rng.choice((-3, -2, -1, 1, 2, 3))
    return f"{a} + {b} = {s}.", f"The answer is {s}."
  m = re.fullmatch(r"Repeat the word (\S+) (\d+) times\.", question)
  w, n = m.group(1), int(m.group(2))
  k = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
  return f"{w}, {k} times.", " ".join([w] * k)


def preference_pair(i: int, *, seed: int = 0, layout: str = "prompt", style: str = "refuse",
                    thinking: bool | None = None) -> dict:
  """Pair ``i`` as one row of ``layout`` (module docstring)."""
  rng = random.Random(f"dpo{seed}/{i}")
  q, reasoning, good = qa(rng)
  kind = style if style != "mixed" else ("refuse", "wrong")[i % 2]
  bad_reasoning, bad = ("I am not sure.", "I do not know.") if kind == "refuse" else wrong(q, rng)
  chosen = {"role": "assistant", "content": good, "reasoning_content": reasoning}
  rejected = {"role": "assistant", "content": bad, "reasoning_content": bad_reasoning}
  user = {"role": "user", "content": q}
  if layout == "prompt":
    row = {"prompt": q, "chosen": good, "rejected": bad}
  elif layout == "messages":
    system = [{"role": "system", "content": rng.choice(SYSTEMS)}] if i % 3 == 0 else []
    row = {"messages": system + [user], "chosen": chosen, "rejected": rejected}
  elif layout == "list":
    row = {"chosen": [user, chosen], "rejected": [user, rejected]}
  elif layout == "multi":
    q0, r0, a0 = qa(rng)
    first = [{"role": "user", "content": q0}, {"role": "assistant", "content": a0, "reasoning_content": r0}]
    row = {"messages": first + [user], "chosen": [chosen], "rejected": [rejected]}
  else:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if thinking is not None:
    row["thinking"] = thinking
  return row


def preference_rows(n: int, *, seed: int = 0, layouts=LAYOUTS, style: str = "refuse",
                    thinking=(None,)) -> list[dict]:
  """``n`` rows, pair i in layout ``layouts[i % len]`` with thinking flag ``thinking[i % len]``."""
  return [preference_pair(i, seed=seed, layout=layouts[i % len(layouts)], style=style,
                          thinking=thinking[i % len(thinking)]) for i in range(n)]


def question_of(row: dict) -> str:
  """The (last) user question of a generated row."""
  if "prompt" in row:
    return row["prompt"]
  msgs = row["messages"] if "messages" in row else row["chosen"][:-1]
  return [m for m in msgs if m["role"] == "user"][-1]["content"]


def chosen_answer(row: dict) -> str:
  """The chosen (correct) answer of a generated row."""
  return answer(question_of(row))
