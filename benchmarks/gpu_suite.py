"""One GPU, a few minutes: are the MoE kernels right, how fast are they, and where does a training step go.

Sections (``--only a,b,c,d,e``), each run in its own process (a crash, an out-of-memory or a poisoned CUDA
context in one cannot take the others down, and each peak-memory number is that part's alone), each timed,
each failure recorded in the JSON as an error string:

  a  compiled-kernel correctness: ``kernels.grouped_matmul`` and the fused ``kernels.grouped_swiglu`` (impl
     ``pallas``; ``pallas_interpret`` on CPU), bfloat16 and float32, forward and VJP (d_lhs, d_rhs) against a
     float64 numpy reference of the same rounded inputs, on ragged groups with empty groups and tail rows
     (rows past sum(group_sizes) must be exactly zero in the output and d_lhs, empty groups' weight gradients
     exactly zero); the max relative error (max |err| / max |ref|) per case; ``pallas_backend.self_test()``
     and the shared-memory tilings every GPU kernel runs with.
  b  the kernel table of ``benchmarks/moe_kernels.py`` (imported: ``make_inputs``, ``run_table``) at the JoyAI
     shape (16384 tokens, top-8 of 256 experts, hidden 2048, width 768): pallas, pallas_fused, tokamax when
     importable, the balanced einsum ceiling; gmm gate+up fwd, fwd+bwd, layer fwd, fwd+bwd; ms and TFLOP/s.
  c  the real jitted train step (``train.step.make_train_step`` on ``train.state.init_state``, synthetic tokens)
     of ``configs/joyai_slice.py`` with Muon and with AdamW, one process each: compile time, step time (median
     of ``--steps`` after a warm-up step), tokens/s, MFU (``train.flops``), peak device memory
     (``memory_stats()['peak_bytes_in_use']``) beside ``parallel.plan.plan``'s prediction and XLA's own
     (``compiled.memory_analysis()``). The slice's ``attention_impl=auto`` runs cuDNN flash attention on an
     NVIDIA GPU (recorded as ``attention_resolved``); a small cuDNN forward + backward is tried first, and if it
     fails the error is recorded and the step runs ``blockwise`` (so the step is still measured).
  d  a per-part breakdown at the slice's real shapes (its params from ``model.init``, the model's own NNX
     modules), each part jitted alone, forward+backward (and the forward alone for the parts remat recomputes):
     attention (an MLA block's norm + attention, with the config's implementation, and beside it the other
     one: ``blockwise`` when that is ``cudnn``, and cuDNN with the documents in its packed layout,
     ``model.attention_max_segments``; ``xla`` at --tiny), the MoE layer and its pieces (router, permute,
     routed experts, shared expert, combine), the dense MLP, LM head + chunked cross-entropy (``losses.head``,
     and beside it the autodiff version it replaced), the MTP block, and the optimizer update
     (``optim.make_optimizer`` on all the slice's params: Muon with its batched Newton-Schulz in the config's
     ``optim.muon_ns_dtype`` (bfloat16), Muon with the other dtype (float32: the previous numerics' cost), and
     AdamW).
     ``estimated_step_ms`` adds them up as the step runs them (remat recomputes each block's forward once
     more) to set beside section c's measured step.
  e  decoding (``benchmarks/decode.py``): the slice's batched sampler (``rl.sampler.Sampler``, params cast to
     the compute dtype), greedy, batch 1 and 16, 64 prompt + 128 new tokens, draft_tokens 0, 1 and 3: tokens/s,
     ms per decode step, acceptance length. Its MTP module is random (acceptance ~1), so the speculative rows
     measure a draft + verify step's cost; ``benchmarks/decode.py --train-mtp`` measures acceptance.

Every section runs joyjax's own code paths (model.init, the model's NNX modules, make_train_step,
optim.make_optimizer, plan), so ``--tiny`` (CPU-sized widths, ``pallas_interpret``; what
tests/test_gpu_suite.py runs) exercises the same code the GPU run times.

  python benchmarks/gpu_suite.py --out gpu_suite.json              # one H100 / H200: at most ~8 minutes
  python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite.json  # CPU, tiny shapes
  python benchmarks/gpu_suite.py --only c --steps 10 --set model.num_layers=3   # the slice, 3 layers

``--budget-s`` (default 480) bounds the whole run: each section gets at most what is left (and its own cap),
and one that runs out is recorded as timed out. The slice at its default 4 layers needs an H200 (141 GB)
today (issue 11 measured 92 / 111 GiB peaks with Muon / AdamW); on an 80 GB GPU pass
``--set model.num_layers=2`` (AdamW may still run out of memory there: recorded as such) and say so beside
the numbers.

One-shot device script (a lent GPU machine without network: Python 3.12, JAX with CUDA, flax, optax, orbax,
chex, but not ml-collections, grain or tokamax):

  1. here, from the repository root (needs the network): ``bash /work/shared/tools/gpu_wheels.sh``; it
     downloads the missing wheels into ./.whl (git-ignored, about 10 MB) and prints the install line;
  2. on the device (the ``run`` tool with ``carry: [".whl"]``, ``timeout_s: 600``), the printed install line,
     then the suite under a timeout, its JSON into $OUT:

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
         .whl/*.whl && export PYTHONPATH=$PWD/.whl/stub:/tmp/site:$PWD || exit; \
       nvidia-smi --query-gpu=name,memory.total --format=csv; \
       timeout 540 python3 benchmarks/gpu_suite.py --out $OUT/gpu_suite.json

     (add ``--set model.num_layers=2`` on an 80 GB GPU). The table is printed at the end; the JSON has every
     number, each section's wall time and any error strings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A train step of the slice needs more than JAX's default 75% of the device; set before jax is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import decode as decode_bench  # noqa: E402
import head_loss  # noqa: E402
import moe_kernels  # noqa: E402
from joyjax import kernels, model, optim  # noqa: E402
from joyjax.batch import LM_KEYS  # noqa: E402
from joyjax.config import load_config  # noqa: E402
from joyjax.kernels import pallas_backend  # noqa: E402
from joyjax.losses import head  # noqa: E402
from joyjax.model import fused_attention, transformer  # noqa: E402
from joyjax.model.layers import dtype_of  # noqa: E402
from joyjax.model.moe import route  # noqa: E402
from joyjax.parallel import plan as plan_lib  # noqa: E402
from joyjax.train import flops, state as state_lib  # noqa: E402
from joyjax.train.step import make_train_step  # noqa: E402

GIB = 1024 ** 3
SLICE_CONFIG = os.path.join(ROOT, "configs", "joyai_slice.py")
SECTIONS = {"a": "kernel correctness", "b": "kernel table", "c": "train step", "d": "per-part breakdown",
            "e": "decoding"}
# Each section's processes ("units") and their time caps (seconds) on a GPU; a unit also stops at the budget.
UNITS = {"a": ("a",), "b": ("b",), "c": ("c:muon", "c:adamw"), "d": ("d",), "e": ("e",)}
UNIT_CAP_S = {"a": 90, "b": 120, "c:muon": 180, "c:adamw": 150, "d": 200, "e": 300}
# (e) decoding: batch sizes, draft_tokens, prompt and new tokens; the slice's, or tiny.
DECODE_SHAPE = dict(batches=(1, 16), drafts=(0, 1, 3), prompt_len=64, new_tokens=128)
TINY_DECODE_SHAPE = dict(batches=(2,), drafts=(0, 2), prompt_len=8, new_tokens=8)
TINY_CAP_S = 300  # every unit at --tiny (2 busy CPU cores)

# --tiny: the slice's settings (4 layers, MTP, blockwise attention, remat, scan, bf16, Muon) at CPU widths, and
# the Pallas kernels in the interpreter.
TINY_OVERRIDES = {
    "model.vocab_size": 512, "model.hidden_size": 64, "model.dense_intermediate_size": 128,
    "model.max_position_embeddings": 1024, "model.attention.num_heads": 4, "model.attention.q_lora_rank": 32,
    "model.attention.kv_lora_rank": 32, "model.attention.qk_nope_head_dim": 16,
    "model.attention.qk_rope_head_dim": 8, "model.attention.v_head_dim": 16, "model.attention_block": 16,
    "model.moe.num_experts": 8, "model.moe.num_experts_per_tok": 2, "model.moe.intermediate_size": 32,
    "model.moe.impl": "pallas_interpret", "data.seq_len": 32, "train.batch_size": 2, "train.loss_chunk": 24,
}
PACKED_SEGMENTS = 8   # section d's packed-layout attention row: documents per row it takes without the mask
# The kernel table's shape: JoyAI's, or tiny.
KERNEL_SHAPE = dict(tokens=16384, hidden=2048, width=768, experts=256, topk=8)
TINY_KERNEL_SHAPE = dict(tokens=64, hidden=32, width=16, experts=8, topk=2)
KERNEL_IMPLS = ("pallas", "pallas_fused", "tokamax", "einsum")  # ragged_dot runs out of memory at this shape
# Correctness problems: rows M (tail rows past the groups), contraction K and output width N not tile
# multiples, group sizes with empty groups (index 1 and 4) and a group of one row.
CORRECTNESS_SHAPE = dict(m=1000, k=200, n=320, group_sizes=(130, 0, 257, 1, 0, 300, 63, 129))
TINY_CORRECTNESS_SHAPE = dict(m=64, k=40, n=24, group_sizes=(9, 0, 17, 1, 0, 20))
# max |err| / max |ref| allowed: bfloat16 outputs (and the fused backward's bf16 intermediates) round to 2^-8
# relative; float32 kernels accumulate in float32 with full-precision (not TF32) dots.
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-4}


# ------------------------------------------------------------------------------------------------ helpers

def _error(e: BaseException) -> str:
  msg = str(e).strip()
  first = msg.splitlines()[0] if msg else ""
  oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
  return f"{'out of memory: ' if oom else ''}{type(e).__name__}: {first[:300]}"


def _median_ms(fn, n: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), times


def _timed(results: dict, key: str, fn, errors: list, label: str):
  """Runs fn() -> dict into results[key] with its wall time; an exception becomes results[key]['error']."""
  t0 = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
    out = {"error": _error(e)}
    errors.append(f"{label}: {out['error']}")
    traceback.print_exc()
  out["seconds"] = round(time.perf_counter() - t0, 3)
  results[key] = out
  return out


def device_info() -> dict:
  d = jax.devices()[0]
  stats = d.memory_stats() or {}
  return {"device_kind": d.device_kind, "platform": d.platform, "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "memory_limit_gib": stats["bytes_limit"] / GIB if "bytes_limit" in stats else None,
          "compute_capability": getattr(d, "compute_capability", None)}


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def slice_config(args, optimizer: str | None = None):
  """configs/joyai_slice.py with --tiny's overrides, then --set's, then the optimizer."""
  overrides = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()] if args.tiny else []
  overrides += [s if s.startswith("--config.") else f"--config.{s}" for s in args.set]
  if optimizer:
    overrides.append(f"--config.optim.name={optimizer}")
  return load_config(SLICE_CONFIG, overrides)


def moe_impl(args) -> str:
  """The compiled kernels on an accelerator; the same kernels in the Pallas interpreter on CPU."""
  return "pallas_interpret" if jax.default_backend() == "cpu" else "pallas"


def attention_choice(cfg) -> str:
  """The training attention ``cfg.model.attention_impl`` runs as on this platform (``auto`` resolved)."""
  m = cfg.model
  return fused_attention.resolve_attention_impl(
      m.attention_impl, m.attention.qk_nope_head_dim + m.attention.qk_rope_head_dim, m.dtype)


def cudnn_attention_probe() -> str | None:
  """A small cuDNN MLA attention (query / key width 192, value width 128, two packed documents) forward and
  backward, compiled and run: None if it works, else the error string."""
  try:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k = (jax.random.normal(kk, (2, 256, 4, 192), jnp.bfloat16) for kk in keys[:2])
    v = jax.random.normal(keys[2], (2, 256, 4, 128), jnp.bfloat16)
    seg = jnp.where(jnp.arange(256) < 100, 1, 2)[None].repeat(2, 0).astype(jnp.int32)

    def loss(q, k, v):
      out = fused_attention.mla_dot_product_attention(q, k, v, seg, scale=192 ** -0.5, implementation="cudnn")
      return jnp.sum(out.astype(jnp.float32))

    grads = jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    if not all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads):
      return "non-finite gradients"
    return None
  except Exception as e:  # noqa: BLE001 - recorded by the caller
    return _error(e)


def synthetic_batch(cfg, key) -> dict:
  """One batch of random tokens in the packed LM layout (``batch.LM_KEYS``): one document per row."""
  b, s = cfg.train.batch_size, cfg.data.seq_len
  tokens = jax.random.randint(key, (b, s + 1), 0, cfg.model.vocab_size, jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((b, s), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
           "loss_mask": jnp.ones((b, s), jnp.int32)}
  assert tuple(batch) == LM_KEYS, (tuple(batch), LM_KEYS)
  return batch


# ------------------------------------------------------------------------------------------------ (a)

def _reference_gmm(lhs, rhs, gs, dout):
  """float64: out, d_lhs, d_rhs of out[rows of g] = lhs[rows of g] @ rhs[g] (rows past the groups: 0)."""
  out, d_lhs, d_rhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for g, size in enumerate(gs):
    rows = slice(start, start + size)
    out[rows] = lhs[rows] @ rhs[g]
    d_lhs[rows] = dout[rows] @ rhs[g].T
    d_rhs[g] = lhs[rows].T @ dout[rows]
    start += size
  return {"forward": out, "d_lhs": d_lhs, "d_rhs": d_rhs}


def _reference_swiglu(x, w_gate, w_up, gs, dout):
  """float64: h = silu(x W_gate) * (x W_up) per group, and d_x, d_W_gate, d_W_up for the cotangent dout."""
  gate = _reference_gmm(x, w_gate, gs, np.zeros((x.shape[0], w_gate.shape[2])))["forward"]
  up = _reference_gmm(x, w_up, gs, np.zeros((x.shape[0], w_up.shape[2])))["forward"]
  sig = 1.0 / (1.0 + np.exp(-gate))
  h = gate * sig * up
  d_up = dout * gate * sig
  d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
  rg = _reference_gmm(x, w_gate, gs, d_gate)
  ru = _reference_gmm(x, w_up, gs, d_up)
  valid = (np.arange(x.shape[0]) < sum(gs))[:, None]
  return {"forward": h, "d_lhs": np.where(valid, rg["d_lhs"] + ru["d_lhs"], 0.0), "d_rhs_gate": rg["d_rhs"],
          "d_rhs_up": ru["d_rhs"]}


def _correctness_cases(shape: dict, dtype_name: str, kind: str, impl: str) -> list[dict]:
  """Cases '<dtype>/<kind>/<output>' for one compiled forward + VJP of the kernels' public API."""
  dtype = jnp.dtype(dtype_name)
  m, k, n, gs = shape["m"], shape["k"], shape["n"], tuple(shape["group_sizes"])
  g = len(gs)
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w1 = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
  w2 = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
  dout = jnp.asarray(rng.standard_normal((m, n)), dtype)  # tail rows too: their gradient must still be zero
  group_sizes = jnp.asarray(gs, jnp.int32)
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731

  if kind == "gmm":
    def run(lhs, w1, w2, dout):
      out, vjp = jax.vjp(lambda l, r: kernels.grouped_matmul(l, r, group_sizes, impl=impl), lhs, w1)
      return (out,) + vjp(dout)
    names = ("forward", "d_lhs", "d_rhs")
    ref = _reference_gmm(f64(lhs), f64(w1), gs, f64(dout))
    weight_grads = ("d_rhs",)
  else:
    def run(lhs, w1, w2, dout):
      f = lambda l, a, b: kernels.grouped_swiglu(l, a, b, group_sizes, impl=impl, fused=True)  # noqa: E731
      out, vjp = jax.vjp(f, lhs, w1, w2)
      return (out,) + vjp(dout)
    names = ("forward", "d_lhs", "d_rhs_gate", "d_rhs_up")
    ref = _reference_swiglu(f64(lhs), f64(w1), f64(w2), gs, f64(dout))
    weight_grads = ("d_rhs_gate", "d_rhs_up")

  outs = jax.jit(run)(lhs, w1, w2, dout)
  tail = slice(sum(gs), m)
  empty = [i for i, s in enumerate(gs) if s == 0]
  cases = []
  for name, got in zip(names, outs):
    got = f64(got)
    want = ref[name]
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
    case = {"case": f"{dtype_name}/{kind}/{name}", "max_rel_err": err, "tol": TOLERANCE[dtype_name]}
    checks = [err <= TOLERANCE[dtype_name]]
    if name in ("forward", "d_lhs"):
      case["tail_rows_zero"] = bool(np.all(got[tail] == 0))
      checks.append(case["tail_rows_zero"])
    if name in weight_grads:
      case["empty_groups_zero"] = bool(np.all(got[empty] == 0))
      checks.append(case["empty_groups_zero"])
    case["ok"] = all(checks)
    cases.append(case)
  return cases


def section_a(args, errors: list) -> dict:
  impl = moe_impl(args)
  shape = TINY_CORRECTNESS_SHAPE if args.tiny else CORRECTNESS_SHAPE
  res = {"impl": impl, "shape": shape, "cases": [], "runs": {}}
  for dtype_name in ("bfloat16", "float32"):
    for kind in ("gmm", "swiglu"):
      label = f"{dtype_name}/{kind}"
      run = _timed(res["runs"], label, lambda: {"cases": _correctness_cases(shape, dtype_name, kind, impl)},
                   errors, f"a {label}")
      for case in run.get("cases", []):
        res["cases"].append(case)
        print(f"  {case['case']:28s} max rel err {case['max_rel_err']:.2e} (tol {case['tol']:.0e})"
              f"{'' if case['ok'] else '  FAILED'}", flush=True)
        if not case["ok"]:
          errors.append(f"a {case['case']}: outside tolerance or non-zero tail / empty group: {case}")
  interpret = jax.default_backend() == "cpu"
  t0 = time.perf_counter()
  res["self_test"] = {"passed": pallas_backend.self_test(interpret=interpret), "interpret": interpret,
                      "seconds": round(time.perf_counter() - t0, 3)}
  if not res["self_test"]["passed"]:
    errors.append("a self_test: pallas_backend.self_test() failed (its warning in the log says why)")
  res["gpu_tilings"] = {dt: {k: {"tiles": list(v[0]), "num_stages": v[1], "num_warps": v[2], "smem_bytes": v[3]}
                             for k, v in pallas_backend.gpu_kernel_tilings(dt).items()}
                        for dt in ("bfloat16", "float32")}
  res["smem_limit_bytes"] = pallas_backend.hardware().smem_limit_bytes
  return res


# ------------------------------------------------------------------------------------------------ (b)

def section_b(args, errors: list) -> dict:
  shape = TINY_KERNEL_SHAPE if args.tiny else KERNEL_SHAPE
  inp = moe_kernels.make_inputs(dtype=jnp.bfloat16, seed=0, **shape)
  gs = np.asarray(inp["group_sizes"])
  rows = moe_kernels.run_table(inp, KERNEL_IMPLS, platform_name=jax.default_backend(), iters=args.iters,
                               warmup=args.warmup, log=lambda line: print("  " + line, flush=True))
  for r in rows:
    if r["status"] not in ("ok", "skipped"):
      errors.append(f"b {r['impl']} {r['what']}: {r['status']}")
  return {"shape": dict(shape, routed_rows=inp["routed_rows"], dtype="bfloat16", group_size_min=int(gs.min()),
                        group_size_max=int(gs.max())), "rows": rows}


# ------------------------------------------------------------------------------------------------ (c)

def section_c(args, errors: list, optimizer: str) -> dict:
  cfg = slice_config(args, optimizer)
  attention = attention_choice(cfg)
  probe = cudnn_attention_probe() if attention == "cudnn" else None
  if probe:  # recorded as an error, and the step still measured (blockwise)
    errors.append(f"c {optimizer}: cuDNN attention failed a small forward + backward ({probe}); "
                  "the step runs attention_impl=blockwise")
    cfg = cfg.copy_and_resolve_references()
    cfg.model.attention_impl = attention = "blockwise"
  m = cfg.model
  b, s = cfg.train.batch_size, cfg.data.seq_len
  res = {"optimizer": optimizer, "num_layers": m.num_layers, "first_k_dense": m.first_k_dense,
         "mtp_layers": m.mtp.num_layers, "batch": b, "seq_len": s, "attention_impl": m.attention_impl,
         "attention_resolved": attention, "cudnn_probe_error": probe, "muon_ns_dtype": cfg.optim.muon_ns_dtype,
         "remat": m.remat, "moe_impl": kernels.resolve_impl(m.moe.impl),
         "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.abstract_params(cfg))))}
  mem = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / GIB
  p = plan_lib.plan(cfg, 1, device_memory_gib=mem)
  res["plan_gib"] = p["total_bytes"] / GIB
  res["plan_parts_gib"] = {k: p[k] / GIB for k in ("param_bytes", "opt_state_bytes", "grad_bytes",
                                                     "gathered_weights_bytes", "activation_bytes")}

  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), cfg.train.steps)
  t0 = time.perf_counter()
  state = jax.block_until_ready(jax.jit(lambda k: state_lib.init_state(cfg, tx, k))(jax.random.key(0)))
  res["init_s"] = time.perf_counter() - t0
  batch = synthetic_batch(cfg, jax.random.key(1))
  step = jax.jit(make_train_step(cfg, tx), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  res["compile_s"] = time.perf_counter() - t0
  try:
    ma = compiled.memory_analysis()
    res["xla_gib"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                      - ma.alias_size_in_bytes) / GIB
    res["xla_temp_gib"] = ma.temp_size_in_bytes / GIB
  except Exception as e:  # noqa: BLE001 - not every backend reports it
    res["xla_gib"] = None
    res["xla_memory_note"] = _error(e)

  losses = []
  t0 = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(state, batch))
  res["first_step_ms"] = (time.perf_counter() - t0) * 1e3
  losses.append(float(metrics["loss"]))
  box = {"state": state}

  def one():
    box["state"], met = compiled(box["state"], batch)
    box["metrics"] = met
    return box["state"], met

  res["step_ms"], res["step_times_ms"] = _median_ms(one, args.steps)
  losses.append(float(box["metrics"]["loss"]))
  res["loss_first"], res["loss_last"] = losses
  res["finite"] = bool(np.isfinite(losses).all()) and int(box["metrics"]["skipped"]) == 0
  if not res["finite"]:
    errors.append(f"c {optimizer}: non-finite loss or skipped steps: {losses}")
  tokens = b * s
  res["tokens_per_step"] = tokens
  res["tokens_per_s"] = tokens / (res["step_ms"] * 1e-3)
  fpt = flops.flops_per_token(cfg, s)
  res["flops_per_token"] = fpt["total"]
  peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, m.dtype, peak_tflops=cfg.train.peak_tflops)
  res["peak_tflops"] = None if peak is None else peak / 1e12
  res["mfu"] = flops.mfu(res["tokens_per_s"], fpt, peak)
  res["achieved_tflops"] = res["tokens_per_s"] * fpt["total"] / 1e12
  res["peak_gib"] = peak_memory_gib()
  res["peak_over_plan"] = None if res["peak_gib"] is None else res["peak_gib"] / res["plan_gib"]
  print(f"  {optimizer}: compile {res['compile_s']:.1f} s, step {res['step_ms']:.1f} ms, "
        f"{res['tokens_per_s']:,.0f} tokens/s, MFU {_fmt_pct(res['mfu'])}, peak {_fmt(res['peak_gib'])} GiB "
        f"(plan {res['plan_gib']:.1f}), loss {losses[0]:.3f} -> {losses[1]:.3f}", flush=True)
  return res


# ------------------------------------------------------------------------------------------------ (d)

def _module(cfg, name: str, part: dict) -> nnx.Module:
  """The model's NNX module of part ``name`` (one layer of a stack) holding the arrays of ``part``."""
  graphdef, state = nnx.split(transformer.abstract_module(cfg, name))
  nnx.replace_by_pure_dict(state, part)
  return nnx.merge(graphdef, state)


def _attention(m, stack: str, p: dict, x, rest: dict, positions, segments):
  """A block's attention sub-layer as the block runs it: attn(attn_norm(x)) (the residual add left out)."""
  blk = _module(m, stack, {**rest, **p})
  return blk.attn(blk.attn_norm(x), positions, segments)[0]


def _layer(params, stack: str, i: int = 0) -> dict:
  return jax.tree.map(lambda a: a[i], params[stack])


def _split(layer: dict, keys) -> tuple[dict, dict]:
  return {k: layer[k] for k in keys}, {k: v for k, v in layer.items() if k not in keys}


def _time_part(args, name: str, fn, diff: tuple, rest: tuple, train_flops: float | None, errors: list, *,
               forward: bool = False) -> dict:
  """fn(*diff, *rest) -> one array: forward + VJP w.r.t. ``diff`` jitted alone, and with ``forward`` (the
  blocks that remat recomputes) the forward alone too."""
  row = {"part": name, "train_flops": train_flops}
  out_shape = jax.eval_shape(fn, *diff, *rest)
  ct = jnp.ones(out_shape.shape, out_shape.dtype) if out_shape.ndim == 0 else \
      jax.random.normal(jax.random.key(7), out_shape.shape, out_shape.dtype)
  row["fwd_ms"], st_f = None, "ok"
  if forward:
    row["fwd_ms"], st_f = moe_kernels.time_fn(jax.jit(fn), (*diff, *rest), args.iters, args.warmup)
  row["fwd_bwd_ms"], st_b = moe_kernels.time_fn(moe_kernels.fwd_bwd(fn, num_diff=len(diff)), (*diff, *rest, ct),
                                                args.iters, args.warmup)
  for what, st in (("fwd", st_f), ("fwd+bwd", st_b)):
    if st != "ok":
      row.setdefault("error", f"{what}: {st}")
      errors.append(f"d {name} {what}: {st}")
  if train_flops and row["fwd_bwd_ms"]:
    row["fwd_bwd_tflops"] = train_flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
  if train_flops and row["fwd_ms"]:
    row["fwd_tflops"] = train_flops / 3 / (row["fwd_ms"] * 1e-3) / 1e12
  print(f"  {name:30s} fwd {_fmt(row['fwd_ms'], 9)} ms  fwd+bwd {_fmt(row['fwd_bwd_ms'], 9)} ms  "
        f"{_fmt(row.get('fwd_bwd_tflops'), 7)} TFLOP/s", flush=True)
  return row


def _optimizer_rows(args, cfg, params: dict, errors: list) -> list[dict]:
  """One optimizer update (``tx.update`` + ``apply_updates``, as the step runs them) on all the slice's params,
  for Muon (Newton-Schulz in the config's ``optim.muon_ns_dtype``), Muon with the other Newton-Schulz dtype,
  then AdamW. Params and optimizer state are donated (updated in place, as in the step), so the params pass
  from one optimizer to the next and the peak is params + gradients + one optimizer's state."""
  rows = []
  box = {"p": params}
  del params
  ns_dtype = cfg.optim.muon_ns_dtype
  other = "float32" if ns_dtype == "bfloat16" else "bfloat16"
  variants = (("optimizer (muon)", "muon", ns_dtype), (f"optimizer (muon, {other} NS)", "muon", other),
              ("optimizer (adamw)", "adamw", ns_dtype))
  for part, optimizer, dtype in variants:
    row = {"part": part, "train_flops": None, "fwd_ms": None, "fwd_bwd_ms": None}
    if optimizer == "muon":
      row["muon_ns_dtype"] = dtype
    try:
      ocfg = cfg.copy_and_resolve_references()
      ocfg.optim.name = optimizer
      ocfg.optim.muon_ns_dtype = dtype
      tx = optim.make_optimizer(ocfg, box["p"], cfg.train.steps)
      grads = jax.jit(lambda p: jax.tree.map(lambda x: (1e-3 * x).astype(x.dtype), p))(box["p"])
      box["s"] = jax.jit(tx.init)(box["p"])

      def update(g, s, p, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      upd = jax.jit(update, donate_argnums=(1, 2))

      def one(upd=upd, grads=grads):
        box["p"], box["s"] = upd(grads, box["s"], box["p"])
        return box["p"], box["s"]

      t0 = time.perf_counter()
      jax.block_until_ready(one())
      row["first_ms"] = (time.perf_counter() - t0) * 1e3
      for _ in range(max(0, args.warmup - 1)):
        jax.block_until_ready(one())
      row["fwd_bwd_ms"], _ = _median_ms(one, args.iters)
    except Exception as e:  # noqa: BLE001 - recorded, the next part goes on
      row["error"] = _error(e)
      errors.append(f"d {row['part']}: {row['error']}")
    grads = None
    box.pop("s", None)
    print(f"  {row['part']:30s} update {_fmt(row['fwd_bwd_ms'], 9)} ms", flush=True)
    rows.append(row)
  return rows


def section_d(args, errors: list) -> dict:
  cfg = slice_config(args)
  m = cfg.model
  b, s = cfg.train.batch_size, cfg.data.seq_len
  res = {"batch": b, "seq_len": s, "tokens": b * s, "moe_impl": kernels.resolve_impl(m.moe.impl), "parts": []}
  params = jax.block_until_ready(jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0)))
  res["parts"] += _part_rows(args, cfg, params, res, errors)
  # Last: the updates donate the params (no other part reads them after this).
  res["parts"] += _optimizer_rows(args, cfg, params, errors)
  res["estimated_step_ms"] = _estimate_step(cfg, res["parts"])
  if res["estimated_step_ms"]:
    print(f"  sum of parts as the step runs them ({cfg.optim.name}): {res['estimated_step_ms']:.1f} ms",
          flush=True)
  return res


def _part_rows(args, cfg, params: dict, res: dict, errors: list) -> list[dict]:
  """Every block part on layer 0 of its stack, and the head + loss, at the slice's batch."""
  m, e = cfg.model, cfg.model.moe
  b, s, h = cfg.train.batch_size, cfg.data.seq_len, m.hidden_size
  t = b * s
  dtype = dtype_of(m.dtype)
  impl = res["moe_impl"]
  n_dense, n_moe, n_mtp = m.first_k_dense, m.num_layers - m.first_k_dense, m.mtp.num_layers
  fpt = flops.flops_per_token(cfg, s)
  keys = jax.random.split(jax.random.key(1), 8)
  x = jax.random.normal(keys[0], (b, s, h), dtype)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  segments = jnp.ones((b, s), jnp.int32)
  rows = []
  add = lambda *a, **kw: rows.append(_time_part(args, *a, errors, **kw))  # noqa: E731

  # Attention on the first MoE block (the dense block's is the same shape).
  stack = "moe_layers" if n_moe else "dense_layers"
  attn_p, attn_rest = _split(_layer(params, stack), ("attn_norm", "attn"))
  attn_flops = (fpt["attention_proj"] + fpt["attention_scores"]) / m.num_layers * t
  add("attention (MLA block)", functools.partial(_attention, m, stack), (attn_p, x),
      (attn_rest, positions, segments), attn_flops, forward=True)
  main = attention_choice(cfg)
  rows[-1]["impl"] = main
  # Side by side: the other implementation of the same block (blockwise beside cuDNN; xla beside blockwise at
  # --tiny, where cuDNN is not there; at full size xla's scores do not fit, so nothing beside blockwise).
  alt = {"cudnn": "blockwise", "blockwise": "xla" if args.tiny else None}.get(main)
  if alt:
    acfg = cfg.copy_and_resolve_references()
    acfg.model.attention_impl = alt
    add(f"  attention, {alt}", functools.partial(_attention, acfg.model, stack), (attn_p, x),
        (attn_rest, positions, segments), attn_flops, forward=True)
    rows[-1]["impl"] = alt
  if main == "cudnn" and not m.attention_max_segments:
    # The documents in cuDNN's packed layout (fused_attention.segment_runs) instead of a [seq, seq] mask: on a
    # GPU without it (before Hopper) the model falls back to the mask, and the row says so.
    pcfg = cfg.copy_and_resolve_references()
    pcfg.model.attention_max_segments = PACKED_SEGMENTS
    add("  attention, cudnn packed", functools.partial(_attention, pcfg.model, stack), (attn_p, x),
        (attn_rest, positions, segments), attn_flops, forward=True)
    rows[-1]["impl"] = "cudnn" if fused_attention.packed_segments(PACKED_SEGMENTS) else "cudnn (mask: not Hopper)"
  del attn_p, attn_rest

  if n_moe:
    layer = _layer(params, "moe_layers")
    mlp_p, mlp_rest = _split(layer, ("mlp_norm", "mlp"))

    def moe_layer(p, xx, rest):
      blk = _module(m, "moe_layers", {**rest, **p})
      return blk.mlp(blk.mlp_norm(xx))[0]

    add("MoE layer", moe_layer, (mlp_p, x), (mlp_rest,),
        (fpt["moe_router"] + fpt["moe_routed"] + fpt["moe_shared"]) / n_moe * t, forward=True)
    del mlp_p, mlp_rest
    rows += _moe_piece_rows(args, cfg, layer, x, impl, fpt, res, errors)

  if n_dense:
    dense_p, dense_rest = _split(_layer(params, "dense_layers"), ("mlp_norm", "mlp"))

    def dense(p, xx, rest):
      blk = _module(m, "dense_layers", {**rest, **p})
      return blk.mlp(blk.mlp_norm(xx))

    add("dense MLP", dense, (dense_p, x), (dense_rest,), fpt["dense_mlp"] / n_dense * t, forward=True)
    del dense_p, dense_rest

  targets = jax.random.randint(keys[2], (b, s), 0, m.vocab_size, jnp.int32)
  loss_w = jnp.ones((b, s), jnp.float32)
  add("LM head + loss",
      lambda hid, w, tg, lw: head.chunked_cross_entropy(hid, w, tg, lw, chunk=cfg.train.loss_chunk)[0],
      (x, model.head_weights(cfg, params)), (targets, loss_w), fpt["head"] * t)
  add("  LM head + loss, autodiff",
      lambda hid, w, tg, lw: head_loss.autodiff_cross_entropy(hid, w, tg, lw, cfg.train.loss_chunk),
      (x, model.head_weights(cfg, params)), (targets, loss_w), fpt["head"] * t)

  if n_mtp:
    emb = jax.random.normal(keys[3], (b, s, h), dtype)
    add("MTP block", lambda p, em, hid, pos, seg: _module(m, transformer.MTP_STACK, p)(em, hid, pos, seg)[1],
        (_layer(params, transformer.MTP_STACK), emb, x), (positions, segments),
        (fpt["mtp"] / n_mtp - fpt["head"]) * t)
  return rows


def _moe_piece_rows(args, cfg, layer: dict, x, impl: str, fpt: dict, res: dict, errors: list) -> list[dict]:
  """The MoE layer's pieces on its own weights, in the order ``MoE.__call__`` / ``MoE.experts`` run them:
  router (float32 logits + ``moe.route``), permute, routed experts (grouped SwiGLU + grouped matmul through
  the kernels), shared expert, combine."""
  m, e = cfg.model, cfg.model.moe
  n_moe = m.num_layers - m.first_k_dense
  b, s, h = x.shape
  t = b * s
  dtype = dtype_of(m.dtype)
  moe = _module(m, "moe_layers", layer).mlp
  mp = layer["mlp"]
  flat = x.reshape(t, h)
  rows = []
  add = lambda *a, **kw: rows.append(_time_part(args, *a, errors, **kw))  # noqa: E731
  routing = functools.partial(route, top_k=moe.top_k, n_group=moe.n_group, topk_group=moe.topk_group,
                              scoring_func=moe.scoring_func, norm_topk_prob=moe.norm_topk_prob,
                              routed_scaling_factor=moe.routed_scaling_factor)

  def router(w, xf, bias):
    return routing(xf.astype(jnp.float32) @ w.astype(jnp.float32), bias)[0]

  add("  router", router, (mp["router"], flat), (mp["router_bias"],), fpt["moe_router"] / n_moe * t)
  weights, ids, _ = jax.jit(lambda w, xf, bias: routing(xf.astype(jnp.float32) @ w.astype(jnp.float32),
                                                        bias))(mp["router"], flat, mp["router_bias"])
  add("  permute", lambda xf, i: kernels.permute(xf, i, e.num_experts)[0], (flat,), (ids,), None)
  x_sorted, group_sizes, order = jax.jit(lambda xf, i: kernels.permute(xf, i, e.num_experts))(flat, ids)
  gs = np.asarray(group_sizes)
  res["group_size_min"], res["group_size_max"] = int(gs.min()), int(gs.max())

  def experts(xs, wg, wu, wo, gsz):
    hh = kernels.grouped_swiglu(xs, wg.astype(dtype), wu.astype(dtype), gsz, impl=impl, fused=moe.fuse_swiglu)
    return kernels.grouped_matmul(hh, wo.astype(dtype), gsz, impl=impl)

  add("  routed experts", experts, (x_sorted, mp["wi_gate"], mp["wi_up"], mp["wo"]), (group_sizes,),
      fpt["moe_routed"] / n_moe * t)
  del x_sorted
  if "shared" in mp:
    rest = {**layer, "mlp": {k: v for k, v in mp.items() if k != "shared"}}

    def shared(sp, xx, rest):
      return _module(m, "moe_layers", {**rest, "mlp": {**rest["mlp"], "shared": sp}}).mlp.shared(xx)

    add("  shared expert", shared, (mp["shared"], x), (rest,), fpt["moe_shared"] / n_moe * t)
  y_sorted = jax.random.normal(jax.random.key(5), (t * moe.top_k, h), dtype)
  add("  combine", lambda y, w, o: kernels.unpermute(y, o, w), (y_sorted, weights), (order,), None)
  return rows


def _estimate_step(cfg, rows) -> float | None:
  """The step's time from its parts: every block's attention and MLP forward + backward (plus one more
  forward under remat), the head + loss once per output (main and each MTP depth), the MTP blocks, and the
  config's optimizer update. None if a part is missing."""
  m = cfg.model
  ms = {r["part"]: r for r in rows}

  def get(part, key="fwd_bwd_ms"):
    r = ms.get(part)
    return None if r is None else r.get(key)

  n_dense, n_moe, n_mtp = m.first_k_dense, m.num_layers - m.first_k_dense, m.mtp.num_layers
  remat = m.remat != "none"
  blocks = [("attention (MLA block)", m.num_layers), ("dense MLP", n_dense), ("MoE layer", n_moe)]
  total = 0.0
  for part, count in blocks:
    if count == 0:
      continue
    fb, f = get(part), get(part, "fwd_ms")
    if fb is None or f is None:
      return None
    total += count * (fb + (f if remat else 0.0))
  for part, count in (("LM head + loss", 1 + n_mtp), ("MTP block", n_mtp),
                      (f"optimizer ({cfg.optim.name})", 1)):
    if count == 0:
      continue
    v = get(part)
    if v is None:
      return None
    total += count * v
  return total


# ------------------------------------------------------------------------------------------------ the table

# ------------------------------------------------------------------------------------------------ (e)

def section_e(args, errors: list) -> dict:
  """Decoding (``benchmarks/decode.py``'s rows): the slice's batched sampler, params in the compute dtype (as
  served), greedy, at each draft_tokens k. The MTP module is random, so drafts are almost never accepted: the
  rows measure what a speculative step costs (``step_ms``); a trained module's acceptance length A then gives
  about A / step_ms tokens per ms per row."""
  cfg = slice_config(args)
  shape = TINY_DECODE_SHAPE if args.tiny else DECODE_SHAPE
  dtype = dtype_of(cfg.model.dtype)
  cast = lambda x: x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x
  params = jax.block_until_ready(jax.jit(lambda k: jax.tree.map(cast, model.init(cfg, k)))(jax.random.key(0)))
  rows = decode_bench.run(cfg, params, batches=shape["batches"], drafts=shape["drafts"],
                          prompt_len=shape["prompt_len"], new_tokens=shape["new_tokens"], iters=args.iters,
                          warmup=args.warmup, temperature=0.0)
  for r in rows:
    r["step_ms"] = r["ms"] / max(r["decode_steps"], 1)
    if r["compiles"] != 1:
      errors.append(f"e batch {r['batch']} k {r['draft_tokens']}: the sampler compiled {r['compiles']} times")
  return {"moe_impl": kernels.resolve_impl(cfg.model.moe.impl), "param_dtype": cfg.model.dtype, **shape,
          "rows": rows}


def _fmt(v, width: int = 0, prec: int = 1) -> str:
  s = "-" if v is None else f"{v:,.{prec}f}"
  return s.rjust(width)


def _fmt_pct(v) -> str:
  return "-" if v is None else f"{100 * v:.1f}%"


def format_table(result: dict) -> str:
  d = result.get("device") or {}
  lines = [f"== gpu_suite: {d.get('device_kind', '?')} ({d.get('platform', '?')}), jax {d.get('jax', '?')}"
           f"{', tiny shapes' if result['tiny'] else ''}; total {result['total_seconds']:.1f} s =="]
  sec = result["sections"]
  for key, title in SECTIONS.items():
    if key not in sec:
      continue
    s = sec[key]
    lines.append("")
    lines.append(f"({key}) {title}  [{s.get('seconds', 0):.1f} s]")
    lines += [f"  {unit}: {s[unit]['error']}" for unit in UNITS[key]
              if key != "c" and isinstance(s.get(unit), dict) and "error" in s[unit]]
    if key == "a":
      body = s.get("a", {})
      lines.append(f"  {'case':30s} {'max rel err':>12} {'tol':>8}  zeros  ok")
      for c in body.get("cases", []):
        zeros = [c[k] for k in ("tail_rows_zero", "empty_groups_zero") if k in c]
        lines.append(f"  {c['case']:30s} {c['max_rel_err']:12.2e} {c['tol']:8.0e}  "
                     f"{'yes' if all(zeros) else 'NO':5s}  {'ok' if c['ok'] else 'FAILED'}")
      if "self_test" in body:
        lines.append(f"  pallas_backend.self_test(): {'passed' if body['self_test']['passed'] else 'FAILED'}"
                     f"{' (interpret)' if body['self_test']['interpret'] else ''}")
    elif key == "b":
      body = s.get("b", {})
      lines.append(f"  {'impl':18s} {'what':28s} {'ms':>10} {'TFLOP/s':>9}  status")
      for r in body.get("rows", []):
        lines.append(f"  {r['impl']:18s} {r['what']:28s} {_fmt(r['ms'], 10, 3)} {_fmt(r['tflops'], 9)}  "
                     f"{r['status']}{'  (' + r['note'] + ')' if r.get('note') else ''}")
    elif key == "c":
      lines.append(f"  {'optimizer':10s} {'step ms':>10} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9} "
                   f"{'plan GiB':>9} {'XLA GiB':>8} {'compile s':>10}  loss")
      for unit in UNITS["c"]:
        r = s.get(unit, {})
        opt = unit.split(":")[1]
        if "step_ms" not in r:
          lines.append(f"  {opt:10s} {r.get('error', 'not run')}")
          continue
        lines.append(f"  {opt:10s} {_fmt(r['step_ms'], 10)} {_fmt(r['tokens_per_s'], 12, 0)} "
                     f"{_fmt_pct(r['mfu']):>7} "
                     f"{_fmt(r['peak_gib'], 9)} {_fmt(r['plan_gib'], 9)} {_fmt(r.get('xla_gib'), 8)} "
                     f"{_fmt(r['compile_s'], 10)}  {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
      r = next((s.get(u) for u in UNITS["c"] if "num_layers" in s.get(u, {})), None)
      if r:
        lines.append(f"  slice: {r['num_layers']} layers ({r['first_k_dense']} dense) + {r['mtp_layers']} MTP, "
                     f"{r['param_count'] / 1e9:.2f}B params, {r['batch']} x {r['seq_len']} tokens, "
                     f"attention {r['attention_impl']} -> {r.get('attention_resolved')}, remat {r['remat']}, "
                     f"MoE impl {r['moe_impl']}, Muon NS {r.get('muon_ns_dtype')}")
    elif key == "d":
      body = s.get("d", {})
      lines.append(f"  {'part':34s} {'fwd ms':>10} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
      for r in body.get("parts", []):
        name = r["part"] + (f" [{r['impl']}]" if r["part"] == "attention (MLA block)" and r.get("impl") else "")
        lines.append(f"  {name:34s} {_fmt(r.get('fwd_ms'), 10, 2)} {_fmt(r.get('fwd_bwd_ms'), 11, 2)} "
                     f"{_fmt(r.get('fwd_bwd_tflops'), 8)}{'  ' + r['error'] if r.get('error') else ''}")
      if body.get("estimated_step_ms") is not None:
        lines.append(f"  {'sum of parts as the step runs them':38s} {_fmt(body['estimated_step_ms'], 11, 1)} ms")
    elif key == "e":
      body = s.get("e", {})
      lines.append(f"  {'batch':>5} {'k':>3} {'tokens/s':>11} {'speedup':>8} {'accept':>7} {'ms/step':>8} "
                   f"{'ms/call':>9} {'first s':>8}")
      for r in body.get("rows", []):
        speed = "" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"  {r['batch']:>5} {r['draft_tokens']:>3} {_fmt(r['tokens_per_s'], 11)} {speed:>8} "
                     f"{r['acceptance_length']:>7.2f} {_fmt(r['step_ms'], 8, 2)} {_fmt(r['ms'], 9)} "
                     f"{_fmt(r['first_call_s'], 8)}")
      if body.get("rows"):
        lines.append(f"  prompt {body['prompt_len']} + {body['new_tokens']} new tokens, greedy, random MTP module "
                     "(acceptance ~1: ms/step is the cost of a speculative step)")
  lines.append("")
  errs = result["errors"]
  lines.append(f"errors: {len(errs)}" + "".join(f"\n  {x}" for x in errs))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver

def run_unit(args, unit: str) -> dict:
  """Runs one unit in this process: {'device', 'result', 'errors'}."""
  errors: list[str] = []
  out = {"device": device_info(), "errors": errors, "result": {}}
  section = unit.split(":")[0]
  if section == "a":
    _timed(out["result"], unit, lambda: section_a(args, errors), errors, unit)
  elif section == "b":
    _timed(out["result"], unit, lambda: section_b(args, errors), errors, unit)
  elif section == "c":
    _timed(out["result"], unit, lambda: section_c(args, errors, unit.split(":")[1]), errors, unit)
  elif section == "d":
    _timed(out["result"], unit, lambda: section_d(args, errors), errors, unit)
  elif section == "e":
    _timed(out["result"], unit, lambda: section_e(args, errors), errors, unit)
  else:
    raise SystemExit(f"unknown unit {unit!r}")
  return out


def _child_argv(args, unit: str, out_path: str) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), "--unit", unit, "--unit-out", out_path,
          "--steps", str(args.steps), "--iters", str(args.iters), "--warmup", str(args.warmup)]
  if args.tiny:
    argv.append("--tiny")
  for s in args.set:
    argv += ["--set", s]
  return argv


def _tail(text: str, n: int = 6) -> str:
  lines = [x for x in text.strip().splitlines() if x.strip()]
  return " | ".join(lines[-n:])[-1500:]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="CPU-sized shapes (the test); kernels in the interpreter")
  p.add_argument("--only", default="a,b,c,d,e", help="comma list of sections: a, b, c, d, e")
  p.add_argument("--steps", type=int, default=None, help="timed train steps per optimizer (default 5; tiny 2)")
  p.add_argument("--iters", type=int, default=None, help="timed runs per kernel / part (default 10; tiny 2)")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; tiny 1)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a key of configs/joyai_slice.py, e.g. --set model.num_layers=3 (repeatable)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="wall-clock bound of the whole suite (default 480 s; tiny 900 s)")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_suite.json"))
  p.add_argument("--unit", default=None, help=argparse.SUPPRESS)
  p.add_argument("--unit-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps = args.steps or (2 if args.tiny else 5)
  args.iters = args.iters or (2 if args.tiny else 10)
  args.warmup = args.warmup or (1 if args.tiny else 2)

  if args.unit:  # a child: one unit, its JSON to --unit-out
    out = run_unit(args, args.unit)
    with open(args.unit_out, "w") as f:
      json.dump(out, f, default=str)
    return out

  only = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = [s for s in only if s not in SECTIONS]
  if unknown:
    p.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
  budget = args.budget_s or (900.0 if args.tiny else 480.0)
  t_start = time.perf_counter()
  result = {"suite": "benchmarks/gpu_suite.py", "tiny": args.tiny, "args": vars(args), "device": None,
            "sections": {}, "errors": []}
  print(f"gpu_suite: sections {','.join(only)}{' (tiny)' if args.tiny else ''}, budget {budget:.0f} s",
        flush=True)
  for section in only:
    sec = result["sections"][section] = {"title": SECTIONS[section]}
    t_sec = time.perf_counter()
    for unit in UNITS[section]:
      left = budget - (time.perf_counter() - t_start)
      cap = min(TINY_CAP_S if args.tiny else UNIT_CAP_S[unit], left)
      if cap < 10:
        msg = f"not run: the suite's time budget ({budget:.0f} s) is spent"
        sec[unit] = {"error": msg}
        result["errors"].append(f"{unit}: {msg}")
        continue
      print(f"-- ({unit}) {SECTIONS[section]}", flush=True)
      with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "unit.json")
        err_path = os.path.join(tmp, "stderr.txt")
        t0 = time.perf_counter()
        with open(err_path, "w") as err:
          try:
            rc = subprocess.run(_child_argv(args, unit, out_path), stdout=sys.stdout if _has_fileno() else None,
                                stderr=err, timeout=cap, cwd=ROOT).returncode
            why = None if rc == 0 else f"exit status {rc}"
          except subprocess.TimeoutExpired:
            why = f"timed out after {cap:.0f} s"
        elapsed = time.perf_counter() - t0
        with open(err_path) as err:
          stderr = err.read()
        unit_out = None
        if os.path.exists(out_path):
          with open(out_path) as f:
            unit_out = json.load(f)
      if unit_out is None:
        msg = f"{why or 'no result'}: {_tail(stderr)}"
        sec[unit] = {"error": msg, "seconds": round(elapsed, 3)}
        result["errors"].append(f"{unit}: {msg}")
        print(f"   {unit} FAILED: {msg}", flush=True)
        continue
      result["device"] = result["device"] or unit_out["device"]
      sec[unit] = unit_out["result"][unit]
      sec[unit]["process_seconds"] = round(elapsed, 3)
      result["errors"] += [f"{unit}: {x}" for x in unit_out["errors"]]
      if unit_out["errors"]:
        sec[unit]["stderr_tail"] = _tail(stderr, 20)
    sec["seconds"] = round(time.perf_counter() - t_sec, 3)
  result["total_seconds"] = round(time.perf_counter() - t_start, 3)
  table = format_table(result)
  print("\n" + table, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"wrote {args.out}", flush=True)
  return result


def _has_fileno() -> bool:
  """Whether this process's stdout is a real file (children then write to it directly)."""
  try:
    sys.stdout.fileno()
    return True
  except (AttributeError, OSError, ValueError):
    return False


if __name__ == "__main__":
  res = main()
  # A unit (child) reports its errors in its JSON; the suite exits 1 if any part failed.
  sys.exit(0 if "result" in res or not res["errors"] else 1)
