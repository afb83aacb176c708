"""Per-token log-probs and entropies of sampled rollouts under a policy (the RL losses' inputs).

A rollout row (``joyjax.batch.ROLLOUT_KEYS``) is a left-padded prompt and its response; the logit at slot j
predicts token j + 1, so the log-prob of token j comes from slot j - 1. Results are aligned with the tokens
(``[rows, seq]``, 0 where ``response_mask`` is 0), as the sampler's log-probs are, so the two compare slot by slot.

Log-probs are taken at the sampling temperature (``log_softmax(logits / temperature)``): the distribution the
sampler drew from before any top-p / top-k truncation, so the importance ratio against the sampling policy is
1 when the weights have not moved. Computed ``train.loss_chunk`` tokens at a time
(``losses.head.chunked_token_logps``, as DPO's sequence log-probs are), so a 129K vocabulary never materialises as
[rows, seq, vocab]; the entropy (a metric) has no gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

from joyjax import model
from joyjax.losses.head import chunk_tokens, chunked_token_logps


def rollout_logps(cfg, params, batch, *, temperature: float):
  """(logp, entropy, aux) of a rollout batch under ``params``: logp and entropy float32 [rows, seq] aligned with
  the tokens (0 off the response), aux the model's statistics (``model.aux_summary`` reads them)."""
  tokens = batch["tokens"]
  hidden, _, aux, _ = model.forward_hidden(cfg, params, tokens, positions=batch["positions"],
                                           segment_ids=batch["segment_ids"], with_mtp=False)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = batch["response_mask"]
  live = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) > 0
  lp, ent = chunked_token_logps(hidden, model.head_weights(cfg, params), targets, live,
                                chunk=chunk_tokens(cfg), temperature=temperature, entropy=True)
  shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731
  return shift(lp), shift(ent), aux
