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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from joyjax import model
from joyjax.model.layers import dtype_of
from joyjax.parallel import rules

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

  def fetch(self) -> "Rollout":
    """The same rollout as host numpy arrays."""
    return Rollout(**{f.name: np.asarray(jax.device_get(getattr(self, f.name))) for f in dataclasses.fields(self)})


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


def _truncation_cutoff(scaled, top_p, top_k):
  """Per row, the smallest tempered logit top-k and then top-p (nucleus over the top-k renormalised) keep:
  tokens at or above it stay. Rank 0 is always kept, so the cutoff is at most the row's maximum."""
  v = scaled.shape[-1]
  desc = -jnp.sort(-scaled, axis=-1)
  rank = jnp.arange(v, dtype=jnp.int32)[None]
  in_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly higher-ranked tokens
  keep = in_k & ((before < top_p) | (top_p >= 1.0))
  n = jnp.maximum(jnp.sum(keep, axis=-1), 1)
  return jnp.take_along_axis(desc, (n - 1)[:, None], axis=-1)[:, 0]


def sample_next(logits, key, temperature, top_p, top_k):
  """Float32 logits [b, V] -> (token [b] int32, its log-prob [b] float32 under log_softmax(logits / T)).

  ``temperature`` <= 0 is greedy (argmax; log-probs at T = 1). Otherwise softmax sampling at ``temperature``
  among the tokens top-k (``top_k`` > 0) and then top-p (``top_p`` < 1) keep; all settings are traced scalars."""
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)
  logp = jax.nn.log_softmax(scaled, axis=-1)
  truncate = (top_k > 0) | (top_p < 1.0)
  cutoff = jax.lax.cond(truncate, lambda: _truncation_cutoff(scaled, top_p, top_k),
                        lambda: jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype))
  drawn = jax.random.categorical(key, jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf), axis=-1)
  token = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class Sampler:
  """Batched generation for a config: ``Sampler(cfg, max_prompt_len=P, max_new_tokens=R, mesh=None)``, then
  ``sampler(params, prompt_tokens [B, P] left-padded, prompt_lens [B], key, temperature=...) -> Rollout``.

  With a ``mesh`` the params take ``rules.param_shardings(cfg, mesh)`` and the batch ``rules.batch_sharding``
  (as in training; B must divide by the data-parallel size) and the call runs under ``jax.set_mesh(mesh)``
  (expert parallelism); without one it runs wherever its inputs are."""

  def __init__(self, cfg, *, max_prompt_len: int, max_new_tokens: int, mesh=None):
    limit = cfg.model.max_position_embeddings
    if max_prompt_len < 1 or max_new_tokens < 1:
      raise ValueError(f"Sampler: max_prompt_len ({max_prompt_len}) and max_new_tokens ({max_new_tokens}) must "
                       "be positive")
    if max_prompt_len + max_new_tokens > limit:
      raise ValueError(f"Sampler: max_prompt_len ({max_prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"model.max_position_embeddings={limit}")
    self.cfg, self.mesh = cfg, mesh
    self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
    self._traces = 0
    if mesh is None:
      self._in_shardings = None
      self._fn = jax.jit(self._rollout)
    else:
      self._rules = rules.get_rules(cfg)
      rows = rules.batch_sharding(mesh, self._rules, ndim=1)
      same = NamedSharding(mesh, PartitionSpec())
      self._in_shardings = (rules.param_shardings(cfg, mesh), rules.batch_sharding(mesh, self._rules), rows,
                            same, same, same, same, same, rows)
      self._fn = jax.jit(self._rollout, in_shardings=self._in_shardings)

  def compiles(self) -> int:
    """How many times the jitted rollout function was traced (= compiled): once per input shape."""
    return self._traces

  def __call__(self, params, prompt_tokens, prompt_lens, key, *, temperature, top_p=1.0, top_k=0, stop_ids=(),
               max_new=None) -> Rollout:
    """``prompt_tokens`` [B, max_prompt_len] int32, left-padded (``left_pad``); ``prompt_lens`` [B] (1 ..
    max_prompt_len); ``key`` a jax PRNG key; ``temperature`` 0 = greedy; ``top_p`` 1 and ``top_k`` 0 = off;
    ``stop_ids`` up to ``MAX_STOP_IDS`` token ids that end a row (kept as its last response token); ``max_new``
    the per-row response budget (an int or [B]; None = max_new_tokens)."""
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
    args = (params, prompt, lens, key, np.float32(temperature), np.float32(top_p), np.int32(top_k), stop,
            np.array(budget))
    ctx = contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
    with ctx:
      if self._in_shardings is not None:
        args = jax.device_put(args, self._in_shardings)
      return self._fn(*args)

  def _constrain(self, x, axes):
    if self.mesh is None:
      return x
    spec = rules.logical_to_spec(axes, self._rules, self.mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _rollout(self, params, prompt, prompt_lens, key, temperature, top_p, top_k, stop_ids, max_new):
    self._traces += 1
    cfg = self.cfg
    b, p = prompt.shape
    r = self.max_new_tokens
    total = p + r
    start = (p - prompt_lens).astype(jnp.int32)
    cache = model.init_cache(cfg, b, total, dtype_of(cfg.model.dtype))
    cache = {k: (v if k == "index" else jax.tree.map(lambda a: self._constrain(a, (None, "batch", None, None)), v))
             for k, v in cache.items() if k != "start"}
    cache["start"] = self._constrain(start, ("batch",))
    slots = jnp.arange(total, dtype=jnp.int32)[None]
    rel = slots - start[:, None]  # RoPE positions (negative on the left pads)
    hidden, _, _, cache = model.forward_hidden(cfg, params, prompt, positions=jnp.maximum(rel[:, :p], 0),
                                               cache=cache)
    logits = model.logits_from_hidden(cfg, params, hidden[:, -1:])[:, 0]

    def cond(carry):
      i, done = carry[0], carry[-1]
      return (i < r) & ~jnp.all(done)

    def body(carry):
      i, cache, logits, tokens, logprobs, lengths, stopped, done = carry
      token, lp = sample_next(logits, jax.random.fold_in(key, i), temperature, top_p, top_k)
      active = ~done
      token = jnp.where(active, token, 0)
      slot = p + i
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], slot, axis=1)
      logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, jnp.where(active, lp, 0.0)[:, None], slot, axis=1)
      lengths = lengths + active.astype(jnp.int32)
      hit = active & jnp.any(token[:, None] == stop_ids[None], axis=-1)
      stopped = stopped | hit
      done = done | hit | (lengths >= max_new)
      # the next token's logits (wasted on the last step: one decode step per rollout, not per token)
      hidden, _, _, cache = model.forward_hidden(cfg, params, token[:, None], positions=(slot - start)[:, None],
                                                 cache=cache)
      logits = model.logits_from_hidden(cfg, params, hidden)[:, 0]
      return i + 1, cache, logits, tokens, logprobs, lengths, stopped, done

    tokens = jnp.concatenate([prompt, jnp.zeros((b, r), jnp.int32)], axis=1)
    carry = (jnp.int32(0), cache, logits, tokens, jnp.zeros((b, total), jnp.float32), jnp.zeros((b,), jnp.int32),
             jnp.zeros((b,), bool), max_new <= 0)
    _, _, _, tokens, logprobs, lengths, stopped, _ = jax.lax.while_loop(cond, body, carry)
    end = (p + lengths)[:, None]
    real = (slots >= start[:, None]) & (slots < end)
    response = (slots >= p) & (slots < end)
    return Rollout(tokens=tokens, positions=jnp.where(real, rel, 0), segment_ids=real.astype(jnp.int32),
                   response_mask=response.astype(jnp.float32), logprobs=logprobs, lengths=lengths, stopped=stopped)
