"""The training state: a plain dict pytree (orbax saves and restores it as is).

  step        int32 scalar: optimizer batches consumed (skipped non-finite ones included)
  params      the model params (``joyjax.model.init``), float32 master weights by default
  opt_state   the optax state of ``joyjax.optim.make_optimizer``
  nonfinite   int32 scalar: consecutive skipped (non-finite) steps, reset by a finite one
  skipped     int32 scalar: skipped steps in total

``init_params_from(cfg, path, abstract_params, key)`` reads ``train.init_from``'s params for ``cfg``, LoRA
included: a base checkpoint (e.g. from ``joyjax convert``) gets fresh adapters (``model.add_lora``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.errors import CheckpointMismatchError
from joyjax.train import checkpoint


def init_state(cfg, tx, key) -> dict:
  return state_from_params(cfg, tx, model.init(cfg, key))


def state_from_params(cfg, tx, params) -> dict:
  """A fresh state around given params (e.g. from ``train.init_from``)."""
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "nonfinite": jnp.zeros((), jnp.int32),
      "skipped": jnp.zeros((), jnp.int32),
  }


def abstract_state(cfg, tx) -> dict:
  """ShapeDtypeStructs of the state, nothing allocated."""
  return jax.eval_shape(lambda k: init_state(cfg, tx, k), jax.random.key(0))


def init_params_from(cfg, path, abstract_params, key: jax.Array) -> dict:
  """The starting params of a run with ``train.init_from = path``: ``abstract_params`` (``model.abstract_params``
  shapes, with shardings) read from ``path``. With LoRA on (``model.lora.rank`` > 0):

  * an adapter-free checkpoint (``joyjax convert``, a full training run): its weights become the frozen base
    (cast to ``model.lora.base_dtype``) and the adapters start fresh (A random from ``key``, B zero), so the
    first forward is the checkpoint's model;
  * a LoRA run's checkpoint (adapters included): its adapters are merged into the base weights (with this
    config's ``model.lora`` alpha and rank: those it was trained with) and fresh adapters added on top, so the
    run starts from the model that checkpoint computes (e.g. DPO after a LoRA SFT; the adapters-off reference,
    ``model.zero_adapters``, is then that SFT model).
  """
  if not model.lora_enabled(cfg):
    return checkpoint.load_params(path, abstract_params)
  try:
    base = checkpoint.load_params(path, model.without_adapters(cfg, abstract_params))
  except CheckpointMismatchError as not_base:
    try:
      base = model.merge_lora(cfg, checkpoint.load_params(path, abstract_params))
    except CheckpointMismatchError:
      raise not_base from None  # neither a base nor a LoRA checkpoint of this model: say what the base lacks
  shardings = [getattr(a, "sharding", None) for a in jax.tree.leaves(abstract_params)]
  add = jax.jit(lambda p, k: model.add_lora(cfg, p, k),
                out_shardings=(jax.tree.unflatten(jax.tree.structure(abstract_params), shardings)
                               if all(s is not None for s in shardings) else None))
  return add(base, key)
