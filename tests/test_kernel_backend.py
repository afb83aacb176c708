"""Which MoE grouped-matmul backend runs, and whether the GPU kernels fit the device's shared memory.

Backend choice (issue 11, bug 1): ``model.moe.impl=auto`` is decided once per process from hardware facts
(platform, NVIDIA compute capability, Triton / megablox importable), never by running a kernel, so it is
right even when first asked for inside ``jax.jit`` tracing (where the old smoke test failed with
``TracerArrayConversionError`` and silently fell back to ragged_dot). Here a Hopper GPU is pretended by
monkeypatching those facts; the model is only traced (never lowered or run), which must reach the compiled
(non-interpreted) Pallas kernels, run no concrete computation, and log the choice once. ``pallas`` asked for
where it cannot run is a ``ConfigError`` naming the setting and the fix.

Shared memory (issue 11, bug 2): Triton reported "Required: 262144, Hardware limit: 232448" on an H200 for the
float32 gmm VJP and the bf16 fused SwiGLU VJP. The footprint formula (``joyjax.kernels.smem``) must reproduce
that number at the old tiles, and every kernel's tiling for every dtype must fit, both by the formula and as
measured on the Triton IR the kernels actually lower to (tile loads in the pipelined loop x num_stages).
"""

import logging
import re

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.errors import ConfigError
from joyjax.kernels import ops, pallas_backend, smem
from test_kernels import _triton_ir_modules

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
OLD_GMM_TILES, OLD_GMM_STAGES = (128, 64, 128), 4  # the defaults at commit 7a2033d (measured in issue 11)
OPS_LOGGER = "joyjax.kernels.ops"


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
  """Each test decides the backend from scratch, and leaves no pretend-platform decision behind."""
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  ops.clear_backend_choice()
  yield
  ops.clear_backend_choice()


def _pretend(monkeypatch, platform="gpu", cc=(9, 0), triton=True, megablox=False):
  monkeypatch.setattr(pallas_backend, "_platform", lambda: platform)
  monkeypatch.setattr(pallas_backend, "_compute_capability", lambda: cc)
  monkeypatch.setattr(pallas_backend, "_triton_importable", lambda: triton)
  monkeypatch.setattr(pallas_backend.pallas_tpu, "available", lambda: megablox)
  ops.clear_backend_choice()


def _choice_records(caplog):
  return [r for r in caplog.records if r.name == OPS_LOGGER and "model.moe.impl=auto" in r.getMessage()]


# ------------------------------------------------------------------------------------------------------------
# Backend choice


@pytest.mark.parametrize("facts,want", [
    (dict(platform="gpu", cc=(9, 0)), None),
    (dict(platform="gpu", cc=(8, 0)), None),
    (dict(platform="gpu", cc=(10, 0)), None),
    (dict(platform="gpu", cc=(7, 5)), "compute capability 7.5 < 8.0"),
    (dict(platform="gpu", cc=None), "no NVIDIA compute capability"),
    (dict(platform="gpu", cc=(9, 0), triton=False), "pallas.triton does not import"),
    (dict(platform="tpu", cc=None, megablox=True), None),
    (dict(platform="tpu", cc=None, megablox=False), "megablox"),
    (dict(platform="cpu", cc=None), "'cpu' has no compiled Pallas kernels"),
])
def test_where_the_compiled_kernels_run(monkeypatch, facts, want):
  _pretend(monkeypatch, **facts)
  hw = pallas_backend.hardware()
  why_not = pallas_backend.unsupported_reason(hw)
  if want is None:
    assert why_not is None
    assert ops.resolve_impl("auto") == "pallas" and ops.resolve_impl("pallas") == "pallas"
  else:
    assert want in why_not
    assert ops.resolve_impl("auto") == "ragged_dot"
    with pytest.raises(ConfigError, match="model.moe.impl=pallas cannot run here"):
      ops.resolve_impl("pallas")
  if facts["platform"] == "gpu" and facts["cc"]:
    want_limit = smem.SMEM_LIMIT_BY_COMPUTE_CAPABILITY.get(facts["cc"], smem.SMEM_LIMIT_BYTES)
    assert hw.smem_limit_bytes == want_limit


def test_auto_on_cpu_stays_ragged_dot_and_is_logged_once(caplog):
  caplog.set_level(logging.INFO, logger=OPS_LOGGER)
  assert [ops.resolve_impl("auto") for _ in range(3)] == ["ragged_dot"] * 3
  (record,) = _choice_records(caplog)
  assert "-> ragged_dot" in record.getMessage() and "platform cpu" in record.getMessage()


def test_pallas_asked_for_on_cpu_is_a_clear_error(monkeypatch):
  with pytest.raises(ConfigError,
                     match=r"model.moe.impl=pallas cannot run here: platform 'cpu'.*pallas_interpret"):
    ops.resolve_impl("pallas")
  monkeypatch.setenv(ops.ENV_VAR, "pallas")
  with pytest.raises(ConfigError,
                     match=r"JOYJAX_MOE_IMPL=pallas cannot run here.*Set JOYJAX_MOE_IMPL to auto"):
    ops.resolve_impl("auto")
  # ... also when the layer asks for it while being traced, rather than falling back to another backend
  x, w = jnp.ones((8, 4)), jnp.ones((2, 4, 4))
  with pytest.raises(ConfigError, match="JOYJAX_MOE_IMPL=pallas"):
    jax.eval_shape(lambda a, b: ops.grouped_matmul(a, b, jnp.asarray([3, 5]), impl="auto"), x, w)
  monkeypatch.setenv(ops.ENV_VAR, "pallas_interpret")
  assert ops.resolve_impl("pallas") == "pallas_interpret"  # the interpreter runs anywhere


def test_auto_is_pallas_when_first_decided_inside_jit_tracing_on_a_gpu(monkeypatch, caplog):
  """A pretended H200 (compute capability 9.0, Triton importable): the MoE layer and the ops, traced by
  jax.jit and jax.eval_shape with impl=auto, reach the compiled (non-interpreted) Pallas kernels; the
  decision is made inside the first trace, computes nothing concrete, and is logged once."""
  _pretend(monkeypatch, platform="gpu", cc=(9, 0), triton=True)
  caplog.set_level(logging.INFO, logger=OPS_LOGGER)

  def no_self_test(*a, **k):
    raise AssertionError("backend selection must not run the self-test")

  monkeypatch.setattr(pallas_backend, "self_test", no_self_test)
  calls = []

  def spy(name, real):
    def f(*args, **kwargs):
      calls.append((name, kwargs.get("interpret", False)))
      return real(*args, **kwargs)
    return f

  monkeypatch.setattr(pallas_backend, "gmm", spy("gmm", pallas_backend.gmm))
  monkeypatch.setattr(pallas_backend, "gmm_swiglu", spy("gmm_swiglu", pallas_backend.gmm_swiglu))
  events = []
  compile_events = ("/jax/core/compile/backend_compile_duration",
                    "/jax/core/compile/jaxpr_to_mlir_module_duration")
  listener = lambda event, *a, **k: events.append(event) if event in compile_events else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with jax.transfer_guard("disallow"):
      # 1. The whole (tiny) model, impl=auto, fused SwiGLU: its MoE layers call the kernels while traced.
      cfg = tiny_config("--config.model.moe.impl=auto", "--config.model.moe.fuse_swiglu=True")
      params = model.abstract_params(cfg)
      tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
      logits = jax.eval_shape(lambda p, t: model.forward(cfg, p, t), params, tokens)
      assert logits.shape == (2, 16, cfg.model.vocab_size)
      n_model = len(calls)
      assert n_model and {n for n, _ in calls} == {"gmm", "gmm_swiglu"} and not any(i for _, i in calls)

      # 2. The ops under jax.jit tracing, forward and gradients.
      lhs = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
      rhs = jax.ShapeDtypeStruct((4, 32, 48), jnp.bfloat16)
      gs = jax.ShapeDtypeStruct((4,), jnp.int32)

      def f(a, b, g):
        out = ops.grouped_matmul(a, b, g, impl="auto")
        grads = jax.grad(lambda x, y: jnp.sum(ops.grouped_matmul(x, y, g).astype(jnp.float32)), (0, 1))(a, b)
        return out, grads, ops.grouped_swiglu(a, b, b, g, fused=True)

      traced = jax.jit(f).trace(lhs, rhs, gs)
      assert traced.out_info[0].shape == (64, 48)
      assert len(calls) > n_model and not any(i for _, i in calls)
      jax.eval_shape(f, lhs, rhs, gs)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, f"tracing compiled or lowered something: {events}"
  (record,) = _choice_records(caplog)
  assert "-> pallas" in record.getMessage() and "compute capability 9.0" in record.getMessage()
  assert ops.auto_impl() == "pallas"


# ------------------------------------------------------------------------------------------------------------
# Shared memory


def test_footprint_formula_reproduces_the_h200_failures():
  """Old defaults (tiles 128x64x128, 4 stages): float32 gmm fwd / d_lhs = 4 stages x (128*64 + 64*128) x 4 B,
  bf16 fused SwiGLU d_lhs = 4 x (2*128*64 + 2*128*64) x 2 B: both 262,144 > 232,448, as Triton reported."""
  f32_gmm = smem.smem_bytes(OLD_GMM_TILES, OLD_GMM_STAGES, 4)
  bf16_swiglu_dlhs = smem.smem_bytes(OLD_GMM_TILES, OLD_GMM_STAGES, 2, n_lhs=2, n_rhs=2)
  assert f32_gmm == bf16_swiglu_dlhs == 4 * 16384 * 4 == 262144 > smem.SMEM_LIMIT_BYTES == 232448
  # the kernels that did run at the old defaults fit: bf16 gmm, bf16 tgmm (3 stages), bf16 fused forward
  assert smem.smem_bytes(OLD_GMM_TILES, 4, 2) == 4 * 16384 * 2
  assert smem.smem_bytes((128, 128, 128), 3, 2, tgmm=True) == 3 * 2 * 16384 * 2
  assert smem.smem_bytes(OLD_GMM_TILES, 4, 2, n_rhs=2) == 4 * (8192 + 16384) * 2 <= smem.SMEM_LIMIT_BYTES
  # a tile loaded once per step, 1 stage, is dominated by the epilogue's float32 accumulator tile
  assert smem.smem_bytes((128, 16, 128), 1, 2) == 128 * 128 * 4


LIMITS = sorted({smem.SMEM_LIMIT_BYTES, *smem.SMEM_LIMIT_BY_COMPUTE_CAPABILITY.values()})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("limit", LIMITS)
def test_every_default_tiling_fits(dtype, limit):
  tilings = pallas_backend.gpu_kernel_tilings(dtype, smem_limit_bytes=limit)
  assert set(tilings) == set(pallas_backend.GPU_KERNELS)
  for name, (tiles, stages, _, nbytes) in tilings.items():
    assert nbytes <= limit, (name, tiles, stages, nbytes)
    assert stages >= 2 and all(t >= 32 and t & (t - 1) == 0 for t in tiles), (name, tiles, stages)


def test_tilings_that_fit_are_kept_and_bf16_keeps_the_measured_fast_ones():
  bf16 = pallas_backend.gpu_kernel_tilings(jnp.bfloat16, smem_limit_bytes=smem.SMEM_LIMIT_BYTES)
  t = pallas_backend.GPU_TILING
  for name in ("gmm", "gmm_d_lhs", "swiglu", "swiglu_recompute"):  # 131,072 / 196,608 bytes: unchanged
    assert bf16[name][:2] == (t.gmm, t.num_stages), name
  assert bf16["tgmm"][:2] == (t.tgmm, t.tgmm_num_stages)
  assert bf16["swiglu_d_lhs"][:2] == (t.gmm, 3)  # 262,144 at 4 stages: one stage fewer


def test_fit_shrinks_stages_first_then_tiles():
  # float32 tgmm at (128, 128, 128), 3 stages: 393,216 B; 2 stages: 262,144; then the contraction (tm) halves.
  assert smem.fit_smem((128, 128, 128), 3, 4, 232448, tgmm=True) == ((64, 128, 128), 2)
  # gmm: the contraction is tk
  assert smem.fit_smem((128, 64, 128), 4, 4, 232448, n_lhs=2, n_rhs=2) == ((128, 32, 128), 2)
  assert smem.fit_smem((128, 64, 128), 4, 4, 232448) == ((128, 64, 128), 3)
  assert smem.fit_smem((128, 64, 128), 4, 2, 232448) == ((128, 64, 128), 4)  # fits: untouched
  assert smem.fit_smem((128, 64, 128), None, 2, 232448) == ((128, 64, 128), 3)  # None = Triton's default 3
  with pytest.raises(ValueError, match="no tiling fits"):
    smem.fit_smem((128, 64, 128), 4, 4, 1000)


# The Triton IR of a kernel: 2-D tile loads (result type tensor<RxCx!tt.ptr<T>>); a load from the pointer a
# later tt.store writes is Pallas' read-before-write of the output block, not a pipelined operand.
_LOAD = re.compile(r"(%\S+) = tt\.load (%[\w#]+)[^\n]*: tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>>")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def _ir_footprint(text: str, num_stages: int) -> int:
  stored = set(re.findall(r"tt\.store (%[\w#]+),", text))
  tiles = [int(r) * int(c) * _BYTES[t] for _, ptr, r, c, t in _LOAD.findall(text) if ptr not in stored]
  assert tiles, text[:2000]
  return num_stages * sum(tiles)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_lowered_kernels_fit_shared_memory(dtype):
  """Every kernel of gmm / gmm_swiglu forward + VJP, lowered for CUDA at a shape larger than the tiles: the
  pipelined tile loads in its Triton IR times its num_stages is what the formula says for its tiling, and
  fits 232,448 bytes (float32 and bf16, the two dtypes that failed on the H200; float16 has bf16's sizes)."""
  lhs = jax.ShapeDtypeStruct((1000, 200), dtype)  # M, K not tile multiples: the wrapper pads
  rhs = jax.ShapeDtypeStruct((8, 200, 384), dtype)
  gs = jax.ShapeDtypeStruct((8,), jnp.int32)
  ct = jax.ShapeDtypeStruct((1000, 384), dtype)

  def fwd_bwd(l, r, u, g, c):
    out, vjp = jax.vjp(lambda a, b: pallas_backend.gmm(a, b, g, backend="gpu"), l, r)
    out2, vjp2 = jax.vjp(lambda a, b, d: pallas_backend.gmm_swiglu(a, b, d, g, backend="gpu"), l, r, u)
    return out, vjp(c), out2, vjp2(c)

  modules = _triton_ir_modules(fwd_bwd, lhs, rhs, rhs, gs, ct, with_num_stages=True)
  got = sorted(_ir_footprint(text, stages) for text, stages in sum(modules.values(), []))
  plan = pallas_backend.gpu_kernel_tilings(dtype, smem_limit_bytes=smem.SMEM_LIMIT_BYTES)
  # 8 kernels: gmm fwd, d_lhs, swiglu fwd, recompute, swiglu d_lhs; tgmm thrice (d_rhs, d_gate_w, d_up_w)
  want = sorted([v[3] for v in plan.values()] + [plan["tgmm"][3]] * 2)
  assert got == want, (got, want)
  assert max(got) <= smem.SMEM_LIMIT_BYTES
