"""The import graph of our packages: no cycles, and dependencies flow one way.

Every module of launcher/, itop_dist/, models/ and data_pipelines/ is parsed with ``ast``; an
edge A -> B is any ``import`` or ``from ... import`` in A, at module level or inside a
function (lazy imports count), that names module B of ours. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``; importing a submodule is not an
edge to its parent package. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "itop_dist", "models", "data_pipelines")
# package -> packages of ours it must never import (models stay independent of the data).
FORBIDDEN = {
    "data_pipelines": {"models", "launcher"},
    "models": {"data_pipelines", "launcher"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of PACKAGES."""
    found = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, except in ``if TYPE_CHECKING:`` bodies
    (their ``else`` branches run and are kept)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
        todo.extend(children)
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> set[str]:
    """The modules of ours that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        while name not in modules and "." in name:  # an attribute of a module: the module
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: set().union(*(_targets(m, p.name == "__init__.py", node, modules)
                             for node in _imports(ast.parse(p.read_text(), str(p)))))
            for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_lazy_relative_and_aliased_imports():
    graph = import_graph()
    # Relative, module level: the builder lists the folder and registers with the registry.
    assert {"data_pipelines.imagenet.folder", "data_pipelines.registry"} <= graph["data_pipelines.imagenet.build"]
    # Lazy (inside a function): only the builder imports the DALI backend.
    importers = {m for m, deps in graph.items() if "data_pipelines.imagenet.dali_backend" in deps}
    assert importers == {"data_pipelines.imagenet.build"}
    # ``from pkg import submodule`` is an edge to the submodule.
    assert "data_pipelines.imagenet" in graph["data_pipelines"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_dependencies_flow_one_way():
    wrong = [f"{m} -> {t}" for m, deps in import_graph().items() for t in sorted(deps)
             if t.split(".")[0] in FORBIDDEN.get(m.split(".")[0], set())]
    assert not wrong, wrong
