"""Multi-process training on localhost: 2 processes x 4 CPU devices (``launch/local.sh``) train the tiny model on
an fsdp=8 mesh spanning both processes, stop after step 2, and resume on a different mesh (data=2 x expert=4:
the routed experts' all-to-all crosses the processes) to step 4. The per-step losses equal those of one process
with 8 devices fed the same global batches.

What "the same global batches" means: each process reads its own documents (``make_iterator(process_index=i,
process_count=2)``) and contributes its rows of the global batch (process 0 the first half: the mesh orders
devices by process). The single-process reference is the real ``train`` with its iterator replaced by the
concatenation of the two processes' iterators; its losses matching proves that every process fed exactly its
slice. (One process reading all documents gives a different data order, checked below, so the reference is not
trivially the same; and a checkpoint's data state is only valid for the process count that wrote it.)
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import DATA_CACHE, REPO_ROOT, TINY, free_port, tiny_config

LOCAL_SH = os.path.join(REPO_ROOT, "launch/local.sh")
STEPS = 4
FSDP8 = ("--config.mesh.fsdp=8",)
DATA2_EXPERT4 = ("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4")
REF_MESH = ("--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2")
# AdamW (its step compiles faster than Muon's) at a moderate rate. Another mesh sums in another order, so the
# runs agree to ~1e-7 relative, not bitwise; a large rate (0.02) collapses the routing within 4 steps and a
# near-tie expert choice then flips between the runs, which moves the loss by ~1e-5.
OPTIM = ("--config.optim.name=adamw", "--config.optim.lr=3e-3", "--config.optim.warmup_steps=2")
LAUNCH_TIMEOUT = 360  # seconds per 2-process launch (cold XLA compiles of 1-2 min per process on 2 cores)
_ENV_DROP = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "JOYJAX_COORDINATOR",
             "JOYJAX_COORDINATOR_PORT", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES", "JOYJAX_CMD")


def overrides(out_dir, mesh):
  return [f"--config.train.output_dir={out_dir}", f"--config.train.steps={STEPS}", "--config.data.seq_len=32",
          "--config.train.batch_size=8", "--config.checkpoint.every=2", "--config.train.log_every=1",
          "--config.train.sample_prompt=", f"--config.data.cache_dir={DATA_CACHE}",
          "--config.data.tokenizer_vocab_size=1024", *OPTIM, *mesh]


# Stands in for `joyjax train` in the first launch: the same config handling, but stops after a given step
# (as if interrupted there: it saves that step and returns) and prints what the process saw.
_DRIVER = textwrap.dedent("""
    import json, sys
    stop, argv = int(sys.argv[1]), sys.argv[2:]
    assert argv[0] == "train", argv
    path = argv[argv.index("--config") + 1]
    from joyjax.config import load_config
    from joyjax.train.loop import train
    import jax
    r = train(load_config(path, [a for a in argv[1:] if a.startswith("--config.")]), stop_after=stop or None)
    print("RESULT " + json.dumps(dict(step=r.step, interrupted=r.interrupted, losses=r.losses,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      local_devices=jax.local_device_count(), devices=jax.device_count())))
""")


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def launch(log_dir, cmd, args):
  """Runs ``launch/local.sh -n 2 -d 4`` with program ``cmd`` and ``args``; returns the two processes' logs.
  The launcher and everything it started share a new process group, killed whatever happens."""
  env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
  # JAX_DEFAULT_MATMUL_PRECISION as tests/conftest.py sets it
  env.update(JOYJAX_CMD=cmd, PYTHONPATH=REPO_ROOT, JAX_DEFAULT_MATMUL_PRECISION="highest")
  argv = ["bash", LOCAL_SH, "-n", "2", "-d", "4", "--port", str(free_port()), "--log-dir", str(log_dir), "--",
          "--config", TINY, *args]
  proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
  except subprocess.TimeoutExpired:
    _kill_group(proc)
    out, _ = proc.communicate()
    out = f"timed out after {LAUNCH_TIMEOUT}s\n" + out
  finally:
    _kill_group(proc)  # also any process the launcher left behind
  logs = []
  for i in range(2):
    p = os.path.join(log_dir, f"process_{i}.log")
    logs.append(open(p).read() if os.path.exists(p) else "")
  detail = f"launcher: {out[-2000:]}\n" + "\n".join(f"--- process {i}:\n{l[-4000:]}" for i, l in enumerate(logs))
  assert proc.returncode == 0, detail
  return logs, detail


def _result(log):
  return json.loads([l for l in log.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def _metrics(out_dir):
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class _TwoProcessData:
  """One process's iterator that yields what 2 processes would feed together: process 0's batch, then process
  1's (rows of the global batch in mesh order)."""

  def __init__(self, parts):
    self.parts = parts

  def __iter__(self):
    return self

  def __next__(self):
    got = [next(p) for p in self.parts]
    return {k: np.concatenate([g[k] for g in got]) for k in got[0]}

  def get_state(self):
    return {"parts": [p.get_state() for p in self.parts]}

  def set_state(self, state):
    for p, s in zip(self.parts, state["parts"]):
      p.set_state(s)


@pytest.fixture
def reference(tmp_path_factory, monkeypatch):
  """A single process with 8 devices (mesh fsdp=2 x expert=2 x tensor=2), fed the 2-process global batches."""
  from joyjax.data import pipeline
  from joyjax.train.loop import train
  real = pipeline.make_iterator

  def two_process(config, tokenizer, *, process_index=0, process_count=1, batch_size=None):
    assert (process_index, process_count, batch_size) == (0, 1, None)
    return _TwoProcessData([real(config, tokenizer, process_index=i, process_count=2) for i in range(2)])

  out = tmp_path_factory.mktemp("reference")
  cfg = tiny_config(overrides(out, REF_MESH))
  # One process reading every document itself feeds other batches, so matching the reference below is telling.
  tokenizer = pipeline.build_tokenizer(cfg)
  alone = next(real(cfg, tokenizer))["inputs"]
  both = next(two_process(cfg, tokenizer))["inputs"]
  assert alone.shape == both.shape == (8, 32) and (alone != both).mean() > 0.5
  with monkeypatch.context() as m:
    m.setattr(pipeline, "make_iterator", two_process)
    r = train(cfg, stream=open(os.devnull, "w"))
  assert sorted(r.losses) == list(range(1, STEPS + 1)) and not r.interrupted
  return r, {row["step"]: row for row in _metrics(out)}


# Two launches of two processes, each compiling the train step (minutes on 2 cores); test_mesh_equivalence.py
# checks the same meshes in one process, test_train.py the resume.
@pytest.mark.slow
def test_two_processes_stop_resume_on_another_mesh_match_one_process(tmp_path, reference):
  ref, ref_rows = reference
  out = tmp_path / "run"
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)

  # 1. fsdp=8 over both processes, stopped after step 2 (saved there).
  logs, detail = launch(tmp_path / "logs1", f"{sys.executable} {driver} 2", overrides(out, FSDP8))
  for i, log in enumerate(logs):
    r = _result(log)
    assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (i, 2, 4, 8), detail
    assert r["step"] == 2 and r["interrupted"] and sorted(map(int, r["losses"])) == [1, 2], detail
  assert "mesh: dcn_data=1 data=1 fsdp=8 expert=1 tensor=1 over 8 cpu device(s), 2 process(es)" in logs[0], detail
  assert sorted(os.listdir(out / "checkpoints")) == ["2"], detail

  # 2. The real `joyjax train` resumes from step 2 on data=2 x expert=4 and runs to the end.
  logs, detail = launch(tmp_path / "logs2", f"{sys.executable} -m joyjax.cli", overrides(out, DATA2_EXPERT4))
  assert "config:" in logs[0] and "config:" not in logs[1], detail   # joyjax train's own output, process 0 only
  assert "mesh: dcn_data=1 data=2 fsdp=1 expert=4 tensor=1 over 8 cpu device(s), 2 process(es)" in logs[0], detail
  assert "(step 2)" in logs[0] and "training steps 2..4" in logs[0], detail
  assert "4" in os.listdir(out / "checkpoints"), detail

  rows = _metrics(out)
  assert [row["step"] for row in rows] == [1, 2, 3, 4], rows    # only process 0 writes metrics
  got = {row["step"]: row for row in rows}
  print("relative loss differences to one process:",
        {s: abs(got[s]["loss"] - ref.losses[s]) / ref.losses[s] for s in got})
  for s in range(1, STEPS + 1):
    assert got[s]["loss_tokens"] == ref_rows[s]["loss_tokens"]
    np.testing.assert_allclose(got[s]["loss"], ref.losses[s], rtol=1e-5, err_msg=f"loss of step {s}: {got[s]} "
                               f"vs the reference's {ref_rows[s]}")
  # The gradient of step 1 (the same params everywhere); later steps differ by AdamW's rounding amplification.
  np.testing.assert_allclose(got[1]["grad_norm"], ref_rows[1]["grad_norm"], rtol=1e-5)
