"""The training loop, top to bottom: config -> mesh -> data -> state (init, restore or init_from) -> jitted
step -> metrics / checkpoints -> sample.

Resume is exact: the step, params, optimizer state and the data iterator's state are saved together, so a
resumed run feeds the same batches to the same compiled step. SIGTERM / SIGINT finish the current step, save,
and return (a second signal during the save is ignored until it is committed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from joyjax import model, optim
from joyjax.errors import NonFiniteError
from joyjax.params import count_params, format_counts
from joyjax.parallel import distributed, rules
from joyjax.parallel.mesh import describe, make_mesh
from joyjax.train import checkpoint, flops, metrics as metrics_lib, state as state_lib
from joyjax.train.step import make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
  """What ``train`` returns: per-step losses of this invocation, the final state, where it stopped."""
  losses: dict[int, float]
  state: dict
  step: int
  interrupted: bool
  wall_seconds: float
  tokens_per_sec: float
  sample: str | None = None


class _Signals:
  """Turns SIGTERM / SIGINT into a flag the loop polls between steps (main thread only)."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signum
      print(f"\nreceived {signal.Signals(signum).name}: finishing this step, saving a checkpoint, exiting",
            file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _agree(flag: bool) -> bool:
  """True on every process when any process has ``flag`` (a signal reaches hosts at different steps)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _global_batch(local: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def _scalar_metrics(m: dict) -> dict:
  out = {}
  for k, v in m.items():
    if k == "expert_counts":
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[k] = float(a)
  return out


def train(cfg, *, stop_after: int | None = None, stream=None, print_sample: bool = True) -> RunResult:
  """Runs (or resumes) the training of ``cfg`` up to ``train.steps`` (or, for tests, only until step
  ``stop_after``, as if interrupted there after saving). Returns a ``RunResult``."""
  t_start = time.time()
  out = stream or sys.stdout
  distributed.initialize(cfg)
  primary = jax.process_index() == 0
  say = (lambda *a: print(*a, file=out, flush=True)) if primary else (lambda *a: None)

  mesh = make_mesh(cfg)
  say(f"mesh: {describe(mesh)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
  say(format_counts(count_params(cfg)))

  from joyjax.data.pipeline import build_tokenizer, make_iterator
  tokenizer = build_tokenizer(cfg)
  data = make_iterator(cfg, tokenizer, process_index=jax.process_index(), process_count=jax.process_count())

  total = int(cfg.train.steps)
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), total)
  abstract = state_lib.abstract_state(cfg, tx)
  state_sh = rules.state_shardings(cfg, mesh, abstract)
  batch_sh = rules.batch_sharding(mesh, rules.get_rules(cfg))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)

  ckpt = checkpoint.Checkpointer(cfg.train.output_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
  with mesh_ctx:
    latest = ckpt.latest_step()
    if latest is not None:
      state, data_state, _ = ckpt.restore(latest, abstract_state=abstract)
      if data_state is not None:
        data.set_state(data_state)
      say(f"resumed from {ckpt.step_dir(latest)} (step {latest})")
    elif cfg.train.init_from:
      params = checkpoint.load_params(cfg.train.init_from, abstract["params"])
      state = jax.jit(lambda p: state_lib.state_from_params(cfg, tx, p), out_shardings=state_sh)(params)
      say(f"initialised params from {cfg.train.init_from}")
    else:
      state = jax.jit(lambda k: state_lib.init_state(cfg, tx, k), out_shardings=state_sh)(
          jax.random.key(cfg.train.seed))

    step_fn = jax.jit(make_train_step(cfg, tx, total), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, None), donate_argnums=(0,))
    result = _run(cfg, state, step_fn, data, batch_sh, ckpt, total, stop_after, say, out, primary, t_start)
    if print_sample and cfg.train.sample_prompt and not result.interrupted and result.step >= total:
      from joyjax.train.sample import sample_text
      text = sample_text(cfg, result.state["params"], tokenizer, cfg.train.sample_prompt,
                         max_tokens=cfg.train.sample_tokens, temperature=cfg.train.sample_temperature,
                         seed=cfg.train.seed)
      result.sample = text
      say("sample:\n" + text)
  ckpt.close()
  return result


def _run(cfg, state, step_fn, data, batch_sh, ckpt, total, stop_after, say, out, primary, t_start) -> RunResult:
  t = cfg.train
  start = int(jax.device_get(state["step"]))
  seq, bsz = cfg.data.seq_len, t.batch_size
  fpt = flops.flops_per_token(cfg, seq)
  peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, cfg.model.dtype, peak_tflops=t.peak_tflops)
  writer = metrics_lib.MetricsWriter(t.output_dir, total_steps=total, is_primary=primary, stream=out)
  losses: dict[int, float] = {}
  end = total if stop_after is None else min(total, int(stop_after))
  say(f"training steps {start}..{total} ({bsz} x {seq} tokens per step) -> {t.output_dir}")
  interrupted = False
  last_saved = start if ckpt.latest_step() == start else None
  tokens_done, t_window, n_window = 0, time.time(), 0
  window_losses: list[float] = []  # the finite losses since the last log line (their mean is logged)
  pending = None  # the previous step's metrics, read after the next step is dispatched (keeps the device busy)
  step = start
  first_time = None

  def save(step, state, force=False):
    nonlocal last_saved
    if last_saved == step and not force:
      return
    ckpt.save(step, state, data_state=data.get_state(), config=cfg.to_dict())
    last_saved = step

  def consume(done_step, m):
    nonlocal tokens_done, t_window, n_window, first_time, window_losses
    scal = _scalar_metrics(m)
    losses[done_step] = scal["loss"]
    if math.isfinite(scal["loss"]):
      window_losses.append(scal["loss"])
    if first_time is None:
      # The first step's time is mostly compilation: rates and the ETA count from its end.
      first_time = t_window = time.time()
    else:
      n_window += 1
    if scal["nonfinite"] >= t.max_nonfinite:
      raise NonFiniteError(
          f"{int(scal['nonfinite'])} consecutive steps had a non-finite loss or gradient (train.max_nonfinite="
          f"{t.max_nonfinite}); the last finite checkpoint is in {ckpt.directory}. Lower optim.lr, check the "
          "data, or raise train.max_nonfinite")
    if not scal["finite"]:
      writer.log(f"step {done_step}: non-finite loss/gradient, update skipped ({int(scal['skipped'])} so far)")
    if done_step % t.log_every == 0 or done_step == end:
      now = time.time()
      dt = max(now - t_window, 1e-9)
      if n_window:
        tps = n_window * bsz * seq / dt
        scal["tokens_per_sec"] = tps
        scal["step_time"] = dt / n_window
        u = flops.mfu(tps / jax.device_count(), fpt, peak)
        if u is not None:
          scal["mfu"] = u
      if window_losses:
        scal["loss_avg"] = float(np.mean(window_losses))
        window_losses = []
      scal.update({f"expert_load/{k}": v for k, v in
                   metrics_lib.expert_load_stats(np.asarray(m["expert_counts"])).items()}
                  if np.asarray(m["expert_counts"]).size else {})
      writer.write(done_step, scal)
      t_window, n_window = now, 0

  if jax.process_count() > 1 and step < end:
    # Compile ahead and meet: the processes' first collective must start within gloo's 30 s on CPU (and a
    # straggler's compile should not count against any collective timeout elsewhere).
    first = _global_batch(next(data), batch_sh)
    step_fn = step_fn.lower(state, first).compile()
    distributed.barrier(f"train step compiled ({start})")
  else:
    first = None

  with _Signals() as sig:
    try:
      while step < end:
        batch = first if first is not None else _global_batch(next(data), batch_sh)
        first = None
        state, m = step_fn(state, batch)
        step += 1
        if pending is not None:
          consume(*pending)
        pending = (step, m)
        tokens_done += bsz * seq
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
          save(step, state)
        if _agree(sig.received is not None):
          interrupted = True
          break
      if pending is not None:
        consume(*pending)
        pending = None
    finally:
      # Whatever stopped the loop (the end, a signal, an error in a later step), the last completed state
      # is saved unless it is already on disk.
      if step > start or last_saved is None:
        try:
          jax.block_until_ready(state)
          save(step, state)
        except Exception as e:  # noqa: BLE001 - the original error matters more
          log.error("could not save the final checkpoint: %s", e)
      ckpt.wait()
      writer.close()
  wall = time.time() - t_start
  # From the end of the first step (its compile excluded) to now: the tokens of the steps after it.
  steady = (tokens_done - bsz * seq) / max(time.time() - first_time, 1e-9) if first_time else 0.0
  if losses:
    first, last = min(losses), max(losses)
    say(f"loss: step {first} {losses[first]:.4f} -> step {last} {losses[last]:.4f}; "
        f"{tokens_done} tokens in {wall:.1f}s wall ({steady:.0f} tokens/s after the first step)")
    k = min(10, len(losses) // 2)
    if k >= 2:  # single batches are noisy: the means of the first and last k steps show the trend
      steps = sorted(losses)
      head, tail = (float(np.mean([losses[s] for s in part])) for part in (steps[:k], steps[-k:]))
      say(f"mean loss: first {k} steps {head:.4f} -> last {k} steps {tail:.4f}")
  if interrupted:
    say(f"stopped at step {step} after a signal; checkpoint saved in {ckpt.step_dir(step)}; run the same command "
        "to resume")
  return RunResult(losses=losses, state=state, step=step, interrupted=interrupted or step < total,
                   wall_seconds=wall, tokens_per_sec=steady)


def main(cfg) -> RunResult:
  """The ``joyjax train`` entry: prints the resolved config, trains, exits non-zero on a non-finite stop."""
  distributed.initialize(cfg)  # before jax.process_index(), which would start a single-process backend
  if jax.process_index() == 0:
    print("config:\n" + str(cfg), flush=True)
  try:
    return train(cfg)
  except NonFiniteError as e:
    raise SystemExit(f"joyjax train: {e}")
