"""Sampling from a model with the latent KV cache: one prefill call, then a ``lax.fori_loop`` of single-token
decode steps inside one jitted function (the cache is preallocated and carried; weights are arguments, so new
weights do not recompile)."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from joyjax import model
from joyjax.config import from_dict
from joyjax.data.pipeline import build_tokenizer
from joyjax.errors import CheckpointCorruptError, CheckpointNotFoundError
from joyjax.train import checkpoint


_COMPILED: dict = {}


def _generator(cfg, max_new: int, greedy: bool):
  """The jitted generation function for (cfg, length, mode), compiled once per process."""
  key = (id(cfg), max_new, greedy)
  if key not in _COMPILED:
    _COMPILED[key] = (cfg, jax.jit(functools.partial(_generate, cfg, max_new=max_new, greedy=greedy)))
  return _COMPILED[key][1]


def _generate(cfg, params, prompt, temperature, key, *, max_new: int, greedy: bool):
  b, p = prompt.shape
  cache = model.init_cache(cfg, b, p + max_new)
  logits, cache = model.decode_step(cfg, params, prompt, cache)

  def pick(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  out = jnp.zeros((b, max_new), jnp.int32)
  key, sub = jax.random.split(key)
  first = pick(logits[:, -1], sub)
  out = out.at[:, 0].set(first)

  def body(i, carry):
    out, cache, key = carry
    logits, cache = model.decode_step(cfg, params, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
    key, sub = jax.random.split(key)
    out = jax.lax.dynamic_update_slice_in_dim(out, pick(logits[:, -1], sub)[:, None], i, axis=1)
    return out, cache, key

  out, _, _ = jax.lax.fori_loop(1, max_new, body, (out, cache, key))
  return out


def generate(cfg, params, prompt_tokens, *, max_tokens: int, temperature: float = 0.0, seed: int = 0,
             eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token lists of equal length, or one list) by ``max_tokens`` tokens:
  greedy when ``temperature`` is 0, else softmax sampling at that temperature. Stops each row at ``eos_id``."""
  if prompt_tokens and isinstance(prompt_tokens[0], int):
    prompt_tokens = [prompt_tokens]
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError("generate: prompts must be non-empty token lists of one length")
  limit = cfg.model.max_position_embeddings
  if prompt.shape[1] + max_tokens > limit:
    raise ValueError(f"prompt ({prompt.shape[1]}) + max_tokens ({max_tokens}) exceeds "
                     f"model.max_position_embeddings={limit}")
  fn = _generator(cfg, int(max_tokens), temperature <= 0)
  out = fn(params, jnp.asarray(prompt), jnp.float32(max(temperature, 1e-6)), jax.random.key(seed))
  rows = np.asarray(out).tolist()
  if eos_id is not None:
    rows = [r[:r.index(eos_id)] if eos_id in r else r for r in rows]
  return rows


def sample_text(cfg, params, tokenizer, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                seed: int = 0) -> str:
  ids = tokenizer.encode(prompt)
  if cfg.data.add_bos and tokenizer.bos_id is not None:
    ids = [tokenizer.bos_id] + list(ids)
  new = generate(cfg, params, list(ids), max_tokens=max_tokens, temperature=temperature, seed=seed,
                 eos_id=tokenizer.eos_id)[0]
  return prompt + tokenizer.decode(new)


def sample_from_checkpoint(run_dir, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                           seed: int = 0) -> str:
  """Loads the latest checkpoint of a training run (its ``output_dir``, or its ``checkpoints/`` folder) with
  the config stored in it, rebuilds the run's tokenizer, and samples a continuation of ``prompt``."""
  run_dir = os.fspath(run_dir)
  ckpt_root = run_dir[:-len("/checkpoints")] if run_dir.rstrip("/").endswith("checkpoints") else run_dir
  if "://" not in run_dir and not os.path.isdir(os.path.join(ckpt_root or ".", "checkpoints")):
    what = "does not exist" if not os.path.exists(run_dir) else "has no checkpoints/ folder"
    raise CheckpointNotFoundError(f"{run_dir} {what}; give a training run's output_dir "
                                             "(train.output_dir) or its checkpoints/ folder")
  ckpt = checkpoint.Checkpointer(ckpt_root.rstrip("/") or ".", keep=0, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointNotFoundError(f"no finished checkpoint under {ckpt.directory}; train first "
                                             "(joyjax train --config ...) or pass the run's output_dir")
  cfg_dict = json_config(ckpt, step)
  cfg = from_dict(cfg_dict)
  params = checkpoint.load_params(ckpt.step_dir(step), model.abstract_params(cfg))
  ckpt.close()
  return sample_text(cfg, params, build_tokenizer(cfg), prompt, max_tokens=max_tokens, temperature=temperature,
                     seed=seed)


def json_config(ckpt, step: int) -> dict:
  path = ckpt.step_dir(step) / "config"
  files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith("_")] if path.exists() else []
  for f in files:
    try:
      return json.loads(f.read_text())
    except ValueError:
      continue
  raise CheckpointCorruptError(f"checkpoint {ckpt.step_dir(step)} holds no readable config (its config/ item is "
                               "missing or not JSON)")
