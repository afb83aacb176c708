"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3).

q = W_qb(norm(W_qa x)) (or a full-rank W_q); the keys and values come from a compressed latent
c = norm(W_kva x)[:kv_lora] shared by all heads, plus one shared rotary key part k_rope. Training expands c into
per-head keys and values; decoding keeps only (c, k_rope) in the cache and absorbs W_kvb into the query and the
output ("absorbed" attention), which is the same function with far smaller memory per cached token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from joyjax.model import adapters
from joyjax.model.blockwise import NEG_INF, blockwise_attention
from joyjax.model.fused_attention import mla_dot_product_attention, packed_segments, resolve_attention_impl
from joyjax.model.layers import RMSNorm, apply_rope, param, rope_frequencies, softmax_scale


class MLA(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    a = cfg.attention
    h, std = cfg.hidden_size, cfg.init_std
    self.num_heads = a.num_heads
    self.nope, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    self.kv_lora = a.kv_lora_rank
    self.q_lora = a.q_lora_rank
    self.dtype = dtype
    qk = self.nope + self.rope_dim
    if self.q_lora:
      self.q_a = param(rngs, (h, self.q_lora), ("embed", "q_lora"), std=std, dtype=param_dtype, inputs=("embed",),
                       group="attention")
      self.q_a_norm = RMSNorm(self.q_lora, cfg.rms_norm_eps, "q_lora", param_dtype=param_dtype)
      self.q_b = param(rngs, (self.q_lora, a.num_heads, qk), ("q_lora", "heads", "head_dim"), std=std,
                       dtype=param_dtype, inputs=("q_lora",), group="attention")
    else:
      self.q = param(rngs, (h, a.num_heads, qk), ("embed", "heads", "head_dim"), std=std, dtype=param_dtype,
                     inputs=("embed",), group="attention")
    self.kv_a = param(rngs, (h, self.kv_lora + self.rope_dim), ("embed", "kv_lora"), std=std, dtype=param_dtype,
                      inputs=("embed",), group="attention")
    self.kv_a_norm = RMSNorm(self.kv_lora, cfg.rms_norm_eps, "kv_lora", param_dtype=param_dtype)
    self.kv_b = param(rngs, (self.kv_lora, a.num_heads, self.nope + self.v_dim), ("kv_lora", "heads", "head_dim"),
                      std=std, dtype=param_dtype, inputs=("kv_lora",), group="attention")
    self.o = param(rngs, (a.num_heads, self.v_dim, h), ("heads", "head_dim", "embed"), std=std, dtype=param_dtype,
                   inputs=("heads", "head_dim"), group="attention")
    lora = adapters.settings(cfg)
    if lora and lora.on("attention"):
      for name in ("q_a", "q_b", "kv_a", "kv_b", "o") if self.q_lora else ("q", "kv_a", "kv_b", "o"):
        adapters.add_adapter(self, name, lora, rngs)
    inv_freq, self.rope_factor = rope_frequencies(cfg.rope, self.rope_dim)
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static: part of the graph definition
    self.interleave = bool(cfg.rope.interleave)
    self.scale = softmax_scale(a, cfg.rope)
    self.impl = cfg.attention_impl
    self.block = int(cfg.attention_block)
    self.max_segments = int(cfg.attention_max_segments)

  def _w(self, p):
    return p[...].astype(self.dtype)

  def _lora(self, name, x, y):
    return adapters.apply(self, name, x, y, self.dtype)

  def _project(self, x, positions):
    """Queries (nope, rotated rope parts), the normed latent c and the rotated shared key part."""
    if self.q_lora:
      q = self.q_a_norm(self._lora("q_a", x, x @ self._w(self.q_a)))
      q = self._lora("q_b", q, jnp.einsum("bsr,rhd->bshd", q, self._w(self.q_b)))
    else:
      q = self._lora("q", x, jnp.einsum("bse,ehd->bshd", x, self._w(self.q)))
    q_nope, q_rope = q[..., :self.nope], q[..., self.nope:]
    inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
    q_rope = apply_rope(q_rope, positions, inv_freq, self.rope_factor, self.interleave)
    kv = self._lora("kv_a", x, x @ self._w(self.kv_a))
    c = self.kv_a_norm(kv[..., :self.kv_lora])
    k_rope = apply_rope(kv[..., self.kv_lora:], positions, inv_freq, self.rope_factor, self.interleave)
    return q_nope, q_rope, c, k_rope

  def __call__(self, x, positions, segment_ids, cache=None):
    """x: [b, s, embed]. Without a cache: causal attention within segments. With a cache (dict with
    ``c`` [b, T, kv_lora], ``k_rope`` [b, T, rope], ``index`` [b] (or a scalar), ``start`` [b]): writes this chunk
    at each row's ``index`` and attends to every cached slot <= its own and >= its row's ``start`` (the first valid
    slot of a left-padded row; zeros from ``init_cache``). Returns (out [b, s, embed], new cache or None)."""
    q_nope, q_rope, c, k_rope = self._project(x, positions)
    if cache is None:
      return self._expanded(q_nope, q_rope, c, k_rope, segment_ids), None
    return self._absorbed(q_nope, q_rope, c, k_rope, cache)

  def _expanded(self, q_nope, q_rope, c, k_rope, segment_ids):
    kv = self._lora("kv_b", c, jnp.einsum("bsc,chd->bshd", c, self._w(self.kv_b)))
    k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
    impl = resolve_attention_impl(self.impl, self.nope + self.rope_dim, jnp.dtype(self.dtype).name)
    if impl in ("blockwise", "cudnn"):
      q = jnp.concatenate([q_nope, q_rope], axis=-1)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])],
                          axis=-1)
      if impl == "cudnn":  # cuDNN flash attention (model/fused_attention.py)
        out = mla_dot_product_attention(q, k, v, segment_ids, scale=self.scale, implementation="cudnn",
                                        max_segments=packed_segments(self.max_segments))
      else:
        out = blockwise_attention(q, k, v, segment_ids, scale=self.scale, block_q=self.block, block_k=self.block)
      return self._lora("o", out, jnp.einsum("bqhd,hde->bqe", out, self._w(self.o)))
    scores = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope, preferred_element_type=jnp.float32))
    s = scores.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = (causal[None] & same_doc)[:, None]
    probs = jax.nn.softmax(jnp.where(mask, scores * self.scale, NEG_INF), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    return self._lora("o", out, jnp.einsum("bqhd,hde->bqe", out, self._w(self.o)))

  def _absorbed(self, q_nope, q_rope, c, k_rope, cache):
    b, s = c.shape[:2]
    idx = jnp.broadcast_to(cache["index"], (b,)).astype(jnp.int32)  # per row: rows advance independently
    c_all = _write_rows(cache["c"], c.astype(cache["c"].dtype), idx)
    kr_all = _write_rows(cache["k_rope"], k_rope.astype(cache["k_rope"].dtype), idx)
    w_kb = adapters.merged_weight(self, "kv_b", self.dtype)  # absorbed: the adapter folded into the weight
    w_uk, w_uv = w_kb[..., :self.nope], w_kb[..., self.nope:]
    q_lat = jnp.einsum("bshd,chd->bshc", q_nope, w_uk)  # queries moved into the latent space
    scores = (jnp.einsum("bshc,btc->bhst", q_lat, c_all.astype(self.dtype), preferred_element_type=jnp.float32)
              + jnp.einsum("bshd,btd->bhst", q_rope, kr_all.astype(self.dtype), preferred_element_type=jnp.float32))
    t = scores.shape[-1]
    q_pos = idx[:, None] + jnp.arange(s)  # [b, s]: each query's own slot
    start = cache["start"]  # [b]: slots before a row's start are its left padding
    slot = jnp.arange(t)
    # causal per row: slots past a query's own (stale entries of a rolled-back row included) are masked
    mask = (slot[None, None, :] <= q_pos[:, :, None]) & (slot[None, None, :] >= start[:, None, None])  # [b,s,t]
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores * self.scale, NEG_INF), axis=-1)
    out_lat = jnp.einsum("bhst,btc->bshc", probs.astype(self.dtype), c_all.astype(self.dtype))
    out = jnp.einsum("bshc,chd->bshd", out_lat, w_uv)
    out = self._lora("o", out, jnp.einsum("bshd,hde->bse", out, self._w(self.o)))
    return out, {"c": c_all, "k_rope": kr_all, "index": idx, "start": start}


def _write_rows(buf, new, idx):
  """buf [b, T, d] with new [b, s, d] written at slots idx[b] .. idx[b] + s - 1 of each row (a scatter)."""
  return jax.vmap(lambda row, x, i: jax.lax.dynamic_update_slice_in_dim(row, x, i, axis=0))(buf, new, idx)
