"""The model's own account of its parameters and statistics, so nothing outside ``model/`` hard-codes a path.

* ``param_info(cfg)``: per parameter, the metadata its layer declared when creating it (``layers.param``):
  logical axes, the Muon input axes (or None), weight decay, whether it is a routed expert's weight, and
  whether it is the router's selection bias (a statistic the trainer moves, never a gradient parameter),
  whether the optimizer trains it (with LoRA on, only the adapters) and, for a LoRA adapter, its side and
  the weight it adapts. The optimizer labels, the shardings, the planner and the parameter counts read it.
* ``aux_summary(aux)``: the forward pass's per-stack MoE statistics reduced to what the losses and metrics use.
* ``update_router_biases(params, expert_counts, rate)``: the aux-loss-free bias update of every MoE layer
  (decoder and MTP) from its own token counts.
* ``count_params(cfg)``: total and activated parameters from shapes only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from joyjax.model.layers import RouterBias
from joyjax.model.transformer import (MTP_STACK, STACKS, abstract_module, abstract_params, lora_enabled, model_cfg,
                                      parts)
from joyjax.tree import path_names


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """What one parameter is (a pytree leaf: not a tuple, so trees of it map cleanly)."""
  axes: tuple[str, ...]                    # logical axis names ('layers' first in stacks)
  muon_inputs: tuple[str, ...] | None      # axes contracted with the input when Muon orthogonalises it
  decay: bool                              # decoupled weight decay applies
  routed: bool                             # a routed expert's weight (top-k of E active per token)
  frozen: bool                             # the router's selection bias: moved by the trainer, not the optimizer
  # What the optimizer updates: everything but the router bias; with LoRA on (model.lora.rank > 0) only the
  # adapters (every base weight is then frozen: no update, no optimizer state, no gradient).
  trainable: bool = True
  adapter: str | None = None               # LoRA: 'a' ([*inputs, r]) or 'b' ([r, *outputs]) of an adapter
  adapts: str | None = None                # LoRA: the name of the sibling weight the adapter modifies
  group: str | None = None                 # config.PARAM_GROUPS member of a base matrix (quant.targets), else None


def is_info(x) -> bool:
  return isinstance(x, ParamInfo)


def _info(v: nnx.Variable, stacked: bool, lora: bool) -> ParamInfo:
  md = v.get_metadata()
  axes = tuple(md["logical_axes"])
  axes = ("layers",) + axes if stacked else axes
  if isinstance(v, RouterBias):  # a statistic: no optimizer, no decay
    return ParamInfo(axes=axes, muon_inputs=None, decay=False, routed=False, frozen=True, trainable=False)
  adapter = md.get("adapter")  # only adapters declare it (adapters.add_adapter)
  return ParamInfo(axes=axes, muon_inputs=md["muon_inputs"], decay=md["decay"], routed=md["routed"], frozen=False,
                   trainable=adapter is not None or not lora, adapter=adapter, adapts=md.get("adapts"),
                   group=md["group"])


def param_info(cfg) -> dict:
  """``ParamInfo`` of every parameter: the same tree as ``model.init(cfg, key)``."""
  m = model_cfg(cfg)
  lora = lora_enabled(m)
  out = {}
  for name in parts(m):
    state = nnx.state(abstract_module(m, name))
    info = jax.tree.map(lambda v, s=name in STACKS: _info(v, s, lora), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    out[name] = nnx.to_pure_dict(info) if isinstance(info, nnx.State) else info
  return out


def logical_axes(cfg) -> dict:
  """Logical axis names of every parameter, the same tree as ``init``; stacks get a leading 'layers'."""
  return jax.tree.map(lambda i: i.axes, param_info(cfg), is_leaf=is_info)


# ------------------------------------------------------------------------------------------ MoE statistics


def aux_summary(aux: dict) -> dict:
  """The forward pass's aux (per stack, stacked over its layers) reduced for losses and metrics:

  expert_counts: {stack: [layers, E]} tokens routed to each expert, for every stack with MoE layers (decoder
    and MTP): what ``update_router_biases`` consumes;
  layer_counts: [moe layers, E] the decoder's counts (MTP apart), for the expert-load metrics;
  balance: the sequence-wise balance loss summed over the decoder's MoE layers (each a mean over sequences);
  dropped_tokens: (token, slot) rows dropped by expert-parallel capacity in the decoder's MoE layers.
  """
  counts = {name: a["expert_counts"] for name, a in aux.items() if "expert_counts" in a}
  decoder = [aux[name] for name in STACKS if name != MTP_STACK and "expert_counts" in aux.get(name, {})]
  zero = jnp.zeros((), jnp.float32)
  return {
      "expert_counts": counts,
      "layer_counts": (jnp.concatenate([a["expert_counts"] for a in decoder]) if decoder
                       else jnp.zeros((0, 0), jnp.float32)),
      "balance": sum((jnp.sum(a["balance"]) for a in decoder), zero) if decoder else zero,
      "dropped_tokens": sum((jnp.sum(a["dropped_tokens"]) for a in decoder), zero) if decoder else zero,
  }


def update_router_bias(bias, counts, rate: float):
  """bias [..., E] += rate * sign(mean(counts) - counts) over the expert axis (float32): DeepSeek-V3's
  aux-loss-free balancing moves an overloaded expert's bias down and an idle one's up."""
  mean = jnp.mean(counts, axis=-1, keepdims=True)
  return (bias.astype(jnp.float32) + rate * jnp.sign(mean - counts)).astype(bias.dtype)


def update_router_biases(cfg, params: dict, expert_counts: dict, rate: float) -> dict:
  """``params`` with every router bias moved by ``update_router_bias`` with the counts of its own stack
  (``aux_summary(aux)['expert_counts']``, summed over the step's micro-batches)."""
  info = param_info(cfg)

  def update(path, leaf, i):
    if not i.frozen:
      return leaf
    stack = path_names(path)[0]
    return update_router_bias(leaf, expert_counts[stack], rate) if stack in expert_counts else leaf

  return jax.tree_util.tree_map_with_path(lambda p, x, i: update(p, x, i), params, info)


# ------------------------------------------------------------------------------------------------ counts


def _size(leaves) -> int:
  return sum(math.prod(x.shape) for x in leaves)


def count_params(cfg) -> dict:
  """Counts of the main model (MTP modules reported apart, as published counts exclude them).

  ``activated`` counts, per token, the top-k routed experts of each MoE layer instead of all of them. The router
  bias is a statistic, not a parameter, and is not counted. LoRA adapters are not part of the model's counts:
  ``lora_adapters`` counts them (MTP included), the parameters a LoRA run trains.
  """
  e = model_cfg(cfg).moe
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  info = jax.tree.leaves(param_info(cfg), is_leaf=is_info)
  lora = _size([x for (_, x), i in zip(flat, info) if i.adapter])
  rows = [(path_names(p)[0], x, i) for (p, x), i in zip(flat, info) if not i.frozen and not i.adapter]
  main = [(s, x, i) for s, x, i in rows if s != MTP_STACK]
  mtp = [(s, x, i) for s, x, i in rows if s == MTP_STACK]
  inactive = lambda part: sum(_size([x]) - _size([x]) * e.num_experts_per_tok // max(e.num_experts, 1)
                              for _, x, i in part if i.routed)
  total = _size([x for _, x, _ in main])
  embeddings = _size([x for _, x, i in main if "vocab" in i.axes])
  activated = total - inactive(main)
  mtp_total = _size([x for _, x, _ in mtp])
  return {
      "total": total, "total_without_embeddings": total - embeddings,
      "activated": activated, "activated_without_embeddings": activated - embeddings,
      "embeddings": embeddings, "routed_experts": _size([x for _, x, i in main if i.routed]),
      "mtp_total": mtp_total, "mtp_activated": mtp_total - inactive(mtp), "lora_adapters": lora,
  }


def format_counts(counts: dict) -> str:
  rows = [("total", "total"), ("total, no embeddings", "total_without_embeddings"),
          ("activated per token", "activated"), ("activated, no embeddings", "activated_without_embeddings"),
          ("embeddings + head", "embeddings"), ("routed experts", "routed_experts"),
          ("MTP modules (apart)", "mtp_total"), ("MTP activated", "mtp_activated")]
  if counts.get("lora_adapters"):
    rows.append(("LoRA adapters (trained)", "lora_adapters"))
  return "\n".join(f"{label:<26}{counts[k]:>16,d}  ({counts[k] / 1e9:7.3f} B)" for label, k in rows)
