"""Direct preference optimisation on the shared loop: the state, the step, the eval step, the reference pass.

**Step** (``make_dpo_step``): one optimizer step over a packed DPO batch (``joyjax.batch.DPO_KEYS``, from
``joyjax.data.dpo``). Chosen and rejected responses are rows of the same batch, so ONE forward pass of the policy
gives every sequence's log-prob (``losses.dpo.sequence_logps``, exact under packing); the reference log-probs
come from the state's frozen copy (no gradient) or from the batch; ``losses.dpo.dpo_loss`` (``dpo.loss_type``,
``dpo.beta``, ``dpo.label_smoothing``) averages over the batch's real pairs. ``train.grad_accum`` micro-batches
split the rows (a ``lax.scan``): a pair never straddles two micro-batches (both its sequences sit in one row),
and every micro-batch is normalised by the whole batch's pair count, so k micro-batches give the large batch's
gradient. As pretraining's step (``train/step.py``): a step whose loss or gradient norm is not finite changes
nothing but ``step``, ``nonfinite`` and ``skipped``; after the update the router biases move towards balance
(``model.update_router_biases``, ``train.router_bias_rate``) from the policy's per-expert token counts.

**Reference** (``dpo.reference``):

* ``frozen``: the state carries ``ref_params``, a copy of the starting params that no gradient or optimizer
  touches (``dpo_state_from_params``; the optimizer state covers ``params`` only). It costs a second copy of
  the weights and a second forward (no backward) per step. With LoRA (``model.lora.rank`` > 0) there is no
  copy: the reference is the policy with its adapters off (``model.zero_adapters``: the frozen base), with the
  router biases it started from (the state keeps those, ``ref_router_biases``, since the step moves them).
* ``precomputed``: a first pass over the data (``joyjax.data.dpo`` with ``one_pass=True``) computes every pair's
  reference log-probs once (``precompute_reference`` -> {source row: (chosen, rejected)}, saved with
  ``save_reference``); the training pipeline then carries them in the batch (``DPO_REF_KEY``) and the state has
  no reference copy.

**Eval** (``make_dpo_eval_step`` / ``dpo_eval_metrics``, the harness's ``Evaluator``): sums over held-out pairs
of the loss, the rewards, the preference accuracy (chosen reward > rejected) and the margin, and the pair count;
summarised as means per pair (``eval/rewards/accuracy``, ``eval/rewards/margin``, ...).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from joyjax import model, optim
from joyjax.batch import DPO_KEYS, DPO_REF_KEY
from joyjax.data.dpo import make_dpo_eval_dataset, make_dpo_iterator
from joyjax.errors import ConfigError
from joyjax.losses import dpo as dpo_losses
from joyjax.train import state as state_lib
from joyjax.train.harness import agree
from joyjax.train.step import accumulate, apply_gradients
from joyjax.tree import path_str



def dpo_batch_keys(cfg) -> tuple[str, ...]:
  """The keys the DPO step reads: ``DPO_KEYS``, plus ``DPO_REF_KEY`` with precomputed reference log-probs."""
  return DPO_KEYS + ((DPO_REF_KEY,) if cfg.dpo.reference == "precomputed" else ())


# ------------------------------------------------------------------------------------------- state


def _router_bias_paths(cfg) -> set[str]:
  info = jax.tree_util.tree_flatten_with_path(model.param_info(cfg), is_leaf=model.is_info)[0]
  return {path_str(p) for p, i in info if i.frozen}


def dpo_state_from_params(cfg, tx, params) -> dict:
  """``state.state_from_params`` plus, with ``dpo.reference = "frozen"``, the reference: ``ref_params``, a copy
  of ``params`` (its own buffers, so donating the state never donates one buffer twice); with LoRA only
  ``ref_router_biases`` ({param path: starting router bias}), the rest being the policy's frozen base."""
  state = state_lib.state_from_params(cfg, tx, params)
  if cfg.dpo.reference == "frozen":
    state.update(frozen_reference(cfg, params))
  return state


def frozen_reference(cfg, params) -> dict:
  """The state entries of a frozen reference of ``params`` (DPO's, RL's KL penalty): ``ref_params``, a copy (its
  own buffers, so donating the state never donates one buffer twice); with LoRA only ``ref_router_biases``
  ({param path: starting router bias}), the rest being the policy's frozen base. ``reference_params`` reads them."""
  if model.lora_enabled(cfg):
    keep = _router_bias_paths(cfg)
    return {"ref_router_biases": {path_str(p): jnp.copy(x) for p, x in
                                  jax.tree_util.tree_flatten_with_path(params)[0] if path_str(p) in keep}}
  return {"ref_params": jax.tree.map(jnp.copy, params)}


def reference_params(cfg, state) -> dict:
  """The frozen reference's params: ``state['ref_params']``, or (LoRA) the policy's with its adapters off and
  its starting router biases."""
  if "ref_params" in state:
    return state["ref_params"]
  saved = state["ref_router_biases"]
  return jax.tree_util.tree_map_with_path(lambda p, x: saved.get(path_str(p), x),
                                          model.zero_adapters(cfg, state["params"]))


# ------------------------------------------------------------------------------------------- log-probs


def reference_logps(cfg, state, batch):
  """The reference's per-sequence log-probs [num_sequences], without gradient: from the batch
  (precomputed) or a forward pass of ``reference_params`` (frozen)."""
  if cfg.dpo.reference == "precomputed":
    return dpo_losses.per_sequence_sums(batch[DPO_REF_KEY], batch["sequence_ids"], dpo_losses.num_sequences(cfg))
  ref = jax.lax.stop_gradient(reference_params(cfg, state))
  return jax.lax.stop_gradient(dpo_losses.sequence_logps(cfg, ref, batch))


def _pair_arrays(cfg, batch):
  """(chosen tokens, rejected tokens, real-pair mask) of ``batch``, [P] each."""
  c, r = dpo_losses.split_pairs(dpo_losses.sequence_token_counts(cfg, batch))
  return c, r, dpo_losses.pair_mask_of(c, r)


def _loss_kwargs(cfg) -> dict:
  p = cfg.dpo
  return {"beta": float(p.beta), "loss_type": p.loss_type, "label_smoothing": float(p.label_smoothing)}


# ------------------------------------------------------------------------------------------- step


def make_dpo_step(cfg, tx: optax.GradientTransformation, total_steps: int | None = None):
  """``step(state, batch) -> (state, metrics)`` for ``cfg`` and the optimizer ``tx`` (jit it with shardings and
  donation). Metrics: ``losses.dpo.DPO_METRICS`` (means over the batch's real pairs), ``pairs``, ``loss_tokens``
  (response tokens), ``grad_norm``, ``param_norm``, ``finite`` / ``nonfinite`` / ``skipped``, ``dropped_tokens``,
  ``expert_counts`` and the learning rates ``lr/...``."""
  t = cfg.train
  k = int(t.grad_accum)
  total = int(t.steps if total_steps is None else total_steps)
  keys = dpo_batch_keys(cfg)
  kw = _loss_kwargs(cfg)
  sft_weight = float(cfg.dpo.sft_weight)

  def loss_fn(params, micro, ref, num_pairs):
    logps, aux = dpo_losses.sequence_logps(cfg, params, micro, with_aux=True)
    c_tok, r_tok, live = _pair_arrays(cfg, micro)
    pc, pr = dpo_losses.split_pairs(logps)
    rc, rr = dpo_losses.split_pairs(ref)
    loss, metrics = dpo_losses.dpo_loss(pc, pr, rc, rr, pair_mask=live, num_pairs=num_pairs, chosen_tokens=c_tok,
                                        rejected_tokens=r_tok, **kw)
    # RPO: the chosen responses' per-token NLL, a mean over the batch's pairs like the DPO terms.
    nll = jnp.sum(jnp.where(live, -pc / jnp.maximum(c_tok, 1.0), 0.0)) / num_pairs
    if sft_weight > 0:
      loss = loss + sft_weight * nll
    moe = model.aux_summary(aux)
    stats = {**metrics, "chosen_nll": nll, "loss_tokens": jnp.sum(c_tok) + jnp.sum(r_tok), "dropped_tokens": moe["dropped_tokens"],
             "expert_counts": moe["expert_counts"], "layer_counts": moe["layer_counts"]}
    return loss, stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def dpo_step(state, batch):
    batch = {key: batch[key] for key in keys}
    num_pairs = jnp.maximum(jnp.sum(_pair_arrays(cfg, batch)[2].astype(jnp.float32)), 1.0)
    params = state["params"]

    def micro_grads(micro):
      return grad_fn(params, micro, reference_logps(cfg, state, micro), num_pairs)

    (loss, stats), grads = accumulate(micro_grads, batch, k)
    new_state, finite, grad_norm = apply_gradients(cfg, tx, state, grads, loss, stats["expert_counts"])
    metrics = {name: stats[name] for name in dpo_losses.DPO_METRICS}
    metrics.update({
        "pairs": stats["pairs"],
        "chosen_nll": stats["chosen_nll"],
        "total_loss": loss,
        "loss_tokens": stats["loss_tokens"],
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "dropped_tokens": stats["dropped_tokens"],
        "finite": finite,
        "nonfinite": new_state["nonfinite"],
        "skipped": new_state["skipped"],
        "expert_counts": stats["layer_counts"],
        **{f"lr/{name}": v for name, v in optim.learning_rates(cfg, state["step"], total).items()},
    })
    return new_state, metrics

  return dpo_step


# ------------------------------------------------------------------------------------------- eval


def make_dpo_eval_step(cfg):
  """``eval_step(state, batch) -> sums`` over the batch's real pairs: ``pairs`` and the sums of
  ``losses.dpo.DPO_METRICS`` (``rewards/accuracy``: pairs whose chosen reward beats the rejected one)."""
  keys = dpo_batch_keys(cfg)
  kw = _loss_kwargs(cfg)

  def eval_step(state, batch):
    batch = {key: batch[key] for key in keys}
    c_tok, r_tok, live = _pair_arrays(cfg, batch)
    pc, pr = dpo_losses.split_pairs(dpo_losses.sequence_logps(cfg, state["params"], batch))
    rc, rr = dpo_losses.split_pairs(reference_logps(cfg, state, batch))
    terms = dpo_losses.dpo_pair_terms(pc, pr, rc, rr, chosen_tokens=c_tok, rejected_tokens=r_tok, **kw)
    return dpo_losses.dpo_pair_sums(terms, live)

  return eval_step


def dpo_eval_metrics(sums: dict) -> dict[str, float]:
  """Means per held-out pair from the summed ``eval_step`` outputs, and ``pairs``."""
  n = float(sums["pairs"])
  out = {k: float(sums[k]) / max(n, 1.0) for k in dpo_losses.DPO_METRICS}
  out["pairs"] = n
  return out


def make_dpo_eval(cfg):
  """(eval_step, summarize) for the loop's ``Objective.make_eval``."""
  return make_dpo_eval_step(cfg), dpo_eval_metrics


# ------------------------------------------------------------------------------------------- reference pass


def precompute_reference(cfg, params, batches, *, logps_fn=None) -> dict[int, tuple[float, float]]:
  """{source row of the pair: (chosen, rejected) reference log-probs} of every pair in ``batches`` (this
  process's batches of a ``one_pass`` DPO iterator, numpy). ``params``: the reference (the starting params).

  ``logps_fn(params, batch) -> [num_sequences]``: defaults to a jitted ``losses.dpo.sequence_logps`` on this
  process's devices; with several processes pass one that makes the global batch and returns the global
  (replicated) vector: sequence ids are global, so each process reads its own pairs out of it.
  """
  fn = logps_fn if logps_fn is not None else jax.jit(lambda p, b: dpo_losses.sequence_logps(cfg, p, b))
  out: dict[int, tuple[float, float]] = {}
  for batch in batches:
    lp = np.asarray(jax.device_get(fn(params, {key: batch[key] for key in DPO_KEYS})), np.float64)
    seq, pair = np.asarray(batch["sequence_ids"]).reshape(-1), np.asarray(batch["pair_index"]).reshape(-1)
    ids, first = np.unique(seq, return_index=True)
    found: dict[int, list] = {}
    for sid, at in zip(ids, first):
      if sid > 0:
        found.setdefault(int(pair[at]), [None, None])[(int(sid) - 1) % 2] = float(lp[int(sid) - 1])
    for index, (c, r) in found.items():
      out[index] = (c, r)
  return out


def reference_pass(cfg, tokenizer, params, *, process_index: int = 0, process_count: int = 1,
                   evaluate: bool = False, logps_fn=None):
  """(train reference, eval reference or None): ``precompute_reference`` over one pass of this process's
  training pairs (and held-out pairs with ``evaluate``). Processes that run out of pairs first feed empty
  batches until every process is done (``harness.agree``), so a global ``logps_fn`` sees the same number of
  calls everywhere."""

  def one(batches):
    it = iter(batches)

    def lockstep():
      blank = None
      while True:
        local = next(it, None)
        if not agree(local is not None):
          return
        if local is None:
          local = blank
        else:
          blank = {k: np.full_like(v, -1 if k == "pair_index" else 0) for k, v in local.items()}
        yield local

    return precompute_reference(cfg, params, lockstep(), logps_fn=logps_fn)

  kw = dict(process_index=process_index, process_count=process_count)
  train_ref = one(make_dpo_iterator(cfg, tokenizer, one_pass=True, **kw))
  eval_ds = make_dpo_eval_dataset(cfg, tokenizer, one_pass=True, **kw) if evaluate else None
  return train_ref, (one(eval_ds) if eval_ds is not None else None)


def open_dpo_data(cfg, tokenizer, process_index: int, process_count: int, evaluate: bool, *, reference=None,
                  eval_reference=None):
  """(training iterator, eval dataset or None) of this process, for the loop's ``Objective.open_data``. With
  ``dpo.reference = "precomputed"`` pass ``reference_pass``'s results (``eval_reference`` when evaluating)."""
  if cfg.dpo.reference == "precomputed" and (reference is None or (evaluate and eval_reference is None)):
    raise ConfigError("config key 'dpo.reference': 'precomputed' needs the reference log-probs of every pair "
                      "before training (train.dpo.reference_pass, with the starting params)")
  data = make_dpo_iterator(cfg, tokenizer, process_index=process_index, process_count=process_count,
                           reference=reference)
  eval_data = make_dpo_eval_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count,
                                    source=data.source, reference=eval_reference) if evaluate else None
  return data, eval_data


def save_reference(path: str, reference: dict[int, tuple[float, float]]) -> None:
  """Writes ``precompute_reference``'s result as .npz (arrays ``index``, ``chosen``, ``rejected``), atomically."""
  index = np.asarray(sorted(reference), np.int64)
  vals = np.asarray([reference[int(i)] for i in index], np.float64).reshape(-1, 2)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, index=index, chosen=vals[:, 0], rejected=vals[:, 1])
  os.replace(tmp, path)


def load_reference(path: str) -> dict[int, tuple[float, float]]:
  """The reference log-probs ``save_reference`` wrote."""
  with np.load(path) as f:
    return {int(i): (float(c), float(r)) for i, c, r in zip(f["index"], f["chosen"], f["rejected"])}


REFERENCE_FILES = ("dpo_reference.npz", "dpo_reference_eval.npz")  # in train.output_dir: training, held-out pairs


def prepared_reference(cfg, tokenizer, evaluate: bool, process_index: int = 0, process_count: int = 1):
  """(train reference, eval reference or None) for ``dpo.reference = "precomputed"``: read from
  ``train.output_dir`` when an earlier start of this run computed them (so a resumed run reuses them), else
  computed now in one pass with the starting params (``train.init_from``, or the run's seeded init) and saved
  there before training starts."""
  if process_count > 1:
    raise ConfigError("config key 'dpo.reference': 'precomputed' runs its reference pass on one process; with "
                      f"{process_count} processes use dpo.reference=frozen")
  paths = [os.path.join(cfg.train.output_dir, f) for f in REFERENCE_FILES]
  wanted = paths if evaluate else paths[:1]
  if all(os.path.exists(p) for p in wanted):
    refs = [load_reference(p) for p in wanted]
    return refs[0], (refs[1] if evaluate else None)
  abstract = model.abstract_params(cfg)
  key = jax.random.key(cfg.train.seed)  # the same starting params as the run's state
  params = (state_lib.init_params_from(cfg, cfg.train.init_from, abstract, key) if cfg.train.init_from
            else jax.jit(lambda k: model.init(cfg, k))(key))
  train_ref, eval_ref = reference_pass(cfg, tokenizer, params, process_index=process_index,
                                       process_count=process_count, evaluate=evaluate)
  os.makedirs(cfg.train.output_dir, exist_ok=True)
  save_reference(paths[0], train_ref)
  if eval_ref is not None:
    save_reference(paths[1], eval_ref)
  return train_ref, eval_ref


def open_dpo_objective_data(cfg, tokenizer, process_index: int, process_count: int, evaluate: bool):
  """The loop's ``Objective.open_data`` for DPO: the reference log-probs first when they are precomputed."""
  ref = eval_ref = None
  if cfg.dpo.reference == "precomputed":
    ref, eval_ref = prepared_reference(cfg, tokenizer, evaluate, process_index, process_count)
  return open_dpo_data(cfg, tokenizer, process_index, process_count, evaluate, reference=ref,
                       eval_reference=eval_ref)
