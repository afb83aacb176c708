"""Logits to tokens: temperature, top-k and top-p (nucleus) truncation, greedy as temperature 0.

``sample_next`` draws one token per row (the plain decode step and every prefill); ``filtered_probs`` is the
distribution it draws from, as an array (what speculative decoding compares between the main model and the
draft). Every setting is a traced scalar: new settings never recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncation_cutoff(scaled, top_p, top_k):
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


def _truncated(logits, temperature, top_p, top_k):
  """(tempered logits [b, V], the same with the tokens top-k / top-p drop at -inf)."""
  scaled = logits / jnp.where(temperature <= 0, 1.0, temperature)
  truncate = (top_k > 0) | (top_p < 1.0)
  cutoff = jax.lax.cond(truncate, lambda: truncation_cutoff(scaled, top_p, top_k),
                        lambda: jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype))
  return scaled, jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)


def sample_next(logits, key, temperature, top_p, top_k):
  """Float32 logits [b, V] -> (token [b] int32, its log-prob [b] float32 under log_softmax(logits / T)).

  ``temperature`` <= 0 is greedy (argmax; log-probs at T = 1). Otherwise softmax sampling at ``temperature``
  among the tokens top-k (``top_k`` > 0) and then top-p (``top_p`` < 1) keep; all settings are traced scalars."""
  token = draw(key, lambda: _truncated(logits, temperature, top_p, top_k)[1], logits, temperature)
  return token, token_logp(logits, token, temperature)


def draw(key, log_weights, logits, temperature):
  """One token per row: the argmax of ``logits`` [b, V] when greedy (``temperature`` <= 0), else a categorical
  draw from ``log_weights()`` [b, V] (unnormalised log-probabilities, computed only when sampling). Greedy
  decoding skips the random numbers (a [b, V] Gumbel draw costs more than a tiny model's decode step on a CPU)."""
  return jax.lax.cond(temperature <= 0, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                      lambda: jax.random.categorical(key, log_weights(), axis=-1).astype(jnp.int32))


def token_logp(logits, token, temperature):
  """log_softmax(logits / T)[token] in float32 (T = 1 when greedy): the log-prob the sampler reports, taken
  before any truncation. ``logits`` [..., V], ``token`` [...]."""
  scaled = logits / jnp.where(temperature <= 0, 1.0, temperature)
  logp = jax.nn.log_softmax(scaled.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]


def filtered_probs(logits, temperature, top_p, top_k):
  """The distribution ``sample_next`` draws from, [b, V] float32: softmax of the tempered logits over the tokens
  top-k / top-p keep; one-hot at the argmax when greedy (``temperature`` <= 0)."""
  return jax.lax.cond(
      temperature <= 0, lambda: jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32),
      lambda: jax.nn.softmax(_truncated(logits, temperature, top_p, top_k)[1].astype(jnp.float32), axis=-1))
