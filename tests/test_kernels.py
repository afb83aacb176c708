"""MoE dispatch kernels: Pallas grouped matmul (interpret mode) and the ops boundary vs a per-expert loop.

Every Pallas kernel here runs in the Pallas interpreter on CPU: the GPU kernels (``backend='gpu'``, the ones
the Triton lowering compiles on an H100) and the TPU path (``backend='tpu'``, megablox). Each compiled
function takes ``group_sizes`` as a traced argument so one compile serves all the routing cases.
"""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from joyjax.kernels import ops, pallas_backend

TILE = (16, 16, 16)
M, K, N, G = 100, 40, 24, 6  # none of M, K, N is a multiple of the 16-wide tiles

# (name, group sizes): sum <= M; rows past the sum must come out zero with zero gradient.
CASES = [
    ("ragged_with_empty_experts", [17, 0, 33, 5, 0, 29]),  # 16 rows past the end
    ("one_expert_takes_all", [0, 0, 100, 0, 0, 0]),
    ("first_expert_takes_all", [100, 0, 0, 0, 0, 0]),
    ("last_expert_takes_all", [0, 0, 0, 0, 0, 100]),
    ("tile_multiples", [16, 32, 0, 16, 32, 4]),
    ("many_boundaries_in_one_tile", [1, 2, 3, 0, 4, 5]),  # 85 rows past the end
    ("all_empty", [0, 0, 0, 0, 0, 0]),
]


def loop_gmm(lhs, rhs, sizes):
  """Oracle: for each expert g, rows [start, end) times rhs[g], in float32; other rows zero."""
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  start = 0
  for g, size in enumerate(sizes):
    end = start + int(size)
    if end > start:
      part = jnp.dot(lhs[start:end].astype(jnp.float32), rhs[g].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
      out = out.at[start:end].set(part)
    start = end
  return out


@functools.partial(jax.jit, static_argnums=(0,))
def oracle_and_grads(fn, cot, *params):
  """fn(*params) and the grad of the linear functional <fn(*params), cot> w.r.t. every param (jitted)."""
  grads = jax.grad(lambda *p: jnp.sum(fn(*p) * cot), tuple(range(len(params))))(*params)
  return fn(*params), grads


@functools.lru_cache(maxsize=None)
def _gmm_oracle(sizes: tuple, dtype_name: str):
  """Loop oracle value and grads for the shared (M, K, N, G) inputs rounded to ``dtype``; cached."""
  lhs, rhs, cot = _inputs(jnp.dtype(dtype_name))
  return oracle_and_grads(functools.partial(loop_gmm, sizes=sizes), cot, lhs.astype(jnp.float32),
                          rhs.astype(jnp.float32))


def _inputs(dtype, m=M, k=K, n=N, g=G, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(k2, (g, k, n), jnp.float32).astype(dtype)
  cot = jax.random.normal(k3, (m, n), jnp.float32)  # random linear functional <out, cot>
  return lhs, rhs, cot


def _close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(float(np.abs(want).max()), 1.0)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


# The interpret-mode sweeps (every routing case, both backends) are slow; test_grouped_matmul_impls_match_loop
# [pallas_interpret] and test_gmm_transpose_rhs_and_other_tiling are the fast interpret-mode cases.
@pytest.mark.slow
@pytest.mark.parametrize("backend,dtype", [("gpu", jnp.float32), ("tpu", jnp.float32), ("gpu", jnp.bfloat16)])
def test_gmm_forward_and_grads_match_loop(backend, dtype):
  lhs, rhs, cot = _inputs(dtype)
  rtol = 1e-5 if dtype == jnp.float32 else 3e-2

  @jax.jit
  def run(lhs, rhs, gs):
    def f(a, b):
      return pallas_backend.gmm(a, b, gs, interpret=True, tiling=TILE, backend=backend)
    out = f(lhs, rhs)
    grads = jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * cot), (0, 1))(lhs, rhs)
    return out, grads

  # bf16 is about tolerance, not edge cases: three routings suffice.
  for name, sizes in (CASES if dtype == jnp.float32 else CASES[:2] + CASES[5:6]):
    out, (d_lhs, d_rhs) = run(lhs, rhs, jnp.asarray(sizes, jnp.int32))
    assert out.shape == (M, N) and out.dtype == dtype, name
    assert d_lhs.dtype == dtype and d_rhs.dtype == dtype, name
    want, (w_lhs, w_rhs) = _gmm_oracle(tuple(sizes), jnp.dtype(dtype).name)
    _close(out, want, rtol)
    _close(d_lhs, w_lhs, rtol)
    _close(d_rhs, w_rhs, rtol)
    total = sum(sizes)
    assert not np.any(np.asarray(out[total:], np.float32)), f"{name}: rows past sum(group_sizes) must be zero"
    assert not np.any(np.asarray(d_lhs[total:], np.float32)), f"{name}: no gradient for rows past the groups"
    for g, size in enumerate(sizes):
      if size == 0:
        assert not np.any(np.asarray(d_rhs[g], np.float32)), f"{name}: empty expert {g} must get no gradient"


def test_gmm_transpose_rhs_and_other_tiling():
  # out = lhs @ rhs[g].T with rhs [G, N, K]; tiles (32, 16, 64) against M=50, K=72, N=40: the 64-wide tile is
  # shrunk to fit N.
  m, k, n, g = 50, 72, 40, 4
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  lhs = jax.random.normal(k1, (m, k), jnp.float32)
  rhs_t = jax.random.normal(k2, (g, n, k), jnp.float32)  # out has 40 columns, contraction 72
  cot = jax.random.normal(k3, (m, n), jnp.float32)
  sizes = [7, 0, 30, 9]

  @jax.jit
  def run(lhs, rhs_t, gs):
    f = lambda a, b: pallas_backend.gmm(a, b, gs, interpret=True, tiling=(32, 16, 64), transpose_rhs=True)
    return f(lhs, rhs_t), jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), (0, 1))(lhs, rhs_t)

  out, (d_lhs, d_rhs) = run(lhs, rhs_t, jnp.asarray(sizes, jnp.int32))
  oracle = lambda a, b: loop_gmm(a, jnp.swapaxes(b, 1, 2), sizes)
  want, (w_lhs, w_rhs) = oracle_and_grads(oracle, cot, lhs, rhs_t)
  _close(out, want, 1e-5)
  _close(d_lhs, w_lhs, 1e-5)
  _close(d_rhs, w_rhs, 1e-5)


@pytest.mark.slow  # tgmm is d_rhs of the fast test_grouped_matmul_impls_match_loop[pallas_interpret]
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_tgmm_matches_loop(backend):
  lhs, _, dout = _inputs(jnp.float32)
  run = jax.jit(lambda a, d, gs: pallas_backend.tgmm(a, d, gs, interpret=True, tiling=TILE, backend=backend))
  for name, sizes in CASES[:3] + CASES[5:]:
    got = run(lhs, dout, jnp.asarray(sizes, jnp.int32))
    assert got.shape == (G, K, N), name
    starts = np.concatenate([[0], np.cumsum(sizes)])
    want = np.stack([np.asarray(lhs[starts[g]:starts[g + 1]], np.float64).T
                     @ np.asarray(dout[starts[g]:starts[g + 1]], np.float64) for g in range(G)])
    _close(got, want, 1e-5)


@pytest.mark.slow  # fast: test_moe_pallas_model.py[float32_fused] (gmm_swiglu and its VJP in the MoE block)
def test_gmm_swiglu_fused_matches_loop():
  lhs, w_gate, cot = _inputs(jnp.float32, n=N)
  w_up = jax.random.normal(jax.random.key(7), w_gate.shape, jnp.float32)

  @jax.jit
  def run(lhs, wg, wu, gs):
    f = lambda a, b, c: pallas_backend.gmm_swiglu(a, b, c, gs, interpret=True, tiling=TILE)
    return f(lhs, wg, wu), jax.grad(lambda *p: jnp.sum(f(*p) * cot), (0, 1, 2))(lhs, wg, wu)

  for name, sizes in [CASES[0], CASES[1], CASES[5]]:
    out, grads = run(lhs, w_gate, w_up, jnp.asarray(sizes, jnp.int32))
    oracle = lambda a, b, c: jax.nn.silu(loop_gmm(a, b, sizes)) * loop_gmm(a, c, sizes)
    want, want_grads = oracle_and_grads(oracle, cot, lhs, w_gate, w_up)
    _close(out, want, 1e-5)
    for got, want in zip(grads, want_grads):
      _close(got, want, 1e-5)
    assert not np.any(np.asarray(out[sum(sizes):])), name


@pytest.mark.parametrize("impl", ["reference", "ragged_dot", "pallas_interpret"])
def test_grouped_matmul_impls_match_loop(impl, monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  lhs, rhs, cot = _inputs(jnp.float32, m=48, k=20, n=12, g=4, seed=3)
  sizes = [10, 0, 25, 6]  # 7 rows past the end
  gs = jnp.asarray(sizes, jnp.int32)
  f = lambda a, b: ops.grouped_matmul(a, b, gs, impl=impl)
  run = jax.jit(lambda a, b: (f(a, b), jax.grad(lambda x, y: jnp.sum(f(x, y) * cot), (0, 1))(a, b)))
  out, (d_lhs, d_rhs) = run(lhs, rhs)
  want, (w_lhs, w_rhs) = oracle_and_grads(functools.partial(loop_gmm, sizes=tuple(sizes)), cot, lhs, rhs)
  _close(out, want, 1e-5)
  _close(d_lhs, w_lhs, 1e-5)
  _close(d_rhs, w_rhs, 1e-5)
  assert not np.any(np.asarray(out[41:]))


def _triton_ir_modules(fn, *avals, with_num_stages=False):
  """Lowers ``fn`` for CUDA on this CPU-only host; returns the verified Triton IR of each Pallas kernel
  ({name: [text]}, or {name: [(text, num_stages)]} with ``with_num_stages``)."""
  try:
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering
    lowered = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    make_ctx = triton_lowering._new_ir_context
  except Exception as e:  # noqa: BLE001 - private APIs moved, or no CUDA lowering in this jaxlib
    # A failure, not a skip: this is CI's only check of the GPU kernels' lowering, and a skip would hide its loss.
    pytest.fail(f"cannot lower for CUDA here: {type(e).__name__}: {e}")
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          if child.operation.name == "stablehlo.custom_call":
            calls.append(child)
          walk(child.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  modules = {}
  for call in calls:
    cfg = call.attributes["mhlo.backend_config"]
    with make_ctx():
      module = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)  # parses = verifies
      assert module.operation.verify()
      text = str(module)
      entry = (text, ir.IntegerAttr(cfg["num_stages"]).value) if with_num_stages else text
      modules.setdefault(ir.StringAttr(cfg["name"]).value, []).append(entry)
  return modules


def test_gpu_kernels_lower_to_valid_triton_ir():
  """The GPU (not interpreted) path: every kernel of gmm/tgmm/gmm_swiglu and their VJPs lowers to Triton IR
  that verifies (power-of-two tiles, supported primitives, well-typed loops) and keeps its loops as
  ``scf.for`` (which Triton software-pipelines). Compiling that IR to PTX needs a GPU: not covered here."""
  bf16 = jnp.bfloat16
  lhs = jax.ShapeDtypeStruct((1000, 200), bf16)  # M, K not tile multiples: the wrapper pads
  rhs = jax.ShapeDtypeStruct((8, 200, 384), bf16)
  gs = jax.ShapeDtypeStruct((8,), jnp.int32)
  ct = jax.ShapeDtypeStruct((1000, 384), bf16)

  def fwd_bwd(l, r, u, g, c):
    out, vjp = jax.vjp(lambda a, b: pallas_backend.gmm(a, b, g, backend="gpu"), l, r)
    out2, vjp2 = jax.vjp(lambda a, b, d: pallas_backend.gmm_swiglu(a, b, d, g, backend="gpu"), l, r, u)
    return out, vjp(c), out2, vjp2(c)

  modules = _triton_ir_modules(fwd_bwd, lhs, rhs, rhs, gs, ct)
  # gmm: fwd, d_lhs, swiglu fwd, swiglu recompute, swiglu d_lhs; tgmm: d_rhs, d_gate_w, d_up_w.
  assert len(modules.get("joyjax_gmm", [])) == 5 and len(modules.get("joyjax_tgmm", [])) == 3, {
      k: len(v) for k, v in modules.items()}
  for text in sum(modules.values(), []):
    assert "scf.for" in text and "scf.while" not in text
    assert "tt.dot" in text


def test_tpu_path_lowers_to_mosaic():
  """The TPU (megablox) path with its default tiles lowers to Mosaic kernels (block-shape rules are checked at
  lowering); compiling them needs a TPU: not covered here."""
  bf16 = jnp.bfloat16
  lhs = jax.ShapeDtypeStruct((1000, 200), bf16)
  rhs = jax.ShapeDtypeStruct((8, 200, 384), bf16)
  gs = jax.ShapeDtypeStruct((8,), jnp.int32)
  ct = jax.ShapeDtypeStruct((1000, 384), bf16)

  def fwd_bwd(l, r, u, g, c):
    out, vjp = jax.vjp(lambda a, b: pallas_backend.gmm(a, b, g, backend="tpu"), l, r)
    out2, vjp2 = jax.vjp(lambda a, b, d: pallas_backend.gmm_swiglu(a, b, d, g, backend="tpu"), l, r, u)
    return out, vjp(c), out2, vjp2(c)

  try:
    text = jax.jit(fwd_bwd).trace(lhs, rhs, rhs, gs, ct).lower(lowering_platforms=("tpu",)).as_text()
  except ImportError as e:  # a failure, not a skip: CI's only check of the TPU kernels' lowering
    pytest.fail(f"no Mosaic TPU lowering in this jaxlib: {e}")
  assert "tpu_custom_call" in text


# ------------------------------------------------------------------------------------------------------------
# permute / unpermute


def _routing(t=12, k=3, e=5, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  ids = jax.lax.top_k(jax.random.uniform(k1, (t, e)), k)[1]  # k distinct experts per token
  x = jax.random.normal(k2, (t, 8), jnp.float32)
  w = jax.random.uniform(k3, (t, k), jnp.float32)
  return x, ids, w


def test_permute_sorts_stably_and_counts():
  x, ids, _ = _routing()
  t, k = ids.shape
  x_sorted, gs, order = ops.permute(x, ids, 5)
  ids_np = np.asarray(ids)
  np.testing.assert_array_equal(np.asarray(gs), np.bincount(ids_np.reshape(-1), minlength=5))
  sorted_experts = ids_np.reshape(-1)[np.asarray(order)]
  assert np.all(np.diff(sorted_experts) >= 0), "rows must be grouped by expert in expert order"
  tokens = np.asarray(order) // k
  for e in range(5):
    assert np.all(np.diff(tokens[sorted_experts == e]) > 0), "stable: token order kept inside an expert"
  np.testing.assert_array_equal(np.asarray(x_sorted), np.asarray(x)[tokens])


@pytest.mark.parametrize("n", [1, 7, 4096])
def test_inverse_permutation_is_argsort_of_a_permutation(n):
  order = jnp.asarray(np.random.default_rng(n).permutation(n), jnp.int32)
  inv = ops.inverse_permutation(order)
  np.testing.assert_array_equal(np.asarray(inv), np.argsort(np.asarray(order)))
  np.testing.assert_array_equal(np.asarray(inv)[np.asarray(order)], np.arange(n))
  assert inv.dtype == jnp.int32


def test_unpermute_round_trip_and_weights():
  x, ids, w = _routing()
  t, k = ids.shape
  x_sorted, _, order = ops.permute(x, ids, 5)
  np.testing.assert_allclose(ops.unpermute(x_sorted, order, jnp.ones((t, k))), k * np.asarray(x), rtol=1e-6)
  want = np.asarray(w).sum(1, keepdims=True) * np.asarray(x)
  np.testing.assert_allclose(ops.unpermute(x_sorted, order, w), want, rtol=1e-6)


def test_permute_unpermute_gradients_match_dense():
  x, ids, w = _routing(seed=4)
  e = 5
  scale = jax.random.normal(jax.random.key(9), (e, x.shape[1]), jnp.float32)  # an elementwise "expert"
  cot = jax.random.normal(jax.random.key(10), x.shape, jnp.float32)

  def sparse(x, w, scale):
    xs, gs, order = ops.permute(x, ids, e)
    expert_of_row = jnp.repeat(jnp.arange(e), gs, total_repeat_length=xs.shape[0])
    return jnp.sum(ops.unpermute(xs * scale[expert_of_row], order, w) * cot)

  def dense(x, w, scale):  # out[t] = sum_s w[t, s] * x[t] * scale[ids[t, s]]
    return jnp.sum(jnp.einsum("ts,tsh->th", w, x[:, None, :] * scale[ids]) * cot)

  (v_s, g_s), (v_d, g_d) = [jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, w, scale) for f in (sparse, dense)]
  np.testing.assert_allclose(v_s, v_d, rtol=1e-5)
  for got, want in zip(g_s, g_d):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# resolve_impl


def test_resolve_impl_explicit_auto_and_env(monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  for impl in ("reference", "ragged_dot", "pallas_interpret"):
    assert ops.resolve_impl(impl) == impl
  assert ops.resolve_impl("auto") == "ragged_dot"  # CPU: the compiled Pallas kernels are not available
  assert pallas_backend.unsupported_reason(pallas_backend.hardware()) is not None
  monkeypatch.setenv(ops.ENV_VAR, "reference")
  assert ops.resolve_impl("pallas") == "reference"  # the environment override wins over the config
  assert ops.resolve_impl("auto") == "reference"
  monkeypatch.setenv(ops.ENV_VAR, "")
  assert ops.resolve_impl("pallas_interpret") == "pallas_interpret"  # empty env = no override


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_self_test_passes_in_interpret_mode(backend):
  # A user or benchmark runs pallas_backend.self_test() compiled on the device; here it runs interpreted.
  assert pallas_backend.self_test(backend, interpret=True)
  with pytest.raises(RuntimeError, match="outside jax.jit"):  # never inside a trace
    jax.eval_shape(lambda: pallas_backend.self_test(backend, interpret=True))


def test_resolve_impl_unknown_is_a_clear_error(monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  with pytest.raises(ValueError, match="'cutlass'.*choose one of"):
    ops.resolve_impl("cutlass")
  monkeypatch.setenv(ops.ENV_VAR, "triton")
  with pytest.raises(ValueError, match=f"'triton'.*{ops.ENV_VAR}"):
    ops.resolve_impl("auto")


def test_pallas_rejects_bad_shapes():
  lhs, rhs, _ = _inputs(jnp.float32, m=8, k=4, n=4, g=2)
  with pytest.raises(ValueError, match="group_sizes"):
    pallas_backend.gmm(lhs, rhs, jnp.asarray([4, 2, 2], jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="contraction"):
    pallas_backend.gmm(lhs[:, :3], rhs, jnp.asarray([4, 4], jnp.int32), interpret=True)


# ------------------------------------------------------------------------------------------------------------
# The benchmark script runs end to end at a tiny shape on CPU (pallas_interpret).


@pytest.mark.slow  # an end-to-end script run; the kernels it times are checked by the tests above
def test_benchmark_tiny_cpu_run(tmp_path):
  path = os.path.join(REPO_ROOT, "benchmarks", "moe_kernels.py")
  spec = importlib.util.spec_from_file_location("moe_kernels_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "moe.json"
  result = bench.main(["--tokens", "256", "--hidden", "64", "--width", "32", "--experts", "8", "--topk", "2",
                       "--iters", "2", "--warmup", "1", "--impls", "pallas_interpret", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["config"]["routed_rows"] == 512
  whats = {(r["impl"], r["what"]) for r in result["rows"]}
  for what in ("gmm gate+up fwd", "gmm gate+up fwd+bwd", "layer fwd", "layer fwd+bwd"):
    assert ("pallas_interpret", what) in whats
  assert all(r["status"] == "ok" and r["ms"] > 0 for r in result["rows"]), result["rows"]


def test_permute_and_combine_custom_vjps_match_autodiff():
  """The hand-written backward passes of permute (gather + slot sum) and the combine equal autodiff of the
  plain gathers they replace, float32, with ragged expert loads and an empty expert."""
  t, k, e, h = 13, 3, 6, 5
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(t, h)).astype(np.float32))
  ids = jnp.asarray(rng.choice(np.array([0, 1, 1, 2, 4, 5, 5, 5]), size=(t, k)))
  w = jnp.asarray(rng.random((t, k)).astype(np.float32))
  cot = jnp.asarray(rng.normal(size=(t, h)).astype(np.float32))
  scale = jnp.asarray(rng.normal(size=(t * k, 1)).astype(np.float32))

  def ours(x, w):
    xs, _, order = ops.permute(x, ids, e)
    return jnp.sum(ops.unpermute(xs * scale, order, w) * cot)

  def plain(x, w):
    order = jnp.argsort(ids.reshape(-1), stable=True)
    xs = x[order // k] * scale
    y = jnp.zeros((t * k, h)).at[order].set(xs).reshape(t, k, h)
    return jnp.sum(jnp.einsum("tkh,tk->th", y, w) * cot)

  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5)
  g_ours = jax.grad(ours, argnums=(0, 1))(x, w)
  g_plain = jax.grad(plain, argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
