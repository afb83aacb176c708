"""The RL prompt stream (the objective's "data iterator") and the pass-rate curriculum.

**Split.** The task's prompts (``env.prompts()``) are split once: ``data.eval_fraction`` of them are held out
by a hash of the prompt index (``data.pipeline.HeldOut``: the same prompts in every run, whatever the seed or
the process count; 0 = no held-out set). Held-out prompts are never trained on; ``held_out()`` gives them as
evaluation batches.

**Batches.** Each ``next()`` picks ``rl.prompts_per_step`` distinct training prompts (the GLOBAL batch, the
same on every process): uniformly without replacement, or with ``rl.curriculum`` without replacement with
probabilities proportional to the curriculum's weights, drawn by a numpy Generator seeded with ``data.seed``.
Each prompt is rendered once, at construction, with the chat format (``chat.render_prompt``: thinking mode
from ``rl.thinking``, ending with the assistant opening) and left-padded with id 0 to ``rl.max_prompt_len``; a
longer prompt is a DataError naming it. ``next()`` returns this process's rows ``process_index * b ...
(process_index + 1) * b`` (``b = rl.prompts_per_step / process_count``)::

    prompt_tokens [b, rl.max_prompt_len] int32   left-padded (pad id 0)
    prompt_lens   [b] int32                      real tokens (the last prompt_lens of each row)
    prompt_index  [b] int32                      the prompt's index in env.prompts() (GLOBAL numbering)

**Curriculum** (the JoyAI report's pass-rate curriculum). Each prompt's pass rate is the mean of the outcomes
recorded for it (``record``: the trainer passes each prompt's share of correct samples); a prompt never
recorded counts as 0.5. Its weight at step t is ``exp(-(pass - mu_t)^2 / (2 width^2))``, with ``mu_t`` moving
linearly from ``rl.curriculum_start`` at step 0 to ``rl.curriculum_end`` at ``train.steps`` (and staying
there): early steps favour prompts the policy mostly solves, later ones the hard prompts. Weights are floored
at 1e-12 of the largest when drawing, so every training prompt stays drawable.

**State.** ``get_state()`` is a JSON-able dict (the Generator's state, the step counter, the curriculum's
sums and counts, and a layout that ``set_state`` checks); a stream restored from it yields exactly the
batches the original would have. It is the same on every process (the global batch is), so it also restores
under another process count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from joyjax.errors import ConfigError, DataError
from joyjax.data import chat
from joyjax.data.pipeline import held_out as _held_out_split
from joyjax.data.tokenizer import Tokenizer
from joyjax.rl.envs import Prompt

STREAM_STATE_VERSION = 1
UNSEEN_PASS_RATE = 0.5  # a prompt's pass rate before any outcome is recorded
_WEIGHT_FLOOR = 1e-12


class Curriculum:
  """Per-prompt pass rates and their Gaussian weights around a moving target (module docstring)."""

  def __init__(self, num_prompts: int, *, start: float, end: float, width: float, total_steps: int):
    if width <= 0:
      raise ConfigError(f"config key 'rl.curriculum_width': must be positive, got {width}")
    self.num_prompts = int(num_prompts)
    self.start, self.end, self.width, self.total_steps = float(start), float(end), float(width), int(total_steps)
    self.sums = np.zeros(self.num_prompts, np.float64)
    self.counts = np.zeros(self.num_prompts, np.int64)

  def target(self, step: int) -> float:
    """``mu_t``: ``start`` at step 0, ``end`` from ``total_steps`` on, linear between."""
    frac = min(max(step / max(self.total_steps, 1), 0.0), 1.0)
    return self.start + (self.end - self.start) * frac

  def pass_rates(self) -> np.ndarray:
    """``[num_prompts]`` float64: mean recorded outcome, ``UNSEEN_PASS_RATE`` where none is recorded."""
    seen = self.counts > 0
    out = np.full(self.num_prompts, UNSEEN_PASS_RATE, np.float64)
    out[seen] = self.sums[seen] / self.counts[seen]
    return out

  def weights(self, step: int) -> np.ndarray:
    """``[num_prompts]`` float64: ``exp(-(pass - mu_step)^2 / (2 width^2))``."""
    d = self.pass_rates() - self.target(step)
    return np.exp(-(d * d) / (2.0 * self.width * self.width))

  def record(self, indices, pass_values) -> None:
    """Adds one outcome (a pass rate in [0, 1]) per prompt index; an index may repeat."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    val = np.asarray(pass_values, np.float64).reshape(-1)
    if idx.shape != val.shape:
      raise ValueError(f"record: {idx.size} prompt indices but {val.size} pass values")
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_prompts):
      raise ValueError(f"record: prompt index out of range 0..{self.num_prompts - 1}: {idx.min()}..{idx.max()}")
    if not np.all(np.isfinite(val)):
      raise ValueError("record: non-finite pass values")
    np.add.at(self.sums, idx, val)
    np.add.at(self.counts, idx, 1)

  def get_state(self) -> dict[str, list]:
    return {"sums": [float(x) for x in self.sums], "counts": [int(x) for x in self.counts]}

  def set_state(self, state: dict[str, Any]) -> None:
    sums, counts = list(state["sums"]), list(state["counts"])
    if len(sums) != self.num_prompts or len(counts) != self.num_prompts:
      raise DataError(f"the saved curriculum state has {len(sums)} prompts, the task has {self.num_prompts}; "
                      "resume with the same rl.env and rl.env_args, or restart without the data state")
    self.sums = np.asarray(sums, np.float64)
    self.counts = np.asarray(counts, np.int64)


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
  """The Generator's state, its (up to 128-bit) integers as decimal strings: JSON-able anywhere."""

  def enc(x):
    if isinstance(x, dict):
      return {k: enc(v) for k, v in x.items()}
    return str(x) if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 2**53 else x

  return enc(rng.bit_generator.state)


def _restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:

  def dec(x):
    if isinstance(x, dict):
      return {k: dec(v) for k, v in x.items()}
    return int(x) if isinstance(x, str) and x.lstrip("-").isdigit() else x

  rng.bit_generator.state = dec(state)


class PromptStream:
  """This process's RL prompt batches (module docstring); an iterator with exact-resume state."""

  def __init__(self, cfg, tokenizer: Tokenizer, env, *, process_index: int = 0, process_count: int = 1,
               template: chat.ChatTemplate | None = None):
    rl, d = cfg.rl, cfg.data
    self.env, self.tokenizer = env, tokenizer
    self.batch_size = int(rl.prompts_per_step)
    if self.batch_size % process_count:
      raise ConfigError(f"config key 'rl.prompts_per_step': {self.batch_size} prompts per step do not split over "
                        f"{process_count} processes; use a multiple of {process_count}")
    self.process_index, self.process_count = process_index, process_count
    self.rows = self.batch_size // process_count
    self.max_prompt_len = int(rl.max_prompt_len)
    self.use_curriculum = bool(rl.curriculum)

    self._prompts: list[Prompt] = list(env.prompts())
    n = len(self._prompts)
    for i, p in enumerate(self._prompts):
      if not isinstance(p, Prompt) or p.index != i:
        got = f"index {p.index}" if isinstance(p, Prompt) else f"a {type(p).__name__}"
        raise DataError(f"task {rl.env!r}: prompts()[{i}] is {got}; prompts() must return joyjax.rl.envs.Prompt "
                        "objects with index = their position in the list")
    split = _held_out_split(cfg)
    held = split.indices(n) if split is not None else np.zeros((0,), np.int64)
    mask = np.zeros(n, bool)
    mask[held] = True
    self.held_indices = held.astype(np.int64)
    self.train_indices = np.flatnonzero(~mask).astype(np.int64)
    if len(self.train_indices) < self.batch_size:
      raise ConfigError(f"config key 'rl.prompts_per_step': {self.batch_size} distinct prompts per step, but task "
                        f"{rl.env!r} has only {len(self.train_indices)} training prompts ({n} in all, "
                        f"{len(held)} held out by data.eval_fraction={d.eval_fraction}); lower rl.prompts_per_step "
                        "or give the task more prompts (rl.env_args num_prompts)")

    # Render every prompt now (they are small): a too-long one fails before any compile.
    self.tokens = np.zeros((n, self.max_prompt_len), np.int32)
    self.lens = np.zeros((n,), np.int32)
    for i, p in enumerate(self._prompts):
      try:
        ids = chat.render_prompt(p.messages, tokenizer, thinking=bool(rl.thinking), template=template)
      except DataError as e:
        raise DataError(f"task {rl.env!r}, prompt {i}: {e}") from None
      if len(ids) > self.max_prompt_len:
        raise DataError(f"task {rl.env!r}, prompt {i} is {len(ids)} tokens rendered, longer than "
                        f"rl.max_prompt_len={self.max_prompt_len}; raise rl.max_prompt_len to at least {len(ids)} "
                        "(or shorten the task's prompts)")
      self.tokens[i, self.max_prompt_len - len(ids):] = ids
      self.lens[i] = len(ids)

    self.curriculum = Curriculum(n, start=rl.curriculum_start, end=rl.curriculum_end, width=rl.curriculum_width,
                                 total_steps=cfg.train.steps)
    self.seed = int(d.seed)
    self._rng = np.random.default_rng(self.seed)
    self.step = 0
    self._layout = {"num_prompts": n, "num_train": int(len(self.train_indices)),
                    "prompts_per_step": self.batch_size, "max_prompt_len": self.max_prompt_len}

  # ---------------------------------------------------------------------------------------- batches

  @property
  def num_prompts(self) -> int:
    return len(self._prompts)

  def prompt(self, index: int) -> Prompt:
    """The task's prompt ``index`` (the GLOBAL numbering of ``prompt_index``)."""
    return self._prompts[int(index)]

  def _batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.int64)
    return {"prompt_tokens": self.tokens[idx], "prompt_lens": self.lens[idx], "prompt_index": idx.astype(np.int32)}

  def _mine(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    lo = self.process_index * self.rows
    return {k: v[lo:lo + self.rows] for k, v in batch.items()}

  def next_indices(self) -> np.ndarray:
    """The next GLOBAL batch's prompt indices (advances the stream)."""
    train = self.train_indices
    if self.use_curriculum:
      w = self.curriculum.weights(self.step)[train]
      w = np.maximum(w, _WEIGHT_FLOOR * max(float(w.max()), 1e-300))
      idx = self._rng.choice(train, size=self.batch_size, replace=False, p=w / w.sum())
    else:
      idx = self._rng.choice(train, size=self.batch_size, replace=False)
    self.step += 1
    return np.asarray(idx, np.int64)

  def __iter__(self) -> "PromptStream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._mine(self._batch(self.next_indices()))

  def record(self, prompt_index, pass_values) -> None:
    """Feeds the curriculum: GLOBAL prompt indices and their pass rates (every process gets the same)."""
    self.curriculum.record(prompt_index, pass_values)

  def held_out(self) -> list[dict[str, np.ndarray]]:
    """The held-out prompts as this process's slices of global batches of ``rl.prompts_per_step`` rows, in
    index order, the last one padded by repeating held-out prompts from the start (``valid`` 0 there); the
    same list every call; [] without a held-out set."""
    held = self.held_indices
    if len(held) == 0:
      return []
    num = -(-len(held) // self.batch_size)
    order = np.resize(held, num * self.batch_size)  # cycles through held from its start
    valid = (np.arange(num * self.batch_size) < len(held)).astype(np.int32)
    out = []
    for k in range(num):
      sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
      out.append(self._mine({**self._batch(order[sl]), "valid": valid[sl]}))
    return out

  # ---------------------------------------------------------------------------------------- state

  def get_state(self) -> dict[str, Any]:
    return {"version": STREAM_STATE_VERSION, "layout": dict(self._layout), "step": self.step,
            "rng": _rng_state(self._rng), "curriculum": self.curriculum.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STREAM_STATE_VERSION:
      raise DataError(f"the saved RL prompt stream state is not a v{STREAM_STATE_VERSION} state (got "
                      f"{sorted(state) if isinstance(state, dict) else type(state).__name__}); restart without "
                      "the data state")
    saved = state["layout"]
    diff = [f"{k}: saved {saved.get(k)}, now {v}" for k, v in self._layout.items() if saved.get(k) != v]
    if diff:
      raise DataError("the saved RL prompt stream state does not match the current task and settings ("
                      + "; ".join(diff) + "); resume with the same rl.env, rl.env_args, data.eval_fraction and "
                      "rl sizes, or restart without the data state")
    self.curriculum.set_state(state["curriculum"])
    _restore_rng(self._rng, state["rng"])
    self.step = int(state["step"])

  def __repr__(self) -> str:
    return (f"PromptStream(task={getattr(self.env, 'name', '?')!r}, prompts={self.num_prompts}, "
            f"train={len(self.train_indices)}, held_out={len(self.held_indices)}, "
            f"prompts_per_step={self.batch_size}, curriculum={self.use_curriculum})")
