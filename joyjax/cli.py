"""The ``joyjax`` command: train, sft, dpo, rl, sample, chat, params, convert, plan, summary.

A user error (a config key, a data file, a checkpoint, a tokenizer, a conversion) ends the command with one
line on stderr, ``joyjax <command>: <kind>: <message>``, and exit status 1; ``JOYJAX_DEBUG=1`` re-raises it
with its traceback instead. Usage errors (a missing or unknown flag) exit 2, as argparse does.
"""

from __future__ import annotations

import argparse
import ast
import io
import logging
import os
import re
import sys
import time
import tokenize

import jax
import numpy as np

from configs import base as base_config
from joyjax import model
from joyjax.axes import MESH_AXES
from joyjax.config import QUANT_FORMATS, load_config
from joyjax.convert import hf
from joyjax.data.tokenizer import load_tokenizer
from joyjax.errors import CheckpointError, ConfigError, JoyjaxError
from joyjax.model import count_params, format_counts
from joyjax.parallel import plan
from joyjax.train import chat, checkpoint, loop, sample

DEBUG_ENV = "JOYJAX_DEBUG"
BASE_CONFIG = "configs/base.py"

# The keys `joyjax train --help` lists; their meanings come from the comments in configs/base.py (a key whose
# line has none takes its meaning from _MEANINGS). tests/test_cli_errors.py checks that each key exists.
MAIN_KEYS = ("train.steps", "train.batch_size", "train.output_dir", "train.init_from", "data.path",
             "data.tokenizer", "data.seq_len", "optim.name", "optim.lr", "model.moe.impl", "checkpoint.every")
MESH_KEYS = tuple(f"mesh.{axis}" for axis in MESH_AXES)
_MEANINGS = {"train.steps": "total optimizer steps (a resumed run continues up to it)",
             "mesh": "device mesh axis sizes; one may be -1 to take the remaining devices"}


def config_key_comments(path: str | None = None) -> dict[str, str]:
  """``{"train.batch_size": "global sequences per optimizer step", ...}``: the comment at the end of each key's
  line in ``configs/base.py`` ("" for a key without one). Keys are found from the file's assignments
  (``tr = c.train = ConfigDict()`` names a group, ``tr.steps = 200`` a key), so the text is never executed."""
  path = path or base_config.__file__
  try:
    with open(path, encoding="utf-8") as f:
      src = f.read()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    tree = ast.parse(src)
  except (OSError, SyntaxError, tokenize.TokenError):
    return {}
  groups, out = {}, {}
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == "get_config":
      for stmt in node.body:
        if not isinstance(stmt, ast.Assign):
          continue
        is_group = isinstance(stmt.value, ast.Call) and "ConfigDict" in ast.unparse(stmt.value.func)
        key = None
        for target in stmt.targets:
          if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            key = groups.get(target.value.id, "") + target.attr
        if is_group:
          for target in stmt.targets:
            if isinstance(target, ast.Name):
              groups[target.id] = "" if key is None else key + "."
        elif key is not None:
          out[key] = comments.get(stmt.end_lineno, "")
  return out


def _keys_help() -> str:
  comments = config_key_comments()
  width = max(len(k) for k in MAIN_KEYS) + 2
  lines = [f"  {k:<{width}}{comments.get(k) or _MEANINGS.get(k, '')}" for k in MAIN_KEYS]
  lines.append(f"  {', '.join(MESH_KEYS)}\n  {'':<{width}}{_MEANINGS['mesh']}")
  return "\n".join(lines)


def _config_epilog(example: str) -> str:
  return (f"config overrides:\n"
          f"  After --config FILE, any --config.KEY=VALUE overrides one config key, e.g.\n"
          f"    {example}\n"
          f"  Every key, its meaning and its default is documented in {BASE_CONFIG}; a misspelt key or a bad\n"
          f"  value fails before anything is compiled, naming the key.\n\n"
          f"main keys:\n{_keys_help()}\n\n"
          f"A user error (config, data, checkpoint, tokenizer) prints one line and exits 1;\n"
          f"{DEBUG_ENV}=1 shows its traceback instead.")


def _config(args, overrides):
  """The config of ``--config`` with the overrides; an unreadable or broken config file is a ConfigError."""
  try:
    return load_config(args.config, overrides)
  except OSError as e:
    raise ConfigError(f"cannot read config file {args.config!r} ({e.strerror or e}); give a readable file such "
                      "as configs/tiny.py") from e
  except SyntaxError as e:
    raise ConfigError(f"config file {args.config!r} is not valid Python: {e.msg} at line {e.lineno}") from e


def _require_absent(flag: str, path: str) -> None:
  """Refuses an output path that holds something: nothing the user saved is overwritten."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise CheckpointError(f"{flag} {path} already exists and is not empty; choose another {flag} path (nothing "
                          "was written)")


def cmd_params(args, overrides):
  cfg = _config(args, overrides)
  print(f"parameters of {args.config} (from shapes, nothing allocated):")
  print(format_counts(count_params(cfg)))


def cmd_summary(args, overrides):
  """Builds the model, runs one forward pass and prints its shapes: the smallest end-to-end check."""
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
  _require_absent("--out", args.out)
  if args.hf_dir:
    cfg, params = hf.import_checkpoint(args.hf_dir, param_dtype=args.param_dtype)
    # An existing --out is an empty directory here (_require_absent): replacing it loses nothing.
    checkpoint.save_params(args.out, params, config=cfg.to_dict(), overwrite=os.path.isdir(args.out))
    tok = os.path.join(args.hf_dir, checkpoint.TOKENIZER_FILE)
    if os.path.exists(tok):  # runs that start from this checkpoint (train.init_from) read text as it did
      checkpoint.save_tokenizer(args.out, load_tokenizer(tok))
    print(f"imported {args.hf_dir} -> {args.out} (train with --config.train.init_from={args.out})")
  else:
    cfg = _config(args, overrides)
    params = checkpoint.load_params(args.params)
    hf.export_checkpoint(cfg, params, args.out, dtype=args.dtype, quantize=args.quantize)
    what = {None: "", "fp8": ", FP8 128x128 block-quantized linears",
            "int4": f", INT4 pack-quantized linears (group {cfg.quant.group_size})"}[args.quantize]
    print(f"exported {args.params} -> {args.out} (Hugging Face DeepSeek-V3 format{what})")


def cmd_train(args, overrides):
  loop.main(_config(args, overrides))


def cmd_sft(args, overrides):
  loop.main(_config(args, overrides), loop.SFT)


def cmd_dpo(args, overrides):
  loop.main(_config(args, overrides), loop.DPO)


def cmd_rl(args, overrides):
  loop.main(_config(args, overrides), loop.RL)


def cmd_sample(args, overrides):
  print(sample.sample_from_checkpoint(args.checkpoint, args.prompt, max_tokens=args.max_tokens,
                                      temperature=args.temperature, seed=args.seed))


def cmd_chat(args, overrides):
  decoding = chat.Decoding(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           max_tokens=args.max_tokens, seed=args.seed)
  session = chat.open_session(args.checkpoint, system=args.system, thinking=args.think, decoding=decoding,
                              draft_tokens=args.draft_tokens)
  if args.prompt is not None:
    chat.say_reply(session, args.prompt, args.think, sys.stdout)
  else:
    chat.repl(session, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, interactive=sys.stdin.isatty())


def _at_least(low, kind):
  def parse(text):
    try:
      v = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
    return v
  return parse


def cmd_plan(args, overrides):
  plan.main(_config(args, overrides), args)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="joyjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"Any --config.KEY=VALUE after the subcommand overrides a config key (every key is documented in "
             f"{BASE_CONFIG});\n`joyjax train --help` lists the main ones. {DEBUG_ENV}=1 shows the traceback of a "
             f"user error.")
  sub = p.add_subparsers(dest="command", required=True)

  def with_config(name, help, example, required=True):
    usage = f"joyjax {name} [-h] --config FILE [--config.KEY=VALUE ...]"
    if not required:
      usage = None
    sp = sub.add_parser(name, help=help, description=help, usage=usage,
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_epilog(example))
    sp.add_argument("--config", required=required, metavar="FILE",
                    help="config file, e.g. configs/tiny.py; --config.KEY=VALUE after it overrides a key")
    return sp

  with_config("train", "train (pretraining on the embedded corpus by default)",
              "joyjax train --config configs/tiny.py --config.train.steps=1000 --config.optim.lr=3e-4")
  with_config("sft", "supervised fine-tuning on conversations (chat format, thinking / non-thinking)",
              "joyjax sft --config configs/sft_tiny.py --config.train.init_from=runs/tiny "
              "--config.data.path=chats.jsonl")
  with_config("dpo", "direct preference optimisation on {prompt, chosen, rejected} pairs",
              "joyjax dpo --config configs/dpo_tiny.py --config.train.init_from=runs/sft_tiny "
              "--config.data.path=pairs.jsonl")
  with_config("rl", "reinforcement learning on a verifiable task (FiberPO by default; GRPO, GSPO)",
              "joyjax rl --config configs/fiberpo_tiny.py --config.train.init_from=runs/sft_tiny "
              "--config.rl.loss=grpo")
  with_config("params", "count total and activated parameters from shapes",
              "joyjax params --config configs/joyai_flash.py --config.model.num_layers=8")
  with_config("summary", "build the model, run a forward pass, print shapes",
              "joyjax summary --config configs/tiny.py --config.model.moe.impl=reference")
  s = sub.add_parser("sample", help="sample from a training run's latest checkpoint",
                     description="sample from a training run's latest checkpoint (its stored config and "
                                 "tokenizer)", epilog=f"{DEBUG_ENV}=1 shows the traceback of a user error.")
  s.add_argument("--checkpoint", required=True, help="a training output_dir (or its checkpoints/ folder)")
  s.add_argument("--prompt", default="def ")
  s.add_argument("--max-tokens", type=int, default=64)
  s.add_argument("--temperature", type=float, default=0.0)
  s.add_argument("--seed", type=int, default=0)
  ch = sub.add_parser("chat", help="chat with a checkpoint (chat format, thinking on or off, streamed replies)",
                      description="chat with a checkpoint through the chat format: each input line is a user "
                                  "turn; replies stream as they are generated. " + chat.REPL_HELP + ". Ctrl-C "
                                  "stops a reply; Ctrl-D or end of input leaves.",
                      epilog=f"{DEBUG_ENV}=1 shows the traceback of a user error.")
  ch.add_argument("--checkpoint", required=True,
                  help="a training output_dir (its latest checkpoint) or a params checkpoint from joyjax convert")
  ch.add_argument("--system", default="", help="system prompt")
  mode = ch.add_mutually_exclusive_group()
  mode.add_argument("--think", dest="think", action="store_true", help="thinking mode by default")
  mode.add_argument("--no-think", dest="think", action="store_false", help="non-thinking mode by default (default)")
  ch.set_defaults(think=False)
  ch.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="0 = greedy (default)")
  ch.add_argument("--top-p", type=_at_least(0.0, float), default=1.0, help="nucleus sampling; 1 = off")
  ch.add_argument("--top-k", type=_at_least(0, int), default=0, help="0 = off")
  ch.add_argument("--max-tokens", type=_at_least(1, int), default=512, help="most tokens per reply")
  ch.add_argument("--seed", type=int, default=0)
  ch.add_argument("--prompt", default=None, help="one-shot: answer this user turn, print the reply, exit")
  ch.add_argument("--draft-tokens", type=_at_least(0, int), default=None,
                  help=f"MTP speculative decoding: tokens drafted per step (default {chat.DEFAULT_DRAFT_TOKENS} where "
                       "the checkpoint has an MTP module, else 0); 0 = off")
  c = with_config("convert", "Hugging Face <-> joyjax checkpoints",
                  "joyjax convert --params ckpt/flash --config configs/joyai_flash.py --out hf/ "
                  "--config.model.num_layers=8", required=False)
  c.add_argument("--hf-dir", help="import: a HF DeepSeek-V3 / JoyAI checkpoint directory")
  c.add_argument("--params", help="export: a joyjax params checkpoint")
  c.add_argument("--out", required=True, help="a new directory (an existing non-empty one is refused)")
  c.add_argument("--dtype", default="bfloat16", help="export dtype (of the tensors not quantized)")
  c.add_argument("--quantize", choices=QUANT_FORMATS[1:], default=None,
                 help="export: fp8 = DeepSeek-V3's float8_e4m3fn + weight_scale_inv per 128x128 block; int4 = "
                      "compressed-tensors pack-quantized, groups of quant.group_size along the input, the weights "
                      "of quant.targets (--config.quant.group_size=32 --config.quant.targets=routed)")
  c.add_argument("--param-dtype", default="float32", help="import dtype")
  pl = with_config("plan", "per-device memory plan for a mesh, from abstract shapes",
                   "joyjax plan --config configs/joyai_flash.py --devices 64 --config.mesh.fsdp=16")
  pl.add_argument("--devices", type=int, default=0, help="number of devices to plan for")
  pl.add_argument("--device-memory-gib", type=float, default=0.0)
  return p


COMMANDS = {"train": cmd_train, "sft": cmd_sft, "dpo": cmd_dpo, "rl": cmd_rl, "params": cmd_params, "summary": cmd_summary, "convert": cmd_convert,
            "sample": cmd_sample, "chat": cmd_chat, "plan": cmd_plan}


def error_line(command: str, err: JoyjaxError) -> str:
  """``joyjax <command>: <kind>: <message>`` on one line (a message's line breaks become spaces)."""
  message = re.sub(r"\s*\n\s*", " ", str(err).strip())
  return f"joyjax {command}: {err.kind}: {message}"


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  # orbax and jax log every checkpoint phase at INFO through absl; keep their warnings, drop the chatter.
  for name in ("absl", "orbax", "jax", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  parser = build_parser()
  args = parser.parse_args(rest)
  if args.command == "convert" and not args.hf_dir and not (args.params and args.config):
    parser.error("convert: give --hf-dir DIR (import) or --params CKPT --config FILE (export)")
  if args.command == "convert" and args.hf_dir and args.quantize:
    parser.error("convert: --quantize applies to export (--params); import reads FP8 / INT4 checkpoints as they are")
  if overrides and args.command in ("sample", "chat"):
    parser.error(f"{args.command} takes the config stored in the checkpoint; {overrides[0]} does not apply")
  try:
    COMMANDS[args.command](args, overrides)
  except JoyjaxError as e:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
      raise
    raise SystemExit(error_line(args.command, e)) from None


if __name__ == "__main__":
  main()
