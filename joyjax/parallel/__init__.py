"""Parallelism: the mesh from config, logical-axis rules, shardings of params / state / batches, multi-host start.

``initialize(cfg)`` (before touching devices) -> ``make_mesh(cfg)`` -> ``param_shardings`` / ``state_shardings``
/ ``batch_sharding`` -> ``jax.jit(..., out_shardings=...)``. ``joyjax.parallel.plan`` prints per-device memory.
"""

from joyjax.axes import DEFAULT_RULES, MESH_AXES, data_parallel_size, get_rules, parse_rules
from joyjax.parallel.distributed import initialize, process_info
from joyjax.parallel.mesh import abstract_mesh, describe, make_mesh, mesh_shape
from joyjax.parallel.rules import (batch_sharding, batch_spec, logical_sharding, logical_to_spec, param_shardings,
                                   param_specs, shard_shape, state_shardings, state_specs)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "abstract_mesh", "batch_sharding", "batch_spec", "data_parallel_size",
           "describe", "get_rules", "initialize", "logical_sharding", "logical_to_spec", "make_mesh", "mesh_shape",
           "param_shardings", "param_specs", "parse_rules", "process_info", "shard_shape", "state_shardings",
           "state_specs"]
