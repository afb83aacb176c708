"""FiberPO, GRPO and GSPO side by side on the toy task, at a deliberately high learning rate.

The JoyAI report compared the three at lr 1e-6 on DAPO-Math (GRPO collapsed: entropy down 91%, mean ratio > 1e3;
GSPO stagnated; FiberPO improved steadily, mean ratio ~1.13). This is the CPU-sized version of that comparison:
one tiny model taught the arithmetic task's answer format (a short SFT run on the task's demonstrations, shared by
all three), then ``joyjax rl`` with each policy loss from the same start, the same rollout seeds and the same
(high) learning rate. Per step it records reward, held-out reward, entropy, mean and max importance ratio, gated
tokens / trajectories and gradient norm (from each run's metrics.jsonl), prints a table, writes the JSON and a PNG
plot.

  python benchmarks/rl_stability.py --out rl_stability.json --png rl_stability.png     # ~5 min on 2 CPU cores
  python benchmarks/rl_stability.py --steps 3 --sft-steps 20 --lr 1e-3 --out /tmp/r.json --png /tmp/r.png   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from joyjax.config import load_config  # noqa: E402
from joyjax.data import chat  # noqa: E402
from joyjax.data.tokenizer import train_tokenizer  # noqa: E402
from joyjax.rl import envs  # noqa: E402
from joyjax.rl.prompts import PromptStream  # noqa: E402
from joyjax.train import loop  # noqa: E402

RL_CONFIG = os.path.join(ROOT, "configs", "fiberpo_tiny.py")
SFT_CONFIG = os.path.join(ROOT, "configs", "sft_tiny.py")
LOSSES = ("fiberpo", "grpo", "gspo")
COLUMNS = ("reward", "eval/reward", "entropy", "mean_ratio", "max_ratio", "gated_tokens", "gated_trajectories",
           "grad_norm")
VOCAB = 512  # the model's; the task's tokenizer (a small BPE plus the chat markers) fits in it


def off_by_one(rows: list[dict], fraction: float, seed: int) -> list[dict]:
  """``rows`` with the integer answer of a ``fraction`` of them (chosen by ``seed``) replaced by answer + 1."""
  rng = random.Random(seed)
  out = []
  for r in rows:
    msgs = [dict(m) for m in r["messages"]]
    if rng.random() < fraction:
      msgs[-1]["content"] = str(int(msgs[-1]["content"]) + 1)
    out.append({"messages": msgs})
  return out


def prepare(workdir: str, *, sft_steps: int, env_args: str, wrong_fraction: float = 0.0, seed: int = 0,
            log=print) -> dict:
  """The shared start: a tokenizer for the task (``tokenizer.json``) and a tiny model SFT-trained for
  ``sft_steps`` steps on demonstrations of the task's training prompts, a ``wrong_fraction`` of them answering
  a + b + 1 (``off_by_one``): a model that knows the answer format and, with wrong_fraction > 0.5, answers
  wrong when greedy while its samples hold the right answer some of the time. Returns the paths."""
  os.makedirs(workdir, exist_ok=True)
  rl_cfg = load_config(RL_CONFIG, [f"--config.rl.env_args={env_args}", f"--config.model.vocab_size={VOCAB}"])
  env = envs.make_env(rl_cfg.rl)
  texts = [m["content"] for p in env.prompts() for m in p.messages] + [p.answer for p in env.prompts()]
  tok = chat.add_chat_tokens(train_tokenizer(texts * 4, 320))
  tok_path = os.path.join(workdir, "tokenizer.json")
  tok.save(tok_path)
  # Demonstrations of the training prompts only: the held-out ones (data.eval_fraction) stay unseen.
  rows = off_by_one(env.demonstrations(2000, seed, indices=PromptStream(rl_cfg, tok, env).train_indices),
                    wrong_fraction, seed)
  data = os.path.join(workdir, "demonstrations.jsonl")
  with open(data, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  sft_dir = os.path.join(workdir, "sft")
  sft = load_config(SFT_CONFIG, [
      f"--config.train.output_dir={sft_dir}", f"--config.data.path={data}", f"--config.data.tokenizer={tok_path}",
      f"--config.model.vocab_size={VOCAB}", "--config.data.seq_len=64", f"--config.train.steps={sft_steps}",
      "--config.train.batch_size=16", "--config.train.eval_every=0", "--config.data.eval_fraction=0.0",
      "--config.checkpoint.every=0", "--config.train.sample_prompt=", "--config.sft.thinking_ratio=0.0",
      "--config.train.log_every=50", f"--config.train.seed={seed}", "--config.optim.lr=3e-3"])
  t0 = time.time()
  loop.train(sft, objective=loop.SFT, print_sample=False, stream=open(os.devnull, "w"))
  log(f"format warm-up: {sft_steps} SFT steps on {len(rows)} demonstrations in {time.time() - t0:.0f}s")
  return {"tokenizer": tok_path, "sft": sft_dir}


def rl_config(start: dict, out_dir: str, loss: str, *, steps: int, lr: float, env_args: str, extra=()):
  return load_config(RL_CONFIG, [
      f"--config.train.output_dir={out_dir}", f"--config.train.init_from={start['sft']}",
      f"--config.data.tokenizer={start['tokenizer']}", f"--config.model.vocab_size={VOCAB}",
      f"--config.rl.loss={loss}", f"--config.train.steps={steps}", f"--config.optim.lr={lr}",
      f"--config.rl.env_args={env_args}", "--config.checkpoint.every=0", "--config.train.sample_prompt=",
      *extra])


def read_metrics(out_dir: str) -> list[dict]:
  rows = []
  with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rows.append(json.loads(line))
  return rows


def run_losses(start: dict, workdir: str, *, steps: int, lrs, env_args: str, losses=LOSSES, log=print):
  """{"loss@lr": [per-step metrics]} of one RL run per loss and learning rate, all from the same start."""
  out = {}
  for lr in lrs:
    for loss in losses:
      d = os.path.join(workdir, f"rl_{loss}_{lr:g}")
      t0 = time.time()
      loop.train(rl_config(start, d, loss, steps=steps, lr=lr, env_args=env_args), objective=loop.RL,
                 print_sample=False, stream=open(os.devnull, "w"))
      out[f"{loss}@{lr:g}"] = [{k: r[k] for k in ("step", *COLUMNS) if k in r} for r in read_metrics(d)]
      log(f"{loss} at lr {lr:g}: {steps} steps in {time.time() - t0:.0f}s")
  return out


def summary(curves: dict) -> str:
  """One line per run: reward at the first and last 5 steps, held-out reward at the first and last evaluation
  and its best, entropy range, the largest mean ratio, mean gradient norm."""
  head = (f"{'run':16} {'reward first5':>13} {'last5':>7} {'eval first':>10} {'last':>6} {'best':>6} "
          f"{'entropy min':>11} {'max':>6} {'max mean_ratio':>14} {'grad_norm':>9}")
  lines = [head, "-" * len(head)]
  mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
  for run, rows in curves.items():
    rew = [r["reward"] for r in rows]
    ev = [r["eval/reward"] for r in rows if "eval/reward" in r]
    ent = [r["entropy"] for r in rows]
    lines.append(f"{run:16} {mean(rew[:5]):13.3f} {mean(rew[-5:]):7.3f} {ev[0] if ev else float('nan'):10.3f} "
                 f"{ev[-1] if ev else float('nan'):6.3f} {max(ev) if ev else float('nan'):6.3f} {min(ent):11.3f} "
                 f"{max(ent):6.3f} {max(r['mean_ratio'] for r in rows):14.3f} "
                 f"{mean([r['grad_norm'] for r in rows]):9.3f}")
  return "\n".join(lines)


def table(curves: dict) -> str:
  head = f"{'run':16} {'step':>5} " + " ".join(f"{c:>18}" for c in COLUMNS)
  lines = [head, "-" * len(head)]
  for loss, rows in curves.items():
    for r in rows:
      cells = " ".join(f"{r[c]:18.4g}" if isinstance(r.get(c), (int, float)) else f"{'-':>18}" for c in COLUMNS)
      lines.append(f"{loss:16} {r['step']:5d} {cells}")
  return "\n".join(lines)


def plot(curves: dict, path: str, title: str) -> None:
  import matplotlib  # optional: only the plot needs it (pip install -e ".[bench]")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = ("reward", "eval/reward", "entropy", "mean_ratio", "gated_tokens", "grad_norm")
  lrs = sorted({run.split("@")[1] for run in curves}, key=float)
  fig, axes = plt.subplots(len(lrs), len(panels), figsize=(3.2 * len(panels), 2.8 * len(lrs)), squeeze=False)
  for row, lr in zip(axes, lrs):
    for ax, name in zip(row, panels):
      for run, rows in curves.items():
        if run.split("@")[1] != lr:
          continue
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if pts:
          ax.plot(*zip(*pts), label=run.split("@")[0], marker="." if name == "eval/reward" else None)
      ax.set_title(f"{name} (lr {lr})", fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      if name == "mean_ratio":
        ax.set_yscale("log")
    row[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=40, help="RL steps per loss")
  p.add_argument("--sft-steps", type=int, default=400, help="warm-up SFT steps")
  p.add_argument("--wrong-fraction", type=float, default=0.6, help="warm-up rows answering a + b + 1")
  p.add_argument("--lr", default="1e-4,3e-4,1e-3",
                 help="learning rates, comma separated (the e2e recipe's is 1e-4; 1e-3 is deliberately high)")
  p.add_argument("--env-args", default="max_operand=9,ops=+")
  p.add_argument("--losses", default=",".join(LOSSES))
  p.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
  p.add_argument("--out", default="rl_stability.json")
  p.add_argument("--png", default="rl_stability.png")
  args = p.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="rl_stability_")
  start = prepare(workdir, sft_steps=args.sft_steps, env_args=args.env_args, wrong_fraction=args.wrong_fraction)
  losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
  lrs = [float(x) for x in args.lr.split(",") if x.strip()]
  curves = run_losses(start, workdir, steps=args.steps, lrs=lrs, env_args=args.env_args, losses=losses)
  print(table(curves))
  print()
  print(summary(curves))
  result = {"steps": args.steps, "sft_steps": args.sft_steps, "lrs": lrs, "env_args": args.env_args,
            "wrong_fraction": args.wrong_fraction, "curves": curves}
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  plot(curves, args.png, "tiny model, arithmetic task: " + " vs ".join(losses) + " from one warm start")
  print(f"wrote {args.out} and {args.png}")
  return result


if __name__ == "__main__":
  main()
