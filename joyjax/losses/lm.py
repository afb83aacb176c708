"""Language-model pretraining loss: next-token cross-entropy (+ z-loss) + MTP + sequence-wise balance loss.

The cross-entropy is computed in chunks of ``train.loss_chunk`` tokens under ``jax.checkpoint``: the logits of
one chunk ([chunk, vocab], float32) exist at a time, forward and backward, so a 129K vocabulary never
materialises as [batch, seq, vocab].

Normalisation is by *denominators passed in* (token counts of the whole optimizer batch), not by the
micro-batch's own counts: the loss of k micro-batches then sums to exactly the loss of the large batch, which
is what makes gradient accumulation equal one large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model


def token_chunks(hidden, targets, weights, chunk: int):
  """Flattens ``[b, s, ...]`` tokens into chunks for a scan over the vocabulary head: hidden [b, s, e] ->
  [nc, chunk, e], targets -> int32 [nc, chunk], weights -> [nc, chunk]; the tail is padded with weight-0 (or
  False) tokens. ``chunk`` is clipped to [1, b * s]."""
  e = hidden.shape[-1]
  h = hidden.reshape(-1, e)
  t = targets.reshape(-1).astype(jnp.int32)
  w = weights.reshape(-1)
  n = h.shape[0]
  chunk = max(1, min(int(chunk), n))
  pad = (-n) % chunk
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad))
    w = jnp.pad(w, (0, pad))
  nc = h.shape[0] // chunk
  return h.reshape(nc, chunk, e), t.reshape(nc, chunk), w.reshape(nc, chunk)


def chunked_token_logps(hidden, head_w, targets, live, *, chunk: int, temperature: float = 1.0,
                        entropy: bool = False):
  """log p(target) of every token, float32 [b, s], computed ``chunk`` tokens at a time under ``jax.checkpoint``
  (one chunk's [chunk, vocab] float32 logits at a time, forward and backward), at ``temperature``
  (``log_softmax(logits / temperature)``). With ``entropy``: (log-probs, each token's entropy), the entropy
  without gradient (a metric).

  hidden: [b, s, e] (compute dtype); head_w: [e, vocab]; targets: [b, s] int; live: [b, s] bool. Tokens that
  are not live are exactly 0, and their hidden is zeroed before the head (so a non-finite value there cannot
  reach the gradient of ``head_w``; live tokens are untouched), as in ``chunked_cross_entropy``.
  """
  b, s, _ = hidden.shape
  h, t, m = token_chunks(hidden, targets, live, chunk)
  head_w = head_w.astype(hidden.dtype)
  scale = None if temperature == 1.0 else 1.0 / float(temperature)

  @jax.checkpoint
  def one(hc, tc, mc):
    hc = jnp.where(mc[:, None], hc, jnp.zeros((), hc.dtype))
    logits = jnp.einsum("ne,ev->nv", hc, head_w, preferred_element_type=jnp.float32)
    if scale is not None:
      logits = logits * scale
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    lp = jnp.where(mc, tgt - lse, 0.0)
    if not entropy:
      return (lp,)
    sg = jax.lax.stop_gradient(logits)
    ent = jax.lax.stop_gradient(lse) - jnp.sum(jax.nn.softmax(sg, axis=-1) * sg, axis=-1)
    return lp, jnp.where(mc, ent, 0.0)

  _, outs = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (h, t, m))
  outs = tuple(o.reshape(-1)[:b * s].reshape(b, s) for o in outs)
  return outs if entropy else outs[0]


def chunked_cross_entropy(hidden, head_w, targets, weights, *, chunk: int):
  """Sums over tokens of cross-entropy, log(Z)^2 and correct top-1 predictions, weighted by ``weights``.

  hidden: [b, s, e] (compute dtype); head_w: [e, vocab]; targets: [b, s] int; weights: [b, s] float.
  Returns (ce_sum, z_sum, correct_sum), float32 scalars. Weight-0 tokens contribute exactly nothing (their
  terms are selected away, so a non-finite logit there cannot leak into the sums or the gradient).
  """
  h, t, w = token_chunks(hidden, targets, weights.astype(jnp.float32), chunk)
  head_w = head_w.astype(hidden.dtype)

  @jax.checkpoint
  def one(hc, tc, wc):
    live = wc != 0
    # Zero the hidden of weight-0 tokens before the head: a `where` on the loss alone stops their value but not
    # their gradient (0 * a non-finite softmax is nan in d/dhead_w). Live rows are untouched, bit for bit.
    hc = jnp.where(live[:, None], hc, jnp.zeros((), hc.dtype))
    logits = jnp.einsum("ne,ev->nv", hc, head_w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    ce = jnp.where(live, (lse - tgt) * wc, 0.0)
    z = jnp.where(live, jnp.square(lse) * wc, 0.0)
    correct = jnp.where(live, (jnp.argmax(logits, axis=-1) == tc) * wc, 0.0)
    return jnp.sum(ce), jnp.sum(z), jnp.sum(correct)

  def body(acc, xs):
    out = one(*xs)
    return tuple(a + o for a, o in zip(acc, out)), None

  zero = jnp.zeros((), jnp.float32)
  (ce, z, correct), _ = jax.lax.scan(body, (zero, zero, zero), (h, t, w))
  return ce, z, jax.lax.stop_gradient(correct)


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
  ce, z, correct = chunked_cross_entropy(hidden, head_w, batch["targets"], mask, chunk=t.loss_chunk)
  loss = ce / denom["tokens"]
  stats = {"ce_sum": ce, "z_sum": z, "correct_sum": correct, "tokens": jnp.sum(mask)}
  if t.z_loss > 0:
    loss = loss + t.z_loss * z / denom["tokens"]
  if use_mtp:
    mtp_total = 0.0
    for d, h in enumerate(mtp_hidden):
      mce, _, _ = chunked_cross_entropy(h, head_w, mtp_targets(batch, d), mtp_weights(batch, d),
                                        chunk=t.loss_chunk)
      stats[f"mtp{d}_ce_sum"] = mce
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
