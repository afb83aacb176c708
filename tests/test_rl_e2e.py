"""End to end on CPU: FiberPO raises a tiny model's reward on held-out prompts of the arithmetic task, and a
`joyjax rl` process stopped by SIGTERM resumes to the same rewards.

The start is benchmarks/rl_stability.py's: a tiny model SFT-trained on demonstrations of the task's training
prompts, three quarters of which answer a + b + 1. It knows the answer format, answers greedily wrong on held-out
prompts (reward below 0.3), and samples the right answer some of the time: what RL has to find and make greedy.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO_ROOT, signal_after
from joyjax import model
from joyjax.config import load_config
from joyjax.train import loop, rl, state as state_lib

pytestmark = pytest.mark.slow

ENV_ARGS = "max_operand=9,ops=+"


def _bench():
  spec = importlib.util.spec_from_file_location("rl_stability_bench",
                                                os.path.join(REPO_ROOT, "benchmarks", "rl_stability.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  d = tmp_path_factory.mktemp("rl_e2e")
  return _bench().prepare(str(d), sft_steps=400, env_args=ENV_ARGS, wrong_fraction=0.75, log=lambda *a: None)


def _overrides(start, out_dir, steps):
  return [f"--config.train.output_dir={out_dir}", f"--config.train.init_from={start['sft']}",
          f"--config.data.tokenizer={start['tokenizer']}", "--config.model.vocab_size=512",
          f"--config.train.steps={steps}", "--config.optim.lr=1e-4", f"--config.rl.env_args={ENV_ARGS}",
          "--config.train.eval_every=5", "--config.checkpoint.every=0", "--config.train.sample_prompt="]


def _log(out_dir):
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def test_fiberpo_raises_held_out_reward(start, tmp_path):
  cfg = load_config(os.path.join(REPO_ROOT, "configs", "fiberpo_tiny.py"), _overrides(start, tmp_path, 15))
  stream, _ = rl.open_rl_data(cfg, loop.run_tokenizer(cfg), 0, 1, True)
  assert len(stream.held_indices) >= 10
  params = state_lib.init_params_from(cfg, start["sft"], model.abstract_params(cfg), jax.random.key(0))
  rollouts = rl.Rollouts(cfg, loop.run_tokenizer(cfg), stream, None)
  before = rl.evaluate(rollouts, params, cfg.train.seed)["eval/reward"]
  assert before < 0.3, before
  result = loop.train(cfg, objective=loop.RL, print_sample=False, stream=open(os.devnull, "w"))
  log = _log(tmp_path)
  after = log[15]["eval/reward"]
  assert after > 0.8, {s: r.get("eval/reward") for s, r in log.items()}
  assert result.step == 15 and all(r["first_mean_ratio"] == 1.0 for r in log.values())


def test_sigterm_then_resume_gives_the_same_rewards(start, tmp_path):
  """A real `joyjax rl` process gets SIGTERM after its second step: it saves and exits 0; the same command then
  finishes the run, and every step's reward and loss equal those of a run that was never stopped."""
  steps = 6
  straight, out = tmp_path / "straight", tmp_path / "stopped"
  command = lambda d: [sys.executable, "-m", "joyjax.cli", "rl", "--config",  # noqa: E731
                       os.path.join(REPO_ROOT, "configs", "fiberpo_tiny.py"), *_overrides(start, d, steps)]
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  rc = subprocess.run(command(straight), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
  cmd = command(out)
  rc, text = signal_after(cmd, env=env, cwd=REPO_ROOT, marker=f"step 2/{steps}")
  assert rc == 0 and "received SIGTERM" in text and "stopped at step" in text, text[-3000:]
  stopped = max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())
  assert 2 <= stopped < steps, text[-3000:]
  rc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
  a, b = _log(straight), _log(out)
  for s in range(1, steps + 1):
    for key in ("reward", "loss", "entropy", "pass_rate"):
      assert b[s][key] == a[s][key], (s, key, a[s][key], b[s][key])
  assert b[steps]["eval/reward"] == a[steps]["eval/reward"]
