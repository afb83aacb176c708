"""Mesh equivalence on 8 CPU devices: the tiny model's loss, gradients and first training steps are those of
one device under data, fsdp, data x expert and fsdp x expert x tensor meshes.

Every run is the real jitted step (``make_train_step`` jitted with the state / batch shardings of
``joyjax.parallel.rules`` and donation, as ``joyjax.train.loop`` does it) under ``jax.set_mesh(mesh)``, so a
mesh with ``expert > 1`` takes the expert-parallel all-to-all path of the MoE layers. The params and the batch
are placed by the mesh's shardings before the step. The optimizer is the config's AdamW behind a pass-through
transformation whose state is the gradient it saw: after step ``i`` the state holds step ``i``'s gradient,
sharded like the params (one compile per mesh gives losses, gradients and updates together).

Tolerances: float32 reductions run in another order on another mesh, so results agree to ~1e-6 relative, not
bitwise. Gradients are compared on the first step (the same params everywhere); later steps are compared by
loss, since AdamW turns gradient rounding differences on entries with a near-zero gradient into update
differences of up to ~lr on those entries (their effect on the loss stays ~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from joyjax import model, optim
from joyjax.model import expert_parallel as ep_lib
from joyjax.parallel import rules
from joyjax.parallel.mesh import make_mesh
from joyjax.train import state as state_lib
from joyjax.train.step import make_train_step

STEPS = 3
BATCH, SEQ = 8, 32
BASE = [f"--config.data.seq_len={SEQ}", f"--config.train.batch_size={BATCH}", "--config.optim.name=adamw",
        "--config.optim.lr=3e-3", "--config.optim.warmup_steps=1", "--config.optim.schedule=constant"]

MESHES = {
    "fsdp2_expert2_tensor2": ["--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"],
    "data2_expert4": ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4"],
    "fsdp8": ["--config.mesh.fsdp=8"],
    "data8": ["--config.mesh.data=8", "--config.mesh.fsdp=1"],
}


def config(mesh_overrides=()):
  return tiny_config(BASE, mesh_overrides)


def record_grads() -> optax.GradientTransformation:
  """Passes updates through unchanged; its state is the last update it saw (the raw gradient when first)."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def make_tx(cfg):
  return optax.chain(record_grads(), optim.make_optimizer(cfg, model.abstract_params(cfg), STEPS))


def make_batch(cfg, seed=0):
  """Two documents per row; the first one's last token does not predict the second (mask 0)."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, cfg.model.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  seg = np.ones((BATCH, SEQ), np.int32)
  seg[:, SEQ // 2:] = 2
  pos = np.concatenate([np.arange(SEQ // 2), np.arange(SEQ - SEQ // 2)])[None].repeat(BATCH, 0).astype(np.int32)
  mask = np.ones((BATCH, SEQ), np.float32)
  mask[:, SEQ // 2 - 1] = 0
  mask[0, 5:9] = 0
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_mask": mask}


def run(cfg, mesh, init_state, batch, monkeypatch):
  """STEPS real jitted steps on ``mesh`` from ``init_state`` (host arrays) on ``batch`` (the same batch each
  step). Returns per-step metrics, per-step gradients, the final state (host) and facts about the program."""
  ep_calls = []
  real = ep_lib.expert_parallel_experts

  def spy(*a, **k):
    ep_calls.append(k["mesh"])
    return real(*a, **k)

  monkeypatch.setattr(ep_lib, "expert_parallel_experts", spy)
  tx = make_tx(cfg)
  abstract = state_lib.abstract_state(cfg, tx)
  state_sh = rules.state_shardings(cfg, mesh, abstract)
  batch_sh = rules.batch_sharding(mesh, rules.get_rules(cfg))
  metrics, grads = [], []
  with jax.set_mesh(mesh):
    state = jax.device_put(init_state, state_sh)
    dev_batch = jax.device_put(batch, batch_sh)
    for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
      assert leaf.sharding == s
    for v in dev_batch.values():
      assert v.sharding == batch_sh
    step = jax.jit(make_train_step(cfg, tx, STEPS), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    compiled = step.lower(state, dev_batch).compile()
    for _ in range(STEPS):
      state, m = compiled(state, dev_batch)
      metrics.append(jax.device_get(m))
      grads.append(jax.device_get(state["opt_state"][0]))
    final = jax.device_get(state)
  facts = dict(hlo=compiled.as_text(), ep_calls=ep_calls, state_sh=state_sh, batch_sh=batch_sh,
               shard_rows={s.data.shape[0] for s in dev_batch["inputs"].addressable_shards})
  return metrics, grads, final, facts


@pytest.fixture(scope="module")
def one_device():
  """The reference: the same steps on a 1-device mesh, from an init shared by every run."""
  cfg = config()
  tx = make_tx(cfg)
  init = jax.device_get(jax.jit(lambda k: state_lib.init_state(cfg, tx, k))(jax.random.key(0)))
  batch = make_batch(cfg)
  mesh = make_mesh(cfg, jax.devices()[:1])
  assert mesh.devices.size == 1
  with pytest.MonkeyPatch.context() as mp:
    metrics, grads, final, facts = run(cfg, mesh, init, batch, mp)
  assert facts["ep_calls"] == [] and "all-to-all" not in facts["hlo"]
  losses = [float(m["loss"]) for m in metrics]
  assert losses[-1] < losses[0] - 0.01, losses   # the steps train (the same batch each step)
  return init, batch, metrics, grads, final


def _rel_err(a, b):
  """max |a - b| over the leaf, relative to the leaf's scale max |b| (absolute when the leaf is all zeros)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if b.size else 0.0


# fsdp x expert x tensor (three mesh axes at once, the expert all-to-all included) is the fast case; the others
# compile the train step once more each (~10 s on 2 cores).
@pytest.mark.parametrize("name", [n if n == "fsdp2_expert2_tensor2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MESHES])
def test_mesh_matches_one_device(name, one_device, monkeypatch):
  init, batch, ref_metrics, ref_grads, ref_final = one_device
  cfg = config(MESHES[name])
  mesh = make_mesh(cfg)
  sizes = dict(mesh.shape)
  assert mesh.devices.size == 8 and jax.device_count() == 8
  metrics, grads, final, facts = run(cfg, mesh, init, batch, monkeypatch)

  # The placement is the mesh's: the batch split over every data axis, experts over 'expert', the recorded
  # gradients sharded like the params.
  dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  assert facts["shard_rows"] == {BATCH // dp}
  pspecs = jax.tree.map(lambda s: s.spec, facts["state_sh"]["params"])
  assert jax.tree.map(lambda s: s.spec, facts["state_sh"]["opt_state"][0]) == pspecs
  wo = tuple(pspecs["moe_layers"]["mlp"]["wo"]) + (None,) * 4   # P() when fully replicated (data=8)
  assert (wo[1] == "expert") == (sizes["expert"] > 1)
  # expert > 1 routes the experts through the all-to-all path, in every MoE layer (scanned) and the MTP block.
  if sizes["expert"] > 1:
    assert len(facts["ep_calls"]) >= 2 and all(dict(m.shape)["expert"] == sizes["expert"]
                                               for m in facts["ep_calls"])
    assert "all-to-all" in facts["hlo"]
  else:
    assert facts["ep_calls"] == []

  # Loss and gradients of the first step (the same params on every mesh).
  for key in ("loss", "total_loss", "mtp0_loss", "grad_norm", "loss_tokens"):
    np.testing.assert_allclose(metrics[0][key], ref_metrics[0][key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(metrics[0]["expert_counts"], ref_metrics[0]["expert_counts"])
  errs = {jax.tree_util.keystr(p): _rel_err(g, r) for (p, g), r in
          zip(jax.tree_util.tree_flatten_with_path(grads[0])[0], jax.tree.leaves(ref_grads[0]))}
  worst = max(errs, key=errs.get)
  print(f"{name}: max gradient error {errs[worst]:.2e} of scale ({worst}); loss differences "
        f"{[abs(float(m['loss']) - float(r['loss'])) for m, r in zip(metrics, ref_metrics)]}")
  assert errs[worst] <= 1e-5, (worst, errs[worst])
  assert max(abs(float(np.max(np.abs(g)))) for g in jax.tree.leaves(grads[0])) > 1e-3  # not all zeros

  # The training steps: the same losses step after step.
  for i in range(STEPS):
    for key in ("loss", "total_loss"):
      np.testing.assert_allclose(metrics[i][key], ref_metrics[i][key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key} of step {i + 1}")
  assert int(final["step"]) == STEPS == int(ref_final["step"])
