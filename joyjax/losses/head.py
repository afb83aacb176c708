"""Losses over the vocabulary head, ``chunk`` tokens at a time, with their backward passes written by hand.

Only one chunk's float32 logits ([chunk, vocab]) exist at a time, forward and backward, so a 129K vocabulary never
materialises as [batch, seq, vocab].

Why the backward is hand-written: autodiff of ``einsum(hidden, head, preferred_element_type=float32)`` hands the
two backward matmuls (d hidden = d logits @ head^T, d head = hidden^T @ d logits: two thirds of the head's FLOPs)
the float32 cotangent of the logits, so they ran with float32 operands: off the bf16 tensor-core path, with twice
the memory traffic. Here d logits is formed in float32 and rounded to the compute dtype before those matmuls,
which accumulate in float32 as the forward does. With float32 compute (the tests) nothing is rounded.

* ``chunked_cross_entropy`` (pretraining, SFT, MTP): its gradient is a fixed function of each chunk, so the
  differentiated forward computes it right away (the fused linear cross-entropy of Liger-Kernel): 3 matmuls per
  chunk instead of 4, as the logits are never recomputed. The residuals are d hidden (the size of hidden) and d
  head (float32 [hidden, vocab]); the backward only scales them by the incoming cotangent. Undifferentiated
  (evaluation) it runs the forward matmul alone.
* ``chunked_token_logps`` (DPO, RL): their losses are not linear in the log-probs, so the forward keeps each
  token's log-sum-exp and the backward recomputes one chunk's logits at a time: 4 matmuls, all in the compute
  dtype.

Tokens of weight 0 (not live) contribute exact zeros: their hidden is zeroed before the head (a ``where`` on the
loss alone would stop their value but not a nan in d head) and their d logits are zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from joyjax.axes import data_parallel_size, get_rules

F32 = jnp.float32


def token_chunks(hidden, targets, weights, chunk: int):
  """Splits ``[b, s, ...]`` tokens into chunks along the sequence for a scan over the vocabulary head, every row
  in every chunk: hidden [b, s, e] -> [nc, b * sc, e], targets -> int32 [nc, b * sc], weights -> [nc, b * sc],
  with nc = ceil(b * s / chunk) chunks of sc = ceil(s / nc) positions (so about ``chunk`` tokens each, at least
  one position per row); the sequence's tail is padded with weight-0 (or False) tokens.

  Why along the sequence: the rows are what data parallelism splits, so a chunk holding every row is computed by
  every device on its own rows. Chunks of flattened tokens put each chunk on the one or two devices holding its
  rows, and the scan's slice of a sharded dimension made every device gather and compute every chunk (on 8
  devices, half of the whole head per device instead of an eighth). ``chunk`` counts tokens over all devices
  (``chunk_tokens``: ``train.loss_chunk`` per device); each device holds its rows' share."""
  b, s, e = hidden.shape
  nc = -(-(b * s) // max(1, min(int(chunk), b * s)))
  sc = -(-s // nc)
  pad = nc * sc - s

  def split(x):
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    x = x.reshape((b, nc, sc) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0).reshape((nc, b * sc) + x.shape[3:])

  return split(hidden), split(targets.astype(jnp.int32)), split(weights)


def chunk_tokens(cfg) -> int:
  """Tokens per chunk over all devices: ``train.loss_chunk`` (tokens per chunk on each device) times the
  data-parallel size of the mesh the step is traced under (``jax.set_mesh``, as the training loop does; 1
  outside one), since every device computes its rows' share of each chunk (``token_chunks``)."""
  return int(cfg.train.loss_chunk) * data_parallel_size(jax.sharding.get_abstract_mesh(), get_rules(cfg))


def from_chunks(x, b: int, s: int):
  """The inverse of ``token_chunks`` for a per-token value: [nc, b * sc] -> [b, s]."""
  nc = x.shape[0]
  return jnp.moveaxis(x.reshape(nc, b, -1), 0, 1).reshape(b, -1)[:, :s]


def _logits(hc, head, live, scale: float):
  """One chunk's (hidden with dead rows zeroed, float32 logits at ``scale`` = 1 / temperature)."""
  hc = jnp.where(live[:, None], hc, jnp.zeros((), hc.dtype))
  logits = jnp.einsum("ne,ev->nv", hc, head, preferred_element_type=F32)
  return hc, (logits if scale == 1.0 else logits * scale)


def _softmax_stats(hc, head, tc, live, scale: float):
  """One chunk's (zeroed hidden, float32 logits, log-sum-exp, target logit, row max); see ``_logits``."""
  hc, logits = _logits(hc, head, live, scale)
  top = jnp.max(logits, axis=-1)
  safe = jnp.where(jnp.isfinite(top), top, 0.0)
  lse = safe + jnp.log(jnp.sum(jnp.exp(logits - safe[:, None]), axis=-1))
  tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
  return hc, logits, lse, tgt, top


def _one_hot(tc, vocab: int):
  return jax.lax.broadcasted_iota(jnp.int32, (tc.shape[0], vocab), 1) == tc[:, None]


def _backprop(hc, head, dlogits):
  """(d hidden in hc's dtype, d head float32) of one chunk from its float32 d logits, rounded to the compute
  dtype so that both matmuls take the tensor-core path; they accumulate in float32."""
  d = dlogits.astype(hc.dtype)
  dh = jnp.einsum("nv,ev->ne", d, head, preferred_element_type=F32).astype(hc.dtype)
  dw = jnp.einsum("ne,nv->ev", hc, d, preferred_element_type=F32)
  return dh, dw


# ------------------------------------------------------------------------------------------- cross-entropy


def chunked_cross_entropy(hidden, head_w, targets, weights, *, chunk: int, z_weight: float = 0.0):
  """The weighted cross-entropy of the head's next-token predictions, and its statistics.

  hidden: [b, s, e] (compute dtype); head_w: [e, vocab] (any float dtype; cast to hidden's); targets: [b, s]
  int; weights: [b, s] float. Returns ``(loss_sum, stats)``:
    - ``loss_sum`` = sum_t w_t * (lse_t - logit_t[target] + z_weight * lse_t^2), float32, differentiable in
      ``hidden`` and ``head_w`` (not in ``targets`` / ``weights``);
    - ``stats``: ``ce_sum`` (the cross-entropy part), ``z_sum`` (sum of w * lse^2) and ``correct_sum`` (weight
      of tokens whose target has the top logit), float32 scalars that carry no gradient.
  """
  h, t, w = token_chunks(hidden, targets, weights.astype(F32), chunk)
  loss, ce, z, correct = _cross_entropy(h, head_w, t, w, float(z_weight))
  return loss, {"ce_sum": jax.lax.stop_gradient(ce), "z_sum": jax.lax.stop_gradient(z),
                "correct_sum": jax.lax.stop_gradient(correct)}


def _cross_entropy_scan(h, head_w, t, w, z_weight: float, grads: bool):
  """(loss, ce, z, correct) sums over the chunks, and with ``grads`` (d h, d head_w) of ``loss``."""
  head = head_w.astype(h.dtype)
  vocab = head.shape[-1]

  def body(carry, xs):
    sums, dw = carry
    hc, tc, wc = xs
    live = wc != 0
    hc, logits, lse, tgt, top = _softmax_stats(hc, head, tc, live, 1.0)
    ce = jnp.where(live, (lse - tgt) * wc, 0.0)
    z = jnp.where(live, jnp.square(lse) * wc, 0.0)
    # The target has the top logit (argmax's answer but for exact ties, which a float32 logit row almost never
    # has), read from the max the log-sum-exp needs anyway: no extra pass over [chunk, vocab].
    correct = jnp.where(live, (tgt >= top) * wc, 0.0)
    loss = ce + z_weight * z if z_weight else ce
    sums = tuple(a + jnp.sum(x) for a, x in zip(sums, (loss, ce, z, correct)))
    if not grads:
      return (sums, dw), None
    # d/dlogits of w * (lse - logit[t] + z_weight * lse^2) = w * (1 + 2 z_weight lse) * softmax - w * onehot(t)
    coef = jnp.where(live, wc * (1.0 + 2.0 * z_weight * lse), 0.0)
    p = jnp.exp(logits - lse[:, None])
    dlogits = p * coef[:, None] - jnp.where(_one_hot(tc, vocab), jnp.where(live, wc, 0.0)[:, None], 0.0)
    dh, dwc = _backprop(hc, head, dlogits)
    return (sums, dw + dwc), dh

  zero = jnp.zeros((), F32)
  dw0 = jnp.zeros(head.shape, F32) if grads else None
  (sums, dw), dh = jax.lax.scan(body, ((zero,) * 4, dw0), (h, t, w))
  return sums, (dh, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cross_entropy(h, head_w, t, w, z_weight: float):
  return _cross_entropy_scan(h, head_w, t, w, z_weight, grads=False)[0]


def _cross_entropy_fwd(h, head_w, t, w, z_weight: float):
  sums, (dh, dw) = _cross_entropy_scan(h, head_w, t, w, z_weight, grads=True)
  return sums, (dh, dw, jnp.zeros((), head_w.dtype))   # the empty array carries head_w's dtype to the backward


def _cross_entropy_bwd(z_weight: float, res, cts):
  del z_weight
  dh, dw, head_like = res
  g = cts[0]   # only the loss is differentiable; the statistics' cotangents are dropped (they are stop_gradient)
  return (dh.astype(F32) * g).astype(dh.dtype), (dw * g).astype(head_like.dtype), None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# ---------------------------------------------------------------------------------------- token log-probs


def chunked_token_logps(hidden, head_w, targets, live, *, chunk: int, temperature: float = 1.0,
                        entropy: bool = False):
  """log p(target) of every token, float32 [b, s], at ``temperature`` (``log_softmax(logits / temperature)``).
  With ``entropy``: (log-probs, each token's entropy), the entropy without gradient (a metric).

  hidden: [b, s, e] (compute dtype); head_w: [e, vocab]; targets: [b, s] int; live: [b, s] bool. Tokens that
  are not live are exactly 0 and take no gradient, whatever their hidden holds.
  """
  b, s, _ = hidden.shape
  h, t, m = token_chunks(hidden, targets, live, chunk)
  lp, ent = _token_logps(h, head_w, t, m, 1.0 / float(temperature), bool(entropy))
  lp = from_chunks(lp, b, s)
  if not entropy:
    return lp
  return lp, jax.lax.stop_gradient(from_chunks(ent, b, s))


def _token_logps_scan(h, head_w, t, m, scale: float, entropy: bool):
  """Per-chunk (log-probs, entropies or zeros, log-sum-exps), each [nc, chunk] float32."""
  head = head_w.astype(h.dtype)

  def body(_, xs):
    hc, tc, mc = xs
    _, logits, lse, tgt, _ = _softmax_stats(hc, head, tc, mc, scale)
    lp = jnp.where(mc, tgt - lse, 0.0)
    ent = jnp.zeros_like(lp)
    if entropy:
      ent = jnp.where(mc, lse - jnp.sum(jnp.exp(logits - lse[:, None]) * logits, axis=-1), 0.0)
    return None, (lp, ent, lse)

  return jax.lax.scan(body, None, (h, t, m))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _token_logps(h, head_w, t, m, scale: float, entropy: bool):
  return _token_logps_scan(h, head_w, t, m, scale, entropy)[:2]


def _token_logps_fwd(h, head_w, t, m, scale: float, entropy: bool):
  lp, ent, lse = _token_logps_scan(h, head_w, t, m, scale, entropy)
  return (lp, ent), (h, head_w, t, m, lse)


def _token_logps_bwd(scale: float, entropy: bool, res, cts):
  del entropy
  h, head_w, t, m, lse = res
  g = cts[0]    # the entropy is a metric: its cotangent is dropped
  head = head_w.astype(h.dtype)
  vocab = head.shape[-1]

  def body(dw, xs):
    hc, tc, mc, lc, gc = xs
    hc, logits = _logits(hc, head, mc, scale)
    # d/dlogits of scale * (logit[t] - lse) * g = scale * g * (onehot(t) - softmax)
    gc = jnp.where(mc, gc, 0.0) * scale
    dlogits = jnp.where(_one_hot(tc, vocab), gc[:, None], 0.0) - jnp.exp(logits - lc[:, None]) * gc[:, None]
    dh, dwc = _backprop(hc, head, dlogits)
    return dw + dwc, dh

  dw, dh = jax.lax.scan(body, jnp.zeros(head.shape, F32), (h, t, m, lse, g))
  return dh, dw.astype(head_w.dtype), None, None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)
