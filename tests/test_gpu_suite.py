"""benchmarks/gpu_suite.py runs end to end at tiny shapes on the CPU (the Pallas kernels in the interpreter), so
the GPU run's code paths (kernel correctness, the kernel table, the slice's train step with Muon and AdamW, the
per-part breakdown, decoding) never rot; and a failing part is recorded as an error, never a crash of the suite."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SUITE = os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.py")

PARTS = ("attention (MLA block)", "  attention, xla", "MoE layer", "  router", "  permute", "  routed experts",
         "  shared expert", "  combine", "dense MLP", "LM head + loss", "  LM head + loss, autodiff", "MTP block",
         "optimizer (muon)", "optimizer (muon, float32 NS)", "optimizer (adamw)")


def _load_suite():
  spec = importlib.util.spec_from_file_location("gpu_suite_bench", SUITE)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


# About 2 minutes on 2 busy CPU cores (six processes, two train-step compiles, interpret-mode kernels, two
# sampler compiles).
@pytest.mark.slow
def test_tiny_suite_runs_every_section_without_errors(tmp_path):
  out = tmp_path / "suite.json"
  proc = subprocess.run([sys.executable, SUITE, "--tiny", "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["errors"] == [], res["errors"]
  assert res["tiny"] is True and res["device"]["platform"] == "cpu"
  assert set(res["sections"]) == {"a", "b", "c", "d", "e"}
  for sec in res["sections"].values():
    assert _number(sec["seconds"]) and sec["seconds"] > 0

  # (a) every dtype x kernel x output, within tolerance, tails and empty groups exactly zero.
  a = res["sections"]["a"]["a"]
  assert "error" not in a
  names = {c["case"] for c in a["cases"]}
  for dt in ("bfloat16", "float32"):
    assert {f"{dt}/gmm/{o}" for o in ("forward", "d_lhs", "d_rhs")} <= names
    assert {f"{dt}/swiglu/{o}" for o in ("forward", "d_lhs", "d_rhs_gate", "d_rhs_up")} <= names
  assert len(a["cases"]) == 14
  for c in a["cases"]:
    assert c["ok"] and _number(c["max_rel_err"]) and c["max_rel_err"] <= c["tol"], c
    assert c.get("tail_rows_zero", True) and c.get("empty_groups_zero", True), c
  assert sum("tail_rows_zero" in c for c in a["cases"]) == 8
  assert sum("empty_groups_zero" in c for c in a["cases"]) == 6
  assert a["self_test"]["passed"] and a["impl"] == "pallas_interpret"

  # (b) the kernel table: ours (plain and fused) and the einsum ceiling, every row timed.
  rows = res["sections"]["b"]["b"]["rows"]
  timed = {(r["impl"], r["what"]) for r in rows if r["status"] == "ok"}
  for impl in ("pallas_interpret", "pallas_fused"):
    assert sum(1 for i, _ in timed if i == impl) == 4, rows
  assert ("pallas_interpret", "layer fwd+bwd") in timed and ("pallas_fused", "layer fwd+bwd") in timed
  assert ("einsum", "balanced fwd+bwd (ceiling)") in timed
  for r in rows:
    assert r["status"] in ("ok", "skipped"), r
    if r["status"] == "ok":
      assert _number(r["ms"]) and r["ms"] > 0 and _number(r["tflops"]), r

  # (c) the slice's train step with both optimizers: times, throughput, finite losses, plan and XLA memory.
  c = res["sections"]["c"]
  for unit in ("c:muon", "c:adamw"):
    r = c[unit]
    assert "error" not in r, r
    assert r["optimizer"] == unit.split(":")[1] and r["num_layers"] == 4 and r["mtp_layers"] == 1
    assert r["attention_impl"] == "auto" and r["moe_impl"] == "pallas_interpret"
    assert r["attention_resolved"] == "blockwise" and r["cudnn_probe_error"] is None  # auto off the GPU
    assert r["muon_ns_dtype"] == "bfloat16"
    for key in ("compile_s", "step_ms", "tokens_per_s", "first_step_ms", "plan_gib", "xla_gib", "flops_per_token",
                "achieved_tflops", "loss_first", "loss_last"):
      assert _number(r[key]) and r[key] > 0, (unit, key, r[key])
    assert len(r["step_times_ms"]) == 2 and r["finite"]
    assert r["mfu"] is None and r["peak_gib"] is None  # no peak FLOP/s or memory statistics on the CPU

  # (d) every part, forward + backward (and the forward alone for the blocks remat recomputes).
  d = res["sections"]["d"]["d"]
  parts = {r["part"]: r for r in d["parts"]}
  assert set(parts) == set(PARTS), sorted(parts)
  for name, r in parts.items():
    assert "error" not in r and _number(r["fwd_bwd_ms"]) and r["fwd_bwd_ms"] > 0, r
  for name in ("attention (MLA block)", "  attention, xla", "MoE layer", "dense MLP"):
    assert _number(parts[name]["fwd_ms"]) and parts[name]["fwd_ms"] > 0
  # side by side: the slice's attention (auto -> blockwise on the CPU) and the other implementation
  assert parts["attention (MLA block)"]["impl"] == "blockwise" and parts["  attention, xla"]["impl"] == "xla"
  assert parts["optimizer (muon)"]["muon_ns_dtype"] == "bfloat16"
  assert parts["optimizer (muon, float32 NS)"]["muon_ns_dtype"] == "float32"
  assert _number(d["estimated_step_ms"]) and d["estimated_step_ms"] > 0

  # (e) decoding: the slice's sampler with and without MTP drafts, one compile each, every row timed.
  e = res["sections"]["e"]["e"]
  assert [(r["batch"], r["draft_tokens"]) for r in e["rows"]] == [(2, 0), (2, 2)]
  for r in e["rows"]:
    assert r["compiles"] == 1 and r["tokens"] == 2 * 8, r
    for key in ("tokens_per_s", "ms", "step_ms", "acceptance_length", "speedup"):
      assert _number(r[key]) and r[key] > 0, (key, r)
  assert e["rows"][0]["acceptance_length"] == 1.0 and e["rows"][1]["acceptance_length"] >= 1.0

  # The table, printed.
  for line in ("== gpu_suite: cpu (cpu)", "(a) kernel correctness", "(b) kernel table", "(c) train step",
               "(d) per-part breakdown", "(e) decoding", "bfloat16/swiglu/d_rhs_up", "layer fwd+bwd", "sum of parts",
               "errors: 0"):
    assert line in proc.stdout, line


def test_a_failing_section_is_recorded_not_fatal(tmp_path):
  """A section whose config is wrong fails inside its own process: its error string is in the JSON, the table is
  still printed and written, and the suite exits 1."""
  out = tmp_path / "suite.json"
  proc = subprocess.run([sys.executable, SUITE, "--tiny", "--only", "c", "--set", "model.first_k_dense=9",
                         "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  res = json.loads(out.read_text())
  assert set(res["sections"]) == {"c"}
  assert len(res["errors"]) == 2 and all("first_k_dense" in e for e in res["errors"]), res["errors"]
  for unit in ("c:muon", "c:adamw"):
    assert "first_k_dense" in res["sections"]["c"][unit]["error"]
  assert "(c) train step" in proc.stdout and "errors: 2" in proc.stdout


def test_a_crashed_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
  """A section's process that dies without a result (a segfault, a poisoned CUDA context) becomes an error
  string with its exit status and last stderr lines; the sections after it still run."""
  suite = _load_suite()
  ran = []

  def fake_child(args, unit, out_path):
    ran.append(unit)
    if unit == "a":
      return [sys.executable, "-c", "import sys; sys.stderr.write('Fatal Python error: Segmentation fault\\n');"
              " sys.exit(139)"]
    code = (f"import json; json.dump({{'device': {{'device_kind': 'cpu', 'platform': 'cpu', 'jax': '0'}}, "
            f"'errors': [], 'result': {{'{unit}': {{'rows': [], 'seconds': 0.1}}}}}}, open({out_path!r}, 'w'))")
    return [sys.executable, "-c", code]

  monkeypatch.setattr(suite, "_child_argv", fake_child)
  res = suite.main(["--only", "a,b", "--out", str(tmp_path / "s.json")])
  assert ran == ["a", "b"]
  assert res["errors"] == ["a: exit status 139: Fatal Python error: Segmentation fault"], res["errors"]
  assert res["sections"]["b"]["b"]["rows"] == []
  assert "errors: 1" in capsys.readouterr().out
  assert json.loads((tmp_path / "s.json").read_text())["errors"] == res["errors"]
