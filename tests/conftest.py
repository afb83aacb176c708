"""Test set-up shared by every test file: CPU with 8 simulated devices, the XLA compile cache, and the helpers
tests import (``from conftest import REPO_ROOT, tiny_config, free_port, DATA_CACHE``) or take as fixtures
(``repo_root``, ``free_port``, ``data_cache``).

Tests marked ``slow`` (subprocesses, multiple processes, the large Pallas interpret-mode sweeps, end-to-end
training runs) each have a faster test covering the same behaviour: ``python -m pytest`` runs everything (what
CI runs), ``python -m pytest -m "not slow"`` is the fast loop.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

# Tests run on the CPU; 8 host devices let sharding tests build real meshes in-process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The suite compiles far more than it runs: XLA's CPU backend at optimisation level 0 compiles the train step
# in half the time (~12 s instead of ~23 s) for steps ~1.6x slower. Every comparison (resume bitwise, mesh vs
# one device, kernels vs reference) runs both sides under the same flags. Subprocesses inherit them.
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
# The repository root: configs/, launch/, benchmarks/ (tests must not depend on the working directory).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The train-step compile of even the tiny model takes tens of seconds on 2 CPU cores; tests that compile the
# same program again (a resumed run, a subprocess) load it from this cache instead.
import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from joyjax.convert.safetensors_io import SafetensorsReader, ShardedWriter  # noqa: E402

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), f"joyjax-test-jax-cache-{os.getuid()}"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The embedded corpus and the tokenizer trained on it, built once and shared by every test that trains
# through the real data pipeline (import it: ``from conftest import DATA_CACHE``).
DATA_CACHE = os.path.join(tempfile.gettempdir(), f"joyjax-test-data-{os.getuid()}")


def repo_config_path(name: str) -> str:
  """The absolute path of ``configs/<name>.py`` (``name`` may also be given as ``configs/<name>.py``)."""
  if not name.endswith(".py"):
    name = os.path.join("configs", name + ".py")
  return os.path.join(REPO_ROOT, name)


TINY = repo_config_path("tiny")


def as_overrides(*overrides) -> list[str]:
  """``--config.a.b=v`` strings from any mix of such strings (or iterables of them) and mappings of dotted
  keys to values: ``as_overrides("--config.train.steps=4", {"model.dtype": "bfloat16"})``."""
  out = []
  for o in overrides:
    if isinstance(o, str):
      out.append(o if o.startswith("--config.") else f"--config.{o}")
    elif isinstance(o, dict):
      out += [f"--config.{k}={v}" for k, v in o.items()]
    else:
      out += as_overrides(*o)
  return out


def load_repo_config(name: str, *overrides):
  """``load_config`` of ``configs/<name>.py`` with ``overrides`` (see ``as_overrides``)."""
  from joyjax.config import load_config
  return load_config(repo_config_path(name), as_overrides(*overrides))


def rewrite_checkpoint(src, dst, edit):
  """Copies a single-file safetensors checkpoint ``src`` to ``dst``, passing its tensors through
  ``edit(dict) -> dict`` (tests of what the importer does with a damaged or altered checkpoint)."""
  shutil.copytree(src, dst)
  reader = SafetensorsReader(str(src))
  tensors = edit({k: np.array(reader.get(k)) for k in reader.keys()})
  os.remove(os.path.join(dst, "model.safetensors"))
  w = ShardedWriter(str(dst))
  for k, v in tensors.items():
    w.add(k, v)
  w.close()


def tiny_config(*overrides):
  """configs/tiny.py with overrides: ``tiny_config("--config.mesh.fsdp=8")``, ``tiny_config({"model.dtype":
  "bfloat16"})``, or a list of ``--config.`` strings."""
  return load_repo_config("tiny", *overrides)


def fsdp_expert_mesh():
  """The 8 test devices as an fsdp 2 x expert 4 mesh."""
  return jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "expert"))


def dot_operand_dtypes(jaxpr) -> list[tuple]:
  """The operand dtypes (as strings) of every dot_general in ``jaxpr`` and the jaxprs nested in it (scan and
  cond bodies, custom-VJP rules, ...), in order."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        if hasattr(sub, "eqns"):
          out += dot_operand_dtypes(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += dot_operand_dtypes(sub.jaxpr)
  return out


def free_port() -> int:
  """A TCP port free on localhost right now (for a coordinator or a launcher's ``--port``)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def repo_root() -> str:
  return REPO_ROOT


@pytest.fixture(name="free_port")
def _free_port_fixture() -> int:
  return free_port()


@pytest.fixture(scope="session")
def data_cache() -> str:
  return DATA_CACHE


def signal_after(cmd, *, env, cwd, marker: str, timeout: int = 600) -> tuple[int, str]:
  """Runs ``cmd``, sends it SIGTERM when a line of its output starts with ``marker``, and waits for it:
  (exit status, everything it printed)."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith(marker):
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return rc, "".join(lines)
