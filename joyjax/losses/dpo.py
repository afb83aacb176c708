"""Preference-optimisation losses: sequence log-probs of packed pairs, and DPO / cDPO / IPO on them.

**Sequence log-probs, exact under packing.** A DPO batch (``joyjax.batch.DPO_KEYS``) holds several sequences per
row, told apart by ``sequence_ids`` (global index 1..N in the batch, 0 = padding); attention stays inside each
sequence (``segment_ids``) and positions restart per sequence, so a sequence's logits do not depend on what else
shares its row. ``sequence_logps`` sums log p(target) over each sequence's loss tokens (its response) with a
segment sum into N slots: the same numbers as one forward pass per sequence. The per-token log-probs are computed
in chunks of ``train.loss_chunk`` tokens (``losses.head.chunked_token_logps``: one chunk's [chunk, vocab] float32
logits at a time, forward and backward): a 129K vocabulary never materialises as
[batch, seq, vocab].

**Losses** (the definitions of Hugging Face TRL's ``DPOTrainer.dpo_loss``, trl/trainer/dpo_trainer.py). With
pi = the policy's and ref = the reference's sequence log-probs and h = (pi_c - pi_r) - (ref_c - ref_r):

* ``sigmoid`` (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta h)``; with ``label_smoothing`` = eps > 0 the
  conservative DPO of Mitchell (2023, "cDPO"), eq. 3: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* ``ipo`` (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``, where, as in TRL, every log-prob is first
  divided by its sequence's number of loss tokens (length-normalised: the mean log-prob per response token).

Rewards are ``beta * (pi - ref)`` per response (no gradient); metrics (TRL's names) are means over the real
pairs: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy`` (chosen reward > rejected,
strictly), ``rewards/margin`` (chosen - rejected reward), ``logps/chosen``, ``logps/rejected`` (the policy's
log-probs as they enter the loss: sums, or per-token means for ipo).

Normalisation is by a pair count passed in (``num_pairs``: the real pairs of the whole optimizer batch), so the
losses and metrics of micro-batches add up to the large batch's (gradient accumulation, as in ``losses.lm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax import model
from joyjax.config import DPO_LOSS_TYPES
from joyjax.batch import dpo_pairs_per_batch
from joyjax.losses.head import chunk_tokens, chunked_token_logps

DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
               "logps/chosen", "logps/rejected")


def num_sequences(cfg) -> int:
  """Sequence slots of a global DPO batch: two per pair slot (``joyjax.batch.dpo_pairs_per_batch``)."""
  return 2 * dpo_pairs_per_batch(cfg)


def per_sequence_sums(values, sequence_ids, n: int):
  """[b, s] per-token ``values`` -> float32 [n]: entry k - 1 is the sum over the tokens of sequence k (ids outside
  1..n, i.e. padding, are dropped)."""
  ids = sequence_ids.reshape(-1).astype(jnp.int32)
  return jax.ops.segment_sum(values.reshape(-1).astype(jnp.float32), ids, num_segments=n + 1)[1:]


def sequence_token_counts(cfg, batch):
  """Loss (response) tokens of each sequence, float32 [num_sequences(cfg)]."""
  live = (batch["loss_mask"] != 0) & (batch["sequence_ids"] > 0)
  return per_sequence_sums(live, batch["sequence_ids"], num_sequences(cfg))


def sequence_logps(cfg, params, batch, *, with_aux: bool = False):
  """Float32 [num_sequences(cfg)]: each sequence's summed log p(target) over its loss tokens (0 for an empty
  slot). ``with_aux``: also the model's aux statistics (``model.aux_summary`` reads them)."""
  hidden, _, aux, _ = model.forward_hidden(cfg, params, batch["inputs"], positions=batch["positions"],
                                           segment_ids=batch["segment_ids"], with_mtp=False)
  live = (batch["loss_mask"] != 0) & (batch["sequence_ids"] > 0)
  tok = chunked_token_logps(hidden, model.head_weights(cfg, params), batch["targets"], live,
                            chunk=chunk_tokens(cfg))
  logps = per_sequence_sums(tok, batch["sequence_ids"], num_sequences(cfg))
  return (logps, aux) if with_aux else logps


def split_pairs(per_sequence):
  """[2P] per-sequence values (sequence 2i + 1 chosen, 2i + 2 rejected) -> ([P] chosen, [P] rejected)."""
  return per_sequence[0::2], per_sequence[1::2]


def pair_mask_of(chosen_tokens, rejected_tokens):
  """Real pairs: both responses have loss tokens (pair slots left empty by the packer have none)."""
  return (chosen_tokens > 0) & (rejected_tokens > 0)


def dpo_pair_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                   loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
                   rejected_tokens=None) -> dict:
  """Per-pair arrays [P]: ``loss``, ``reward_chosen``, ``reward_rejected``, ``logp_chosen``, ``logp_rejected``
  (the policy's log-probs as they enter the loss). See the module docstring for the formulas."""
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo.loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
  pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen,
                                                          ref_rejected))
  if loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("ipo normalises log-probs by length: pass chosen_tokens and rejected_tokens")
    nc = jnp.maximum(jnp.asarray(chosen_tokens, jnp.float32), 1.0)
    nr = jnp.maximum(jnp.asarray(rejected_tokens, jnp.float32), 1.0)
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  h = (pc - pr) - (rc - rr)
  if loss_type == "ipo":
    loss = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    eps = label_smoothing
    loss = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  sg = jax.lax.stop_gradient
  return {"loss": loss, "reward_chosen": sg(beta * (pc - rc)), "reward_rejected": sg(beta * (pr - rr)),
          "logp_chosen": sg(pc), "logp_rejected": sg(pr)}


def dpo_pair_sums(terms: dict, pair_mask) -> dict:
  """Sums over the real pairs (``pair_mask``) of the per-pair terms, keyed as ``DPO_METRICS``, plus ``pairs``."""
  live = jnp.asarray(pair_mask, bool)
  total = lambda x: jnp.sum(jnp.where(live, x, 0.0))  # noqa: E731 - a masked pair's value never leaks
  rc, rr = terms["reward_chosen"], terms["reward_rejected"]
  return {"loss": total(terms["loss"]), "rewards/chosen": total(rc), "rewards/rejected": total(rr),
          "rewards/accuracy": total((rc > rr).astype(jnp.float32)), "rewards/margin": total(rc - rr),
          "logps/chosen": total(terms["logp_chosen"]), "logps/rejected": total(terms["logp_rejected"]),
          "pairs": jnp.sum(live.astype(jnp.float32))}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, pair_mask=None, num_pairs=None, chosen_tokens=None,
             rejected_tokens=None):
  """(loss, metrics) of pairs of sequence log-probs ([P] each; see the module docstring for the formulas).

  ``pair_mask`` [P]: the real pairs (None = all); ``num_pairs``: the denominator of the means (default: the
  real pairs here; pass the whole optimizer batch's count for micro-batches). ``chosen_tokens`` /
  ``rejected_tokens`` [P]: response lengths, needed by ``ipo``. ``metrics``: ``DPO_METRICS`` (means over the
  pairs) and ``pairs`` (the real pairs counted here).
  """
  terms = dpo_pair_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing, chosen_tokens=chosen_tokens,
                         rejected_tokens=rejected_tokens)
  if pair_mask is None:
    pair_mask = jnp.ones(terms["loss"].shape, bool)
  sums = dpo_pair_sums(terms, pair_mask)
  denom = jnp.maximum(sums["pairs"] if num_pairs is None else jnp.asarray(num_pairs, jnp.float32), 1.0)
  metrics = {k: sums[k] / denom for k in DPO_METRICS}
  metrics["pairs"] = sums["pairs"]
  return metrics["loss"], metrics
