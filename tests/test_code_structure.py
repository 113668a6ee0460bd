"""The project's packages import each other without circles, and no two of their classes share a name.

Read from the sources with `ast` (nothing is imported). An import counts where it is written at a module's top
level, including under `if TYPE_CHECKING:` and `try:` (a type-only import is a dependency of the design too);
imports inside functions are the deliberate lazy ones (torch, the mode registry) and are left out.
Classes whose name starts with `_` never leave their module and are left out of the name check.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("MiniCPMO45", "inference", "rtc_server", "media_shard", "media_tracks")


def project_modules(root: Path) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The module's statements, with those of top-level `if` and `try` blocks."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body)
            for handler in node.handlers:
                out += _top_level(handler.body)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules its top level imports (`from a import b` counts as `a.b` when that is a
    module, else as `a`)."""
    modules = project_modules(root)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in _top_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                deps |= {m for alias in node.names if (m := known(alias.name))}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    if found := known(f"{source}.{alias.name}") or known(source):
                        deps.add(found)
        deps.discard(name)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def duplicate_class_names(root: Path) -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for name, path in project_modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(name)
    return {cls: mods for cls, mods in where.items() if len(mods) > 1}


def test_the_cycle_finder_finds_a_circle_and_its_members(tmp_path: Path) -> None:
    """The checks can fail: a small tree with a type-only circle and a repeated class name."""
    pkg = tmp_path / "inference"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from inference.b import B\n\nclass A: ...\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from inference.a import A\n\nclass B: ...\n"
    )
    (pkg / "c.py").write_text("from . import a\n\ndef f():\n    from inference import b\n\nclass B: ...\n")
    assert import_cycles(import_graph(tmp_path)) == [["inference.a", "inference.b"]]
    assert duplicate_class_names(tmp_path) == {"B": ["inference.b", "inference.c"]}


def test_the_project_has_no_import_cycles() -> None:
    assert import_cycles(import_graph(REPO_ROOT)) == []


def test_no_two_project_classes_share_a_name() -> None:
    assert duplicate_class_names(REPO_ROOT) == {}
