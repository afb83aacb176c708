"""Shared memory of the Triton-lowered grouped-matmul kernels: the footprint of a tiling, and a chooser that
shrinks pipeline stages, then tiles, until a kernel fits the device.

Footprint of one program (thread block), in bytes::

  smem = max(num_stages * sum over the tiles loaded per loop step of (rows * cols * itemsize),
             tm * tn * 4)                                    # the epilogue's float32 accumulator tile

Source: Triton software-pipelines the loop that feeds ``tl.dot`` (the K loop of ``gmm``, the row loop of
``tgmm``; both stay ``scf.for`` in our IR) by keeping a ring of shared-memory copies of every tile loaded in
the loop, so the next loads are in flight while the current tiles are multiplied: ``num_stages - 1`` copies
on Ampere and one more on Hopper when the dot lowers to wgmma (MMAv3). We count ``num_stages`` copies of
every loaded tile, the upper bound, which is also the rule Triton's own matmul autotuner prunes configs by
(``(BLOCK_M + BLOCK_N) * BLOCK_K * num_stages * dtsize`` in ``triton/ops/matmul_perf_model.py``), here summed
over however many operand tiles a kernel loads per step. Float32 accumulators live in registers; the
epilogue may pass one [tm, tn] tile through shared memory to re-layout it for the store, after the loop, when
the pipeline buffers are free: hence the max, not a sum. Loaded tiles per step, with tiles (tm, tk, tn):

  gmm forward / d_lhs (rhs read transposed)  lhs [tm, tk] + rhs [tk, tn]          (n_lhs = n_rhs = 1)
  fused SwiGLU forward / its recompute       lhs [tm, tk] + gate, up [tk, tn]     (n_lhs = 1, n_rhs = 2)
  fused SwiGLU d_lhs                         d_gate, d_up [tm, tk] + gate, up [tn, tk]   (2, 2)
  tgmm (d_rhs; tm is its contraction)        lhs [tm, tk] + d_out [tm, tn]

Check against the H200 measurement of issue 11 (Triton reported "Required: 262144, Hardware limit: 232448"):
at the old defaults (tiles 128x64x128, 4 stages) the float32 gmm forward / d_lhs kernels and the bf16 fused
SwiGLU d_lhs kernel both come to 4 * (128*64 + 64*128) * 4 = 4 * (2*128*64 + 2*128*64) * 2 = 262,144 bytes.

Operands are all cast to one dtype before the kernels run (``pallas_backend``), so one ``itemsize`` serves.
"""

from __future__ import annotations

# Hopper (sm_90) and Blackwell (sm_100): the most shared memory one thread block may opt in to.
SMEM_LIMIT_BYTES = 232448

# CUDA C Programming Guide, "Technical Specifications per Compute Capability": maximum shared memory per
# thread block (opt-in), by (major, minor). Unknown devices get SMEM_LIMIT_BYTES.
SMEM_LIMIT_BY_COMPUTE_CAPABILITY = {
    (8, 0): 166912,  # A100: 163 KB
    (8, 6): 101376,  # RTX 30xx, A40: 99 KB
    (8, 7): 166912,  # Jetson Orin
    (8, 9): 101376,  # L4, L40, RTX 40xx
    (9, 0): 232448,  # H100, H200: 227 KB
    (10, 0): 232448,  # B200
    (12, 0): 101376,  # RTX 50xx
}

TRITON_DEFAULT_STAGES = 3  # what the Pallas Triton lowering uses when num_stages is None
MIN_TILE = 16  # tl.dot needs >= 16 along every dimension


def smem_limit_bytes(compute_capability: tuple[int, int] | None) -> int:
  """Shared memory one block may use on a GPU of this compute capability (SMEM_LIMIT_BYTES if unknown)."""
  if compute_capability is None:
    return SMEM_LIMIT_BYTES
  return SMEM_LIMIT_BY_COMPUTE_CAPABILITY.get(tuple(compute_capability), SMEM_LIMIT_BYTES)


def smem_bytes(tiles: tuple[int, int, int], num_stages: int | None, itemsize: int, *, n_lhs: int = 1,
               n_rhs: int = 1, tgmm: bool = False) -> int:
  """Shared-memory footprint (bytes) of one program of a kernel with these tiles (see the module docstring).

  gmm kernels (``tgmm=False``): tiles (tm, tk, tn), ``n_lhs`` [tm, tk] and ``n_rhs`` [tk, tn] tiles per step.
  tgmm: tiles (tm, tk, tn) with tm the contraction, a [tm, tk] and a [tm, tn] tile per step.
  """
  tm, tk, tn = (int(t) for t in tiles)
  stages = TRITON_DEFAULT_STAGES if num_stages is None else int(num_stages)
  if tgmm:
    per_step = tm * tk + tm * tn
    epilogue = tk * tn * 4
  else:
    per_step = n_lhs * tm * tk + n_rhs * tk * tn
    epilogue = tm * tn * 4
  return max(stages * per_step * int(itemsize), epilogue)


def fit_smem(tiles: tuple[int, int, int], num_stages: int | None, itemsize: int, limit: int, *,
             n_lhs: int = 1, n_rhs: int = 1, tgmm: bool = False) -> tuple[tuple[int, int, int], int]:
  """(tiles, num_stages) that fit ``limit`` bytes: the given ones if they fit; else fewer stages first (down
  to 2, the least that still overlaps loads with math), then the contraction tile halved (down to 32), then
  the larger output tile halved (down to 32), then 1 stage, then any tile down to 16. Tiles stay powers of
  two if they were. Raises ValueError if even 16x16x16 with 1 stage does not fit.
  """
  tiles = [int(t) for t in tiles]
  stages = TRITON_DEFAULT_STAGES if num_stages is None else int(num_stages)
  contraction = 0 if tgmm else 1  # tgmm contracts over its rows (tm); gmm over tk
  outputs = (1, 2) if tgmm else (0, 2)

  def size():
    return smem_bytes(tuple(tiles), stages, itemsize, n_lhs=n_lhs, n_rhs=n_rhs, tgmm=tgmm)

  while size() > limit:
    largest_out = max(outputs, key=lambda i: tiles[i])
    if stages > 2:
      stages -= 1
    elif tiles[contraction] > 32:
      tiles[contraction] //= 2
    elif tiles[largest_out] > 32:
      tiles[largest_out] //= 2
    elif stages > 1:
      stages = 1
    elif max(tiles) > MIN_TILE:
      tiles[tiles.index(max(tiles))] //= 2
    else:
      raise ValueError(f"no tiling fits {limit} bytes of shared memory (itemsize {itemsize}, {n_lhs} lhs, "
                       f"{n_rhs} rhs, tgmm={tgmm})")
  return (tiles[0], tiles[1], tiles[2]), stages
