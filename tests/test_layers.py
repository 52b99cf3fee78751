"""The import graph of the packages: layers point down, no cycle, no function-local project import.

Read from the source with ast (nothing is imported), so a violation names the file and line.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "eval", "experiments", "tables")
# Lowest first; a module may import its own layer and the layers below it.
LAYERS = (
    ("core.errors", "core.extras", "core.cli", "core.progress"),
    ("core.io",),
    ("core.data",),
    ("core.schedules", "core.diffusion", "core.sampling", "core.models", "core.sharding",
     "core.hardware", "core.profiling"),
    # trainer, checkpoints, gin config, benchmark, the model summary command; evaluation
    ("core", "core.models.summary", "eval"),
    ("experiments",),
    ("tables",),
)


def _modules() -> dict[str, str]:
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
          out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(d, f)
  return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in modules:
      return ".".join(parts[:i])
  return None


def _imports(module: str, path: str, modules: dict[str, str]):
  """(line, imported project module, at top level) of every import statement of a module."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  top = {id(n) for n in tree.body}
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      target = _resolve(name, modules)
      if target and target != module:
        yield node.lineno, target, id(node) in top


def _layer(module: str) -> int:
  best, rank = -1, None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, rank = len(p), i
  assert rank is not None, f"{module} is in no layer; add it to LAYERS"
  return rank


def _graph():
  modules = _modules()
  return modules, {m: list(_imports(m, p, modules)) for m, p in modules.items()}


def test_no_function_local_project_imports():
  modules, graph = _graph()
  local = [f"{os.path.relpath(modules[m], ROOT)}:{line} imports {t}"
           for m, edges in graph.items() for line, t, top in edges if not top]
  assert not local, "imports of project modules inside functions:\n" + "\n".join(local)


def test_imports_point_down_the_layers():
  modules, graph = _graph()
  up = [f"{os.path.relpath(modules[m], ROOT)}:{line} ({m}, layer {_layer(m)}) imports {t} "
        f"(layer {_layer(t)})"
        for m, edges in graph.items() for line, t, _ in edges if _layer(t) > _layer(m)]
  assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_import_cycle():
  _, graph = _graph()
  edges = {m: sorted({t for _, t, _ in e}) for m, e in graph.items()}
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    path.append(m)
    for t in edges[m]:
      if state.get(t) == 1:
        return path[path.index(t):] + [t]
      if t not in state:
        cycle = visit(t)
        if cycle:
          return cycle
    path.pop()
    state[m] = 2
    return None

  for m in sorted(edges):
    if m not in state:
      cycle = visit(m)
      assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for(tmp_path):
  """The walker itself: a cycle, a local import and an upward import in a toy package."""
  modules = {"core.a": str(tmp_path / "a.py"), "core.b": str(tmp_path / "b.py")}
  (tmp_path / "a.py").write_text("from core import b\n")
  (tmp_path / "b.py").write_text("def f():\n  from core import a\n")
  found = {m: list(_imports(m, p, modules)) for m, p in modules.items()}
  assert found == {"core.a": [(1, "core.b", True)], "core.b": [(2, "core.a", False)]}
  assert _layer("core.io.storage") < _layer("core.data.records") < _layer("core.models.unet")
  assert _layer("core.models.unet") < _layer("core.trainer") < _layer("experiments.run")
  assert _layer("eval.worker") < _layer("tables.render")
