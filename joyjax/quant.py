"""Weight quantization formats and quantization-aware training (QAT) by fake quantization.

Formats (the ones JoyAI-LLM Flash and DeepSeek-V3 ship):
* INT4: symmetric, group-wise along a weight's input dimension: each run of ``group_size`` consecutive input
  elements shares one float32 scale = max|w| / 7; values round to [-8, 7]. ``pack_int4`` stores two per byte.
* FP8: float8_e4m3fn with one float32 ``scale_inv`` = amax / 448 per 128x128 block of the 2D (input, output)
  matrix (ragged edge blocks allowed), the layout of DeepSeek-V3's ``weight_scale_inv``.

QAT: the train state keeps float32 master weights; the loss sees ``fake_quantize(w)`` = dequantize(quantize(w))
with a straight-through gradient (``_straight_through``: the forward value is q(w) bit for bit, the gradient w.r.t.
the master weight is the gradient w.r.t. the quantized weight), so the model learns weights that survive
quantization, and the weights it trained against are exactly those the exporter writes.

Scales multiply by the constant reciprocal (``amax * (1 / 7)``, ``amax * (1 / 448)``) rather than divide: XLA
rewrites a division by a constant into that multiplication in compiled code but not always eagerly, so a written
division would give scales that depend on jit and on the array's shape; the multiplication is the same everywhere.

Which weights (``quant.targets``): each layer tags its matrices with a group when creating them
(``ParamInfo.group``: attention = the MLA projections, dense = the dense layers' MLP, shared = the shared expert,
routed = the routed experts; MTP modules' blocks included). The embedding table, the LM head, the router, the norms,
the MTP input projection, LoRA adapters and the router bias have no group and always stay in float. A weight is seen
as a stack of [input, output] matrices: its leading 'layers' / 'expert' axes, then its input axes (``muon_inputs``,
flattened), then the rest (flattened) -- the Hugging Face [out, in] matrix transposed, so the groups and blocks here
are those of the exported checkpoint.

Why not Google's qwix (0.1.8, read from its wheel): qwix QAT is ``qwix.quantize_model(model, QtProvider(rules))``:
it re-traces a Flax module's methods and intercepts the jax primitives they bind (dot_general, einsum, conv,
ragged_dot), quantizing the operands of each matched op, with rules chosen by regex on the module path. joyjax's
forward is a pure function of a params dict (``nnx.merge`` per layer stack inside ``model.forward_hidden``), and
its routed experts -- the main INT4 target -- run through joyjax's own grouped-matmul kernels (Pallas, custom VJP,
inside shard_map with expert parallelism), which no interception rule reaches. Weight-only fake quantization
needs none of that: one pure function over the params, choosing each leaf from the metadata the model declared
for it (no path regexes), before the forward pass -- identical for every MoE backend and sharding. qwix's own
numerics also differ from the formats specified here (its symmetric int4 uses the bound 7.5 = qmax + 0.5, not 7).
So the formats are ~100 lines of jnp owned here and shared with the exporter (``convert/``), so training and
export quantize bit for bit the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.config import QUANT_FORMATS
from joyjax.errors import ConfigError

INT4_MIN, INT4_MAX = -8, 7
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK_SHAPE = (128, 128)


# ------------------------------------------------------------------------------------------------ INT4


def _grouped(w: jax.Array, group_size: int, axis: int) -> tuple[jax.Array, int]:
  """``w`` with ``axis`` split into [groups, group_size] (group axis at ``axis``, members at ``axis + 1``)."""
  axis = axis % w.ndim
  n = w.shape[axis]
  if group_size <= 0 or n % group_size:
    raise ValueError(f"int4: axis {axis} has length {n}, which group_size {group_size} does not divide")
  return w.reshape(w.shape[:axis] + (n // group_size, group_size) + w.shape[axis + 1:]), axis


def int4_quantize(w: jax.Array, group_size: int, axis: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric group-wise INT4 of ``w`` along ``axis`` (the input dimension).

  Returns (q int8 in [-8, 7], same shape as w; scale float32, w's shape with ``axis`` of length
  ``w.shape[axis] // group_size``) with w ~= q * scale. scale = max|w| over each group / 7; an all-zero group gets
  scale 1 (its q is 0). Raises ValueError when group_size does not divide the axis."""
  g, ax = _grouped(jnp.asarray(w, jnp.float32), group_size, axis)
  amax = jnp.max(jnp.abs(g), axis=ax + 1, keepdims=True)
  scale = jnp.where(amax > 0, amax * (1.0 / INT4_MAX), 1.0)  # see the module doc
  q = jnp.clip(jnp.round(g / scale), INT4_MIN, INT4_MAX).astype(jnp.int8)
  return q.reshape(w.shape), jnp.squeeze(scale, ax + 1)


def int4_dequantize(q: jax.Array, scale: jax.Array, group_size: int, axis: int) -> jax.Array:
  """q * scale (each scale repeated over its ``group_size`` elements along ``axis``) as float32."""
  g, ax = _grouped(jnp.asarray(q, jnp.float32), group_size, axis)
  return (g * jnp.expand_dims(jnp.asarray(scale, jnp.float32), ax + 1)).reshape(q.shape)


def pack_int4(q: jax.Array, axis: int = -1) -> jax.Array:
  """Two INT4 values per uint8 along ``axis`` (even length): element 2i in the low nibble, 2i+1 in the high."""
  q = jnp.moveaxis(jnp.asarray(q), axis, -1)
  if q.shape[-1] % 2:
    raise ValueError(f"pack_int4: axis {axis} has odd length {q.shape[-1]}")
  nib = (q.astype(jnp.int32) & 0xF).reshape(q.shape[:-1] + (q.shape[-1] // 2, 2))
  packed = (nib[..., 0] | (nib[..., 1] << 4)).astype(jnp.uint8)
  return jnp.moveaxis(packed, -1, axis)


def unpack_int4(packed: jax.Array, axis: int = -1) -> jax.Array:
  """Inverse of ``pack_int4``: int8 values in [-8, 7], ``axis`` twice as long."""
  p = jnp.moveaxis(jnp.asarray(packed), axis, -1).astype(jnp.int32)
  nib = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
  vals = ((nib ^ 8) - 8).astype(jnp.int8)  # sign-extend 4 bits
  return jnp.moveaxis(vals.reshape(p.shape[:-1] + (p.shape[-1] * 2,)), -1, axis)


# ------------------------------------------------------------------------------------------------- FP8


def _blocks(rows: int, cols: int, block) -> tuple[int, int]:
  return -(-rows // block[0]), -(-cols // block[1])


def _expand_blocks(s: jax.Array, rows: int, cols: int, block) -> jax.Array:
  """Per-block values [..., R, C] repeated to [..., rows, cols] (edge blocks cut)."""
  s = jnp.repeat(jnp.repeat(s, block[0], axis=-2), block[1], axis=-1)
  return s[..., :rows, :cols]


def fp8_block_quantize(w2d: jax.Array, block=FP8_BLOCK_SHAPE) -> tuple[jax.Array, jax.Array]:
  """Block-scaled FP8 of a matrix [..., rows, cols] (leading axes = a stack of matrices).

  Returns (w_fp8 float8_e4m3fn [..., rows, cols], scale_inv float32 [..., ceil(rows/b0), ceil(cols/b1)]) with
  w ~= w_fp8 * scale_inv per block; scale_inv = amax of the block / 448 (1 for an all-zero block). Edge blocks
  may be ragged, as in DeepSeek-V3's checkpoints."""
  w = jnp.asarray(w2d, jnp.float32)
  rows, cols = w.shape[-2:]
  nr, nc = _blocks(rows, cols, block)
  pad = [(0, 0)] * (w.ndim - 2) + [(0, nr * block[0] - rows), (0, nc * block[1] - cols)]
  wp = jnp.pad(w, pad).reshape(w.shape[:-2] + (nr, block[0], nc, block[1]))
  amax = jnp.max(jnp.abs(wp), axis=(-3, -1))
  scale_inv = jnp.where(amax > 0, amax * (1.0 / FP8_MAX), 1.0)  # see the module doc
  scaled = w / _expand_blocks(scale_inv, rows, cols, block)
  return jnp.clip(scaled, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale_inv


def fp8_block_dequantize(w_fp8: jax.Array, scale_inv: jax.Array, block=FP8_BLOCK_SHAPE) -> jax.Array:
  """w_fp8 * scale_inv (each per-block scale over its block) as float32 [..., rows, cols]."""
  rows, cols = w_fp8.shape[-2:]
  return w_fp8.astype(jnp.float32) * _expand_blocks(jnp.asarray(scale_inv, jnp.float32), rows, cols, block)


# ------------------------------------------------------------------------------------- fake quantization


def quantize_dequantize(w: jax.Array, fmt: str, group_size: int, axis: int) -> jax.Array:
  """dequantize(quantize(w)) as float32, no gradient trick. ``fmt`` 'int4': groups of ``group_size`` along
  ``axis``; 'fp8': 128x128 blocks over the matrix formed by the last two axes, ``axis`` (the input) being one of
  them (leading axes are a stack of matrices; ``group_size`` is ignored)."""
  if fmt == "int4":
    return int4_dequantize(*int4_quantize(w, group_size, axis), group_size, axis)
  if fmt == "fp8":
    if w.ndim < 2 or axis % w.ndim < w.ndim - 2:
      raise ValueError(f"fp8: the input axis {axis} must be one of the last two axes of a shape {w.shape} weight")
    return fp8_block_dequantize(*fp8_block_quantize(w))
  raise ValueError(f"unknown quantization format {fmt!r}: expected 'int4' or 'fp8'")


@jax.custom_vjp
def _straight_through(w, dq):
  """``dq`` in the forward pass, bit for bit (``w + stop_gradient(dq - w)`` rounds about half the elements by an
  ulp); the incoming gradient passes to ``w`` unchanged, none to ``dq``."""
  del w
  return dq


_straight_through.defvjp(lambda w, dq: (dq, None), lambda _, g: (g, None))


def fake_quantize(w: jax.Array, fmt: str, group_size: int, axis: int) -> jax.Array:
  """``quantize_dequantize(w)`` in w's dtype, exactly, with a straight-through (identity) gradient: the forward sees
  the quantized weight; d/dw is the identity."""
  dq = quantize_dequantize(w, fmt, group_size, axis).astype(w.dtype)
  return _straight_through(w, jax.lax.stop_gradient(dq))


# ------------------------------------------------------------------------------ which params, and how


def enabled(cfg) -> bool:
  """Whether ``cfg`` quantizes (``quant.format`` is not 'none'): QAT in training, the quantized weights when a
  model is served. The one spelling of that test."""
  return cfg.quant.format != QUANT_FORMATS[0]


def targets(cfg) -> frozenset:
  """``quant.targets`` as a set of ``config.PARAM_GROUPS`` names (empty when ``quant.format`` is 'none')."""
  q = cfg.quant
  if not enabled(cfg):
    return frozenset()
  return frozenset(t.strip() for t in q.targets.split(",") if t.strip())


def is_quantized(cfg, info: model.ParamInfo) -> bool:
  """Whether QAT / PTQ quantizes the parameter ``info`` describes: a base matrix of a selected group."""
  return info.group is not None and info.adapter is None and not info.frozen and info.group in targets(cfg)


def matrix_shape(info: model.ParamInfo, shape) -> tuple[int, ...]:
  """The [*lead, in, out] view of a weight declared [*lead, *inputs, *outputs] (lead: 'layers' / 'expert')."""
  axes, inputs = info.axes, info.muon_inputs
  lead = axes.index(inputs[0])
  if axes[lead:lead + len(inputs)] != tuple(inputs) or len(axes) == lead + len(inputs):
    raise ValueError(f"quant: a weight with axes {axes} and inputs {inputs} is not [*lead, *inputs, *outputs]")
  n_in = 1
  for d in shape[lead:lead + len(inputs)]:
    n_in *= d
  return tuple(shape[:lead]) + (n_in, -1)


def selection(cfg) -> dict:
  """The ``model.param_info(cfg)`` tree with True where the parameter is quantized, False elsewhere."""
  return jax.tree.map(lambda i: is_quantized(cfg, i), model.param_info(cfg), is_leaf=model.is_info)


def check(cfg) -> None:
  """ConfigError (one line) unless ``quant.group_size`` divides the input dimension of every INT4 weight."""
  q = cfg.quant
  if q.format != "int4":
    return
  info = model.param_info(cfg)
  shapes = model.abstract_params(cfg)
  bad = {}

  def visit(path, i, leaf):
    if is_quantized(cfg, i):
      n_in = matrix_shape(i, leaf.shape)[-2]
      if n_in % q.group_size:
        bad.setdefault(i.group, set()).add(n_in)

  jax.tree_util.tree_map_with_path(visit, info, shapes, is_leaf=model.is_info)
  if bad:
    dims = sorted({d for v in bad.values() for d in v})
    raise ConfigError(f"quant.group_size={q.group_size} does not divide the input dimension(s) {dims} of the "
                      f"{', '.join(sorted(bad))} weights: choose a divisor of {dims} or drop those groups from "
                      f"quant.targets")


def fake_quantize_params(cfg, params, step=None):
  """``params`` with every selected weight (``quant.targets``) fake-quantized in ``quant.format`` (straight-through
  gradient, same dtypes); the rest unchanged. The identity when ``quant.format`` is 'none'.

  QAT: the loss sees these weights, the optimizer updates the float32 masters. PTQ evaluation: the same call on
  trained float weights (outside a gradient the STE is just dequantize(quantize(w))). With ``step`` (a traced
  int) and ``quant.start_step`` > 0, the weights stay float before that step (one compiled step for both phases)."""
  if not enabled(cfg):
    return params
  fmt = cfg.quant.format
  gs = int(cfg.quant.group_size)
  on = None if step is None or cfg.quant.start_step <= 0 else step >= cfg.quant.start_step

  def one(i, w):
    if not is_quantized(cfg, i):
      return w
    view = matrix_shape(i, w.shape)
    if fmt == "int4":  # groups run along the flattened inputs only: keep the output axes (and their sharding)
      lead = len(view) - 2
      view = view[:-1] + w.shape[lead + len(i.muon_inputs):]
      fq = fake_quantize(w.reshape(view), fmt, gs, lead).reshape(w.shape)
    else:
      fq = fake_quantize(w.reshape(view), fmt, gs, -2).reshape(w.shape)
    return fq if on is None else jnp.where(on, fq, w)

  return jax.tree.map(one, model.param_info(cfg), params, is_leaf=model.is_info)
