"""The import architecture (ARCHITECTURE.md): joyjax's packages import only downwards, never in a cycle, and
nothing imports inside a function except optional dependencies. Read from the source with ``ast``, so a
violation fails here before it becomes a circular-import error somewhere else."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "joyjax"

# Layers, lowest first. A module may import joyjax modules of a lower layer, and modules of its own package
# (e.g. model/moe.py -> model/layers.py); never a higher layer or another package of the same layer.
LAYERS = (
    ("errors", "tree", "batch", "axes"),   # names and error types: import nothing of joyjax
    ("config",),                           # the schema and its validation
    ("kernels",),                          # MoE compute: knows nothing of the model
    ("model",),                            # the pure-functional model, its parameter layout, expert parallelism
    ("losses", "optim", "data", "quant"),  # objectives, optimizers, input pipelines, quantization formats / QAT
    ("parallel", "convert"),               # meshes / shardings / memory plan; checkpoint conversion
    ("rl",),                               # the RL sampler, tasks and rewards, the prompt stream
    ("train",),                            # state, steps, the harness, checkpoints, metrics, sampling
    ("cli",),                              # the `joyjax` command
)
LAYER_OF = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}

# What may be imported inside a function: optional dependencies that only some runs need (TensorBoard,
# Parquet, ArrayRecord, remote file systems, Triton, older-jax fallbacks and private jax handles).
LAZY_ALLOWED = ("tensorboardX", "pyarrow", "grain.sources", "etils", "absl", "jax.experimental.pallas",
                "jax.experimental.shard_map", "jax._src")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _package(module: str) -> str:
  """joyjax.model.moe -> 'model'; joyjax.config -> 'config'; joyjax -> ''."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _resolve(name: str) -> str | None:
  """The joyjax module an import names (the longest known prefix), or None for a third-party import."""
  if name != "joyjax" and not name.startswith("joyjax."):
    return None
  parts = name.split(".")
  while parts:
    candidate = ".".join(parts)
    if candidate in MODULES:
      return candidate
    parts.pop()
  return None


def _imports(tree: ast.AST):
  """(imported name, line, inside a function?) for every import statement in ``tree``."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        # `from joyjax import model` imports the module joyjax.model; `from jax import numpy` stays 'jax'
        for a in child.names:
          full = f"{child.module}.{a.name}"
          out.append((full if _resolve(full) == full else child.module, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return out


def _graph():
  graph, lazy = {}, []
  for module, path in MODULES.items():
    edges = set()
    for name, line, in_function in _imports(ast.parse(path.read_text(), str(path))):
      target = _resolve(name)
      if in_function and not any(name == p or name.startswith(p + ".") for p in LAZY_ALLOWED):
        lazy.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} inside a function")
      if target and target != module and not in_function:
        edges.add((target, line))
    graph[module] = edges
  return graph, lazy


GRAPH, LAZY = _graph()


def test_every_package_has_a_layer():
  packages = {_package(m) for m in MODULES} - {""}
  assert packages <= set(LAYER_OF), f"add {sorted(packages - set(LAYER_OF))} to LAYERS (and ARCHITECTURE.md)"


def test_imports_only_go_down():
  bad = []
  for module, edges in GRAPH.items():
    src = _package(module)
    if not src or module.endswith(".__main__"):  # `python -m joyjax.train`: an entry point, above everything
      continue
    for target, line in edges:
      dst = _package(target)
      if not dst or dst == src:
        continue
      if LAYER_OF[dst] >= LAYER_OF[src]:
        bad.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} (layer {LAYER_OF[src]}) imports "
                   f"{target} (layer {LAYER_OF[dst]})")
  assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(m):
    state[m] = 1
    stack.append(m)
    for target, _ in sorted(GRAPH.get(m, ())):
      if state.get(target) == 1:
        cycle = stack[stack.index(target):] + [target]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if state.get(target) is None:
        dfs(target)
    stack.pop()
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      dfs(m)


def test_no_imports_inside_functions():
  assert not LAZY, "imports inside functions (move them to the module top, or add an optional dependency to " \
                   "LAZY_ALLOWED):\n" + "\n".join(LAZY)


def test_the_bottom_layer_imports_nothing_of_joyjax_and_config_only_it():
  for module, edges in GRAPH.items():
    pkg = _package(module)
    if pkg in LAYERS[0]:
      assert not edges, f"{module} must import nothing of joyjax, imports {sorted(t for t, _ in edges)}"
    if pkg == "config":
      assert {_package(t) for t, _ in edges} <= set(LAYERS[0]), f"config imports {sorted(edges)}"


def test_the_checker_sees_violations():
  """The checks above are only as good as the parser: it must see each kind of import it judges."""
  src = ("import joyjax.train.loop\nfrom joyjax import model\nfrom joyjax.model import moe\n"
         "from jax import numpy\ndef f():\n  from joyjax.train import step\n  import tensorboardX\n")
  got = [(n, f) for n, _, f in _imports(ast.parse(src))]
  assert got == [("joyjax.train.loop", False), ("joyjax.model", False), ("joyjax.model.moe", False),
                 ("jax", False), ("joyjax.train.step", True), ("tensorboardX", True)]
  assert _resolve("joyjax.model.moe.MoE") == "joyjax.model.moe"


# ------------------------------------------------------------------------------------------ one home per name

# Names that had several copies before they got one home; none may come back (the home is in the comment).
RETIRED = (
    "BATCH_KEYS", "EXAMPLE_KEYS",          # joyjax.batch.LM_KEYS
    "EXPERT_LEAVES", "REMAT_SAVES_ALL",    # model.param_info(...).routed; config.REMAT_POLICIES
    "BATCH_AXES", "FSDP_AXES",             # joyjax.axes (the 'batch' rule)
    "_key_name", "_path_str", "_leaf_path",  # joyjax.tree
    "dtype_of",                            # joyjax.model.layers (the only definition allowed)
)
# Implementations of one interface, one per backend / entry point: the same name by design.
SAME_NAME_BY_DESIGN = {"__all__", "log", "_log", "main", "gmm", "tgmm", "available"}


def _top_level_names(tree: ast.Module):
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      yield node.name, node.lineno
    elif isinstance(node, ast.Assign):
      yield from ((t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      yield node.target.id, node.lineno


def _definitions():
  names, tuples = {}, {}
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    for name, line in _top_level_names(tree):
      names.setdefault(name, []).append(f"{module}:{line}")
    for node in ast.walk(tree):  # string tuples: a copied list of names under another variable name
      if isinstance(node, ast.Tuple) and len(node.elts) >= 3 and all(
          isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        tuples.setdefault(tuple(e.value for e in node.elts), set()).add(module)
  return names, tuples


NAMES, TUPLES = _definitions()


def test_each_shared_name_is_defined_once():
  dup = {n: where for n, where in NAMES.items() if len(where) > 1 and n not in SAME_NAME_BY_DESIGN}
  assert not dup, "defined in several modules (give each one home and import it):\n" + "\n".join(
      f"{n}: {', '.join(w)}" for n, w in sorted(dup.items()))


def test_no_list_of_names_is_copied():
  dup = {t: sorted(m) for t, m in TUPLES.items() if len(m) > 1}
  assert not dup, "the same tuple of names written in several modules:\n" + "\n".join(
      f"{t}: {m}" for t, m in dup.items())


def test_retired_copies_are_gone():
  found = [f"{n}: {w}" for n in RETIRED for w in NAMES.get(n, [])
           if not (n == "dtype_of" and w.startswith("joyjax.model.layers:"))]
  assert not found, "\n".join(found)


def test_config_defaults_are_not_restated():
  """Config values are read as cfg.key, never cfg.get('key', default): the default lives in configs/base.py
  only (a restated default silently diverges when the base changes)."""
  bad = []
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
          and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)):
        owner = ast.unparse(node.func.value)
        if owner in ("cfg", "m", "e", "a", "t", "o", "d", "p", "r") or owner.startswith(("cfg.", "m.")):
          bad.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
  assert not bad, "\n".join(bad)
