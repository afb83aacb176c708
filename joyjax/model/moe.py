"""DeepSeek-V3 MoE: sigmoid router with aux-loss-free selection bias and group-limited top-k, a shared expert,
and routed experts computed through the ``joyjax.kernels`` boundary (permute -> grouped matmul -> combine)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from joyjax import kernels
from joyjax.model import adapters
from joyjax.model import expert_parallel as ep_lib
from joyjax.model.layers import RouterBias, param


class MLP(nnx.Module):
  """SwiGLU MLP: down(silu(gate x) * up x). Used for dense layers and the shared expert."""

  def __init__(self, hidden: int, inter: int, *, std: float, rngs: nnx.Rngs, dtype, param_dtype, group: str,
               lora: adapters.LoRA | None = None):
    w = dict(std=std, dtype=param_dtype, group=group)  # group: 'dense' or 'shared' (config.PARAM_GROUPS)
    self.gate = param(rngs, (hidden, inter), ("embed", "mlp"), inputs=("embed",), **w)
    self.up = param(rngs, (hidden, inter), ("embed", "mlp"), inputs=("embed",), **w)
    self.down = param(rngs, (inter, hidden), ("mlp", "embed"), inputs=("mlp",), **w)
    self.dtype = dtype
    if lora is not None:  # the owner decides (model.lora.targets: dense / shared)
      adapters.add_adapter(self, "gate", lora, rngs)
      adapters.add_adapter(self, "up", lora, rngs)
      adapters.add_adapter(self, "down", lora, rngs)

  def __call__(self, x):
    d = self.dtype
    lin = lambda name, v: adapters.apply(self, name, v, v @ getattr(self, name)[...].astype(d), d)  # noqa: E731
    h = jax.nn.silu(lin("gate", x)) * lin("up", x)
    return lin("down", h)


def route(logits: jax.Array, bias: jax.Array, *, top_k: int, n_group: int, topk_group: int,
          scoring_func: str, norm_topk_prob: bool, routed_scaling_factor: float):
  """DeepSeek-V3 routing in float32. logits: [T, E]. Returns (weights [T, k], expert ids [T, k], scores [T, E]).

  The bias shifts which experts are chosen, never the weights they get.
  """
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits) if scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
  choice = scores + bias.astype(jnp.float32)
  t, e = choice.shape
  if n_group > 1:
    grouped = choice.reshape(t, n_group, e // n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]: sum of each group's best two
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    group_mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], top_groups].set(True)
    choice = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), choice, -jnp.inf)
  _, ids = jax.lax.top_k(choice, top_k)
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if norm_topk_prob and top_k > 1:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor, ids, scores


class MoE(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    e = cfg.moe
    h, std = cfg.hidden_size, cfg.init_std
    self.num_experts, self.top_k = e.num_experts, e.num_experts_per_tok
    self.n_group, self.topk_group = e.n_group, e.topk_group
    self.scoring_func, self.norm_topk_prob = e.scoring_func, bool(e.norm_topk_prob)
    self.routed_scaling_factor = float(e.routed_scaling_factor)
    self.impl = e.impl
    self.fuse_swiglu = bool(e.fuse_swiglu)
    self.capacity_factor = float(e.capacity_factor)  # expert parallelism only; 0 = dropless
    self.dtype = dtype
    # The router runs in float32 whatever the compute dtype: top-k over near-ties is precision sensitive.
    # AdamW, not Muon, for the router (as DeepSeek-V3 / Moonlight train it).
    self.router = param(rngs, (h, e.num_experts), ("embed", "expert"), std=std, dtype=param_dtype, inputs=None)
    self.router_bias = RouterBias(jnp.zeros((e.num_experts,), jnp.float32), logical_axes=("expert",))
    shape_in, shape_out = (e.num_experts, h, e.intermediate_size), (e.num_experts, e.intermediate_size, h)
    expert = dict(std=std, dtype=param_dtype, routed=True, group="routed")
    self.wi_gate = param(rngs, shape_in, ("expert", "embed", "mlp"), inputs=("embed",), **expert)
    self.wi_up = param(rngs, shape_in, ("expert", "embed", "mlp"), inputs=("embed",), **expert)
    self.wo = param(rngs, shape_out, ("expert", "mlp", "embed"), inputs=("mlp",), **expert)
    self.has_shared = bool(e.num_shared_experts)
    lora = adapters.settings(cfg)
    if self.has_shared:
      self.shared = MLP(h, e.intermediate_size * e.num_shared_experts, std=std, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype, group="shared", lora=lora if lora and lora.on("shared") else None)
    if lora and lora.on("routed"):
      for name in adapters.EXPERT_WEIGHTS:
        adapters.add_adapter(self, name, lora, rngs)

  def __call__(self, x, token_axes=None):
    """x: [b, s, embed] -> (out [b, s, embed], aux) with aux['expert_counts'] [E] (tokens routed to each
    expert, for the bias update and load statistics), aux['balance'] (the sequence-wise balance loss) and
    aux['dropped_tokens'] (float32: (token, slot) rows dropped by expert-parallel capacity; 0 if dropless)."""
    b, s, h = x.shape
    flat = x.reshape(b * s, h)
    logits = flat.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    weights, ids, scores = route(logits, self.router_bias[...], top_k=self.top_k, n_group=self.n_group,
                                 topk_group=self.topk_group, scoring_func=self.scoring_func,
                                 norm_topk_prob=self.norm_topk_prob,
                                 routed_scaling_factor=self.routed_scaling_factor)
    routed, dropped = self.experts(flat, weights, ids, token_axes)
    out = routed.astype(x.dtype).reshape(b, s, h)
    if self.has_shared:
      out = out + self.shared(x)
    counts = jnp.zeros((self.num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    balance = self._balance(ids.reshape(b, s, -1), scores.reshape(b, s, -1))
    return out, {"expert_counts": counts, "balance": balance, "dropped_tokens": dropped}

  def experts(self, flat, weights, ids, token_axes=None):
    """Routed experts: [T, embed] -> ([T, embed] float32, dropped rows [] float32), through the kernels.

    Under a mesh with an 'expert' axis of size > 1 (set by the caller with ``jax.set_mesh(mesh)``), the
    experts are sharded over it and tokens travel by all-to-all (``expert_parallel``) over ``token_axes``, the
    mesh axes of the config's ``batch`` rule (None: the default rule); otherwise one shard computes them all."""
    d = self.dtype
    mesh = ep_lib.current_mesh()
    lora = adapters.routed_adapters(self, d)
    scale = getattr(self, "lora_scale", 0.0)
    if ep_lib.expert_axis_size(mesh) > 1:
      w = (self.wi_gate[...], self.wi_up[...], self.wo[...])
      return ep_lib.expert_parallel_experts(flat, weights, ids, *w, mesh=mesh, num_experts=self.num_experts,
                                            capacity_factor=self.capacity_factor, impl=self.impl, dtype=d,
                                            fuse_swiglu=self.fuse_swiglu, token_axes=token_axes, lora=lora,
                                            lora_scale=scale)
    x_sorted, group_sizes, order = kernels.permute(flat, ids, self.num_experts)
    y = adapters.expert_mlp(x_sorted, self.wi_gate[...].astype(d), self.wi_up[...].astype(d),
                            self.wo[...].astype(d), group_sizes, impl=self.impl, fused=self.fuse_swiglu, lora=lora,
                            scale=scale)
    return kernels.unpermute(y, order, weights), jnp.zeros((), jnp.float32)

  def _balance(self, ids, scores):
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences: sum_i f_i * P_i with
    f_i = E / (k * s) * (tokens of the sequence routed to i), P_i = mean over tokens of normalised scores."""
    b, s, k = ids.shape
    e = self.num_experts
    onehot = jax.nn.one_hot(ids, e, dtype=jnp.float32).sum(axis=2)  # [b, s, E]
    f = onehot.sum(axis=1) * (e / (k * s))
    p = (scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)).mean(axis=1)
    return jnp.mean(jnp.sum(f * p, axis=-1))
