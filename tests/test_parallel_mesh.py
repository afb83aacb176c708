"""Mesh from config, logical-axis rules, param / optimizer-state / batch shardings, multi-process start-up.

Runs on 8 CPU host devices (tests/conftest.py); the multi-process test starts 2 processes on localhost.
"""

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT, free_port, tiny_config
from joyjax import model, optim
from joyjax.config import ConfigError
from joyjax.parallel import distributed, mesh as mesh_lib, rules as rules_lib
from joyjax.parallel import (MESH_AXES, batch_sharding, data_parallel_size, logical_to_spec, make_mesh, mesh_shape,
                             param_shardings, state_shardings)


# ------------------------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize("overrides, expected", [
    (["--config.mesh.data=8", "--config.mesh.fsdp=1"], dict(dcn_data=1, data=8, fsdp=1, expert=1, tensor=1)),
    (["--config.mesh.fsdp=8"], dict(dcn_data=1, data=1, fsdp=8, expert=1, tensor=1)),
    ([], dict(dcn_data=1, data=1, fsdp=8, expert=1, tensor=1)),          # fsdp=-1 takes all
    (["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4"],
     dict(dcn_data=1, data=2, fsdp=1, expert=4, tensor=1)),
    (["--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"],
     dict(dcn_data=1, data=1, fsdp=2, expert=2, tensor=2)),
    (["--config.mesh.dcn_data=2", "--config.mesh.tensor=2"], dict(dcn_data=2, data=1, fsdp=2, expert=1, tensor=2)),
])
def test_mesh_shapes_on_8_devices(overrides, expected):
  cfg = tiny_config(*overrides)
  assert mesh_shape(cfg, 8) == expected
  mesh = make_mesh(cfg)
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_minus_one_resolution():
  assert mesh_shape(tiny_config("--config.mesh.data=2"), 8)["fsdp"] == 4
  assert mesh_shape(tiny_config("--config.mesh.data=2"), 64)["fsdp"] == 32
  cfg = tiny_config("--config.mesh.fsdp=2", "--config.mesh.expert=-1")
  assert mesh_shape(cfg, 8) == dict(dcn_data=1, data=1, fsdp=2, expert=4, tensor=1)
  assert mesh_shape(cfg, 2)["expert"] == 1


def test_mismatched_sizes_name_the_keys():
  with pytest.raises(ConfigError, match=r"mesh\.data=4.*mesh\.fsdp=4.*16.*8 devices.*mesh\.fsdp=-1"):
    mesh_shape(tiny_config("--config.mesh.data=4", "--config.mesh.fsdp=4"), 8)
  with pytest.raises(ValueError, match=r"'mesh\.fsdp' = -1.*mesh\.data=3.*do not divide the 8 devices"):
    mesh_shape(tiny_config("--config.mesh.data=3"), 8)
  with pytest.raises(ConfigError, match=r"mesh"):
    make_mesh(tiny_config("--config.mesh.data=2", "--config.mesh.fsdp=2"))          # 4 != 8 devices
  with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
    tiny_config("--config.mesh.data=-1")                                              # fsdp is -1 too


def test_make_mesh_on_a_subset_and_abstract_mesh():
  cfg = tiny_config("--config.mesh.data=2", "--config.mesh.fsdp=-1")
  mesh = make_mesh(cfg, jax.devices()[:4])
  assert dict(mesh.shape)["fsdp"] == 2 and mesh.devices.size == 4
  am = mesh_lib.abstract_mesh(cfg, 256)
  assert dict(am.shape) == dict(dcn_data=1, data=2, fsdp=128, expert=1, tensor=1)


@dataclasses.dataclass(frozen=True)
class _FakeGpu:
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("overrides, groups", [
    (["--config.mesh.dcn_data=4", "--config.mesh.fsdp=8"], [[0], [1], [2], [3]]),     # hybrid: a node per row
    (["--config.mesh.dcn_data=2", "--config.mesh.fsdp=16"], [[0, 1], [2, 3]]),        # two nodes per row
    (["--config.mesh.fsdp=-1"], [[0, 1, 2, 3]]),
])
def test_multi_node_gpu_layout_keeps_dcn_data_across_nodes(overrides, groups):
  """4 nodes x 8 GPUs (device objects standing in for GPUs): dcn_data rows never share a node."""
  devices = [_FakeGpu(i, i // 8) for i in range(32)]
  random.Random(0).shuffle(devices)
  arr = mesh_lib._device_array(mesh_shape(tiny_config(*overrides), 32), devices)
  assert arr.shape[0] == len(groups)
  for row, procs in zip(arr, groups):
    assert sorted({d.process_index for d in row.flat}) == procs
  assert sorted(d.id for d in arr.flat) == list(range(32))


# ------------------------------------------------------------------------------------------------ rules


def test_logical_to_spec_priority_no_reuse_and_divisibility():
  sizes = dict(dcn_data=1, data=1, fsdp=4, expert=2, tensor=2)
  r = rules_lib.DEFAULT_RULES
  # routed experts: expert dim -> expert; embed (fsdp+expert) keeps only fsdp; mlp -> tensor
  assert logical_to_spec(("layers", "expert", "embed", "mlp"), r, sizes) == P(None, "expert", "fsdp", "tensor")
  # the router lists embed before expert, but the 'expert' rule has priority: same result in any dim order
  assert logical_to_spec(("layers", "embed", "expert"), r, sizes) == P(None, "fsdp", "expert")
  # a non-expert weight is sharded over fsdp and expert together
  assert logical_to_spec(("embed", "vocab"), r, sizes) == P(("fsdp", "expert"), "tensor")
  # divisibility: 12 is divisible by fsdp=4 but not by 4*2, so expert is skipped; 6 by neither 4 ... but by 2
  assert logical_to_spec(("embed",), r, sizes, shape=(12,)) == P("fsdp")
  assert logical_to_spec(("embed",), r, sizes, shape=(6,)) == P("expert")
  assert logical_to_spec(("vocab", "embed"), r, sizes, shape=(129281, 2048)) == P(None, ("fsdp", "expert"))
  # a skipped axis stays free for a later dim
  custom = rules_lib.parse_rules("a=fsdp,b=fsdp")
  assert logical_to_spec(("a", "b"), custom, sizes, shape=(3, 8)) == P(None, "fsdp")
  # size-1 axes and unknown names are left out
  assert logical_to_spec(("heads", "unknown_axis"), r, dict(sizes, tensor=1)) == P()
  # batch of a [batch, seq, embed] activation takes every data axis; embed then has nothing left
  assert logical_to_spec(("batch", "seq", "embed"), r, sizes) == P(("fsdp", "expert"))


def test_rules_config_key():
  cfg = tiny_config("--config.mesh.rules=embed=fsdp,foo=tensor")
  r = rules_lib.get_rules(cfg)
  assert dict(r)["embed"] == ("fsdp",) and dict(r)["foo"] == ("tensor",)
  assert [n for n, _ in r][:len(rules_lib.DEFAULT_RULES)] == [n for n, _ in rules_lib.DEFAULT_RULES]
  with pytest.raises(ConfigError, match=r"mesh\.rules.*unknown mesh axis 'fsdpp'"):
    tiny_config("--config.mesh.rules=embed=fsdpp")
  with pytest.raises(ConfigError, match=r"mesh\.rules.*name=axis\+axis"):
    tiny_config("--config.mesh.rules=embed")


def _check_valid(sharding, shape, mesh):
  assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh
  spec = tuple(sharding.spec)
  used = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
  assert len(used) == len(set(used)), spec
  assert len(spec) <= len(shape)
  for dim, e in zip(shape, spec):
    n = math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else (e or ())))
    assert dim % n == 0, (shape, spec)
  sharding.shard_shape(shape)   # raises when invalid


@pytest.mark.parametrize("overrides", [
    ["--config.mesh.fsdp=8"],
    ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4"],
    ["--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"],
])
def test_every_tiny_param_gets_a_valid_sharding(overrides):
  cfg = tiny_config(*overrides)
  mesh = make_mesh(cfg)
  abstract = model.abstract_params(cfg)
  shardings = param_shardings(cfg, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  jax.tree.map(lambda s, a: _check_valid(s, a.shape, mesh), shardings, abstract)
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  sizes = dict(mesh.shape)
  wo = specs["['moe_layers']['mlp']['wo']"]
  if sizes["expert"] > 1:
    assert wo[1] == "expert"
  if sizes["tensor"] > 1:
    assert wo[2] == "tensor" and specs["['lm_head']['kernel']"][1] == "tensor"
  # every parameter is sharded over fsdp*expert (the (L, 8) router bias only over expert); tensor splits the
  # head / MLP / vocab dims on top, so with tensor > 1 the total is between the two bounds
  total = sum(a.size for a in jax.tree.leaves(abstract))
  per_dev = sum(math.prod(s.shard_shape(a.shape)) for s, a in zip(jax.tree.leaves(shardings),
                                                                  jax.tree.leaves(abstract)))
  fsdp = sizes["fsdp"] * sizes["expert"]
  assert total / (fsdp * sizes["tensor"]) <= per_dev <= total / fsdp * 1.001


SHARDED = ("--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2")


@pytest.fixture(scope="module")
def sharded_init():
  """One sharded init shared by the tests below (compiling model.init is the slow part on CPU)."""
  cfg = tiny_config(*SHARDED)
  mesh = make_mesh(cfg)
  shardings = param_shardings(cfg, mesh)
  params = jax.jit(lambda k: model.init(cfg, k), out_shardings=shardings)(jax.random.key(0))
  return cfg, mesh, shardings, params


def test_jit_init_creates_params_already_sharded(sharded_init):
  cfg, mesh, shardings, params = sharded_init
  abstract = model.abstract_params(cfg)
  for got, want, s in zip(jax.tree.leaves(params), jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    assert got.sharding == s
    assert got.shape == want.shape and got.dtype == want.dtype
  wo = params["moe_layers"]["mlp"]["wo"]             # [L=2, E=8, F=32, D=64] over expert, tensor, fsdp
  assert wo.sharding.spec == P(None, "expert", "tensor", "fsdp")
  assert {s.data.shape for s in wo.addressable_shards} == {(2, 4, 16, 32)}
  assert len({s.device for s in wo.addressable_shards}) == 8
  emb = params["embed"]["embedding"]                 # [vocab=4096, embed=64]: tensor x (fsdp, expert)
  assert {s.data.shape for s in emb.addressable_shards} == {(2048, 16)}
  assert 0.015 < float(jnp.std(emb)) < 0.025         # init_std 0.02: real values, not zeros


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_shardings(sharded_init, name):
  cfg, mesh, pshard, params = sharded_init
  cfg = tiny_config(*SHARDED, f"--config.optim.name={name}")
  abstract = model.abstract_params(cfg)
  tx = optim.make_optimizer(cfg, abstract)
  abstract_state = jax.eval_shape(tx.init, abstract)
  shardings = state_shardings(cfg, mesh, abstract_state)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_state)
  by_path = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(pshard)[0]}
  n_mirrored = 0
  state_leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  for (path, s), (_, leaf) in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], state_leaves):
    key = jax.tree_util.keystr(path)
    _check_valid(s, leaf.shape, mesh)
    match = [v for k, v in by_path.items() if key.endswith(k)]
    if leaf.shape == ():
      assert s.spec == P()
    elif match:
      n_mirrored += 1
      assert s.spec == match[0], key
  assert n_mirrored >= len(by_path) - 3       # mu (and nu) of every trainable param; router_bias has none
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  for leaf, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding == s
  # a train-state-like container: params and opt_state side by side, plus a step counter
  both = state_shardings(cfg, mesh, {"params": abstract, "opt_state": abstract_state, "step": jnp.zeros(())})
  assert both["params"]["moe_layers"]["mlp"]["wo"].spec == P(None, "expert", "tensor", "fsdp")
  assert both["step"].spec == P()


def test_batch_sharding_and_data_parallel_size():
  cfg = tiny_config("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4")
  mesh = make_mesh(cfg)
  assert data_parallel_size(mesh) == 8
  s = batch_sharding(mesh)
  assert s.spec == P(("data", "expert"), None)
  x = jax.device_put(np.zeros((16, 32), np.int32), s)
  assert x.addressable_shards[0].data.shape == (2, 32)
  mesh2 = make_mesh(tiny_config("--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"))
  assert data_parallel_size(mesh2) == 4
  assert batch_sharding(mesh2).shard_shape((8, 16)) == (2, 16)


# ------------------------------------------------------------------------------------------------ distributed


_ENV = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "JOYJAX_COORDINATOR",
        "JOYJAX_COORDINATOR_PORT", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES")


@pytest.fixture
def clean_env(monkeypatch):
  for k in _ENV:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def test_expand_first_host():
  assert distributed.expand_first_host("gpu[003-005,9],cpu1") == "gpu003"
  assert distributed.expand_first_host("a1,a2") == "a1"
  assert distributed.expand_first_host("node7") == "node7"


def test_resolve_single_config_slurm_tpu(clean_env):
  assert distributed.resolve(tiny_config()) is None
  assert distributed.resolve(tiny_config("--config.mesh.num_processes=1")) is None
  cfg = tiny_config("--config.mesh.coordinator=10.0.0.1:1234", "--config.mesh.num_processes=4",
                    "--config.mesh.process_id=3")
  assert distributed.resolve(cfg) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  with pytest.raises(ConfigError, match=r"mesh\.process_id"):
    distributed.resolve(tiny_config("--config.mesh.coordinator=h:1", "--config.mesh.num_processes=2"))
  with pytest.raises(ConfigError, match=r"mesh\.process_id.*\[0, mesh\.num_processes=2\)"):
    distributed.resolve(tiny_config("--config.mesh.coordinator=h:1", "--config.mesh.num_processes=2",
                             "--config.mesh.process_id=2"))
  with pytest.raises(ConfigError, match=r"mesh\.num_processes"):
    distributed.resolve(tiny_config("--config.mesh.coordinator=h:1"))
  with pytest.raises(ConfigError, match=r"mesh\.coordinator"):
    distributed.resolve(tiny_config("--config.mesh.num_processes=2", "--config.mesh.process_id=0"))
  with pytest.raises(ConfigError, match=r"mesh\.coordinator.*host:port"):
    tiny_config("--config.mesh.coordinator=justahost")
  clean_env.setenv("SLURM_NTASKS", "4")
  clean_env.setenv("SLURM_PROCID", "2")
  clean_env.setenv("SLURM_JOB_NODELIST", "gpu-[12-15]")
  assert distributed.resolve(tiny_config()) == dict(coordinator_address="gpu-12:12321", num_processes=4,
                                                    process_id=2)
  clean_env.setenv("JOYJAX_COORDINATOR", "head:999")
  assert distributed.resolve(tiny_config())["coordinator_address"] == "head:999"
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.resolve(tiny_config()) is None
  for k in _ENV:
    clean_env.delenv(k, raising=False)
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
  assert distributed.resolve(tiny_config()) == {}
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert distributed.resolve(tiny_config()) is None


def test_initialize_is_a_noop_for_one_process(clean_env):
  calls = []
  clean_env.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  distributed.initialize(tiny_config())
  distributed.initialize(tiny_config("--config.mesh.num_processes=1"))
  assert calls == []
  info = distributed.process_info()
  assert info["process_count"] == 1 and info["device_count"] == 8 and info["platform"] == "cpu"


_WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[3])
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from joyjax.config import load_config
    from joyjax import parallel
    pid, port = int(sys.argv[1]), sys.argv[2]
    cfg = load_config(os.path.join(sys.argv[3], 'configs/tiny.py'), [
        f'--config.mesh.coordinator=localhost:{port}', '--config.mesh.num_processes=2',
        f'--config.mesh.process_id={pid}', '--config.mesh.dcn_data=2', '--config.mesh.fsdp=-1'])
    parallel.initialize(cfg)
    parallel.initialize(cfg)   # idempotent
    mesh = parallel.make_mesh(cfg)
    data = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    x = jax.make_array_from_callback(data.shape, parallel.batch_sharding(mesh), lambda idx: data[idx])
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    procs = [[d.process_index for d in row.flat] for row in mesh.devices]
    print('RESULT ' + json.dumps(dict(info=parallel.process_info(), mesh=dict(mesh.shape), sum=float(total),
                                      procs=procs)))
""")


# Two processes (each a Python start-up and a jax.distributed handshake); test_resolve_single_config_slurm_tpu
# and test_initialize_is_a_noop_for_one_process are the in-process checks of the same start-up logic.
@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = {k: v for k, v in os.environ.items() if k not in _ENV}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = str(free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, REPO_ROOT], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=240)
      outs.append(out)
      assert p.returncode == 0, out[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, out in enumerate(outs):
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["info"]["process_index"] == i and r["info"]["process_count"] == 2
    assert r["info"]["device_count"] == 8 and r["info"]["local_device_count"] == 4
    assert r["mesh"] == dict(dcn_data=2, data=1, fsdp=4, expert=1, tensor=1)
    assert r["procs"] == [[0, 0, 0, 0], [1, 1, 1, 1]]       # dcn_data splits the processes
    assert r["sum"] == sum(range(32))
