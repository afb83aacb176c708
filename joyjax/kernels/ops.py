"""Public MoE dispatch ops and backend selection."""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from joyjax.config import MOE_IMPLS
from joyjax.errors import ConfigError
from joyjax.kernels import pallas_backend, reference

ENV_VAR = "JOYJAX_MOE_IMPL"

_log = logging.getLogger(__name__)


def resolve_impl(impl: str = "auto") -> str:
  """The backend to use: the environment override first, then ``impl``, with ``auto`` per platform.

  ``auto`` is decided once per process from facts about the hardware (``auto_impl``), never by running a
  kernel, so it is the same whether it is first asked for inside ``jax.jit`` tracing or outside. ``pallas``
  on a platform where the compiled kernels cannot run is a ``ConfigError``, never a silent fallback.
  """
  from_env = os.environ.get(ENV_VAR, "")
  impl = from_env or impl
  source = ENV_VAR if from_env else "model.moe.impl"
  if impl not in MOE_IMPLS:
    raise ConfigError(f"unknown MoE impl {impl!r} (from {source}); choose one of {MOE_IMPLS}")
  if impl == "auto":
    return auto_impl()
  if impl == "pallas":
    why_not = pallas_backend.unsupported_reason(pallas_backend.hardware())
    if why_not is not None:
      raise ConfigError(
          f"{source}=pallas cannot run here: {why_not}. Set {source} to auto (which picks "
          f"{auto_impl()} here), ragged_dot or reference; pallas_interpret runs the same kernels in the "
          "Pallas interpreter (slow, for CPU tests)")
  return impl


@functools.lru_cache(maxsize=None)
def auto_impl() -> str:
  """What ``impl='auto'`` means in this process: ``pallas`` where the compiled kernels can run (an NVIDIA GPU
  of compute capability >= 8.0 with Triton importable, or a TPU with megablox), else ``ragged_dot``. Decided
  once from ``pallas_backend.hardware()`` (plain Python facts: no computation, safe inside a trace) and logged
  once with the reason; ``clear_backend_choice`` forgets it."""
  hw = pallas_backend.hardware()
  why_not = pallas_backend.unsupported_reason(hw)
  impl = "pallas" if why_not is None else "ragged_dot"
  _log.info("MoE grouped matmul backend: model.moe.impl=auto -> %s (%s%s)", impl,
            pallas_backend.describe_hardware(hw), "" if why_not is None else f"; pallas not used: {why_not}")
  return impl


def clear_backend_choice() -> None:
  """Forgets the cached hardware facts and ``auto`` choice (tests that pretend another platform)."""
  auto_impl.cache_clear()
  pallas_backend.hardware.cache_clear()


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   preferred_element_type=None) -> jax.Array:
  """out[i] = lhs[i] @ rhs[g(i)] where rows are grouped contiguously by ``group_sizes``.

  lhs: [M, K]; rhs: [G, K, N]; group_sizes: [G] int32 with sum <= M (rows past the sum give zeros).
  """
  impl = resolve_impl(impl)
  out_dtype = preferred_element_type or lhs.dtype
  if impl == "reference":
    return reference.gmm(lhs, rhs, group_sizes).astype(out_dtype)
  if impl == "ragged_dot":
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return _zero_tail(out, group_sizes).astype(out_dtype)
  return pallas_backend.gmm(lhs, rhs, group_sizes, interpret=(impl == "pallas_interpret")).astype(out_dtype)


def grouped_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto", fused: bool = False) -> jax.Array:
  """``silu(x @ w_gate[g]) * (x @ w_up[g])`` per group: an expert's SwiGLU input projection.

  x: [M, K]; w_gate, w_up: [G, K, F]; returns [M, F] in ``x.dtype``. ``fused`` (Pallas impls only) computes
  both matmuls and the SwiGLU in one kernel (``pallas_backend.gmm_swiglu``: float32 accumulators, the
  activation applied before the single cast); otherwise two grouped matmuls and the SwiGLU in ``x.dtype``.
  """
  impl = resolve_impl(impl)
  if fused and impl in ("pallas", "pallas_interpret"):
    return pallas_backend.gmm_swiglu(x, w_gate, w_up, group_sizes, interpret=(impl == "pallas_interpret"))
  gate = grouped_matmul(x, w_gate, group_sizes, impl=impl)
  up = grouped_matmul(x, w_up, group_sizes, impl=impl)
  return jax.nn.silu(gate) * up


def _zero_tail(out, group_sizes):
  valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], out, 0)


def permute(x: jax.Array, expert_ids: jax.Array, num_experts: int):
  """Gathers token rows into expert-sorted order.

  x: [T, H]; expert_ids: [T, k] int. Returns (x_sorted [T*k, H], group_sizes [E] int32, order [T*k]) where
  ``order[j]`` is the flat (token * k + slot) index of sorted row j. Sorting is stable, so rows of one expert keep
  token order. The backward pass is a gather through the inverse permutation and a sum over the k slots (no
  scatter-add, which serialises on GPUs).
  """
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  k = expert_ids.shape[-1]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return _gather_rows(x, order, k), group_sizes, order


def inverse_permutation(order: jax.Array) -> jax.Array:
  """``inv`` with ``inv[order[j]] = j``: one scatter of unique indices, O(n) with no atomics, where
  ``argsort(order)`` would sort (O(n log n); a full sort pass per call on a GPU)."""
  n = order.shape[0]
  return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_rows(x, order, k: int):
  return jnp.take(x, order // k, axis=0)


def _gather_rows_fwd(x, order, k):
  return _gather_rows(x, order, k), order


def _gather_rows_bwd(k, order, d_sorted):
  inv = inverse_permutation(order)  # sorted row of (token, slot)
  t = order.shape[0] // k
  dx = jnp.take(d_sorted, inv, axis=0).reshape(t, k, -1).sum(axis=1, dtype=jnp.float32)
  return dx.astype(d_sorted.dtype), None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def unpermute(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted combine back to token order, accumulated in float32.

  y_sorted: [T*k, N]; order: from ``permute``; weights: [T, k]. Returns [T, N] float32:
  out[t] = sum_s weights[t, s] * y[row of (t, s)].
  """
  return _combine(y_sorted, order, weights)


@jax.custom_vjp
def _combine(y_sorted, order, weights):
  t, k = weights.shape
  inv = inverse_permutation(order)  # row of (t, s) in sorted order
  y = jnp.take(y_sorted, inv, axis=0).astype(jnp.float32).reshape(t, k, -1)
  return jnp.einsum("tkn,tk->tn", y, weights.astype(jnp.float32))


def _combine_fwd(y_sorted, order, weights):
  return _combine(y_sorted, order, weights), (y_sorted, order, weights)


def _combine_bwd(res, dout):
  """d_y_sorted[j] = w[order[j]] * dout[token of order[j]] (a gather in sorted order);
  d_w[t, s] = <y[row of (t, s)], dout[t]>."""
  y_sorted, order, weights = res
  t, k = weights.shape
  dout = dout.astype(jnp.float32)
  w_sorted = weights.reshape(-1)[order].astype(jnp.float32)
  dy = (jnp.take(dout, order // k, axis=0) * w_sorted[:, None]).astype(y_sorted.dtype)
  inv = inverse_permutation(order)
  y = jnp.take(y_sorted, inv, axis=0).astype(jnp.float32).reshape(t, k, -1)
  dw = jnp.einsum("tkn,tn->tk", y, dout).astype(weights.dtype)
  return dy, None, dw


_combine.defvjp(_combine_fwd, _combine_bwd)
