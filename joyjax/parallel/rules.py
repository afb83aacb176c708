"""Logical-axis rules: from the logical names arrays carry to mesh axes, and the shardings they give.

The rules themselves (names, defaults, the ``mesh.rules`` grammar) live in ``joyjax.axes``.

How a spec is built (``logical_to_spec``)
-----------------------------------------
* Rule order is priority: the array's dims are resolved in the order their names appear in the rules, so an
  earlier rule claims its mesh axes first. A mesh axis is used at most once per spec; a later dim that names
  an already-claimed axis simply does without it. E.g. the router ``[layers, embed, expert]`` gets
  ``expert -> expert`` (listed first) and ``embed -> fsdp`` (``expert`` taken), whatever the dims' order.
* With a ``shape``: a mesh axis is used for a dim only if the product of the axes already chosen for that dim
  times its size divides the dim; otherwise it is skipped (and stays free for later dims). This keeps odd
  sizes (e.g. ``kv_a``'s kv_lora + rope width, a vocab not divisible by ``tensor``) legal instead of failing:
  the array is then replicated over that axis, which costs memory, not correctness. ``plan`` reports the
  real per-device bytes.
* Size-1 mesh axes are left out of specs (they shard nothing), so specs read cleanly.
* Names without a rule (and ``None``) are replicated.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from joyjax import model
from joyjax.axes import DEFAULT_RULES, Rules, get_rules, parse_rules
from joyjax.tree import path_names

def _mesh_sizes(mesh) -> dict[str, int]:
  return dict(mesh.shape)


def logical_to_spec(axes: Sequence[str | None], rules: Rules | str | None = None, mesh=None, *,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """The PartitionSpec of an array whose dims carry the logical names ``axes`` (see the module doc).

  ``mesh`` (a Mesh or AbstractMesh, or a {name: size} dict) gives the axis sizes; None = every mesh axis
  assumed larger than 1 and no divisibility check. ``shape``: the array's shape, enables the divisibility rule.
  """
  rules = DEFAULT_RULES if rules is None else (parse_rules(rules) if isinstance(rules, str) else rules)
  sizes = None if mesh is None else (dict(mesh) if isinstance(mesh, dict) else _mesh_sizes(mesh))
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical_to_spec: axes {tuple(axes)} do not match shape {tuple(shape)}")
  table = dict(rules)
  priority = {n: i for i, (n, _) in enumerate(rules)}
  order = sorted((i for i, n in enumerate(axes) if n is not None and n in table), key=lambda i: priority[axes[i]])
  used: set[str] = set()
  out: list[Any] = [None] * len(axes)
  for i in order:
    chosen: list[str] = []
    for a in table[axes[i]]:
      if a in used:
        continue
      size = 2 if sizes is None else sizes.get(a, 1)
      if size == 1:
        continue
      if shape is not None and shape[i] % (math.prod(sizes[c] for c in chosen) * size):
        continue
      chosen.append(a)
    used.update(chosen)
    out[i] = None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_sharding(axes, mesh, rules: Rules | None = None, *, shape=None) -> NamedSharding:
  """``NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape=shape))``."""
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape=shape))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_specs(cfg, mesh, abstract_params=None, rules: Rules | None = None) -> Any:
  """Tree of PartitionSpec for the params (by ``model.logical_axes(cfg)``, checked against the shapes)."""
  rules = get_rules(cfg) if rules is None else rules
  axes_tree = model.logical_axes(cfg)
  shapes = model.abstract_params(cfg) if abstract_params is None else abstract_params

  def spec(axes, leaf):
    if len(axes) != len(leaf.shape):
      raise ValueError(f"param with logical axes {axes} has shape {tuple(leaf.shape)}")
    return logical_to_spec(axes, rules, mesh, shape=leaf.shape)

  return jax.tree.map(spec, axes_tree, shapes, is_leaf=_is_axes)


def param_shardings(cfg, mesh, abstract_params=None, rules: Rules | None = None) -> Any:
  """Tree of NamedSharding for the params, the same structure as ``model.init(cfg, key)``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, abstract_params, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_specs(cfg, mesh, abstract_state, rules: Rules | None = None, abstract_params=None) -> Any:
  """Tree of PartitionSpec for any pytree holding params and optimizer state (see ``state_shardings``)."""
  rules = get_rules(cfg) if rules is None else rules
  axes_tree = model.logical_axes(cfg)
  flat_axes, _ = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)
  by_path = {path_names(p): a for p, a in flat_axes}
  depth = max(len(p) for p in by_path)

  def spec(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    names = path_names(path)
    for n in range(min(depth, len(names)), 0, -1):   # longest path suffix that names a param
      axes = by_path.get(names[-n:])
      if axes is not None:
        if len(axes) == len(shape):
          return logical_to_spec(axes, rules, mesh, shape=shape)
        break   # a factored / reshaped statistic of that param: replicate
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, abstract_state)


def state_shardings(cfg, mesh, abstract_state, rules: Rules | None = None) -> Any:
  """Tree of NamedSharding for ``abstract_state``: any pytree (dicts, optax states, dataclasses) of arrays or
  ShapeDtypeStructs that contains the params tree and/or optax state.

  Optax states mirror params subtrees (``mu['moe_layers']['mlp']['wo']``): a leaf whose path ends with a
  param's path and has the same rank gets that param's sharding (shape checked by the divisibility rule);
  anything else (step counts, scalars, factored statistics) is replicated.
  """
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(cfg, mesh, abstract_state, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(mesh=None, rules: Rules | None = None, ndim: int = 2) -> PartitionSpec:
  """PartitionSpec of a ``[batch, seq, ...]`` array: batch over the 'batch' rule's axes, the rest replicated."""
  rules = DEFAULT_RULES if rules is None else rules
  spec = logical_to_spec(("batch",), rules, mesh)
  return PartitionSpec(*(tuple(spec) or (None,)), *([None] * (ndim - 1)))


def batch_sharding(mesh, rules: Rules | None = None, ndim: int = 2) -> NamedSharding:
  """NamedSharding for ``[batch, seq]`` (``ndim`` dims) arrays: batch split over dcn_data, data, fsdp, expert."""
  return NamedSharding(mesh, batch_spec(mesh, rules, ndim))


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh) -> tuple[int, ...]:
  """The per-device block shape of an array of ``shape`` under ``spec`` (no devices needed)."""
  sizes = dict(mesh) if isinstance(mesh, dict) else _mesh_sizes(mesh)
  out = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    names: Iterable[str] = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
    n = math.prod(sizes[a] for a in names)
    out.append(-(-dim // n))
  return tuple(out)
