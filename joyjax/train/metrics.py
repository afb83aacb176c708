"""Metrics: a JSON line per logged step (``<output_dir>/metrics.jsonl``), TensorBoard scalars
(``<output_dir>/tb``) and a progress display, written by the primary process only.

Progress: on a terminal, one line redrawn in place (step/total, a bar, loss, tokens/s, MFU, ETA); otherwise
(a log file, a pipe, a notebook capture) one plain line per ``write``::

  step 10/300 loss 5.123 tok/s 12345 mfu 1.2% load 1.23 eta 1m02s

The display reads the metric keys ``loss`` (with ``loss_avg``, the mean over the log window, when given),
``tokens_per_sec``, ``mfu`` (a fraction; shown as percent), ``expert_load/max_mean_ratio`` (as ``load``) and
``eval/loss`` with ``eval/perplexity`` (as ``eval loss 4.321 ppl 75.3``) when present. The ETA comes from the
wall time between ``write`` calls (smoothed, so the first step's compilation does not dominate it), or from a
``step_time`` metric (seconds per step) when one is given.

``Throughput`` computes those rates: tokens/s, seconds per step and MFU per log window, and the run's steady
tokens/s (from the end of the first, compiling, step).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

from joyjax.train import flops


def format_eta(seconds) -> str:
  """45s, 1m02s, 2h03m04s, 3d04h05m; '?' when unknown."""
  if seconds is None:
    return "?"
  try:
    seconds = float(seconds)
  except (TypeError, ValueError):
    return "?"
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  d, s = divmod(s, 86400)
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  if d:
    return f"{d}d{h:02d}h{m:02d}m"
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


def _to_number(v):
  """A Python float/int for a scalar (Python, numpy or jax, any shape with one element); None otherwise."""
  if isinstance(v, bool):
    return float(v)
  if isinstance(v, numbers.Number):
    return float(v)
  if hasattr(v, "shape") and hasattr(v, "dtype"):
    try:
      a = np.asarray(v)
    except Exception:  # noqa: BLE001 - e.g. a non-addressable array
      return None
    if a.size == 1 and (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
      return float(a.reshape(()))
  return None


def _flatten(metrics: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in metrics.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def expert_load_stats(counts) -> dict[str, float]:
  """Load statistics from per-expert token counts: an array [experts], [layers, experts] (or any leading
  axes), a list of such arrays or a dict of them (e.g. the per-stack ``expert_counts`` of the model's aux).

  Returns max / mean / min tokens per expert over all layers, ``max_mean_ratio`` (the worst layer's max over
  mean: 1.0 is perfect balance, ``num_experts`` is every token on one expert) and ``max_mean_ratio_avg`` (that
  ratio averaged over layers). A layer that routed no tokens has ratio 0."""
  if isinstance(counts, dict):
    counts = list(counts.values())
  if isinstance(counts, (list, tuple)):
    arrays = [np.asarray(c, dtype=np.float64) for c in counts]
    e = {a.shape[-1] for a in arrays}
    if len(e) != 1:
      raise ValueError(f"expert counts have different numbers of experts: {sorted(e)}")
    per_layer = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays], axis=0)
  else:
    a = np.asarray(counts, dtype=np.float64)
    per_layer = a.reshape(-1, a.shape[-1])
  layer_max = per_layer.max(axis=-1)
  layer_mean = per_layer.mean(axis=-1)
  ratio = np.where(layer_mean > 0, layer_max / np.where(layer_mean > 0, layer_mean, 1.0), 0.0)
  return {
      "max": float(per_layer.max()),
      "mean": float(per_layer.mean()),
      "min": float(per_layer.min()),
      "max_mean_ratio": float(ratio.max()),
      "max_mean_ratio_avg": float(ratio.mean()),
  }


class Throughput:
  """Tokens/s, seconds per step and MFU over log windows, and the steady rate of a run.

  ``step_done()`` is called when a step's results are read (the step has finished). The first step's time is
  mostly compilation, so rates count from its end: the first window starts there, and ``steady_tokens_per_sec``
  is the tokens of the later steps over the time since. ``window()`` returns the rates of the steps finished
  since the previous call (``{}`` when there were none) and starts a new window. ``exclude(seconds)`` leaves
  out time spent on something else (an evaluation) from the current window and the steady rate.

  MFU: ``flops_per_token`` (a number or ``flops.flops_per_token``'s dict) and ``peak_flops`` per device,
  tokens spread over ``devices``; absent when the peak is unknown.
  """

  def __init__(self, tokens_per_step: int, *, devices: int = 1, flops_per_token=None, peak_flops=None,
               clock=None):
    self.tokens_per_step = int(tokens_per_step)
    self.devices = max(int(devices), 1)
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._clock = clock or time.time
    self.steps = 0                          # steps finished (read)
    self.first_end: float | None = None     # when the first step finished
    self._window_start: float | None = None
    self._window_steps = 0

  @property
  def tokens(self) -> int:
    return self.steps * self.tokens_per_step

  def step_done(self) -> None:
    now = self._clock()
    self.steps += 1
    if self.first_end is None:
      self.first_end = self._window_start = now
    else:
      self._window_steps += 1

  def exclude(self, seconds: float) -> None:
    if self.first_end is not None:
      self.first_end += seconds
      self._window_start += seconds

  def window(self) -> dict[str, float]:
    now = self._clock()
    out: dict[str, float] = {}
    if self._window_steps:
      dt = max(now - self._window_start, 1e-9)
      tps = self._window_steps * self.tokens_per_step / dt
      out = {"tokens_per_sec": tps, "step_time": dt / self._window_steps}
      u = self.mfu(tps)
      if u is not None:
        out["mfu"] = u
    if self.first_end is not None:
      self._window_start, self._window_steps = now, 0
    return out

  def mfu(self, tokens_per_sec: float) -> float | None:
    if self.flops_per_token is None:
      return None
    return flops.mfu(tokens_per_sec / self.devices, self.flops_per_token, self.peak_flops)

  def steady_tokens_per_sec(self) -> float:
    """Tokens/s of the steps after the first, from its end to now (0.0 before the first step finished)."""
    if self.first_end is None:
      return 0.0
    return (self.steps - 1) * self.tokens_per_step / max(self._clock() - self.first_end, 1e-9)

  def eta_seconds(self, remaining_steps: int, step_time: float | None = None) -> float | None:
    """Seconds for ``remaining_steps`` more steps at ``step_time`` (default: the steady rate so far)."""
    if step_time is None:
      if self.first_end is None or self.steps < 2:
        return None
      step_time = (self._clock() - self.first_end) / (self.steps - 1)
    return max(int(remaining_steps), 0) * step_time


class MetricsWriter:
  """Writes metrics of logged steps; a no-op on non-primary processes (``is_primary=False``).

  ``stream``: where progress goes (default ``sys.stdout``); ``tty``: force (True) or suppress (False) the
  in-place progress bar (default: ``stream.isatty()``).
  """

  def __init__(self, output_dir, *, total_steps: int, is_primary: bool = True, stream=None,
               tty: bool | None = None, tensorboard: bool = True):
    self.output_dir = os.fspath(output_dir)
    self.total_steps = int(total_steps)
    self.is_primary = bool(is_primary)
    self.stream = stream if stream is not None else sys.stdout
    if tty is None:
      isatty = getattr(self.stream, "isatty", None)
      tty = bool(isatty and isatty())
    self.tty = tty
    self._bar_shown = False
    self._bar_text = ""
    self._last: tuple[int, float] | None = None  # (step, time) of the previous write
    self._sec_per_step: float | None = None
    self._jsonl = None
    self._tb = None
    if not self.is_primary:
      return
    os.makedirs(self.output_dir, exist_ok=True)
    self._jsonl = open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self.output_dir, "tb"))

  # ------------------------------------------------------------------------------ writing

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records ``metrics`` of ``step``: numbers (Python, numpy or one-element jax arrays) become floats;
    nested dicts are flattened with '/' ('expert_load/max'); non-finite values are written as null in the
    JSON line (TensorBoard gets them as they are); strings go to the JSON line only."""
    if not self.is_primary:
      return
    step = int(step)
    now = time.time()
    flat = _flatten(dict(metrics))
    record: dict[str, Any] = {"step": step, "time": round(now, 3)}
    numeric: dict[str, float] = {}
    for k, v in flat.items():
      x = _to_number(v)
      if x is not None:
        numeric[k] = x
        record[k] = x if math.isfinite(x) else None
      elif isinstance(v, str) or v is None:
        record[k] = v
      else:
        record[k] = str(v)
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, x in numeric.items():
        self._tb.add_scalar(k, x, step)
      self._tb.flush()
    self._update_rate(step, now, numeric.get("step_time"))
    self._show(step, numeric)

  def _update_rate(self, step: int, now: float, step_time: float | None) -> None:
    if step_time is not None and math.isfinite(step_time) and step_time > 0:
      self._sec_per_step = step_time
    elif self._last is not None and step > self._last[0]:
      rate = (now - self._last[1]) / (step - self._last[0])
      self._sec_per_step = rate if self._sec_per_step is None else 0.5 * self._sec_per_step + 0.5 * rate
    self._last = (step, now)

  def eta_seconds(self, step: int) -> float | None:
    if self._sec_per_step is None:
      return None
    return max(self.total_steps - step, 0) * self._sec_per_step

  def _fields(self, metrics: dict[str, float]) -> list[str]:
    parts = []
    if "loss" in metrics:
      parts.append(f"loss {metrics['loss']:.3f}")
      if "loss_avg" in metrics and math.isfinite(metrics["loss_avg"]):  # one batch is noisy; the window is not
        parts.append(f"(avg {metrics['loss_avg']:.3f})")
    if "tokens_per_sec" in metrics and math.isfinite(metrics["tokens_per_sec"]):
      parts.append(f"tok/s {metrics['tokens_per_sec']:.0f}")
    if "mfu" in metrics and math.isfinite(metrics["mfu"]):
      parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    load = metrics.get("expert_load/max_mean_ratio")
    if load is not None and math.isfinite(load):  # the busiest expert's tokens over the mean (1.00 = balanced)
      parts.append(f"load {load:.2f}")
    if "eval/loss" in metrics and math.isfinite(metrics["eval/loss"]):
      parts.append(f"eval loss {metrics['eval/loss']:.3f}")
      if "eval/perplexity" in metrics and math.isfinite(metrics["eval/perplexity"]):
        parts.append(f"ppl {metrics['eval/perplexity']:.1f}")
    return parts

  def format_line(self, step: int, metrics: dict[str, float]) -> str:
    """``step 10/300 loss 5.123 tok/s 12345 mfu 1.2% load 1.23 eta 1m02s`` (fields present in ``metrics``
    only)."""
    return " ".join([f"step {step}/{self.total_steps}", *self._fields(metrics),
                     f"eta {format_eta(self.eta_seconds(step))}"])

  def format_bar(self, step: int, metrics: dict[str, float], width: int = 100) -> str:
    """``step 10/300 [#...............] 3% loss 5.123 tok/s 12345 mfu 1.2% eta 1m02s``, cut to ``width``."""
    frac = min(max(step / self.total_steps, 0.0), 1.0) if self.total_steps > 0 else 0.0
    filled = int(frac * 20)
    bar = f"[{'#' * filled}{'.' * (20 - filled)}] {100 * frac:.0f}%"
    text = " ".join([f"step {step}/{self.total_steps}", bar, *self._fields(metrics),
                     f"eta {format_eta(self.eta_seconds(step))}"])
    return text[:width]

  def _show(self, step: int, metrics: dict[str, float]) -> None:
    if not self.tty:
      self.stream.write(self.format_line(step, metrics) + "\n")
      self.stream.flush()
      return
    width = shutil.get_terminal_size((100, 20)).columns - 1
    self._bar_text = self.format_bar(step, metrics, width)
    self.stream.write("\r" + self._bar_text.ljust(width))  # pad: erase what a longer previous line left
    self.stream.flush()
    self._bar_shown = True

  def log(self, msg: str) -> None:
    """A plain message line (above the progress bar on a terminal)."""
    if not self.is_primary:
      return
    if self.tty and self._bar_shown:
      width = shutil.get_terminal_size((100, 20)).columns - 1
      self.stream.write("\r" + " " * width + "\r" + msg + "\n" + self._bar_text.ljust(width))
    else:
      self.stream.write(msg + "\n")
    self.stream.flush()

  def close(self) -> None:
    if not self.is_primary:
      return
    if self.tty and self._bar_shown:
      self.stream.write("\n")
      self.stream.flush()
      self._bar_shown = False
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
