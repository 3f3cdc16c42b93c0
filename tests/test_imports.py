"""The library's modules import each other without a cycle.

The parts' protocols live in ``protocols.py``, which imports no other
module of the library but ``base``; the engine imports the parts, never the
other way round. An import inside a function counts as much as one at the
top: a cycle hidden in a function is still a cycle.
"""

import ast
import pathlib

import sam_optax

SRC = pathlib.Path(sam_optax.__file__).parent / "_src"


def _imports(path: pathlib.Path) -> set[str]:
  """The ``sam_optax._src`` modules that ``path`` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "sam_optax._src":
        found.update(alias.name for alias in node.names)
      elif node.module.startswith("sam_optax._src."):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("sam_optax._src."):
          found.add(alias.name.split(".")[2])
  return found


def _graph() -> dict[str, set[str]]:
  modules = {p.stem: p for p in SRC.glob("*.py") if p.stem != "__init__"}
  return {name: _imports(p) & set(modules) for name, p in modules.items()}


def _cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of module names, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_in_src():
  graph = _graph()
  assert {"engine", "protocols", "gate", "region"} <= set(graph)
  cycle = _cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_protocols_import_only_base():
  assert _graph()["protocols"] <= {"base"}


def test_the_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert _cycle(graph) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
