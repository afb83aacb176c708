"""The RL update and the RL loop on CPU: a rollout batch's minibatch updates (the first minibatch's importance
ratio exactly 1, the step counting rollout batches, the KL reference), and `joyjax rl` through the shared loop:
metrics in the log, held-out evaluation, and a stopped run resuming to the same rewards and losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chat_data import chat_tokenizer
from conftest import tiny_config
from joyjax import model, optim
from joyjax.batch import ROLLOUT_KEYS
from joyjax.rl.sampler import Sampler
from joyjax.train import loop, rl, state as state_lib

RL_SMALL = {"model.vocab_size": 640, "model.num_layers": 2, "model.mtp.num_layers": 0, "optim.name": "adamw",
            "optim.lr": 1e-3, "optim.schedule": "constant", "optim.warmup_steps": 0, "rl.prompts_per_step": 8,
            "rl.num_generations": 2, "rl.max_prompt_len": 24, "rl.max_new_tokens": 4, "rl.num_minibatches": 2,
            "train.log_every": 1, "train.sample_prompt": "", "checkpoint.every": 0, "train.mtp_loss_weight": 0.0}


def _rollout_batch(cfg, params, seed=0):
  """A real rollout batch: the sampler's rows for 4 prompts x 2 samples, with made-up advantages."""
  rows = rl.rollout_rows(cfg)
  rng = np.random.default_rng(seed)
  p, r = cfg.rl.max_prompt_len, cfg.rl.max_new_tokens
  lens = rng.integers(3, p, size=rows).astype(np.int32)
  toks = np.zeros((rows, p), np.int32)
  for i, n in enumerate(lens):
    toks[i, p - n:] = rng.integers(5, 500, size=n)
  roll = Sampler(cfg, max_prompt_len=p, max_new_tokens=r)(params, toks, lens, jax.random.key(seed),
                                                          temperature=1.0).fetch()
  g = cfg.rl.num_generations
  batch = {"tokens": roll.tokens, "positions": roll.positions, "segment_ids": roll.segment_ids,
           "response_mask": roll.response_mask, "advantages": rng.normal(size=rows).astype(np.float32),
           "group_ids": (np.arange(rows) // g).astype(np.int32), "domain_ids": np.zeros(rows, np.int32),
           rl.SAMPLER_LOGPS: roll.logprobs}
  return {k: jnp.asarray(v) for k, v in rl.minibatch_major(batch, cfg.rl.num_minibatches).items()}


@pytest.mark.parametrize("loss", ["fiberpo", *(pytest.param(x, marks=pytest.mark.slow)  # same code path
                                               for x in ("fiberpo_domain", "grpo", "gspo"))])
def test_update_first_minibatch_ratio_is_exactly_one(loss):
  cfg = tiny_config(RL_SMALL, {"rl.loss": loss})
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), rl.optimizer_steps(cfg))
  params = model.init(cfg, jax.random.key(0))
  state = rl.rl_state_from_params(cfg, tx, params)
  batch = _rollout_batch(cfg, params)
  assert set(ROLLOUT_KEYS) <= set(batch)
  new, m = jax.jit(rl.make_rl_update(cfg, tx))(state, batch)
  assert float(m["first_mean_ratio"]) == 1.0 and float(m["first_max_abs_log_ratio"]) == 0.0
  assert int(new["step"]) == 1  # one rollout batch, whatever the number of updates
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new["params"]),
                                                                 jax.tree.leaves(params)))
  assert moved > 0
  for key in ("loss", "entropy", "mean_ratio", "gated_tokens", "gated_trajectories", "grad_norm",
              "sampler_logp_gap"):
    assert np.isfinite(float(m[key])), key
  # The sampler (cached MLA path) and the trainer (full forward) agree on the log-probs of what was sampled.
  assert float(m["sampler_logp_gap"]) < 1e-4
  assert float(m["entropy"]) > 0


@pytest.mark.slow  # the KL term itself: tests/test_policy_loss.py; the update path: the test above
def test_update_with_kl_keeps_a_frozen_reference():
  cfg = tiny_config(RL_SMALL, {"rl.kl_coef": 0.1, "rl.epochs": 2})
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), rl.optimizer_steps(cfg))
  params = model.init(cfg, jax.random.key(0))
  state = rl.rl_state_from_params(cfg, tx, params)
  assert "ref_params" in state
  new, m = jax.jit(rl.make_rl_update(cfg, tx))(state, _rollout_batch(cfg, params))
  assert float(m["kl"]) > 0  # the later updates moved the policy off the reference
  chex_equal = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new["ref_params"]),
                                                                jax.tree.leaves(params)))
  assert chex_equal


def _loop_cfg(tmp_path, steps, **extra):
  tok = tmp_path / "tokenizer.json"
  if not tok.exists():
    chat_tokenizer(512).save(str(tok))
  return tiny_config(RL_SMALL, {"data.tokenizer": str(tok), "train.steps": steps,
                                "train.output_dir": str(tmp_path / "run"), "rl.env_args": "max_operand=4",
                                "data.eval_fraction": 0.2, "train.eval_every": 2, "rl.curriculum": True}, extra)


def _log(tmp_path):
  return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_rl_loop_logs_evaluates_and_resumes_to_the_same_rewards(tmp_path):
  whole = loop.train(_loop_cfg(tmp_path / "a", 2), objective=loop.RL, print_sample=False)
  assert sorted(whole.losses) == [1, 2]
  log = _log(tmp_path / "a")
  for key in ("reward", "pass_rate", "entropy", "response_length", "gated_tokens", "gated_trajectories",
              "mean_ratio", "grad_norm", "first_mean_ratio", "sampler_logp_gap", "acceptance_length"):
    assert key in log[0], key
  assert log[0]["acceptance_length"] == 1.0  # no drafting: one token per decode step
  assert any(k.startswith("tokens") for k in log[1]), sorted(log[1])  # throughput after the compiling step
  assert "eval/reward" in log[1] and "eval/pass_rate" in log[1]
  assert all(r["first_mean_ratio"] == 1.0 for r in log)
  # Stopped after step 1 (as SIGTERM does), then resumed: the same rewards and losses as the run never stopped.
  part = loop.train(_loop_cfg(tmp_path / "b", 2), objective=loop.RL, print_sample=False, stop_after=1)
  assert part.interrupted and part.step == 1
  rest = loop.train(_loop_cfg(tmp_path / "b", 2), objective=loop.RL, print_sample=False)
  assert sorted(rest.losses) == [2]
  resumed = {r["step"]: r for r in _log(tmp_path / "b")}
  for r in log:
    for key in ("reward", "loss", "entropy", "response_length"):
      assert resumed[r["step"]][key] == r[key], (r["step"], key)


@pytest.mark.slow  # speculation itself: tests/test_speculative.py; here the RL loop with it on
def test_rl_with_mtp_speculation_keeps_the_ratio_exactly_one(tmp_path):
  """Rollouts drafted by the MTP module (rl.draft_tokens) are still scored with the policy's own log-probs: the
  first minibatch's ratio stays exactly 1 and the sampler agrees with the trainer; the acceptance length is logged."""
  cfg = _loop_cfg(tmp_path, 1, **{"model.mtp.num_layers": 1, "rl.draft_tokens": 2, "train.eval_every": 0})
  loop.train(cfg, objective=loop.RL, print_sample=False)
  (row,) = _log(tmp_path)
  assert row["first_mean_ratio"] == 1.0 and row["sampler_logp_gap"] < 1e-4
  assert 1.0 <= row["acceptance_length"] <= 3.0
