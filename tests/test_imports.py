"""What may import what inside sfd_jax, read from the source with `ast` (nothing is imported): no import cycle, the
trainer free of the planner, imports going down the layers, plots below the training metrics, the chip table a
leaf, no private JAX modules."""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfd_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, int]]:
  """(module imported, line) for every import statement of module `name`, at any depth (a function's lazy import
  is a dependency too); `from pkg import x` is the submodule pkg.x where there is one."""
  path, modules = _modules()[name], _modules()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno))
  return found


@functools.cache
def _graph() -> dict[str, set[str]]:
  """Module → the sfd_jax modules it imports."""
  modules = _modules()
  return {name: {m for m, _ in _imports(name) if m in modules and m != name} for name in modules}


def _reach(start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for m in _graph()[todo.pop()] - seen:
      seen.add(m)
      todo.append(m)
  return seen


def test_the_graph_covers_the_package():
  graph = _graph()
  assert {"sfd_jax.plan", "sfd_jax.plan.roofline", "sfd_jax.training.metrics", "sfd_jax.plots",
          "sfd_jax.chips"} <= set(graph)
  assert "sfd_jax.plan.hlo_costs" in graph["sfd_jax.plan.roofline"]  # `from sfd_jax.plan.hlo_costs import ...`
  assert "sfd_jax.chips" in graph["sfd_jax.training.metrics"]        # `from sfd_jax import chips`


def test_no_import_cycle():
  """Tarjan's strongly connected components of the import graph: each must be a single module."""
  graph, index, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, f"modules that import each other (directly or through others): {cycles}"


@pytest.mark.parametrize("name", sorted(m for m in _modules() if m.startswith("sfd_jax.training")))
def test_training_never_reaches_the_planner(name):
  """The trainer reads the chip table (MFU), never the planner (which loads every model, diffrax and the
  extractor): not directly, not through another module."""
  assert not any(m == "sfd_jax.plan" or m.startswith("sfd_jax.plan.") for m in _reach(name))


@pytest.mark.parametrize("layer, below", [
    ("sfd_jax.models", ("sfd_jax.training", "sfd_jax.data", "sfd_jax.cli", "sfd_jax.plan")),
    ("sfd_jax.diffusion", ("sfd_jax.training", "sfd_jax.data", "sfd_jax.cli", "sfd_jax.plan")),
    ("sfd_jax.data", ("sfd_jax.training", "sfd_jax.cli", "sfd_jax.plan"))])
def test_imports_go_down(layer, below):
  """What a researcher imports in a notebook (models, diffusion) loads none of the machinery around it, and data
  never loads the trainer."""
  for name in (m for m in _modules() if m == layer or m.startswith(layer + ".")):
    reached = sorted(m for m in _reach(name) if m.startswith(below))
    assert not reached, f"{name} reaches {reached}"


def test_plots_are_below_the_training_metrics():
  """metrics → plots, never back: plots read and draw runs and know nothing of the trainer."""
  assert "sfd_jax.plots" in _reach("sfd_jax.training.metrics")
  assert not any(m.startswith("sfd_jax.training") for m in _reach("sfd_jax.plots"))


def test_the_chip_table_is_a_leaf():
  """`chips` imports nothing of the package and no JAX, so anything may read it."""
  imported = [m for m, _ in _imports("sfd_jax.chips")]
  assert not any(m.startswith(("sfd_jax", "jax")) for m in imported), imported


def test_private_jax_only_where_no_public_api_exists():
  """`jax._src` is JAX's private code: each import of it has a comment on the line above saying why no public API
  does the job."""
  for name, path in _modules().items():
    lines = path.read_text().splitlines()
    for module, line in _imports(name):
      if module == "jax._src" or module.startswith("jax._src."):
        assert lines[line - 2].strip().startswith("#"), f"{path.relative_to(ROOT)}:{line} imports {module}"
