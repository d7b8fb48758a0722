"""The import graph of `jaxpar/`: no cycle, and `jaxpar.config` reaches no model.

Edges come from the source (ast), function-local imports included: `import jaxpar.x`,
`from jaxpar.x import y` (to `jaxpar.x.y` when that is a module, else `jaxpar.x`) and
`from jaxpar import x`. Importing `jaxpar.a.b` from outside `jaxpar.a` runs
`jaxpar/a/__init__.py` first, so it is an edge to `jaxpar.a` too (from inside, that package
is already running; the top package `jaxpar`, which every import runs, is left out).
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / "jaxpar").rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _targets(importer: str, name: str, known: dict) -> set[str]:
  """`name` and the packages above it (below `jaxpar`) that importing it runs."""
  parts = name.split(".")
  above = {".".join(parts[:i]) for i in range(2, len(parts))}
  return ({name} | {p for p in above if not importer.startswith(p + ".")}) & set(known)


def imports(module: str, path: pathlib.Path, known: dict) -> set[str]:
  """The jaxpar modules `module` imports, anywhere in its body."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        out |= _targets(module, alias.name, known)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        out |= _targets(module, full if full in known else base, known)
  out.discard(module)
  return out


def graph() -> dict[str, set[str]]:
  known = modules()
  return {m: imports(m, p, known) for m, p in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One cycle (its modules in import order, the first repeated at the end), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state and (found := visit(node)):
      return found
  return None


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in edges.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_import_cycle():
  cycle = find_cycle(graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_finder_sees_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_imports_no_model():
  edges = graph()
  assert "jaxpar.models" in edges["jaxpar.plan"]  # the package edge is counted
  assert "jaxpar.config" in edges["jaxpar.models.base"]   # and models do import config
  reached = reach(edges, "jaxpar.config")
  assert not {m for m in reached if m.startswith("jaxpar.models")}, sorted(reached)


def test_config_validates_without_jax():
  code = ("import sys; from jaxpar import config; "
          "config.load('configs/mistral.yaml', ['model.sliding_window=8']); "
          "config.load('configs/cnn_tiny.yaml'); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"
