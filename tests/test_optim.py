"""Optimizer: schedules against the module docstring's formulas, parameter labels, the weight-decay mask, and
make_optimizer (muon / adamw) updates against hand-written Newton-Schulz / Adam steps.

Optimizer tests run on sub-trees of the tiny model's params (``make_optimizer`` reads only paths and ranks):
a Muon update of the whole tree takes far longer to compile on the CPU than anything checked here needs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from joyjax import model, optim

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the standard quintic Newton-Schulz coefficients (Keller Jordan's Muon)


def _cfg(*overrides):
  return tiny_config(overrides)


@pytest.fixture(scope="module")
def abstract():
  return model.abstract_params(_cfg())


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _subtree(tree, paths):
  """The sub-tree of ``tree`` holding only ``paths`` ('a/b/c')."""
  out = {}
  for p in paths:
    keys = p.split("/")
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = _get(tree, p)
  return out


def _flat(tree, is_leaf=None):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


# --------------------------------------------------------------------------------------------- schedules

# total 100 updates, warmup 10, peak 1.0, min_lr_ratio 0.1, wsd decay over round(0.2 * 100) = 20 updates.
def _sched(name, **kw):
  o = _cfg(f"--config.optim.schedule={name}", "--config.optim.warmup_steps=10",
           "--config.optim.min_lr_ratio=0.1", "--config.optim.decay_fraction=0.2").optim
  return optim.make_schedule(o, 100, peak=1.0, **kw)


def _at(schedule, step):
  return float(schedule(step))


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd"])
def test_warmup_is_linear_in_step_plus_one(name):
  s = _sched(name)
  # update `step` (0-based) runs at s = step + 1: lr = peak * s / warmup; update 9 is the first at peak.
  assert _at(s, 0) == pytest.approx(0.1, rel=1e-6)
  assert _at(s, 4) == pytest.approx(0.5, rel=1e-6)
  assert _at(s, 8) == pytest.approx(0.9, rel=1e-6)
  assert _at(s, 9) == pytest.approx(1.0, rel=1e-6)


def test_constant_schedule():
  s = _sched("constant")
  for step in (9, 10, 50, 99, 500):
    assert _at(s, step) == pytest.approx(1.0, rel=1e-6)


def test_cosine_schedule():
  s = _sched("cosine")
  # after warmup: frac = (s - warmup) / (total - warmup), lr = 0.1 + 0.9 * (1 + cos(pi * frac)) / 2
  assert _at(s, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 90)), rel=1e-6)
  assert _at(s, 54) == pytest.approx(0.55, rel=1e-6)                  # s = 55: frac = 1/2
  assert _at(s, 98) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-5)
  assert _at(s, 99) == pytest.approx(0.1, rel=1e-6)                   # the last update reaches the floor
  assert _at(s, 250) == pytest.approx(0.1, rel=1e-6)                  # and stays there


def test_wsd_schedule():
  s = _sched("wsd")
  # stable until the last 20 updates: frac = (s - 80) / 20, lr = 1 - 0.9 * frac
  assert _at(s, 50) == pytest.approx(1.0, rel=1e-6)
  assert _at(s, 79) == pytest.approx(1.0, rel=1e-6)                   # s = 80: the last update at peak
  assert _at(s, 80) == pytest.approx(1.0 - 0.9 / 20, rel=1e-6)        # s = 81: the first decayed update
  assert _at(s, 89) == pytest.approx(0.55, rel=1e-6)                  # s = 90: half way
  assert _at(s, 99) == pytest.approx(0.1, rel=1e-6)
  assert _at(s, 300) == pytest.approx(0.1, rel=1e-6)


def test_schedule_default_peak_and_errors():
  o = _cfg("--config.optim.schedule=constant", "--config.optim.warmup_steps=4").optim
  assert float(optim.make_schedule(o, 10)(0)) == pytest.approx(0.02 / 4, rel=1e-6)   # tiny: optim.lr = 0.02
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(o, 0)
  bad = _cfg().optim
  bad.schedule = "linear"
  with pytest.raises(ValueError, match="linear"):
    optim.make_schedule(bad, 10)


def test_learning_rates_for_logging():
  cfg = _cfg("--config.optim.schedule=constant", "--config.optim.warmup_steps=10")
  lrs = optim.learning_rates(cfg, 4)
  assert set(lrs) == {"lr", "adam_lr"}
  assert float(lrs["lr"]) == pytest.approx(0.02 * 5 / 10, rel=1e-6)
  assert float(lrs["adam_lr"]) == pytest.approx(3e-3 * 5 / 10, rel=1e-6)
  lrs = optim.learning_rates(_cfg("--config.optim.name=adamw", "--config.optim.schedule=constant",
                                  "--config.optim.warmup_steps=10"), 19)
  assert set(lrs) == {"lr"} and float(lrs["lr"]) == pytest.approx(0.02, rel=1e-6)


# ------------------------------------------------------------------------------------------------ labels


def _expected_label(path):
  name = path.split("/")[-1]
  if name == "router_bias":
    return "frozen"
  if name == "scale":
    return "adam_no_decay"
  if name in ("embedding", "kernel", "router"):  # embed/embedding, lm_head/kernel, moe router
    return "adam"
  assert name in ("q_a", "q_b", "kv_a", "kv_b", "o", "gate", "up", "down", "wi_gate", "wi_up", "wo",
                  "eh_proj"), path
  return "muon"


def test_param_labels_of_tiny_model(abstract):
  labels = _flat(optim.param_labels(_cfg(), abstract))
  assert labels.keys() == _flat(abstract).keys()
  for path, label in labels.items():
    assert label == _expected_label(path), path
  # spot checks of every kind, including the MTP module's and the shared expert's leaves
  assert labels["moe_layers/mlp/router_bias"] == labels["mtp/block/mlp/router_bias"] == "frozen"
  assert labels["final_norm/norm/scale"] == labels["moe_layers/attn/kv_a_norm/scale"] == "adam_no_decay"
  assert labels["embed/embedding"] == labels["lm_head/kernel"] == labels["moe_layers/mlp/router"] == "adam"
  for p in ("dense_layers/attn/q_b", "moe_layers/attn/o", "dense_layers/mlp/down", "moe_layers/mlp/shared/up",
            "moe_layers/mlp/wi_gate", "moe_layers/mlp/wo", "mtp/eh_proj"):
    assert labels[p] == "muon", p
  assert set(labels.values()) == set(optim.LABELS)


def test_new_weights_are_labelled_from_what_their_layer_declares(abstract, monkeypatch):
  """Labels come from the metadata a layer gives ``layers.param`` (no name lists in the optimizer): a weight
  cannot be created without saying whether it is a Muon matrix, and a renamed or new one is labelled by what
  it declared, whatever its path."""
  from flax import nnx
  from joyjax.model import layers
  with pytest.raises(TypeError, match="inputs"):
    layers.param(nnx.Rngs(0), (4, 4), ("embed", "mlp"), std=0.02, dtype=jnp.float32)
  cfg = _cfg()
  info = model.param_info(cfg)
  mlp = info["moe_layers"]["mlp"]
  mlp["mystery_proj"] = model.ParamInfo(axes=("layers", "embed", "mlp"), muon_inputs=("embed",), decay=True,
                                        routed=False, frozen=False)
  mlp["mystery_table"] = model.ParamInfo(axes=("layers", "embed", "mlp"), muon_inputs=None, decay=False,
                                         routed=False, frozen=False)
  mlp["mystery_vec"] = model.ParamInfo(axes=("layers", "embed"), muon_inputs=None, decay=True, routed=False,
                                       frozen=False)
  monkeypatch.setattr(model, "param_info", lambda c: info)
  params = _subtree(abstract, ["moe_layers/mlp/wo"])
  params["moe_layers"]["mlp"]["mystery_proj"] = jax.ShapeDtypeStruct((2, 64, 32), jnp.float32)
  params["moe_layers"]["mlp"]["mystery_table"] = jax.ShapeDtypeStruct((2, 64, 32), jnp.float32)
  params["moe_layers"]["mlp"]["mystery_vec"] = jax.ShapeDtypeStruct((2, 64), jnp.float32)
  labels = optim.param_labels(cfg, params)["moe_layers"]["mlp"]
  assert (labels["mystery_proj"], labels["mystery_table"], labels["mystery_vec"]) == ("muon", "adam",
                                                                                        "adam_no_decay")
  decay = optim.weight_decay_mask(cfg, params)["moe_layers"]["mlp"]
  assert (decay["mystery_proj"], decay["mystery_table"], decay["mystery_vec"]) == (True, False, False)
  dims = optim.muon_dimension_numbers(cfg, params)["moe_layers"]["mlp"]["mystery_proj"]
  assert (tuple(dims.reduction_axis), tuple(dims.output_axis)) == ((1,), (2,))


def test_param_not_in_model_raises_naming_it(abstract):
  params = _subtree(abstract, ["lm_head/kernel"])
  params["lm_head"]["bogus"] = jax.ShapeDtypeStruct((64, 8), jnp.float32)
  with pytest.raises(ValueError, match="lm_head/bogus"):
    optim.param_labels(_cfg(), params)


def test_weight_decay_mask(abstract):
  mask = _flat(optim.weight_decay_mask(_cfg(), abstract))
  for path, decays in mask.items():
    want = _expected_label(path) in ("muon", "adam") and not path.endswith("embed/embedding")
    assert decays == want, path
  assert mask["lm_head/kernel"] and mask["moe_layers/mlp/router"] and mask["moe_layers/mlp/wo"]
  assert not mask["embed/embedding"] and not mask["moe_layers/mlp/router_bias"]
  assert not mask["dense_layers/attn_norm/scale"]


def test_muon_dimension_numbers(abstract):
  dims = _flat(optim.muon_dimension_numbers(_cfg(), abstract),
               is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))
  # o: [layers, heads, head_dim, embed]: (heads, head_dim) in, embed out, layers batched
  assert tuple(dims["moe_layers/attn/o"]) == ((1, 2), (3,))
  # wi_gate: [layers, expert, embed, mlp]: every expert of every layer its own matrix
  assert tuple(dims["moe_layers/mlp/wi_gate"]) == ((2,), (3,))
  assert tuple(dims["moe_layers/mlp/wo"]) == ((2,), (3,))
  assert tuple(dims["dense_layers/attn/q_b"]) == ((1,), (2, 3))
  assert dims["lm_head/kernel"] is None and dims["moe_layers/mlp/router_bias"] is None


# --------------------------------------------------------------------------------------------- optimizer

SUBSET = ["dense_layers/mlp/gate", "moe_layers/attn/o", "moe_layers/mlp/wi_gate", "moe_layers/mlp/router",
          "moe_layers/mlp/router_bias", "moe_layers/mlp_norm/scale", "lm_head/kernel", "embed/embedding"]


def _random_like(abstract_tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(abstract_tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype) for a in leaves])


def _ns(x):
  """Hand-written Newton-Schulz orthogonalisation of one matrix [fan_in, fan_out], in float64."""
  x = np.asarray(x, np.float64)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = NS_COEFFS
  for _ in range(5):
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if transposed else x


def _nesterov(grads, beta):
  """Muon's (optax) bias-corrected Nesterov momentum direction after each of ``grads`` in turn."""
  mu, out = 0.0, []
  for t, g in enumerate(grads, start=1):
    mu = beta * mu + (1 - beta) * g
    out.append(beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t))
  return out


def _step(tx):
  return jax.jit(tx.update)


def test_muon_update_is_newton_schulz_of_nesterov_momentum(abstract):
  # wsd, warmup 10: lr(step) = peak * (step + 1) / 10. Newton-Schulz in float32 (the bfloat16 default is checked
  # against this float32 iteration in tests/test_muon_batched.py).
  cfg = _cfg("--config.optim.grad_clip=0", "--config.optim.muon_ns_dtype=float32")
  o = cfg.optim
  sub = _subtree(abstract, SUBSET)
  params = _random_like(sub, 0, 0.02)
  g1, g2 = _random_like(sub, 1), _random_like(sub, 2)
  tx = optim.make_optimizer(cfg, sub)
  state = tx.init(params)
  step = _step(tx)
  u1, state = step(g1, state, params)
  p1 = optax.apply_updates(params, u1)
  u2, state = step(g2, state, p1)
  lrs = [o.lr * 1 / 10, o.lr * 2 / 10]
  adam_lrs = [o.adam_lr * 1 / 10, o.adam_lr * 2 / 10]
  beta, wd = o.muon_momentum, o.weight_decay

  def check_muon(path, to_matrices, from_matrices, shape_scale, check_spectrum=True):
    w0 = np.asarray(_get(params, path), np.float64)
    w1 = np.asarray(_get(p1, path), np.float64)
    dirs = _nesterov([to_matrices(np.asarray(_get(g, path), np.float64)) for g in (g1, g2)], beta)
    for u, d, lr, w in ((u1, dirs[0], lrs[0], w0), (u2, dirs[1], lrs[1], w1)):
      ortho = from_matrices(np.stack([_ns(m) for m in d]))
      want = -lr * (shape_scale * ortho + wd * w)
      got = np.asarray(_get(u, path), np.float64)
      np.testing.assert_allclose(got, want, atol=2e-5 * lr, rtol=0, err_msg=path)
    if not check_spectrum:
      return
    # After Newton-Schulz every singular value of the (lr-, decay- and shape-scale-removed) update is near 1.
    # For a Gaussian [64, 128] (or [64, 32]) matrix sigma_min / ||X||_F ~ (sqrt(128) - 8) / 90.5 ~ 0.04, which
    # five quintic steps (slope 3.4445 at 0: x 3.4445^5 ~ 490) bring into the iteration's ~[0.7, 1.2] band.
    # (A square Gaussian matrix has singular values near 0 that five steps do not reach: not checked.)
    ortho1 = -(np.asarray(_get(u1, path), np.float64) / lrs[0] + wd * w0) / shape_scale
    sv = np.linalg.svd(to_matrices(ortho1), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.25, (path, sv.min(), sv.max())

  # dense gate [1, 64, 128]: one matrix per layer, fan_out / fan_in = 2 -> scaled by sqrt(2)
  check_muon("dense_layers/mlp/gate", lambda x: x, lambda m: m, math.sqrt(2.0))
  # o [2, 4, 16, 64]: (heads, head_dim) flattened into the 64 inputs; scale 1
  check_muon("moe_layers/attn/o", lambda x: x.reshape(2, 64, 64), lambda m: m.reshape(2, 4, 16, 64), 1.0,
             check_spectrum=False)
  # wi_gate [2, 8, 64, 32]: each expert of each layer on its own; fan_out < fan_in -> scale 1
  check_muon("moe_layers/mlp/wi_gate", lambda x: x.reshape(16, 64, 32), lambda m: m.reshape(2, 8, 64, 32), 1.0)

  # the AdamW part uses adam_lr; its first update is -lr * (g / |g| + wd * p) (no decay for norms/embedding)
  for path, decays in (("lm_head/kernel", True), ("moe_layers/mlp/router", True),
                       ("moe_layers/mlp_norm/scale", False), ("embed/embedding", False)):
    g = np.asarray(_get(g1, path), np.float64)
    w = np.asarray(_get(params, path), np.float64)
    want = -adam_lrs[0] * (g / (np.abs(g) + o.eps) + (wd * w if decays else 0.0))
    np.testing.assert_allclose(np.asarray(_get(u1, path)), want, rtol=1e-5, atol=1e-9, err_msg=path)
  # the frozen router bias: a zero update whatever its gradient
  for u in (u1, u2):
    assert np.all(np.asarray(_get(u, "moe_layers/mlp/router_bias")) == 0.0)


def test_adamw_update_is_adam_for_every_trainable_leaf(abstract):
  cfg = _cfg("--config.optim.name=adamw", "--config.optim.grad_clip=0")
  o = cfg.optim
  sub = _subtree(abstract, SUBSET)
  params = _random_like(sub, 3, 0.02)
  g = _random_like(sub, 4)
  tx = optim.make_optimizer(cfg, sub)
  u, _ = _step(tx)(g, tx.init(params), params)
  lr = o.lr / 10
  decay = _flat(optim.weight_decay_mask(cfg, sub))
  for path, got in _flat(u).items():
    if path.endswith("router_bias"):
      assert np.all(np.asarray(got) == 0.0)
      continue
    gg, w = np.asarray(_get(g, path), np.float64), np.asarray(_get(params, path), np.float64)
    want = -lr * (gg / (np.abs(gg) + o.eps) + (o.weight_decay * w if decay[path] else 0.0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-9, err_msg=path)


def test_frozen_router_bias_keeps_no_optimizer_state(abstract):
  for name in ("muon", "adamw"):
    cfg = _cfg(f"--config.optim.name={name}")
    sub = _subtree(abstract, ["moe_layers/mlp/router_bias", "moe_layers/mlp/router", "moe_layers/mlp/wo"])
    state = jax.eval_shape(optim.make_optimizer(cfg, sub).init, sub)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(state)]
    assert (2, 8) not in shapes, (name, shapes)       # router_bias [layers=2, experts=8]
    assert (2, 64, 8) in shapes and (2, 8, 32, 64) in shapes  # the others have moments


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_least_squares_loss_decreases(abstract, name):
  cfg = _cfg(f"--config.optim.name={name}", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
             "--config.optim.lr=0.1", "--config.optim.adam_lr=0.01", "--config.optim.weight_decay=0")
  sub = _subtree(abstract, ["dense_layers/mlp/gate", "moe_layers/mlp/router", "moe_layers/mlp/router_bias"])
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((48, 64)) / 8.0, jnp.float32)
  w_gate = jnp.asarray(rng.standard_normal((64, 128)) * 0.1, jnp.float32)  # targets: a muon and an adam matrix
  w_router = jnp.asarray(rng.standard_normal((64, 8)) * 0.1, jnp.float32)
  y_gate, y_router = x @ w_gate, x @ w_router

  def fit(p):
    gate = p["dense_layers"]["mlp"]["gate"][0]
    router = p["moe_layers"]["mlp"]["router"][1]
    return jnp.mean((x @ gate - y_gate) ** 2) + jnp.mean((x @ router - y_router) ** 2)

  def loss(p):  # the frozen bias gets a gradient but must not move
    return fit(p) + jnp.sum(p["moe_layers"]["mlp"]["router_bias"] ** 2)

  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sub)
  params["moe_layers"]["mlp"]["router_bias"] = jnp.ones((2, 8), jnp.float32)
  tx = optim.make_optimizer(cfg, sub)

  @jax.jit
  def train(params):
    def body(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), fit(p)
    (p, _), fits = jax.lax.scan(body, (params, tx.init(params)), None, length=30)
    return p, fits

  p, fits = train(params)
  fits = np.asarray(fits)
  first, last = float(fits[0]), float(fit(p))
  assert last < 0.1 * first, (name, first, last)
  assert np.all(np.diff(fits[:5]) < 0), (name, fits[:5])
  assert np.all(np.asarray(p["moe_layers"]["mlp"]["router_bias"]) == 1.0)


def test_clip_by_global_norm_masked():
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[0.0], [4.0]]), "frozen": jnp.array([100.0])}
  mask = {"a": True, "b": True, "frozen": False}
  tx = optim.clip_by_global_norm_masked(1.0, mask)
  out, _ = tx.update(grads, tx.init(grads))
  # global norm over a and b only: 5 -> scaled by 1/5; the masked-off leaf is neither counted nor scaled
  np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[0.0], [0.8]], rtol=1e-6)
  np.testing.assert_allclose(out["frozen"], [100.0])
  small = jax.tree.map(lambda g: g / 10, grads)  # norm 0.5 < 1: unchanged
  out, _ = tx.update(small, tx.init(small))
  np.testing.assert_allclose(out["a"], [0.3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[0.0], [0.4]], rtol=1e-6)


def test_make_optimizer_clips_by_global_norm_of_trainable_grads(abstract):
  """adamw's second update depends on the relative size of the two gradients: with grad_clip=1 a first gradient
  of global norm 10 enters Adam's moments scaled to norm 1 (the frozen router bias's huge gradient not counted),
  a second one of norm 0.5 unscaled."""
  sub = _subtree(abstract, ["moe_layers/mlp/router", "moe_layers/mlp/router_bias"])
  rng = np.random.default_rng(6)
  a = rng.standard_normal((2, 64, 8))
  b = rng.standard_normal((2, 64, 8))
  a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  bias_grad = jnp.full((2, 8), 1e3, jnp.float32)
  grads = [{"moe_layers": {"mlp": {"router": jnp.asarray(10 * a, jnp.float32), "router_bias": bias_grad}}},
           {"moe_layers": {"mlp": {"router": jnp.asarray(0.5 * b, jnp.float32), "router_bias": bias_grad}}}]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sub)

  def second_update(clip):
    cfg = _cfg("--config.optim.name=adamw", "--config.optim.weight_decay=0", f"--config.optim.grad_clip={clip}")
    tx = optim.make_optimizer(cfg, sub)
    state = tx.init(params)
    step = _step(tx)
    _, state = step(grads[0], state, params)
    u, _ = step(grads[1], state, params)
    return np.asarray(u["moe_layers"]["mlp"]["router"], np.float64), cfg.optim

  def adam_second(g1, g2, o):
    m = o.b1 * (1 - o.b1) * g1 + (1 - o.b1) * g2
    v = o.b2 * (1 - o.b2) * g1 ** 2 + (1 - o.b2) * g2 ** 2
    lr = o.lr * 2 / o.warmup_steps
    return -lr * (m / (1 - o.b1 ** 2)) / (np.sqrt(v / (1 - o.b2 ** 2)) + o.eps)

  clipped, o = second_update(1.0)
  np.testing.assert_allclose(clipped, adam_second(a, 0.5 * b, o), rtol=2e-5, atol=1e-9)
  unclipped, o = second_update(0.0)
  np.testing.assert_allclose(unclipped, adam_second(10 * a, 0.5 * b, o), rtol=2e-5, atol=1e-9)
  assert np.max(np.abs(clipped - unclipped)) > 1e-2 * np.max(np.abs(unclipped))
