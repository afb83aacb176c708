"""Pure-JAX reference grouped matmul: exact, platform-independent, used as the oracle in tests."""

import jax
import jax.numpy as jnp


def group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """Group index of each row; rows past sum(group_sizes) get G (out of range)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Per-row gather of the row's expert weights, accumulated in float32. [M, K] x [G, K, N] -> [M, N]."""
  m = lhs.shape[0]
  g = rhs.shape[0]
  gid = group_ids(group_sizes, m)

  # Loop over experts with a mask: memory stays O(M * N), never O(M * K * N).
  def body(i, acc):
    part = jnp.dot(lhs, rhs[i], preferred_element_type=jnp.float32)
    return acc + jnp.where((gid == i)[:, None], part, 0.0)

  return jax.lax.fori_loop(0, g, body, jnp.zeros((m, rhs.shape[2]), jnp.float32))
