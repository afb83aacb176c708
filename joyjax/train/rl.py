"""Reinforcement learning on the shared loop (``joyjax rl``): each step is one rollout batch.

    prompts (rl.prompts_per_step, from the prompt stream: its curriculum and RNG are the data state)
      -> rl.num_generations samples each (``rl.sampler``: the training model's own code, the policy's weights)
      -> rewards on the host (``rl.envs``: the task's check, format, length shaping, or a user function)
      -> advantages per prompt group (``losses.policy.group_advantages``)
      -> old log-probs: a forward pass of the same params before any update (the policy that sampled)
      -> rl.epochs x rl.num_minibatches optimizer updates on ``losses.policy.policy_loss`` (FiberPO by default)

The device parts are two jitted functions (the sampler and ``make_rl_update``), with the weights as arguments, so
neither recompiles as the policy moves. Old log-probs come from the trainer's forward pass, not the sampler's
(the sampler's MLA cache path is the same math in another order), so the importance ratio of the first
minibatch is exactly 1; ``sampler_logp_gap`` reports how far the sampler's log-probs were from them.

Resume is exact: the state (step, params, optimizer, reference) and the prompt stream's state (RNG, curriculum)
are saved together, and the rollout key of step s is ``fold_in(train.seed, s)``, so a resumed run samples the
same responses and gets the same rewards as one that was never stopped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from joyjax import model
from joyjax.axes import data_parallel_size
from joyjax.batch import ROLLOUT_KEYS
from joyjax.data import chat
from joyjax.data.tokenizer import stop_ids
from joyjax.errors import ConfigError
from joyjax.losses import policy
from joyjax.losses.rollout import rollout_logps
from joyjax.parallel import rules
from joyjax.rl import envs
from joyjax.rl.prompts import PromptStream
from joyjax.rl.sampler import Sampler, acceptance_length
from joyjax.train import dpo, harness, state as state_lib
from joyjax.train.step import apply_gradients


# The optional batch entry with the sampler's own per-token log-probs ([rows, seq], aligned with the tokens).
SAMPLER_LOGPS = "sampler_logps"


def rollout_rows(cfg) -> int:
  """Trajectories per rollout batch (global): prompts x samples per prompt."""
  return int(cfg.rl.prompts_per_step) * int(cfg.rl.num_generations)


def updates_per_step(cfg) -> int:
  return int(cfg.rl.num_minibatches) * int(cfg.rl.epochs)


def optimizer_steps(cfg) -> int:
  """Optimizer updates over the run: the schedule's length."""
  return int(cfg.train.steps) * updates_per_step(cfg)


def step_shape(cfg) -> tuple[int, int]:
  return rollout_rows(cfg), int(cfg.rl.max_prompt_len) + int(cfg.rl.max_new_tokens)


def rl_state_from_params(cfg, tx, params) -> dict:
  """``state.state_from_params`` plus, with ``rl.kl_coef`` > 0, the frozen reference of the KL penalty (as DPO
  keeps one: a copy of the starting params, or with LoRA the policy with adapters off)."""
  state = state_lib.state_from_params(cfg, tx, params)
  if cfg.rl.kl_coef > 0:
    state.update(dpo.frozen_reference(cfg, params))
  return state


def minibatch_major(batch: dict, k: int) -> dict:
  """Host arrays [rows, ...] -> [k, rows / k, ...]: ``k`` minibatches of consecutive rows (whole prompt groups
  stay together when they fit). The update takes this layout with the batch axes on axis 1, so every minibatch
  is spread over all devices and picking one needs no resharding."""
  return {name: np.asarray(x).reshape(k, x.shape[0] // k, *x.shape[1:]) for name, x in batch.items()}


def make_rl_update(cfg, tx: optax.GradientTransformation, num_domains: int = 1):
  """``update(state, batch) -> (state, metrics)``: the optimizer updates of one rollout batch
  (``joyjax.batch.ROLLOUT_KEYS``, plus ``SAMPLER_LOGPS`` when the sampler's log-probs are to be compared), in
  the ``minibatch_major`` layout [rl.num_minibatches, rows per minibatch, ...].
  ``num_domains``: how many task domains the domain ids run over (FiberPO-Domain). Jit it with the state donated."""
  rl = cfg.rl
  k, epochs = int(rl.num_minibatches), int(rl.epochs)
  temp = float(rl.temperature)
  rows = rollout_rows(cfg)
  groups_per_mb = max(1, (rows // k + int(rl.num_generations) - 1) // int(rl.num_generations))

  def logps(params, mb):
    return rollout_logps(cfg, params, mb, temperature=temp)

  def loss_fn(params, mb, old, ref):
    logp, ent, aux = logps(params, mb)
    mask = mb["response_mask"]
    gid = mb["group_ids"] - jnp.min(mb["group_ids"])  # this minibatch's groups from 0
    did = mb["domain_ids"]
    loss, m = policy.policy_loss(rl, logp, old, mb["advantages"], mask, group_ids=gid, domain_ids=did,
                                 num_groups=groups_per_mb + 1, num_domains=int(num_domains),
                                 ref_logp=ref)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    m = dict(m, entropy=jnp.sum(ent * mask) / tokens,
             logp_abs_diff=jnp.sum(jnp.abs(logp - old) * mask) / tokens)
    return loss, (m, model.aux_summary(aux))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state, batch):
    sampler_logps = batch.get(SAMPLER_LOGPS)
    mbs = {key: batch[key] for key in ROLLOUT_KEYS}
    params0 = state["params"]
    no_grad = lambda p: jax.lax.map(lambda mb: jax.lax.stop_gradient(logps(p, mb)[0]), mbs)  # noqa: E731
    old = no_grad(params0)
    gap = {}
    if sampler_logps is not None:
      mask = mbs["response_mask"]
      diff = jnp.abs(old - sampler_logps) * mask
      gap = {"sampler_logp_gap": jnp.sum(diff) / jnp.maximum(jnp.sum(mask), 1.0), "sampler_logp_gap_max": jnp.max(diff)}
    ref = no_grad(jax.lax.stop_gradient(dpo.reference_params(cfg, state))) if rl.kl_coef > 0 else None
    order = jnp.tile(jnp.arange(k), epochs)

    def one(st, i):
      mb = jax.tree.map(lambda x: x[i], mbs)
      ref_i = None if ref is None else ref[i]
      (loss, (m, moe)), grads = grad_fn(st["params"], mb, old[i], ref_i)
      st, finite, grad_norm = apply_gradients(cfg, tx, st, grads, loss, moe["expert_counts"])
      return st, dict(m, loss=loss, grad_norm=grad_norm, finite=finite, expert_counts=moe["layer_counts"])

    new_state, per = jax.lax.scan(one, state, order)
    new_state = dict(new_state, step=state["step"] + 1)  # the loop counts rollout batches
    metrics = {name: jnp.mean(v.astype(jnp.float32), axis=0) for name, v in per.items()
               if name not in ("finite", "expert_counts")}
    metrics.update({
        "finite": jnp.all(per["finite"]),
        "nonfinite": new_state["nonfinite"],
        "skipped": new_state["skipped"],
        "expert_counts": jnp.sum(per["expert_counts"], axis=0),
        # The first minibatch is scored by the params that sampled it: its ratio is exactly 1.
        "first_mean_ratio": per["mean_ratio"][0],
        "first_max_abs_log_ratio": per["logp_abs_diff"][0],
        "param_norm": optax.global_norm(params0),
        **gap,
    })
    return new_state, metrics

  return update


# ------------------------------------------------------------------------------------------- host side


def _all_rows(x) -> np.ndarray:
  """Every process's rows, in process order, as numpy on every process: of a global array, or of this process's
  numpy rows of a global batch."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_global(arrays: dict, sharding_of) -> dict:
  """Numpy arrays that every process holds in full -> global jax arrays with the batch sharding."""
  out = {}
  for name, a in arrays.items():
    sh = sharding_of(a.ndim)
    out[name] = jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx])
  return out


class Rollouts:
  """Samples and scores rollouts: the sampler, the task and its reward, the tokenizer (one per run)."""

  def __init__(self, cfg, tokenizer, stream: PromptStream, mesh):
    rl = cfg.rl
    self.cfg, self.rl, self.tokenizer, self.stream = cfg, rl, tokenizer, stream
    self.sampler = Sampler(cfg, max_prompt_len=int(rl.max_prompt_len), max_new_tokens=int(rl.max_new_tokens),
                           mesh=mesh, draft_tokens=int(rl.draft_tokens))
    self.env = stream.env
    # Rows per process must split over this process's share of the batch axes: pad (and drop) to a multiple.
    width = 1 if mesh is None else data_parallel_size(mesh, rules.get_rules(cfg))
    self.local_multiple = max(1, width // jax.process_count())
    self.reward = envs.make_reward(rl, self.env, tokenizer=tokenizer)
    self.stop_ids = stop_ids(tokenizer)
    self.domains = sorted({p.domain for p in self.env.prompts()})
    self.domain_id = {d: i for i, d in enumerate(self.domains)}

  def sample(self, params, prompts: dict, key, *, repeats: int, temperature: float):
    """Samples ``repeats`` responses per prompt row (rows of one prompt adjacent). Returns the rollout as numpy
    (every process holds all rows) and the global prompt indices per row."""
    toks = np.repeat(np.asarray(prompts["prompt_tokens"]), repeats, axis=0)
    lens = np.repeat(np.asarray(prompts["prompt_lens"]), repeats, axis=0)
    index = np.repeat(np.asarray(prompts["prompt_index"]), repeats, axis=0)
    rows = toks.shape[0]
    pad = (-rows) % self.local_multiple  # e.g. an evaluation batch smaller than the data-parallel width
    if pad:
      toks = np.concatenate([toks, np.repeat(toks[:1], pad, axis=0)])
      lens = np.concatenate([lens, np.repeat(lens[:1], pad, axis=0)])
    roll = self.sampler(params, toks, lens, key, temperature=temperature, top_p=float(self.rl.top_p),
                        top_k=int(self.rl.top_k), stop_ids=self.stop_ids)
    keep = np.concatenate([np.ones(rows, bool), np.zeros(pad, bool)])
    roll = {name: _all_rows(getattr(roll, name)) for name in ("tokens", "positions", "segment_ids", "response_mask",
                                                            "logprobs", "lengths", "stopped", "steps")}
    keep = _all_rows(keep)
    return {k: v[keep] for k, v in roll.items()}, _all_rows(index)

  def score(self, roll: dict, index: np.ndarray):
    """(rewards [rows], correct [rows], format [rows]) of each row's decoded response."""
    p = int(self.rl.max_prompt_len)
    rewards, correct, fmt = [], [], []
    for r in range(index.shape[0]):
      n = int(roll["lengths"][r])
      ids = [int(t) for t in roll["tokens"][r, p:p + n] if int(t) not in self.stop_ids]
      text = self.tokenizer.decode(ids)
      value, info = self.reward(self.stream.prompt(int(index[r])), text, n, int(self.rl.max_new_tokens))
      rewards.append(value)
      correct.append(info["correct"])
      fmt.append(info["format"])
    return (np.asarray(rewards, np.float32), np.asarray(correct, np.float32), np.asarray(fmt, np.float32))


def rollout_metrics(roll: dict, rewards, correct, fmt, prefix: str = "") -> dict[str, float]:
  lengths = roll["lengths"].astype(np.float64)
  return {
      f"{prefix}reward": float(np.mean(rewards)),
      f"{prefix}pass_rate": float(np.mean(correct >= 1.0)),
      f"{prefix}format_rate": float(np.mean(fmt)),
      f"{prefix}response_length": float(np.mean(lengths)),
      f"{prefix}stopped": float(np.mean(roll["stopped"])),
      # tokens per decode step: 1 without MTP speculation (rl.draft_tokens 0), 1 + accepted drafts with it
      f"{prefix}acceptance_length": acceptance_length(roll["lengths"], roll["steps"]),
  }


class RLStep:
  """The loop's step for RL: ``step(state, prompts) -> (state, metrics)`` with ``prompts`` this process's rows
  of the prompt stream (numpy)."""

  def __init__(self, cfg, tx, rollouts: Rollouts, mesh, state_shardings, batch_sharding):
    self.cfg, self.rollouts = cfg, rollouts
    width = data_parallel_size(mesh, rules.get_rules(cfg))
    per_mb = rollout_rows(cfg) // int(cfg.rl.num_minibatches)
    if per_mb % width:
      raise ConfigError(f"config key 'rl.num_minibatches': a minibatch of {per_mb} trajectories (rl.prompts_per_step "
                        f"x rl.num_generations / rl.num_minibatches) does not split over the {width}-way batch "
                        "axes of the mesh; use fewer minibatches or more prompts per step")
    self.mesh = mesh
    self.update = jax.jit(make_rl_update(cfg, tx, len(rollouts.domains)), in_shardings=(state_shardings, None),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))
    self.batch_sharding = batch_sharding

  def _sharding(self, ndim: int):
    """[minibatches, rows, ...]: rows over the batch axes."""
    spec = self.batch_sharding.spec
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, spec[0], *([None] * (ndim - 2))))

  def __call__(self, state, prompts: dict):
    rl = self.cfg.rl
    step = int(jax.device_get(state["step"]))
    key = jax.random.fold_in(jax.random.key(int(self.cfg.train.seed)), step)
    roll, index = self.rollouts.sample(state["params"], prompts, key, repeats=int(rl.num_generations),
                                       temperature=float(rl.temperature))
    rewards, correct, fmt = self.rollouts.score(roll, index)
    g = int(rl.num_generations)
    self.rollouts.stream.record(index[::g], correct.reshape(-1, g).mean(axis=1))
    adv = np.asarray(policy.group_advantages(jnp.asarray(rewards), g, rl.advantage), np.float32)
    rows = rewards.shape[0]
    domains = np.asarray([self.rollouts.domain_id[self.rollouts.stream.prompt(int(i)).domain] for i in index],
                         np.int32)
    batch = {
        "tokens": roll["tokens"].astype(np.int32), "positions": roll["positions"].astype(np.int32),
        "segment_ids": roll["segment_ids"].astype(np.int32),
        "response_mask": roll["response_mask"].astype(np.float32), "advantages": adv,
        "group_ids": (np.arange(rows) // g).astype(np.int32), "domain_ids": domains,
        SAMPLER_LOGPS: roll["logprobs"].astype(np.float32),
    }
    state, metrics = self.update(state, _to_global(minibatch_major(batch, int(rl.num_minibatches)), self._sharding))
    host = rollout_metrics(roll, rewards, correct, fmt)
    host["advantage_std"] = float(np.std(adv))
    host["zero_variance_groups"] = float(np.mean(rewards.reshape(-1, g).std(axis=1) == 0))
    metrics = dict(metrics, **host)
    return state, metrics


class RLEvaluator:
  """Held-out reward: every ``every`` steps and at the end, the held-out prompts of the stream answered once each
  at ``rl.eval_temperature`` (greedy by default); ``eval/reward``, ``eval/pass_rate``, ...; the harness calls it as
  it calls ``harness.Evaluator``."""

  def __init__(self, rollouts: Rollouts, every: int, seed: int):
    self.rollouts, self.every, self.seed = rollouts, int(every), int(seed)

  def due(self, progress) -> bool:
    return harness.eval_due(progress, self.every)

  def compile(self, state, sharding) -> None:
    del state, sharding  # the sampler compiles on first use

  def __call__(self, state, sharding=None) -> dict[str, float]:
    return evaluate(self.rollouts, state["params"], self.seed)


def evaluate(rollouts: Rollouts, params, seed: int, prefix: str = "eval/") -> dict[str, float]:
  """Mean reward, pass rate, format rate and length over the stream's held-out prompts (one answer each)."""
  temp = float(rollouts.rl.eval_temperature)
  rolls, scores = [], []
  for i, batch in enumerate(rollouts.stream.held_out()):
    key = jax.random.fold_in(jax.random.key(seed), 1_000_003 + i)
    roll, index = rollouts.sample(params, batch, key, repeats=1, temperature=temp)
    valid = _all_rows(batch["valid"]).astype(bool)  # the last batch is padded with repeats
    roll = {k: v[valid] for k, v in roll.items()}
    rolls.append(roll)
    scores.append(rollouts.score(roll, index[valid]))
  if not rolls:
    return {}
  roll = {k: np.concatenate([r[k] for r in rolls]) for k in ("lengths", "stopped", "steps")}
  rewards, correct, fmt = (np.concatenate(parts) for parts in zip(*scores))
  return rollout_metrics(roll, rewards, correct, fmt, prefix=prefix)


# ------------------------------------------------------------------------------------------- the objective


def open_rl_data(cfg, tokenizer, process_index: int, process_count: int, evaluate: bool):
  """(prompt stream, the same stream for its held-out prompts or None): the task's prompts rendered in the chat
  format; the stream's state (RNG, curriculum) is the run's data state."""
  env = envs.make_env(cfg.rl)
  envs.make_reward(cfg.rl, env, tokenizer=tokenizer)  # a bad rl.reward_fn is reported here, before any output
  stream = PromptStream(cfg, tokenizer, env, process_index=process_index, process_count=process_count,
                        template=chat.template_from_config(cfg))
  return stream, (stream if evaluate else None)


def make_rl_runtime(cfg, tx, total, rt):
  """The loop's step and evaluator for RL (``loop.Objective.make_runtime``)."""
  del total
  rollouts = Rollouts(cfg, rt.tokenizer, rt.data, rt.mesh)
  step = RLStep(cfg, tx, rollouts, rt.mesh, rt.state_shardings, rt.batch_sharding)
  evaluator = RLEvaluator(rollouts, cfg.train.eval_every, cfg.train.seed) if rt.eval_data is not None else None
  return step, evaluator
