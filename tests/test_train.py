"""The trainer: exact resume (in-process and after SIGTERM), gradient accumulation, non-finite skipping, the
router-bias update, and both optimizers reducing the loss."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import DATA_CACHE, signal_after
from joyjax import model, optim
from joyjax.config import load_config
from joyjax.model.moe import route
from joyjax.train import state as state_lib
from joyjax.train.loop import train
from joyjax.model import update_router_bias
from joyjax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_overrides(out_dir, steps=6):
  return [f"--config.train.output_dir={out_dir}", f"--config.train.steps={steps}", "--config.data.seq_len=32",
          "--config.train.batch_size=8", "--config.checkpoint.every=3", "--config.train.log_every=1",
          "--config.train.sample_prompt=", f"--config.data.cache_dir={DATA_CACHE}",
          "--config.data.tokenizer_vocab_size=1024", "--config.optim.warmup_steps=2"]


def params_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight")
  # A log line every 2 steps (the step program, hence every loss, is the same whatever log_every is).
  cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), loop_overrides(out) + ["--config.train.log_every=2"])
  r = train(cfg, stream=open(os.devnull, "w"))
  r.out_dir = out
  return r


def test_straight_run_trains_and_checkpoints(straight_run, tmp_path):
  r = straight_run
  assert sorted(r.losses) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) for v in r.losses.values())
  assert not r.interrupted and r.step == 6
  assert sorted(os.listdir(r.out_dir / "checkpoints")) == ["3", "6"]
  # Logged every 2 steps: the step's own loss and the mean over the window (single batches are noisy).
  with open(r.out_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [row["step"] for row in rows] == [2, 4, 6]
  for row in rows:
    s = row["step"]
    assert row["loss"] == pytest.approx(r.losses[s], rel=1e-6)
    assert row["loss_avg"] == pytest.approx((r.losses[s - 1] + r.losses[s]) / 2, rel=1e-6)


def test_resume_in_process_is_exact(straight_run, tmp_path):
  cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), loop_overrides(tmp_path))
  first = train(cfg, stop_after=3, stream=open(os.devnull, "w"))
  assert first.interrupted and sorted(first.losses) == [1, 2, 3]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  second = train(cfg, stream=open(os.devnull, "w"))
  assert sorted(second.losses) == [4, 5, 6]
  losses = {**first.losses, **second.losses}
  assert losses == straight_run.losses  # bitwise: the same floats
  assert params_equal(second.state["params"], straight_run.state["params"])
  assert params_equal(second.state["opt_state"], straight_run.state["opt_state"])


def _metrics_losses(out_dir):
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_sigterm_saves_and_resume_is_exact(straight_run, tmp_path):
  """A real `python -m joyjax.train` process gets SIGTERM mid-run: it saves the step it finished and exits 0;
  running the same command again continues to the end with the uninterrupted run's losses and params."""
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "joyjax.train", "--config", os.path.join(ROOT, "configs/tiny.py"),
         *loop_overrides(tmp_path)]
  rc, text = signal_after(cmd, env=env, cwd=ROOT, marker="step 2/6")
  assert rc == 0, text[-3000:]
  assert "received SIGTERM" in text and "stopped at step" in text, text[-3000:]
  stopped = max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert 2 <= stopped < 6, text[-3000:]
  cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), loop_overrides(tmp_path))
  rest = train(cfg, stream=open(os.devnull, "w"))
  assert sorted(rest.losses) == list(range(stopped + 1, 7))
  losses = _metrics_losses(tmp_path)
  assert {s: losses[s] for s in range(1, 7)} == pytest.approx(straight_run.losses, rel=0, abs=0)
  assert params_equal(rest.state["params"], straight_run.state["params"])


# ------------------------------------------------------------------------------------------ step level


def _batch(cfg, b, s, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, cfg.model.vocab_size, (b, s + 1)).astype(np.int32)
  seg = np.ones((b, s), np.int32)
  seg[:, s // 2:] = 2  # two documents per row
  pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0).astype(np.int32)
  mask = np.ones((b, s), np.float32)
  mask[:, s // 2 - 1] = 0  # the last token of document 1 does not predict document 2
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


@pytest.fixture(scope="module")
def sgd_setup():
  cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), ["--config.train.z_loss=1e-3",
                                                             "--config.train.balance_loss_alpha=1e-2"])
  params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(1))
  tx = optax.sgd(0.5)
  state = state_lib.state_from_params(cfg, tx, params)
  step = jax.jit(make_train_step(cfg, tx, 10))
  return cfg, tx, state, step


def test_grad_accumulation_equals_one_large_batch(sgd_setup):
  cfg, tx, state, step1 = sgd_setup
  cfg2 = load_config(os.path.join(ROOT, "configs/tiny.py"), ["--config.train.z_loss=1e-3",
                                                              "--config.train.balance_loss_alpha=1e-2",
                                                              "--config.train.grad_accum=2"])
  step2 = jax.jit(make_train_step(cfg2, tx, 10))
  batch = _batch(cfg, 4, 32)
  batch["loss_mask"][0, 5:9] = 0  # micro-batches with different token counts
  s1, m1 = step1(state, batch)
  s2, m2 = step2(state, batch)
  for key in ("loss", "total_loss", "grad_norm", "balance_loss", "z_loss", "mtp0_loss"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, err_msg=key)
  np.testing.assert_array_equal(m2["expert_counts"], m1["expert_counts"])
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1["params"], state["params"])
  assert max(jax.tree.leaves(moved)) > 1e-4
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(s1["params"])[0], jax.tree.leaves(s2["params"]),
                        jax.tree.leaves(state["params"])):
    delta1 = np.asarray(path[1]) - np.asarray(b)
    delta2 = np.asarray(a) - np.asarray(b)
    scale = max(float(np.abs(delta1).max()), 1e-8)
    assert float(np.abs(delta1 - delta2).max()) <= 1e-4 * scale + 1e-9, jax.tree_util.keystr(path[0])


def test_non_finite_batch_is_skipped_and_counted(sgd_setup):
  cfg, tx, state, step = sgd_setup
  bad = _batch(cfg, 4, 32, seed=1)
  bad["loss_mask"][1, 3] = np.nan
  s1, m1 = step(state, bad)
  assert not bool(m1["finite"]) and int(m1["skipped"]) == 1 and int(m1["nonfinite"]) == 1
  assert int(s1["step"]) == 1
  assert params_equal(s1["params"], state["params"])  # nothing moved, router bias included
  s2, m2 = step(s1, bad)
  assert int(m2["nonfinite"]) == 2 and int(m2["skipped"]) == 2
  s3, m3 = step(s2, _batch(cfg, 4, 32, seed=2))
  assert bool(m3["finite"]) and int(m3["nonfinite"]) == 0 and int(m3["skipped"]) == 2
  assert not params_equal(s3["params"], state["params"])


def test_train_step_moves_router_bias_against_load(sgd_setup):
  cfg, tx, state, step = sgd_setup
  s1, m = step(state, _batch(cfg, 4, 32, seed=3))
  counts = np.asarray(m["expert_counts"])  # [moe layers, E]
  before = np.asarray(state["params"]["moe_layers"]["mlp"]["router_bias"])
  after = np.asarray(s1["params"]["moe_layers"]["mlp"]["router_bias"])
  expected = before + cfg.train.router_bias_rate * np.sign(counts.mean(-1, keepdims=True) - counts)
  np.testing.assert_allclose(after, expected, atol=1e-7)
  assert counts.sum() == 4 * 32 * cfg.model.moe.num_experts_per_tok * counts.shape[0]


def test_router_bias_update_balances_skewed_routing():
  """Logits favouring 2 of 16 experts: the bias update alone brings the max/mean load from ~4 towards 1."""
  rng = np.random.default_rng(0)
  e, k, t = 16, 2, 512
  skew = np.zeros(e, np.float32)
  skew[:2] = 3.0
  bias = jnp.zeros(e)

  def load(bias, seed):
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32) + skew)
    _, ids, _ = route(logits, bias, top_k=k, n_group=1, topk_group=1, scoring_func="sigmoid",
                      norm_topk_prob=True, routed_scaling_factor=1.0)
    return jnp.zeros(e).at[ids.reshape(-1)].add(1.0)

  counts = load(bias, 0)
  start = float(counts.max() / counts.mean())
  assert start > 6.0  # nearly every token picks the two favoured experts
  for i in range(300):
    bias = update_router_bias(bias, load(bias, i), 0.02)
  counts = load(bias, 999)
  end = float(counts.max() / counts.mean())
  assert end < 1.6, (start, end)
  assert float(bias[:2].max()) < float(bias[2:].min())  # the favoured experts were pushed down
  del rng


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_optimizer_reduces_loss(name):
  cfg = load_config(os.path.join(ROOT, "configs/tiny.py"),
                    [f"--config.optim.name={name}", "--config.optim.warmup_steps=0",
                     "--config.optim.schedule=constant", "--config.model.mtp.num_layers=0"])
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), 20)
  state = jax.jit(lambda k: state_lib.init_state(cfg, tx, k))(jax.random.key(0))
  step = jax.jit(make_train_step(cfg, tx, 20), donate_argnums=0)
  batch = _batch(cfg, 4, 32, seed=5)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 1.0, losses  # memorising a fixed batch: a clear drop, not noise
