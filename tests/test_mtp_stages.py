"""MTP per recipe stage: a stage with MTP off (``train.mtp_loss_weight`` = 0, or an objective without an MTP loss:
DPO, RL) hands the MTP module on bit for bit, under weight decay; a stage with MTP on trains it with its own weight.
"""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from joyjax import model, optim
from joyjax.train import loop, state as state_lib
from joyjax.train.step import make_train_step
from joyjax.tree import path_names


def _batch(cfg, b=4, s=32, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, cfg.model.vocab_size, (b, s + 1)).astype(np.int32)
  pos = np.arange(s, dtype=np.int32)[None].repeat(b, 0)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((b, s), np.int32),
          "positions": pos, "loss_mask": np.ones((b, s), np.float32)}


def _run(cfg, params, steps, train_mtp=None):
  tx = optim.make_optimizer(cfg, params, steps, train_mtp=train_mtp)
  state = state_lib.state_from_params(cfg, tx, params)
  step = jax.jit(make_train_step(cfg, tx, steps))
  batch, metrics = _batch(cfg), []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
  return state, metrics


def _split(params):
  """(MTP leaves, every other trainable leaf's paths) of a params tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(path_names(p)): np.asarray(v) for p, v in flat if path_names(p)[0] == model.MTP_STACK}, \
         {tuple(path_names(p)): np.asarray(v) for p, v in flat if path_names(p)[0] != model.MTP_STACK}


@pytest.fixture(scope="module")
def stages():
  common = ["--config.optim.name=adamw", "--config.optim.weight_decay=0.5", "--config.optim.warmup_steps=0",
            "--config.optim.schedule=constant", "--config.optim.lr=3e-3"]
  off = tiny_config(*common, "--config.train.mtp_loss_weight=0")
  on = tiny_config(*common, "--config.train.mtp_loss_weight=0.1")
  params = jax.jit(lambda k: model.init(off, k))(jax.random.key(0))
  s1, m1 = _run(off, params, 4)        # stage 1: MTP off
  s2, m2 = _run(on, s1["params"], 6)   # stage 2 (e.g. mid-training): MTP on at weight 0.1
  return params, s1, m1, s2, m2, on


def test_stage_without_mtp_keeps_the_module_bit_for_bit(stages):
  params, s1, m1, _, _, _ = stages
  mtp0, rest0 = _split(params)
  mtp1, rest1 = _split(s1["params"])
  assert mtp0 and all(np.array_equal(mtp0[k], mtp1[k]) for k in mtp0)  # weight decay 0.5 did not touch it
  changed = [k for k in rest0 if not np.array_equal(rest0[k], rest1[k])]
  assert len(changed) > len(rest0) // 2  # the rest trained
  assert not any(k.startswith("mtp") for k in m1[0])  # no MTP loss logged


def test_stage_with_mtp_trains_it_at_its_weight(stages):
  _, s1, _, s2, m2, on = stages
  mtp1, _ = _split(s1["params"])
  mtp2, _ = _split(s2["params"])
  assert not np.array_equal(mtp1[(model.MTP_STACK, "eh_proj")], mtp2[(model.MTP_STACK, "eh_proj")])
  losses = [float(m["mtp0_loss"]) for m in m2]
  assert losses[-1] < losses[0], losses
  # The objective is CE + 0.1 x MTP CE (DeepSeek-V3: mean over depths; one depth here; no z / balance loss).
  assert float(m2[0]["total_loss"]) == pytest.approx(float(m2[0]["loss"]) + 0.1 * losses[0], rel=1e-5)


def test_objectives_without_an_mtp_loss_freeze_it():
  cfg = tiny_config("--config.train.mtp_loss_weight=0.3")
  assert loop.PRETRAIN.trains_mtp(cfg) and loop.SFT.trains_mtp(cfg)
  assert not loop.DPO.trains_mtp(cfg) and not loop.RL.trains_mtp(cfg)
  abstract = model.abstract_params(cfg)
  for train_mtp, want in ((None, "muon"), (True, "muon"), (False, "frozen")):
    labels = optim.param_labels(cfg, abstract, train_mtp=train_mtp)
    assert labels[model.MTP_STACK]["eh_proj"] == want
    assert labels["moe_layers"]["attn"]["kv_b"] == "muon"  # only the MTP modules change
  no_mtp_weight = tiny_config("--config.train.mtp_loss_weight=0")
  assert optim.param_labels(no_mtp_weight, abstract)[model.MTP_STACK]["eh_proj"] == "frozen"
  decay = optim.weight_decay_mask(cfg, abstract, train_mtp=False)
  assert not any(jax.tree.leaves(decay[model.MTP_STACK]))
