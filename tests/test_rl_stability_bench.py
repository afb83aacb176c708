"""benchmarks/rl_stability.py end to end at a smoke size (so the comparison script never rots): the shared
warm start, FiberPO and GRPO from it, the table, the JSON and the PNG."""

import importlib.util
import json
import os

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_rl_stability_writes_table_json_and_png(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("rl_stability_smoke",
                                                os.path.join(REPO_ROOT, "benchmarks", "rl_stability.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out, png = tmp_path / "r.json", tmp_path / "r.png"
  bench.main(["--steps", "2", "--sft-steps", "10", "--lr", "1e-3", "--losses", "fiberpo,grpo",
              "--workdir", str(tmp_path / "w"), "--out", str(out), "--png", str(png)])
  result = json.loads(out.read_text())
  assert set(result["curves"]) == {"fiberpo@0.001", "grpo@0.001"}
  for rows in result["curves"].values():
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 and r["entropy"] > 0 for r in rows)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  text = capsys.readouterr().out
  assert "fiberpo@0.001" in text and "max mean_ratio" in text
