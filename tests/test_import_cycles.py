"""No two modules of LungViT import each other, directly or around a longer loop.

The graph is read statically from every ``import`` and ``from ... import`` in the installed
folders, including imports inside functions (a deferred import still ties two modules).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "lungvit.core", "training": "lungvit.training", "app": "lungvit.app",
            "cli": "lungvit.cli", "synthetic": "lungvit.synthetic"}


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for f in (root / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = f
    return mods


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports (a package counts as its __init__)."""
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        here = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for alias in node.names:  # `from pkg import module` names the module itself
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph(_modules(ROOT))) == []


def test_a_deferred_import_back_is_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from lungvit.core import b\n")
    (tmp_path / "core" / "b.py").write_text("def f():\n    from lungvit.core.a import x\n")
    (tmp_path / "core" / "c.py").write_text("from . import a\n")
    for folder in set(PACKAGES) - {"core"}:
        (tmp_path / folder).mkdir()
    graph = import_graph(_modules(tmp_path))
    assert graph["lungvit.core.c"] == {"lungvit.core.a"}  # a relative import is read too
    assert cycles(graph) == [["lungvit.core.a", "lungvit.core.b"]]
