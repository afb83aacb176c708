"""Multi-process start-up: ``jax.distributed.initialize`` from the config or the environment.

``initialize(cfg)`` must run before anything touches a JAX device. It decides, in this order:

1. **Config** – ``mesh.coordinator`` / ``mesh.num_processes`` / ``mesh.process_id`` set (``launch/local.sh``
   does this): ``jax.distributed.initialize(coordinator, num_processes, process_id)``; a missing
   ``process_id`` / ``num_processes`` is taken from SLURM (``SLURM_PROCID`` / ``SLURM_NTASKS``) when present.
   ``num_processes == 1`` is a single process: nothing to do.
2. **SLURM** – ``SLURM_NTASKS > 1``: coordinator ``$JOYJAX_COORDINATOR`` (host:port) or the first host of
   ``SLURM_JOB_NODELIST`` at port ``$JOYJAX_COORDINATOR_PORT`` (default 12321), process id ``SLURM_PROCID``.
3. **TPU VM pod / multislice** – ``TPU_WORKER_HOSTNAMES`` lists more than one host, or
   ``MEGASCALE_NUM_SLICES > 1``: ``jax.distributed.initialize()`` with no arguments (JAX reads the TPU metadata).
4. Otherwise a single process: a no-op.

Calling it again is a no-op (idempotent). ``process_info()`` describes this process for logs.
"""

from __future__ import annotations

import logging
import os
import re
import socket

import jax
from jax.experimental import multihost_utils

from joyjax.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 12321
_STATE: dict = {"initialized": False, "mode": "single", "coordinator": ""}


def expand_first_host(nodelist: str) -> str:
  """First host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003'; 'a1,a2' -> 'a1'."""
  nodelist = nodelist.strip()
  m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
  if not m:
    raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
  prefix, ranges = m.group(1), m.group(3)
  if not ranges:
    return prefix
  first = ranges.split(",")[0].split("-")[0]
  return prefix + first


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, "").strip()
  if not v:
    return None
  try:
    return int(v)
  except ValueError as e:
    raise ConfigError(f"environment variable {name}={v!r} is not an integer") from e


def _slurm_coordinator() -> str:
  if os.environ.get("JOYJAX_COORDINATOR"):
    return os.environ["JOYJAX_COORDINATOR"]
  nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
  if not nodelist:
    raise ConfigError("SLURM job with several tasks but no SLURM_JOB_NODELIST: set JOYJAX_COORDINATOR=host:port "
                      "or --config.mesh.coordinator=host:port")
  port = _env_int("JOYJAX_COORDINATOR_PORT") or DEFAULT_PORT
  return f"{expand_first_host(nodelist)}:{port}"


def _tpu_pod() -> bool:
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 or (_env_int("MEGASCALE_NUM_SLICES") or 1) > 1


def resolve(cfg) -> dict | None:
  """The arguments ``initialize`` would pass: None (single process), {} (auto-detect) or
  {coordinator_address, num_processes, process_id}. Pure: reads the config and the environment only."""
  p = cfg.mesh
  coordinator, num, pid = p.coordinator.strip(), int(p.num_processes), int(p.process_id)
  slurm_ntasks = _env_int("SLURM_NTASKS")
  if coordinator or num > 0:
    if num <= 0:
      num = slurm_ntasks or 0
    if num <= 0:
      raise ConfigError("config key 'mesh.num_processes': must be set (> 0) together with mesh.coordinator="
                        f"{coordinator!r}")
    if num == 1:
      return None
    if pid < 0:
      pid = _env_int("SLURM_PROCID") if _env_int("SLURM_PROCID") is not None else -1
    if pid < 0:
      raise ConfigError(f"config key 'mesh.process_id': must be set in [0, {num}) for a {num}-process run "
                        "(launch/local.sh passes it to every process)")
    if not 0 <= pid < num:
      raise ConfigError(f"config key 'mesh.process_id': must be in [0, mesh.num_processes={num}), got {pid}")
    if not coordinator:
      coordinator = _slurm_coordinator() if slurm_ntasks else ""
    if not coordinator:
      raise ConfigError("config key 'mesh.coordinator': a multi-process run needs host:port of process 0 "
                        "(e.g. --config.mesh.coordinator=localhost:12321)")
    if ":" not in coordinator:
      raise ConfigError(f"config key 'mesh.coordinator': must be host:port, got {coordinator!r}")
    return {"coordinator_address": coordinator, "num_processes": num, "process_id": pid}
  if slurm_ntasks and slurm_ntasks > 1:
    pid = _env_int("SLURM_PROCID")
    if pid is None:
      raise ConfigError("SLURM_NTASKS > 1 but SLURM_PROCID is not set: start the tasks with srun")
    return {"coordinator_address": _slurm_coordinator(), "num_processes": slurm_ntasks, "process_id": pid}
  if _tpu_pod():
    return {}
  return None


def _already_initialized() -> bool:
  if _STATE["initialized"]:
    return True
  is_init = getattr(jax.distributed, "is_initialized", None)
  try:
    return bool(is_init()) if is_init is not None else False
  except Exception:  # pragma: no cover - private state differs across versions
    return False


def initialize(cfg) -> None:
  """Starts the JAX distributed runtime when this is one of several processes (see the module doc)."""
  if _already_initialized():
    return
  kwargs = resolve(cfg)
  if kwargs is None:
    return
  mode = "auto (TPU pod)" if not kwargs else f"{kwargs['process_id']}/{kwargs['num_processes']}"
  log.info("jax.distributed.initialize %s %s", mode, kwargs.get("coordinator_address", ""))
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    msg = str(e)
    if "only be called once" in msg or "already" in msg.lower():
      _STATE["initialized"] = True
      return
    hint = ("joyjax.parallel.initialize(cfg) must run before any JAX computation or jax.devices() call"
            if "before" in msg else
            f"check that process 0 is reachable at {kwargs.get('coordinator_address', '(auto)')} and that all "
            f"{kwargs.get('num_processes', '')} processes were started")
    raise RuntimeError(f"jax.distributed.initialize({kwargs}) failed: {msg}\n  hint: {hint}") from e
  _STATE.update(initialized=True, mode="multi", coordinator=kwargs.get("coordinator_address", "auto"))


def process_info() -> dict:
  """This process and the job: indices, device counts, platform, host (for logs and checks)."""
  devices = jax.devices()
  return {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "device_count": len(devices),
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "hostname": socket.gethostname(),
      "distributed": _STATE["initialized"],
      "coordinator": _STATE["coordinator"],
  }


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches ``barrier(name)``; a no-op with one process.

  Uses the coordination service (not a device collective): on CPU the first collective of a program opens a
  gloo context that times out after 30 s, so processes that finish compiling a minute apart (2 cores, one
  process hitting the compilation cache) must meet here before running it. Every process calls it with the
  same ``name``, once."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the coordination client; no public handle in jax 0.10
  client = jax_distributed.global_state.client
  if client is None:  # a runtime that does not go through jax.distributed (none in practice): a device sync
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"joyjax:{name}", int(timeout_s * 1000))
