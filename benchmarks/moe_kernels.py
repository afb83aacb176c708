"""MoE grouped matmul and the whole routed-expert layer: our Pallas gmm vs jax.lax.ragged_dot vs tokamax.

Default shape is JoyAI's: 16384 tokens, top-8 of 256 experts (131072 routed rows), hidden 2048, expert width
768, bf16. Rows (per backend):

  gmm gate+up fwd        lhs [R, H] x rhs [E, H, 2W]
  gmm gate+up fwd+bwd    the same plus d_lhs and d_rhs
  layer fwd              router (sigmoid, top-k) + permute + gate/up gmm + SwiGLU + down gmm
                         + weighted unpermute
  layer fwd+bwd          the same plus gradients for x and all expert weights
  einsum (ceiling)       balanced batched einsum of the same FLOPs, [E, R/E, H] x [E, H, 2W]

TFLOP/s count routed FLOPs only: 2*R*K*N per gmm, x3 for fwd+bwd (the router and the elementwise work are not
counted). Each number is the median of --iters timed runs after warm-up, each ended by block_until_ready.
Failures (OOM, compile errors) are reported in the table, not raised.

  python benchmarks/moe_kernels.py            # H100, JoyAI shape
  python benchmarks/moe_kernels.py --sweep    # + a few gmm / tgmm tilings for the Pallas kernels
  python benchmarks/moe_kernels.py --tokens 256 --hidden 64 --width 32 --experts 8 --topk 2 --iters 2  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from joyjax.kernels import ops, pallas_backend  # noqa: E402

DEFAULT_IMPLS = "pallas,pallas_fused,ragged_dot,tokamax,einsum"
SWEEP_TILINGS = [  # (tm, tk, tn, num_warps, num_stages) for the gmm forward on GPU
    (128, 64, 128, 4, 4), (128, 64, 128, 8, 3), (128, 32, 128, 4, 5), (128, 64, 256, 8, 3),
    (64, 64, 128, 4, 4), (256, 64, 128, 8, 3), (128, 128, 128, 8, 3),
]
SWEEP_TGMM_TILINGS = [  # (tm, tk, tn, num_warps, num_stages) for d_rhs (tgmm) on GPU; tm is its contraction
    (128, 128, 128, 4, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
    (128, 128, 256, 8, 3),
]


# ------------------------------------------------------------------------------------------------------------
# Backends: each gives gmm(lhs, rhs, group_sizes) and optionally a fused gate/up SwiGLU.

class Backend:
  def __init__(self, name: str, gmm, swiglu=None, note: str = ""):
    self.name, self.gmm, self.swiglu, self.note = name, gmm, swiglu, note


def make_backend(name: str, platform_name: str, tiling) -> Backend | str:
  """A Backend, or a string saying why it is skipped."""
  interp = platform_name == "cpu"
  if name in ("pallas", "pallas_interpret", "pallas_fused"):
    interpret = interp or name == "pallas_interpret"
    if interpret and tiling is None:
      tiling = pallas_backend.INTERPRET_TILING
    g = partial(pallas_backend.gmm, interpret=interpret, tiling=tiling)
    sw = None
    if name == "pallas_fused":
      sw = partial(pallas_backend.gmm_swiglu, interpret=interpret, tiling=tiling)
    return Backend(name if not (interp and name == "pallas") else "pallas_interpret", g, sw,
                   "interpret mode" if interpret else "")
  if name in ("ragged_dot", "reference"):
    return Backend(name, partial(ops.grouped_matmul, impl=name))
  if name == "tokamax":
    try:
      import tokamax  # noqa: F401
    except Exception as e:  # noqa: BLE001
      return f"tokamax not importable ({type(e).__name__})"
    if not hasattr(tokamax, "ragged_dot"):
      return "tokamax has no ragged_dot"
    return Backend(name, lambda lhs, rhs, gs: tokamax.ragged_dot(lhs, rhs, gs))
  if name == "einsum":
    return Backend(name, None)
  return f"unknown impl {name!r}"


# ------------------------------------------------------------------------------------------------------------
# The MoE layer (self-contained so the benchmark does not depend on the model code).

def moe_layer(x, router_w, w_gate_up, w_gate, w_up, w_down, *, topk: int, backend: Backend):
  e = router_w.shape[1]
  scores = jax.nn.sigmoid(jnp.dot(x, router_w, preferred_element_type=jnp.float32))
  top_w, top_i = jax.lax.top_k(scores, topk)
  top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
  xs, group_sizes, order = ops.permute(x, top_i, e)
  if backend.swiglu is not None:
    h = backend.swiglu(xs, w_gate, w_up, group_sizes)
  else:
    gu = backend.gmm(xs, w_gate_up, group_sizes)
    gate, up = jnp.split(gu, 2, axis=-1)
    h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
  y = backend.gmm(h, w_down, group_sizes)
  return ops.unpermute(y, order, top_w).astype(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# Timing.

def _classify(e: BaseException) -> str:
  msg = str(e)
  if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() or "OOM" in msg:
    return "OOM"
  first = msg.strip().splitlines()[0] if msg.strip() else ""
  return f"error: {type(e).__name__}: {first[:160]}"


def time_fn(fn, args, iters: int, warmup: int):
  """(median ms, status). fn is jitted; compile + warmup happen before timing."""
  try:
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(max(0, warmup - 1)):
      jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append((time.perf_counter() - t0) * 1e3)
    del out
    return statistics.median(times), "ok"
  except Exception as e:  # noqa: BLE001 - reported in the table
    return None, _classify(e)


def fwd_bwd(f, num_diff: int | None = None):
  """f(*params) -> out; returns jitted g(*params, ct) -> (out, grads) computing the forward and the VJP.

  num_diff: only the first ``num_diff`` params are differentiated (the others are passed through as jit
  arguments, never baked in as constants); default all."""
  def g(*args):
    *params, ct = args
    n = len(params) if num_diff is None else num_diff
    diff, rest = params[:n], params[n:]
    out, vjp = jax.vjp(lambda *d: f(*d, *rest), *diff)
    return out, vjp(jnp.asarray(ct).astype(out.dtype))
  return jax.jit(g)


# ------------------------------------------------------------------------------------------------------------

def parse_tiling(s: str | None):
  if not s:
    return None
  v = [int(x) for x in s.split(",")]
  if len(v) not in (3, 5):
    raise SystemExit("--tiling wants tm,tk,tn or tm,tk,tn,num_warps,num_stages")
  extra = {"num_warps": v[3], "num_stages": v[4]} if len(v) == 5 else {}
  return pallas_backend.Tiling(gmm=tuple(v[:3]), **extra)


def make_inputs(tokens: int, hidden: int, width: int, experts: int, topk: int, dtype, seed: int = 0) -> dict:
  """The benchmark's operands at one shape: random activations and expert weights, a balanced-ish random
  routing (each token picks ``topk`` distinct experts uniformly) and the rows it sorts into, cotangents."""
  dtype = jnp.dtype(dtype)
  t, h, w, e, k = tokens, hidden, width, experts, topk
  keys = jax.random.split(jax.random.key(seed), 10)
  x = jax.random.normal(keys[0], (t, h), dtype)
  router_w = (jax.random.normal(keys[1], (h, e), jnp.float32) / np.sqrt(h)).astype(dtype)
  w_gate = (jax.random.normal(keys[2], (e, h, w), jnp.float32) / np.sqrt(h)).astype(dtype)
  w_up = (jax.random.normal(keys[3], (e, h, w), jnp.float32) / np.sqrt(h)).astype(dtype)
  w_down = (jax.random.normal(keys[4], (e, w, h), jnp.float32) / np.sqrt(w)).astype(dtype)
  ids = jax.lax.top_k(jax.random.uniform(keys[5], (t, e)), k)[1]
  x_sorted, group_sizes, _ = ops.permute(x, ids, e)
  return dict(tokens=t, hidden=h, width=w, experts=e, topk=k, routed_rows=t * k, dtype=dtype, x=x,
              router_w=router_w, w_gate=w_gate, w_up=w_up, w_down=w_down,
              w_gate_up=jnp.concatenate([w_gate, w_up], axis=-1), x_sorted=x_sorted, group_sizes=group_sizes,
              ct_gu=jax.random.normal(keys[6], (t * k, 2 * w), dtype),
              ct_layer=jax.random.normal(keys[7], (t, h), dtype))


def run_table(inp: dict, impls, *, platform_name: str, iters: int, warmup: int, tiling=None, layer: bool = True,
              sweep: bool = False, log=print) -> list[dict]:
  """Times every row of every impl in ``impls`` on the operands ``inp`` (``make_inputs``); returns the rows
  (impl, what, ms, tflops, status, note, flops), logging each as it is measured."""
  t, h, w, e, k, r = (inp[n] for n in ("tokens", "hidden", "width", "experts", "topk", "routed_rows"))
  x, router_w, w_gate, w_up, w_down, w_gate_up = (inp[n] for n in ("x", "router_w", "w_gate", "w_up", "w_down",
                                                                   "w_gate_up"))
  x_sorted, group_sizes, ct_gu, ct_layer = inp["x_sorted"], inp["group_sizes"], inp["ct_gu"], inp["ct_layer"]
  flops_gmm = 2 * r * h * 2 * w
  flops_layer = flops_gmm + 2 * r * w * h
  rows = []

  def record(impl, what, flops, ms, status, note=""):
    tf = (flops / (ms * 1e-3) / 1e12) if ms else None
    rows.append(dict(impl=impl, what=what, ms=ms, tflops=tf, status=status, note=note, flops=flops))
    ms_s = f"{ms:10.3f}" if ms is not None else f"{'-':>10}"
    tf_s = f"{tf:9.1f}" if tf is not None else f"{'-':>9}"
    log(f"{impl:18s} {what:26s} {ms_s} {tf_s}  {status}{('  (' + note + ')') if note else ''}")

  log(f"{'impl':18s} {'what':26s} {'ms':>10} {'TFLOP/s':>9}  status")
  for name in impls:
    be = make_backend(name, platform_name, tiling)
    if isinstance(be, str):
      record(name, "(skipped)", 0, None, "skipped", be)
      continue
    if be.name == "einsum":
      cap = r // e
      lhs_b = x_sorted[: cap * e].reshape(e, cap, h)
      f = lambda l, rr: jnp.einsum("ech,ehn->ecn", l, rr, preferred_element_type=jnp.float32).astype(l.dtype)
      fl = 2 * e * cap * h * 2 * w
      ms, st = time_fn(jax.jit(f), (lhs_b, w_gate_up), iters, warmup)
      record("einsum", "balanced fwd (ceiling)", fl, ms, st)
      ct_b = ct_gu[: cap * e].reshape(e, cap, 2 * w)
      ms, st = time_fn(fwd_bwd(f), (lhs_b, w_gate_up, ct_b), iters, warmup)
      record("einsum", "balanced fwd+bwd (ceiling)", 3 * fl, ms, st)
      continue

    if be.swiglu is None:  # the fused variant has the same plain-gmm rows as "pallas"
      g = lambda l, rr, gs, _g=be.gmm: _g(l, rr, gs)
      ms, st = time_fn(jax.jit(g), (x_sorted, w_gate_up, group_sizes), iters, warmup)
      record(be.name, "gmm gate+up fwd", flops_gmm, ms, st, be.note)
      gb = fwd_bwd(lambda l, rr, _g=be.gmm: _g(l, rr, group_sizes))
      ms, st = time_fn(gb, (x_sorted, w_gate_up, ct_gu), iters, warmup)
      record(be.name, "gmm gate+up fwd+bwd", 3 * flops_gmm, ms, st, be.note)
    else:
      sw = lambda l, g1, g2, gs, _s=be.swiglu: _s(l, g1, g2, gs)
      ms, st = time_fn(jax.jit(sw), (x_sorted, w_gate, w_up, group_sizes), iters, warmup)
      record(be.name, "gate+up+swiglu fwd", flops_gmm, ms, st, be.note)
      swb = fwd_bwd(lambda l, g1, g2, _s=be.swiglu: _s(l, g1, g2, group_sizes))
      ms, st = time_fn(swb, (x_sorted, w_gate, w_up, ct_gu[:, :w]), iters, warmup)
      record(be.name, "gate+up+swiglu fwd+bwd", 3 * flops_gmm, ms, st, be.note)

    if layer:
      lay = partial(moe_layer, topk=k, backend=be)
      params = (x, router_w, w_gate_up, w_gate, w_up, w_down)
      ms, st = time_fn(jax.jit(lay), params, iters, warmup)
      record(be.name, "layer fwd", flops_layer, ms, st, be.note)
      # Gradients for x and the expert weights (router weights too; its FLOPs are not counted).
      lb = fwd_bwd(lambda xx, rw, wgu, wg, wu, wd: lay(xx, rw, wgu, wg, wu, wd))
      ms, st = time_fn(lb, (*params, ct_layer), iters, warmup)
      record(be.name, "layer fwd+bwd", 3 * flops_layer, ms, st, be.note)

  if sweep and platform_name != "cpu":
    for tm, tk, tn, nw, ns in SWEEP_TILINGS:
      til = pallas_backend.Tiling(gmm=(tm, tk, tn), num_warps=nw, num_stages=ns)
      g = jax.jit(partial(pallas_backend.gmm, tiling=til))
      ms, st = time_fn(g, (x_sorted, w_gate_up, group_sizes), iters, warmup)
      record("pallas", f"fwd {tm}x{tk}x{tn} w{nw} s{ns}", flops_gmm, ms, st)
    for tm, tk, tn, nw, ns in SWEEP_TGMM_TILINGS:
      til = pallas_backend.Tiling(tgmm=(tm, tk, tn), tgmm_num_warps=nw, tgmm_num_stages=ns)
      g = jax.jit(partial(pallas_backend.tgmm, tiling=til))
      ms, st = time_fn(g, (x_sorted, ct_gu, group_sizes), iters, warmup)
      record("pallas", f"tgmm {tm}x{tk}x{tn} w{nw} s{ns}", flops_gmm, ms, st)
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--width", type=int, default=768, help="expert intermediate width (gate and up each)")
  p.add_argument("--experts", type=int, default=256)
  p.add_argument("--topk", type=int, default=8)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--impls", default=DEFAULT_IMPLS,
                 help="comma list of: pallas, pallas_fused, pallas_interpret, ragged_dot, reference, "
                      "tokamax, einsum")
  p.add_argument("--tiling", default=None, help="Pallas gmm tiling tm,tk,tn[,num_warps,num_stages]")
  p.add_argument("--sweep", action="store_true",
                 help="also time the Pallas gmm forward and tgmm (d_rhs) over a few GPU tilings")
  p.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                               "moe_kernels.json"))
  a = p.parse_args(argv)

  plat = jax.default_backend()
  dtype = jnp.dtype(a.dtype)
  print(f"device: {jax.devices()[0].device_kind} ({plat}); jax {jax.__version__}; "
        f"python {platform.python_version()}")
  print(f"shape: tokens={a.tokens} top{a.topk} of {a.experts} experts -> {a.tokens * a.topk} routed rows; "
        f"hidden={a.hidden} width={a.width}; {dtype.name}")
  inp = make_inputs(a.tokens, a.hidden, a.width, a.experts, a.topk, dtype, a.seed)
  gs_np = np.asarray(inp["group_sizes"])
  print(f"group sizes: min {gs_np.min()} max {gs_np.max()} mean {gs_np.mean():.1f}")
  rows = run_table(inp, [s.strip() for s in a.impls.split(",") if s.strip()], platform_name=plat,
                   iters=a.iters, warmup=a.warmup, tiling=parse_tiling(a.tiling), layer=not a.no_layer,
                   sweep=a.sweep, log=lambda line: print(line, flush=True))

  result = dict(
      device=jax.devices()[0].device_kind, platform=plat, jax=jax.__version__,
      python=platform.python_version(),
      config=dict(tokens=a.tokens, hidden=a.hidden, width=a.width, experts=a.experts, topk=a.topk,
                  routed_rows=inp["routed_rows"], dtype=dtype.name, iters=a.iters, warmup=a.warmup,
                  tiling=a.tiling, group_size_min=int(gs_np.min()), group_size_max=int(gs_np.max())),
      rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {a.out}")
  return result


if __name__ == "__main__":
  try:
    main()
  except Exception:  # noqa: BLE001
    traceback.print_exc()
    sys.exit(1)
