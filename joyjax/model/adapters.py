"""LoRA adapters inside the layers: declared next to the weight they adapt, and added to that weight's output.

For a weight ``W`` whose declared input axes are I and output axes O (after any leading 'expert' axis), the
adapter is a pair of ordinary parameters named ``{W}_lora_a`` [*I, r] and ``{W}_lora_b`` [r, *O] (a routed
expert's pair keeps the leading 'expert' axis: [E, in, r] and [E, r, out]); the layer computes
``x W + (alpha / r) (x A) B``. A starts normal with the variance of PEFT's default (kaiming-uniform, a=sqrt(5):
std 1 / sqrt(3 fan_in)); B starts at zero, so a fresh adapter leaves the layer's output unchanged (``y + 0``).
Each adapter declares its metadata as ``layers.param`` does, plus ``adapts`` (the weight's name) and
``adapter`` ('a' or 'b'); ``model.param_info`` turns it into ``ParamInfo.adapter`` / ``adapts`` / ``trainable``.

Merging into the weights, adding adapters to a base checkpoint and the frozen-base gradient: ``model/lora.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from joyjax import kernels
from joyjax.model.layers import dtype_of

# ``model.lora.targets`` values: MLA projections, the dense layers' MLP, the shared expert, the routed experts.
LORA_AXIS = "lora"        # the logical name of the rank axis (no sharding rule: replicated)
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")  # the routed experts' weights, in ``expert_mlp``'s order


@dataclasses.dataclass(frozen=True)
class LoRA:
  """``model.lora`` resolved: rank, output scale alpha / rank, the targets and the adapters' storage dtype."""
  rank: int
  scale: float
  targets: frozenset
  dtype: str

  def on(self, target: str) -> bool:
    return target in self.targets


def settings(m) -> LoRA | None:
  """The LoRA settings of the model config ``m`` (its ``model`` group), None when ``model.lora.rank`` is 0. The
  values were checked by ``config.validate``."""
  lo = m.lora
  if lo.rank == 0:
    return None
  targets = [t.strip() for t in lo.targets.split(",") if t.strip()]
  return LoRA(rank=int(lo.rank), scale=float(lo.alpha) / int(lo.rank), targets=frozenset(targets),
              dtype=m.param_dtype)


def base_param_dtype(m):
  """The storage dtype of the base weights: ``model.lora.base_dtype`` with LoRA on, else ``model.param_dtype``."""
  return dtype_of(m.lora.base_dtype if settings(m) else m.param_dtype)


def _split_axes(md) -> tuple[int, int]:
  """(leading batch axes, input axes) of a weight declared with ``inputs`` in the order [lead, *I, *O]."""
  axes, inputs = tuple(md["logical_axes"]), md["muon_inputs"]
  assert inputs, f"a LoRA adapter needs a weight with declared input axes, got axes {axes} inputs {inputs}"
  lead = axes.index(inputs[0])
  assert axes[lead:lead + len(inputs)] == tuple(inputs) and set(axes[:lead]) <= {"expert"}, (axes, inputs)
  return lead, len(inputs)


def add_adapter(module: nnx.Module, name: str, lora: LoRA, rngs: nnx.Rngs) -> None:
  """Gives ``module`` the adapter pair of its weight ``name`` (``{name}_lora_a``, ``{name}_lora_b``), drawing A
  from the ``lora`` stream of ``rngs`` so the base weights' initialisation is the same with LoRA on or off."""
  base = getattr(module, name)
  md = base.get_metadata()
  axes, shape = tuple(md["logical_axes"]), tuple(base.shape)
  lead, n_in = _split_axes(md)
  cut = lead + n_in
  fan_in = math.prod(shape[lead:cut])
  dtype = dtype_of(lora.dtype)
  common = dict(decay=True, routed=bool(md["routed"]), adapts=name, group=None)  # group: base weights only
  a = (1.0 / math.sqrt(3 * fan_in)) * jax.random.normal(rngs.lora(), shape[:cut] + (lora.rank,), dtype)
  setattr(module, name + SUFFIX_A, nnx.Param(a, logical_axes=axes[:cut] + (LORA_AXIS,),
                                               muon_inputs=tuple(md["muon_inputs"]), adapter="a", **common))
  b = jnp.zeros(shape[:lead] + (lora.rank,) + shape[cut:], dtype)
  setattr(module, name + SUFFIX_B, nnx.Param(b, logical_axes=axes[:lead] + (LORA_AXIS,) + axes[cut:],
                                               muon_inputs=(LORA_AXIS,), adapter="b", **common))
  module.lora_scale = lora.scale


def adapter_of(module: nnx.Module, name: str):
  """(A, B) of weight ``name`` of ``module`` (nnx Params), or None without an adapter."""
  a = getattr(module, name + SUFFIX_A, None)
  return None if a is None else (a, getattr(module, name + SUFFIX_B))


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
  """``y`` (= ``x`` contracted with weight ``name`` over its input axes, the trailing axes of ``x``) plus
  (alpha / r) (x A) B when the weight has an adapter; ``y`` itself otherwise."""
  ab = adapter_of(module, name)
  if ab is None:
    return y
  a, b = (p[...].astype(dtype) for p in ab)
  xa = jnp.tensordot(x, a, axes=a.ndim - 1)
  return y + module.lora_scale * jnp.tensordot(xa, b, axes=1)


def delta(a: jax.Array, b: jax.Array, scale: float, lead: int = 0) -> jax.Array:
  """(alpha / r) A @ B in the weight's layout [*lead, *I, *O] (float32; ``lead`` batch axes first)."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  batch = a.shape[:lead]
  out_shape = a.shape[:-1] + b.shape[lead + 1:]
  a2 = a32.reshape(batch + (-1, a.shape[-1]))
  b2 = b32.reshape(batch + (b.shape[lead], -1))
  return scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(out_shape)


def merged_weight(module: nnx.Module, name: str, dtype) -> jax.Array:
  """Weight ``name`` with its adapter folded in (W + (alpha / r) A @ B), in ``dtype``: for the absorbed decode
  path, which multiplies weights together rather than applying them to activations."""
  w = getattr(module, name)[...]
  ab = adapter_of(module, name)
  if ab is None:
    return w.astype(dtype)
  return (w.astype(jnp.float32) + delta(ab[0][...], ab[1][...], module.lora_scale)).astype(dtype)


# ------------------------------------------------------------------------------------------ routed experts


def routed_adapters(module: nnx.Module, dtype) -> tuple | None:
  """(A, B) of wi_gate, wi_up and wo (six [E, ...] arrays in ``dtype``), or None without routed adapters."""
  pairs = [adapter_of(module, n) for n in EXPERT_WEIGHTS]
  if pairs[0] is None:
    return None
  return tuple(p[...].astype(dtype) for ab in pairs for p in ab)


def expert_mlp(x, wi_gate, wi_up, wo, group_sizes, *, impl: str, fused: bool, lora: tuple | None = None,
               scale: float = 0.0):
  """The routed experts' SwiGLU on expert-sorted rows x [M, H] through the kernels' grouped matmuls:
  ``down(silu(gate x) * up x)`` per group; with ``lora`` (``routed_adapters``), each grouped matmul ``x W`` gets
  ``scale * (x A) B`` with two more grouped matmuls of width r (unfused: the fused SwiGLU kernel takes no
  adapter)."""
  if lora is None:
    h = kernels.grouped_swiglu(x, wi_gate, wi_up, group_sizes, impl=impl, fused=fused)
    return kernels.grouped_matmul(h, wo, group_sizes, impl=impl)
  ag, bg, au, bu, ao, bo = lora

  def linear(v, w, a, b):
    y = kernels.grouped_matmul(v, w, group_sizes, impl=impl)
    return y + scale * kernels.grouped_matmul(kernels.grouped_matmul(v, a, group_sizes, impl=impl), b,
                                              group_sizes, impl=impl)

  h = jax.nn.silu(linear(x, wi_gate, ag, bg)) * linear(x, wi_up, au, bu)
  return linear(h, wo, ao, bo)
