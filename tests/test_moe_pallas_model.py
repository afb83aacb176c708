"""The model's MoE output and gradients with the Pallas path equal the reference path.

``model.moe.impl=pallas_interpret`` routes every routed-expert grouped matmul of the model (``MoE.experts``:
gate, up, down through ``kernels.grouped_matmul``) to ``pallas_backend.gmm(..., interpret=True)``: the GPU
(Triton-style) kernels run in the Pallas interpreter on the CPU, with their custom VJPs (``d_lhs`` through the
transposed-rhs kernel, ``d_rhs`` through ``tgmm``). ``impl=reference`` is the pure-JAX masked loop, differentiated
by JAX. Both run the whole model on the same params and tokens [2, 16]:

* float32: the tiny config itself, MTP logits included (its block is a MoE block too); logits and the gradient of
  every parameter agree to float32 round-off.
* bfloat16 compute (float32 params): the tiny config cut to its one MoE block (no dense layer, no MTP, not
  scanned), which compiles in a third of the time; agreement to bfloat16 round-off.
* float32_fused: that one MoE block in float32 with ``model.moe.fuse_swiglu``: gate, up and the SwiGLU go
  through ``pallas_backend.gmm_swiglu`` (one kernel; its backward recomputes gate and up) against the unfused
  reference; agreement to float32 round-off.

Every routed expert that received tokens must get a non-zero gradient in wi_gate / wi_up / wo, equal to the
reference's; experts that received none get exactly zero in both.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.kernels import ops, pallas_backend

BATCH, SEQ = 2, 16
EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")
# CPU compile time dominates these tests; LLVM's optimisation level does not change what is computed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

ONE_BLOCK = ["--config.model.first_k_dense=0", "--config.model.num_layers=1", "--config.model.mtp.num_layers=0",
             "--config.model.scan_layers=False"]
VARIANTS = {
    "float32": ["--config.model.dtype=float32"],
    "bfloat16": ["--config.model.dtype=bfloat16", *ONE_BLOCK],
    "float32_fused": ["--config.model.dtype=float32", "--config.model.moe.fuse_swiglu=True", *ONE_BLOCK],
}
# float32_fused (one MoE block through both Pallas kernels, gmm_swiglu and gmm) is the fast case; the whole
# tiny model (float32) and bfloat16 are slow.
DTYPES = [pytest.param("float32", marks=pytest.mark.slow), pytest.param("bfloat16", marks=pytest.mark.slow),
          "float32_fused"]
# (max |diff| / max |ref| per leaf, ||diff|| / ||ref|| per leaf)
TOL = {"float32": (2e-5, 1e-5), "bfloat16": (5e-2, 2e-2), "float32_fused": (2e-5, 1e-5)}


@contextlib.contextmanager
def _count_pallas_calls(calls):
  """Records (while tracing) the calls that reach pallas_backend.gmm / gmm_swiglu: (name, ``interpret`` flag)."""
  def spy(name, real, interpret_pos):
    def f(*args, **kwargs):
      calls.append((name, kwargs.get("interpret", args[interpret_pos] if len(args) > interpret_pos else False)))
      return real(*args, **kwargs)
    return f

  with pytest.MonkeyPatch.context() as mp:
    mp.delenv(ops.ENV_VAR, raising=False)  # the environment override would send both runs down one path
    mp.setattr(pallas_backend, "gmm", spy("gmm", pallas_backend.gmm, 3))
    mp.setattr(pallas_backend, "gmm_swiglu", spy("gmm_swiglu", pallas_backend.gmm_swiglu, 4))
    yield


def _params(cfg):
  """Parameters drawn as ``model.init`` draws them (normal(init_std) weights, unit norm scales, zero router
  bias), from ``model.abstract_params``: ``model.init``'s eager per-op compilation costs more than the whole
  comparison on the CPU."""
  rng = np.random.default_rng(0)

  def one(path, a):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "scale":
      return jnp.ones(a.shape, a.dtype)
    if name == "router_bias":
      return jnp.zeros(a.shape, a.dtype)
    return jnp.asarray(cfg.model.init_std * rng.standard_normal(a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(one, model.abstract_params(cfg))


@functools.lru_cache(maxsize=None)
def _run(dtype: str, impl: str):
  """(logits, expert counts per stack, grads, params, pallas calls) of one impl on the shared inputs."""
  cfg = tiny_config(VARIANTS[dtype], f"--config.model.moe.impl={impl}")
  params = _params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.model.vocab_size)
  cot = jax.random.normal(jax.random.key(2), (BATCH, SEQ, cfg.model.vocab_size), jnp.float32)
  with_mtp = cfg.model.mtp.num_layers > 0

  def loss(p):
    if with_mtp:
      logits, mtp_logits, aux = model.forward(cfg, p, tokens, return_mtp=True, return_aux=True)
    else:
      (logits, aux), mtp_logits = model.forward(cfg, p, tokens, return_aux=True), []
    total = jnp.sum(logits * cot) + sum(jnp.sum(0.5 * m * cot) for m in mtp_logits)
    counts = {k: v["expert_counts"] for k, v in aux.items() if "expert_counts" in v}
    return total, (logits, counts)

  calls = []
  with _count_pallas_calls(calls):
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
    (_, (logits, counts)), grads = fn(params)
  return (np.asarray(logits), jax.tree.map(np.asarray, counts), jax.tree.map(np.asarray, grads), cfg, calls)


def _pair(dtype):
  return _run(dtype, "reference"), _run(dtype, "pallas_interpret")


def _flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_pallas_path_is_used_and_routes_identically(dtype):
  ref, pal = _pair(dtype)
  assert ref[4] == []                              # the reference never reaches the Pallas kernels
  assert pal[4] and all(interpret for _, interpret in pal[4])  # the Pallas path does, in interpret mode
  fused = {name for name, _ in pal[4]} == {"gmm", "gmm_swiglu"}  # gate/up fused; the down projection: gmm
  assert fused == pal[3].model.moe.fuse_swiglu, pal[4]
  assert ref[3].model.moe.impl == "reference" and pal[3].model.moe.impl == "pallas_interpret"
  assert ref[1].keys() == pal[1].keys() and "moe_layers" in ref[1]
  for k in ref[1]:
    np.testing.assert_array_equal(pal[1][k], ref[1][k], err_msg=k)
    # every token goes to top-k experts in every MoE layer
    assert np.all(ref[1][k].sum(-1) == BATCH * SEQ * ref[3].model.moe.num_experts_per_tok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_equal(dtype):
  ref, pal = _pair(dtype)
  assert pal[0].dtype == np.float32 and pal[0].shape == (BATCH, SEQ, ref[3].model.vocab_size)
  scale = float(np.abs(ref[0]).max())
  assert scale > 0.1
  rtol = 1e-5 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(pal[0], ref[0], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_of_all_params_equal(dtype):
  ref, pal = _pair(dtype)
  max_tol, norm_tol = TOL[dtype]
  g_ref, g_pal = _flat(ref[2]), _flat(pal[2])
  assert g_ref.keys() == g_pal.keys()
  for name, want in g_ref.items():
    got = g_pal[name]
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if name.endswith("router_bias"):  # not a gradient parameter: no gradient flows to it
      assert not np.any(want) and not np.any(got), name
      continue
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    scale = np.abs(want64).max()
    assert scale > 0, f"{name}: zero reference gradient"
    assert np.abs(got64 - want64).max() <= max_tol * scale, (name, np.abs(got64 - want64).max(), scale)
    assert np.linalg.norm(got64 - want64) <= norm_tol * np.linalg.norm(want64), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_weight_gradients_nonzero_and_equal_per_expert(dtype):
  ref, pal = _pair(dtype)
  _, norm_tol = TOL[dtype]
  stacks = {"moe_layers": lambda t: t["moe_layers"]["mlp"]}
  if "mtp" in ref[2]:
    stacks["mtp"] = lambda t: t["mtp"]["block"]["mlp"]
  assert set(stacks) == set(ref[1])
  for stack, get in stacks.items():
    counts = ref[1][stack]                                # [layers, experts]
    used = counts > 0
    assert used.any() and counts.shape == get(ref[2])["wi_gate"].shape[:2]
    for w in EXPERT_WEIGHTS:
      want, got = get(ref[2])[w].astype(np.float64), get(pal[2])[w].astype(np.float64)
      for layer, expert in zip(*np.nonzero(used)):
        a, b = got[layer, expert], want[layer, expert]
        where = f"{stack}/{w}[layer {layer}, expert {expert}] ({int(counts[layer, expert])} tokens)"
        assert np.linalg.norm(b) > 0 and np.linalg.norm(a) > 0, where
        assert np.linalg.norm(a - b) <= norm_tol * np.linalg.norm(b), where
      for layer, expert in zip(*np.nonzero(~used)):
        assert not np.any(got[layer, expert]) and not np.any(want[layer, expert]), (stack, w, layer, expert)
