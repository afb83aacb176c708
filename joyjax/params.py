"""Parameter counts from shapes only (``jax.eval_shape``): total and activated, with and without embeddings."""

from __future__ import annotations

import math

import jax

from joyjax import model

EXPERT_LEAVES = ("wi_gate", "wi_up", "wo")


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_params(cfg) -> dict:
  """Counts of the main model (MTP modules reported apart, as published counts exclude them).

  ``activated`` counts, per token, the top-k routed experts of each MoE layer instead of all of them. The router
  bias is a statistic, not a parameter, and is not counted.
  """
  m = cfg.model
  ab = model.abstract_params(cfg)

  def part(tree, drop_bias=True):
    if isinstance(tree, dict):
      return {k: part(v) for k, v in tree.items() if not (drop_bias and k == "router_bias")}
    return tree

  ab = part(ab)
  embeddings = _size(ab["embed"]) + _size(ab.get("lm_head", {}))
  main = {k: v for k, v in ab.items() if k != "mtp"}
  total = _size(main)
  experts = sum(_size(ab["moe_layers"]["mlp"][k]) for k in EXPERT_LEAVES) if "moe_layers" in ab else 0
  inactive = experts - experts * m.moe.num_experts_per_tok // max(m.moe.num_experts, 1)
  activated = total - inactive
  mtp = _size(ab.get("mtp", {}))
  mtp_experts = sum(_size(ab["mtp"]["block"]["mlp"][k]) for k in EXPERT_LEAVES) if mtp and m.moe.num_experts else 0
  mtp_active = mtp - (mtp_experts - mtp_experts * m.moe.num_experts_per_tok // max(m.moe.num_experts, 1))
  return {
      "total": total, "total_without_embeddings": total - embeddings,
      "activated": activated, "activated_without_embeddings": activated - embeddings,
      "embeddings": embeddings, "routed_experts": experts,
      "mtp_total": mtp, "mtp_activated": mtp_active,
  }


def format_counts(counts: dict) -> str:
  rows = [("total", "total"), ("total, no embeddings", "total_without_embeddings"),
          ("activated per token", "activated"), ("activated, no embeddings", "activated_without_embeddings"),
          ("embeddings + head", "embeddings"), ("routed experts", "routed_experts"),
          ("MTP modules (apart)", "mtp_total"), ("MTP activated", "mtp_activated")]
  return "\n".join(f"{label:<26}{counts[k]:>16,d}  ({counts[k] / 1e9:7.3f} B)" for label, k in rows)
