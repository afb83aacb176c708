"""joyjax.losses.policy: the properties FIBERPO.md asks of FiberPO and FiberPO-Domain (pass-through G = r, the
plain policy gradient on-policy, gradients through the aggregates, rollback slopes, independent sign channels,
block-diagonal Jacobian, reduction of the domain variant), and the GRPO / GSPO / advantage / KL baselines
against hand-written numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from joyjax.config import POLICY_LOSSES
from joyjax.errors import ConfigError
from joyjax.losses import policy

N, L = 4, 6


def _rl(loss="fiberpo", **fiberpo):
  rl = base.get_config().rl
  rl.loss = loss
  for k, v in fiberpo.items():
    rl.fiberpo[k] = v
  return rl


def _inputs(seed=0, scale=0.3, n=N, l=L):
  rng = np.random.default_rng(seed)
  log_ratio = (scale * rng.standard_normal((n, l))).astype(np.float32)
  mask = np.ones((n, l), np.float32)
  mask[1, 4:] = 0  # a shorter response
  mask[2, 1] = 0   # and a hole
  return jnp.asarray(log_ratio), jnp.asarray(mask)


# Everything runs under jit: one compile per function instead of one per eager op keeps the file fast.
_gates = jax.jit(policy.fiberpo_gates, static_argnames=("c_plus", "c_minus", "eps", "steepness"))
_gate = jax.jit(policy.gate)


def _loss(rl, *args, **kw):
  """policy.policy_loss(rl, *args, **kw) under jit (rl and kw closed over)."""
  return jax.jit(lambda *a: policy.policy_loss(rl, *a, **kw))(*args)


def _w_of(log_ratio, mask, **kw):
  return _gates(log_ratio, mask, **kw)[1]["w"]


def _jac(fn, *args, **kw):
  return jax.jit(jax.jacobian(lambda *a: fn(*a, **kw)))(*args)


# ------------------------------------------------------------------------------------------------ the gate


def test_gate_values_in_each_region():
  c, t = 0.2, 4.0  # pass-through |x| <= 0.2, rollback 0.2 < |x| < 0.25, zero beyond
  x = jnp.array([0.1, -0.15, 0.22, -0.22, 0.3, -1.0, 0.0], jnp.float32)
  want = [0.1, -0.15, 5 * 0.2 - 4 * 0.22, -(5 * 0.2 - 4 * 0.22), 0.0, 0.0, 0.0]
  np.testing.assert_allclose(_gate(x, c, t), want, atol=1e-7)


def test_gate_is_continuous_at_both_breakpoints():
  c, t, d = 0.2, 4.0, 1e-5
  for bp in (c, (1 + 1 / t) * c):
    for s in (1.0, -1.0):
      lo, hi = _gate(jnp.float32(s * (bp - d)), c, t), _gate(jnp.float32(s * (bp + d)), c, t)
      assert abs(float(hi - lo)) <= (t + 1) * 2 * d + 1e-6, (bp, s, float(lo), float(hi))
  assert float(_gate(jnp.float32(c), c, t)) == pytest.approx(c)


def test_gate_slopes_one_minus_t_zero():
  c, t = 0.2, 4.0
  x = jnp.array([0.1, -0.1, 0.22, -0.22, 0.3, -0.3], jnp.float32)
  slopes = jax.jit(jax.vmap(jax.grad(policy.gate), in_axes=(0, None, None)))(x, c, t)
  np.testing.assert_allclose(slopes, [1.0, 1.0, -t, -t, 0.0, 0.0], atol=0)


# ------------------------------------------------------------------------------------------------ FiberPO


def test_g_equals_r_when_nothing_clips():
  lr, mask = _inputs(scale=0.002)
  g, aux = _gates(lr, mask, c_plus=1.0, c_minus=1.0, eps=0.1)
  np.testing.assert_allclose(g, jnp.where(mask > 0, jnp.exp(lr), 0.0), atol=1e-6)
  np.testing.assert_allclose(aux["w"], jnp.exp((lr * mask).sum(-1) / mask.sum(-1)), atol=1e-6)
  assert not aux["token_gated"].any() and not aux["trajectory_gated"].any()
  # and the gates do engage on large ratios (the equality above is not vacuous)
  g2, aux2 = _gates(lr * 200, mask, c_plus=0.2, c_minus=0.1, eps=0.025)
  assert aux2["token_gated"].any() and not np.allclose(g2, jnp.where(mask > 0, jnp.exp(lr * 200), 0.0))


@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_on_policy_gradient_is_the_plain_policy_gradient(loss):
  """At r = 1: dJ/dlogp_i = A_tau / (N T_tau) on each valid token (every loss, including fiberpo_domain)."""
  rng = np.random.default_rng(1)
  _, mask = _inputs()
  logp = jnp.asarray(-rng.random((N, L)), jnp.float32)
  adv = jnp.array([1.0, -0.5, 2.0, -1.5], jnp.float32)
  kw = dict(group_ids=jnp.array([0, 0, 1, 1]), domain_ids=jnp.array([0, 0, 0, 0]), num_groups=2, num_domains=1)
  grad = jax.jit(jax.grad(lambda lp: policy.policy_loss(_rl(loss), lp, logp, adv, mask, **kw)[0]))(logp)
  want = -(adv / (N * mask.sum(-1)))[:, None] * mask
  np.testing.assert_allclose(grad, want, atol=1e-6)


def test_g_multiplies_a_whatever_its_sign():
  """No PPO min: J is linear in A for FiberPO (flipping A flips the loss even where gates clip); GRPO's is not."""
  lr, mask = _inputs(seed=2, scale=0.4)
  old = jnp.zeros_like(lr)
  adv = jnp.array([1.0, -0.5, 2.0, -1.5], jnp.float32)
  for loss in ("fiberpo", "fiberpo_domain"):
    kw = dict(group_ids=jnp.array([0, 0, 1, 1]), domain_ids=jnp.array([0, 0, 1, 1]), num_groups=2,
              num_domains=2)
    pos, m = _loss(_rl(loss), lr, old, adv, mask, **kw)
    neg, _ = _loss(_rl(loss), lr, old, -adv, mask, **kw)
    assert m["gated_tokens"] > 0
    np.testing.assert_allclose(neg, -pos, rtol=1e-6)
  pos, _ = _loss(_rl("grpo"), lr, old, adv, mask)
  neg, _ = _loss(_rl("grpo"), lr, old, -adv, mask)
  assert abs(float(neg + pos)) > 1e-3


def test_gradients_flow_through_the_aggregates():
  """No stop-gradient: in pass-through dw_tau/dlog r_j = w_tau / T_tau for every valid token j of tau (not 0),
  and the whole Jacobian of w and of G matches central finite differences."""
  lr, mask = _inputs(seed=3, scale=0.05)
  kw = dict(c_plus=1.0, c_minus=1.0, eps=0.5)
  jac = _jac(_w_of, lr, mask, **kw)  # [N, N, L]
  w = _w_of(lr, mask, **kw)
  for tau in range(N):
    np.testing.assert_allclose(jac[tau, tau], w[tau] / mask[tau].sum() * mask[tau], rtol=1e-5, atol=1e-7)
  # and G off pass-through (some fiber clips active, the other channel's aggregate still inside eps): each token
  # of a trajectory moves the others' G through the aggregates
  lr2, _ = _inputs(seed=3, scale=0.2)
  kw2 = dict(c_plus=1.0, c_minus=1.0, eps=0.15)
  g_of = lambda x: _gates(x, mask, **kw2)[0]  # noqa: E731
  assert _gates(lr2, mask, **kw2)[1]["token_gated"].any()
  jac_g = _jac(g_of, lr2).reshape(N * L, N * L)
  h = 1e-3
  e = h * jnp.eye(N * L).reshape(N * L, N, L)  # one perturbed token per row
  w_of = jax.vmap(lambda x: _w_of(x, mask, **kw))
  fd_w = ((w_of(lr + e) - w_of(lr - e)) / (2 * h)).T
  fd_g = ((jax.vmap(g_of)(lr2 + e) - jax.vmap(g_of)(lr2 - e)) / (2 * h)).reshape(N * L, N * L).T
  np.testing.assert_allclose(jac.reshape(N, N * L), fd_w, atol=2e-3)
  np.testing.assert_allclose(jac_g, fd_g, atol=2e-3)
  assert np.abs(jac_g - np.diag(np.diag(jac_g))).max() > 1e-2  # off-diagonal terms within a trajectory


def _one(*values):
  return jnp.array([values], jnp.float32), jnp.ones((1, len(values)), jnp.float32)


@pytest.mark.parametrize("steepness", [0.0, 10.0])
def test_rollback_slope_then_zero(steepness):
  """a_plus in the band: dw/da_plus = -T w (T = T_tau = 4, or the fixed steepness); beyond the band 0."""
  c_plus, t_tau = 0.2, 4
  t = steepness or t_tau
  kw = dict(c_plus=c_plus, c_minus=0.1, eps=0.025, steepness=steepness)
  lr, mask = _one(*[0.205] * t_tau)  # a_plus = 0.205: in (C, (1 + 1/T) C) for T = 4 and T = 10
  w = _w_of(lr, mask, **kw)
  np.testing.assert_allclose(w, np.exp((t + 1) * c_plus - t * 0.205), rtol=1e-6)
  dw = _jac(_w_of, lr, mask, **kw)[0, 0]
  # dw/dlog r_j = dw/da_plus * da_plus/dlog r_j = dw/da_plus / T_tau
  np.testing.assert_allclose(dw * t_tau, -t * w[0] * np.ones(t_tau), rtol=1e-5)
  beyond, mask = _one(*[0.3] * t_tau)
  assert float(_w_of(beyond, mask, **kw)[0]) == pytest.approx(1.0)
  np.testing.assert_array_equal(_jac(_w_of, beyond, mask, **kw), 0.0)


def test_sign_channels_are_gated_independently():
  kw = dict(c_plus=0.2, c_minus=0.1, eps=0.025)  # T = 4: plus band (0.2, 0.25), minus band (0.1, 0.125)
  logw = lambda x, m: jnp.log(_w_of(x, m, **kw))[0]  # noqa: E731
  g_plus = 5 * 0.2 - 4 * 0.205  # a_plus = (0.4 + 0.42) / 4 = 0.205, in the plus band
  inside, mask = _one(0.4, 0.42, -0.1, -0.1)   # a_minus = 0.05: pass-through
  outside, _ = _one(0.4, 0.42, -0.3, -0.3)     # a_minus = 0.15: beyond its band, zeroed
  assert float(logw(inside, mask)) == pytest.approx(g_plus - 0.05, abs=1e-6)
  assert float(logw(outside, mask)) == pytest.approx(g_plus, abs=1e-6)
  d_in, d_out = jax.jit(jax.grad(logw))(inside, mask), jax.jit(jax.grad(logw))(outside, mask)
  np.testing.assert_allclose(d_in[0, :2], d_out[0, :2], atol=1e-6)  # the plus channel: unchanged
  np.testing.assert_allclose(d_in[0, :2], -4 / 4, atol=1e-6)        # slope -T through da_plus = 1/T
  np.testing.assert_allclose(d_out[0, 2:], 0.0, atol=0)             # the zeroed minus channel
  # and the other way: the plus channel leaves the band, the minus channel's contribution stays
  plus_out, _ = _one(0.6, 0.6, -0.1, -0.1)  # a_plus = 0.3 > 0.25
  assert float(logw(plus_out, mask)) == pytest.approx(-0.05, abs=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(logw))(plus_out, mask)[0, 2:], d_in[0, 2:], atol=1e-6)
  np.testing.assert_allclose(d_in[0, 2:], 1 / 4, atol=1e-6)


def test_fiberpo_jacobian_is_block_diagonal_over_trajectories():
  lr, mask = _inputs(seed=4, scale=0.3)  # fiber clips and base gates active
  g, aux = _gates(lr, mask, c_plus=0.2, c_minus=0.1, eps=0.025)
  assert aux["token_gated"].any() and aux["trajectory_gated"].any()
  jac = np.asarray(_jac(lambda x: _gates(x, mask, c_plus=0.2, c_minus=0.1, eps=0.025)[0], lr)).reshape(N, L, N, L)
  for a in range(N):
    for b in range(N):
      if a != b:
        np.testing.assert_array_equal(jac[a, :, b, :], 0.0)
    assert np.abs(jac[a, :, a, :]).max() > 0


# ------------------------------------------------------------------------------------------------ FiberPO-Domain


def _domain(lr, mask, group_ids, domain_ids, budgets, eps=0.025, steepness=0.0):
  fn = lambda x, m: policy.fiberpo_domain_gates(  # noqa: E731
      x, m, jnp.asarray(group_ids), jnp.asarray(domain_ids), num_groups=int(max(group_ids)) + 1,
      num_domains=int(max(domain_ids)) + 1, budgets=budgets, eps=eps, steepness=steepness)
  return fn(lr, mask) if isinstance(lr, jax.core.Tracer) else jax.jit(fn)(lr, mask)


def test_domain_with_loose_upper_budgets_equals_fiberpo():
  """Domain and group budgets 1e3: G equals FiberPO's (fiber clips active; the trajectory level in pass-through,
  where the two definitions coincide: see fiberpo_domain_gates)."""
  lr, mask = _inputs(seed=5, scale=0.05)
  budgets = {"domain": (1e3, 1e3), "group": (1e3, 1e3), "trajectory": (0.2, 0.1)}
  g_dom, aux_dom = _domain(lr, mask, [0, 0, 1, 1], [0, 0, 0, 1], budgets)
  g, aux = _gates(lr, mask, c_plus=0.2, c_minus=0.1, eps=0.025)
  assert aux["token_gated"].any()
  np.testing.assert_allclose(g_dom, g, atol=1e-6)
  np.testing.assert_array_equal(aux_dom["token_gated"], aux["token_gated"])
  np.testing.assert_allclose(aux_dom["w"], aux["w"], atol=1e-6)


def test_domain_aggregates_levels_and_counts():
  """s_g is the mean of the group's trajectories, s_D the trajectory-count-weighted mean of its groups; the group
  level rolls back with T_g = the group's trajectory count."""
  lr = jnp.array([[0.1, 0.1], [0.3, 0.3], [0.2, 0.2], [0.0, 0.0], [0.05, 0.05]], jnp.float32)
  mask = jnp.ones_like(lr)
  groups, domains = [0, 0, 1, 1, 2], [0, 0, 0, 0, 0]
  budgets = {"domain": (1e3, 1e3), "group": (1e3, 1e3), "trajectory": (1e3, 1e3)}
  _, aux = _domain(lr, mask, groups, domains, budgets)
  np.testing.assert_allclose(aux["group_a_plus"], [0.2, 0.2, 0.1, 0.1, 0.05], atol=1e-7)
  np.testing.assert_allclose(aux["domain_a_plus"], (2 * 0.2 + 2 * 0.1 + 0.05) / 5, atol=1e-7)
  np.testing.assert_allclose(aux["w"], np.exp([0.1, 0.3, 0.2, 0.0, 0.05]), rtol=1e-6)  # telescopes to a_tau
  # group 0 sits 0.07 above the domain (0.13): group budget 0.05, T_g = 2 -> band (0.05, 0.075), slope -2
  budgets["group"] = (0.05, 0.05)
  _, aux = _domain(lr, mask, groups, domains, budgets)
  g0 = 3 * 0.05 - 2 * 0.07
  np.testing.assert_allclose(np.log(aux["w"][0]), 0.13 + g0 + (0.1 - 0.2), atol=1e-6)
  assert bool(aux["trajectory_gated"][0]) and not bool(aux["trajectory_gated"][2])  # group 1: -0.03, inside
  # group 2 (one trajectory) sits 0.08 below: T_g = 1 -> band (0.05, 0.1), g = -(2 * 0.05) + 0.08
  np.testing.assert_allclose(np.log(aux["w"][4]), 0.13 + (-0.1 + 0.08) + 0.0, atol=1e-6)
  # steepness > 0: one fixed T for every level (T = 1: group band (0.05, 0.1))
  _, aux = _domain(lr, mask, groups, domains, budgets, steepness=1.0)
  np.testing.assert_allclose(np.log(aux["w"][0]), 0.13 + (2 * 0.05 - 0.07) + (0.1 - 0.2), atol=1e-6)


def test_domain_jacobian_couples_only_within_the_hierarchy():
  """A trajectory's G depends on its group's and domain's tokens (the spec's levels), never on another
  domain's; in pass-through the levels telescope and the Jacobian is block-diagonal again."""
  rng = np.random.default_rng(6)
  n, l = 6, 4
  lr = 0.01 * rng.standard_normal((n, l))
  lr[:2] += 0.15  # group 0 drifts: its group level leaves pass-through
  lr, mask = jnp.asarray(lr, jnp.float32), jnp.ones((n, l), jnp.float32)
  groups, domains = [0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]
  budgets = {"domain": (1e3, 1e3), "group": (0.06, 0.06), "trajectory": (0.2, 0.1)}
  _, aux = _domain(lr, mask, groups, domains, budgets)
  assert bool(aux["trajectory_gated"][0])
  jac = np.asarray(_jac(lambda x: _domain(x, mask, groups, domains, budgets)[0], lr)).reshape(n, l, n, l)
  for a in range(n):
    for b in range(n):
      if domains[a] != domains[b]:
        np.testing.assert_array_equal(jac[a, :, b, :], 0.0)
  assert np.abs(jac[0, :, 1, :]).max() > 1e-3  # same group, group level gated: coupled
  loose = {"domain": (1e3, 1e3), "group": (1e3, 1e3), "trajectory": (1e3, 1e3)}
  jac = np.asarray(_jac(lambda x: _domain(x, mask, groups, domains, loose, eps=1.0)[0], lr)).reshape(
      n, l, n, l)
  for a in range(n):
    for b in range(n):
      if a != b:
        np.testing.assert_allclose(jac[a, :, b, :], 0.0, atol=1e-6)


def test_level_budgets_default_to_the_shared_pair():
  fp = _rl().fiberpo
  assert policy.fiberpo_level_budgets(fp) == {"domain": (0.2, 0.1), "group": (0.2, 0.1), "trajectory": (0.2, 0.1)}
  fp.group_c_plus, fp.domain_c_minus = 0.5, 0.7
  assert policy.fiberpo_level_budgets(fp) == {"domain": (0.2, 0.7), "group": (0.5, 0.1), "trajectory": (0.2, 0.1)}


# ------------------------------------------------------------------------------------------------ baselines


def _np_token_mean(values, mask):
  return float(np.mean((values * mask).sum(-1) / np.maximum(mask.sum(-1), 1)))


LR_SMALL = np.array([[0.5, -0.1, 0.05, 0.0], [-0.6, 0.2, 0.3, 9.0]], np.float32)
MASK_SMALL = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
ADV_SMALL = np.array([1.0, -0.5], np.float32)


def test_grpo_matches_numpy_ppo_clip():
  rl = _rl("grpo")
  r = np.exp(LR_SMALL)
  a = ADV_SMALL[:, None]
  terms = np.minimum(r * a, np.clip(r, 1 - rl.clip_low, 1 + rl.clip_high) * a)
  old = np.zeros_like(LR_SMALL)
  loss, m = _loss(rl, jnp.asarray(LR_SMALL), jnp.asarray(old), jnp.asarray(ADV_SMALL),
                               jnp.asarray(MASK_SMALL))
  assert float(loss) == pytest.approx(-_np_token_mean(terms, MASK_SMALL), abs=1e-6)
  # clipped: token 0 (r = 1.65 > 1.28, A > 0) and token 4 (r = 0.55 < 0.8, A < 0) of the 7 valid ones
  assert float(m["gated_tokens"]) == pytest.approx(2 / 7)
  assert float(m["gated_trajectories"]) == 0.0
  assert float(m["max_ratio"]) == pytest.approx(np.exp(0.5), rel=1e-6)  # the masked 9.0 is not a token
  assert float(m["mean_ratio"]) == pytest.approx((r * MASK_SMALL).sum() / 7, rel=1e-6)


def test_gspo_matches_numpy_sequence_clip():
  rl = _rl("gspo")
  seq = np.exp((LR_SMALL * MASK_SMALL).sum(-1) / MASK_SMALL.sum(-1))  # exp(0.1125), exp(-0.0333)
  terms = np.minimum(seq * ADV_SMALL, np.clip(seq, 1 - rl.clip_low, 1 + rl.clip_high) * ADV_SMALL)
  old = jnp.zeros_like(jnp.asarray(LR_SMALL))
  loss, m = _loss(rl, jnp.asarray(LR_SMALL), old, jnp.asarray(ADV_SMALL), jnp.asarray(MASK_SMALL))
  assert float(loss) == pytest.approx(-terms.mean(), abs=1e-6)
  assert float(m["gated_trajectories"]) == 0.0
  # a tight clip: sequence 0 (s = 1.119 > 1.05, A > 0) is clipped, sequence 1 (s = 0.967 > 0.95) is not
  rl.clip_low = rl.clip_high = 0.05
  terms = np.minimum(seq * ADV_SMALL, np.clip(seq, 0.95, 1.05) * ADV_SMALL)
  loss, m = _loss(rl, jnp.asarray(LR_SMALL), old, jnp.asarray(ADV_SMALL), jnp.asarray(MASK_SMALL))
  assert float(loss) == pytest.approx(-terms.mean(), abs=1e-6)
  assert float(m["gated_trajectories"]) == 0.5 and float(m["gated_tokens"]) == pytest.approx(4 / 7)


def test_group_advantages_by_hand():
  rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  a = 0.5 / (0.5 + 1e-6)  # group 1: mean 0.5, population std 0.5; group 2: std 0
  np.testing.assert_allclose(policy.group_advantages(rewards, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(policy.group_advantages(rewards, 4, "group_mean"), [.5, -.5, -.5, .5, 0, 0, 0, 0])
  out = policy.group_advantages(rewards, 4, "none")
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, rewards)
  with pytest.raises(ConfigError, match="rl.advantage"):
    policy.group_advantages(rewards, 4, "rank")


def test_kl_term_is_k3():
  rl = _rl("fiberpo")
  rng = np.random.default_rng(7)
  logp = -rng.random((2, 4)).astype(np.float32)
  ref = logp + 0.3 * rng.standard_normal((2, 4)).astype(np.float32)
  d = ref - logp
  k3 = _np_token_mean(np.exp(d) - d - 1, MASK_SMALL)
  args = (jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(ADV_SMALL), jnp.asarray(MASK_SMALL))
  base_loss, m0 = _loss(rl, *args)
  assert float(m0["kl"]) == 0.0
  loss, m = _loss(rl, *args, ref_logp=jnp.asarray(ref))  # kl_coef 0: reported, not added
  assert float(m["kl"]) == pytest.approx(k3, rel=1e-5) and float(loss) == pytest.approx(float(base_loss))
  rl.kl_coef = 0.1
  loss, m = _loss(rl, *args, ref_logp=jnp.asarray(ref))
  assert float(loss - base_loss) == pytest.approx(0.1 * k3, rel=1e-5)
  # gradient of the KL term w.r.t. logp: (1 - exp(ref - logp)) / (N T_tau) per valid token
  grad = jax.jit(jax.grad(lambda lp: policy.policy_loss(rl, lp, *args[1:], ref_logp=jnp.asarray(ref))[0]))(
      args[0])
  grad0 = jax.jit(jax.grad(lambda lp: policy.policy_loss(rl, lp, *args[1:])[0]))(args[0])
  want = 0.1 * (1 - np.exp(d)) * MASK_SMALL / (2 * MASK_SMALL.sum(-1, keepdims=True))
  np.testing.assert_allclose(grad - grad0, want, atol=1e-6)


@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_masked_tokens_contribute_nothing(loss):
  rl = _rl(loss)
  rl.kl_coef = 0.05
  lr, mask = _inputs(seed=8, scale=0.2)
  rng = np.random.default_rng(8)
  old = jnp.asarray(-rng.random((N, L)), jnp.float32)
  ref = old + 0.1
  adv = jnp.array([1.0, -0.5, 2.0, -1.5], jnp.float32)
  kw = dict(group_ids=jnp.array([0, 0, 1, 1]), domain_ids=jnp.array([0, 0, 0, 0]), num_groups=2, num_domains=1,
            ref_logp=ref)
  f = jax.jit(jax.value_and_grad(lambda lp: policy.policy_loss(rl, lp, old, adv, mask, **kw)[0]))
  logp = old + lr
  value, grad = f(logp)
  for junk in (30.0, -1e4, jnp.nan):
    value2, grad2 = f(jnp.where(mask > 0, logp, junk))
    assert float(value2) == float(value)
    np.testing.assert_array_equal(grad2, grad)
  np.testing.assert_array_equal(np.asarray(grad)[np.asarray(mask) == 0], 0.0)


@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_policy_loss_through_the_config(loss):
  rl = _rl(loss)
  lr, mask = _inputs(seed=9, scale=0.1)
  old = jnp.full((N, L), -1.0, jnp.float32)
  adv = policy.group_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), 2, rl.advantage)
  kw = dict(group_ids=jnp.array([0, 0, 1, 1]), domain_ids=jnp.array([0, 0, 1, 1]), num_groups=2, num_domains=2)
  fn = jax.jit(lambda lp, o, a, m, r: policy.policy_loss(rl, lp, o, a, m, ref_logp=r, **kw))
  value, metrics = fn(old + lr, old, adv, mask, old)
  assert np.isfinite(float(value))
  assert sorted(metrics) == sorted(policy.POLICY_METRICS)  # (jit returns dicts sorted by key)
  for k, v in metrics.items():
    assert v.shape == () and v.dtype == jnp.float32, k
  assert float(metrics["policy_loss"]) == pytest.approx(float(value))  # kl_coef 0: the loss is -J
  assert float(metrics["advantage_mean"]) == pytest.approx(float(adv.mean()), abs=1e-6)
  mlr = np.asarray(lr)[np.asarray(mask) > 0]
  assert float(metrics["approx_kl_old"]) == pytest.approx(float(np.mean(np.exp(-mlr) + mlr - 1)), rel=1e-4)
  on_policy = fn(old, old, adv, mask, old)[1]
  assert float(on_policy["mean_ratio"]) == 1.0 and float(on_policy["gated_tokens"]) == 0.0
  assert float(on_policy["gated_trajectories"]) == 0.0 and float(on_policy["kl"]) == 0.0


def test_unknown_loss_and_missing_groups_are_errors():
  lr, mask = _inputs()
  adv = jnp.zeros((N,))
  with pytest.raises(ConfigError, match="rl.loss"):
    policy.policy_loss(_rl("ppo"), lr, lr, adv, mask)
  with pytest.raises(ValueError, match="group_ids"):
    policy.policy_loss(_rl("fiberpo_domain"), lr, lr, adv, mask)
