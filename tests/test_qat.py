"""Quantization-aware training on the tiny model: after a short QAT phase the INT4 model's held-out loss is closer
to the float model's than post-training quantization (PTQ) of the float model gets.

The task is a second-order Markov chain over 32 tokens (the next token is a fixed function of the previous two with
probability 0.9, uniform otherwise), so the decoder layers -- the quantized weights -- must carry what is learned
(the float embedding and head alone cannot). INT4 groups of 64 = the whole input dimension of most weights (the
test widens the LoRA ranks and expert width to 64), where rounding visibly costs the tiny model.

Same budget for both sides: float = N1 + N2 float steps; PTQ = INT4 of that model; QAT = the same N1 float steps,
then N2 steps whose loss sees the fake-quantized weights, from the same batches at the same learning rate.
Held-out loss comes from the harness's eval step (``train/eval.py``), which measures the quantized model when
``quant.format`` is set.

The unquantized reference is also measured as served in bfloat16 (weights and compute): its loss is within a
quarter of PTQ's gap of float32's, and QAT's gap is the smaller one from it too.

Run: ``python -m pytest tests/test_qat.py -m slow -s`` (prints the losses).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model, optim
from joyjax.train import state as state_lib
from joyjax.train.eval import lm_eval_metrics, make_lm_eval_step
from joyjax.train.step import make_train_step

V, SEQ, BATCH = 32, 64, 8
N1, N2 = 150, 40          # float pretraining steps; then float or QAT steps
LR1, LR2 = 0.05, 0.001    # the late phase (float or QAT) at a low rate, as QAT is run in practice
GROUP = 64

COMMON = {"model.vocab_size": V, "data.tokenizer_vocab_size": V, "model.mtp.num_layers": 0,
          "model.moe.intermediate_size": GROUP, "model.attention.q_lora_rank": GROUP,
          "model.attention.kv_lora_rank": GROUP, "train.router_bias_rate": 0.0, "optim.name": "muon",
          "optim.warmup_steps": 0, "optim.schedule": "constant"}


def _batches(n, seed, table):
  r = np.random.default_rng(seed)
  t = np.zeros((n, SEQ + 1), np.int64)
  t[:, :2] = r.integers(0, V, (n, 2))
  for i in range(2, SEQ + 1):
    t[:, i] = np.where(r.random(n) < 0.9, table[t[:, i - 2], t[:, i - 1]], r.integers(0, V, n))
  t = t.astype(np.int32)
  return {"inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": np.ones((n, SEQ), np.int32),
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (n, 1)), "loss_mask": np.ones((n, SEQ), np.float32)}


def _cfg(lr, **quant):
  return tiny_config(COMMON, {"optim.lr": lr, "optim.adam_lr": lr}, {f"quant.{k}": v for k, v in quant.items()})


def _train(cfg, params, steps, first_batch, table):
  tx = optim.make_optimizer(cfg, params, steps)
  state = state_lib.state_from_params(cfg, tx, params)
  step = jax.jit(make_train_step(cfg, tx, steps))
  for i in range(steps):
    state, _ = step(state, _batches(BATCH, first_batch + i, table))
  return state["params"]


@pytest.mark.slow
def test_qat_closes_more_of_the_int4_gap_than_ptq():
  table = np.random.default_rng(0).integers(0, V, (V, V))
  float1, float2 = _cfg(LR1), _cfg(LR2)
  qat = _cfg(LR2, format="int4", group_size=GROUP)
  params = jax.jit(lambda k: model.init(float1, k))(jax.random.key(0))
  warm = _train(float1, params, N1, 0, table)
  float_params = _train(float2, warm, N2, N1, table)
  qat_params = _train(qat, warm, N2, N1, table)

  heldout = _batches(64, 10 ** 6, table)
  float_eval, int4_eval = jax.jit(make_lm_eval_step(float2)), jax.jit(make_lm_eval_step(qat))

  def loss(step, params):
    return lm_eval_metrics(jax.device_get(step({"params": params}, heldout)))["loss"]

  f, ptq, q = loss(float_eval, float_params), loss(int4_eval, float_params), loss(int4_eval, qat_params)
  qat_float = loss(float_eval, qat_params)
  # The float model served in bfloat16 (weights and compute), the usual unquantized release.
  bf16_cfg = tiny_config(COMMON, {"model.dtype": "bfloat16"})
  bf16 = loss(jax.jit(make_lm_eval_step(bf16_cfg)), jax.tree.map(lambda x: x.astype(jnp.bfloat16), float_params))
  print(f"\nafter {N1} float steps: float {loss(float_eval, warm):.4f}, PTQ int4 {loss(int4_eval, warm):.4f}")
  print(f"after {N2} more: held-out loss float32 {f:.4f} | bf16 {bf16:.4f} | PTQ int4 {ptq:.4f} (gap {ptq - f:+.4f}) "
        f"| QAT int4 {q:.4f} (gap {q - f:+.4f}) | QAT weights unquantized {qat_float:.4f}")
  assert ptq - f > 0.01, "PTQ should visibly hurt in this setting, or the comparison says nothing"
  assert q - f < ptq - f
  # the QAT model itself lost less to quantization than the float model did
  assert q - qat_float < ptq - f
  # bf16 costs a fraction of what INT4 does, and measured from bf16 too QAT's INT4 gap is the smaller one
  assert abs(bf16 - f) < 0.25 * (ptq - f), (bf16, f, ptq)
  assert q - bf16 < ptq - bf16
