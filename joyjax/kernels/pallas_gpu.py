"""Grouped matmul kernels in Pallas for NVIDIA GPUs (Triton lowering); they also run in the interpreter.

The callers in ``pallas_backend`` pad every operand so that M, K and N are tile multiples and clamp the group
offsets to the unpadded row count; the kernels here therefore never read or write out of bounds and need no
bounds checks.

Tiling of the row dimension (megablox-style metadata, computed in plain JAX before the call):

* ``offsets`` [G+1]: row at which group g starts (``offsets[g]``) and ends (``offsets[g+1]``).
* ``lo``, ``hi`` [tiles_m]: the groups that may intersect row tile i are ``lo[i] <= g < hi[i]``.

``gmm``: one program per output tile (row tile i, column tile j). It loops over the groups intersecting its
rows; for each non-empty one it runs the K loop against that group's weights, loading ``lhs`` with a row mask
so rows of other groups read as zero and only this group's rows accumulate (one float32 accumulator for all
groups). Every output element is written exactly once, by one program, with a plain store: no races between
programs that share a row tile at a group boundary, rows of no group (past ``sum(group_sizes)``) come out as
zeros, and an empty group costs nothing. Work is ``tiles_m + (number of group boundaries inside tiles)``
row-tile passes, as in megablox.

``tgmm`` (``d_rhs[g] = lhs[rows of g].T @ d_out[rows of g]``): one program per (group, K tile, N tile) output
tile, looping over the row tiles that group g touches, with row-masked loads (rows of other groups read as
zero). Empty groups produce zeros.

Only three things are backend specific and sit behind small functions: the compiler parameters (Triton warps
and stages), the masked load (``pallas.triton.load`` with ``mask``/``other``, which the interpreter also
understands), and the program-id order (Triton launches grid axis 0 fastest, so the N-tile axis goes first:
consecutive programs share one row tile of ``lhs`` and sweep one expert's weights, which then stay in L2).

Triton needs power-of-two tensor sizes for every load and store, so on GPU all tile sizes must be powers of
two (and >= 16 for ``tl.dot``); ``pallas_backend`` picks and validates them.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_DOT_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_DOT_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]
_DOT_TN = (((0,), (0,)), ((), ()))  # [m, k] x [m, n] -> [k, n]


# ------------------------------------------------------------------------------------------------------------
# Backend-specific pieces.

def compiler_params(num_warps: int | None, num_stages: int | None):
  """Triton compiler parameters; passing them also selects the Triton (not Mosaic GPU) lowering."""
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _masked_load(ref_view, row_mask):
  """Loads a [rows, cols] view; rows where ``row_mask`` [rows, 1] is False read as zero (predicated)."""
  from jax.experimental.pallas import triton as pltriton
  return pltriton.load(ref_view, mask=row_mask, other=0)


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------------------
# Metadata.

def group_offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[G+1] int32 row offsets of the groups, clamped to ``num_rows`` (rows past it do not exist)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  return jnp.clip(offsets, 0, num_rows).astype(jnp.int32)


def tile_group_ranges(offsets: jax.Array, num_tiles: int, tm: int) -> tuple[jax.Array, jax.Array]:
  """For each row tile i, the groups ``lo[i] <= g < hi[i]`` whose rows may intersect ``[i*tm, (i+1)*tm)``.

  lo = number of groups that end at or before the tile's first row; hi = number of groups that start before
  the tile's end. Empty groups inside the range are skipped by the kernel.
  """
  starts, ends = offsets[:-1], offsets[1:]
  first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
  lo = jnp.searchsorted(ends, first_row, side="right").astype(jnp.int32)
  hi = jnp.searchsorted(starts, first_row + tm, side="left").astype(jnp.int32)
  return lo, jnp.maximum(hi, lo)


# ------------------------------------------------------------------------------------------------------------
# gmm: out[rows of g] = epilogue(lhs[rows of g] @ W_r[g] for each rhs r).

def _gmm_kernel(offsets_ref, lo_ref, hi_ref, *refs, n_lhs: int, n_rhs: int, tm: int, tk: int, tn: int,
                num_k: int, transpose_rhs: bool, precision, epilogue: Callable):
  lhs_refs, rhs_refs, out_refs = refs[:n_lhs], refs[n_lhs:n_lhs + n_rhs], refs[n_lhs + n_rhs:]
  # n_lhs == 1: one accumulator per rhs (lhs @ W_r). n_lhs == n_rhs > 1: one accumulator, sum_r lhs_r @ W_r.
  n_acc = n_rhs if n_lhs == 1 else 1
  j = pl.program_id(0)  # column tile (fastest on GPU)
  i = pl.program_id(1)  # row tile
  row0 = pl.multiple_of(i * tm, tm)
  col0 = pl.multiple_of(j * tn, tn)
  rows = row0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  zeros = tuple(jnp.zeros((tm, tn), jnp.float32) for _ in range(n_acc))

  def group_body(g, accs):
    start = offsets_ref[g]
    end = offsets_ref[g + 1]
    # Empty group: no K loop at all. Integer arithmetic, not jnp.where: a select of two constants lowers to an
    # i1 loop bound in Triton IR, which fails verification.
    trip = jnp.clip(end - start, 0, 1) * num_k
    # Rows of other groups read as zero, so this group's products land only on its own rows and one
    # accumulator (per rhs) carries through both loops: no second [tm, tn] tile live in registers.
    in_group = (rows >= start) & (rows < end)

    def k_body(kk, accs):
      k0 = pl.multiple_of(kk * tk, tk)
      lhs_tiles = [_masked_load(ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], in_group) for ref in lhs_refs]
      prods = []
      for r, rhs_ref in enumerate(rhs_refs):
        a = lhs_tiles[0 if n_lhs == 1 else r]
        if transpose_rhs:
          prods.append(_dot(a, rhs_ref[g, pl.ds(col0, tn), pl.ds(k0, tk)], _DOT_NT, precision))
        else:
          prods.append(_dot(a, rhs_ref[g, pl.ds(k0, tk), pl.ds(col0, tn)], _DOT_NN, precision))
      if n_acc == 1:
        prods = [functools.reduce(lambda x, y: x + y, prods)]
      return tuple(acc + prod for acc, prod in zip(accs, prods))

    return lax.fori_loop(0, trip, k_body, accs)

  accs = lax.fori_loop(lo_ref[i], hi_ref[i], group_body, zeros)
  outs = epilogue(*accs)
  for out_ref, out in zip(out_refs, outs):
    out_ref[...] = out.astype(out_ref.dtype)


def identity_epilogue(*accs):
  return accs


def swiglu_epilogue(gate, up):
  return (gate * jax.nn.sigmoid(gate) * up,)


def gmm(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], offsets: jax.Array, *,
        tiling: tuple[int, int, int], out_dtypes: Sequence, transpose_rhs: bool = False,
        epilogue: Callable = identity_epilogue, precision=None, num_warps: int | None = None,
        num_stages: int | None = None, interpret: bool = False) -> tuple[jax.Array, ...]:
  """Padded grouped matmul. Each lhs [M, K]; each rhs [G, K, N] ([G, N, K] if transpose_rhs); tile multiples.

  One lhs: one float32 accumulator per rhs (``lhs @ W_r``). As many lhs as rhs: a single accumulator holding
  ``sum_r lhs_r @ W_r``. ``epilogue`` maps the accumulators to the outputs (one per ``out_dtypes``), each
  [M, N].
  """
  tm, tk, tn = tiling
  m, k = lhs[0].shape
  n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
  assert len(lhs) in (1, len(rhs)), (len(lhs), len(rhs))
  assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs[0].shape, rhs[0].shape, tiling)
  tiles_m, tiles_n = m // tm, n // tn
  lo, hi = tile_group_ranges(offsets, tiles_m, tm)
  kernel = functools.partial(
      _gmm_kernel, n_lhs=len(lhs), n_rhs=len(rhs), tm=tm, tk=tk, tn=tn, num_k=k // tk,
      transpose_rhs=transpose_rhs, precision=precision, epilogue=epilogue)
  out_spec = pl.BlockSpec((tm, tn), lambda j, i: (i, j))
  flops = 2 * m * k * n * len(rhs)
  bytes_accessed = (sum(x.size * x.dtype.itemsize for x in lhs) * tiles_n
                    + sum(r.size * r.dtype.itemsize for r in rhs)
                    + sum(m * n * jnp.dtype(d).itemsize for d in out_dtypes))
  return tuple(pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((m, n), d) for d in out_dtypes],
      grid=(tiles_n, tiles_m),
      in_specs=[pl.no_block_spec] * (3 + len(lhs) + len(rhs)),  # whole arrays; the kernel slices with pl.ds
      out_specs=[out_spec] * len(out_dtypes),
      compiler_params=None if interpret else compiler_params(num_warps, num_stages),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
      name="joyjax_gmm",
  )(offsets, lo, hi, *lhs, *rhs))


# ------------------------------------------------------------------------------------------------------------
# tgmm: out[g] = lhs[rows of g].T @ dout[rows of g].

def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm: int, tk: int, tn: int, precision):
  j = pl.program_id(0)  # N tile (fastest on GPU)
  kt = pl.program_id(1)  # K tile
  g = pl.program_id(2)  # group
  start = offsets_ref[g]
  end = offsets_ref[g + 1]
  t_lo = start // tm
  t_hi = t_lo + jnp.clip(end - start, 0, 1) * ((end + tm - 1) // tm - t_lo)  # empty group: no iterations
  k0 = pl.multiple_of(kt * tk, tk)
  n0 = pl.multiple_of(j * tn, tn)

  def body(t, acc):
    r0 = pl.multiple_of(t * tm, tm)
    rows = r0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    in_group = (rows >= start) & (rows < end)
    a = _masked_load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)], in_group)
    b = _masked_load(dout_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], in_group)
    return acc + _dot(a, b, _DOT_TN, precision)

  acc = lax.fori_loop(t_lo, t_hi, body, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs: jax.Array, dout: jax.Array, offsets: jax.Array, *, num_groups: int,
         tiling: tuple[int, int, int], out_dtype, precision=None, num_warps: int | None = None,
         num_stages: int | None = None, interpret: bool = False) -> jax.Array:
  """Padded transposed grouped matmul: lhs [M, K], dout [M, N] -> [G, K, N]; M, K, N tile multiples."""
  tm, tk, tn = tiling
  m, k = lhs.shape
  n = dout.shape[1]
  assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs.shape, dout.shape, tiling)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, precision=precision)
  flops = 2 * m * k * n
  bytes_accessed = (lhs.size * lhs.dtype.itemsize * (n // tn) + dout.size * dout.dtype.itemsize * (k // tk)
                    + num_groups * k * n * jnp.dtype(out_dtype).itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(n // tn, k // tk, num_groups),
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.BlockSpec((None, tk, tn), lambda j, kt, g: (g, kt, j)),
      compiler_params=None if interpret else compiler_params(num_warps, num_stages),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
      name="joyjax_tgmm",
  )(offsets, lhs, dout)
