"""benchmarks/head_loss.py at tiny shapes on the CPU, so it never rots: both implementations run at every chunk
size (one that divides the tokens and one that does not), the JSON holds every row, and the hand-written
cross-entropy gives the autodiff version's loss and gradients (float32: to 1e-5 of each one's largest entry)."""

import importlib.util
import json
import os

from conftest import REPO_ROOT


def test_tiny_head_loss_bench(tmp_path):
  spec = importlib.util.spec_from_file_location("head_loss_bench", os.path.join(REPO_ROOT, "benchmarks",
                                                                                "head_loss.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = tmp_path / "h.json"
  res = mod.main(["--tokens", "40", "--hidden", "16", "--vocab", "96", "--chunks", "8,12", "--dtype", "float32",
                  "--iters", "1", "--warmup", "1", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(res))
  rows = res["rows"]
  assert [(r["impl"], r["chunk"]) for r in rows] == [("autodiff", 8), ("hand-written", 8), ("autodiff", 12),
                                                     ("hand-written", 12)]
  for r in rows:
    assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["tflops"] > 0, r
    assert r["max_rel_diff"] <= 1e-5, r
  assert res["train_flops"] == 6 * 40 * 16 * 96
