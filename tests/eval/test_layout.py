"""distill_eval's modules import each other without a circle (Issue 14: fid.py <-> reference_stats.py was one)."""

from __future__ import annotations

import ast
from pathlib import Path

import distill_eval


def module_imports(package: str, folder: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level or in functions (TYPE_CHECKING blocks too)."""
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{package}."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}."))
        graph[name] = found - {name}
    return graph


def test_distill_eval_has_no_import_circle() -> None:
    graph = module_imports("distill_eval", Path(distill_eval.__file__).parent)
    assert "reference_stats" in graph["fid"] and "fid" not in graph["reference_stats"]
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import circle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
