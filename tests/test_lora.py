"""LoRA (model.lora): fresh adapters leave the model's function unchanged; only adapters train and hold optimizer
state; training moves the loss and nothing of the base; merged params (and the exported Hugging Face checkpoint)
compute what the adapter model computes; init_from a base or LoRA checkpoint; the plan's smaller state."""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from conftest import load_repo_config, tiny_config
from joyjax import model, optim
from joyjax.convert import hf
from joyjax.errors import ConfigError
from joyjax.model import adapters, expert_parallel as ep_lib
from joyjax.parallel import plan as plan_lib
from joyjax.train import checkpoint, state as state_lib
from joyjax.train.step import make_train_step
from joyjax.tree import path_str

R = 4
ALL = "attention,dense,shared,routed"


def lora_cfg(**over):
  keys = {"model.lora.rank": R, "model.lora.alpha": 8.0, "model.lora.targets": ALL,
          "model.lora.base_dtype": "float32", "optim.name": "adamw", "optim.lr": 1e-2, "optim.schedule": "constant",
          "optim.warmup_steps": 0, "train.router_bias_rate": 0.0}
  keys.update({k.replace("__", "."): v for k, v in over.items()})
  return tiny_config(keys)


def flat(tree):
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_adapter(name):
  return name.endswith(("_lora_a", "_lora_b"))


def tokens(b=2, s=24, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, 4096)


def adapter_count(m, r, targets):
  """Adapter parameters from the config's dimensions: r * (fan_in + fan_out) per adapted matrix."""
  a, e = m.attention, m.moe
  h, qk = m.hidden_size, a.qk_nope_head_dim + a.qk_rope_head_dim
  attn = ((h + a.q_lora_rank) + (a.q_lora_rank + a.num_heads * qk) if a.q_lora_rank else h + a.num_heads * qk)
  attn += (h + a.kv_lora_rank + a.qk_rope_head_dim) + (a.kv_lora_rank + a.num_heads * (a.qk_nope_head_dim
                                                                                         + a.v_head_dim))
  attn += a.num_heads * a.v_head_dim + h
  moe_blocks = m.num_layers - m.first_k_dense + m.mtp.num_layers
  n = 0
  if "attention" in targets:
    n += (m.num_layers + m.mtp.num_layers) * attn
  if "dense" in targets:
    n += m.first_k_dense * 3 * (h + m.dense_intermediate_size)
  if "shared" in targets:
    n += moe_blocks * 3 * (h + e.num_shared_experts * e.intermediate_size)
  if "routed" in targets:
    n += moe_blocks * e.num_experts * 3 * (h + e.intermediate_size)
  return r * n


# ------------------------------------------------------------------------------------------- the function


def test_fresh_adapters_compute_the_base_model():
  base_cfg = tiny_config()
  cfg = lora_cfg()
  p0 = model.init(base_cfg, jax.random.key(0))
  p = model.init(cfg, jax.random.key(0))
  fp, fp0 = flat(p), flat(p0)
  # the base weights do not depend on LoRA (adapters draw from their own rng stream), adapters B start at zero
  assert {k: v for k, v in fp.items() if not is_adapter(k)}.keys() == fp0.keys()
  assert all(np.array_equal(fp[k], fp0[k]) for k in fp0)
  assert all(not np.any(v) for k, v in fp.items() if k.endswith("_lora_b"))
  assert all(np.std(np.asarray(v)) > 0 for k, v in fp.items() if k.endswith("_lora_a"))
  assert sum(v.size for k, v in fp.items() if is_adapter(k)) == adapter_count(cfg.model, R, ALL)
  assert model.count_params(cfg)["lora_adapters"] == adapter_count(cfg.model, R, ALL)
  assert model.count_params(cfg)["total"] == model.count_params(base_cfg)["total"]
  t = tokens()
  logits0, mtp0 = model.forward(base_cfg, p0, t, return_mtp=True)
  logits, mtp = model.forward(cfg, p, t, return_mtp=True)
  np.testing.assert_array_equal(logits, logits0)
  np.testing.assert_array_equal(mtp[0], mtp0[0])
  # add_lora on the base params gives the same tree as (jitted) init
  added = model.add_lora(cfg, p0, jax.random.key(0))
  jitted = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0))
  fa, fj = flat(added), flat(jitted)
  assert fa.keys() == fp.keys()
  assert all(np.array_equal(fa[k], fj[k] if is_adapter(k) else fp[k]) for k in fa)
  # decode (the absorbed attention folds kv_b's adapter into the weight) agrees with the full forward
  cache = model.init_cache(cfg, 2, 24)
  dec, _ = model.decode_step(cfg, p, t, cache)
  np.testing.assert_allclose(dec, logits, atol=1e-4)


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_bfloat16_base():
  """base_dtype bfloat16: the base leaves are stored in it (adapters in param_dtype), and the model with fresh
  adapters computes what the same bf16 weights compute without LoRA."""
  cfg = lora_cfg(model__lora__base_dtype="bfloat16")
  p = model.init(cfg, jax.random.key(0))
  for k, v in flat(p).items():
    want = jnp.float32 if is_adapter(k) or k.endswith("router_bias") else jnp.bfloat16
    assert v.dtype == want, k
  base_cfg = tiny_config({"model.param_dtype": "bfloat16"})
  base = model.without_adapters(cfg, p)
  np.testing.assert_array_equal(model.forward(cfg, p, tokens()), model.forward(base_cfg, base, tokens()))


def test_bad_settings_name_the_key():
  with pytest.raises(ConfigError, match="model.lora.targets"):  # when the config loads (config.validate)
    lora_cfg(model__lora__targets="attention,experts")
  with pytest.raises(ConfigError, match="model.lora.alpha"):
    lora_cfg(model__lora__alpha=0.0)
  with pytest.raises(ConfigError, match="model.lora.rank"):  # adapters in the params, LoRA off in the config
    model.merge_lora(tiny_config(), model.init(lora_cfg(), jax.random.key(0)))


# --------------------------------------------------------------------------------------- optimizer labels


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_only_adapters_are_trained_and_hold_state(name):
  cfg = lora_cfg(optim__name=name, model__lora__targets="attention,dense,shared")
  abstract = model.abstract_params(cfg)
  labels = flat(optim.param_labels(cfg, abstract))
  info = flat(jax.tree.map(lambda i: i.trainable, model.param_info(cfg), is_leaf=model.is_info))
  for k, label in labels.items():
    assert label == ("lora" if is_adapter(k) else "frozen"), k
    assert info[k] == is_adapter(k), k
  assert not any(is_adapter(k) for k in labels if "wi_" in k or k.endswith("/wo"))  # routed not targeted
  n = adapter_count(cfg.model, R, "attention,dense,shared")
  assert n == sum(math.prod(v.shape) for k, v in flat(abstract).items() if is_adapter(k))
  state = jax.eval_shape(optim.make_optimizer(cfg, abstract).init, abstract)
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  # AdamW's mu and nu for each adapter leaf, nothing for the frozen base
  assert sum(x.size for x in arrays) == 2 * n
  assert len(arrays) == 2 * sum(is_adapter(k) for k in labels)
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) <= 2 * n * 4 + 64


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained():
  """Five AdamW steps of the tiny model with rank-4 adapters everywhere (routed experts included) on one
  fixed batch."""
  cfg = lora_cfg()
  params = model.init(cfg, jax.random.key(0))
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), 5)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, 4096, (4, 33)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((4, 32), np.int32),
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)),
           "loss_mask": np.ones((4, 32), np.float32)}
  step = jax.jit(make_train_step(cfg, tx, 5))
  state = state_lib.state_from_params(cfg, tx, params)
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return cfg, params, state["params"], losses


def test_training_moves_the_loss_and_only_the_adapters(trained):
  cfg, before, after, losses = trained
  assert losses[-1] < losses[0] - 0.05, losses
  fb, fa = flat(before), flat(after)
  for k in fb:
    if is_adapter(k):
      assert not np.array_equal(fb[k], fa[k]), k  # every adapter (A and B) got a gradient
    else:
      assert np.array_equal(fb[k], fa[k]), k      # the base is bit-identical
  assert all(np.any(v) for k, v in fa.items() if k.endswith("_lora_b"))


def test_merged_params_compute_the_adapter_model(trained):
  cfg, before, after, _ = trained
  t = tokens(seed=2)
  want, want_mtp = model.forward(cfg, after, t, return_mtp=True)
  merged = model.merge_lora(cfg, after)
  assert not model.has_adapters(merged) and model.has_adapters(after)
  assert jax.tree.structure(merged) == jax.tree.structure(model.without_adapters(cfg, after))
  got, got_mtp = model.forward(model.without_lora(cfg), merged, t, return_mtp=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_mtp[0], want_mtp[0], atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(want - model.forward(cfg, before, t)))) > 1e-3  # training changed the function
  # adapters off (B = 0): the base model again, exactly
  np.testing.assert_array_equal(model.forward(cfg, model.zero_adapters(cfg, after), t),
                                model.forward(cfg, before, t))


def test_export_merges_the_adapters(trained, tmp_path):
  cfg, _, after, _ = trained
  out = str(tmp_path / "hf")
  hf.export_checkpoint(cfg, after, out, dtype="float32")
  names = []
  for f in glob.glob(os.path.join(out, "*.safetensors")):
    with safe_open(f, "np") as st:
      names += list(st.keys())
  assert names and not [n for n in names if "lora" in n]
  cfg2, params2 = hf.import_checkpoint(out)
  t = tokens(seed=3)
  np.testing.assert_allclose(model.forward(cfg2, params2, t), model.forward(cfg, after, t), atol=1e-5, rtol=0)


def test_init_from_a_base_or_a_lora_checkpoint(trained, tmp_path):
  cfg, before, after, _ = trained
  # a converted (adapter-free) checkpoint in float32 -> bf16 base + fresh adapters
  base_path = str(tmp_path / "base")
  checkpoint.save_params(base_path, model.without_adapters(cfg, before))
  bf16 = lora_cfg(model__lora__base_dtype="bfloat16")
  got = state_lib.init_params_from(bf16, base_path, model.abstract_params(bf16), jax.random.key(0))
  want = jax.jit(lambda k: model.init(bf16, k))(jax.random.key(0))
  fg, fw, fb = flat(got), flat(want), flat(before)
  assert fg.keys() == fw.keys()
  for k in fg:
    assert fg[k].dtype == fw[k].dtype, k
    if is_adapter(k):
      np.testing.assert_array_equal(fg[k], fw[k])
    else:
      np.testing.assert_array_equal(fg[k], np.asarray(fb[k]).astype(fw[k].dtype))
  # a LoRA run's checkpoint: its adapters merged into the base, fresh ones on top -> the same function
  lora_path = str(tmp_path / "lora")
  checkpoint.save_params(lora_path, after)
  got = state_lib.init_params_from(cfg, lora_path, model.abstract_params(cfg), jax.random.key(5))
  assert all(not np.any(v) for k, v in flat(got).items() if k.endswith("_lora_b"))
  t = tokens(seed=4)
  np.testing.assert_allclose(model.forward(cfg, got, t), model.forward(cfg, after, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- plan


def test_plan_counts_the_adapters_state_and_the_bf16_base():
  full = load_repo_config("joyai_flash", {"mesh.fsdp": 1})
  lora = load_repo_config("joyai_flash", {"mesh.fsdp": 1, "model.lora.rank": 16})
  n = adapter_count(lora.model, 16, "attention,dense,shared")
  p_full, p = plan_lib.plan(full, 1), plan_lib.plan(lora, 1)
  base = p_full["param_count"]
  assert p["param_count"] == base + n and p["trainable_params"] == n and p["lora"]
  assert p_full["param_bytes"] == 4 * base                       # float32 master weights
  bias = sum(math.prod(v.shape) for k, v in flat(model.abstract_params(lora)).items() if k.endswith("router_bias"))
  # bf16 base, f32 router bias and adapters
  assert p["param_bytes"] == p["param_bytes_total"] == 2 * (base - bias) + 4 * bias + 4 * n
  assert p["param_groups"]["LoRA adapters"] == 4 * n
  assert 8 * n <= p["opt_state_bytes"] <= 8 * n + 64             # AdamW mu + nu of the adapters only
  assert p["grad_bytes"] == 4 * n
  assert p_full["opt_state_bytes"] > 4 * (base - bias)            # Muon momentum + AdamW moments of everything
  assert p["opt_state_bytes"] < p_full["opt_state_bytes"] / 100
  assert "LoRA" in plan_lib.format_plan(p, lora)


# ------------------------------------------------------------------------------------- expert parallelism


def test_routed_adapters_under_expert_parallelism():
  """Routed adapters travel with their experts (sharded over 'expert' on a data=2 x expert=4 mesh): outputs and
  adapter gradients equal the experts with merged weights W + s A @ B (every expert on every token, float32)."""
  t, h, f, e, k, r, s = 32, 8, 16, 8, 2, 4, 0.5
  rng = np.random.default_rng(0)
  rand = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)  # noqa: E731
  x, wg, wu, wo = rand(t, h), rand(e, h, f), rand(e, h, f), rand(e, f, h)
  lora = (rand(e, h, r), rand(e, r, f), rand(e, h, r), rand(e, r, f), rand(e, f, r), rand(e, r, h))
  ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)

  def merged(lo):
    return [w + adapters.delta(a, b, s, lead=1) for w, a, b in ((wg, lo[0], lo[1]), (wu, lo[2], lo[3]),
                                                                   (wo, lo[4], lo[5]))]

  def reference(lo):
    g, u, o = merged(lo)
    hh = jax.nn.silu(jnp.einsum("th,ehf->tef", x, g)) * jnp.einsum("th,ehf->tef", x, u)
    y = jnp.einsum("tef,efh->teh", hh, o)
    return jnp.einsum("teh,te->th", y, jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(ids, e)))

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))

  def ep(lo):
    return ep_lib.expert_parallel_experts(x, weights, ids, wg, wu, wo, mesh=mesh, num_experts=e, impl="reference",
                                          lora=lo, lora_scale=s)[0]

  with jax.set_mesh(mesh):
    lo = tuple(jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in lora)
    got = jax.jit(ep)(lo)
    got_grad = jax.jit(jax.grad(lambda lo: jnp.sum(jnp.sin(ep(lo)))))(lo)
  want_grad = jax.grad(lambda lo: jnp.sum(jnp.sin(reference(lo))))(lora)
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference(lora)), atol=1e-4, rtol=1e-4)
  for g, w in zip(got_grad, want_grad):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
