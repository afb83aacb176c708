"""The ``joyjax`` command: train, sample, params, convert, plan, summary."""

from __future__ import annotations

import argparse
import logging
import sys

from joyjax.config import ConfigError, load_config


def _config(args, overrides):
  return load_config(args.config, overrides)


def cmd_params(args, overrides):
  from joyjax.params import count_params, format_counts
  cfg = _config(args, overrides)
  print(f"parameters of {args.config} (from shapes, nothing allocated):")
  print(format_counts(count_params(cfg)))


def cmd_summary(args, overrides):
  """Builds the model, runs one forward pass and prints its shapes: the smallest end-to-end check."""
  import time

  import jax
  import numpy as np

  from joyjax import model
  from joyjax.params import count_params, format_counts
  cfg = _config(args, overrides)
  print(cfg.model)
  print(format_counts(count_params(cfg)))
  params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 32))
  fwd = jax.jit(lambda p, t: model.forward(cfg, p, t, return_mtp=True))
  t0 = time.perf_counter()
  logits, mtp = jax.block_until_ready(fwd(params, tokens))
  t1 = time.perf_counter()
  jax.block_until_ready(fwd(params, tokens))
  print(f"forward {tuple(tokens.shape)} -> logits {logits.shape}, {len(mtp)} MTP head(s); "
        f"compile+run {t1 - t0:.2f}s, run {time.perf_counter() - t1:.4f}s on {jax.devices()[0].platform}")


def cmd_convert(args, overrides):
  from joyjax.convert import hf
  from joyjax.train import checkpoint
  if args.hf_dir:
    cfg, params = hf.import_checkpoint(args.hf_dir, param_dtype=args.param_dtype)
    checkpoint.save_params(args.out, params, config=cfg.to_dict())
    print(f"imported {args.hf_dir} -> {args.out} (train with --config.train.init_from={args.out})")
  else:
    if not (args.params and args.config):
      raise SystemExit("joyjax convert: give --hf-dir DIR (import) or --params CKPT --config CFG (export)")
    cfg = _config(args, overrides)
    params = checkpoint.load_params(args.params)
    hf.export_checkpoint(cfg, params, args.out, dtype=args.dtype)
    print(f"exported {args.params} -> {args.out} (Hugging Face DeepSeek-V3 format)")


def cmd_train(args, overrides):
  from joyjax.train.loop import main as train_main
  train_main(_config(args, overrides))


def cmd_sample(args, overrides):
  from joyjax.train.sample import sample_from_checkpoint
  print(sample_from_checkpoint(args.checkpoint, args.prompt, max_tokens=args.max_tokens,
                               temperature=args.temperature, seed=args.seed))


def cmd_plan(args, overrides):
  from joyjax.parallel.plan import main as plan_main
  plan_main(_config(args, overrides), args)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="joyjax", description=__doc__,
                              epilog="Any --config.KEY=VALUE after the subcommand overrides a config key.")
  sub = p.add_subparsers(dest="command", required=True)

  def with_config(sp, required=True):
    sp.add_argument("--config", required=required, help="config file, e.g. configs/tiny.py")
    return sp

  with_config(sub.add_parser("train", help="train (pretraining on the embedded corpus by default)"))
  with_config(sub.add_parser("params", help="count total and activated parameters from shapes"))
  with_config(sub.add_parser("summary", help="build the model, run a forward pass, print shapes"))
  s = sub.add_parser("sample", help="sample from a training run's latest checkpoint")
  s.add_argument("--checkpoint", required=True, help="a training output_dir (or its checkpoints/ folder)")
  s.add_argument("--prompt", default="def ")
  s.add_argument("--max-tokens", type=int, default=64)
  s.add_argument("--temperature", type=float, default=0.0)
  s.add_argument("--seed", type=int, default=0)
  c = with_config(sub.add_parser("convert", help="Hugging Face <-> joyjax checkpoints"), required=False)
  c.add_argument("--hf-dir", help="import: a HF DeepSeek-V3 / JoyAI checkpoint directory")
  c.add_argument("--params", help="export: a joyjax params checkpoint")
  c.add_argument("--out", required=True)
  c.add_argument("--dtype", default="bfloat16", help="export dtype")
  c.add_argument("--param-dtype", default="float32", help="import dtype")
  pl = with_config(sub.add_parser("plan", help="per-device memory plan for a mesh, from abstract shapes"))
  pl.add_argument("--devices", type=int, default=0, help="number of devices to plan for")
  pl.add_argument("--device-memory-gib", type=float, default=0.0)
  return p


COMMANDS = {"train": cmd_train, "params": cmd_params, "summary": cmd_summary, "convert": cmd_convert,
            "sample": cmd_sample, "plan": cmd_plan}


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  # orbax and jax log every checkpoint phase at INFO through absl; keep their warnings, drop the chatter.
  for name in ("absl", "orbax", "jax", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  args = build_parser().parse_args(rest)
  try:
    COMMANDS[args.command](args, overrides)
  except ConfigError as e:
    raise SystemExit(f"joyjax {args.command}: config error: {e}")


if __name__ == "__main__":
  main()
