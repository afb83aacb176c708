"""A training run, top to bottom: data -> (already complete?) -> mesh -> state (restore, init_from or init)
-> config -> jitted step -> the harness (``harness.py``: log, evaluate, checkpoint, signals) -> summary -> sample.

What differs between pretraining (``joyjax train``), supervised fine-tuning (``joyjax sft``) and preference
optimisation (``joyjax dpo``) is an ``Objective``: its data, its step, its eval step and its state. Everything
else (meshes, shardings, resume, signals, metrics, checkpoints) is this one loop.

Resume is exact: the step, params, optimizer state and the data iterator's state are saved together, so a
resumed run feeds the same batches to the same compiled step. SIGTERM / SIGINT finish the current step, save,
and return (a second signal during the save is ignored until it is committed). A run whose latest checkpoint is
at ``train.steps`` says so and does nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Callable

import jax

from joyjax import model, optim, quant
from joyjax.data import pipeline, sft
from joyjax.data.tokenizer import load_tokenizer
from joyjax.errors import ConfigError
from joyjax.model import count_params, format_counts
from joyjax.parallel import distributed, rules
from joyjax.parallel.mesh import describe, make_mesh
from joyjax.train import checkpoint, dpo, flops, harness, rl, state as state_lib
from joyjax.train.eval import lm_eval_metrics, make_lm_eval_step
from joyjax.train.metrics import MetricsWriter, Throughput
from joyjax.train.sample import sample_chat, sample_text, served_params
from joyjax.train.step import make_train_step


@dataclasses.dataclass
class RunResult:
  """What ``train`` returns: per-step losses of this invocation, the final state, where it stopped.
  (A run found complete returns no losses and an empty state.)"""
  losses: dict[int, float]
  state: dict
  step: int
  interrupted: bool
  wall_seconds: float
  tokens_per_sec: float
  sample: str | None = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a kind of training brings to the loop.

  open_data(cfg, tokenizer, process_index, process_count, evaluate) -> (train iterator, eval dataset or None):
    the iterator yields this process's batches and has ``get_state`` / ``set_state`` (exact resume);
  make_step(cfg, tx, total_steps) -> step(state, batch) -> (state, metrics);
  make_eval(cfg) -> (eval_step(state, batch) -> sums, summarize(sums) -> metrics);
  init_state(cfg, tx, params) -> state: the state around starting params (e.g. with a frozen reference copy);
  sample(cfg, params, tokenizer) -> str: what the run prints at its end (``train.sample_prompt``);
  optimizer_steps(cfg) -> int: optimizer updates over the run (the schedule's length; RL makes several per step);
  step_shape(cfg) -> (sequences, tokens per sequence) of one step, for tokens/s and MFU;
  make_runtime: None, or (cfg, tx, total, Runtime) -> (step, evaluator or None) for an objective whose step is
    not one jitted function (RL: sample on device, score on the host, update on device); its batches reach the
    step as this process's numpy rows;
  mtp_loss: whether its loss has the MTP term (the LM loss does; DPO and RL do not). ``trains_mtp(cfg)``: that,
    and the term is on in ``cfg`` (``optim.mtp_trained``); when not, the optimizer freezes the MTP modules
    (``optim`` rule 1), so a stage without MTP hands the module on unchanged;
  qat: whether its step and eval quantize (``quant.format``: quantization-aware training); a run of an objective
    without it and a quant.format set is a config error, never a silently float run.
  """
  name: str
  open_data: Callable
  make_step: Callable | None
  make_eval: Callable | None
  init_state: Callable = state_lib.state_from_params
  sample: Callable | None = None
  optimizer_steps: Callable = lambda cfg: int(cfg.train.steps)
  step_shape: Callable = lambda cfg: (int(cfg.train.batch_size), int(cfg.data.seq_len))
  make_runtime: Callable | None = None
  mtp_loss: bool = False
  qat: bool = False

  def trains_mtp(self, cfg) -> bool:
    return self.mtp_loss and optim.mtp_trained(cfg)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What the loop has built that an objective's ``make_runtime`` may use."""
  tokenizer: object
  data: object
  eval_data: object
  mesh: object
  state_shardings: object
  batch_sharding: object


def _pretrain_data(cfg, tokenizer, pi, pc, evaluate):
  data = pipeline.make_iterator(cfg, tokenizer, process_index=pi, process_count=pc)
  eval_data = pipeline.make_eval_dataset(cfg, tokenizer, process_index=pi, process_count=pc,
                                         source=getattr(data, "source", None)) if evaluate else None
  return data, eval_data


def _sft_data(cfg, tokenizer, pi, pc, evaluate):
  data = sft.make_sft_iterator(cfg, tokenizer, process_index=pi, process_count=pc)
  eval_data = sft.make_sft_eval_dataset(cfg, tokenizer, process_index=pi, process_count=pc,
                                        source=data.source) if evaluate else None
  return data, eval_data


def _lm_eval(cfg):
  return make_lm_eval_step(cfg), lm_eval_metrics


def _text_sample(cfg, params, tokenizer):
  t = cfg.train
  return sample_text(cfg, params, tokenizer, t.sample_prompt, max_tokens=t.sample_tokens,
                     temperature=t.sample_temperature, seed=t.seed)


def _chat_sample(cfg, params, tokenizer):
  t = cfg.train
  return sample_chat(cfg, params, tokenizer, t.sample_prompt, max_tokens=t.sample_tokens,
                     temperature=t.sample_temperature, seed=t.seed)


PRETRAIN = Objective("train", _pretrain_data, make_train_step, _lm_eval, sample=_text_sample, mtp_loss=True,
                     qat=True)
# SFT is the pretraining step on chat batches: the loss mask keeps the trained (assistant) tokens only.
SFT = Objective("sft", _sft_data, make_train_step, _lm_eval, sample=_chat_sample, mtp_loss=True, qat=True)
# DPO: chosen and rejected in one forward; the state carries the reference (or it is precomputed once).
DPO = Objective("dpo", dpo.open_dpo_objective_data, dpo.make_dpo_step, dpo.make_dpo_eval,
                init_state=dpo.dpo_state_from_params, sample=_chat_sample)


# RL: each step samples a rollout batch with the policy, scores it on the host and makes several updates.
RL = Objective("rl", rl.open_rl_data, None, None, init_state=rl.rl_state_from_params, sample=_chat_sample,
               optimizer_steps=rl.optimizer_steps, step_shape=rl.step_shape, make_runtime=rl.make_rl_runtime)


def train(cfg, *, stop_after: int | None = None, stream=None, print_sample: bool = True,
          objective: Objective = PRETRAIN) -> RunResult:
  """Runs (or resumes) the training of ``cfg`` up to ``train.steps`` (or, for tests, only until step
  ``stop_after``, as if interrupted there after saving). Returns a ``RunResult``."""
  return _train(cfg, objective, stop_after=stop_after, stream=stream, print_sample=print_sample, show_config=False)


def main(cfg, objective: Objective = PRETRAIN) -> RunResult:
  """The ``joyjax train`` / ``sft`` / ``dpo`` entry: prints the resolved config (once the data and the state
  are ready, so a user error is the only thing printed; not when the run is complete) and trains. A non-finite
  stop raises ``NonFiniteError``, which the command prints as one line."""
  return _train(cfg, objective, stop_after=None, stream=None, print_sample=True, show_config=True)


def run_tokenizer(cfg):
  """The tokenizer of a run: ``data.tokenizer``; else the one saved with the checkpoint in ``train.init_from``
  (a fine-tuning run must read text as its base model did); else one built from the corpus."""
  if not cfg.data.tokenizer and cfg.train.init_from:
    saved = checkpoint.find_saved_tokenizer(cfg.train.init_from)
    if saved:
      return load_tokenizer(saved)
  return pipeline.build_tokenizer(cfg)


def _open_data(cfg, objective: Objective):
  """(tokenizer, training iterator, eval dataset or None) of this process; data errors surface here."""
  tokenizer = run_tokenizer(cfg)
  data, eval_data = objective.open_data(cfg, tokenizer, jax.process_index(), jax.process_count(),
                                        cfg.train.eval_every > 0)  # validate() made sure eval data exists then
  return tokenizer, data, eval_data


def _jitted_runtime(cfg, objective: Objective, tx, total: int, rt: Runtime):
  """(step, evaluator or None) of an objective with one jitted step: ``make_step`` jitted with the state and batch
  shardings (the state donated), and ``make_eval``'s step over the eval data, if any."""
  step = jax.jit(objective.make_step(cfg, tx, total), in_shardings=(rt.state_shardings, rt.batch_sharding),
                 out_shardings=(rt.state_shardings, None), donate_argnums=(0,))
  if rt.eval_data is None:
    return step, None
  t = cfg.train
  eval_step, summarize = objective.make_eval(cfg)
  evaluator = harness.Evaluator(
      step=jax.jit(eval_step, in_shardings=(rt.state_shardings, rt.batch_sharding), out_shardings=None),
      dataset=rt.eval_data, num_batches=int(t.eval_batches), every=int(t.eval_every), summarize=summarize)
  return step, evaluator


def _train(cfg, objective: Objective, *, stop_after, stream, print_sample: bool, show_config: bool) -> RunResult:
  t_start = time.time()
  t = cfg.train
  out = stream or sys.stdout
  distributed.initialize(cfg)  # before jax.process_index(), which would start a single-process backend
  primary = jax.process_index() == 0
  say = (lambda *a: print(*a, file=out, flush=True)) if primary else (lambda *a: None)
  if quant.enabled(cfg) and not objective.qat:
    raise ConfigError(f"quant.format={cfg.quant.format!r}: quantization-aware training runs in joyjax train and sft, "
                      f"not {objective.name}; set --config.quant.format=none")
  quant.check(cfg)  # a group size that does not fit the weights, before any data is read

  tokenizer, data, eval_data = _open_data(cfg, objective)  # a data error is the first thing a user sees
  total = int(t.steps)
  ckpt = checkpoint.Checkpointer(t.output_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  done = harness.complete(ckpt, total)
  if done:  # the one line, nothing else
    say(done)
    latest = ckpt.latest_step()
    ckpt.close()
    return RunResult(losses={}, state={}, step=latest, interrupted=False, wall_seconds=time.time() - t_start,
                     tokens_per_sec=0.0)

  mesh = make_mesh(cfg)
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), objective.optimizer_steps(cfg),
                            train_mtp=objective.trains_mtp(cfg), mesh=mesh)
  init_state = lambda params: objective.init_state(cfg, tx, params)
  abstract = jax.eval_shape(lambda k: init_state(model.init(cfg, k)), jax.random.key(0))
  state_sh = rules.state_shardings(cfg, mesh, abstract)
  batch_sh = rules.batch_sharding(mesh, rules.get_rules(cfg))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)

  mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
  with mesh_ctx:
    # The state first: a missing or corrupt checkpoint is reported before anything else is printed.
    restored = harness.restore_latest(ckpt, data, abstract)
    if restored is not None:
      state, latest = restored
      origin = f"resumed from {ckpt.step_dir(latest)} (step {latest})"
    elif t.init_from:
      # With LoRA on, a base checkpoint gets fresh adapters (state.init_params_from).
      params = state_lib.init_params_from(cfg, t.init_from, abstract["params"], jax.random.key(t.seed))
      # Restored before the next program starts: on simulated CPU devices two programs whose collectives
      # interleave can deadlock each other.
      jax.block_until_ready(params)
      state = jax.jit(init_state, out_shardings=state_sh)(params)
      origin = f"initialised params from {t.init_from}"
    else:
      state = jax.jit(lambda k: init_state(model.init(cfg, k)), out_shardings=state_sh)(jax.random.key(t.seed))
      origin = None
    if show_config:
      say("config:\n" + str(cfg))
    say(f"mesh: {describe(mesh)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)")
    say(format_counts(count_params(cfg)))
    if origin:
      say(origin)

    if primary:
      checkpoint.save_tokenizer(t.output_dir, tokenizer)
    rt = Runtime(tokenizer, data, eval_data, mesh, state_sh, batch_sh)
    if objective.make_runtime is None:
      step_fn, evaluator = _jitted_runtime(cfg, objective, tx, total, rt)
      to_device = harness.global_batch
    else:  # the step moves its batches itself
      step_fn, evaluator = objective.make_runtime(cfg, tx, total, rt)
      to_device = harness.local_batch
    bsz, seq = objective.step_shape(cfg)
    throughput = Throughput(bsz * seq, devices=jax.device_count(), flops_per_token=flops.flops_per_token(cfg, seq),
                            peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind, cfg.model.dtype,
                                                                   peak_tflops=t.peak_tflops))
    writer = MetricsWriter(t.output_dir, total_steps=total, is_primary=primary, stream=out)
    loop = harness.Harness(step=step_fn, data=data, checkpointer=ckpt, batch_sharding=batch_sh, writer=writer,
                           throughput=throughput, total_steps=total, log_every=t.log_every,
                           checkpoint_every=cfg.checkpoint.every, max_nonfinite=t.max_nonfinite,
                           evaluator=evaluator, config=cfg.to_dict(), to_device=to_device)
    start = int(jax.device_get(state["step"]))
    say(f"training steps {start}..{total} ({bsz} x {seq} tokens per step) -> {t.output_dir}")
    state, progress = loop.run(state, stop_after=stop_after)

    wall = time.time() - t_start
    for line in harness.summary_lines(progress, throughput, wall):
      say(line)
    if progress.interrupted:
      say(f"stopped at step {progress.step} after a signal; checkpoint saved in {ckpt.step_dir(progress.step)}; "
          "run the same command to resume")
    result = RunResult(losses=progress.losses, state=state, step=progress.step,
                       interrupted=progress.interrupted or not progress.finished, wall_seconds=wall,
                       tokens_per_sec=throughput.steady_tokens_per_sec())
    if (print_sample and objective.sample and t.sample_prompt and progress.finished
        and not progress.interrupted):
      result.sample = objective.sample(cfg, served_params(cfg, state["params"]), tokenizer)
      say("sample:\n" + result.sample)
  ckpt.close()
  return result
