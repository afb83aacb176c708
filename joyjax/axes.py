"""Axis names and the logical-axis rules: which mesh axes each logical array dimension is split over.

The one home of the mesh axis names, the default rules and the ``mesh.rules`` grammar. Pure data and string
parsing (no jax), so the config validates ``mesh.rules`` and the model's expert parallelism reads the batch
axes without importing the sharding machinery (``joyjax.parallel.rules`` turns rules into shardings).

Rules
-----
A rule maps one logical axis name to a tuple of mesh axes (possibly empty: replicated). Encoded as a string
``'name=axis+axis,name=,...'`` (``cfg.mesh.rules``; ``''`` = the defaults) or as a sequence of
``(name, (axes...))`` pairs. The string in ``cfg.mesh.rules`` is merged over ``DEFAULT_RULES``: a name it gives
replaces that default (keeping the default's place in the order), new names are appended.

The defaults (MaxText-like): params are sharded FSDP-style over ``fsdp`` and ``expert`` (the expert axis acts
as more fsdp outside MoE layers), routed experts over ``expert``, heads / MLP width / vocab over ``tensor``,
replicated over ``dcn_data`` and ``data``; a batch is split over every data-parallel axis.
"""

from __future__ import annotations

import math
from typing import Sequence

MESH_AXES = ("dcn_data", "data", "fsdp", "expert", "tensor")
EXPERT_AXIS = "expert"

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("dcn_data", "data", "fsdp", "expert")
_FSDP = ("fsdp", "expert")

DEFAULT_RULES: Rules = (
    ("batch", _BATCH),         # activations / inputs: every data-parallel axis (listed first: claims first)
    ("expert", ("expert",)),   # routed experts (and the router's expert column)
    ("vocab", ("tensor",)),    # embedding rows, head columns
    ("heads", ("tensor",)),    # attention heads
    ("mlp", ("tensor",)),      # dense / shared / routed MLP width
    ("embed", _FSDP),          # residual width of every weight: the FSDP dim
    ("q_lora", _FSDP),         # q_b's input dim (q_a takes fsdp on embed first)
    ("kv_lora", _FSDP),        # kv_b's input dim and the kv norm
    ("mtp_in", _FSDP),         # MTP eh_proj input ([emb; hidden]); embed usually claims first
    ("seq", ()),
    ("layers", ()),            # the scanned stacking axis (a pipeline axis would go here)
    ("head_dim", ()),
)


def parse_rules(text: str | Sequence | None) -> Rules:
  """Rules from ``'name=a+b,name=,...'`` or ``[(name, axes), ...]``; checks mesh axis names.

  Raises ``ValueError`` naming the bad entry (the config turns it into a ``ConfigError`` on ``mesh.rules``)."""
  if text is None:
    return DEFAULT_RULES
  if isinstance(text, str):
    pairs = []
    for item in (s.strip() for s in text.split(",")):
      if not item:
        continue
      if "=" not in item:
        raise ValueError(f"mesh.rules: entry {item!r} must look like name=axis+axis (or name= to replicate)")
      name, axes = (s.strip() for s in item.split("=", 1))
      pairs.append((name, tuple(a.strip() for a in axes.split("+") if a.strip())))
  else:
    pairs = [(n, (a,) if isinstance(a, str) else tuple(a or ())) for n, a in text]
  seen = set()
  for name, axes in pairs:
    if not name:
      raise ValueError("mesh.rules: an entry has an empty logical name")
    if name in seen:
      raise ValueError(f"mesh.rules: logical name {name!r} is given twice")
    seen.add(name)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"mesh.rules: {name!r} names a mesh axis twice: {axes}")
  return tuple(pairs)


def merge_rules(base: Rules, override: Rules) -> Rules:
  """``override`` entries replace ``base``'s of the same name in place; new names are appended."""
  over = dict(override)
  merged = [(n, over.pop(n)) if n in over else (n, a) for n, a in base]
  merged += [(n, a) for n, a in override if n in over]
  return tuple(merged)


def format_rules(rules: Rules) -> str:
  return ",".join(f"{n}={'+'.join(a)}" for n, a in rules)


def get_rules(cfg=None) -> Rules:
  """The rules of ``cfg`` (``cfg.mesh.rules`` merged over ``DEFAULT_RULES``); the defaults for None or for a
  config without a ``mesh`` group (e.g. the ``model`` group alone)."""
  text = cfg.mesh.rules if cfg is not None and "mesh" in cfg else ""
  return merge_rules(DEFAULT_RULES, parse_rules(text)) if text else DEFAULT_RULES


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
  """The mesh axes a batch (and so each token) is split over: the ``batch`` rule, in rule order."""
  return tuple(dict(DEFAULT_RULES if rules is None else rules).get("batch", ()))


def data_parallel_size(mesh, rules: Rules | None = None) -> int:
  """How many ways a batch is split: the product of the 'batch' rule's mesh axes (global batch must divide).
  ``mesh``: a Mesh or AbstractMesh (an empty one: 1), or a {name: size} mapping."""
  sizes = dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)
  return math.prod(sizes.get(a, 1) for a in batch_axes(rules))
