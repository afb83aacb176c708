"""The pure training step: ``train_step(state, batch) -> (state, metrics)``.

One optimizer step over ``train.batch_size`` sequences in ``train.grad_accum`` micro-batches (a ``lax.scan``,
so memory is that of one micro-batch); each micro-batch's loss is normalised by the whole batch's token
counts (``losses.lm.denominators``), so k micro-batches give the large batch's gradient.

After the update, the aux-loss-free router biases move by ``train.router_bias_rate`` towards balance:
b_i += gamma * sign(mean_j c_j - c_i) per MoE layer (DeepSeek-V3, ``model.update_router_biases``), from the
step's per-expert token counts.
They are params the optimizer leaves alone (label 'frozen').

Quantization-aware training (``quant.format`` int4 / fp8): the loss sees ``quant.fake_quantize_params`` of the
float32 master weights, computed once per step; its straight-through gradient is the identity, so the gradient
w.r.t. the quantized weights is the one the optimizer applies to the masters (pretraining and SFT share this step).

A step whose loss or gradient norm is not finite changes nothing but ``step``, ``nonfinite`` (the run of
such steps) and ``skipped``; the loop stops when ``nonfinite`` reaches ``train.max_nonfinite``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from joyjax import model, optim, quant
from joyjax.batch import LM_KEYS
from joyjax.losses import lm


def _split_micro(batch, k: int):
  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} sequences does not split into train.grad_accum={k} micro-batches")
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])
  return jax.tree.map(one, batch)


def accumulate(grad_fn, batch, k: int):
  """((loss, stats), grads) of ``batch`` summed over ``k`` micro-batches in a ``lax.scan`` (memory of one):
  ``grad_fn(micro) -> ((loss, stats), grads)``, each micro-batch already normalised by the whole batch."""
  if k == 1:
    return grad_fn(batch)
  micros = _split_micro(batch, k)

  def body(acc, micro):
    (l, s), g = grad_fn(micro)
    return jax.tree.map(jnp.add, acc, (l, s, g)), None

  zeros = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], micros))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  (loss, stats, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]), micros)
  return (loss, stats), grads


def apply_gradients(cfg, tx: optax.GradientTransformation, state: dict, grads, loss, expert_counts):
  """(new state, finite, grad norm): the optimizer update, then the router-bias update from the step's
  ``expert_counts`` ({stack: [layers, E]}); a step whose loss or gradient norm is not finite changes nothing
  but ``step``, ``nonfinite`` and ``skipped``. Keys of ``state`` besides those (e.g. a DPO reference) pass
  through unchanged."""
  t = cfg.train
  params = state["params"]
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  if t.router_bias_rate > 0:
    new_params = model.update_router_biases(cfg, new_params, expert_counts, float(t.router_bias_rate))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  new_state = dict(state)
  new_state.update({
      "step": state["step"] + 1,
      "params": keep(new_params, params),
      "opt_state": keep(new_opt, state["opt_state"]),
      "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
      "skipped": state["skipped"] + (~finite).astype(jnp.int32),
  })
  return new_state, finite, grad_norm


def make_train_step(cfg, tx: optax.GradientTransformation, total_steps: int | None = None):
  """The step function for ``cfg`` and the optimizer ``tx`` (jit it with shardings and donation)."""
  t = cfg.train
  k = int(t.grad_accum)
  total = int(t.steps if total_steps is None else total_steps)
  quant.check(cfg)

  def loss_fn(params, micro, denom):
    return lm.lm_loss(cfg, params, micro, denom)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    batch = {key: batch[key] for key in LM_KEYS}
    denom = lm.denominators(cfg, batch)
    params = state["params"]
    seen = quant.fake_quantize_params(cfg, params, state["step"])  # params itself when quant.format is none
    (loss, stats), grads = accumulate(lambda micro: grad_fn(seen, micro, denom), batch, k)
    new_state, finite, grad_norm = apply_gradients(cfg, tx, state, grads, loss, stats["expert_counts"])
    tokens = stats["tokens"]
    metrics = {
        "loss": stats["ce_sum"] / jnp.maximum(tokens, 1.0),
        "total_loss": loss,
        "accuracy": stats["correct_sum"] / jnp.maximum(tokens, 1.0),
        "z_loss": stats["z_sum"] / jnp.maximum(tokens, 1.0),
        "balance_loss": stats["balance_sum"] / denom["sequences"],
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "loss_tokens": tokens,
        "dropped_tokens": stats["dropped_tokens"],
        "finite": finite,
        "nonfinite": new_state["nonfinite"],
        "skipped": new_state["skipped"],
        "expert_counts": stats["layer_counts"],
        **{f"lr/{name}": v for name, v in optim.learning_rates(cfg, state["step"], total).items()},
    }
    for d in range(denom["mtp_tokens"].shape[0]):
      metrics[f"mtp{d}_loss"] = stats[f"mtp{d}_ce_sum"] / denom["mtp_tokens"][d]
    return new_state, metrics

  return train_step
