"""Pretraining, top to bottom: data -> (already complete?) -> config -> mesh -> state (init, restore or
init_from) -> jitted step -> the harness (``harness.py``: log, evaluate, checkpoint, signals) -> summary -> sample.

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

import jax

from joyjax import model, optim
from joyjax.data import pipeline
from joyjax.model import count_params, format_counts
from joyjax.parallel import distributed, rules
from joyjax.parallel.mesh import describe, make_mesh
from joyjax.train import checkpoint, flops, harness, state as state_lib
from joyjax.train.eval import lm_eval_metrics, make_lm_eval_step
from joyjax.train.metrics import MetricsWriter, Throughput
from joyjax.train.sample import sample_text
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


def train(cfg, *, stop_after: int | None = None, stream=None, print_sample: bool = True) -> RunResult:
  """Runs (or resumes) the training of ``cfg`` up to ``train.steps`` (or, for tests, only until step
  ``stop_after``, as if interrupted there after saving). Returns a ``RunResult``."""
  return _train(cfg, stop_after=stop_after, stream=stream, print_sample=print_sample, show_config=False)


def main(cfg) -> RunResult:
  """The ``joyjax train`` entry: prints the resolved config (once the data and the state are ready, so a user
  error is the only thing printed; not when the run is complete) and trains. A non-finite stop raises
  ``NonFiniteError``, which the command prints as one line."""
  return _train(cfg, stop_after=None, stream=None, print_sample=True, show_config=True)


def _open_data(cfg):
  """(tokenizer, training iterator, eval dataset or None) of this process; data errors surface here."""
  evaluate = cfg.train.eval_every > 0  # config.validate made sure there is evaluation data then
  pi, pc = jax.process_index(), jax.process_count()
  tokenizer = pipeline.build_tokenizer(cfg)
  data = pipeline.make_iterator(cfg, tokenizer, process_index=pi, process_count=pc)
  eval_data = pipeline.make_eval_dataset(cfg, tokenizer, process_index=pi, process_count=pc,
                                         source=getattr(data, "source", None)) if evaluate else None
  return tokenizer, data, eval_data


def _train(cfg, *, stop_after, stream, print_sample: bool, show_config: bool) -> RunResult:
  t_start = time.time()
  t = cfg.train
  out = stream or sys.stdout
  distributed.initialize(cfg)  # before jax.process_index(), which would start a single-process backend
  primary = jax.process_index() == 0
  say = (lambda *a: print(*a, file=out, flush=True)) if primary else (lambda *a: None)

  tokenizer, data, eval_data = _open_data(cfg)  # a data error is the first thing a user sees
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
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), total)
  abstract = state_lib.abstract_state(cfg, tx)
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
      params = checkpoint.load_params(t.init_from, abstract["params"])
      state = jax.jit(lambda p: state_lib.state_from_params(cfg, tx, p), out_shardings=state_sh)(params)
      origin = f"initialised params from {t.init_from}"
    else:
      state = jax.jit(lambda k: state_lib.init_state(cfg, tx, k), out_shardings=state_sh)(jax.random.key(t.seed))
      origin = None
    if show_config:
      say("config:\n" + str(cfg))
    say(f"mesh: {describe(mesh)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)")
    say(format_counts(count_params(cfg)))
    if origin:
      say(origin)

    step_fn = jax.jit(make_train_step(cfg, tx, total), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, None), donate_argnums=(0,))
    evaluator = None
    if eval_data is not None:
      evaluator = harness.Evaluator(
          step=jax.jit(make_lm_eval_step(cfg), in_shardings=(state_sh, batch_sh), out_shardings=None),
          dataset=eval_data, num_batches=int(t.eval_batches), every=int(t.eval_every), summarize=lm_eval_metrics)
    seq, bsz = cfg.data.seq_len, t.batch_size
    throughput = Throughput(bsz * seq, devices=jax.device_count(), flops_per_token=flops.flops_per_token(cfg, seq),
                            peak_flops=flops.peak_flops_per_device(jax.devices()[0].device_kind, cfg.model.dtype,
                                                                   peak_tflops=t.peak_tflops))
    writer = MetricsWriter(t.output_dir, total_steps=total, is_primary=primary, stream=out)
    loop = harness.Harness(step=step_fn, data=data, checkpointer=ckpt, batch_sharding=batch_sh, writer=writer,
                           throughput=throughput, total_steps=total, log_every=t.log_every,
                           checkpoint_every=cfg.checkpoint.every, max_nonfinite=t.max_nonfinite,
                           evaluator=evaluator, config=cfg.to_dict())
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
    if print_sample and t.sample_prompt and progress.finished and not progress.interrupted:
      result.sample = sample_text(cfg, state["params"], tokenizer, t.sample_prompt, max_tokens=t.sample_tokens,
                                  temperature=t.sample_temperature, seed=t.seed)
      say("sample:\n" + result.sample)
  ckpt.close()
  return result
