"""Pytree path helpers shared by the optimizer labels, the shardings, the planner and the checkpointer."""

from __future__ import annotations


def key_name(k) -> str:
  """The name of one pytree path entry: a dict key, an attribute name or a sequence index, as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> tuple[str, ...]:
  """A ``tree_flatten_with_path`` path as a tuple of names: ``('moe_layers', 'mlp', 'wo')``."""
  return tuple(key_name(k) for k in path)


def path_str(path) -> str:
  """A path as ``moe_layers/mlp/wo`` (``<root>`` for the empty path)."""
  return "/".join(path_names(path)) or "<root>"
