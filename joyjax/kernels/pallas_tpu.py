"""TPU grouped matmul: an adapter over JAX's megablox Pallas/Mosaic kernels.

megablox (``jax.experimental.pallas.ops.tpu.megablox``) is the maintained TPU implementation of exactly the
design we want there: per-tile group ids and offsets as scalar-prefetch metadata, BlockSpec pipelining from
HBM into VMEM, a float32 VMEM accumulator. ``pallas_backend`` pads M, K and N to tile multiples before calling
in, so megablox's own K-remainder masking is never exercised, and zeroes the rows past ``sum(group_sizes)``
(megablox leaves them unwritten). The kernels also run in the Pallas interpreter on CPU, which is how the
tests cover this path.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp


def _megablox():
  # ``megablox/__init__`` re-exports a custom_vjp'd ``gmm`` that shadows the submodule; import the module.
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def available() -> bool:
  try:
    mb = _megablox()
  except ImportError:
    return False
  return hasattr(mb, "gmm") and hasattr(mb, "tgmm")


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tiling: tuple[int, int, int], out_dtype,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
  """Padded grouped matmul: lhs [M, K] x rhs [G, K, N] (or [G, N, K]) -> [M, N]; rows past groups: junk."""
  return _megablox().gmm(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.dtype(out_dtype),
                         tiling=tuple(tiling), transpose_rhs=transpose_rhs, interpret=interpret)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, tiling: tuple[int, int, int], out_dtype,
         interpret: bool = False) -> jax.Array:
  """Padded transposed grouped matmul: lhs [M, K], dout [M, N] -> [G, K, N]."""
  return _megablox().tgmm(lhs.swapaxes(0, 1), dout, group_sizes.astype(jnp.int32),
                          preferred_element_type=jnp.dtype(out_dtype), tiling=tuple(tiling),
                          interpret=interpret)
