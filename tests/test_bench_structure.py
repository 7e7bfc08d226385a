"""The benchmark package is layered: no module imports (at its top or inside a function) a module that imports it
back, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import dorafit.bench

PACKAGE = Path(dorafit.bench.__file__).parent


def imports_within_the_package(path: Path) -> set[str]:
    """The sibling modules ``path`` imports anywhere in it (``from .x import ...``, ``from dorafit.bench.x ...``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("dorafit.bench."):
                found.add(node.module.split(".")[2])
    return found


def test_bench_modules_import_no_module_that_imports_them_back():
    graph = {p.stem: imports_within_the_package(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["suite"] >= {"activation", "compiled", "trainer"}  # the graph is read as intended

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or n not in seen and reaches(n, goal, seen | {n}) for n in graph.get(start, ()))

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert circles == []
