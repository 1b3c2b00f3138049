"""The package's shape (issue 13): no import cycles between its modules, no overlong functions.

Parsed with ``ast``, nothing imported. An import inside a function counts as an edge like a module-level one:
a cycle "closed" by a function-level import is still two modules that each need the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "optimum_superweight"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """Dotted module name -> (parsed tree, is a package)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (ast.parse(path.read_text(encoding="utf-8"), str(path)), is_package)
    return modules


def _owner(name: str, modules: dict) -> str | None:
    """The package module that ``name`` (a module or a name inside one) lives in, or None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    # ``from . import x`` may name a submodule; otherwise the names live in ``base`` itself.
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its body (a package's own ``__init__`` excluded)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (tree, is_package) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, is_package, node, modules):
                    owner = _owner(target, modules)
                    # Importing a submodule runs its parent packages' __init__: not a dependency we design.
                    if owner and owner != name and not name.startswith(owner + "."):
                        graph[name].add(owner)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): every component of more than one module is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert f"{PACKAGE}.records" in graph[f"{PACKAGE}.config"]
    # quantizer imports detection inside a method only
    assert f"{PACKAGE}.detection" in graph[f"{PACKAGE}.models.quantizer"]


def test_no_import_cycles_between_modules():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _long_functions() -> list[tuple[int, str]]:
    found = []
    for name, (tree, _) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((lines, f"{name}.{node.name}"))
    return sorted(found, reverse=True)


def test_no_function_over_the_line_limit():
    offenders = _long_functions()
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (longest first): " + ", ".join(
        f"{name} ({lines})" for lines, name in offenders[:10]
    )
