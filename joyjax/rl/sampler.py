"""The batched rollout sampler: prompts in, responses with their log-probs and masks out.

One jitted function per (batch, prompt length, max new tokens) shape: a prefill of the left-padded prompts into
the preallocated MLA latent cache (``model.init_cache``: the compressed latent and the shared rotary key per
layer), then a ``lax.while_loop`` of one-token decode steps that exits as soon as every row has stopped. The
weights, the sampling settings (temperature, top-p, top-k), the stop ids and the per-row token budgets are traced
arguments: a policy update or new settings never recompile.

Left padding: row ``b``'s prompt fills slots ``start[b] = P - len[b] .. P - 1``. The cache carries ``start`` so
attention skips the pad slots, and every token gets the RoPE position ``slot - start[b]``: each row computes
exactly what it would alone, unpadded.

Log-probs (what the RL trainer recomputes and compares with): the log-probability of each sampled token under
``log_softmax(logits / T)`` in float32, with ``T`` the sampling temperature (1 when sampling greedily, T = 0),
taken BEFORE the top-p / top-k truncation: the model's tempered distribution, not the truncated one the token
was drawn from. The returned ``[B, P + R]`` layout (tokens, positions, segment ids) is what a training forward
pass consumes: ``model.forward(cfg, params, tokens, positions=..., segment_ids=...)`` gives logits whose slot
``j`` predicts token ``j + 1``, so ``log_softmax(logits[:, :-1] / T)`` gathered at ``tokens[:, 1:]`` equals
``logprobs[:, 1:]`` wherever ``response_mask[:, 1:]`` is 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from joyjax import model
from joyjax.model.layers import dtype_of
from joyjax.parallel import rules
from joyjax.rl import speculative
from joyjax.rl.sampling import sample_next

MAX_STOP_IDS = 8  # stop ids are padded to this many (-1 = unused): their number never changes the compiled shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
  """One batch of rollouts, ``[B, P + R]`` rows (``P`` = max prompt length, ``R`` = max new tokens): jax arrays
  as returned, numpy arrays after ``fetch()``."""
  tokens: Any         # [B, P + R] int32: the left-padded prompt then the response (0 after a stop)
  positions: Any      # [B, P + R] int32: RoPE positions (slot - start; 0 on pads)
  segment_ids: Any    # [B, P + R] int32: 1 on real tokens (prompt and valid response), 0 on pads
  response_mask: Any  # [B, P + R] float32: 1 on valid response tokens (up to and including the stop token)
  logprobs: Any       # [B, P + R] float32: the sampler's log-prob of each valid response token (0 elsewhere)
  lengths: Any        # [B] int32: response lengths (the stop token included)
  stopped: Any        # [B] bool: the row ended on a stop token (False: it hit its maximum length)
  steps: Any          # [B] int32: decode steps after the prefill while the row went on (its first token comes
  #                     from the prefill; a speculative step emits 1 .. k + 1 tokens, a plain step 1)

  def acceptance_length(self) -> float:
    """``acceptance_length(lengths, steps)`` of this rollout."""
    return acceptance_length(self.lengths, self.steps)

  def fetch(self) -> "Rollout":
    """The same rollout as host numpy arrays."""
    return Rollout(**{f.name: np.asarray(jax.device_get(getattr(self, f.name))) for f in dataclasses.fields(self)})


def acceptance_length(lengths, steps) -> float:
  """Mean tokens a row emitted per decode step after its first (the prefill's) token, over rows with their
  ``lengths`` and ``steps`` ([B]): 1 without drafting, 1 + mean accepted drafts with it (a step cut short by a
  stop token or the budget counts as taken)."""
  after_first = np.maximum(np.asarray(lengths) - 1, 0)
  return float(after_first.sum() / max(int(np.asarray(steps).sum()), 1))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [B, length] int32, each prompt at the right end after ``pad_id`` pads; lens [B]
  int32). Raises ``ValueError`` on an empty prompt or one longer than ``length``."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  lens = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"left_pad: prompt {i} has {len(p)} tokens; prompts need 1 to {length} tokens")
    tokens[i, length - len(p):] = np.asarray(p, np.int32)
    lens[i] = len(p)
  return tokens, lens



class Sampler:
  """Batched generation for a config: ``Sampler(cfg, max_prompt_len=P, max_new_tokens=R, mesh=None,
  draft_tokens=0)``, then ``sampler(params, prompt_tokens [B, P] left-padded, prompt_lens [B], key,
  temperature=...) -> Rollout``, or ``sampler.stream(...)`` for one prompt's tokens step by step.

  ``draft_tokens`` k > 0 decodes speculatively (``rl/speculative.py``): the model's first MTP module drafts k
  tokens per step and the model verifies them in one pass, so a step emits 1 .. k + 1 tokens per row; greedy
  output and the sampling distribution are those of k = 0, and the log-probs are the model's.

  With a ``mesh`` the params take ``rules.param_shardings(cfg, mesh)`` and the batch ``rules.batch_sharding``
  (as in training; B must divide by the data-parallel size) and the call runs under ``jax.set_mesh(mesh)``
  (expert parallelism); without one it runs wherever its inputs are."""

  def __init__(self, cfg, *, max_prompt_len: int, max_new_tokens: int, mesh=None, draft_tokens: int = 0):
    limit = cfg.model.max_position_embeddings
    if max_prompt_len < 1 or max_new_tokens < 1:
      raise ValueError(f"Sampler: max_prompt_len ({max_prompt_len}) and max_new_tokens ({max_new_tokens}) must "
                       "be positive")
    if max_prompt_len + max_new_tokens > limit:
      raise ValueError(f"Sampler: max_prompt_len ({max_prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"model.max_position_embeddings={limit}")
    if draft_tokens < 0 or (draft_tokens > 0 and cfg.model.mtp.num_layers == 0):
      raise ValueError(f"Sampler: draft_tokens={draft_tokens} needs 0, or an MTP module (model.mtp.num_layers > 0)")
    self.cfg, self.mesh = cfg, mesh
    self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
    self.draft_tokens = int(draft_tokens)
    # the cache and token buffer have k spare slots: a verify pass writes k + 1 slots past a row's last token
    self._width = self.max_prompt_len + self.max_new_tokens + self.draft_tokens
    self._traces = 0
    self._stream_traces = 0
    if mesh is None:
      self._in_shardings = None
    else:
      self._rules = rules.get_rules(cfg)
      rows = rules.batch_sharding(mesh, self._rules, ndim=1)
      same = NamedSharding(mesh, PartitionSpec())
      self._in_shardings = (rules.param_shardings(cfg, mesh), rules.batch_sharding(mesh, self._rules), rows,
                            same, same, same, same, same, rows)
    shard = {} if mesh is None else {"in_shardings": self._in_shardings}
    self._fn = jax.jit(self._rollout, **shard)
    self._prefill_fn = jax.jit(self._traced_prefill, **shard)
    self._step_fn = jax.jit(self._traced_step, donate_argnums=(1,))

  def compiles(self) -> int:
    """How many times the jitted rollout function was traced (= compiled): once per input shape."""
    return self._traces

  def stream_compiles(self) -> int:
    """How many times ``stream``'s prefill and step functions were traced (2 per input shape)."""
    return self._stream_traces

  def __call__(self, params, prompt_tokens, prompt_lens, key, *, temperature, top_p=1.0, top_k=0, stop_ids=(),
               max_new=None) -> Rollout:
    """``prompt_tokens`` [B, max_prompt_len] int32, left-padded (``left_pad``); ``prompt_lens`` [B] (1 ..
    max_prompt_len); ``key`` a jax PRNG key; ``temperature`` 0 = greedy; ``top_p`` 1 and ``top_k`` 0 = off;
    ``stop_ids`` up to ``MAX_STOP_IDS`` token ids that end a row (kept as its last response token); ``max_new``
    the per-row response budget (an int or [B]; None = max_new_tokens)."""
    args = self._args(params, prompt_tokens, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new)
    with self._mesh_ctx():
      if self._in_shardings is not None:
        args = jax.device_put(args, self._in_shardings)
      return self._fn(*args)

  def stream(self, params, prompt_tokens, prompt_lens, key, *, temperature, top_p=1.0, top_k=0, stop_ids=(),
             max_new=None) -> Iterator[np.ndarray]:
    """The same generation as ``__call__`` for one prompt (B = 1), as it happens: yields the new tokens of each
    step, an int32 numpy array [n] (n = 1 without drafting, 1 .. draft_tokens + 1 with it; the stop token
    included when one ends the row), until the row stops or spends its budget. One jitted call per step (the
    prefill, then the step function ``__call__``'s while_loop runs), compiled once per shape."""
    args = self._args(params, prompt_tokens, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new)
    if args[1].shape[0] != 1:
      raise ValueError(f"Sampler.stream: one prompt at a time (B = 1), got B = {args[1].shape[0]}")
    p, sent = self.max_prompt_len, 0
    with self._mesh_ctx():
      if self._in_shardings is not None:
        args = jax.device_put(args, self._in_shardings)
      params, settings = args[0], args[3:]
      state = self._prefill_fn(*args)
      while True:  # every step gives a row that goes on at least one token: at most max_new_tokens - 1 steps
        length, done, row = jax.device_get((state["lengths"][0], state["done"][0], state["tokens"][0]))
        if length > sent:
          yield np.asarray(row[p + sent:p + length], np.int32)
          sent = int(length)
        if done:
          return
        state = self._step_fn(params, state, *settings)

  # ------------------------------------------------------------------------------------------------ internals

  def _args(self, params, prompt_tokens, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new):
    prompt = np.asarray(prompt_tokens, np.int32)
    lens = np.asarray(prompt_lens, np.int32)
    b = prompt.shape[0]
    if prompt.shape != (b, self.max_prompt_len) or lens.shape != (b,):
      raise ValueError(f"Sampler: prompt_tokens must be [B, {self.max_prompt_len}] and prompt_lens [B], got "
                       f"{prompt.shape} and {lens.shape}")
    if lens.min(initial=1) < 1 or lens.max(initial=1) > self.max_prompt_len:
      raise ValueError(f"Sampler: prompt_lens must be 1 .. {self.max_prompt_len}, got {lens.tolist()}")
    stop = np.asarray(stop_ids, np.int32).reshape(-1)
    if stop.size > MAX_STOP_IDS:
      raise ValueError(f"Sampler: at most {MAX_STOP_IDS} stop ids, got {stop.size}")
    stop = np.concatenate([stop, np.full((MAX_STOP_IDS - stop.size,), -1, np.int32)])
    budget = np.broadcast_to(np.asarray(self.max_new_tokens if max_new is None else max_new, np.int32), (b,))
    if budget.min(initial=0) < 0 or budget.max(initial=0) > self.max_new_tokens:
      raise ValueError(f"Sampler: max_new must be 0 .. {self.max_new_tokens}, got {budget.tolist()}")
    return (params, prompt, lens, key, np.float32(temperature), np.float32(top_p), np.int32(top_k), stop,
            np.array(budget))

  def _mesh_ctx(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _constrain(self, x, axes):
    if self.mesh is None:
      return x
    spec = rules.logical_to_spec(axes, self._rules, self.mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _init_cache(self, b):
    cache = model.init_cache(self.cfg, b, self._width, dtype_of(self.cfg.model.dtype), mtp=self.draft_tokens > 0)
    layer_axes = {model.MTP_STACK: ("batch", None, None)}
    return {name: (self._constrain(v, ("batch",)) if name in ("index", "start") else
                   jax.tree.map(lambda a, n=name: self._constrain(a, layer_axes.get(n, (None, "batch", None, None))),
                                v))
            for name, v in cache.items()}

  def _prefill(self, params, prompt, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new):
    """The prompts into the cache and the first token sampled: the decode state (a dict of arrays)."""
    cfg = self.cfg
    b, p = prompt.shape
    start = (p - prompt_lens).astype(jnp.int32)
    cache = self._init_cache(b)
    cache["start"] = self._constrain(start, ("batch",))
    positions = jnp.maximum(jnp.arange(p, dtype=jnp.int32)[None] - start[:, None], 0)  # slot - start; pads 0
    x, logits, cache = model.decode_hidden(cfg, params, prompt, cache, positions=positions)
    token, lp = sample_next(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p, top_k)
    state = {"i": jnp.int32(0), "last": token,
             "tokens": jnp.concatenate([prompt, jnp.zeros((b, self._width - p), jnp.int32)], axis=1),
             "logprobs": jnp.zeros((b, self._width), jnp.float32), "lengths": jnp.zeros((b,), jnp.int32),
             "stopped": jnp.zeros((b,), bool), "done": max_new <= 0, "steps": jnp.zeros((b,), jnp.int32)}
    if self.draft_tokens:
      state["hidden"], state["q_logits"], cache = speculative.mtp_prefill(cfg, params, x, prompt, token, cache)
    state["cache"] = cache
    return _commit(state, token[:, None], lp[:, None], jnp.ones((b,), jnp.int32), stop_ids, max_new, p)

  def _step(self, params, state, key, temperature, top_p, top_k, stop_ids, max_new):
    """One decode step (plain: one token; speculative: draft, verify, accept) for every row that goes on."""
    key = jax.random.fold_in(key, state["i"] + 1)
    n = state["cache"]["index"]
    if self.draft_tokens:
      emitted, logps, count, new = speculative.step(self.cfg, params, state, key, temperature, top_p, top_k,
                                                    self.draft_tokens)
    else:
      logits, cache = model.decode_step(self.cfg, params, state["last"][:, None], state["cache"])
      token, lp = sample_next(logits[:, 0], key, temperature, top_p, top_k)
      emitted, logps, count, new = token[:, None], lp[:, None], jnp.ones_like(token), {"cache": cache, "last": token}
    active = ~state["done"]
    new["cache"] = dict(new["cache"], index=jnp.where(active, n + count, n))  # rows past their end stay put
    state = dict(state, **new, i=state["i"] + 1, steps=state["steps"] + active.astype(jnp.int32))
    return _commit(state, emitted, logps, count, stop_ids, max_new, self.max_prompt_len)

  def _traced_prefill(self, *args):
    self._stream_traces += 1
    return self._prefill(*args)

  def _traced_step(self, *args):
    self._stream_traces += 1
    return self._step(*args)

  def _rollout(self, params, prompt, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new):
    self._traces += 1
    settings = (key, temperature, top_p, top_k, stop_ids, max_new)
    state = self._prefill(params, prompt, prompt_lens, *settings)
    state = jax.lax.while_loop(lambda s: (s["i"] < self.max_new_tokens) & ~jnp.all(s["done"]),
                               lambda s: self._step(params, s, *settings), state)
    b, p = prompt.shape
    total = p + self.max_new_tokens
    start = (p - prompt_lens).astype(jnp.int32)
    lengths = state["lengths"]
    slots = jnp.arange(total, dtype=jnp.int32)[None]
    end = (p + lengths)[:, None]
    real = (slots >= start[:, None]) & (slots < end)
    response = (slots >= p) & (slots < end)
    return Rollout(tokens=state["tokens"][:, :total], positions=jnp.where(real, slots - start[:, None], 0),
                   segment_ids=real.astype(jnp.int32), response_mask=response.astype(jnp.float32),
                   logprobs=state["logprobs"][:, :total], lengths=lengths, stopped=state["stopped"],
                   steps=state["steps"])


def _commit(state, emitted, logps, count, stop_ids, max_new, p):
  """Appends each row's first ``count`` tokens of ``emitted`` [b, m] (and their log-probs) to its response,
  cut after the first stop token and at the row's budget; rows already done take nothing. Updates ``tokens``,
  ``logprobs``, ``lengths``, ``stopped`` and ``done``."""
  b, m = emitted.shape
  lengths = state["lengths"]
  j = jnp.arange(m, dtype=jnp.int32)[None]
  is_stop = jnp.any(emitted[..., None] == stop_ids[None, None], axis=-1) & (j < count[:, None])
  through_stop = jnp.where(jnp.any(is_stop, axis=-1), jnp.argmax(is_stop, axis=-1) + 1, m)
  n = jnp.minimum(jnp.minimum(count, through_stop), max_new - lengths)
  n = jnp.where(state["done"], 0, jnp.maximum(n, 0))
  write = j < n[:, None]
  slot = jnp.where(write, p + lengths[:, None] + j, state["tokens"].shape[1])  # out of range: dropped
  rows = jnp.arange(b)[:, None]
  lengths = lengths + n
  hit = jnp.any(is_stop & write, axis=-1)
  return dict(state, tokens=state["tokens"].at[rows, slot].set(emitted, mode="drop"),
              logprobs=state["logprobs"].at[rows, slot].set(logps, mode="drop"), lengths=lengths,
              stopped=state["stopped"] | hit, done=state["done"] | hit | (lengths >= max_new))
