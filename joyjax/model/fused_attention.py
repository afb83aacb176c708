"""Training attention through cuDNN's fused flash attention (``jax.nn.dot_product_attention``), for MLA.

``model.attention_impl``: ``cudnn`` runs the non-cached (training) attention of ``attention.MLA`` through
``jax.nn.dot_product_attention(..., implementation="cudnn")``; ``auto`` picks ``cudnn`` on an NVIDIA GPU that
can run it (bf16 / fp16 compute, head width a multiple of 8 and at most 256 on Hopper+ or 128 before) and
``blockwise`` everywhere else. The choice is made once per process from the platform and the static shapes
(``resolve_attention_impl``, a cached pure-Python function: nothing in it reads a traced value, so it cannot fail
inside ``jax.jit``); ``cudnn`` asked for where it cannot run is a ``ConfigError``, never a silent fallback.

MLA's shapes: the query / key width is nope + rope (192 at JoyAI size) and the value width v_head_dim (128);
the public API wants values shaped like keys, so v is zero-padded to the query / key width and the output sliced
back (the padded columns of the output are exactly 0 and their cotangent is dropped; cost: the P @ V product and
dV are computed 192 wide instead of 128, ~1/6 more attention FLOPs at JoyAI size). (If dv > dk, q and k are
zero-padded instead: zeros add nothing to q . k.)

Packed documents: the public API has no segment ids in JAX 0.10 / 0.11 (``query_seq_lengths`` /
``key_value_seq_lengths`` describe one valid prefix per row, not several documents; the packed ``q_offsets``
layout exists only in the private ``jax._src.cudnn`` module). So the within-document rule is passed as a boolean
``mask`` [b, 1, s, s] (same segment) together with ``is_causal=True``: cuDNN still skips the tiles above the
diagonal, and the mask becomes an additive bf16 bias that every visible tile reads. What that costs: the mask
and its bias are materialised per layer call, b * s^2 * 3 bytes (384 MiB at 8 x 4096; recomputed under remat,
not saved), the kernel reads the bias tile by tile in the forward and backward pass, and the backward also
writes a bias gradient of the same shape that is discarded. Causal attention over one document per row needs
no mask, but that is a property of the data, not of the shapes, so it is not special-cased. Measured on an H200
(jax 0.11.2, bf16, 8 x 4096 tokens, 32 heads, widths 192 / 128, forward + backward of the attention core):
cuDNN with the mask 36.6 ms, cuDNN causal without a mask 16.4 ms, ``blockwise`` 70.7 ms; the whole MLA block
(projections included, benchmarks/gpu_suite.py section d) 44.9 ms with cuDNN against 81.4 ms blockwise. The
packed layout of the private API (segment offsets, no mask) would recover most of the 20 ms the mask costs.

**The packed layout** (``model.attention_max_segments`` = M > 0, Hopper or newer): cuDNN's ragged layout takes each
row's documents as (lengths [b, M], offsets [b, M + 1]) with a padding-causal mask, so no mask or bias is
materialised and no bias gradient is written. The public API does not expose it; ``jax._src.cudnn``'s
``dot_product_attention`` does, with the same signature in JAX 0.10 and 0.11. ``segment_runs`` turns segment ids
into that layout: every maximal run of equal ids is one sequence (a padding tail too, so every token is covered
and none is left uninitialised). M is static; a batch with a row of more than M runs takes the mask path instead
(``lax.cond``), so the result never depends on M, only the speed does.

``mla_dot_product_attention(q, k, v, segment_ids, scale=, implementation=, max_segments=)`` takes the
implementation as an argument: the model passes ``cudnn``; the CPU tests pass ``xla`` (the same padding, slicing
and mask, through XLA's reference implementation; with ``max_segments`` the packed layout's mask is rebuilt from
its lengths and offsets by ``packed_layout_mask``) and compare against ``blockwise_attention``.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
# Private: the only JAX API with cuDNN's packed (ragged offsets) layout; the same signature in JAX 0.10 and 0.11.
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

from joyjax.errors import ConfigError
from joyjax.kernels import pallas_backend

log = logging.getLogger(__name__)

CUDNN_COMPUTE_DTYPES = ("bfloat16", "float16")  # cuDNN flash attention has no float32 kernel


def cudnn_unsupported_reason(qk_dim: int, dtype_name: str) -> str | None:
  """Why cuDNN flash attention cannot run MLA with query / key width ``qk_dim`` in ``dtype_name`` on this
  process's default platform, or None if it can."""
  hw = pallas_backend.hardware()
  if hw.platform != "gpu" or hw.compute_capability is None:
    return f"cuDNN needs an NVIDIA GPU; this process runs on {hw.platform!r}"
  if dtype_name not in CUDNN_COMPUTE_DTYPES:
    return f"cuDNN flash attention computes in {' or '.join(CUDNN_COMPUTE_DTYPES)}, not model.dtype={dtype_name!r}"
  limit = 256 if hw.compute_capability >= (9, 0) else 128
  if qk_dim % 8 or qk_dim > limit:
    return (f"cuDNN flash attention needs a head width that is a multiple of 8 and at most {limit} on this GPU; "
            f"MLA's query / key width (qk_nope_head_dim + qk_rope_head_dim) is {qk_dim}")
  return None


@functools.lru_cache(maxsize=None)
def resolve_attention_impl(requested: str, qk_dim: int, dtype_name: str) -> str:
  """The training attention that runs for ``model.attention_impl=requested``: ``auto`` -> ``cudnn`` where
  ``cudnn_unsupported_reason`` is None, else ``blockwise``; ``cudnn`` where it cannot run -> ConfigError; any
  other value unchanged. Cached per process: decided once, from the platform and static shapes only."""
  if requested not in ("auto", "cudnn"):
    return requested
  why = cudnn_unsupported_reason(qk_dim, dtype_name)
  if requested == "cudnn" and why:
    raise ConfigError(f"model.attention_impl='cudnn' cannot run here: {why}; use 'auto' (cuDNN where it runs, "
                      "blockwise elsewhere) or 'blockwise'")
  chosen = "blockwise" if why else "cudnn"
  log.info("model.attention_impl=%s -> %s%s", requested, chosen, f" ({why})" if why else "")
  return chosen


@functools.lru_cache(maxsize=None)
def packed_segments(max_segments: int) -> int:
  """``model.attention_max_segments`` where cuDNN's packed layout runs (Hopper or newer), else 0 (the mask path,
  the same result). Cached per process: decided once, from the hardware only."""
  hw = pallas_backend.hardware()
  if max_segments and (hw.compute_capability or (0, 0)) < (9, 0):
    log.info("model.attention_max_segments=%d: cuDNN's packed layout needs a Hopper or newer GPU; "
             "the documents are passed as a mask", max_segments)
    return 0
  return max_segments


def segment_runs(segment_ids, max_segments: int):
  """Each row's documents in cuDNN's packed layout: (lengths [b, M] int32, offsets [b, M + 1] int32, fits bool
  scalar) with M = ``max_segments``. A document is a maximal run of equal segment ids (a padding tail is a run
  too). lengths[r] is run r's token count and offsets[r] its first position, both -1 past the row's last run (the
  offsets' last column is always -1: cuDNN's convention); ``fits``: no row has more than M runs (runs past M are
  left out, and the caller must not use the layout)."""
  b, s = segment_ids.shape
  seg = segment_ids.astype(jnp.int32)
  first = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, s))
  lengths = jnp.zeros((b, max_segments), jnp.int32).at[rows, run].add(1, mode="drop")
  lengths = jnp.where(lengths > 0, lengths, -1)
  slot = jnp.where(first & (run < max_segments), run, max_segments + 1)  # out of range: dropped
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  offsets = jnp.full((b, max_segments + 1), -1, jnp.int32).at[rows, slot].set(pos, mode="drop")
  return lengths, offsets, jnp.all(run[:, -1] < max_segments)


def packed_layout_mask(lengths, offsets, seq_len: int):
  """[b, 1, s, s] bool: what the packed layout with a padding-causal mask lets query i see: key j <= i inside the
  same run [offsets[r], offsets[r] + lengths[r]). The xla stand-in for the cuDNN call (tests, CPU)."""
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  start = offsets[:, :-1, None]
  inside = (pos >= start) & (pos < start + lengths[:, :, None]) & (lengths[:, :, None] > 0)  # [b, M, s]
  together = jnp.einsum("bmi,bmj->bij", inside.astype(jnp.int32), inside.astype(jnp.int32)) > 0
  return (together & (pos[:, None] >= pos[None, :]))[:, None]


def _pad_last(x, width: int):
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))


def mla_dot_product_attention(q, k, v, segment_ids, *, scale: float, implementation: str, max_segments: int = 0):
  """q, k: [b, s, h, dk]; v: [b, s, h, dv]; segment_ids: [b, s] int. Returns [b, s, h, dv] in q.dtype:
  ``softmax(q k^T * scale)`` masked causally within segments, times v, through
  ``jax.nn.dot_product_attention(implementation=implementation)``, or with ``max_segments`` > 0 through cuDNN's
  packed layout when every row has at most that many documents (see the module docstring)."""
  dk, dv = q.shape[-1], v.shape[-1]
  width = max(dk, dv)
  q, k, v = (_pad_last(a.astype(q.dtype), width) for a in (q, k, v))
  seg = segment_ids.astype(jnp.int32)
  scale = float(scale)

  def masked(q, k, v):
    same_doc = seg[:, None, :, None] == seg[:, None, None, :]  # [b, 1, s, s]; with is_causal: never an empty row
    return jax.nn.dot_product_attention(q, k, v, mask=same_doc, scale=scale, is_causal=True,
                                        implementation=implementation)

  if not max_segments:
    return masked(q, k, v)[..., :dv]
  lengths, offsets, fits = segment_runs(seg, max_segments)

  def packed(q, k, v):
    if implementation == "cudnn":
      return cudnn_fa.dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
                                            mask_type=cudnn_fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jax.nn.dot_product_attention(q, k, v, mask=packed_layout_mask(lengths, offsets, seg.shape[1]),
                                        scale=scale, implementation=implementation)

  return jax.lax.cond(fits, packed, masked, q, k, v)[..., :dv]
