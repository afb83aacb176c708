"""Blockwise (flash-style) causal attention over packed sequences, in pure JAX, with a custom VJP.

The einsum path (``model.attention_impl = "xla"``) materialises [batch, heads, seq, seq] float32 scores and
probabilities, which dominates activation memory from a few thousand tokens on (``joyjax plan`` shows it).
Here queries and keys are cut into blocks; the forward keeps a running max / sum / output per query block
(online softmax) and saves only the output and the log-sum-exp per query; the backward recomputes each block's
probabilities from them. Memory is O(seq x block) instead of O(seq^2), on every platform, and the numbers are
those of the einsum path up to float32 rounding. Blocks entirely above the causal diagonal are skipped.

Masking: query i attends to key j iff j <= i (sequence index) and segment_ids equal. Sequences are padded to
a block multiple with segment id -1 (padded keys never match a real query; padded query rows are dropped).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite (attention.py uses it too): a fully masked row never produces NaN


def blockwise_attention(q, k, v, segment_ids, *, scale: float, block_q: int = 512, block_k: int = 512):
  """q, k: [b, s, h, dk]; v: [b, s, h, dv]; segment_ids: [b, s] int (>= 0). Returns [b, s, h, dv] in v.dtype:
  ``softmax(q k^T * scale, masked causally within segments) v``, accumulated in float32."""
  b, s, h, _ = q.shape
  bq, bk = min(block_q, s), min(block_k, s)
  pad = -s % math.lcm(bq, bk)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  out = _attention(q, k, v, segment_ids.astype(jnp.int32), float(scale), bq, bk)
  return out[:, :s]


def _block(x, i, size):
  """Rows [i * size, (i + 1) * size) of axis 1."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _scores(q_blk, k_blk, seg_q, seg_k, qi, kj, bq, bk, scale):
  """Masked scaled scores [b, h, bq, bk] (float32) and the mask [b, 1, bq, bk]."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  rows = qi * bq + jnp.arange(bq)
  cols = kj * bk + jnp.arange(bk)
  mask = (cols[None, :] <= rows[:, None])[None, None] & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
  return jnp.where(mask, s, NEG_INF), mask


def _visible(qi, kj, bq, bk):
  """Whether block (qi, kj) has any key at or below the causal diagonal."""
  return kj * bk <= qi * bq + bq - 1


def _forward(q, k, v, seg, scale, bq, bk):
  b, s, h, _ = q.shape
  dv = v.shape[-1]
  nq, nk = s // bq, s // bk

  def one_query_block(qi):
    q_blk, seg_q = _block(q, qi, bq), _block(seg, qi, bq)

    def kv_step(carry, kj):
      m, l, acc = carry

      def update(carry):
        m, l, acc = carry
        sc, mask = _scores(q_blk, _block(k, kj, bk), seg_q, _block(seg, kj, bk), qi, kj, bq, bk, scale)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), _block(v, kj, bk),
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

      return jax.lax.cond(_visible(qi, kj, bq, bk), update, lambda c: c, carry), None

    init = (jnp.full((b, h, bq), NEG_INF, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, dv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(nk))
    l_safe = jnp.where(l > 0, l, 1.0)  # only padded rows see no key at all
    out = acc / l_safe[..., None]
    lse = m + jnp.log(l_safe)
    return jnp.swapaxes(out, 1, 2), lse  # [b, bq, h, dv], [b, h, bq]

  outs, lses = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, b, bq, h, dv], [nq, b, h, bq]
  out = jnp.moveaxis(outs, 0, 1).reshape(b, s, h, dv)
  lse = jnp.moveaxis(lses, 0, 2).reshape(b, h, s)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, scale, bq, bk):
  return _forward(q, k, v, seg, scale, bq, bk)[0].astype(v.dtype)


def _attention_fwd(q, k, v, seg, scale, bq, bk):
  out, lse = _forward(q, k, v, seg, scale, bq, bk)
  out = out.astype(v.dtype)
  return out, (q, k, v, seg, out, lse)


def _attention_bwd(scale, bq, bk, res, d_out):
  """FlashAttention-2's backward: per block pair, the probabilities from the saved log-sum-exp, then dV, dP,
  dS, dK and dQ. Its four matmuls take operands in the compute dtype (P, dS and dO rounded to it, as the
  forward rounds P for P @ V) and accumulate in float32: with float32 operands they ran off the bf16 tensor-core
  / MXU path. The softmax algebra (P, dS, rowsum(dO * O)) stays float32."""
  q, k, v, seg, out, lse = res
  b, s, h, dk = q.shape
  nq, nk = s // bq, s // bk
  dt = q.dtype
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(f32), out.astype(f32))  # rowsum(dO * O)
  d_out = d_out.astype(dt)

  def one_key_block(dq, kj):
    k_blk, v_blk, seg_k = _block(k, kj, bk), _block(v, kj, bk), _block(seg, kj, bk)

    def q_step(carry, qi):
      dk_j, dv_j, dq = carry

      def update(carry):
        dk_j, dv_j, dq = carry
        q_blk, do_blk = _block(q, qi, bq), _block(d_out, qi, bq)
        sc, mask = _scores(q_blk, k_blk, _block(seg, qi, bq), seg_k, qi, kj, bq, bk, scale)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, qi * bq, bq, axis=2)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, qi * bq, bq, axis=2)
        p = jnp.where(mask, jnp.exp(sc - lse_i[..., None]), 0.0)                   # [b, h, bq, bk]
        dv_j = dv_j + jnp.einsum("bhqk,bqhd->bkhd", p.astype(dt), do_blk, preferred_element_type=f32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk.astype(dt), preferred_element_type=f32)
        ds = (p * (dp - delta_i[..., None]) * scale).astype(dt)
        dk_j = dk_j + jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk, preferred_element_type=f32)
        dq_i = _block(dq, qi, bq) + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk.astype(dt), preferred_element_type=f32)
        return dk_j, dv_j, jax.lax.dynamic_update_slice_in_dim(dq, dq_i, qi * bq, axis=1)

      return jax.lax.cond(_visible(qi, kj, bq, bk), update, lambda c: c, carry), None

    init = (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32), dq)
    (dk_j, dv_j, dq), _ = jax.lax.scan(q_step, init, jnp.arange(nq))
    return dq, (dk_j, dv_j)

  dq, (dks, dvs) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dks, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dvs, 0, 1).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
