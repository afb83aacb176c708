"""Metrics and FLOPs: ETA formatting, expert-load statistics, the MetricsWriter's JSON lines / TensorBoard
events / progress display, the counted FLOPs of the tiny model (derived by hand from flops.py's formula), MFU
and device peaks."""

import glob
import io
import json
import math
import os
import struct
import types

import jax.numpy as jnp
import numpy as np
import pytest

from joyjax.config import load_config
from joyjax.train import flops, metrics
from joyjax.train.metrics import MetricsWriter, expert_load_stats, format_eta

# ------------------------------------------------------------------------------------------------- ETA


@pytest.mark.parametrize("seconds,want", [
    (0, "0s"), (45, "45s"), (44.6, "45s"), (59.4, "59s"), (59.6, "1m00s"), (62, "1m02s"), (3599, "59m59s"),
    (3600, "1h00m00s"), (2 * 3600 + 3 * 60 + 4, "2h03m04s"), (86399, "23h59m59s"), (86400, "1d00h00m"),
    (3 * 86400 + 4 * 3600 + 5 * 60 + 6, "3d04h05m"), (np.float32(90.0), "1m30s"),
    (None, "?"), (float("nan"), "?"), (float("inf"), "?"), (-1, "?"), ("soon", "?"),
])
def test_format_eta(seconds, want):
  assert format_eta(seconds) == want


# ---------------------------------------------------------------------------------------- expert load


def test_expert_load_stats_by_hand():
  # layer 0 perfectly balanced (max / mean = 1), layer 1 all on one expert (max / mean = 8 / 2 = 4)
  counts = np.array([[2, 2, 2, 2], [8, 0, 0, 0]])
  s = expert_load_stats(counts)
  assert s == {"max": 8.0, "mean": 2.0, "min": 0.0, "max_mean_ratio": 4.0, "max_mean_ratio_avg": 2.5}


def test_expert_load_stats_dict_of_stacks_and_idle_layer():
  # per-stack counts as in the model's aux: moe_layers [2 layers, 4], mtp [1, 4]; one layer routed nothing
  counts = {"moe_layers": jnp.array([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
            "mtp": jnp.array([[3.0, 3.0, 3.0, 3.0]])}
  s = expert_load_stats(counts)
  # ratios per layer: 3 / 1 = 3, 0 (no tokens), 3 / 3 = 1
  assert s["max"] == 3.0 and s["min"] == 0.0
  assert s["mean"] == pytest.approx(16 / 12)
  assert s["max_mean_ratio"] == 3.0
  assert s["max_mean_ratio_avg"] == pytest.approx(4 / 3)
  with pytest.raises(ValueError, match="numbers of experts"):
    expert_load_stats([np.ones((2, 4)), np.ones((1, 8))])


# ------------------------------------------------------------------------------------------------ writer


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _read_tb_scalars(logdir):
  """{tag: [(step, value)]} from the TFRecord event files under ``logdir`` (parsed by hand)."""
  from tensorboardX.proto import event_pb2
  out = {}
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  for name in files:
    with open(name, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]  # after the length and its crc
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return files, out


class _Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_writer_jsonl_tensorboard_and_plain_lines(tmp_path, monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=clock))  # only the writer's clock
  stream = io.StringIO()  # not a terminal: one plain line per write
  w = MetricsWriter(tmp_path, total_steps=100, stream=stream)
  assert not w.tty
  w.write(1, {"loss": jnp.float32(2.5), "tokens_per_sec": 12345.4, "mfu": np.float64(0.0123),
              "grad_norm": float("nan"), "lr": jnp.array([3e-4]), "inf": float("inf"),
              "expert_load": {"max": 7, "ratio": np.int32(2)}, "note": "warmup", "missing": None,
              "vector": np.arange(3.0)})
  clock.t += 20.0
  w.write(11, {"loss": 2.0})   # 20 s over 10 steps: 2 s/step -> eta (100 - 11) * 2 = 178 s
  clock.t += 40.0
  w.write(21, {"loss": 1.5})   # 4 s/step, smoothed 0.5 * 2 + 0.5 * 4 = 3 -> eta 79 * 3 = 237 s
  w.write(50, {"loss": 1.25, "step_time": 0.5})  # an explicit step_time wins: 50 * 0.5 = 25 s
  w.close()

  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 11, 21, 50]
  r = rows[0]
  assert r["time"] == 1000.0
  assert r["loss"] == 2.5 and r["tokens_per_sec"] == pytest.approx(12345.4) and r["mfu"] == 0.0123
  assert r["grad_norm"] is None and r["inf"] is None          # non-finite -> null
  assert r["lr"] == pytest.approx(3e-4)
  assert r["expert_load/max"] == 7.0 and r["expert_load/ratio"] == 2.0
  assert r["note"] == "warmup" and r["missing"] is None
  assert isinstance(r["vector"], str)

  files, scalars = _read_tb_scalars(tmp_path / "tb")
  assert files
  assert scalars["loss"] == [(1, 2.5), (11, 2.0), (21, 1.5), (50, 1.25)]
  assert scalars["expert_load/max"] == [(1, 7.0)]
  assert math.isnan(scalars["grad_norm"][0][1])               # TensorBoard gets the value as it is
  assert "note" not in scalars

  lines = stream.getvalue().splitlines()
  assert lines == [
      "step 1/100 loss 2.500 tok/s 12345 mfu 1.2% eta ?",
      "step 11/100 loss 2.000 eta 2m58s",
      "step 21/100 loss 1.500 eta 3m57s",
      "step 50/100 loss 1.250 eta 25s",
  ]
  assert "\r" not in stream.getvalue()


def test_writer_progress_bar_on_a_terminal(tmp_path, monkeypatch):
  monkeypatch.setenv("COLUMNS", "81")  # terminal width 81: lines are 80 wide
  stream = io.StringIO()
  w = MetricsWriter(tmp_path, total_steps=200, stream=stream, tty=True, tensorboard=False)
  w.write(50, {"loss": 3.0, "step_time": 2.0})
  out = stream.getvalue()
  bar = "step 50/200 [#####...............] 25% loss 3.000 eta 5m00s"  # 150 steps * 2 s
  assert out == "\r" + bar.ljust(80)
  w.log("saved checkpoint 50")
  out = stream.getvalue()
  assert out.endswith("\r" + " " * 80 + "\r" + "saved checkpoint 50\n" + bar.ljust(80))
  w.write(200, {"loss": 2.0, "step_time": 2.0})
  assert stream.getvalue().endswith("\rstep 200/200 [####################] 100% loss 2.000 eta 0s".ljust(81))
  assert stream.getvalue().count("\n") == 1  # only the log line's: the bar is redrawn in place
  w.close()
  assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 2
  assert not os.path.exists(tmp_path / "tb")


def test_writer_shows_the_window_mean_loss(tmp_path):
  w = MetricsWriter(tmp_path, total_steps=100, stream=io.StringIO(), tensorboard=False)
  assert w.format_line(10, {"loss": 2.0, "loss_avg": 2.25}) == "step 10/100 loss 2.000 (avg 2.250) eta ?"
  assert w.format_line(10, {"loss": 2.0, "loss_avg": float("nan")}) == "step 10/100 loss 2.000 eta ?"
  w.close()


def test_writer_format_bar_is_cut_to_width(tmp_path):
  w = MetricsWriter(tmp_path, total_steps=10, stream=io.StringIO(), tensorboard=False)
  text = w.format_bar(3, {"loss": 1.0, "tokens_per_sec": 1e6, "mfu": 0.5}, width=30)
  assert text == "step 3/10 [######..............] 30% loss 1.000 tok/s 1000000 mfu 50.0% eta ?"[:30]
  w.close()


def test_writer_is_silent_on_other_processes(tmp_path):
  stream = io.StringIO()
  w = MetricsWriter(tmp_path / "run", total_steps=10, is_primary=False, stream=stream)
  w.write(1, {"loss": 1.0})
  w.log("hello")
  w.close()
  assert stream.getvalue() == "" and not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------------------------- FLOPs


def test_flops_per_token_of_tiny_config_by_hand():
  cfg = load_config("configs/tiny.py")
  m = cfg.model
  a, e = m.attention, m.moe
  h, H, dn, dr, dv, rq, rc = (m.hidden_size, a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim,
                              a.q_lora_rank, a.kv_lora_rank)
  S = 128
  # the docstring's per-token, per-layer forward counts
  q_a, q_b = 2 * h * rq, 2 * rq * H * (dn + dr)
  kv_a, kv_b, o = 2 * h * (rc + dr), 2 * rc * H * (dn + dv), 2 * H * dv * h
  proj = q_a + q_b + kv_a + kv_b + o
  scores = 2 * H * (dn + dr) * S / 2 + 2 * H * dv * S / 2
  dense_mlp = 3 * 2 * h * m.dense_intermediate_size
  router, routed = 2 * h * e.num_experts, e.num_experts_per_tok * 3 * 2 * h * e.intermediate_size
  shared = 3 * 2 * h * (e.num_shared_experts * e.intermediate_size)
  head = 2 * h * m.vocab_size
  mtp = 2 * (2 * h) * h + proj + scores + (router + routed + shared) + head
  n_moe = m.num_layers - m.first_k_dense
  forward = (m.num_layers * (proj + scores) + m.first_k_dense * dense_mlp
             + n_moe * (router + routed + shared) + head + m.mtp.num_layers * mtp)

  # the same numbers written out for the tiny config (h 64, 4 heads, dims 16/8/16, ranks 32/32, 3 layers of
  # which 1 dense (128 wide), 8 experts top-2 of width 32 + 1 shared, vocab 4096, 1 MTP module)
  assert proj == 4096 + 6144 + 5120 + 8192 + 8192 == 31744
  assert scores == 12288 + 8192 == 20480
  assert dense_mlp == 49152 and (router, routed, shared) == (1024, 24576, 12288) and head == 524288
  assert mtp == 16384 + 31744 + 20480 + 37888 + 524288 == 630784
  assert forward == 3 * 31744 + 3 * 20480 + 49152 + 2 * 37888 + 524288 + 630784 == 1436672

  got = flops.flops_per_token(cfg, S)
  assert got["total"] == 3 * forward == 4310016
  assert got["forward"] == forward
  assert got["attention_proj"] == 3 * 3 * proj and got["attention_scores"] == 3 * 3 * scores
  assert got["dense_mlp"] == 3 * dense_mlp
  assert (got["moe_router"], got["moe_routed"], got["moe_shared"]) == (3 * 2 * router, 3 * 2 * routed,
                                                                         3 * 2 * shared)
  assert got["head"] == 3 * head and got["mtp"] == 3 * mtp
  # the model group works too; without MTP its module is not counted
  assert flops.flops_per_token(m, S)["total"] == 4310016
  assert flops.flops_per_token(cfg, S, include_mtp=False)["total"] == 3 * (forward - mtp)
  # only the attention scores depend on the sequence length (linearly: causal S / 2 keys per query)
  longer = flops.flops_per_token(cfg, 2 * S)
  assert longer["total"] - got["total"] == 3 * (m.num_layers + m.mtp.num_layers) * scores


def test_flops_without_q_lora():
  cfg = load_config("configs/tiny.py", ["--config.model.attention.q_lora_rank=0", "--config.model.mtp.num_layers=0"])
  got = flops.flops_per_token(cfg, 128)
  proj = 2 * 64 * 4 * 24 + 5120 + 8192 + 8192  # q 2*h*H*(dn+dr) replaces q_a + q_b
  assert got["attention_proj"] == 3 * 3 * proj
  assert got["mtp"] == 0.0


def test_mfu_arithmetic():
  # 1000 tokens/s/device * 4e9 FLOPs/token = 4e12 FLOP/s on a 1e15 FLOP/s device = 0.4%
  assert flops.mfu(1000.0, 4e9, 1e15) == pytest.approx(0.004)
  assert flops.mfu(2500.0, {"total": 4e9, "forward": 1e9}, 1e15) == pytest.approx(0.01)
  assert flops.mfu(1000.0, 4e9, None) is None and flops.mfu(1000.0, 4e9, 0.0) is None


def test_peak_flops_per_device():
  h100 = "NVIDIA H100 80GB HBM3"
  assert flops.peak_flops_per_device(h100, "bfloat16") == pytest.approx(989e12)
  assert flops.peak_flops_per_device(h100) == pytest.approx(989e12)          # bfloat16 by default
  assert flops.peak_flops_per_device(h100, "bf16") == pytest.approx(989e12)
  assert flops.peak_flops_per_device(h100, jnp.bfloat16) == pytest.approx(989e12)
  assert flops.peak_flops_per_device(h100, jnp.dtype("bfloat16")) == pytest.approx(989e12)
  assert flops.peak_flops_per_device(h100, "float32") == pytest.approx(494.7e12)  # TF32 tensor cores
  assert flops.peak_flops_per_device(h100, np.float32) == pytest.approx(494.7e12)
  assert flops.peak_flops_per_device("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756e12)
  assert flops.peak_flops_per_device("NVIDIA H200", "bfloat16") == pytest.approx(989e12)
  assert flops.peak_flops_per_device("TPU v5 lite", "bfloat16") == pytest.approx(197e12)
  assert flops.peak_flops_per_device("cpu", "bfloat16") is None
  assert flops.peak_flops_per_device("cpu", "float32") is None
  assert flops.peak_flops_per_device(None) is None
  assert flops.peak_flops_per_device("cpu", peak_tflops=123.0) == pytest.approx(123e12)  # the config override


# ------------------------------------------------------------------------------------------ throughput


def test_throughput_windows_mfu_steady_rate_and_eta_by_hand():
  clock = _Clock()  # t = 1000
  tp = metrics.Throughput(1024, devices=4, flops_per_token=2e9, peak_flops=1e12, clock=clock)
  assert tp.window() == {} and tp.steady_tokens_per_sec() == 0.0 and tp.eta_seconds(10) is None
  clock.t = 1030.0
  tp.step_done()              # step 1 ends at 1030 (compilation): rates count from here
  assert tp.window() == {}    # no step finished inside a window yet
  clock.t = 1032.0
  tp.step_done()              # step 2: 2 s
  clock.t = 1036.0
  tp.step_done()              # step 3: 4 s
  w = tp.window()             # 2 steps x 1024 tokens in 6 s
  assert w["tokens_per_sec"] == pytest.approx(2048 / 6)
  assert w["step_time"] == pytest.approx(3.0)
  # 341.33 tokens/s over 4 devices = 85.33 per device x 2e9 FLOPs = 1.7067e11 of 1e12 per device
  assert w["mfu"] == pytest.approx(2048 / 6 / 4 * 2e9 / 1e12)
  clock.t = 1037.0
  tp.step_done()              # step 4: 1 s
  clock.t = 1047.0
  tp.exclude(8.0)             # 8 of the next 10 s went to an evaluation
  tp.step_done()              # step 5: 2 s of its own
  w = tp.window()             # 2 steps in 1047 - (1036 + 8) = 3 s
  assert w["tokens_per_sec"] == pytest.approx(2048 / 3) and w["step_time"] == pytest.approx(1.5)
  assert tp.steps == 5 and tp.tokens == 5 * 1024
  # steady: the 4 steps after the first over 1047 - (1030 + 8) = 9 s; ETA at that pace: 9 / 4 s per step
  assert tp.steady_tokens_per_sec() == pytest.approx(4 * 1024 / 9)
  assert tp.eta_seconds(100) == pytest.approx(100 * 9 / 4)
  assert tp.eta_seconds(100, step_time=0.5) == 50.0 and tp.eta_seconds(-3, step_time=0.5) == 0.0


def test_throughput_without_a_peak_has_no_mfu():
  clock = _Clock()
  tp = metrics.Throughput(100, flops_per_token={"total": 1e9}, peak_flops=None, clock=clock)
  tp.step_done()
  clock.t += 0.5
  tp.step_done()
  assert tp.window() == {"tokens_per_sec": 200.0, "step_time": 0.5}


def test_writer_line_shows_expert_load_and_eval(tmp_path):
  w = MetricsWriter(tmp_path, total_steps=300, stream=io.StringIO(), tensorboard=False)
  line = w.format_line(100, {"loss": 5.0, "tokens_per_sec": 3000.0, "expert_load/max_mean_ratio": 1.234,
                             "eval/loss": 4.5, "eval/perplexity": math.exp(4.5)})
  assert line == "step 100/300 loss 5.000 tok/s 3000 load 1.23 eval loss 4.500 ppl 90.0 eta ?"
  assert w.format_line(1, {"loss": 5.0, "expert_load/max": 7.0}) == "step 1/300 loss 5.000 eta ?"
  w.close()
