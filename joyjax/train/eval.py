"""The pretraining evaluation: the language-model loss of held-out batches, for the harness's ``Evaluator``.

``make_lm_eval_step(cfg)`` is ``eval_step(state, batch) -> sums`` (jit it): the next-token cross-entropy of the
main head summed over the batch's loss tokens, the correct top-1 predictions and the token count (MTP, z-loss and
balance terms are training losses, not measured here). With ``quant.format`` set, it measures the quantized model
(what will be served; before ``quant.start_step`` that is post-training quantization of the float weights).
``lm_eval_metrics(sums)`` turns the sums over all eval batches into the token-weighted means: ``loss``,
``perplexity`` (exp of the loss), ``accuracy`` and ``tokens``.
"""

from __future__ import annotations

import copy
import math

from joyjax import quant
from joyjax.batch import LM_KEYS
from joyjax.losses import lm


def make_lm_eval_step(cfg):
  """``eval_step(state, batch) -> {'ce_sum', 'correct_sum', 'tokens'}`` (float32 scalars) for ``cfg``."""
  cfg = copy.deepcopy(cfg)
  cfg.train.mtp_loss_weight = 0.0  # the main head only: no MTP forward
  quant.check(cfg)

  def eval_step(state, batch):
    batch = {k: batch[k] for k in LM_KEYS}
    params = quant.fake_quantize_params(cfg, state["params"])  # the float params when quant.format is none
    _, stats = lm.lm_loss(cfg, params, batch, lm.denominators(cfg, batch))
    return {"ce_sum": stats["ce_sum"], "correct_sum": stats["correct_sum"], "tokens": stats["tokens"]}

  return eval_step


def lm_eval_metrics(sums: dict) -> dict[str, float]:
  """Token-weighted means over the eval batches from the summed ``eval_step`` outputs."""
  tokens = float(sums["tokens"])
  loss = float(sums["ce_sum"]) / max(tokens, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "accuracy": float(sums["correct_sum"]) / max(tokens, 1.0), "tokens": tokens}
