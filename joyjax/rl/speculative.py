"""MTP speculative decoding: the model's multi-token-prediction module drafts k tokens, the model verifies them
in one forward pass over the latent cache, and each row keeps the longest accepted prefix plus one token of its
own (1 .. k + 1 tokens per step, a different count per row).

One step, for a row whose cache holds positions ``.. n - 1`` (``index = n``) and whose last emitted token
``t_n`` is not yet in the cache:

1. **draft** (``draft``): the first MTP module's output at position ``n - 1`` (``hidden``, kept from the last
   step) and its logits give ``d_1``; the module is then chained, its own output hidden and the drafted token
   going back in, at positions ``n .. n + k - 2`` for ``d_2 .. d_k`` (as DeepSeek-V3 / JoyAI serve one MTP
   module for 3 draft tokens). Drafts are drawn from ``q``, the draft logits after the same temperature / top-k /
   top-p processing as the model's (argmax when greedy).
2. **verify**: the model runs over ``[t_n, d_1 .. d_k]`` at positions ``n .. n + k`` in one pass; its logits at
   ``n + j`` give ``p_j``, its distribution for the token after ``d_j``.
3. **accept** (``accept``): the standard speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023):
   ``d_j`` is kept with probability ``min(1, p_j(d_j) / q_j(d_j))`` while every earlier one was kept; at the first
   rejection the row draws from ``norm(max(0, p_j - q_j))``, and if all k are kept, a bonus token from ``p_k``.
   The emitted tokens are then distributed exactly as plain sampling from ``p``; greedy (``p``, ``q`` one-hot)
   this is "keep drafts equal to the argmax, then the argmax": exactly the greedy output.
4. **roll back and catch up**: the row's index becomes ``n + a + 1`` (``a`` drafts kept): slots past it hold
   rejected drafts, masked by every later query and overwritten by the next step. The MTP module reruns over
   the verified positions ``n .. n + k`` with the model's true hiddens and the emitted tokens (so its cache at
   each kept position holds what training computes there: the model's ``h_i`` and ``emb(t_{i+1})``); its output
   at ``n + a`` drafts the next step's ``d_1``.

Log-probs reported for the emitted tokens are the model's (``p``'s logits, before truncation): RL compares them
with the trainer's, as without speculation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.rl.sampling import draw, filtered_probs, token_logp


def _at(x, j):
  """x [b, n, ...] at per-row position j [b] -> [b, ...]."""
  return jnp.take_along_axis(x, j.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def head(cfg, params, normed):
  """Float32 logits [b, V] of one normed hidden [b, embed] per row through the shared head."""
  return model.logits_from_hidden(cfg, params, normed[:, None])[:, 0]


def mtp_prefill(cfg, params, hidden, prompt, first, cache):
  """The MTP module over a prefilled prompt [b, P] (slots 0 .. P - 1): position i takes the model's pre-norm
  ``hidden`` [b, P, embed] and token i + 1 (the prompt's next token, ``first`` [b] after the last). Returns
  (its output hidden at P - 1 [b, 1, embed], the logits drafting the first draft token [b, V], new cache)."""
  nxt = jnp.concatenate([prompt[:, 1:], first[:, None]], axis=1)
  x, normed, cache = model.mtp_decode(cfg, params, hidden, nxt, cache, index=jnp.zeros_like(cache["index"]))
  return x[:, -1:], head(cfg, params, normed[:, -1]), cache


def draft(cfg, params, cache, hidden, q_logits, key, temperature, top_p, top_k, k: int):
  """k draft tokens per row from the MTP module chained on itself (see the module docstring, step 1).
  Returns (drafts [b, k] int32, their draft distributions q [b, k, V] float32, cache with the chained positions
  written in the MTP layer)."""
  keys = jax.random.split(key, k)
  drafts, probs = [], []
  for j in range(k):
    q = filtered_probs(q_logits, temperature, top_p, top_k)
    d = draw(keys[j], lambda q=q: jnp.log(q), q_logits, temperature)
    drafts.append(d)
    probs.append(q)
    if j + 1 < k:
      hidden, normed, cache = model.mtp_decode(cfg, params, hidden, d[:, None], cache, index=cache["index"] + j)
      q_logits = head(cfg, params, normed[:, 0])
  return jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1), cache


def accept(p_logits, drafts, q_probs, key, temperature, top_p, top_k):
  """The speculative sampling rule (module docstring, step 3). ``p_logits`` [b, k + 1, V] float32: the model's
  logits after the last token and after each draft; ``drafts`` [b, k]; ``q_probs`` [b, k, V]. Returns (accepted
  drafts per row [b] int32 in 0 .. k, the row's own next token [b] int32: the residual draw at the first
  rejection, or the bonus token)."""
  b, k1, v = p_logits.shape
  p = filtered_probs(p_logits.reshape(b * k1, v), temperature, top_p, top_k).reshape(b, k1, v)
  key_u, key_r = jax.random.split(key)
  p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q_probs, drafts[..., None], axis=-1)[..., 0]
  keep = jax.random.uniform(key_u, p_d.shape) * q_d < p_d  # u < p / q (q_d > 0: d was drawn from q)
  accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
  q_next = jnp.concatenate([q_probs, jnp.zeros((b, 1, v), q_probs.dtype)], axis=1)  # no draft after d_k: q = 0
  residual = _at(jnp.maximum(p - q_next, 0.0), accepted)
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, _at(p, accepted))  # p == q
  token = draw(key_r, lambda: jnp.log(residual), _at(p_logits, accepted), temperature)
  return accepted.astype(jnp.int32), token


def step(cfg, params, state, key, temperature, top_p, top_k, k: int):
  """One draft -> verify -> accept -> catch-up step over the batch. ``state``: ``cache`` (model and MTP layer,
  per-row ``index = n``), ``last`` [b] (t_n), ``hidden`` [b, 1, embed] and ``q_logits`` [b, V] (the MTP
  module's output at n - 1). Returns (emitted [b, k + 1] int32: a row's first ``count`` entries are its new
  tokens, zeros after; their log-probs under the model [b, k + 1] float32; count [b] int32 in 1 .. k + 1; the
  new ``cache`` / ``last`` / ``hidden`` / ``q_logits``, with the cache's index still n: the caller moves it to
  n + count for the rows that go on)."""
  key_d, key_a = jax.random.split(key)
  cache, n = state["cache"], state["cache"]["index"]
  drafts, q_probs, cache = draft(cfg, params, cache, state["hidden"], state["q_logits"], key_d, temperature,
                                 top_p, top_k, k)
  x, p_logits, cache = model.decode_hidden(cfg, params, jnp.concatenate([state["last"][:, None], drafts], 1), cache)
  accepted, token = accept(p_logits, drafts, q_probs, key_a, temperature, top_p, top_k)
  j = jnp.arange(k + 1)[None]
  padded = jnp.pad(drafts, ((0, 0), (0, 1)))
  emitted = jnp.where(j < accepted[:, None], padded, jnp.where(j == accepted[:, None], token[:, None], 0))
  logps = token_logp(p_logits, emitted, temperature)
  # the draft module catches up: positions n .. n + k with the model's own hiddens and the emitted tokens
  g, normed, cache = model.mtp_decode(cfg, params, x, emitted, dict(cache, index=n))
  new = {"cache": cache, "last": token, "hidden": _at(g, accepted)[:, None],
         "q_logits": head(cfg, params, _at(normed, accepted))}
  return emitted, logps, accepted + 1, new
