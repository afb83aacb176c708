"""Muon's batched Newton-Schulz (joyjax/optim.py ``newton_schulz_stack`` / ``scale_by_batched_muon``): one chain
of batched matmuls over a leaf's 'layers' x 'expert' stack, in bfloat16 by default, against optax's float32
per-matrix iteration (``orthogonalize_via_newton_schulz``, the previous behaviour), and the whole Muon update of
the previous optax ``scale_by_muon`` against the new transformation, float32 and bfloat16. On 8 devices: the
distributed Newton-Schulz (matrices dealt out whole over the mesh) gives the single-device update, and its
compiled program has no all-reduce and a device's share of the FLOPs, where the stack as FSDP lays it out
all-reduces a Gram matrix at every step.

Tolerances: in float32 the batched chain is the same polynomial as optax's (on X^T X instead of a transpose for
tall matrices): 1e-5 relative. In bfloat16 (matmul inputs rounded to 2^-8, float32 accumulation), five steps
amplify the rounding to ~3% of the result's Frobenius norm (measured 2.2-3.0% on Gaussian 64 x 32 / 32 x 64
stacks): 6% allowed; and every singular value stays in the iteration's band (~[0.68, 1.13] in float32;
[0.6, 1.25] checked), i.e. the update is as orthogonal as the float32 one.
"""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import orthogonalize_via_newton_schulz

from conftest import fsdp_expert_mesh, tiny_config
from joyjax import model, optim
from joyjax.errors import ConfigError

BF16_REL_TOL = 0.06
F32_REL_TOL = 1e-5


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(stack):
  """optax's float32 Newton-Schulz, one matrix at a time (a Python loop: the per-matrix reference)."""
  coeffs = jnp.asarray(optim.MUON_NS_COEFFS, jnp.float32)
  return np.stack([np.asarray(orthogonalize_via_newton_schulz(m, coeffs, 5, eps=1e-8)) for m in stack])


@pytest.mark.parametrize("shape", [(6, 64, 32), (6, 32, 64)])  # tall (X^T X) and wide (X X^T)
def test_batched_newton_schulz_against_float32_per_matrix(shape):
  g = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  ref = _reference(g)
  f32 = optim.newton_schulz_stack(g, 5, 1e-8, jnp.float32)
  bf16 = optim.newton_schulz_stack(g, 5, 1e-8, jnp.bfloat16)
  assert f32.dtype == bf16.dtype == jnp.float32 and bf16.shape == shape
  assert _rel(f32, ref) < F32_REL_TOL
  assert _rel(bf16, ref) < BF16_REL_TOL, _rel(bf16, ref)
  for out in (ref, bf16):
    sv = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())


def test_one_matmul_chain_whatever_the_number_of_experts():
  """The stack is orthogonalised by 3 batched dot_generals per step, not one chain per expert or layer."""
  dims = MuonDimensionNumbers(reduction_axis=(2,), output_axis=(3,))
  tx = optim.scale_by_batched_muon(5, 0.95, 1e-8, {"w": dims}, "bfloat16")
  for experts in (4, 16):
    p = {"w": jnp.zeros((2, experts, 24, 16), jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s))(p, tx.init(p))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 15, len(dots)
    assert all(e.outvars[0].aval.shape[:2] == (2, experts) for e in dots)   # batched over layers x experts
    assert all(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)


def test_update_against_previous_optax_muon():
  """Two updates of a tree with a stacked expert leaf [layers, expert, in, out], a tall and a wide layer-stacked
  leaf and an attention-output-like leaf with two input axes: the same state layout as optax's
  ``scale_by_muon`` (checkpoints carry over) and the same updates, float32 to 1e-5, bfloat16 to 6%."""
  dims = {"experts": MuonDimensionNumbers((2,), (3,)), "tall": MuonDimensionNumbers((1,), (2,)),
          "wide": MuonDimensionNumbers((1,), (2,)), "o": MuonDimensionNumbers((1, 2), (3,))}
  rng = np.random.default_rng(1)
  shapes = {"experts": (2, 4, 32, 16), "tall": (2, 48, 16), "wide": (2, 16, 48), "o": (2, 4, 8, 24)}
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(2)]
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  old = scale_by_muon(ns_steps=5, beta=0.95, eps=1e-8, weight_dimension_numbers=dims)

  def run(tx):
    state = tx.init(params)
    outs = []
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, params)
      outs.append(u)
    return outs, state

  want, want_state = run(old)
  for dtype, tol in (("float32", F32_REL_TOL), ("bfloat16", BF16_REL_TOL)):
    got, got_state = run(optim.scale_by_batched_muon(5, 0.95, 1e-8, dims, dtype))
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    np.testing.assert_allclose(np.asarray(got_state.count), np.asarray(want_state.count))
    for k in shapes:  # the momentum is float32 and identical; the orthogonalised update within tolerance
      np.testing.assert_allclose(got_state.mu[k], want_state.mu[k], rtol=1e-6, atol=1e-7)
      assert got_state.mu[k].dtype == jnp.float32
      for u_got, u_want in zip(got, want):
        assert u_got[k].dtype == jnp.float32 and u_got[k].shape == shapes[k]
        assert _rel(u_got[k], u_want[k]) < tol, (dtype, k, _rel(u_got[k], u_want[k]))


def test_config_key_is_validated():
  assert tiny_config().optim.muon_ns_dtype == "bfloat16"
  with pytest.raises(ConfigError, match="optim.muon_ns_dtype"):
    tiny_config(["--config.optim.muon_ns_dtype=float16"])
  tx = optim.make_optimizer(tiny_config(["--config.optim.muon_ns_dtype=float32"]))
  assert isinstance(tx, optax.GradientTransformation)


# ----------------------------------------------------------------------------------- distributed Newton-Schulz


def test_matrix_split_deals_whole_matrices_over_every_device():
  joyai = types.SimpleNamespace(shape={"data": 1, "fsdp": 16, "expert": 4, "tensor": 1})
  assert optim.matrix_split((39, 256), joyai) == P(None, ("fsdp", "expert"), None, None)   # routed experts
  assert optim.matrix_split((40,), joyai) is None          # 40 layers' attention: not evenly over 64 devices
  assert optim.matrix_split((64,), joyai) == P(("fsdp", "expert"), None, None)
  assert optim.matrix_split((2, 16), fsdp_expert_mesh()) == P(None, ("fsdp", "expert"), None, None)
  assert optim.matrix_split((4, 2), fsdp_expert_mesh()) == P("expert", "fsdp", None, None)


def _compiled(fn, shape, spec):
  sh = NamedSharding(fsdp_expert_mesh(), spec)
  c = jax.jit(fn, in_shardings=sh, out_shardings=sh).lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ops = re.findall(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                   c.as_text())
  return float(cost["flops"]), ops


def test_distributed_newton_schulz_runs_each_chain_on_one_device():
  """A routed-expert stack [layers, experts, in, out] laid out as the params are (experts over 'expert', the
  input dimension over 'fsdp'): as it lies, every Newton-Schulz matmul is partitioned and all-reduces its
  partial Gram matrix; dealt out, the chains run without communication (two reshuffles, in and out), each
  device does an eighth of the work, and the result is the single-device one."""
  shape, spec = (4, 16, 128, 64), P(None, "expert", "fsdp", None)
  ns = lambda s: optim.newton_schulz_stack(s, 5, 1e-8, jnp.float32)   # noqa: E731
  mesh = fsdp_expert_mesh()
  single, _ = _compiled(ns, shape, P())
  flops, ops = _compiled(ns, shape, spec)
  assert ops.count("all-reduce") >= 5, ops              # the layout's cost: one per step at least
  flops, ops = _compiled(lambda s: optim.distributed_newton_schulz(s, mesh, ns), shape, spec)
  assert "all-reduce" not in ops and "all-gather" not in ops and len(ops) <= 2, ops
  assert flops <= 1.1 * single / 8, (flops, single)
  g = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32),
                     NamedSharding(mesh, spec))
  got = jax.jit(lambda s: optim.distributed_newton_schulz(s, mesh, ns))(g)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(ns)(np.asarray(g))), rtol=1e-5, atol=1e-6)


def test_muon_update_on_a_mesh_equals_one_device():
  """make_optimizer(..., mesh=) on the tiny model over fsdp 2 x expert 4: the same Muon update as without a
  mesh (float32 Newton-Schulz, so the only difference is summation order)."""
  cfg = tiny_config("--config.optim.name=muon", "--config.optim.muon_ns_dtype=float32")
  abstract = model.abstract_params(cfg)
  rng = np.random.default_rng(3)
  grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), abstract)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  mesh = fsdp_expert_mesh()
  plain = optim.make_optimizer(cfg, abstract)
  dealt = optim.make_optimizer(cfg, abstract, mesh=mesh)
  want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  got, _ = jax.jit(dealt.update)(grads, dealt.init(params), params)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
