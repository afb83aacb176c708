"""RL policy losses: FiberPO, FiberPO-Domain and the GRPO / GSPO baselines, as pure functions of log-probs.

The specification is the project's FIBERPO.md, a reading of the FiberPO paper (arXiv 2603.08239, eqs. 6-16 for
FiberPO, eqs. 31-33 for FiberPO-Domain) checked against the JoyAI-LLM Flash report (arXiv 2604.03044, section 3.3,
eqs. 1-5); this module follows it formula by formula.

**Objective** (maximised; the loss is its negative). With ``log r_i = log pi_theta - log pi_old`` per valid
response token, ``A_tau`` the trajectory's advantage and ``T_tau`` its number of valid tokens,

    J = (1/|B|) sum_tau (1/T_tau) sum_{t in tau} G_i A_tau        (token mean per trajectory, then mean)

and the gate ``G_i = w_tau * f_i`` is a trajectory-level (base) weight times a token-level (fiber) factor:

* **Base level.** The sign-split aggregates ``a_plus = mean_t max(log r_t, 0)`` and ``a_minus = mean_t
  max(-log r_t, 0)`` each pass the piecewise-linear gate ``g(x; C, T)`` (``gate``: pass-through for |x| <= C,
  a rollback of slope -T up to (1 + 1/T) C, zero beyond) with ``T = T_tau``, and
  ``w_tau = exp(g(a_plus; C+, T) - g(a_minus; C-, T))``.
* **Fiber level.** With ``l_i = sign(log r_i)`` (+1 at zero), ``u_i = l_i log r_i - a_{l_i}`` (the token's
  residual around its own channel's aggregate) and ``v_i = -a_{-l_i}`` (the other channel),
  ``f_i = exp(clip(l_i u_i, -eps, eps) - clip(l_i v_i, -eps, eps))``.

With no gate active, ``log w_tau = mean_t log r_t`` and ``log f_i = log r_i - mean_t log r_t``, so ``G_i = r_i``
exactly: at r = 1 the gradient of J is the plain policy gradient. Nothing is stop-gradiented (the gradient flows
through the aggregates and the gates) and there is no PPO-style ``min``: G multiplies A whatever A's sign.

**FiberPO-Domain** (four levels, domain -> prompt group -> trajectory -> token): per sign channel a group's
aggregate is the mean of its trajectories', a domain's the trajectory-count-weighted mean of its groups', and
``log w = sum over levels [g(a+_L - a+_parent; C+_L, T_L) - g(a-_L - a-_parent; C-_L, T_L)]`` (the domain has no
parent); the fiber factor is FiberPO's. See ``fiberpo_domain_gates`` for the level counts T_g, T_D.

**Baselines.** GRPO: the PPO clip per token, ``min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``. GSPO: one
sequence ratio ``exp(mean_t log r_t)`` clipped per sequence the same way, broadcast over the tokens. Each is
written as a weight W that multiplies A (``W = min(r, clip(r))`` for A >= 0, ``max(r, clip(r))`` for A < 0,
which is the PPO min), so every loss shares the aggregation of J above.

``policy_loss`` is the one entry point that reads the config (``c.rl`` of configs/base.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax.config import ADVANTAGES, POLICY_LOSSES
from joyjax.errors import ConfigError

# The scalars ``policy_loss`` reports, every one float32 (the trainer logs them under these names).
POLICY_METRICS = ("policy_loss", "kl", "mean_ratio", "max_ratio", "gated_tokens", "gated_trajectories",
                  "approx_kl_old", "advantage_mean")


# --------------------------------------------------------------------------------------------- the gate


def gate(x, c, t):
  """The piecewise-linear gate g(x; C, T) of FIBERPO.md, elementwise (broadcasting x, c, t).

  ``g = x`` for |x| <= C (pass-through); ``g = sign(x) (T + 1) C - T x`` for C < |x| < (1 + 1/T) C (rollback,
  slope -T: a ratio that drifts past its budget is pulled back); ``g = 0`` beyond. Continuous at both
  breakpoints (C and (1 + 1/T) C) and a hard clip as T grows. Written with ``jnp.where`` so that autodiff gives
  slope 1, -T and 0 in the three regions. T = 0 (never passed by the callers, which use counts >= 1) makes
  the band unbounded with slope 0: a clamp at +-C.
  """
  x = jnp.asarray(x)
  ax = jnp.abs(x)
  sign = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
  rollback = sign * (t + 1.0) * c - t * x
  # |x| < (1 + 1/T) C written as T |x| < (T + 1) C: no division by T
  in_band = (ax > c) & (t * ax < (t + 1.0) * c)
  return jnp.where(ax <= c, x, jnp.where(in_band, rollback, jnp.zeros_like(rollback)))


def _clip_symmetric(x, eps):
  # clip(x, -eps, eps) with slope exactly 1 inside and 0 outside (jnp.clip splits the slope at the boundary)
  return jnp.where(jnp.abs(x) <= eps, x, jnp.sign(x) * eps)


# --------------------------------------------------------------------------------------------- FiberPO


def _fiber_parts(log_ratio, mask):
  """The pieces both FiberPO variants share: (masked log-ratios, valid, T_tau, channel sign l, a_plus,
  a_minus). Masked tokens read as log r = 0 (their values may be anything, even non-finite)."""
  valid = jnp.asarray(mask) > 0
  lr = jnp.where(valid, log_ratio, 0.0).astype(jnp.float32)
  count = valid.sum(-1).astype(jnp.float32)
  denom = jnp.maximum(count, 1.0)  # an empty trajectory: aggregates 0, not 0/0
  # l = sign(log r) with +1 at zero: each token belongs to exactly one channel, the same one the fiber uses
  positive = lr >= 0
  a_plus = jnp.where(valid & positive, lr, 0.0).sum(-1) / denom
  a_minus = jnp.where(valid & ~positive, -lr, 0.0).sum(-1) / denom
  return lr, valid, count, positive, a_plus, a_minus


def _fiber_factor(lr, positive, a_plus, a_minus, eps):
  """f_i of FIBERPO.md and whether either of its clips is active, both [N, L]."""
  l = jnp.where(positive, 1.0, -1.0)
  a_own = jnp.where(positive, a_plus[:, None], a_minus[:, None])
  a_other = jnp.where(positive, a_minus[:, None], a_plus[:, None])
  u = l * lr - a_own      # the token's residual around its own channel's trajectory aggregate
  v = -a_other            # the other channel's aggregate, which the base weight also removed
  lu, lv = l * u, l * v
  log_f = _clip_symmetric(lu, eps) - _clip_symmetric(lv, eps)
  return jnp.exp(log_f), (jnp.abs(lu) > eps) | (jnp.abs(lv) > eps)


def _level_steepness(count, steepness):
  # steepness 0: the level's own count (>= 1 so an empty level stays in pass-through); else one fixed T
  return jnp.maximum(count, 1.0) if steepness == 0 else jnp.full_like(count, float(steepness))


def fiberpo_gates(log_ratio, mask, *, c_plus, c_minus, eps, steepness=0.0):
  """FiberPO's gate ``G = w_tau * f_i`` [N, L] and ``aux`` (per-trajectory ``w``, ``a_plus``, ``a_minus`` [N];
  ``token_gated`` [N, L] bool: the fiber clip is active on a valid token; ``trajectory_gated`` [N] bool: a base
  channel is outside pass-through).

  log_ratio, mask: [N, L] (mask 1 on valid response tokens). ``steepness`` (static) 0 uses T = T_tau, the
  trajectory's valid-token count; > 0 is a fixed T. No stop-gradient anywhere: the gradient of G reaches every
  token of its trajectory through a_plus / a_minus. G is 0 on masked tokens; an empty trajectory has G = 0.
  """
  lr, valid, count, positive, a_plus, a_minus = _fiber_parts(log_ratio, mask)
  t = _level_steepness(count, steepness)
  w = jnp.exp(gate(a_plus, c_plus, t) - gate(a_minus, c_minus, t))
  f, fiber_clipped = _fiber_factor(lr, positive, a_plus, a_minus, eps)
  g = jnp.where(valid, w[:, None] * f, 0.0)
  aux = {"w": w, "a_plus": a_plus, "a_minus": a_minus, "token_gated": fiber_clipped & valid,
         "trajectory_gated": (a_plus > c_plus) | (a_minus > c_minus)}
  return g, aux


def fiberpo_domain_gates(log_ratio, mask, group_ids, domain_ids, *, num_groups, num_domains, budgets, eps,
                         steepness=0.0):
  """FiberPO-Domain's gate [N, L] and ``aux`` (as ``fiberpo_gates``, plus the per-trajectory ``group_a_plus``,
  ``group_a_minus``, ``domain_a_plus``, ``domain_a_minus`` its levels used).

  group_ids, domain_ids: int [N], each trajectory's prompt group in [0, num_groups) and domain in
  [0, num_domains) (static counts: segment sums). A group lies in one domain. ``budgets`` maps "domain",
  "group" and "trajectory" to that level's (C+, C-).

  Levels, per sign channel s in {plus, minus}: s_tau (FiberPO's aggregate); s_g = the mean of the group's
  trajectories' s_tau; s_D = the mean of the domain's groups' s_g weighted by each group's trajectory count,
  which is the mean of the domain's trajectories' s_tau (computed that way). Then
  ``log w = [g(a+_D; C+_D, T_D) - g(a-_D; C-_D, T_D)] + [g(a+_g - a+_D; C+_g, T_g) - g(a-_g - a-_D; C-_g, T_g)]
  + [g(a+_tau - a+_g; C+_tau, T_tau) - g(a-_tau - a-_g; C-_tau, T_tau)]``; with no gate active the three levels
  telescope to a+_tau - a-_tau, FiberPO's ungated weight. The token factor is FiberPO's.

  Level counts ("the level's own count" of FIBERPO.md), the reading taken here: T_tau = the trajectory's valid
  tokens, T_g = the number of trajectories in the group, T_D = the number of trajectories in the domain (not of
  groups: the domain aggregate is a mean over its trajectories). Only non-empty trajectories (T_tau > 0) count
  and enter the group / domain means (an empty one has no tokens, hence no aggregate). ``steepness`` > 0 is one
  fixed T for every level.

  Unlike FiberPO the Jacobian of G is not block-diagonal over trajectories: a trajectory's weight depends on its
  group's and domain's aggregates (the spec's design), though never on another domain's tokens. With very loose
  domain and group budgets the weight is ``exp(a+_g - a-_g + g(a+_tau - a+_g) - g(a-_tau - a-_g))``: FiberPO's
  exactly while the trajectory level is in pass-through (any fiber clipping included); when the trajectory
  level gates, it gates the deviation from the group, not the trajectory's own aggregate as FiberPO does.
  """
  lr, valid, count, positive, a_plus, a_minus = _fiber_parts(log_ratio, mask)
  group_ids = jnp.asarray(group_ids, jnp.int32)
  domain_ids = jnp.asarray(domain_ids, jnp.int32)
  live = (count > 0).astype(jnp.float32)

  def level_mean(x, ids, num):
    # mean over the level's non-empty trajectories, gathered back to each trajectory; also the level's count
    n = jax.ops.segment_sum(live, ids, num_segments=num)
    total = jax.ops.segment_sum(x * live, ids, num_segments=num)
    return (total / jnp.maximum(n, 1.0))[ids], n[ids]

  g_plus, n_group = level_mean(a_plus, group_ids, num_groups)
  g_minus, _ = level_mean(a_minus, group_ids, num_groups)
  # sum_g n_g s_g / sum_g n_g over the domain's groups = the mean over the domain's trajectories
  d_plus, n_domain = level_mean(a_plus, domain_ids, num_domains)
  d_minus, _ = level_mean(a_minus, domain_ids, num_domains)

  levels = (  # (x_plus, x_minus, (C+, C-), T) from the top of the hierarchy down
      (d_plus, d_minus, budgets["domain"], _level_steepness(n_domain, steepness)),
      (g_plus - d_plus, g_minus - d_minus, budgets["group"], _level_steepness(n_group, steepness)),
      (a_plus - g_plus, a_minus - g_minus, budgets["trajectory"], _level_steepness(count, steepness)),
  )
  log_w = jnp.zeros_like(a_plus)
  gated = jnp.zeros(a_plus.shape, bool)
  for x_plus, x_minus, (c_plus, c_minus), t in levels:
    log_w = log_w + gate(x_plus, c_plus, t) - gate(x_minus, c_minus, t)
    gated = gated | (jnp.abs(x_plus) > c_plus) | (jnp.abs(x_minus) > c_minus)
  w = jnp.exp(log_w)
  f, fiber_clipped = _fiber_factor(lr, positive, a_plus, a_minus, eps)
  g = jnp.where(valid, w[:, None] * f, 0.0)
  aux = {"w": w, "a_plus": a_plus, "a_minus": a_minus, "token_gated": fiber_clipped & valid,
         "trajectory_gated": gated, "group_a_plus": g_plus, "group_a_minus": g_minus, "domain_a_plus": d_plus,
         "domain_a_minus": d_minus}
  return g, aux


# --------------------------------------------------------------------------------------------- baselines


def _ppo_clip_weight(ratio, advantages, clip_low, clip_high):
  # min(r A, clip(r) A) = A * W with W = min(r, clip(r)) for A >= 0 and max(r, clip(r)) for A < 0
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  weight = jnp.where(advantages >= 0, jnp.minimum(ratio, clipped), jnp.maximum(ratio, clipped))
  active = ((advantages > 0) & (ratio > 1.0 + clip_high)) | ((advantages < 0) & (ratio < 1.0 - clip_low))
  return weight, active


def grpo_token_weights(log_ratio, advantages, mask, *, clip_low, clip_high):
  """GRPO / PPO clip per token: W [N, L] with ``W * A = min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``,
  and ``clipped`` [N, L] bool (the clipped branch is the one taken, so the token has no gradient). advantages:
  [N], broadcast over tokens. W is 0 on masked tokens."""
  valid = jnp.asarray(mask) > 0
  ratio = jnp.exp(jnp.where(valid, log_ratio, 0.0))
  weight, active = _ppo_clip_weight(ratio, jnp.asarray(advantages)[:, None], clip_low, clip_high)
  return jnp.where(valid, weight, 0.0), active & valid


def gspo_token_weights(log_ratio, advantages, mask, *, clip_low, clip_high):
  """GSPO: the sequence ratio ``s = exp(mean_t log r_t)`` (over valid tokens), PPO-clipped per sequence with
  (clip_low, clip_high), broadcast over the sequence's valid tokens: W [N, L], and ``clipped`` [N] bool."""
  valid = jnp.asarray(mask) > 0
  lr = jnp.where(valid, log_ratio, 0.0)
  seq_ratio = jnp.exp(lr.sum(-1) / jnp.maximum(valid.sum(-1), 1))
  weight, active = _ppo_clip_weight(seq_ratio, jnp.asarray(advantages), clip_low, clip_high)
  return jnp.where(valid, weight[:, None], 0.0), active & valid.any(-1)


# --------------------------------------------------------------------------------------------- advantages and J


def group_advantages(rewards, group_size: int, mode: str):
  """Advantages float32 [N] from rewards [N] laid out as consecutive groups of ``group_size`` (N = P * G).

  ``group``: (r - group mean) / (group std + 1e-6), the population std (ddof 0) of the group's G rewards;
  ``group_mean``: r - group mean; ``none``: r unchanged (``config.ADVANTAGES``)."""
  if mode not in ADVANTAGES:
    raise ConfigError(f"rl.advantage must be one of {ADVANTAGES}, got {mode!r}")
  r = jnp.asarray(rewards, jnp.float32)
  if mode == "none":
    return r
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
  grouped = r.reshape(-1, group_size)
  centred = grouped - grouped.mean(-1, keepdims=True)
  if mode == "group":
    centred = centred / (grouped.std(-1, keepdims=True) + 1e-6)
  return centred.reshape(-1)


def trajectory_token_mean(values, mask):
  """(1/N) sum_tau (1/T_tau) sum_t values: the token mean of each trajectory, then the mean over the N rows
  (masked tokens excluded; an empty trajectory contributes 0 but still counts in N)."""
  valid = jnp.asarray(mask) > 0
  per_traj = jnp.where(valid, values, 0.0).sum(-1) / jnp.maximum(valid.sum(-1), 1)
  return per_traj.mean()


def fiberpo_level_budgets(fp) -> dict:
  """``rl.fiberpo`` -> {"domain", "group", "trajectory": (C+, C-)}; a level's -1 means the shared C+ / C-."""
  own = lambda value, shared: value if value > 0 else shared  # noqa: E731 - validated: > 0 or -1
  return {"domain": (own(fp.domain_c_plus, fp.c_plus), own(fp.domain_c_minus, fp.c_minus)),
          "group": (own(fp.group_c_plus, fp.c_plus), own(fp.group_c_minus, fp.c_minus)),
          "trajectory": (fp.c_plus, fp.c_minus)}


def policy_loss(rl, logp, old_logp, advantages, mask, *, group_ids=None, domain_ids=None, num_groups=0,
                num_domains=0, ref_logp=None):
  """The RL policy loss of ``rl.loss`` (``config.POLICY_LOSSES``) -> (loss, metrics).

  rl: the ``c.rl`` ConfigDict. logp / old_logp / ref_logp / mask: float32 [N, L] per response token (the
  policy being trained, the policy that sampled, the frozen reference); advantages: [N]. ``log r = logp -
  old_logp``; old_logp, ref_logp and advantages are data (stop-gradient), logp is not. fiberpo_domain also needs
  group_ids / domain_ids [N] and the static num_groups / num_domains.

  ``loss = -J + rl.kl_coef * KL``, J as in the module docstring; KL is the k3 estimator
  ``exp(ref - logp) - (ref - logp) - 1`` aggregated as J (when ref_logp is given; it enters the loss only when
  kl_coef > 0). Metrics (``POLICY_METRICS``, float32 scalars): policy_loss (-J), kl (0 without ref_logp),
  mean_ratio and max_ratio (r over valid tokens), gated_tokens (share of valid tokens whose token gate / clip is
  active: FiberPO's fiber clip, GRPO's clip, GSPO's clipped sequences' tokens), gated_trajectories (share of
  trajectories with a base gate outside pass-through, at any level for fiberpo_domain; GSPO's clipped
  sequences; 0 for GRPO), approx_kl_old (valid-token mean of the k3 of old against new), advantage_mean.
  """
  sg = jax.lax.stop_gradient
  valid = jnp.asarray(mask) > 0
  logp = jnp.asarray(logp, jnp.float32)
  old_logp = sg(jnp.asarray(old_logp, jnp.float32))
  advantages = sg(jnp.asarray(advantages, jnp.float32))
  log_ratio = jnp.where(valid, logp - old_logp, 0.0)
  n = log_ratio.shape[0]
  fp = rl.fiberpo

  if rl.loss == "fiberpo":
    weights, aux = fiberpo_gates(log_ratio, valid, c_plus=fp.c_plus, c_minus=fp.c_minus, eps=fp.eps,
                                 steepness=fp.steepness)
    gated_tok, gated_traj = aux["token_gated"], aux["trajectory_gated"]
  elif rl.loss == "fiberpo_domain":
    if group_ids is None or domain_ids is None or num_groups <= 0 or num_domains <= 0:
      raise ValueError("rl.loss=fiberpo_domain needs group_ids, domain_ids, num_groups and num_domains")
    weights, aux = fiberpo_domain_gates(log_ratio, valid, group_ids, domain_ids, num_groups=num_groups,
                                        num_domains=num_domains, budgets=fiberpo_level_budgets(fp), eps=fp.eps,
                                        steepness=fp.steepness)
    gated_tok, gated_traj = aux["token_gated"], aux["trajectory_gated"]
  elif rl.loss == "grpo":
    weights, gated_tok = grpo_token_weights(log_ratio, advantages, valid, clip_low=rl.clip_low,
                                            clip_high=rl.clip_high)
    gated_traj = jnp.zeros((n,), bool)
  elif rl.loss == "gspo":
    weights, gated_traj = gspo_token_weights(log_ratio, advantages, valid, clip_low=rl.clip_low,
                                             clip_high=rl.clip_high)
    gated_tok = gated_traj[:, None] & valid
  else:
    raise ConfigError(f"rl.loss must be one of {POLICY_LOSSES}, got {rl.loss!r}")

  objective = trajectory_token_mean(weights * advantages[:, None], valid)
  loss = -objective
  kl = jnp.zeros((), jnp.float32)
  if ref_logp is not None:
    delta = jnp.where(valid, sg(jnp.asarray(ref_logp, jnp.float32)) - logp, 0.0)
    kl = trajectory_token_mean(jnp.exp(delta) - delta - 1.0, valid)
    if rl.kl_coef > 0:
      loss = loss + rl.kl_coef * kl

  tokens = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  token_mean = lambda x: jnp.where(valid, x, 0.0).sum() / tokens  # noqa: E731 - over all valid tokens
  ratio = jnp.exp(log_ratio)
  back = -log_ratio  # log(old / new): k3 of the sampling policy against the current one
  metrics = {"policy_loss": -objective, "kl": kl, "mean_ratio": token_mean(ratio),
             "max_ratio": jnp.max(jnp.where(valid, ratio, 0.0)),
             "gated_tokens": token_mean(gated_tok.astype(jnp.float32)),
             "gated_trajectories": jnp.mean(gated_traj.astype(jnp.float32)),
             "approx_kl_old": token_mean(jnp.exp(back) - back - 1.0), "advantage_mean": jnp.mean(advantages)}
  return loss, {k: sg(metrics[k]).astype(jnp.float32) for k in POLICY_METRICS}
