"""Orbax checkpointing: the training checkpoint (state + data iterator state + config) and params-only checkpoints.

Layout of a training run::

  <output_dir>/checkpoints/<step>/
      state/    the state pytree (params, optimizer state, step, router biases, ...), OCDBT/zarr arrays
      data/     JSON: {"step": step, "data_state": <the grain iterator state or null>}; a multi-process run
                also stores "process_data_states": [the state of process 0, of process 1, ...]
      config/   JSON: the config as a dict
      commit_success.txt, _CHECKPOINT_METADATA

Atomicity. Orbax writes a step into ``<step>.orbax-checkpoint-tmp-<timestamp>/``, writes ``commit_success.txt``
into it when every item is complete, then renames it to ``<step>/`` (on GCS, where renames are not atomic, it
writes into ``<step>/`` and the commit file last). A save killed half-way therefore leaves a tmp directory,
which is never listed as a step and is deleted when the next ``Checkpointer`` opens the directory. On top of
that, a step directory is only counted as *finished* when it contains ``commit_success.txt``: orbax on a local
filesystem would accept any directory named like a step, e.g. one left by an interrupted ``cp``/``rsync``.
Such unfinished step directories are skipped by ``all_steps`` / ``latest_step`` / ``restore`` and, when the
``Checkpointer`` opens the directory, moved aside (renamed ``<step>.uncommitted-<time>``, never deleted) by
the primary process so that a later save of the same step cannot collide with them.

Corrupt checkpoints (policy). A *finished* checkpoint that cannot be read (a truncated or missing file: a
full disk, a broken copy, storage corruption) raises ``CheckpointCorruptError`` naming its path and suggesting
either deleting it, which makes the previous step the latest, or restoring an earlier step explicitly; it
does not silently fall back to an older step, because resuming hundreds of steps earlier without being asked
is a surprise that costs compute and can hide a storage problem. ``restore(..., fallback=True)`` opts into
the fallback: it warns, names the unreadable path, and tries the next older finished step.

A state whose tree or shapes differ from the checkpoint's (a different model config, a different optimizer)
raises ``CheckpointMismatchError`` naming the first mismatched leaf path and both shapes, before any array is
read. dtypes may differ: arrays are cast to the requested dtype.

Restore goes straight into the target shardings given by ``abstract_state`` (a pytree of
``jax.ShapeDtypeStruct`` with ``.sharding``): every process reads only the shards it owns, and a checkpoint
written on one mesh restores onto any other mesh.

Multi-process: every process calls ``save`` / ``restore`` / ``wait`` / ``close`` (they contain barriers);
orbax decides which process writes what. This module itself writes (the renaming of unfinished step
directories) only from the primary process, followed by a barrier. Each process has its own data iterator
state (it reads its own documents); orbax writes JSON items from the primary process only, so ``save`` gathers
every process's ``data_state`` into the item and ``restore`` hands each process back its own.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from joyjax.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                           CheckpointNotFoundError)
from joyjax.tree import path_str

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # inside a run's output_dir
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step directory just before committing it
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a directory being written
_ITEMS = ("state", "data", "config")
_BYTES_KEY = "__bytes_b64__"
_barrier_ids = itertools.count()


# ------------------------------------------------------------------------------------------- helpers


def _path(p) -> epath.Path:
  s = os.fspath(p)
  return epath.Path(s if "://" in s else os.path.abspath(s))


def _is_primary() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"joyjax:{name}:{next(_barrier_ids)}")


def _is_step_name(name: str) -> bool:
  return name.isdigit() and (name == "0" or not name.startswith("0"))


def _is_committed(step_dir: epath.Path) -> bool:
  return step_dir.is_dir() and (step_dir / COMMIT_MARKER).exists()


def _encode_json(obj):
  """JSON-able copy of ``obj``: bytes become {"__bytes_b64__": ...}, numpy scalars/arrays become Python."""
  if isinstance(obj, (bytes, bytearray, memoryview)):
    return {_BYTES_KEY: base64.b64encode(bytes(obj)).decode("ascii")}
  if isinstance(obj, dict):
    return {str(k): _encode_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_encode_json(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
    return _encode_json(obj.to_dict())
  return obj


def _decode_json(obj):
  if isinstance(obj, dict):
    if set(obj) == {_BYTES_KEY}:
      return base64.b64decode(obj[_BYTES_KEY])
    return {k: _decode_json(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode_json(v) for v in obj]
  return obj


def _gather_processes(obj) -> list:
  """``[obj of process 0, obj of process 1, ...]`` for a JSON-able ``obj``; every process must call it."""
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj, allow_nan=True).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(blobs[i, :int(n)].tobytes().decode("utf-8")) for i, n in enumerate(sizes)]


def _json_item(obj, what: str):
  obj = _encode_json(obj)
  try:
    json.dumps(obj, allow_nan=True)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, str, numbers, bool, None, bytes): {e}") from e
  return obj


def _stored_shape(leaf) -> tuple:
  """The shape of ``leaf`` as stored: PRNG key arrays are stored as their key data."""
  dtype = getattr(leaf, "dtype", None)
  shape = tuple(getattr(leaf, "shape", ()))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    shape = tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype)).shape)
  return shape


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): _stored_shape(x) for p, x in leaves}


def check_tree(stored, wanted, *, where: str) -> None:
  """Raises ``CheckpointMismatchError`` naming the first leaf whose path or shape differs between the stored
  (orbax metadata) tree and the wanted (abstract) tree."""
  have, want = _shapes_by_path(stored), _shapes_by_path(wanted)
  for name, shape in want.items():
    if name not in have:
      close = [k for k in have if k.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]][:3]
      hint = f" (the checkpoint has {', '.join(close)})" if close else ""
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match the model: leaf '{name}' (shape {shape}) is missing from the "
          f"checkpoint{hint}. The checkpoint has {len(have)} leaves, the model {len(want)}; was it written with "
          f"a different model config?")
    if tuple(have[name]) != tuple(shape):
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match the model: leaf '{name}' has shape {tuple(have[name])} in the "
          f"checkpoint but {tuple(shape)} in the model. Was it written with a different model config?")
  extra = [k for k in have if k not in want]
  if extra:
    raise CheckpointMismatchError(
        f"checkpoint {where} does not match the model: the checkpoint has leaf '{extra[0]}' (shape "
        f"{tuple(have[extra[0]])}) that the model does not ({len(extra)} such leaves). Was it written with a "
        f"different model config?")


def _default_sharding():
  devices = np.asarray(jax.devices())
  return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("_all",)), jax.sharding.PartitionSpec())


def _as_abstract(tree):
  """ShapeDtypeStructs with shardings; arrays give their own, missing shardings mean fully replicated."""
  default = None

  def one(x):
    nonlocal default
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      default = default or _default_sharding()
      sharding = default
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)

  return jax.tree.map(one, tree)


def _metadata_tree(md):
  """The plain tree of an orbax TreeMetadata (or the tree itself)."""
  return getattr(md, "tree", md)


# ------------------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Training checkpoints in ``<output_dir>/checkpoints``: asynchronous saves, the last ``keep`` kept.

  ``save`` returns once the arrays are copied off the devices (the training step may then donate them);
  writing continues in the background. ``wait()`` blocks until it is committed. ``all_steps`` and
  ``latest_step`` list finished checkpoints only.
  """

  def __init__(self, output_dir, *, keep: int, async_save: bool = True):
    self.directory = _path(output_dir) / CHECKPOINTS_DIR
    if _is_primary():
      self.directory.mkdir(parents=True, exist_ok=True)
      self._quarantine_unfinished()
    _barrier(f"checkpointer_init:{self.directory}")
    keep = int(keep) if keep else 0
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep if keep > 0 else None),
        enable_async_checkpointing=bool(async_save),
        cleanup_tmp_directories=True,  # saves killed half-way
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=options,
    )
    self.keep = keep
    self.async_save = bool(async_save)

  def _quarantine_unfinished(self) -> None:
    """Renames step directories without a commit marker aside (primary process only)."""
    for child in self.directory.iterdir():
      if _is_step_name(child.name) and child.is_dir() and not _is_committed(child):
        target = child.parent / f"{child.name}.uncommitted-{time.strftime('%Y%m%d-%H%M%S')}"
        log.warning("checkpoint %s was never finished (no %s); moving it aside to %s and ignoring it", child,
                    COMMIT_MARKER, target)
        child.rename(target)

  # ------------------------------------------------------------------------------ listing

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def all_steps(self) -> list[int]:
    """Steps of finished checkpoints, ascending (a save still in flight is not listed until it commits)."""
    return sorted(s for s in self._manager.all_steps() if _is_committed(self.step_dir(s)))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # ------------------------------------------------------------------------------ save

  def save(self, step: int, state, *, data_state: dict | None = None, config: Any = None,
           force: bool = False) -> bool:
    """Starts saving ``state`` (any pytree of jax arrays), the JSON-able ``data_state`` and ``config`` (a dict
    or ConfigDict) as step ``step``. Returns False, saving nothing, when a finished checkpoint of this step
    already exists, unless ``force``, which replaces it. The save is asynchronous unless the Checkpointer was
    made with ``async_save=False``; a previous save still in flight is waited for first."""
    step = int(step)
    data = _json_item({"step": step, "data_state": data_state}, "data_state")
    if jax.process_count() > 1:  # every process's own iterator state (orbax writes JSON from process 0 only)
      data["process_data_states"] = _gather_processes(data["data_state"])
    cfg = _json_item({} if config is None else config, "config")
    self._manager.wait_until_finished()
    if step in self._manager.all_steps():
      if not force:
        log.info("checkpoint of step %d already exists in %s; not saving it again", step, self.directory)
        return False
      log.warning("replacing the existing checkpoint of step %d in %s", step, self.directory)
      self._manager.delete(step)
    later = [s for s in self.all_steps() if s > step]
    if later:
      log.warning("saving step %d while later checkpoints %s exist in %s; latest_step() stays %d", step, later,
                  self.directory, later[-1])
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                config=ocp.args.JsonSave(cfg)),
        force=True,  # the training loop decides when to save
    )
    return True

  def wait(self) -> None:
    """Blocks until every started save is committed (raises if one failed)."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ------------------------------------------------------------------------------ restore

  def restore(self, step: int | None = None, *, abstract_state, fallback: bool = False):
    """Restores ``(state, data_state, config)`` of ``step`` (default: the latest finished one); ``data_state``
    is the one this process saved.

    ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` (or arrays) whose ``.sharding`` says
    where each restored array goes; leaves without one are restored fully replicated. Raises
    ``CheckpointNotFoundError`` (a ``FileNotFoundError``) when there is no such finished checkpoint,
    ``CheckpointMismatchError`` when the trees differ, ``CheckpointCorruptError`` when it cannot be read (see
    the module docstring; ``fallback=True`` tries older steps instead, with a warning).
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"no finished checkpoint in {self.directory}")
    if step is None:
      candidates = steps[::-1]
    else:
      step = int(step)
      if step not in steps:
        raise CheckpointNotFoundError(f"no finished checkpoint of step {step} in {self.directory}; finished "
                                      f"steps: {steps}")
      candidates = [s for s in steps[::-1] if s <= step]
    target = _as_abstract(abstract_state)
    for i, s in enumerate(candidates):
      try:
        return self._restore_step(s, target, older=candidates[i + 1:])
      except CheckpointCorruptError as e:
        if not fallback or i + 1 == len(candidates):
          raise
        log.warning("%s\nfalling back to step %d", e, candidates[i + 1])
    raise AssertionError("unreachable")

  def _restore_step(self, step: int, target, *, older: list[int]):
    path = self.step_dir(step)
    hint = (f"If it is damaged, delete it (rm -rf {path}) so that step {older[0]} becomes the latest, or restore "
            f"an earlier step explicitly (finished steps: {sorted(older)})." if older else
            f"It is the only checkpoint in {self.directory}; delete it to start from scratch.")
    try:
      md = self._manager.item_metadata(step)
      stored = _metadata_tree(md["state"])
      if stored is None:
        raise ValueError(f"no readable metadata in {path / 'state'}")
    except Exception as e:  # noqa: BLE001 - anything unreadable is reported the same way
      raise CheckpointCorruptError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). {hint}") from e
    check_tree(stored, target, where=str(path))
    try:
      out = self._manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                                  config=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). {hint}") from e
    data = _decode_json(out["data"] or {})
    log.info("restored step %d from %s", step, path)
    data_state = data.get("data_state")
    per_process = data.get("process_data_states")
    if per_process:
      # This process's own state. With another process count there is none: process 0's is handed back and
      # the data iterator's set_state reports the process-count mismatch.
      i = jax.process_index()
      data_state = per_process[i] if i < len(per_process) else per_process[0]
    return out["state"], data_state, out["config"]


# ------------------------------------------------------------------------------------------- params only


PARAMS_CONFIG = "joyjax_config.json"  # the model config written beside a params-only checkpoint


def save_params(path, params, *, config: Any = None, overwrite: bool = False) -> None:
  """Writes a params-only checkpoint (e.g. the output of ``joyjax convert``) to the directory ``path``, with
  ``config`` (a dict or ConfigDict) as ``joyjax_config.json`` in it when given. Blocks until it is committed.
  Every process must call it."""
  path = _path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(path, params, force=overwrite)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  if config is not None and _is_primary():
    (path / PARAMS_CONFIG).write_text(json.dumps(_json_item(config, "config"), indent=1))
  _barrier(f"save_params:{path}")


def load_params_config(path) -> dict | None:
  """The config dict saved beside a params-only checkpoint by ``save_params(..., config=...)``, or None."""
  f = _path(path) / PARAMS_CONFIG
  return json.loads(f.read_text()) if f.exists() else None


TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer, saved in its output_dir (and by `joyjax convert`)


def save_tokenizer(directory, tokenizer) -> None:
  """Saves ``tokenizer`` as ``<directory>/tokenizer.json`` (atomically; left alone when identical), so a run
  that starts from this one's checkpoints (``train.init_from``) reads text the same way."""
  path = _path(directory) / TOKENIZER_FILE
  if path.exists() and path.read_text() == tokenizer.hf.to_str():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(os.fspath(path))


def find_saved_tokenizer(path) -> str | None:
  """The ``tokenizer.json`` saved with the checkpoint ``path`` (a params-only checkpoint, a run's output_dir,
  its ``checkpoints`` folder or one step of it), or None."""
  p = _path(path)
  for d in (p, p.parent, p.parent.parent):
    if (d / TOKENIZER_FILE).exists():
      return os.fspath(d / TOKENIZER_FILE)
  return None


def _resolve_params_dir(path: epath.Path) -> tuple[epath.Path, str | None]:
  """(directory of the pytree item, key of the params subtree or None) for a params-only checkpoint, a
  training step directory (``.../checkpoints/<step>``: its state's 'params'), a ``checkpoints`` directory
  (its latest finished step) or a run's output_dir (the same, in its ``checkpoints``)."""
  if not (path / "_METADATA").exists() and (path / CHECKPOINTS_DIR).is_dir():
    path = path / CHECKPOINTS_DIR
  if (path / "state").is_dir() and (path / "_CHECKPOINT_METADATA").exists():
    return path / "state", "params"
  if not (path / "_METADATA").exists():
    steps = sorted(int(c.name) for c in path.iterdir() if _is_step_name(c.name) and _is_committed(c))
    if steps:
      return path / str(steps[-1]) / "state", "params"
  return path, None


def load_params(path, abstract_params=None):
  """Reads a params-only checkpoint written by ``save_params`` (or the params of a training checkpoint: a
  step directory ``<output_dir>/checkpoints/<step>``, or ``<output_dir>/checkpoints`` or ``<output_dir>`` for
  its latest step).

  ``abstract_params``: the model's tree of ``jax.ShapeDtypeStruct`` (e.g. ``transformer.abstract_params``
  with shardings attached) or arrays; restores straight into their shardings and dtypes, after checking that
  the trees and shapes match (``CheckpointMismatchError`` names the first mismatched leaf and both shapes).
  None: the stored tree, shapes and dtypes, fully replicated.
  """
  path = _path(path)
  if not path.exists():
    tmp = [c.name for c in path.parent.iterdir() if c.name.startswith(path.name + TMP_MARKER)] \
        if path.parent.exists() else []
    hint = f" (an unfinished save left {tmp[0]} next to it: the save was interrupted)" if tmp else ""
    raise CheckpointNotFoundError(f"params checkpoint {path} does not exist{hint}; give a directory written by "
                                  "`joyjax convert --hf-dir` or a training run's checkpoints/<step>")
  item_dir, subkey = _resolve_params_dir(path)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    try:
      stored = _metadata_tree(ckptr.metadata(item_dir).item_metadata)
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(f"{path} is not a readable params checkpoint ({type(e).__name__}: {e})") from e
    if stored is None:
      raise CheckpointCorruptError(f"{path} is not a readable params checkpoint (no pytree metadata in "
                                   f"{item_dir})")
    if subkey is not None:
      if not isinstance(stored, dict) or subkey not in stored:
        raise CheckpointMismatchError(f"training checkpoint {path} has no '{subkey}' in its state")
      stored = stored[subkey]
    if abstract_params is None:
      sharding = _default_sharding()
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), stored)
    else:
      target = _as_abstract(abstract_params)
      check_tree(stored, target, where=str(path))
    item = target if subkey is None else {subkey: target}
    try:
      out = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=subkey is not None))
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(f"params checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
  return out if subkey is None else out[subkey]
