"""Expert parallelism for the routed experts: tokens travel to the shard that holds their expert and back.

Layout (mesh axes ``('dcn_data', 'data', 'fsdp', 'expert', 'tensor')``, any subset):

* experts are sharded over ``expert`` (``E / ep`` local experts per shard);
* tokens are sharded over the mesh axes of the ``batch`` rule (``joyjax.axes``; by default ``dcn_data``,
  ``data``, ``fsdp``, ``expert``) present with size > 1: outside the MoE the expert axis acts as one more data
  axis. A ``mesh.rules`` override of ``batch`` reaches here through the model's forward;
* ``tensor`` (and any other axis) is replicated inside the MoE.

Inside ``shard_map`` each shard

1. orders its ``T_local * k`` (token, slot) rows by destination expert shard (stable, so rows keep
   (token, slot) order within a destination) and packs them into a static buffer ``[ep, C, H]``;
2. exchanges the buffers with ``jax.lax.all_to_all`` over ``expert`` (the local expert id of each row travels
   with it, ``E / ep`` marking an empty slot);
3. runs its local experts on what it received with the ``joyjax.kernels`` grouped matmuls (received rows are
   sorted by local expert, empty slots last: they are past ``sum(group_sizes)``, so they give zeros and get a
   zero gradient);
4. sends the results back with the reverse ``all_to_all``; the source combines them with the routing weights
   in float32.

Buffer size ``C`` per destination shard:

* dropless (``capacity_factor == 0``): ``C = T_local * k``, the worst case (every local row bound for one
  shard), so nothing is ever dropped. Communication and grouped-matmul rows are ``ep`` times the routed rows.
* capacity (``capacity_factor > 0``): ``C = ceil(capacity_factor * T_local * k / ep)`` (at most
  ``T_local * k``). A source shard sends each destination shard its first ``C`` rows in (token, slot) order,
  i.e. row ``t * k + s`` of the local token block; later rows bound for that shard are dropped and contribute
  zero to their token's output. The returned ``dropped`` counts them over all shards.

Differentiable in ``flat``, ``weights`` and the expert weights (all pieces are gathers, ``where``s, the
``all_to_all`` (its own transpose) and the kernels' custom VJPs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from joyjax.axes import DEFAULT_RULES, EXPERT_AXIS, batch_axes as rule_batch_axes
from joyjax.model import adapters



# ------------------------------------------------------------------------------------- jax version compat


def _shard_map(f, *, mesh, in_specs, out_specs):
  """``jax.shard_map`` (``check_vma``) or, on older jax, ``jax.experimental.shard_map`` (``check_rep``).

  Type checking is off: the kernels' loops (e.g. the reference ``fori_loop``) start from unvarying carries.
  Gradients stay exact: replicated inputs (the expert weights over the data axes) get their cotangents psum'd
  by shard_map's transpose (tested against the unsharded loop)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pragma: no cover - older jax
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _explicit(mesh) -> bool:
  """Whether any axis of ``mesh`` is Explicit (sharding in types: shard_map inputs must already match)."""
  kind = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  return kind is not None and any(t == kind for t in (getattr(mesh, "axis_types", None) or ()))


def _reshard(x, spec, mesh):
  """``x`` resharded to ``spec`` (explicit-sharding meshes only: elsewhere shard_map reshards itself)."""
  fn = getattr(jax, "reshard", None) or jax.sharding.reshard
  target = jax.sharding.NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
  return fn(x, target)


def current_mesh():
  """The mesh the caller set (``jax.set_mesh(mesh)``, or the older ``jax.sharding.use_mesh``), as an abstract
  mesh, or None. Read with ``jax.sharding.get_abstract_mesh()`` (works inside and outside ``jit``); a legacy
  ``with mesh:`` context is honoured as a fallback."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  if mesh is not None and not mesh.empty:
    return mesh
  try:  # deprecated ``with mesh:``: not visible to get_abstract_mesh
    from jax._src import mesh as mesh_lib
    physical = mesh_lib.thread_resources.env.physical_mesh
    if not physical.empty:
      return physical.abstract_mesh
  except Exception:  # pragma: no cover - private API moved
    pass
  return None


def expert_axis_size(mesh) -> int:
  """Size of the ``expert`` axis of ``mesh`` when expert parallelism applies there (1 otherwise: no mesh, no
  such axis, or the axis already manual because we are inside a ``shard_map``)."""
  if mesh is None or EXPERT_AXIS not in mesh.axis_names:
    return 1
  if EXPERT_AXIS in set(getattr(mesh, "manual_axes", ()) or ()):
    return 1
  return int(dict(mesh.shape)[EXPERT_AXIS])


def token_axes_of(mesh, token_axes: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """The mesh axes tokens are sharded over inside the MoE: ``token_axes`` (the ``batch`` rule of the config's
  ``mesh.rules``; the default rule when None) that the mesh has with size > 1, in rule order."""
  sizes = dict(mesh.shape)
  wanted = rule_batch_axes(DEFAULT_RULES) if token_axes is None else token_axes
  return tuple(a for a in wanted if sizes.get(a, 1) > 1)


def capacity(tokens_local: int, top_k: int, ep: int, capacity_factor: float) -> int:
  """Rows each source shard may send each destination shard (see the module docstring)."""
  rows = tokens_local * top_k
  if capacity_factor <= 0:
    return rows
  return max(1, min(rows, math.ceil(capacity_factor * rows / ep)))


# ------------------------------------------------------------------------------------------------- the op


def expert_parallel_experts(flat, weights, ids, wi_gate, wi_up, wo, *, mesh, num_experts: int,
                            capacity_factor: float = 0.0, impl: str = "auto", dtype=None,
                            fuse_swiglu: bool = False, token_axes: tuple[str, ...] | None = None,
                            lora: tuple | None = None, lora_scale: float = 0.0):
  """Routed experts with the experts sharded over mesh axis ``expert``.

  flat: [T, H] tokens; weights: [T, k] routing weights; ids: [T, k] int expert ids in [0, num_experts);
  wi_gate, wi_up: [E, H, F]; wo: [E, F, H]; mesh: a ``Mesh`` or ``AbstractMesh`` with an ``expert`` axis
  dividing ``num_experts``; dtype: compute dtype of the expert matmuls (default ``flat.dtype``); fuse_swiglu:
  gate/up projections and SwiGLU in one Pallas kernel (``model.moe.fuse_swiglu``; Pallas impls only);
  token_axes: the mesh axes a batch is split over (the ``batch`` rule of ``mesh.rules``; None = the default);
  lora: the routed experts' LoRA adapters (``adapters.routed_adapters``: six [E, ...] arrays, sharded over
  ``expert`` like the weights) scaled by ``lora_scale``, or None.

  Returns (out [T, H] float32: ``out[t] = sum_s weights[t, s] * expert_{ids[t, s]}(flat[t])`` over the rows
  that were not dropped; dropped [] float32: the global number of dropped (token, slot) rows, 0 if dropless).
  ``T`` need not divide the number of token shards: it is padded with rows that are never sent.
  """
  if EXPERT_AXIS not in mesh.axis_names:
    raise ValueError(f"expert parallelism needs a mesh axis named {EXPERT_AXIS!r}; "
                     f"mesh has {mesh.axis_names}")
  ep = int(dict(mesh.shape)[EXPERT_AXIS])
  if num_experts % ep:
    raise ValueError(f"model.moe.num_experts={num_experts} must be divisible by the mesh 'expert' axis "
                     f"({ep})")
  dtype = dtype or flat.dtype
  explicit = _explicit(mesh)
  in_spec = jax.typeof(flat).sharding.spec if explicit else None
  t, h = flat.shape
  k = ids.shape[-1]
  axes = token_axes_of(mesh, token_axes)
  shards = math.prod(dict(mesh.shape)[a] for a in axes)
  pad = -t % shards
  if pad:  # e.g. decode with one token: padded rows are marked invalid and never leave their shard
    flat = jnp.pad(flat, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, ((0, pad), (0, 0)))
  t_local = (t + pad) // shards
  cap = capacity(t_local, k, ep, capacity_factor)
  local_experts = num_experts // ep

  body = _local_body(ep=ep, local_experts=local_experts, cap=cap, impl=impl, axes=axes, dtype=dtype,
                     fuse_swiglu=fuse_swiglu, lora_scale=lora_scale)
  tok = P(axes if axes else None, None)
  wspec = P(EXPERT_AXIS, None, None)
  w = [a.astype(dtype) for a in (wi_gate, wi_up, wo) + tuple(lora or ())]
  valid = (jnp.arange(t + pad) < t)[:, None]
  args = [flat.astype(dtype), weights, ids.astype(jnp.int32), valid, *w]
  specs = (tok,) * 4 + (wspec,) * len(w)
  if explicit:
    args = [_reshard(a, s, mesh) for a, s in zip(args, specs)]
  out, dropped = _shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok, P()))(*args)
  out = out[:t]
  if explicit:  # hand the tokens back laid out as they came
    out = _reshard(out, P(*in_spec), mesh)
  return out, dropped


def _inverse(perm):
  """The inverse of a permutation: inv[perm[i]] = i."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _local_body(*, ep: int, local_experts: int, cap: int, impl: str, axes, dtype, fuse_swiglu: bool = False,
                lora_scale: float = 0.0):
  """The per-shard program: dispatch -> all_to_all -> local experts -> all_to_all back -> combine."""

  def body(x, weights, ids, valid, wi_gate, wi_up, wo, *lora):
    tl, k = ids.shape
    rows = tl * k
    e = ids.reshape(-1)
    ok = jnp.broadcast_to(valid, (tl, k)).reshape(-1)
    dest = jnp.where(ok, e // local_experts, ep)  # destination shard; ep = never sent
    order = jnp.argsort(dest, stable=True)  # rows by destination, (token, slot) order within one
    counts = jnp.sum(dest[:, None] == jnp.arange(ep)[None, :], axis=0).astype(jnp.int32)  # [ep]
    start = jnp.cumsum(counts) - counts

    # Send buffer slot (j, c) holds sorted row start[j] + c when c < min(counts[j], cap).
    c_idx = jnp.arange(cap)
    slot_ok = c_idx[None, :] < jnp.minimum(counts, cap)[:, None]  # [ep, cap]
    src = jnp.take(order, jnp.clip(start[:, None] + c_idx[None, :], 0, rows - 1).reshape(-1))  # [ep * cap]
    slot_ok = slot_ok.reshape(-1)
    send_x = jnp.where(slot_ok[:, None], jnp.take(x, src // k, axis=0), 0).astype(dtype)
    dest_base = jnp.repeat(jnp.arange(ep, dtype=jnp.int32) * local_experts, cap)
    send_e = jnp.where(slot_ok, jnp.take(e, src) - dest_base, local_experts).astype(jnp.int32)

    def a2a(a):  # [ep * cap, ...]: block j goes to shard j; block i of the result came from shard i
      if ep == 1:
        return a
      blocks = a.reshape((ep, cap) + a.shape[1:])
      return jax.lax.all_to_all(blocks, EXPERT_AXIS, 0, 0, tiled=False).reshape(a.shape)

    recv_x, recv_e = a2a(send_x), a2a(send_e)

    # Local experts: sort received rows by local expert id, empty slots (id = local_experts) last.
    perm = jnp.argsort(recv_e, stable=True)
    x_sorted = jnp.take(recv_x, perm, axis=0)
    group_sizes = jnp.sum(recv_e[:, None] == jnp.arange(local_experts)[None, :], axis=0).astype(jnp.int32)
    y_sorted = adapters.expert_mlp(x_sorted, wi_gate, wi_up, wo, group_sizes, impl=impl, fused=fuse_swiglu,
                                   lora=lora or None, scale=lora_scale)
    y = jnp.take(y_sorted, _inverse(perm), axis=0)
    back = a2a(y)  # [ep * cap, H]: back[j * cap + c] answers send slot (j, c)

    # Combine at the source in float32. Row i = t * k + s has rank inv[i] - start[dest] in its destination.
    inv = _inverse(order)
    d_safe = jnp.minimum(dest, ep - 1)
    rank = inv - jnp.take(start, d_safe)
    kept = ok & (rank < cap)
    slot = jnp.clip(d_safe * cap + rank, 0, ep * cap - 1)
    yr = jnp.where(kept[:, None], jnp.take(back, slot, axis=0).astype(jnp.float32), 0.0)
    out = jnp.einsum("tkn,tk->tn", yr.reshape(tl, k, -1), weights.astype(jnp.float32))

    dropped = jnp.sum(jnp.maximum(counts - cap, 0)).astype(jnp.float32)
    if axes:
      dropped = jax.lax.psum(dropped, axes)
    return out, dropped

  return body
