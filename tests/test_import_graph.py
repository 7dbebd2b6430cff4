"""The package's import graph has no circles.

Every ``import`` in ``skipnet_jax/`` counts, at module level or inside a function (a
function-level import still ties the two modules together: each needs the other), read
from the source with `ast` (nothing is imported).  An edge goes from a module to each
``skipnet_jax`` module it names: ``from skipnet_jax.data import pipeline`` and ``from
skipnet_jax.data.pipeline import X`` both name ``skipnet_jax.data.pipeline``, ``from
skipnet_jax import convert`` names the ``convert`` package (its ``__init__``), ``from
skipnet_jax.models import register_model`` the ``models`` package.
"""

import ast
import os

from conftest import REPO_ROOT

PACKAGE = "skipnet_jax"


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package."""
    root = os.path.join(REPO_ROOT, PACKAGE)
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(tree: ast.AST, module: str, is_package: bool, modules: dict[str, str]) -> set[str]:
    """The package modules `module` imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # a submodule, else a name the module `source` defines
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in modules else source)
    return {name for name in names if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[module] = _imported(tree, module, path.endswith("__init__.py"), modules)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_function_level_and_package_imports():
    graph = import_graph()
    assert "skipnet_jax.data.pipeline" in graph["skipnet_jax.train"]  # imported inside functions
    assert "skipnet_jax.convert" in graph["skipnet_jax.init_from"]  # `from skipnet_jax import convert`


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_saved_model_facts_do_not_reach_up_to_the_commands():
    """convert, inference and the low preprocessing record never reach predict, evaluate or
    export: training (train -> init_from -> convert) does not load the commands."""
    graph = import_graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    commands = {f"{PACKAGE}.{name}" for name in ("predict", "evaluate", "export", "workdir_flags")}
    for low in ("convert", "inference", "model_data", "train", "config_validation"):
        assert not reach(f"{PACKAGE}.{low}") & commands, low
    assert not reach(f"{PACKAGE}.config_validation") & {m for m in graph if m.startswith(f"{PACKAGE}.data")}
