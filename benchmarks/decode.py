"""Decoding throughput with and without MTP speculative decoding: tokens/s of the batched sampler
(``joyjax.rl.sampler.Sampler``) at draft_tokens k = 0 (plain) and k = 1..3, and the mean acceptance length
(tokens emitted per decode step after the prefill's first token: 1 at k = 0, up to k + 1).

Each (batch, k) row builds one Sampler, runs ``--warmup`` untimed calls (the first compiles), then times
``--iters`` calls (median wall time, every output fetched to the host): tokens/s = generated tokens / time.
Greedy by default (``--temperature``); random prompts of ``--prompt-len`` tokens, ``--new-tokens`` each, no stop
ids, so every row generates the same number of tokens.

The drafts are only as good as the MTP module: a randomly initialised one is almost never right, so speculation
there is pure overhead (acceptance ~1). To see what drafting buys, either

  --checkpoint DIR   load params from a checkpoint (``train.checkpoint.load_params``: a ``joyjax convert``
                     output or a training run's checkpoints/<step>; its stored config when it has one), or
  --train-mtp N      first train the model (main and MTP losses, the config's own train step and optimizer) for
                     N steps on arithmetic progressions t_i = a + c * i (mod 97), which the model and its MTP
                     module learn quickly; the prompts are then progressions too.

  python benchmarks/decode.py                                     # tiny config, CPU
  python benchmarks/decode.py --train-mtp 150 --batch 1,8         # tiny, a briefly trained MTP module
  python benchmarks/decode.py --config configs/joyai_slice.py --batch 1,16 --new-tokens 128   # a GPU

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from joyjax import model, optim  # noqa: E402
from joyjax.batch import LM_KEYS  # noqa: E402
from joyjax.config import from_dict, load_config  # noqa: E402
from joyjax.rl.sampler import Sampler, left_pad  # noqa: E402
from joyjax.train import checkpoint, state as state_lib  # noqa: E402
from joyjax.train.step import make_train_step  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.py")
MODULUS = 97  # progressions live in tokens 0 .. 96


def progressions(rng, rows: int, length: int) -> np.ndarray:
  """[rows, length] int32 arithmetic progressions mod MODULUS, a random start and step 1..8 per row."""
  start = rng.integers(0, MODULUS, (rows, 1))
  step = rng.integers(1, 9, (rows, 1))
  return ((start + step * np.arange(length)[None]) % MODULUS).astype(np.int32)


def train_on_progressions(cfg, steps: int, seed: int = 0):
  """The model trained for ``steps`` steps on progressions (``cfg``'s train step: LM + MTP loss, its optimizer,
  batch size and sequence length). Returns (params, first loss, last loss)."""
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), steps)
  state = jax.jit(lambda k: state_lib.init_state(cfg, tx, k))(jax.random.key(seed))
  step = jax.jit(make_train_step(cfg, tx, steps), donate_argnums=(0,))
  rng = np.random.default_rng(seed)
  b, s = cfg.train.batch_size, cfg.data.seq_len
  losses = []
  for _ in range(steps):
    seq = jnp.asarray(progressions(rng, b, s + 1))
    batch = dict(zip(LM_KEYS, (seq[:, :-1], seq[:, 1:], jnp.ones((b, s), jnp.int32),
                               jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), jnp.ones((b, s), jnp.int32))))
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state["params"], losses[0], losses[-1]


def measure(cfg, params, prompts: np.ndarray, *, draft_tokens: int, new_tokens: int, iters: int, warmup: int,
            temperature: float, seed: int = 0) -> dict:
  """One row: a Sampler at ``draft_tokens`` over ``prompts`` [B, P]; compile time, median call time, tokens/s,
  acceptance length."""
  b, p = prompts.shape
  sampler = Sampler(cfg, max_prompt_len=p, max_new_tokens=new_tokens, draft_tokens=draft_tokens)
  lens = np.full((b,), p, np.int32)

  def call(i):
    return sampler(params, prompts, lens, jax.random.key(seed + i), temperature=temperature).fetch()

  t0 = time.perf_counter()
  out = call(0)
  first_s = time.perf_counter() - t0
  for i in range(1, warmup):
    call(i)
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    out = call(warmup + i)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  generated = int(out.lengths.sum())
  return {"batch": b, "draft_tokens": draft_tokens, "prompt_len": p, "new_tokens": new_tokens,
          "first_call_s": first_s, "ms": median * 1e3, "times_ms": [t * 1e3 for t in times],
          "tokens": generated, "tokens_per_s": generated / median, "acceptance_length": out.acceptance_length(),
          "decode_steps": int(out.steps.max()), "compiles": sampler.compiles()}


def run(cfg, params, *, batches, drafts, prompt_len: int, new_tokens: int, iters: int, warmup: int,
        temperature: float, prompts_from=None, seed: int = 0) -> list[dict]:
  """Every (batch, k) row; ``speedup`` is tokens/s over the same batch's k = 0 row (when measured)."""
  rng = np.random.default_rng(seed)
  rows = []
  for b in batches:
    if prompts_from is None:
      prompts = rng.integers(1, cfg.model.vocab_size, (b, prompt_len)).astype(np.int32)
    else:
      prompts = prompts_from(rng, b, prompt_len)
    base = None
    for k in drafts:
      row = measure(cfg, params, prompts, draft_tokens=k, new_tokens=new_tokens, iters=iters, warmup=warmup,
                    temperature=temperature, seed=seed)
      base = row["tokens_per_s"] if k == 0 else base
      row["speedup"] = None if base is None else row["tokens_per_s"] / base
      rows.append(row)
      print(f"  batch {b:4d}  k {k}: {row['tokens_per_s']:10.1f} tokens/s  acceptance {row['acceptance_length']:.2f}"
            f"  ({row['ms']:.1f} ms per call, first {row['first_call_s']:.1f} s)", flush=True)
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"{'batch':>6} {'k':>3} {'tokens/s':>11} {'speedup':>8} {'accept':>7} {'steps':>6} {'ms/call':>9}"]
  for r in rows:
    speed = "" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
    lines.append(f"{r['batch']:>6} {r['draft_tokens']:>3} {r['tokens_per_s']:>11.1f} {speed:>8} "
                 f"{r['acceptance_length']:>7.2f} {r['decode_steps']:>6} {r['ms']:>9.1f}")
  return "\n".join(lines)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=TINY, help="config file (default configs/tiny.py)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--checkpoint", default="", help="params checkpoint to load (default: random init)")
  p.add_argument("--train-mtp", type=int, default=0, metavar="N", help="first train N steps on progressions")
  p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
  p.add_argument("--drafts", default="0,1,2,3", help="comma list of draft_tokens (0 = plain decoding)")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--iters", type=int, default=3, help="timed calls per row (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first compiles)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode.json"))
  args = p.parse_args(argv)

  overrides = [s if s.startswith("--config.") else f"--config.{s}" for s in args.set]
  stored = checkpoint.load_params_config(args.checkpoint) if args.checkpoint else None
  cfg = from_dict(stored) if stored else load_config(args.config, overrides)
  result = {"benchmark": "benchmarks/decode.py", "args": vars(args), "device": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "jax": jax.__version__, "model": {
                "layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size, "vocab": cfg.model.vocab_size,
                "mtp_layers": cfg.model.mtp.num_layers, "dtype": cfg.model.dtype}}
  prompts_from = None
  if args.checkpoint:
    params = checkpoint.load_params(args.checkpoint, model.abstract_params(cfg))
    result["params"] = f"checkpoint {args.checkpoint}"
  elif args.train_mtp:
    t0 = time.perf_counter()
    params, first, last = train_on_progressions(cfg, args.train_mtp, args.seed)
    result["params"] = f"trained {args.train_mtp} steps on progressions mod {MODULUS}"
    result["train"] = {"steps": args.train_mtp, "loss_first": first, "loss_last": last,
                       "seconds": time.perf_counter() - t0}
    print(f"trained {args.train_mtp} steps on progressions: loss {first:.3f} -> {last:.3f}", flush=True)
    prompts_from = progressions
  else:
    params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(args.seed))
    result["params"] = "random init"
  drafts = _ints(args.drafts)
  if cfg.model.mtp.num_layers == 0 and any(drafts):
    p.error("the config has no MTP module (model.mtp.num_layers = 0): only --drafts 0 can run")
  result["rows"] = run(cfg, params, batches=_ints(args.batch), drafts=drafts, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, iters=args.iters, warmup=args.warmup,
                       temperature=args.temperature, prompts_from=prompts_from, seed=args.seed)
  table = format_table(result["rows"])
  print(f"\n== decode: {result['device']} ({result['platform']}), {result['params']}, "
        f"prompt {args.prompt_len} + {args.new_tokens} new, T = {args.temperature}\n{table}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"wrote {args.out}", flush=True)
  return result


if __name__ == "__main__":
  main()
