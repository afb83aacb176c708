"""Pallas grouped matmul behind ``ops.grouped_matmul(impl='pallas' | 'pallas_interpret')``: dispatch, VJPs.

Public entry points (``gmm`` and ``gmm_swiglu`` are differentiable in lhs and rhs; ``group_sizes`` gets no
gradient; ``tgmm`` is the building block of their VJPs):

* ``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: ``out[rows of g] = lhs[rows of g] @ rhs[g]``.
  Rows are grouped contiguously in order; rows past ``sum(group_sizes)`` give zeros (and zero gradient).
  VJP: ``d_lhs = gmm(d_out, rhs^T)`` (the transpose is read in-kernel, never materialised) and
  ``d_rhs = tgmm(lhs, d_out)``.
* ``tgmm(lhs [M, K], dout [M, N], group_sizes [G]) -> [G, K, N]``:
  ``out[g] = lhs[rows of g].T @ dout[rows of g]``.
* ``gmm_swiglu(lhs, rhs_gate, rhs_up, group_sizes) -> [M, F]``: ``silu(lhs @ gate) * (lhs @ up)`` with the
  SwiGLU in the kernel epilogue (one pass, no [M, 2F] intermediate in HBM). Its VJP recomputes gate/up in one
  dual-output kernel, and computes ``d_lhs = d_gate @ gate^T + d_up @ up^T`` in one kernel.

Backends: ``gpu`` = the kernels in ``pallas_gpu`` (Triton lowering; also what ``interpret=True`` runs by
default on CPU), ``tpu`` = JAX's megablox kernels (``pallas_tpu``). Accumulation is float32; outputs take
``lhs.dtype`` (gradients take their primal's dtype). Operands are zero-padded inside the wrapper so M, K and N
are tile multiples: a K that is not a tile multiple is therefore exact (padded columns contribute 0), never
masked.

On a GPU every kernel (``GPU_KERNELS``) takes the ``Tiling``'s tiles and stages as upper bounds and lowers
them until its shared-memory footprint (``smem.smem_bytes``) for the operands' dtype fits the device's limit
(``hardware().smem_limit_bytes``: 232,448 bytes on Hopper). Where the compiled kernels can run at all is
decided from ``hardware()`` facts (``unsupported_reason``), never by running one; ``self_test`` is an explicit
check for users and benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from joyjax.kernels import pallas_gpu, pallas_tpu, smem

_log = logging.getLogger(__name__)

BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes. ``gmm`` = (tm rows, tk contraction, tn output columns) for the forward and ``d_lhs`` kernels;
  ``tgmm`` = (tm rows (the contraction there), tk, tn) for ``d_rhs``. GPU tiles must be powers of two (>= 16).
  ``num_warps`` / ``num_stages`` are Triton settings (ignored on TPU and in interpret mode). Tiles larger than
  a (power-of-two-rounded) dimension are shrunk to it. On a GPU (compiled), tiles and stages are upper bounds:
  each kernel lowers its stages first, then its tiles, until it fits the device's shared memory for the dtype
  at hand (``smem.fit_smem``; ``gpu_kernel_tilings`` lists what every kernel runs with).
  """
  gmm: tuple[int, int, int] = (128, 64, 128)
  tgmm: tuple[int, int, int] = (128, 128, 128)
  num_warps: int | None = 4
  num_stages: int | None = 4
  tgmm_num_warps: int | None = 4
  tgmm_num_stages: int | None = 3
  fused_num_warps: int | None = 8  # two accumulators (SwiGLU fwd, its recompute): halves registers/thread


GPU_TILING = Tiling()
TPU_TILING = Tiling(gmm=(128, 128, 128), tgmm=(128, 128, 128))
INTERPRET_TILING = Tiling(gmm=(16, 16, 16), tgmm=(16, 16, 16))


def as_tiling(tiling) -> Tiling | None:
  """``None``, a ``Tiling``, or a 3-tuple (tm, tk, tn) used for both gmm and tgmm."""
  if tiling is None or isinstance(tiling, Tiling):
    return tiling
  t = tuple(int(x) for x in tiling)
  if len(t) != 3:
    raise ValueError(f"tiling must be a Tiling or a (tm, tk, tn) tuple, got {tiling!r}")
  return dataclasses.replace(GPU_TILING, gmm=t, tgmm=t)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  backend: str
  interpret: bool
  tiling: Tiling
  smem_limit_bytes: int = smem.SMEM_LIMIT_BYTES


def _make_cfg(interpret: bool, tiling, backend: str | None) -> _Cfg:
  if backend is None:
    backend = "tpu" if (not interpret and jax.default_backend() == "tpu") else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"unknown pallas backend {backend!r}; choose one of {BACKENDS}")
  tiling = as_tiling(tiling)
  if tiling is None:
    tiling = INTERPRET_TILING if interpret else (TPU_TILING if backend == "tpu" else GPU_TILING)
  limit = smem.SMEM_LIMIT_BYTES if interpret else hardware().smem_limit_bytes
  return _Cfg(backend=backend, interpret=bool(interpret), tiling=tiling, smem_limit_bytes=limit)


# Every Triton kernel the GPU path runs: (number of lhs operands, number of rhs operands, tgmm?) as ``smem``
# counts them.
GPU_KERNELS = {
    "gmm": (1, 1, False),                # forward
    "gmm_d_lhs": (1, 1, False),          # d_lhs = gmm(d_out, rhs^T), rhs read transposed
    "tgmm": (1, 1, True),                # d_rhs
    "swiglu": (1, 2, False),             # fused gate/up + SwiGLU forward
    "swiglu_recompute": (1, 2, False),   # its VJP: gate and up recomputed in one dual-output kernel
    "swiglu_d_lhs": (2, 2, False),       # its VJP: d_lhs = d_gate @ gate^T + d_up @ up^T
}


def _gpu_fit(tiles, cfg: _Cfg, itemsize: int, n_lhs: int, n_rhs: int, tgmm: bool):
  """(tiles, num_stages, num_warps) a GPU kernel runs with: the tiling's, shrunk to fit shared memory."""
  t = cfg.tiling
  if tgmm:
    stages, warps = t.tgmm_num_stages, t.tgmm_num_warps
  else:
    stages, warps = t.num_stages, (t.num_warps if n_lhs == n_rhs else t.fused_num_warps)
  if cfg.interpret:  # no shared memory in the interpreter: the tiles stay as given
    return tuple(tiles), stages, warps
  tiles, stages = smem.fit_smem(tiles, stages, itemsize, cfg.smem_limit_bytes, n_lhs=n_lhs, n_rhs=n_rhs,
                                tgmm=tgmm)
  return tiles, stages, warps


def gpu_kernel_tilings(dtype, tiling: Tiling | None = None, smem_limit_bytes: int | None = None) -> dict:
  """{kernel: (tiles, num_stages, num_warps, shared-memory bytes)} the compiled GPU kernels run with for
  ``dtype`` operands whose dimensions are at least the tiles (smaller ones only shrink the tiles further)."""
  cfg = _Cfg(backend="gpu", interpret=False, tiling=tiling or GPU_TILING,
             smem_limit_bytes=smem_limit_bytes or hardware().smem_limit_bytes)
  itemsize = jnp.dtype(dtype).itemsize
  out = {}
  for name, (n_lhs, n_rhs, is_tgmm) in GPU_KERNELS.items():
    base = cfg.tiling.tgmm if is_tgmm else cfg.tiling.gmm
    tiles, stages, warps = _gpu_fit(base, cfg, itemsize, n_lhs, n_rhs, is_tgmm)
    out[name] = (tiles, stages, warps,
                 smem.smem_bytes(tiles, stages, itemsize, n_lhs=n_lhs, n_rhs=n_rhs, tgmm=is_tgmm))
  return out


# ------------------------------------------------------------------------------------------------------------
# Where the compiled kernels can run: decided from facts that cannot fail for reasons unrelated to the
# hardware (ops.resolve_impl caches the decision and logs it). Never by running a kernel: that is self_test,
# which only a user or a benchmark calls, outside any trace.

@dataclasses.dataclass(frozen=True)
class Hardware:
  """What this process runs on. ``compute_capability``: (major, minor) of an NVIDIA GPU, else None (ROCm GPUs
  report none). ``triton``: ``jax.experimental.pallas.triton`` imports. ``megablox``: JAX's TPU grouped-matmul
  kernels import. ``smem_limit_bytes``: shared memory per block the GPU kernels' tilings must fit."""
  platform: str
  compute_capability: tuple[int, int] | None
  triton: bool
  megablox: bool
  smem_limit_bytes: int


def _platform() -> str:
  return jax.default_backend()


def _compute_capability() -> tuple[int, int] | None:
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if not cc:
    return None
  major, _, minor = str(cc).partition(".")
  return int(major), int(minor or 0)


def _triton_importable() -> bool:
  try:
    from jax.experimental.pallas import triton  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=None)
def hardware() -> Hardware:
  """The facts of this process's default platform (cached: they do not change while it runs)."""
  platform = _platform()
  cc = _compute_capability() if platform == "gpu" else None
  return Hardware(platform=platform, compute_capability=cc,
                  triton=platform == "gpu" and _triton_importable(),
                  megablox=platform == "tpu" and pallas_tpu.available(),
                  smem_limit_bytes=smem.smem_limit_bytes(cc))


def unsupported_reason(hw: Hardware) -> str | None:
  """Why the compiled Pallas kernels cannot run on ``hw``, or None if they can."""
  if hw.platform == "gpu":
    if hw.compute_capability is None:
      return "this GPU reports no NVIDIA compute capability (the Triton kernels need an NVIDIA GPU)"
    if hw.compute_capability < (8, 0):
      return (f"NVIDIA compute capability {hw.compute_capability[0]}.{hw.compute_capability[1]} < 8.0 "
              "(the kernels need bf16 tensor cores: Ampere, Hopper or newer)")
    if not hw.triton:
      return "jax.experimental.pallas.triton does not import in this jax install"
    return None
  if hw.platform == "tpu":
    return None if hw.megablox else "JAX's megablox TPU kernels do not import in this jax install"
  return f"platform {hw.platform!r} has no compiled Pallas kernels (GPU or TPU only)"


def describe_hardware(hw: Hardware) -> str:
  """One line of the facts the backend choice rests on (for the log)."""
  if hw.platform == "gpu":
    cc = "none" if hw.compute_capability is None else "%d.%d" % hw.compute_capability
    return f"platform gpu, compute capability {cc}, triton {'importable' if hw.triton else 'missing'}"
  if hw.platform == "tpu":
    return f"platform tpu, megablox {'importable' if hw.megablox else 'missing'}"
  return f"platform {hw.platform}"


def self_test(backend: str = "gpu", interpret: bool = False) -> bool:
  """Compiles and runs a tiny ragged problem (an empty group, rows past the end) and checks it against numpy.

  An explicit check for a user or a benchmark (e.g. after installing a new jax): it runs concrete
  computations, so it must be called outside any trace; backend selection never calls it. Returns False (and
  logs why) if compiling or running fails or the result is wrong.
  """
  if isinstance(jnp.zeros(()), jax.core.Tracer):
    raise RuntimeError("pallas_backend.self_test runs concrete computations: call it outside jax.jit "
                       "/ tracing")
  try:
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((3, 128, 128)), jnp.bfloat16)
    gs = jnp.asarray([100, 0, 120], jnp.int32)
    run = jax.jit(functools.partial(gmm, backend=backend, interpret=interpret))
    out = np.asarray(run(lhs, rhs, gs), np.float32)
    l32, r32 = np.asarray(lhs, np.float32), np.asarray(rhs, np.float32)
    want = np.zeros((256, 128), np.float32)
    want[:100] = l32[:100] @ r32[0]
    want[100:220] = l32[100:220] @ r32[2]
    ok = np.allclose(out, want, rtol=2e-2, atol=2e-1)
    if not ok:
      _log.warning("pallas %s grouped matmul gave wrong results in its self-test", backend)
    return bool(ok)
  except Exception as e:  # noqa: BLE001 - a self-test reports, it does not raise
    _log.warning("pallas %s grouped matmul self-test failed: %s: %s", backend, type(e).__name__, e)
    return False


# ------------------------------------------------------------------------------------------------------------
# Padding and tile fitting.

def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _fit(tile: int, dim: int, cfg: _Cfg) -> int:
  if cfg.backend == "gpu":
    if tile < 16 and not cfg.interpret:
      raise ValueError(f"GPU tiles must be >= 16, got {tile}")
    if tile & (tile - 1) and not cfg.interpret:
      raise ValueError(f"GPU (Triton) tiles must be powers of two, got {tile}")
    return min(tile, max(16, _next_pow2(dim)))
  return min(tile, _round_up(max(dim, 1), 128 if not cfg.interpret else 8))


def _pad(x: jax.Array, multiples: Sequence[int | None]) -> jax.Array:
  pads = [(0, 0 if m is None else (-d) % m) for d, m in zip(x.shape, multiples)]
  if any(p for _, p in pads):
    x = jnp.pad(x, pads)
  return x


def _precision(dtype):
  # float32 inputs: full-precision dots (Triton IEEE, not TF32). bf16/f16: the native tensor-core path.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _check(lhs, rhs, group_sizes, transpose_rhs):
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"expected lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}")
  k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k:
    raise ValueError(
        f"contraction mismatch: lhs {lhs.shape} vs rhs {rhs.shape} (transpose_rhs={transpose_rhs})")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"group_sizes must have shape ({rhs.shape[0]},), got {group_sizes.shape}")


# ------------------------------------------------------------------------------------------------------------
# Non-differentiable implementations (padded, dispatched per backend).

_EPILOGUES = {"identity": pallas_gpu.identity_epilogue, "swiglu": pallas_gpu.swiglu_epilogue}


def _gmm_impl(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array, cfg: _Cfg, *,
              transpose_rhs: bool = False, epilogue: str = "identity",
              out_dtypes: Sequence) -> tuple[jax.Array, ...]:
  """Unpadded entry: lhs list of [M, K], rhs list of [G, K, N] (or [G, N, K]) -> outputs [M, N]."""
  m, k = lhs[0].shape
  n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
  dtype = jnp.result_type(*lhs, *rhs)
  tm, tk, tn = (_fit(t, d, cfg) for t, d in zip(cfg.tiling.gmm, (m, k, n)))
  if cfg.backend == "gpu":
    (tm, tk, tn), num_stages, num_warps = _gpu_fit((tm, tk, tn), cfg, jnp.dtype(dtype).itemsize, len(lhs),
                                                   len(rhs), tgmm=False)
  lhs_p = [_pad(x.astype(dtype), (tm, tk)) for x in lhs]
  rhs_p = [_pad(r.astype(dtype), (None, tn, tk) if transpose_rhs else (None, tk, tn)) for r in rhs]
  mp = lhs_p[0].shape[0]
  offsets = pallas_gpu.group_offsets(group_sizes, m)

  if cfg.backend == "gpu":
    outs = pallas_gpu.gmm(
        lhs_p, rhs_p, offsets, tiling=(tm, tk, tn), out_dtypes=out_dtypes, transpose_rhs=transpose_rhs,
        epilogue=_EPILOGUES[epilogue], precision=_precision(dtype), num_warps=num_warps,
        num_stages=num_stages, interpret=cfg.interpret)
  else:
    sizes = jnp.diff(offsets)
    accs = [pallas_tpu.gmm(lhs_p[0 if len(lhs_p) == 1 else i], r, sizes, tiling=(tm, tk, tn),
                           out_dtype=jnp.float32, transpose_rhs=transpose_rhs, interpret=cfg.interpret)
            for i, r in enumerate(rhs_p)]
    if len(lhs_p) > 1:
      accs = [functools.reduce(jnp.add, accs)]
    valid = (jnp.arange(mp) < offsets[-1])[:, None]  # megablox leaves rows past the groups unwritten
    accs = [jnp.where(valid, a, 0.0) for a in accs]
    outs = tuple(o.astype(d) for o, d in zip(_EPILOGUES[epilogue](*accs), out_dtypes))
  return tuple(o[:m, :n] for o in outs)


def _tgmm_impl(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, cfg: _Cfg, *, out_dtype) -> jax.Array:
  """Unpadded entry: lhs [M, K], dout [M, N] -> [G, K, N]."""
  m, k = lhs.shape
  n = dout.shape[1]
  g = group_sizes.shape[0]
  dtype = jnp.result_type(lhs, dout)
  tm, tk, tn = (_fit(t, d, cfg) for t, d in zip(cfg.tiling.tgmm, (m, k, n)))
  if cfg.backend == "gpu":
    (tm, tk, tn), num_stages, num_warps = _gpu_fit((tm, tk, tn), cfg, jnp.dtype(dtype).itemsize, 1, 1,
                                                   tgmm=True)
  lhs_p = _pad(lhs.astype(dtype), (tm, tk))
  dout_p = _pad(dout.astype(dtype), (tm, tn))
  offsets = pallas_gpu.group_offsets(group_sizes, m)
  if cfg.backend == "gpu":
    out = pallas_gpu.tgmm(lhs_p, dout_p, offsets, num_groups=g, tiling=(tm, tk, tn), out_dtype=out_dtype,
                          precision=_precision(dtype), num_warps=num_warps, num_stages=num_stages,
                          interpret=cfg.interpret)
  else:
    out = pallas_tpu.tgmm(lhs_p, dout_p, jnp.diff(offsets), tiling=(tm, tk, tn), out_dtype=out_dtype,
                          interpret=cfg.interpret)
  return out[:, :k, :n]


# ------------------------------------------------------------------------------------------------------------
# gmm with custom VJP.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs, rhs, group_sizes, cfg: _Cfg, transpose_rhs: bool):
  return _gmm_impl([lhs], [rhs], group_sizes, cfg, transpose_rhs=transpose_rhs, out_dtypes=[lhs.dtype])[0]


def _gmm_vjp_fwd(lhs, rhs, group_sizes, cfg, transpose_rhs):
  return _gmm_vjp(lhs, rhs, group_sizes, cfg, transpose_rhs), (lhs, rhs, group_sizes)


def _gmm_vjp_bwd(cfg, transpose_rhs, res, dout):
  lhs, rhs, group_sizes = res
  # out = lhs @ W_g with W_g = rhs[g] (or rhs[g].T). d_lhs = dout @ W_g^T: the same kernel reading rhs the
  # other way round (the transpose is never materialised).
  d_lhs = _gmm_impl([dout], [rhs], group_sizes, cfg, transpose_rhs=not transpose_rhs,
                    out_dtypes=[lhs.dtype])[0]
  if transpose_rhs:  # rhs[g] = W_g^T: d rhs[g] = dout_g^T @ lhs_g
    d_rhs = _tgmm_impl(dout, lhs, group_sizes, cfg, out_dtype=rhs.dtype)
  else:
    d_rhs = _tgmm_impl(lhs, dout, group_sizes, cfg, out_dtype=rhs.dtype)
  return d_lhs, d_rhs, None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False, *, tiling=None,
        backend: str | None = None, transpose_rhs: bool = False) -> jax.Array:
  """Grouped matmul ``[M, K] x [G, K, N] -> [M, N]`` (rhs [G, N, K] with ``transpose_rhs``) in ``lhs.dtype``.

  interpret: run the kernels in the Pallas interpreter (CPU tests). tiling: ``Tiling`` or (tm, tk, tn).
  backend: ``'gpu'`` (Triton-lowered kernels; the interpreter default) or ``'tpu'`` (megablox); default by
  platform.
  """
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  _check(lhs, rhs, group_sizes, transpose_rhs)
  return _gmm_vjp(lhs, rhs, group_sizes, _make_cfg(interpret, tiling, backend), bool(transpose_rhs))


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, interpret: bool = False, *, tiling=None,
         backend: str | None = None, preferred_element_type=None) -> jax.Array:
  """Transposed grouped matmul: ``out[g] = lhs[rows of g].T @ dout[rows of g]``, [M, K] x [M, N] -> [G, K, N].

  Float32 accumulation; output dtype ``preferred_element_type`` (default ``lhs.dtype``). Not differentiable.
  """
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
    raise ValueError(f"expected lhs [M, K] and dout [M, N]; got {lhs.shape} and {dout.shape}")
  return _tgmm_impl(lhs, dout, group_sizes, _make_cfg(interpret, tiling, backend),
                    out_dtype=preferred_element_type or lhs.dtype)


# ------------------------------------------------------------------------------------------------------------
# Fused gate/up + SwiGLU.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_vjp(lhs, rhs_gate, rhs_up, group_sizes, cfg: _Cfg):
  return _gmm_impl([lhs], [rhs_gate, rhs_up], group_sizes, cfg, epilogue="swiglu", out_dtypes=[lhs.dtype])[0]


def _swiglu_vjp_fwd(lhs, rhs_gate, rhs_up, group_sizes, cfg):
  return _swiglu_vjp(lhs, rhs_gate, rhs_up, group_sizes, cfg), (lhs, rhs_gate, rhs_up, group_sizes)


def _swiglu_vjp_bwd(cfg, res, dout):
  lhs, rhs_gate, rhs_up, group_sizes = res
  # Recompute the pre-activations (one kernel, two accumulators) rather than keep [M, 2F] alive since the
  # forward.
  gate, up = _gmm_impl([lhs], [rhs_gate, rhs_up], group_sizes, cfg, out_dtypes=[lhs.dtype, lhs.dtype])
  gate, up, d = gate.astype(jnp.float32), up.astype(jnp.float32), dout.astype(jnp.float32)
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  d_up = (d * silu).astype(lhs.dtype)
  d_gate = (d * up * sig * (1.0 + gate * (1.0 - sig))).astype(lhs.dtype)
  # d_lhs = d_gate @ gate_w^T + d_up @ up_w^T in a single kernel (one accumulator over both pairs).
  d_lhs = _gmm_impl([d_gate, d_up], [rhs_gate, rhs_up], group_sizes, cfg, transpose_rhs=True,
                    out_dtypes=[lhs.dtype])[0]
  d_gate_w = _tgmm_impl(lhs, d_gate, group_sizes, cfg, out_dtype=rhs_gate.dtype)
  d_up_w = _tgmm_impl(lhs, d_up, group_sizes, cfg, out_dtype=rhs_up.dtype)
  return d_lhs, d_gate_w, d_up_w, None


_swiglu_vjp.defvjp(_swiglu_vjp_fwd, _swiglu_vjp_bwd)


def gmm_swiglu(lhs: jax.Array, rhs_gate: jax.Array, rhs_up: jax.Array, group_sizes: jax.Array,
               interpret: bool = False, *, tiling=None, backend: str | None = None) -> jax.Array:
  """``silu(gmm(lhs, rhs_gate)) * gmm(lhs, rhs_up)`` with the SwiGLU fused into the kernel epilogue.

  lhs [M, K]; rhs_gate, rhs_up [G, K, F]; returns [M, F] in ``lhs.dtype`` (rows past the groups are zero).
  """
  group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
  _check(lhs, rhs_gate, group_sizes, False)
  if rhs_up.shape != rhs_gate.shape:
    raise ValueError(f"rhs_gate {rhs_gate.shape} and rhs_up {rhs_up.shape} must have the same shape")
  return _swiglu_vjp(lhs, rhs_gate, rhs_up, group_sizes, _make_cfg(interpret, tiling, backend))
