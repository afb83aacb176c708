"""The device mesh from ``cfg.mesh``: five named axes, always all present (size 1 allowed).

``MESH_AXES`` is the axis order, outermost (slowest network) first:

* ``dcn_data`` data parallelism across slices / nodes (the only axis that crosses the data-center network);
* ``data``     pure data parallelism (params replicated);
* ``fsdp``     data parallelism with params / optimizer state sharded (ZeRO-3);
* ``expert``   expert parallelism inside MoE layers; acts as more fsdp/data outside them;
* ``tensor``   tensor (model) parallelism of heads / MLP width / vocab (innermost: most traffic).

Public API
----------
``mesh_shape(cfg, num_devices) -> dict[str, int]``  sizes by axis name, ``-1`` resolved.
``make_mesh(cfg, devices=None) -> jax.sharding.Mesh``  a mesh of all devices (or ``devices``).
``abstract_mesh(cfg, num_devices) -> jax.sharding.AbstractMesh``  the same shape without devices (planning).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from joyjax.axes import MESH_AXES
from joyjax.errors import ConfigError

log = logging.getLogger(__name__)



def _sizes(cfg) -> dict[str, int]:
  p = cfg.mesh if hasattr(cfg, "mesh") else cfg
  return {a: int(p[a]) for a in MESH_AXES}


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
  """Axis sizes ``{name: size}`` in ``MESH_AXES`` order for ``num_devices`` devices.

  ``cfg`` is the whole config (or its ``mesh`` group). One axis may be ``-1``: it takes the devices the others
  leave. Raises ``ConfigError`` (a ``ValueError``) naming the ``mesh.*`` keys when the sizes do not multiply
  to ``num_devices``, with the fix.
  """
  sizes = _sizes(cfg)
  num_devices = int(num_devices)
  if num_devices <= 0:
    raise ConfigError(f"mesh: need at least one device, got num_devices={num_devices}")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"config key 'mesh.{bad[0]}': axis sizes must be positive or -1, got {sizes[bad[0]]}")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config keys {', '.join('mesh.' + a for a in free)}: at most one mesh axis may be -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  desc = " * ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != 1 or a == (free[0] if free else None))
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config key 'mesh.{free[0]}' = -1 takes the devices left over, but the other mesh axes ({desc or '1'}, "
          f"product {fixed}) do not divide the {num_devices} devices; choose sizes whose product divides "
          f"{num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config keys mesh.*: {desc or 'all axes 1'} multiply to {fixed} but there are {num_devices} devices; "
        f"make the product {num_devices} (e.g. set --config.mesh.fsdp=-1 to give fsdp the rest)")
  return sizes


def _axis_types():
  return (AxisType.Auto,) * len(MESH_AXES)


def abstract_mesh(cfg, num_devices: int) -> jax.sharding.AbstractMesh:
  """A device-less mesh of the configured shape (for planning and ``jax.eval_shape`` work)."""
  shape = mesh_shape(cfg, num_devices)
  return jax.sharding.AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=_axis_types())


def _granule_attr(devices) -> str | None:
  """'slice_index' on multi-slice TPU, else 'process_index' when devices span several processes."""
  if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
    return "slice_index"
  if len({d.process_index for d in devices}) > 1:
    return "process_index"
  return None


def _device_array(shape: dict[str, int], devices: Sequence[Any]) -> np.ndarray:
  dims = tuple(shape[a] for a in MESH_AXES)
  platform = devices[0].platform
  ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
  if platform == "cpu":
    # CPU devices have no topology: a plain reshape keeps devices of one process together (outer axes first).
    return np.asarray(ordered, dtype=object).reshape(dims)
  ici = (1,) + dims[1:]
  granule = _granule_attr(devices)
  if shape["dcn_data"] > 1:
    if granule is None:
      log.warning("mesh.dcn_data=%d but all devices are in one slice / process; building a single-network mesh",
                  shape["dcn_data"])
    else:
      n_granules = len({getattr(d, granule) for d in devices})
      if n_granules == shape["dcn_data"]:
        return mesh_utils.create_hybrid_device_mesh(
            ici, (shape["dcn_data"], 1, 1, 1, 1), devices, process_is_granule=granule == "process_index",
            allow_split_physical_axes=True)
      if n_granules % shape["dcn_data"]:
        raise ConfigError(f"config key 'mesh.dcn_data' = {shape['dcn_data']} must divide the number of "
                          f"{'slices' if granule == 'slice_index' else 'processes'} ({n_granules})")
      log.info("mesh.dcn_data=%d groups %d %s; devices ordered by %s", shape["dcn_data"], n_granules,
               "slices" if granule == "slice_index" else "processes", granule)
      return np.asarray(ordered, dtype=object).reshape(dims)
  elif granule == "slice_index":
    log.warning("devices span several TPU slices but mesh.dcn_data=1: the mesh crosses the data-center network "
                "inside ICI axes; set --config.mesh.dcn_data=<number of slices>")
  try:
    return mesh_utils.create_device_mesh(dims, ordered)
  except (ValueError, NotImplementedError, AssertionError) as e:
    try:
      return mesh_utils.create_device_mesh(dims, ordered, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      log.warning("create_device_mesh(%s) failed on %s (%s); falling back to a plain reshape (topology ignored)",
                  dims, platform, e)
      return np.asarray(ordered, dtype=object).reshape(dims)


def make_mesh(cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``jax.sharding.Mesh`` with axes ``MESH_AXES`` over ``devices`` (default: all devices of all processes).

  Topology-aware on TPU / GPU (``mesh_utils.create_device_mesh``; ``create_hybrid_device_mesh`` with the
  slices, or the processes, as granules when ``mesh.dcn_data > 1``); a plain reshape on CPU. Axis types are
  ``Auto`` (sharding propagated by the compiler; jit in/out shardings and sharding constraints steer it).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  arr = _device_array(shape, devices)
  return Mesh(arr, MESH_AXES, axis_types=_axis_types())


def describe(mesh) -> str:
  """'dcn_data=1 data=2 fsdp=4 expert=1 tensor=1' (for logs)."""
  return " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
