"""Per-device memory plan for a mesh, from abstract shapes only (nothing is allocated, no devices needed).

``plan(cfg, num_devices, *, device_memory_gib=0, batch_size=None, seq_len=None) -> dict``
``main(cfg, args)`` prints it as a table (``joyjax plan --config ... --devices 64 --config.mesh.fsdp=16 ...``).

What is counted, per device (bytes)
-----------------------------------
* ``params``: every leaf of ``model.abstract_params(cfg)`` at its shard shape under ``param_specs`` (the real
  rules, on the mesh shape ``mesh_shape(cfg, num_devices)``), times its dtype's size (``model.param_dtype``;
  with LoRA on, ``model.lora.base_dtype`` for the frozen base and ``param_dtype`` for the adapters).
* ``opt_state``: the leaves of ``jax.eval_shape(make_optimizer(cfg).init, params)`` at their shard shapes under
  ``state_specs`` (Muon: one momentum per Muon matrix; AdamW: mu and nu; step counts replicated; LoRA: the
  adapters' AdamW mu and nu only, frozen leaves keep no state).
* ``grads``: one gradient per param leaf, sharded like it; with LoRA on only the adapters' (the base weights sit
  behind ``stop_gradient``: their gradients are zero constants, not computed); twice that when
  ``train.grad_accum > 1`` (the accumulator and the micro-batch's gradient).
* ``gathered_weights``: FSDP all-gathers a block's weights before its matmuls; the largest block's weights
  gathered over ``fsdp`` and ``expert`` but still split over ``tensor`` and, for the routed experts' weights
  (``wi_gate``, ``wi_up``, ``wo``), over ``expert``, in ``model.dtype``, for 2 blocks (the current and the
  prefetched one).
* ``activations``: an estimate for one micro-batch of ``tokens`` = batch_size / grad_accum / data-parallel size
  sequences of ``seq_len`` on this device (bytes of ``model.dtype`` = b):
    - ``residual``: the block inputs saved for the backward pass, (num_layers + mtp layers) * tokens * hidden * b
      (remat 'full'); with remat 'none' / 'dots' / 'dots_no_batch' every block's working set is saved instead
      (an upper bound for the dots policies);
    - ``layer``: one block's working set during its recomputation: q / kv low-rank and per-head q, k, v and
      output (heads split over ``tensor``), the f32 attention scores and probabilities
      2 * seqs * heads * seq_len^2 * 4 (the xla attention materialises them; ``attention_impl=blockwise``
      holds one block pair at a time plus the saved log-sum-exp, seqs * heads * (2 * block^2 + seq_len) * 4;
      ``cudnn`` / ``auto`` the [seqs, 1, seq_len, seq_len] segment mask, its bf16 bias and bias gradient,
      seqs * seq_len^2 * 5, plus the log-sum-exp),
      and the MLP: dense
      3 * width, or MoE top-k * (hidden + 3 * expert width) + 3 * shared width per token;
    - ``loss``: one cross-entropy chunk of f32 logits and their gradient, 2 * min(loss_chunk, tokens) *
      vocab / tensor * 4, plus what each head's loss (the main one and every trained MTP depth) keeps from its
      forward for the backward (``losses.head``: the gradient is formed in the forward): the float32 head
      gradient, hidden * vocab / tensor * 4, and the hidden's gradient, tokens * hidden * b.
  This is an estimate for sizing meshes; XLA's buffer assignment decides the real peak.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from joyjax import model, optim
from joyjax.axes import MESH_AXES, data_parallel_size, get_rules
from joyjax.parallel.mesh import mesh_shape
from joyjax.parallel.rules import param_specs, shard_shape, state_specs
from joyjax.tree import path_names

GIB = 1024 ** 3


def _itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize


def _group(info) -> str:
  """The table row of a parameter, from what its layer declared (``model.param_info``), not its path."""
  axes = [a for a in info.axes if a != "layers"]
  if info.adapter is not None:
    return "LoRA adapters"
  if info.routed:
    return "routed experts"
  if "vocab" in axes:
    return "embedding + head"
  if info.frozen or (info.muon_inputs is None and "expert" in axes):
    return "routers"
  if len(axes) < 2:
    return "norms"
  if {"heads", "q_lora", "kv_lora"} & set(axes):
    return "attention"
  if "mlp" in axes:
    return "dense MLP + shared experts"
  return "other (MTP projection)"


def _spec_axes(entry) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _activations(cfg, sizes: dict, tokens: float, seqs: float, seq_len: int) -> dict[str, float]:
  m, a, e = cfg.model, cfg.model.attention, cfg.model.moe
  b = 2 if m.dtype in ("bfloat16", "float16") else 4
  tp = sizes["tensor"]
  heads = a.num_heads / tp
  n_layers = m.num_layers + m.mtp.num_layers
  qk = a.qk_nope_head_dim + a.qk_rope_head_dim
  attn = tokens * b * ((a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim)
                       + heads * (2 * qk + 2 * a.v_head_dim))
  scores = 2 * seqs * heads * seq_len * seq_len * 4
  if m.attention_impl == "blockwise":
    blk = min(m.attention_block, seq_len)
    scores = seqs * heads * (2 * blk * blk + seq_len) * 4
  elif m.attention_impl in ("cudnn", "auto"):  # fused kernel: the segment mask, its bf16 bias and bias gradient
    scores = seqs * seq_len * seq_len * 5 + seqs * heads * seq_len * 4
  dense = tokens * b * 3 * m.dense_intermediate_size / tp
  moe = 0.0
  if m.first_k_dense < m.num_layers or m.mtp.num_layers:
    moe = tokens * b * (e.num_experts_per_tok * (m.hidden_size + 3 * e.intermediate_size / tp)
                        + 3 * e.num_shared_experts * e.intermediate_size / tp)
  layer = attn + scores + max(dense if m.first_k_dense else 0.0, moe) + 2 * tokens * m.hidden_size * b
  residual = n_layers * tokens * m.hidden_size * b
  if m.remat != "full":  # every other policy keeps each block's working set
    residual = n_layers * layer
  heads = 1 + (m.mtp.num_layers if cfg.train.mtp_loss_weight > 0 else 0)
  loss = (2 * min(cfg.train.loss_chunk, tokens) * m.vocab_size / tp * 4
          + heads * (m.hidden_size * m.vocab_size / tp * 4 + tokens * m.hidden_size * b))
  return {"residual": residual, "layer": layer, "scores": scores, "loss": loss}


def plan(cfg, num_devices: int, *, device_memory_gib: float = 0, batch_size: int | None = None,
         seq_len: int | None = None) -> dict[str, Any]:
  """The per-device memory plan (bytes) of ``cfg`` on ``num_devices`` devices; see the module doc."""
  sizes = mesh_shape(cfg, num_devices)
  rules = get_rules(cfg)
  abstract = model.abstract_params(cfg)
  pspecs = param_specs(cfg, sizes, abstract, rules)
  cdtype = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4

  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  spec_leaves = jax.tree.leaves(pspecs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  info_leaves = jax.tree.leaves(model.param_info(cfg), is_leaf=model.is_info)
  groups: dict[str, int] = {}
  param_bytes = total_params = total_param_bytes = trainable_params = trainable_bytes = 0
  gathered: dict[str, float] = {}
  for (path, leaf), spec, info in zip(flat, spec_leaves, info_leaves):
    names, axes = path_names(path), info.axes
    shard = math.prod(shard_shape(leaf.shape, spec, sizes)) * _itemsize(leaf.dtype)
    param_bytes += shard
    total_params += math.prod(leaf.shape)
    total_param_bytes += math.prod(leaf.shape) * _itemsize(leaf.dtype)
    if info.trainable:
      trainable_params += math.prod(leaf.shape)
      trainable_bytes += shard
    g = _group(info)
    groups[g] = groups.get(g, 0) + shard
    # one block's weights after the FSDP all-gather: still split over tensor, and over expert on the expert dim
    if "layers" in axes and not info.frozen:
      keep = 1
      for dim_axes, name in zip((_spec_axes(spec[i]) if i < len(spec) else () for i in range(len(axes))), axes):
        keep *= math.prod(sizes[x] for x in dim_axes
                          if x == "tensor" or (x == "expert" and name == "expert" and info.routed))
      n_stack = leaf.shape[axes.index("layers")]
      gathered[names[0]] = gathered.get(names[0], 0) + math.prod(leaf.shape) / n_stack / keep * cdtype

  tx = optim.make_optimizer(cfg, abstract)
  abstract_state = jax.eval_shape(tx.init, abstract)
  sspecs = state_specs(cfg, sizes, abstract_state, rules)
  opt_bytes = 0
  for leaf, spec in zip(jax.tree.leaves(abstract_state),
                        jax.tree.leaves(sspecs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    opt_bytes += math.prod(shard_shape(leaf.shape, spec, sizes)) * _itemsize(leaf.dtype)

  lora = model.lora_enabled(cfg)
  grad_bytes = (trainable_bytes if lora else param_bytes) * (2 if cfg.train.grad_accum > 1 else 1)

  batch_size = cfg.train.batch_size if batch_size is None else int(batch_size)
  seq_len = cfg.data.seq_len if seq_len is None else int(seq_len)
  dp = data_parallel_size(sizes, rules)
  micro = batch_size / cfg.train.grad_accum
  seqs = micro / dp
  warnings = []
  if micro % dp:
    warnings.append(f"train.batch_size / train.grad_accum = {micro:g} sequences is not a multiple of the "
                    f"data-parallel size {dp} (dcn_data * data * fsdp * expert)")
  tokens = seqs * seq_len
  act = _activations(cfg, sizes, tokens, seqs, seq_len)
  act_bytes = act["residual"] + act["layer"] + act["loss"]
  gathered_bytes = 2 * max(gathered.values(), default=0)
  total = param_bytes + opt_bytes + grad_bytes + gathered_bytes + act_bytes
  mem = float(device_memory_gib) * GIB
  return {
      "num_devices": int(num_devices),
      "mesh": sizes,
      "data_parallel": dp,
      "param_count": total_params,
      "param_bytes_total": total_param_bytes,
      "trainable_params": trainable_params,
      "lora": lora,
      "batch_size": batch_size,
      "seq_len": seq_len,
      "micro_batch_per_device": seqs,
      "tokens_per_device": tokens,
      "param_bytes": param_bytes,
      "param_groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
      "opt_state_bytes": opt_bytes,
      "grad_bytes": grad_bytes,
      "gathered_weights_bytes": gathered_bytes,
      "activation_bytes": act_bytes,
      "activations": act,
      "total_bytes": total,
      "device_memory_bytes": mem,
      "fits": (total <= mem) if mem > 0 else None,
      "warnings": warnings,
  }


def format_plan(p: dict, cfg=None) -> str:
  g = lambda x: f"{x / GIB:10.3f}"  # noqa: E731
  mesh = " ".join(f"{a}={p['mesh'][a]}" for a in MESH_AXES)
  lines = [
      f"mesh on {p['num_devices']} devices: {mesh}  (batch split {p['data_parallel']} ways)",
      f"model: {p['param_count'] / 1e9:.3f} B params, {p['param_bytes_total'] / GIB:.2f} GiB unsharded",
      f"batch: {p['batch_size']} x {p['seq_len']} tokens; per device per micro-batch: "
      f"{p['micro_batch_per_device']:g} sequences, {p['tokens_per_device']:,.0f} tokens",
      "",
      f"{'per device':<44}{'GiB':>10}",
      f"{'params':<44}{g(p['param_bytes'])}",
  ]
  lines += [f"{'  ' + k:<44}{g(v)}" for k, v in p["param_groups"].items()]
  name = cfg.optim.name if cfg is not None else "optimizer"
  if p["lora"]:
    lines.insert(2, f"LoRA: {p['trainable_params'] / 1e6:.3f} M adapter params trained (AdamW), the base frozen")
    name = "adamw, LoRA adapters only"
  remat = cfg.model.remat if cfg is not None else "?"
  lines += [
      f"{'optimizer state (' + name + ')':<44}{g(p['opt_state_bytes'])}",
      f"{'gradients':<44}{g(p['grad_bytes'])}",
      f"{'gathered weights (FSDP, 2 blocks)':<44}{g(p['gathered_weights_bytes'])}",
      f"{'activations (remat=' + remat + ', estimate)':<44}{g(p['activation_bytes'])}",
      f"{'  saved block inputs':<44}{g(p['activations']['residual'])}",
      f"{'  one block working set':<44}{g(p['activations']['layer'])}",
      f"{'    of which attention scores (f32)':<44}{g(p['activations']['scores'])}",
      f"{'  loss (f32 chunk, head gradients)':<44}{g(p['activations']['loss'])}",
      f"{'total':<44}{g(p['total_bytes'])}",
  ]
  if p["device_memory_bytes"] > 0:
    mem = p["device_memory_bytes"]
    verdict = ("fits" if p["fits"] else f"does NOT fit: short by {(p['total_bytes'] - mem) / GIB:.2f} GiB "
               "(more fsdp/expert, remat=full, a smaller micro-batch via train.grad_accum)")
    lines.append(f"{'device memory':<44}{g(mem)}  {verdict} ({100 * p['total_bytes'] / mem:.0f}% used)")
  lines += [f"warning: {w}" for w in p["warnings"]]
  return "\n".join(lines)


def main(cfg, args) -> dict:
  """``joyjax plan``: ``args.devices`` (0 = the devices here), ``args.device_memory_gib`` (0 = ask the device)."""
  n = int(getattr(args, "devices", 0) or 0)
  mem = float(getattr(args, "device_memory_gib", 0) or 0)
  if n <= 0:
    n = jax.device_count()
    if mem <= 0:
      stats = jax.devices()[0].memory_stats() or {}
      mem = stats.get("bytes_limit", 0) / GIB
  p = plan(cfg, n, device_memory_gib=mem)
  print(f"joyjax plan: {getattr(args, 'config', '')}".rstrip())
  print(format_plan(p, cfg))
  return p
