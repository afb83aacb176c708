"""Optimizers: AdamW, Muon (+ AdamW for embeddings / head / router / norms), learning-rate schedules.

Public API
----------
``make_schedule(optim_cfg, total_steps, peak=None) -> optax.Schedule``
    ``constant`` | ``cosine`` | ``wsd`` with a linear warmup, scaled to ``peak`` (default ``optim.lr``).
``param_labels(cfg, params, train_mtp=None) -> tree of str``
    'muon' | 'adam' | 'adam_no_decay' | 'lora' | 'frozen' per leaf (the rule is below).
``muon_dimension_numbers(cfg, params) -> tree of MuonDimensionNumbers | None``
    Which axes of each 'muon' leaf are batch / reduction (input) / output axes (None for other leaves).
``weight_decay_mask(cfg, params) -> tree of bool``
    Where decoupled weight decay applies (matrices, except the token embedding table).
``make_optimizer(cfg, params_or_abstract=None, total_steps=None, train_mtp=None, mesh=None)``
    -> optax.GradientTransformation.
``mtp_trained(cfg) -> bool``
    Whether the LM loss trains the MTP modules (``train_mtp``'s default): modules exist and the weight is > 0.
``learning_rates(cfg, step, total_steps=None) -> dict``
    Current learning rates for logging: {'lr'} under adamw, {'lr', 'adam_lr'} under muon.

Labelling rule (from ``model.param_info``: what each layer declared when it created the parameter)
-----------------------------------------------------------------------------------------------------
1. The router's selection bias (``frozen``) -> 'frozen': not a gradient parameter (the trainer moves it from
   expert loads); the optimizer returns a zero update for it and keeps no state for it. With LoRA on
   (``model.lora.rank`` > 0) every other non-adapter parameter is not ``trainable`` either -> 'frozen' too.
   So is every leaf of the MTP modules in a run that does not train them (``train_mtp`` False: the objective
   has no MTP loss, as DPO and RL, or ``train.mtp_loss_weight`` is 0): a recipe stage with MTP off keeps the
   module exactly as it was (no weight decay eroding it, no optimizer state for it), and a later stage with MTP
   on continues from it (the report turns MTP on from mid-training).
1b. A LoRA adapter (``adapter`` 'a' or 'b') -> 'lora': AdamW (the common LoRA recipe; its A and B are
   declared with their Muon input axes but not orthogonalised), at ``optim.lr`` under adamw and at the AdamW
   part's ``optim.adam_lr`` under muon, decoupled weight decay as for other matrices.
2. Any leaf with fewer than two axes besides the stacking axis 'layers' (norm ``scale``s, any bias)
   -> 'adam_no_decay'.
3. A matrix declared without Muon input axes (``inputs=None``: the embedding table, the output head, the MoE
   router) -> 'adam'.
4. A matrix with Muon input axes (attention q_a, q_b, q, kv_a, kv_b, o; dense MLP / shared expert gate, up,
   down; routed experts wi_gate, wi_up, wo; MTP eh_proj) -> 'muon'. ``layers.param`` requires ``inputs``, so a
   new weight is placed deliberately where it is defined.

Muon treats each weight as a batch of 2-D matrices ``x @ W``: the batch axes are 'layers' and 'expert'
(every layer and every routed expert is orthogonalised on its own), the reduction axes are the declared
input axes (the contracted inputs) and the remaining axes are the outputs; multi-axis
inputs/outputs (``o``: (heads, head_dim) -> embed, ``q_b``: q_lora -> (heads, head_dim)) are flattened
into one matrix dimension by optax's ``MuonDimensionNumbers`` reshape.

Newton-Schulz (``scale_by_batched_muon``): every 'muon' leaf is viewed as one stack [batch, in, out] (batch =
its 'layers' x 'expert' axes: a free reshape for every joyjax weight, whose batch axes lead and whose input axes
precede its output axes) and orthogonalised by one chain of batched matmuls over the whole stack (no per-matrix
loop, no vmap), on the smaller Gram matrix (X X^T or X^T X: no transposes). The iteration runs in
``optim.muon_ns_dtype`` (default bfloat16, as in Keller Jordan's reference and Moonlight: the momentum is
Frobenius-normalised in float32, cast, iterated, and the result cast back to float32); the momentum and the
master weights stay float32. ``muon_ns_dtype = "float32"`` is the previous numerics (optax's
``scale_by_muon``, float32 per matrix) up to float32 rounding.

Weight decay is decoupled (``add_decayed_weights`` before the lr scaling, i.e. multiplied by the
scheduled lr as in PyTorch / optax AdamW) and masked off for norms, biases and the token embedding table
(``decay=False`` where declared; as ``configs/base.py`` documents), in both the adamw and the muon recipe.

Step convention: schedules take optax's ``count`` = the number of updates already applied (0 for the first
update) and evaluate at ``s = step + 1``: warmup gives ``peak * s / warmup_steps`` (the first update is not a
zero-lr step, update ``warmup_steps - 1`` is the first at peak), and the decay of cosine / wsd reaches
``min_lr_ratio * peak`` exactly at the last update ``total_steps - 1`` (held there afterwards).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

from joyjax import model
from joyjax.config import OPTIMIZERS, SCHEDULES
from joyjax.tree import path_names, path_str

LABELS = ("muon", "adam", "adam_no_decay", "frozen")  # the labels of a full (not LoRA) training run
LORA_LABEL = "lora"  # a LoRA adapter's label (with LoRA on, every other leaf is 'frozen')

# Muon's batch axes: every layer of a stack and every routed expert is orthogonalised on its own.
MUON_BATCH_AXES = ("layers", "expert")
# The quintic Newton-Schulz coefficients of Keller Jordan's Muon (optax's default): slope 3.4445 at 0.
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


# --------------------------------------------------------------------------------------------- schedules


def _optim_cfg(cfg):
  return cfg.optim if "optim" in cfg else cfg


def make_schedule(optim_cfg, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """The learning-rate schedule ``step -> lr`` of ``optim_cfg.schedule`` peaking at ``peak`` (default lr).

  constant: linear warmup over ``warmup_steps``, then ``peak``.
  cosine:   linear warmup, then cosine from ``peak`` to ``min_lr_ratio * peak`` at the last step.
  wsd:      linear warmup, constant ``peak``, then a linear decay to ``min_lr_ratio * peak`` over the last
            ``round(decay_fraction * total_steps)`` steps.
  Accepts the ``optim`` group or the full config. See the module docstring for the step convention.
  """
  o = _optim_cfg(optim_cfg)
  peak = float(o.lr if peak is None else peak)
  total = int(total_steps)
  if total <= 0:
    raise ValueError(f"make_schedule: total_steps must be positive, got {total_steps}")
  if o.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
  warmup = int(o.warmup_steps)
  final = float(o.min_lr_ratio) * peak
  decay_steps = int(round(float(o.decay_fraction) * total))
  name = o.schedule

  def schedule(step):
    s = jnp.asarray(step, jnp.float32) + 1.0
    warm = jnp.minimum(1.0, s / warmup) if warmup > 0 else jnp.ones_like(s)
    if name == "constant":
      main = jnp.full_like(s, peak)
    elif name == "cosine":
      span = max(1, total - warmup)
      frac = jnp.clip((s - warmup) / span, 0.0, 1.0)
      main = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    else:  # wsd
      if decay_steps > 0:
        frac = jnp.clip((s - (total - decay_steps)) / decay_steps, 0.0, 1.0)
        main = peak + (final - peak) * frac
      else:
        main = jnp.full_like(s, peak)
    return jnp.where(s <= warmup, peak * warm, main)

  return schedule


def _total_steps(cfg, total_steps):
  return int(cfg.train.steps if total_steps is None else total_steps)


def learning_rates(cfg, step, total_steps: int | None = None) -> dict[str, jax.Array]:
  """Learning rates applied at update ``step`` (0-based): {'lr'} (adamw) or {'lr', 'adam_lr'} (muon)."""
  o = cfg.optim
  total = _total_steps(cfg, total_steps)
  out = {"lr": make_schedule(o, total, o.lr)(step)}
  if o.name == "muon":
    out["adam_lr"] = make_schedule(o, total, o.adam_lr)(step)
  return out


# ------------------------------------------------------------------------------------------------ labels


def _leaf_info(cfg, params):
  """[(path, leaf, ParamInfo)] for every leaf of ``params``; the info's axes checked against the leaf's rank."""
  info_tree = model.param_info(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  info = []
  for path, leaf in leaves:
    node = info_tree
    for name in path_names(path):
      node = node.get(name) if isinstance(node, dict) else None
    if not model.is_info(node):
      raise ValueError(f"optim: parameter {path_str(path)!r} is not in model.param_info(cfg); "
                       "params and config do not describe the same model")
    if len(node.axes) != len(leaf.shape):
      raise ValueError(f"optim: parameter {path_str(path)!r} has shape {tuple(leaf.shape)} but logical axes "
                       f"{node.axes}")
    info.append((path, leaf, node))
  return info, treedef


def mtp_trained(cfg) -> bool:
  """Whether the LM loss (pretraining, SFT) trains the MTP modules: they exist and ``train.mtp_loss_weight`` > 0."""
  return cfg.model.mtp.num_layers > 0 and cfg.train.mtp_loss_weight > 0


def _frozen_parts(cfg, train_mtp) -> tuple[str, ...]:
  """Top-level params parts frozen in this run: the MTP modules when the run does not train them."""
  return () if (mtp_trained(cfg) if train_mtp is None else train_mtp) else (model.MTP_STACK,)


def _label(path, info, frozen_parts=()) -> str:
  if info.frozen or not info.trainable or path_names(path)[0] in frozen_parts:
    return "frozen"
  if info.adapter is not None:
    return LORA_LABEL
  if len([a for a in info.axes if a != "layers"]) < 2:
    return "adam_no_decay"
  if info.muon_inputs is None:
    return "adam"
  return "muon"


def param_labels(cfg, params, train_mtp: bool | None = None) -> Any:
  """The optimizer label of every leaf of ``params`` (arrays or ShapeDtypeStructs); see the module doc.
  ``train_mtp``: whether this run trains the MTP modules (None = ``mtp_trained(cfg)``); False freezes them."""
  info, treedef = _leaf_info(cfg, params)
  frozen = _frozen_parts(cfg, train_mtp)
  return jax.tree_util.tree_unflatten(treedef, [_label(p, a, frozen) for p, _, a in info])


def _dim_numbers(path, info) -> MuonDimensionNumbers:
  axes, inputs = info.axes, info.muon_inputs
  missing = [a for a in inputs if a not in axes]
  if missing:
    raise ValueError(f"optim: Muon input axes {inputs} of {path_str(path)!r} not all in its axes {axes}")
  reduction = tuple(i for i, a in enumerate(axes) if a in inputs)
  output = tuple(i for i, a in enumerate(axes) if a not in inputs and a not in MUON_BATCH_AXES)
  if not output:
    raise ValueError(f"optim: {path_str(path)!r} with axes {axes} has no output axis for Muon")
  return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def muon_dimension_numbers(cfg, params) -> Any:
  """MuonDimensionNumbers for every 'muon' leaf (batch = 'layers'/'expert' axes), None elsewhere."""
  info, treedef = _leaf_info(cfg, params)
  return jax.tree_util.tree_unflatten(
      treedef, [_dim_numbers(p, a) if _label(p, a) == "muon" else None for p, _, a in info])


def weight_decay_mask(cfg, params, train_mtp: bool | None = None) -> Any:
  """True where decoupled weight decay applies: 'muon' and 'adam' leaves except the embedding table."""
  info, treedef = _leaf_info(cfg, params)
  frozen = _frozen_parts(cfg, train_mtp)

  def decays(path, info):
    return _label(path, info, frozen) in ("muon", "adam", LORA_LABEL) and info.decay

  return jax.tree_util.tree_unflatten(treedef, [decays(p, a) for p, _, a in info])


# ---------------------------------------------------------------------------------------- batched Muon


def _stack_of_matrices(shape, dims: MuonDimensionNumbers):
  """(to_stack, from_stack) between an array of ``shape`` and its [*batch, in, out] stack of matrices (the batch
  axes keep their own dimensions, so a sharding along them carries over unchanged)."""
  nd = len(shape)
  red = tuple(a % nd for a in ((dims.reduction_axis,) if isinstance(dims.reduction_axis, int)
                                else dims.reduction_axis))
  out = tuple(a % nd for a in ((dims.output_axis,) if isinstance(dims.output_axis, int) else dims.output_axis))
  batch = tuple(a for a in range(nd) if a not in red and a not in out)
  perm = batch + red + out
  size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
  flat = tuple(shape[a] for a in batch) + (size(red), size(out))
  permuted = tuple(shape[a] for a in perm)
  inverse = tuple(perm.index(a) for a in range(nd))
  identity = perm == tuple(range(nd))

  def to_stack(x):
    return (x if identity else x.transpose(perm)).reshape(flat)

  def from_stack(m):
    m = m.reshape(permuted)
    return m if identity else m.transpose(inverse)

  return to_stack, from_stack


def newton_schulz_stack(g, ns_steps: int, eps: float, ns_dtype) -> jax.Array:
  """Orthogonalises each matrix of the stack ``g`` [..., rows, cols]: Frobenius-normalised (in float32), then
  ``ns_steps`` quintic Newton-Schulz steps X <- a X + (b A + c A A) X with A = X X^T (or, for tall matrices,
  X <- a X + X (b A + c A A) with A = X^T X: the same polynomial of X, on the smaller Gram matrix), every matmul
  batched over the leading dimensions. The matmuls take ``ns_dtype`` inputs and accumulate in float32; the
  iterate and the polynomial's sums stay float32 (with bfloat16 inputs this is 2-4x closer to the float32
  iteration than rounding every intermediate to bfloat16, at the same tensor-core cost). Returns float32."""
  a, b, c = MUON_NS_COEFFS
  f32 = jnp.float32

  def mm(spec, u, v):
    return jnp.einsum(spec, u.astype(ns_dtype), v.astype(ns_dtype), preferred_element_type=f32)

  g = g.astype(f32)
  x = g / (jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True)) + eps)
  wide = g.shape[-2] <= g.shape[-1]
  for _ in range(ns_steps):
    if wide:
      gram = mm("...ij,...kj->...ik", x, x)
      x = a * x + mm("...ik,...kj->...ij", b * gram + c * mm("...ij,...jk->...ik", gram, gram), x)
    else:
      gram = mm("...ji,...jk->...ik", x, x)
      x = a * x + mm("...ik,...kj->...ij", x, b * gram + c * mm("...ij,...jk->...ik", gram, gram))
  return x


def matrix_split(batch_shape: tuple[int, ...], mesh) -> PartitionSpec | None:
  """How to deal a stack of matrices [*batch_shape, rows, cols] out whole over ``mesh``: each mesh axis (in
  mesh order, size > 1) goes to the last batch dimension whose size it still divides. None unless that uses
  every device: a stack the devices cannot share evenly (e.g. 40 layers' attention matrices on 64 devices) is
  computed as it lies, partitioned, rather than repeated on the devices left over; the routed experts' stacks
  (layers x 256 experts), nearly all of Muon's work, split evenly on any power-of-two mesh up to 256 devices."""
  left = list(batch_shape)
  entries: list[list[str]] = [[] for _ in batch_shape]
  for name, size in mesh.shape.items():
    for d in reversed(range(len(left))):
      if size > 1 and left[d] % size == 0:
        entries[d].append(name)
        left[d] //= size
        break
    else:
      if size > 1:
        return None
  return PartitionSpec(*(tuple(e) if e else None for e in entries), None, None)


def distributed_newton_schulz(stack, mesh, ns):
  """``ns(stack)`` on whole matrices dealt out over ``mesh`` (Moonlight's distributed Muon): the stack
  [*batch, rows, cols] is constrained to be split along its batch dimensions only (``matrix_split``), so each
  device runs the Newton-Schulz chain on its own matrices with no communication inside it; the move from the
  parameters' sharding is one all-to-all each way. Left to that sharding (FSDP splits the rows or columns of
  every matrix), every matmul of the chain would be partitioned across devices and all-reduce its partial
  products, or run on every device after an all-gather."""
  spec = matrix_split(stack.shape[:-2], mesh)
  if spec is None:
    return ns(stack)
  split = NamedSharding(mesh, spec)
  return jax.lax.with_sharding_constraint(ns(jax.lax.with_sharding_constraint(stack, split)), split)


def scale_by_batched_muon(ns_steps: int, beta: float, eps: float, weight_dimension_numbers,
                          ns_dtype: str = "bfloat16", mesh=None) -> optax.GradientTransformation:
  """optax's ``scale_by_muon`` (Nesterov momentum with bias correction, float32 momentum; the same state, so
  checkpoints carry over) with the orthogonalisation of ``newton_schulz_stack``: one batched chain per leaf over
  its 'layers' x 'expert' stack, in ``ns_dtype``. ``weight_dimension_numbers``: a tree of MuonDimensionNumbers
  (MaskedNode where the leaf is not Muon's), as for optax. ``mesh``: the run's device mesh; with more than one
  device each chain runs on whole matrices dealt out over the devices (``distributed_newton_schulz``)."""
  base = scale_by_muon(ns_steps=ns_steps, beta=beta, eps=eps, weight_dimension_numbers=weight_dimension_numbers)
  dtype = jnp.dtype(ns_dtype)

  def ns(stack):
    return newton_schulz_stack(stack, ns_steps, eps, dtype)

  def orthogonalize(x, dims):
    to_stack, from_stack = _stack_of_matrices(x.shape, dims)
    stack = to_stack(x)
    out = ns(stack) if mesh is None or mesh.size == 1 else distributed_newton_schulz(stack, mesh, ns)
    return from_stack(out).astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    count = jnp.where(state.count < jnp.iinfo(jnp.int32).max, state.count + 1, state.count)
    mu = jax.tree.map(lambda g, m: beta * m + (1.0 - beta) * g, updates, state.mu)
    c1 = (1.0 - beta ** count.astype(jnp.float32))  # bias corrections at this count and the next one
    c2 = (1.0 - beta ** (count.astype(jnp.float32) + 1.0))
    mu_hat = jax.tree.map(lambda m, g: beta * (m / c2.astype(m.dtype)) + (1.0 - beta) * (g / c1.astype(g.dtype)),
                          mu, updates)
    out = jax.tree.map(orthogonalize, mu_hat, weight_dimension_numbers,
                       is_leaf=lambda d: isinstance(d, MuonDimensionNumbers))
    return out, state._replace(count=count, mu=mu)

  return optax.GradientTransformation(base.init, update_fn)


# --------------------------------------------------------------------------------------------- optimizer


def clip_by_global_norm_masked(max_norm: float, mask) -> optax.GradientTransformation:
  """Global-norm clipping whose norm (and scaling) covers only the leaves where ``mask`` is True."""
  return optax.masked(optax.clip_by_global_norm(max_norm), mask)


def make_optimizer(cfg, params_or_abstract=None, total_steps: int | None = None,
                   train_mtp: bool | None = None, mesh=None) -> optax.GradientTransformation:
  """The optax transformation of ``cfg.optim`` for params shaped like ``params_or_abstract``.

  ``params_or_abstract``: the params tree, or its ShapeDtypeStructs (only paths and ranks are read);
  None = ``model.abstract_params(cfg)``. ``total_steps`` defaults to ``cfg.train.steps``. ``train_mtp``: whether
  the run's loss trains the MTP modules (None = ``mtp_trained(cfg)``); when not, they are frozen (rule 1).
  ``mesh``: the device mesh the update runs on (Muon deals its Newton-Schulz matrices out over it; None = as the
  arrays lie, e.g. one device).
  The state holds only arrays (orbax-saveable); build it with ``jax.eval_shape(tx.init, abstract)``.
  """
  o = cfg.optim
  params = model.abstract_params(cfg) if params_or_abstract is None else params_or_abstract
  total = _total_steps(cfg, total_steps)
  labels = param_labels(cfg, params, train_mtp)
  decay = weight_decay_mask(cfg, params, train_mtp)
  trainable = jax.tree.map(lambda l: l != "frozen", labels)

  if o.name == "adamw":
    group_labels = jax.tree.map(lambda l: "frozen" if l == "frozen" else "adamw", labels)
    transforms = {
        "adamw": optax.adamw(make_schedule(o, total, o.lr), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay),
        "frozen": optax.set_to_zero(),
    }
  elif o.name == "muon":
    group_labels = jax.tree.map(lambda l: "adam" if l in ("adam_no_decay", LORA_LABEL) else l, labels)
    # The muon branch sees a tree whose non-muon leaves are MaskedNode (optax.partition), so its
    # dimension numbers carry MaskedNode at the same places.
    dims = muon_dimension_numbers(cfg, params)
    dims = jax.tree.map(lambda d, l: d if l == "muon" else optax.MaskedNode(), dims, labels,
                        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
    transforms = {
        "muon": optax.chain(
            scale_by_batched_muon(ns_steps=o.muon_ns_steps, beta=o.muon_momentum, eps=o.eps,
                                  weight_dimension_numbers=dims, ns_dtype=o.muon_ns_dtype, mesh=mesh),
            scale_by_shape(weight_dimension_numbers=dims),  # sqrt(max(1, fan_out / fan_in))
            optax.add_decayed_weights(o.weight_decay),
            optax.scale_by_learning_rate(make_schedule(o, total, o.lr)),
        ),
        # AdamW for embeddings / head / router (decayed unless the embedding table) and norms (never).
        "adam": optax.adamw(make_schedule(o, total, o.adam_lr), b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, mask=decay),
        "frozen": optax.set_to_zero(),
    }
  else:
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {o.name!r}")

  transforms = {k: v for k, v in transforms.items() if k in set(jax.tree.leaves(group_labels))}
  tx = optax.multi_transform(transforms, group_labels)
  if o.grad_clip > 0:
    tx = optax.chain(clip_by_global_norm_masked(o.grad_clip, trainable), tx)
  return tx
