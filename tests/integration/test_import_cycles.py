"""No import circles among the workspace's modules.

Imports are read with ``ast`` from every module under ``packages/*/src``: module-level ones, those inside
functions (a lazy import still makes the two modules depend on each other) and ``TYPE_CHECKING`` ones. An edge
goes to the module named (``from pkg import sub`` -> ``pkg.sub`` when that is a module); the implicit import of
parent packages is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Known circles still to remove (tracking.run's relog logs models through tracking.pyfunc, which needs
# run's TrackingRun); they may disappear, no new one may appear.
PENDING: list[set[str]] = []  # circles known and not yet removed (none)


def workspace_modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for src in sorted(REPO.glob("packages/*/src")):
        for f in sorted(src.rglob("*.py")):
            parts = list(f.relative_to(src).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    def known(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        graph[mod] = {t for t in map(known, targets) if t is not None and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "packages" / "x" / "src" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    (pkg / "c.py").write_text("import demo.a\n")
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    graph = import_graph(mods)
    assert graph["demo.c"] == {"demo.a"}
    assert cycles(graph) == [{"demo.a", "demo.b"}]


def test_no_import_cycles_among_workspace_modules():
    mods = workspace_modules()
    assert {"distill_common.cli", "distill_common.tracking.pyfunc", "distill_eval.fid"} <= set(mods)
    found = [c for c in cycles(import_graph(mods)) if c not in PENDING]
    assert not found, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)
