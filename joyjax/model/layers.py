"""Building blocks: parameters with logical axes, RMSNorm, embeddings, rotary embeddings (with YaRN)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from joyjax.config import DTYPES, PARAM_GROUPS


_DTYPES = dict(zip(DTYPES, (jnp.float32, jnp.bfloat16, jnp.float16)))


def dtype_of(name: str):
  """The jnp dtype of a config dtype name (``model.dtype``, ``model.param_dtype``: one of ``config.DTYPES``)."""
  return _DTYPES[name]


class RouterBias(nnx.Variable):
  """Aux-loss-free selection bias: read by the router, never differentiated; the trainer updates it."""


def param(rngs: nnx.Rngs, shape, axes, *, std: float, dtype, inputs: tuple[str, ...] | None, decay: bool = True,
          routed: bool = False, group: str | None = None) -> nnx.Param:
  """A normally initialised weight and what the rest of joyjax needs to know about it, as metadata:

  axes: its logical axis names (mapped to mesh axes by the config's rules);
  inputs: the logical axes contracted with the layer input (``x @ W``): the matrix Muon orthogonalises; None
    for a weight that is not such a matrix (embedding table, output head, router: trained by AdamW). Required,
    so every new weight is placed deliberately;
  decay: whether decoupled weight decay applies;
  routed: a routed expert's weight (leading 'expert' axis; only top-k of them are active per token);
  group: which of ``config.PARAM_GROUPS`` the matrix belongs to (attention, dense, shared, routed), or None
    (embedding, head, router, MTP projection): what ``model.lora.targets`` / ``quant.targets`` select.
  """
  assert len(shape) == len(axes), (shape, axes)
  assert inputs is None or set(inputs) <= set(axes), (inputs, axes)
  assert group is None or (group in PARAM_GROUPS and inputs), (group, inputs)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=tuple(axes),
                   muon_inputs=None if inputs is None else tuple(inputs), decay=bool(decay), routed=bool(routed),
                   group=group)


def ones_param(shape, axes, *, dtype) -> nnx.Param:
  """A scale vector (norms): no Muon, no weight decay."""
  return nnx.Param(jnp.ones(shape, dtype), logical_axes=tuple(axes), muon_inputs=None, decay=False, routed=False,
                   group=None)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, returned in the input dtype (as DeepSeek-V3 does)."""

  def __init__(self, dim: int, eps: float, axis_name: str, *, param_dtype):
    self.scale = ones_param((dim,), (axis_name,), dtype=param_dtype)
    self.eps = eps

  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * x32).astype(dtype)


# ------------------------------------------------------------------------------------------------ rotary


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope_cfg, dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim // 2] (numpy float32: static, computed once) and the cos/sin magnitude factor
  (YaRN's attention factor)."""
  base = rope_cfg.theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  if rope_cfg.scaling != "yarn":
    return 1.0 / pos_freqs, 1.0
  factor = rope_cfg.factor
  if rope_cfg.mscale and rope_cfg.mscale_all_dim:
    attention_factor = _yarn_mscale(factor, rope_cfg.mscale) / _yarn_mscale(factor, rope_cfg.mscale_all_dim)
  else:
    attention_factor = _yarn_mscale(factor)

  def correction_dim(num_rotations):
    return (dim * math.log(rope_cfg.original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

  # Dimensions rotating faster than beta_fast keep their frequency; slower than beta_slow are interpolated.
  low = max(math.floor(correction_dim(rope_cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(rope_cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
  extrapolation = 1.0 - ramp
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv_freq.astype(np.float32), attention_factor


def softmax_scale(attn_cfg, rope_cfg) -> float:
  """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 when extending context."""
  scale = (attn_cfg.qk_nope_head_dim + attn_cfg.qk_rope_head_dim) ** -0.5
  if rope_cfg.scaling == "yarn" and rope_cfg.mscale_all_dim:
    m = _yarn_mscale(rope_cfg.factor, rope_cfg.mscale_all_dim)
    scale = scale * m * m
  return scale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, factor: float,
               interleave: bool) -> jax.Array:
  """Rotates the last axis of x [..., seq, (heads,) dim] at integer positions [batch, seq].

  ``interleave``: pairs are (x0, x1), (x2, x3), ... (DeepSeek-V3 weights); otherwise (x_i, x_{i+d/2}).
  The output puts the rotated first members of each pair before the second members in both layouts; q and k
  use the same layout, so their dot product is that of the rotated pairs.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
  if x.ndim == 4:  # [b, s, h, d]
    angles = angles[:, :, None, :]
  cos = jnp.cos(angles) * factor
  sin = jnp.sin(angles) * factor
  x32 = x.astype(jnp.float32)
  if interleave:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
  else:
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
