"""Language-model pretraining loss: next-token cross-entropy (+ z-loss) + MTP + sequence-wise balance loss.

The cross-entropy is computed ``train.loss_chunk`` tokens per device at a time, with a hand-written gradient in
the compute dtype (``losses.head.chunked_cross_entropy``): one chunk's float32 logits exist at a time.

Normalisation is by *denominators passed in* (token counts of the whole optimizer batch), not by the
micro-batch's own counts: the loss of k micro-batches then sums to exactly the loss of the large batch, which
is what makes gradient accumulation equal one large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.losses.head import chunk_tokens, chunked_cross_entropy


def mtp_weights(batch, depth: int):
  """Weights of MTP module ``depth`` (0-based): position i predicts ``targets[i + depth + 1]``, valid when that
  target is a real next token of the same document as position i."""
  mask = batch["loss_mask"].astype(jnp.float32)
  seg = batch["segment_ids"]
  k = depth + 1
  s = mask.shape[1]
  if k >= s:
    return jnp.zeros_like(mask)
  shifted_mask = jnp.pad(mask[:, k:], ((0, 0), (0, k)))
  same = jnp.pad(seg[:, k:], ((0, 0), (0, k))) == seg
  return shifted_mask * same * (seg != 0)


def mtp_targets(batch, depth: int):
  k = depth + 1
  return jnp.pad(batch["targets"][:, k:], ((0, 0), (0, k)))


def denominators(cfg, batch) -> dict:
  """Normalisers of the loss terms over a whole (optimizer) batch: tokens, MTP tokens per depth, sequences."""
  out = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0),
         "sequences": jnp.asarray(batch["inputs"].shape[0], jnp.float32)}
  n_mtp = cfg.model.mtp.num_layers if cfg.train.mtp_loss_weight > 0 else 0
  out["mtp_tokens"] = jnp.stack([jnp.maximum(jnp.sum(mtp_weights(batch, d)), 1.0) for d in range(n_mtp)]) \
      if n_mtp else jnp.zeros((0,), jnp.float32)
  return out


def lm_loss(cfg, params, batch, denom):
  """The pretraining loss of ``batch`` (keys inputs, targets, segment_ids, positions, loss_mask) normalised by
  ``denom`` (from ``denominators`` of the full optimizer batch). Returns (loss, aux) where aux holds the
  summed statistics (for metrics) and per-layer expert token counts (``model.aux_summary``: by stack for the
  router-bias update, the decoder's for load metrics)."""
  t = cfg.train
  use_mtp = cfg.model.mtp.num_layers > 0 and t.mtp_loss_weight > 0
  hidden, mtp_hidden, aux, _ = model.forward_hidden(
      cfg, params, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
      with_mtp=use_mtp)
  head_w = model.head_weights(cfg, params)
  mask = batch["loss_mask"].astype(jnp.float32)
  chunk = chunk_tokens(cfg)
  main, stats = chunked_cross_entropy(hidden, head_w, batch["targets"], mask, chunk=chunk,
                                      z_weight=t.z_loss)
  loss = main / denom["tokens"]
  stats["tokens"] = jnp.sum(mask)
  if use_mtp:
    mtp_total = 0.0
    for d, h in enumerate(mtp_hidden):
      mce, _ = chunked_cross_entropy(h, head_w, mtp_targets(batch, d), mtp_weights(batch, d), chunk=chunk)
      stats[f"mtp{d}_ce_sum"] = jax.lax.stop_gradient(mce)
      mtp_total = mtp_total + mce / denom["mtp_tokens"][d]
    # DeepSeek-V3: the MTP loss is the mean over depths, times its weight.
    loss = loss + t.mtp_loss_weight * mtp_total / len(mtp_hidden)
  moe = model.aux_summary(aux)
  balance = moe["balance"]  # summed over MoE layers; each is a mean over sequences
  if t.balance_loss_alpha > 0:
    # Weighted by this micro-batch's share of sequences so micro-batches sum to the large batch's mean.
    share = batch["inputs"].shape[0] / denom["sequences"]
    loss = loss + t.balance_loss_alpha * balance * share
  stats["balance_sum"] = balance * batch["inputs"].shape[0]
  stats["dropped_tokens"] = moe["dropped_tokens"]
  stats["expert_counts"] = moe["expert_counts"]  # {stack: [layers, E]}: the router-bias update's input
  stats["layer_counts"] = moe["layer_counts"]    # the decoder's [moe layers, E], for load metrics
  return loss, stats
