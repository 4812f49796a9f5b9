"""The package's structure rules, checked on the source: every module says
its job in its first docstring line, no function is longer than 80 lines,
and no two modules of benchmark/ import each other, directly or not."""

import ast
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOP_SCRIPTS = ("download_dataset.py", "prepare_tfrecords.py",
                "export_pfl_hdf5.py")
_MAX_FUNCTION_LINES = 80


def _sources() -> dict[str, str]:
  """`{module name: path}` of benchmark/ and the top-level scripts."""
  found = {}
  for folder, _, names in os.walk(os.path.join(REPO_ROOT, "benchmark")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  for name in _TOP_SCRIPTS:
    found[name[:-3]] = os.path.join(REPO_ROOT, name)
  return found


def _tree(path: str) -> ast.Module:
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), path)


@pytest.mark.parametrize("module", sorted(_sources()))
def test_each_module_states_its_job_and_keeps_functions_short(module):
  tree = _tree(_sources()[module])
  docstring = ast.get_docstring(tree)
  assert docstring and docstring.strip(), f"{module} has no docstring"
  long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > _MAX_FUNCTION_LINES]
  assert not long, f"{module}: functions over {_MAX_FUNCTION_LINES} lines"


def _imports(module: str, path: str, modules: set[str]) -> set[str]:
  """The modules of `modules` that `module` imports (anywhere in it)."""
  found = set()
  for node in ast.walk(_tree(path)):
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return (found & modules) - {module}


def test_no_import_cycle():
  sources = _sources()
  graph = {m: _imports(m, p, set(sources)) for m, p in sources.items()}
  visiting, done, cycles = [], set(), []

  def visit(module):
    if module in visiting:
      cycles.append(visiting[visiting.index(module):] + [module])
      return
    if module in done:
      return
    visiting.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    visiting.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  assert not cycles, f"import cycles: {cycles}"
