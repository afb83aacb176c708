"""The training state: a plain dict pytree (orbax saves and restores it as is).

  step        int32 scalar: optimizer batches consumed (skipped non-finite ones included)
  params      the model params (``joyjax.model.init``), float32 master weights by default
  opt_state   the optax state of ``joyjax.optim.make_optimizer``
  nonfinite   int32 scalar: consecutive skipped (non-finite) steps, reset by a finite one
  skipped     int32 scalar: skipped steps in total
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model


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
