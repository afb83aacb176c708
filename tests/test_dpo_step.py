"""train/dpo.py on the tiny model (float32) with real packed preference batches (data/dpo.py, chat tokenizer).

* The first step with policy == reference: loss log 2 (sigmoid), every reward and the margin 0, accuracy 0;
  then steps on a fixed batch lower the loss and raise accuracy and margin, the reference copy never moves
  and the router biases do.
* The router biases move by the step's expert counts (DeepSeek-V3's sign rule).
* A non-finite loss skips the update (params, optimizer state and reference unchanged; counters advance).
* Precomputed reference log-probs (``precompute_reference`` over a one-pass iterator, saved and loaded) carried
  in the batch, in 2 micro-batches (gradient accumulation), give the frozen reference's 1-batch step: loss,
  metrics and update.
* The eval step's sums equal the step's metrics times the pair count; ``dpo_eval_metrics`` divides them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpo_data
from chat_data import chat_tokenizer
from conftest import tiny_config
from joyjax import model, optim
from joyjax.batch import DPO_KEYS, DPO_REF_KEY
from joyjax.data import dpo as dpo_data_lib
from joyjax.errors import ConfigError
from joyjax.losses import dpo as dpo_losses
from joyjax.train import dpo

TOK = chat_tokenizer()
OVER = {"data.seq_len": 96, "train.batch_size": 4, "dpo.pairs_per_batch": 6, "data.eval_fraction": 0.0,
        "train.eval_every": 0, "data.shuffle": False, "optim.name": "adamw", "optim.lr": 3e-3,
        "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.grad_clip": 0.0, "train.steps": 10,
        "model.num_layers": 2, "model.mtp.num_layers": 0}   # a dense and a MoE block: every kind, less to compile


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = dpo_data.write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl",
                              dpo_data.preference_rows(24, style="mixed", thinking=(None, False)))
  cfg = tiny_config({**OVER, "data.path": path})
  params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0))
  tx = optim.make_optimizer(cfg, params)
  batch = next(dpo_data_lib.make_dpo_iterator(cfg, TOK))
  step = jax.jit(dpo.make_dpo_step(cfg, tx))
  return cfg, params, tx, batch, step


@pytest.fixture(scope="module")
def logps(setup):
  """Jitted sequence log-probs of a batch under given params (one compile for the whole file)."""
  cfg = setup[0]
  fn = jax.jit(lambda p, b: dpo_losses.sequence_logps(cfg, p, b))
  return lambda p, b: np.asarray(fn(p, {k: jnp.asarray(b[k]) for k in DPO_KEYS}))


def _frozen_state(cfg, tx, params):
  return dpo.dpo_state_from_params(cfg, tx, params)


def test_first_step_is_log2_then_the_loss_falls(setup, logps):
  cfg, params, tx, batch, step = setup
  state = _frozen_state(cfg, tx, params)
  assert set(state) == {"step", "params", "opt_state", "nonfinite", "skipped", "ref_params"}
  ref_before = jax.tree.map(np.asarray, state["ref_params"])
  state, m = step(state, batch)
  pairs = int(m["pairs"])
  assert pairs == len(np.unique(batch["sequence_ids"])[1:]) // 2 >= 3
  np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
    assert abs(float(m[k])) < 1e-6, k
  assert float(m["rewards/accuracy"]) == 0.0
  assert bool(m["finite"]) and int(m["skipped"]) == 0
  # logps/chosen is the mean over pairs of each chosen response's summed log-prob: recompute it.
  lp = logps(params, batch)
  np.testing.assert_allclose(float(m["logps/chosen"]), lp[0:2 * pairs:2].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["logps/rejected"]), lp[1:2 * pairs:2].mean(), rtol=1e-5)
  losses = [float(m["loss"])]
  for _ in range(5):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses
  assert float(m["rewards/accuracy"]) >= 0.5 and float(m["rewards/margin"]) > 0
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(ref_before),
                                                              jax.tree.leaves(state["ref_params"])))


def _router_biases(cfg, params):
  """{path: value} of the decoder's router biases (the params the trainer, not the optimizer, moves)."""
  info = dict(jax.tree_util.tree_flatten_with_path(model.param_info(cfg), is_leaf=model.is_info)[0])
  return {path: np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if info[path].frozen and path[0].key == "moe_layers"}


def test_router_biases_move_by_the_policy_counts(setup):
  """After the step each decoder router bias is b + rate * sign(mean(c) - c) with the step's expert counts."""
  cfg, params, tx, batch, step = setup
  new, m = step(_frozen_state(cfg, tx, params), batch)
  before, after = _router_biases(cfg, params), _router_biases(cfg, new["params"])
  assert before
  counts = np.asarray(m["expert_counts"])
  assert counts.sum() > 0
  for path, b in before.items():
    want = model.update_router_bias(jnp.asarray(b), jnp.asarray(counts), cfg.train.router_bias_rate)
    np.testing.assert_array_equal(after[path], np.asarray(want))
    assert not np.array_equal(after[path], b)


def test_non_finite_step_changes_nothing(setup):
  cfg, params, tx, batch, step = setup
  state = _frozen_state(cfg, tx, params)
  leaf = ("lm_head", "kernel")
  state["ref_params"][leaf[0]][leaf[1]] = state["ref_params"][leaf[0]][leaf[1]].at[0, 0].set(jnp.nan)
  new, m = step(state, batch)
  assert not bool(m["finite"]) and int(m["nonfinite"]) == 1 and int(m["skipped"]) == 1 and int(new["step"]) == 1
  for a, b in zip(jax.tree.leaves((state["params"], state["opt_state"])),
                  jax.tree.leaves((new["params"], new["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_precomputed_reference_in_two_micro_batches_gives_the_frozen_one_batch_step(setup, logps, tmp_path):
  """Reference log-probs precomputed in a one-pass run (saved, loaded) and carried in the batch, with
  train.grad_accum=2, give the frozen-reference single-batch step's loss, metrics and update."""
  cfg, params, tx, batch, step = setup
  pcfg = tiny_config({**OVER, "data.path": cfg.data.path, "dpo.reference": "precomputed", "train.grad_accum": 2})
  ref, eval_ref = dpo.reference_pass(pcfg, TOK, params, logps_fn=logps)
  assert sorted(ref) == list(range(24)) and eval_ref is None
  dpo.save_reference(str(tmp_path / "ref.npz"), ref)
  loaded = dpo.load_reference(str(tmp_path / "ref.npz"))
  assert loaded == ref
  with pytest.raises(ConfigError, match="precomputed"):
    dpo.open_dpo_data(pcfg, TOK, 0, 1, False)
  pbatch = next(dpo.open_dpo_data(pcfg, TOK, 0, 1, False, reference=loaded)[0])
  np.testing.assert_array_equal(pbatch["sequence_ids"], batch["sequence_ids"])
  # The reference in the batch is each sequence's log-prob under the starting params.
  lp = logps(params, batch)
  carried = np.asarray(dpo_losses.per_sequence_sums(jnp.asarray(pbatch[DPO_REF_KEY]),
                                                    jnp.asarray(pbatch["sequence_ids"]), lp.shape[0]))
  np.testing.assert_allclose(carried, lp, rtol=1e-6, atol=1e-5)
  state = dpo.dpo_state_from_params(pcfg, tx, params)
  assert "ref_params" not in state
  s1, m1 = step(_frozen_state(cfg, tx, params), batch)
  s2, m2 = jax.jit(dpo.make_dpo_step(pcfg, tx))(state, pbatch)
  for k in (*dpo_losses.DPO_METRICS, "pairs", "loss_tokens", "grad_norm"):
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  # Adam's first update is about lr * sign(g): compare within 1% of lr (tiny gradients' signs may differ).
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.01 * cfg.optim.lr)


def test_eval_sums_match_the_step(setup):
  cfg, params, tx, batch, step = setup
  state = _frozen_state(cfg, tx, params)
  eval_step, summarize = dpo.make_dpo_eval(cfg)
  eval_step = jax.jit(eval_step)
  state, _ = step(state, batch)
  state, _ = step(state, batch)
  sums = jax.device_get(eval_step(state, batch))
  _, m = step(state, batch)   # the metrics of the state evaluated (before its update)
  n = float(m["pairs"])
  assert float(sums["pairs"]) == n
  got = summarize({k: float(v) for k, v in sums.items()})
  for k in dpo_losses.DPO_METRICS:
    np.testing.assert_allclose(got[k], float(m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  assert got["rewards/accuracy"] * n == pytest.approx(round(got["rewards/accuracy"] * n))


@pytest.mark.parametrize("key,value,match", [("dpo.beta", 0.0, "dpo.beta"), ("dpo.loss_type", "hinge", "loss_type"),
                                             ("dpo.reference", "lora", "dpo.reference"),
                                             ("dpo.label_smoothing", 0.5, "label_smoothing")])
def test_bad_dpo_keys(key, value, match):
  with pytest.raises(ConfigError, match=match):  # when the config loads (config.validate)
    tiny_config({key: value})
  with pytest.raises(ConfigError, match="sigmoid"):
    tiny_config({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1})


def test_lora_reference_is_the_base_with_the_starting_router_biases(setup, tmp_path):
  """With LoRA the state holds no copy of the weights: the reference is the policy with its adapters off and the
  router biases it started from, so moving the adapters and the biases leaves the reference log-probs as they
  were (and changes the policy's)."""
  cfg, _, _, batch, _ = setup
  lcfg = tiny_config({**OVER, "data.path": cfg.data.path, "model.lora.rank": 4, "model.lora.base_dtype": "float32"})
  params = jax.jit(lambda k: model.init(lcfg, k))(jax.random.key(1))
  state = dpo.dpo_state_from_params(lcfg, optax.identity(), params)
  assert "ref_params" not in state and len(state["ref_router_biases"]) >= 1
  info = model.param_info(lcfg)
  moved = jax.tree.map(lambda x, i: x + 0.05 if (i.adapter == "b" or i.frozen) else x, params, info)
  state = dict(state, params=moved)
  fn = jax.jit(lambda p, b: dpo_losses.sequence_logps(lcfg, p, b))
  b = {k: jnp.asarray(batch[k]) for k in DPO_KEYS}
  ref = np.asarray(fn(dpo.reference_params(lcfg, state), b))
  np.testing.assert_allclose(ref, np.asarray(fn(params, b)), rtol=1e-6, atol=1e-5)
  assert np.max(np.abs(np.asarray(fn(moved, b)) - ref)) > 1e-2


def test_sft_weight_adds_the_chosen_per_token_nll(setup, logps):
  """RPO (dpo.sft_weight): total loss = DPO loss + w * mean over pairs of -log p(chosen) / chosen tokens."""
  cfg, params, tx, batch, _ = setup
  w = 0.5
  cfg_w = tiny_config({**OVER, "data.path": cfg.data.path, "dpo.sft_weight": w})
  state, m = jax.jit(dpo.make_dpo_step(cfg_w, tx))(_frozen_state(cfg_w, tx, params), batch)
  pairs = int(m["pairs"])
  lp = logps(params, batch)
  counts = np.asarray(dpo_losses.sequence_token_counts(cfg, {k: jnp.asarray(batch[k]) for k in DPO_KEYS}))
  want_nll = np.mean(-lp[0:2 * pairs:2] / counts[0:2 * pairs:2])
  np.testing.assert_allclose(float(m["chosen_nll"]), want_nll, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)  # the DPO part, unchanged
  np.testing.assert_allclose(float(m["total_loss"]), math.log(2) + w * want_nll, rtol=1e-5)
