"""The LM head + chunked cross-entropy, forward + backward: ``losses.head.chunked_cross_entropy`` (the gradient
formed in the forward, every matmul in the compute dtype) beside the autodiff version it replaced (each chunk under
``jax.checkpoint``: the logits recomputed, both backward matmuls fed the float32 cotangent), over chunk sizes.

    python benchmarks/head_loss.py                      # JoyAI's head: 32768 tokens x 2048 -> 129280, bf16
    python benchmarks/head_loss.py --tokens 4096 --hidden 512 --vocab 32768 --dtype float32   # a CPU-sized one

Prints a table and writes JSON (``--out``): per implementation and chunk, fwd+bwd ms and TFLOP/s (6 * tokens *
hidden * vocab), the forward alone (evaluation) ms, and the largest difference of the loss and both gradients from
the autodiff version (relative to each one's largest entry): the two compute the same function.
``benchmarks/gpu_suite.py`` section d times the same two at the slice's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_kernels  # noqa: E402

from joyjax.losses import head  # noqa: E402


def autodiff_cross_entropy(hidden, head_w, targets, weights, chunk: int):
  """The summed cross-entropy as joyjax computed it before ``losses.head``: each chunk under ``jax.checkpoint``,
  differentiated by autodiff."""
  h, t, w = head.token_chunks(hidden, targets, weights, chunk)
  hw = head_w.astype(hidden.dtype)

  @jax.checkpoint
  def one(hc, tc, wc):
    logits = jnp.einsum("ne,ev->nv", hc, hw, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - tgt) * wc)

  return jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.zeros((), jnp.float32), (h, t, w))[0]


def hand_written_cross_entropy(hidden, head_w, targets, weights, chunk: int):
  return head.chunked_cross_entropy(hidden, head_w, targets, weights, chunk=chunk)[0]


IMPLS = {"hand-written": hand_written_cross_entropy, "autodiff": autodiff_cross_entropy}


def _max_rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def run(tokens: int, hidden: int, vocab: int, chunks: list[int], dtype: str, iters: int, warmup: int,
        log=print) -> dict:
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, tokens, hidden), jnp.dtype(dtype))
  w = (jax.random.normal(keys[1], (hidden, vocab), jnp.float32) * hidden ** -0.5)
  t = jax.random.randint(keys[2], (1, tokens), 0, vocab, jnp.int32)
  lw = jnp.ones((1, tokens), jnp.float32)
  flops = 6.0 * tokens * hidden * vocab
  rows = []
  log(f"{'impl':14s} {'chunk':>6s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'fwd ms':>8s} {'max rel diff':>13s}")
  for chunk in chunks:
    ref = None
    for name in ("autodiff", "hand-written"):
      fn = IMPLS[name]
      loss = lambda xx, ww, c=chunk, f=fn: f(xx, ww, t, lw, c)  # noqa: E731
      fb = moe_kernels.fwd_bwd(loss)
      ms, status = moe_kernels.time_fn(fb, (x, w, jnp.ones((), jnp.float32)), iters, warmup)
      fwd_ms, _ = moe_kernels.time_fn(jax.jit(loss), (x, w), iters, warmup)
      row = {"impl": name, "chunk": chunk, "fwd_bwd_ms": ms, "fwd_ms": fwd_ms, "status": status,
             "tflops": flops / (ms * 1e-3) / 1e12 if ms else None}
      if status == "ok":
        out, (dx, dw) = fb(x, w, jnp.ones((), jnp.float32))
        if ref is None:
          ref = (out, dx, dw)
        row["max_rel_diff"] = max(_max_rel(a, b) for a, b in zip((out, dx, dw), ref))
      rows.append(row)
      fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
      log(f"{name:14s} {chunk:6d} {fmt(ms, '11.2f')} {fmt(row['tflops'], '8.2f')} {fmt(fwd_ms, '8.2f')} "
          f"{fmt(row.get('max_rel_diff'), '13.2e')}" + ("" if status == "ok" else f"  {status}"))
  return {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype, "train_flops": flops,
          "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(), "rows": rows}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=32768)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=129280)
  p.add_argument("--chunks", default="2048,4096,8192", help="comma-separated train.loss_chunk values")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="head_loss.json")
  a = p.parse_args(argv)
  res = run(a.tokens, a.hidden, a.vocab, [int(c) for c in a.chunks.split(",")], a.dtype, a.iters, a.warmup)
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {a.out}")
  return res


if __name__ == "__main__":
  main()
