"""Per-token log-probs and entropies of sampled rollouts under a policy (the RL losses' inputs).

A rollout row (``joyjax.batch.ROLLOUT_KEYS``) is a left-padded prompt and its response; the logit at slot j
predicts token j + 1, so the log-prob of token j comes from slot j - 1. Results are aligned with the tokens
(``[rows, seq]``, 0 where ``response_mask`` is 0), as the sampler's log-probs are, so the two compare slot by slot.

Log-probs are taken at the sampling temperature (``log_softmax(logits / temperature)``): the distribution the
sampler drew from before any top-p / top-k truncation, so the importance ratio against the sampling policy is
1 when the weights have not moved. Computed ``train.loss_chunk`` tokens at a time under ``jax.checkpoint`` (as
``losses.lm`` does), so a 129K vocabulary never materialises as [rows, seq, vocab]; the entropy (a metric) has
no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.losses.lm import token_chunks


def chunked_logps_entropy(hidden, head_w, targets, live, *, chunk: int, temperature: float):
  """(log p(target), entropy) per token, float32 [b, s] each, at ``temperature``, ``chunk`` tokens at a time.
  Tokens that are not live are exactly 0 (their hidden is zeroed before the head)."""
  b, s, _ = hidden.shape
  h, t, m = token_chunks(hidden, targets, live, chunk)
  head_w = head_w.astype(hidden.dtype)
  inv_t = 1.0 / float(temperature)

  @jax.checkpoint
  def one(hc, tc, mc):
    hc = jnp.where(mc[:, None], hc, jnp.zeros((), hc.dtype))
    logits = jnp.einsum("ne,ev->nv", hc, head_w, preferred_element_type=jnp.float32) * inv_t
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    sg = jax.lax.stop_gradient(logits)
    ent = jax.lax.stop_gradient(lse) - jnp.sum(jax.nn.softmax(sg, axis=-1) * sg, axis=-1)
    return jnp.where(mc, tgt - lse, 0.0), jnp.where(mc, ent, 0.0)

  _, (lp, ent) = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (h, t, m))
  return lp.reshape(-1)[:b * s].reshape(b, s), ent.reshape(-1)[:b * s].reshape(b, s)


def rollout_logps(cfg, params, batch, *, temperature: float):
  """(logp, entropy, aux) of a rollout batch under ``params``: logp and entropy float32 [rows, seq] aligned with
  the tokens (0 off the response), aux the model's statistics (``model.aux_summary`` reads them)."""
  tokens = batch["tokens"]
  hidden, _, aux, _ = model.forward_hidden(cfg, params, tokens, positions=batch["positions"],
                                           segment_ids=batch["segment_ids"], with_mtp=False)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = batch["response_mask"]
  live = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) > 0
  lp, ent = chunked_logps_entropy(hidden, model.head_weights(cfg, params), targets, live,
                                  chunk=cfg.train.loss_chunk, temperature=temperature)
  shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731
  return shift(lp), shift(ent), aux
