"""The loop harness every objective runs on (pretraining today; SFT, DPO and RL reuse it): a jitted
``step(state, batch) -> (state, metrics)``, a batch iterator with ``get_state`` / ``set_state``, a state, a
``Checkpointer`` and an optional ``Evaluator``. Per step, top to bottom::

    step -> log -> maybe evaluate -> maybe save -> stop on a signal

* **log**: a step's metrics are read after the next step is dispatched (the device stays busy); every
  ``log_every`` steps (and at the last step, and at an evaluation) one line goes to ``MetricsWriter``
  (metrics.jsonl, TensorBoard, the progress line) with the window's mean loss, tokens/s, MFU (``Throughput``),
  the expert load and the data iterator's counters (``data/skipped_malformed``, truncated / overlong examples).
* **evaluate**: every ``Evaluator.every`` steps and at the end of the run, the objective's jitted
  ``eval_step(state, batch) -> sums`` over the same fixed batches, summarised (``eval/...``) into that step's line.
* **save**: every ``checkpoint_every`` steps, with the iterator's state; and whatever stops the loop (the end, a
  signal, an error), the last finished step is saved unless it is already on disk.
* **signals**: SIGTERM / SIGINT finish the current step, save and return (``Progress.interrupted``); with
  several processes all stop at the same step (``agree``).
* **multi-process**: the step (and eval step) compile ahead and the processes meet at a barrier before the first
  step, so no process's compile counts against a collective's timeout.

Resume: ``restore_latest`` gives the state and data position of the latest checkpoint; ``run`` continues from
the state's ``step``. A run whose latest checkpoint is at its last step is complete (``complete``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from joyjax.errors import NonFiniteError
from joyjax.parallel import distributed
from joyjax.train.metrics import MetricsWriter, Throughput, expert_load_stats

log = logging.getLogger(__name__)


class Signals:
  """Turns SIGTERM / SIGINT into a flag the loop polls between steps (main thread only). A second signal
  while the checkpoint is written is ignored."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
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


def agree(flag: bool) -> bool:
  """True on every process when any process has ``flag`` (a signal reaches hosts at different steps)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def global_batch(local: dict, sharding) -> dict:
  """This process's rows -> the global batch (each process contributes its slice, in mesh order)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def local_batch(local: dict, sharding) -> dict:
  """This process's rows as they are (numpy), for a step that moves them itself (``Objective.make_runtime``)."""
  return local


def scalar_metrics(m: dict) -> dict[str, float]:
  """The scalar entries of a step's metrics as Python floats (arrays such as expert counts left out)."""
  out = {}
  for k, v in m.items():
    if k == "expert_counts":
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[k] = float(a)
  return out


def expert_load_metrics(m: dict) -> dict[str, float]:
  """``expert_load/...`` statistics of the step's per-expert token counts (none without MoE layers)."""
  counts = np.asarray(m["expert_counts"]) if "expert_counts" in m else np.zeros((0,))
  return {f"expert_load/{k}": v for k, v in expert_load_stats(counts).items()} if counts.size else {}


def data_metrics(data) -> dict[str, float]:
  """The data iterator's counters so far (``data/...``: malformed rows skipped, examples truncated or skipped as
  overlong), read from this process's iterator; none for an iterator without ``metrics()``."""
  counts = data.metrics() if hasattr(data, "metrics") else {}
  return {name: float(v) for name, v in counts.items()}


def restore_latest(checkpointer, data, abstract_state):
  """(state, step) of the latest checkpoint, with ``data`` moved to where it was; None without one."""
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  state, data_state, _ = checkpointer.restore(latest, abstract_state=abstract_state)
  if data_state is not None:
    data.set_state(data_state)
  return state, latest


def complete(checkpointer, total_steps: int) -> str | None:
  """The "run complete" line when the latest checkpoint is at (or past) ``total_steps``; None otherwise."""
  latest = checkpointer.latest_step()
  if latest is None or latest < total_steps:
    return None
  return (f"run complete: step {latest}/{total_steps} in {checkpointer.directory}; raise train.steps to train "
          "further")


@dataclasses.dataclass
class Progress:
  """Where a run stands: the loop's parts read and advance this, nothing else."""
  start: int                      # the step this invocation started from (0, or the restored step)
  step: int                       # the last step dispatched
  end: int                        # where this invocation stops (total, or earlier for tests)
  total: int                      # the run's last step
  last_saved: int | None          # the step of the newest checkpoint written or found
  interrupted: bool = False       # stopped by a signal
  losses: dict[int, float] = dataclasses.field(default_factory=dict)  # per-step loss of this invocation

  @property
  def finished(self) -> bool:
    return self.step >= self.total


def eval_due(progress: "Progress", every: int) -> bool:
  """An evaluation is due every ``every`` steps (0 = never) and at the run's last step."""
  return progress.step == progress.total or (every > 0 and progress.step % every == 0)


@dataclasses.dataclass
class Evaluator:
  """An objective's evaluation: its jitted ``step(state, batch) -> {name: sum}`` over ``num_batches`` batches
  of ``dataset`` (process-local; ``iter()`` starts over, so the same batches every time), the sums added up
  in float64 and turned into metrics by ``summarize``; logged as ``eval/<name>``. Runs every ``every`` steps
  and at the end of the run."""
  step: Callable
  dataset: Iterable
  num_batches: int
  every: int
  summarize: Callable[[dict[str, float]], dict[str, float]]
  prefix: str = "eval/"

  def due(self, progress: Progress) -> bool:
    return eval_due(progress, self.every)

  def batches(self, sharding):
    it = iter(self.dataset)
    for _ in range(self.num_batches):
      yield global_batch(next(it), sharding)

  def compile(self, state, sharding) -> None:
    self.step = self.step.lower(state, next(self.batches(sharding))).compile()

  def __call__(self, state, sharding) -> dict[str, float]:
    sums: dict[str, float] = {}
    for batch in self.batches(sharding):
      for k, v in jax.device_get(self.step(state, batch)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return {self.prefix + k: v for k, v in self.summarize(sums).items()}


class StepLog:
  """Reads each step's metrics (one step late: ``push``) and writes a line every ``log_every`` steps, at the
  run's last step and when ``flush`` brings extra metrics (an evaluation). Stops the run with
  ``NonFiniteError`` after ``max_nonfinite`` consecutive non-finite steps (the ``nonfinite`` metric)."""

  def __init__(self, writer: MetricsWriter, throughput: Throughput, progress: Progress, *, log_every: int,
               max_nonfinite: int = 0, where: str = "", scalars=scalar_metrics, at_log_line=expert_load_metrics):
    self.writer, self.throughput, self.progress = writer, throughput, progress
    self.log_every, self.max_nonfinite, self.where = int(log_every), int(max_nonfinite), where
    self.scalars, self.at_log_line = scalars, at_log_line
    self._pending: tuple[int, Any] | None = None
    self._window_losses: list[float] = []  # the finite losses since the last line (their mean is logged)

  def push(self, step: int, metrics) -> None:
    """Holds ``step``'s metrics and records the previous step's."""
    if self._pending is not None:
      self._record(*self._pending)
    self._pending = (step, metrics)

  def flush(self, extra: dict | None = None) -> None:
    """Records the held step now, with ``extra`` metrics in its line (which is then written)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._record(*pending, extra=extra)

  def _record(self, step: int, m, extra: dict | None = None) -> None:
    scal = self.scalars(m)
    self.progress.losses[step] = scal["loss"]
    if math.isfinite(scal["loss"]):
      self._window_losses.append(scal["loss"])
    self.throughput.step_done()
    if self.max_nonfinite and scal.get("nonfinite", 0) >= self.max_nonfinite:
      raise NonFiniteError(
          f"{int(scal['nonfinite'])} consecutive steps had a non-finite loss or gradient (train.max_nonfinite="
          f"{self.max_nonfinite}); the last finite checkpoint is in {self.where}. Lower optim.lr, check the "
          "data, or raise train.max_nonfinite")
    if not scal.get("finite", True):
      self.writer.log(f"step {step}: non-finite loss/gradient, update skipped ({int(scal['skipped'])} so far)")
    if step % self.log_every == 0 or step == self.progress.end or extra:
      scal.update(self.throughput.window())
      if self._window_losses:
        scal["loss_avg"] = float(np.mean(self._window_losses))
        self._window_losses = []
      scal.update(self.at_log_line(m))
      scal.update(extra or {})
      self.writer.write(step, scal)


class Harness:
  """Runs ``step`` over ``data`` from ``state`` to ``total_steps`` (see the module docstring).

  ``data``: yields this process's batches (dicts of arrays), ``get_state`` / ``set_state`` for exact resume.
  ``checkpoint_every``: 0 = only at the end. ``config``: stored with each checkpoint.
  """

  def __init__(self, *, step: Callable, data, checkpointer, batch_sharding, writer: MetricsWriter,
               throughput: Throughput, total_steps: int, log_every: int, checkpoint_every: int = 0,
               max_nonfinite: int = 0, evaluator: Evaluator | None = None, config: Any = None,
               to_device: Callable = global_batch):
    self.step, self.data, self.checkpointer, self.to_device = step, data, checkpointer, to_device
    self.batch_sharding, self.writer, self.throughput = batch_sharding, writer, throughput
    self.total, self.log_every, self.checkpoint_every = int(total_steps), int(log_every), int(checkpoint_every)
    self.max_nonfinite, self.evaluator, self.config = int(max_nonfinite), evaluator, config

  def run(self, state, *, stop_after: int | None = None) -> tuple[Any, Progress]:
    """Trains from ``state['step']`` to ``total_steps`` (or, for tests, only until ``stop_after``, as if
    interrupted there after saving). Returns the last state and the run's ``Progress``."""
    start = int(jax.device_get(state["step"]))
    end = self.total if stop_after is None else min(self.total, int(stop_after))
    p = Progress(start=start, step=start, end=end, total=self.total,
                 last_saved=start if self.checkpointer.latest_step() == start else None)
    log_ = StepLog(self.writer, self.throughput, p, log_every=self.log_every, max_nonfinite=self.max_nonfinite,
                   where=str(self.checkpointer.directory),
                   at_log_line=lambda m: {**expert_load_metrics(m), **data_metrics(self.data)})
    first = self._compile_and_meet(state, p)
    with Signals() as sig:
      try:
        while p.step < p.end:
          batch, first = (first if first is not None else self._next_batch()), None
          state, metrics = self.step(state, batch)
          p.step += 1
          log_.push(p.step, metrics)
          if self.evaluator is not None and self.evaluator.due(p):
            log_.flush(self._evaluate(state))
          if self.checkpoint_every and p.step % self.checkpoint_every == 0 and p.step < p.total:
            self._save(state, p)
          if agree(sig.received is not None):
            p.interrupted = True
            break
        log_.flush()
      finally:
        self._save_last(state, p)
    return state, p

  # ------------------------------------------------------------------------------ the parts

  def _next_batch(self):
    return self.to_device(next(self.data), self.batch_sharding)

  def _compile_and_meet(self, state, p: Progress):
    """Several processes: compile ahead and meet at a barrier (the first collective must start within gloo's
    30 s on CPU; a straggler's compile should not count against any collective timeout). Returns the first
    batch (already read to compile with) or None."""
    if jax.process_count() == 1 or p.step >= p.end:
      return None
    first = self._next_batch()
    if hasattr(self.step, "lower"):  # a host-side step (RL) compiles its parts on first use
      self.step = self.step.lower(state, first).compile()
    if self.evaluator is not None:
      self.evaluator.compile(state, self.batch_sharding)
    distributed.barrier(f"train step compiled ({p.start})")
    return first

  def _evaluate(self, state) -> dict[str, float]:
    jax.block_until_ready(state)  # the step's own time is the step's, not the evaluation's
    t0 = time.time()
    out = self.evaluator(state, self.batch_sharding)
    self.throughput.exclude(time.time() - t0)
    return out

  def _save(self, state, p: Progress, *, force: bool = False) -> None:
    if p.last_saved == p.step and not force:
      return
    self.checkpointer.save(p.step, state, data_state=self.data.get_state(), config=self.config)
    p.last_saved = p.step

  def _save_last(self, state, p: Progress) -> None:
    """Whatever stopped the loop, the last finished state is saved unless it is already on disk."""
    try:
      if p.step > p.start or p.last_saved is None:
        try:
          jax.block_until_ready(state)
          self._save(state, p)
        except Exception as e:  # noqa: BLE001 - the error that stopped the loop matters more
          log.error("could not save the final checkpoint: %s", e)
      self.checkpointer.wait()
    finally:
      self.writer.close()


def summary_lines(p: Progress, throughput: Throughput, wall_seconds: float) -> list[str]:
  """The end-of-run lines: first and last loss, tokens, time and steady tokens/s; the means of the first and
  last k <= 10 steps (single batches are noisy); where a stopped run resumes from."""
  lines = []
  losses = p.losses
  if losses:
    first, last = min(losses), max(losses)
    lines.append(f"loss: step {first} {losses[first]:.4f} -> step {last} {losses[last]:.4f}; "
                 f"{throughput.tokens} tokens in {wall_seconds:.1f}s wall "
                 f"({throughput.steady_tokens_per_sec():.0f} tokens/s after the first step)")
    k = min(10, len(losses) // 2)
    if k >= 2:
      steps = sorted(losses)
      head, tail = (float(np.mean([losses[s] for s in part])) for part in (steps[:k], steps[-k:]))
      lines.append(f"mean loss: first {k} steps {head:.4f} -> last {k} steps {tail:.4f}")
  return lines
