"""The layers of the repository, read from the code's own imports (every ``import`` statement,
function-level ones included: a deferred import hides a cycle, it does not cut it).

    flows/      thin entry points: import flows/common.py, operators/ and pointseg/, never another flow
    operators/  the Ray layer: imports pointseg/, never flows/
    pointseg/   the library: imports neither operators/ nor flows/, and has no import cycle
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

FLOWS = {p.stem for p in (ROOT / "flows").glob("*.py")}
OPERATORS = {p.stem for p in (ROOT / "operators").glob("*.py")}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports, absolute names (``from a.b import c`` gives ``a.b.c`` when that
    is a module of the repository, else ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append(full if _is_repo_module(full) else base)
    return out


def _is_repo_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found by a depth-first search (each reported once, as the path that closes it)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_walker_sees_deferred_and_relative_imports():
    probe = ROOT / "pointseg" / "generators" / "point2mask" / "_layers_probe.py"
    probe.write_text("from .maps import TransportMaps\n\ndef f():\n    from pointseg.report import render_markdown\n")
    try:
        names = imports_of(probe)
    finally:
        probe.unlink()
    assert "pointseg.generators.point2mask.maps" in names and "pointseg.report" in names
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_library_never_imports_operators_or_flows():
    bad = []
    for path in sources("pointseg"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in ("operators", "flows") or (top in FLOWS and not _is_repo_module(name)):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_operators_never_import_flows():
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in sources("operators") for n in imports_of(p)
           if n.split(".")[0] in FLOWS or n.split(".")[0] == "flows"]
    assert not bad, "\n".join(bad)


def test_no_flow_imports_another_flow():
    bad = []
    for path in sources("flows"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FLOWS and top not in ("common", path.stem):
                bad.append(f"{path.relative_to(ROOT)} imports the flow {top}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_inside_the_library():
    graph: dict[str, set[str]] = {}
    for path in sources("pointseg"):
        me = module_name(path)
        graph[me] = {n for n in imports_of(path) if n.startswith("pointseg") and _is_repo_module(n) and n != me}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
