import os
import sys

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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The train-step compile of even the tiny model takes tens of seconds on 2 CPU cores; tests that compile the
# same program again (a resumed run, a subprocess) load it from this cache instead.
import tempfile  # noqa: E402

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), f"joyjax-test-jax-cache-{os.getuid()}"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The embedded corpus and the tokenizer trained on it, built once and shared by every test that trains
# through the real data pipeline (import it: ``from conftest import DATA_CACHE``).
DATA_CACHE = os.path.join(tempfile.gettempdir(), f"joyjax-test-data-{os.getuid()}")
