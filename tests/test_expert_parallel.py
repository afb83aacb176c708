"""Expert parallelism (joyjax.model.expert_parallel): all-to-all dispatch over a real data=2 x expert=4 CPU mesh.

Layout the hand-built routings rely on: tokens [T, ...] are sharded over ('data', 'expert'), data major, so
token t lives on shard t // T_local whose expert coordinate is (t // T_local) % 4; with E = 8 and ep = 4,
expert shard j holds experts 2j and 2j + 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import tiny_config
from joyjax import model
from joyjax.model import expert_parallel as ep_lib

T, H, F, E, K = 32, 8, 16, 8, 2
EP, DATA = 4, 2
T_LOCAL = T // (EP * DATA)  # 4 tokens, 8 (token, slot) rows per shard


def auto_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:DATA * EP]).reshape(DATA, EP), ("data", "expert"))


def explicit_mesh():
  return jax.make_mesh((DATA, EP), ("data", "expert"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def rand(rng, *shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = rand(rng, T, H)
  wg, wu, wo = rand(rng, E, H, F, scale=0.5), rand(rng, E, H, F, scale=0.5), rand(rng, E, F, H, scale=0.5)
  return x, wg, wu, wo


def reference(x, weights, ids, wg, wu, wo, keep=None):
  """Per-expert loop in float64 (numpy): out[t] = sum_s w[t, s] * expert_{ids[t, s]}(x[t]) over kept rows."""
  x, weights, ids = np.asarray(x, np.float64), np.asarray(weights, np.float64), np.asarray(ids)
  wg, wu, wo = (np.asarray(a, np.float64) for a in (wg, wu, wo))
  if keep is not None:
    weights = np.where(keep, weights, 0.0)
  out = np.zeros_like(x)
  for e in range(wg.shape[0]):
    g, u = x @ wg[e], x @ wu[e]
    y = (g / (1 + np.exp(-g)) * u) @ wo[e]
    out += np.sum(np.where(ids == e, weights, 0.0), axis=1)[:, None] * y
  return out


def reference_jax(x, weights, ids, wg, wu, wo):
  """The same in JAX float32 (every expert on every token, then the routing weights), for gradients."""
  h = jax.nn.silu(jnp.einsum("th,ehf->tef", x, wg)) * jnp.einsum("th,ehf->tef", x, wu)
  y = jnp.einsum("tef,efh->teh", h, wo)
  combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(ids, wg.shape[0], dtype=jnp.float32))
  return jnp.einsum("teh,te->th", y, combine)


def run_ep(mesh, x, weights, ids, wg, wu, wo, **kw):
  fn = jax.jit(lambda *a: ep_lib.expert_parallel_experts(*a, mesh=mesh, num_experts=E, **kw))
  with jax.set_mesh(mesh):
    out, dropped = fn(x, weights, ids, wg, wu, wo)
  return np.asarray(out), float(dropped)


def expert_coord(t):
  return (t // T_LOCAL) % EP


@pytest.mark.parametrize("mesh_fn", [auto_mesh, explicit_mesh], ids=["auto", "explicit"])
def test_forced_cross_shard_routing(problem, mesh_fn):
  """(a) Every token goes to experts on two other expert shards; results come back to the right tokens."""
  x, wg, wu, wo = problem
  t = np.arange(T)
  i = expert_coord(t)
  ids = np.stack([2 * ((i + 1) % EP) + t % 2, 2 * ((i + 2) % EP) + (t + 1) % 2], axis=1).astype(np.int32)
  assert np.all(ids // 2 != i[:, None])
  weights = np.stack([0.25 + t / 64, 1.5 - t / 32], axis=1).astype(np.float32)
  out, dropped = run_ep(mesh_fn(), x, jnp.asarray(weights), jnp.asarray(ids), wg, wu, wo)
  np.testing.assert_allclose(out, reference(x, weights, ids, wg, wu, wo), atol=2e-5, rtol=2e-5)
  assert dropped == 0.0


@pytest.mark.parametrize("impl,fuse", [("auto", False), ("reference", False), ("pallas_interpret", True)])
def test_dropless_skewed_routing(problem, impl, fuse):
  """(b) All tokens pick the two experts of expert shard 3: the worst-case buffer still drops nothing (also
  with the local experts on the Pallas kernels, gate/up/SwiGLU fused, inside the shard_map)."""
  x, wg, wu, wo = problem
  rng = np.random.default_rng(1)
  first = rng.integers(6, 8, T)
  ids = np.stack([first, 13 - first], axis=1).astype(np.int32)  # {6, 7} in random order
  weights = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
  out, dropped = run_ep(auto_mesh(), x, jnp.asarray(weights), jnp.asarray(ids), wg, wu, wo, impl=impl,
                        fuse_swiglu=fuse)
  np.testing.assert_allclose(out, reference(x, weights, ids, wg, wu, wo), atol=2e-5, rtol=2e-5)
  assert dropped == 0.0


# Capacity mode. Per shard (local tokens l = 0..3): slot 0 -> expert 0 (shard 0) for every token, slot 1 ->
# expert 2 * (1 + l % 3) (shards 1, 2, 3, 1). Rows per destination in (token, slot) order:
#   shard 0: (0,0) (1,0) (2,0) (3,0);  shard 1: (0,1) (3,1);  shard 2: (1,1);  shard 3: (2,1).
# capacity = ceil(cf * 8 / 4):
#   cf = 1.0 -> C = 2: dropped (2,0) (3,0)                       -> 2 per shard, 16 in all
#   cf = 0.5 -> C = 1: dropped (1,0) (2,0) (3,0) and (3,1)       -> 4 per shard, 32 in all
CAPACITY_CASES = {1.0: (2, [(2, 0), (3, 0)]), 0.5: (1, [(1, 0), (2, 0), (3, 0), (3, 1)])}


@pytest.mark.parametrize("cf", sorted(CAPACITY_CASES))
def test_capacity_drops_exactly_the_excess(problem, cf):
  """(c) Rows past the capacity, in (token, slot) order per destination shard, are dropped (contribute 0)."""
  x, wg, wu, wo = problem
  cap, dropped_local = CAPACITY_CASES[cf]
  assert ep_lib.capacity(T_LOCAL, K, EP, cf) == cap
  t = np.arange(T)
  l = t % T_LOCAL
  ids = np.stack([np.zeros(T), 2 * (1 + l % 3)], axis=1).astype(np.int32)
  weights = np.stack([0.5 + t / 64, 1.0 - t / 64], axis=1).astype(np.float32)
  keep = np.ones((T, K), bool)
  for lt, s in dropped_local:
    keep[l == lt, s] = False
  out, dropped = run_ep(auto_mesh(), x, jnp.asarray(weights), jnp.asarray(ids), wg, wu, wo,
                        capacity_factor=cf)
  assert dropped == len(dropped_local) * DATA * EP
  np.testing.assert_allclose(out, reference(x, weights, ids, wg, wu, wo, keep=keep), atol=2e-5, rtol=2e-5)


def test_gradients_match_reference(problem):
  """(d) Dropless gradients w.r.t. tokens, routing weights and all three expert weights equal the loop's."""
  x, wg, wu, wo = problem
  rng = np.random.default_rng(2)
  ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32)
  ct = rand(rng, T, H)
  mesh = auto_mesh()

  def loss_ep(x, w, wg, wu, wo):
    out, _ = ep_lib.expert_parallel_experts(x, w, ids, wg, wu, wo, mesh=mesh, num_experts=E)
    return jnp.sum(out * ct)

  def loss_ref(x, w, wg, wu, wo):
    return jnp.sum(reference_jax(x, w, ids, wg, wu, wo) * ct)

  with jax.set_mesh(mesh):
    got = jax.jit(jax.grad(loss_ep, argnums=(0, 1, 2, 3, 4)))(x, weights, wg, wu, wo)
  want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(x, weights, wg, wu, wo)
  for name, g, w in zip(("x", "weights", "wi_gate", "wi_up", "wo"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=name)


def test_tokens_not_divisible_by_shards(problem):
  """T = 5 on 8 token shards: padded rows are never sent, count toward nothing and are cut off."""
  x, wg, wu, wo = problem
  ids = np.array([[0, 7], [2, 5], [4, 1], [6, 3], [1, 2]], np.int32)
  weights = np.linspace(0.2, 1.1, 10, dtype=np.float32).reshape(5, 2)
  out, dropped = run_ep(auto_mesh(), x[:5], jnp.asarray(weights), jnp.asarray(ids), wg, wu, wo,
                        capacity_factor=1.0)
  assert out.shape == (5, H) and dropped == 0.0
  np.testing.assert_allclose(out, reference(x[:5], weights, ids, wg, wu, wo), atol=2e-5, rtol=2e-5)


def tiny_params(cfg):
  """Random parameters of the tiny model's shapes, made in numpy (``model.init`` compiles slowly on CPU)."""
  rng = np.random.default_rng(3)

  def make(path, a):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1 + 0.1 * rng.normal(size=a.shape), a.dtype)
    if "router_bias" in name:
      return jnp.asarray(0.01 * rng.normal(size=a.shape), a.dtype)
    return jnp.asarray(cfg.model.init_std * rng.normal(size=a.shape), a.dtype)

  return jax.tree_util.tree_map_with_path(make, model.abstract_params(cfg))


def test_tiny_model_under_expert_mesh_matches_single_device(monkeypatch):
  """(e) The tiny model's logits under data=2 x expert=4 (EP path taken: all_to_all in the lowered program)
  equal the unsharded forward."""
  cfg = tiny_config()
  params = tiny_params(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, 16)).astype(np.int32)
  fwd = lambda p, t: model.forward(cfg, p, t, return_aux=True)
  want, aux0 = jax.jit(fwd)(params, tokens)
  assert np.all(np.asarray(aux0["moe_layers"]["dropped_tokens"]) == 0)

  calls = []
  real = ep_lib.expert_parallel_experts
  monkeypatch.setattr(ep_lib, "expert_parallel_experts", lambda *a, **k: calls.append(1) or real(*a, **k))

  mesh = auto_mesh()
  repl = NamedSharding(mesh, P())

  def place(path, a):
    name = jax.tree_util.keystr(path)
    if any(w in name for w in ("'wi_gate'", "'wi_up'", "'wo'")):
      assert a.ndim == 4 and a.shape[1] == cfg.model.moe.num_experts  # [layers, E, ...]
      return jax.device_put(a, NamedSharding(mesh, P(None, "expert")))
    return jax.device_put(a, repl)

  sharded = jax.tree_util.tree_map_with_path(place, params)
  toks = jax.device_put(tokens, NamedSharding(mesh, P(("data", "expert"))))
  with jax.set_mesh(mesh):
    lowered = jax.jit(fwd).lower(sharded, toks)
    got, aux = lowered.compile()(sharded, toks)
  assert calls and "all_to_all" in lowered.as_text()
  dropped = np.asarray(aux["moe_layers"]["dropped_tokens"])
  assert dropped.shape == (cfg.model.num_layers - cfg.model.first_k_dense,) and np.all(dropped == 0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_mesh_rules_batch_override_reaches_expert_parallelism(monkeypatch):
  """A ``mesh.rules`` override of ``batch`` decides which mesh axes the MoE splits tokens over (it used to be a
  second, hard-coded copy of the default rule): with ``batch=data`` tokens are split over 'data' only (each
  expert shard sees its data shard's tokens, replicated over 'expert'), and the logits are unchanged."""
  mesh = auto_mesh()
  assert ep_lib.token_axes_of(mesh) == ("data", "expert")
  assert ep_lib.token_axes_of(mesh, ("data",)) == ("data",)
  assert ep_lib.token_axes_of(mesh, ("fsdp", "data")) == ("data",)  # size-1 / absent axes drop out

  cfg = tiny_config("--config.mesh.rules=batch=data")
  params = tiny_params(cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (8, 16)).astype(np.int32)
  fwd = lambda p, t: model.forward(cfg, p, t)
  want = jax.jit(fwd)(params, tokens)

  seen = []
  real = ep_lib.expert_parallel_experts
  monkeypatch.setattr(ep_lib, "expert_parallel_experts",
                      lambda *a, **k: seen.append(k["token_axes"]) or real(*a, **k))
  toks = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    got = jax.jit(fwd)(params, toks)
  assert seen and set(seen) == {("data",)}
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
