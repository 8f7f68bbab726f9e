"""Structure the code promises: sans-I/O cores, typed seams, small shells."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = {"asyncio", "socket", "selectors", "multiprocessing", "typer", "nats"}
SANS_IO = ["gears/iso8583/core.py", "gears/iso8583/validate.py", "gears/iso8583/codec.py",
           "gears/iso8583/framing.py", "gears/iso8583/matcher.py", "gears/iso8583/router.py",
           "gears/iso8583/reversal.py", "gears/iso8583/settings.py", "engine/journal.py",
           "gears/modbus/codec.py", "gears/modbus/planner.py", "gears/modbus/sample.py",
           "gears/modbus/uns.py", "gears/modbus/mbap.py", "gears/modbus/settings.py",
           "gears/modbus/write.py", "gears/modbus/unsview.py", "mixer/auditrow.py",
           "gears/io/httpout.py", "gears/io/httpin.py", "engine/fanout.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("module", SANS_IO)
def test_protocol_cores_import_no_io(module):
    assert _imports(ROOT / module) & IO_MODULES == set()


@pytest.mark.parametrize("module", ["gears/iso8583/core.py", "gears/iso8583/saf.py",
                                    "gears/iso8583/switch.py", "gears/iso8583/conns.py"])
def test_no_any_between_switch_core_and_saf(module):
    tree = ast.parse((ROOT / module).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "Any" not in names


def test_the_switch_shell_stays_small():
    # decisions live in the core; the shell moves bytes (and, since traces, takes the clock
    # readings only it can: records written, bytes handed to the kernel)
    assert len((ROOT / "gears/iso8583/switch.py").read_text().splitlines()) <= 440


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level *or* inside functions (a
    lazy import dodges a circle at run time, not in the design)."""
    mods = {}
    for pattern in ("engine/*.py", "gears/**/*.py", "mixer/*.py"):
        for p in ROOT.glob(pattern):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module in mods:
                    deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in mods}
        graph[name] = deps - {name}
    return graph


def test_no_import_circles_in_engine_and_gears():
    graph = _import_graph()
    circles = []

    def visit(node, path, seen):
        for dep in sorted(graph[node]):
            if dep in path:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in seen:
                seen.add(dep)
                visit(dep, path + [dep], seen)

    for start in sorted(graph):
        visit(start, [start], {start})
    assert circles == []


def test_the_engine_never_imports_the_mixer():
    """A rack runs without the hub's code (and its DuckDB and Arrow): the Mixer imports the
    engine, never the other way."""
    graph = _import_graph()
    assert {(m, d) for m, deps in graph.items() if not m.startswith("mixer")
            for d in deps if d.startswith("mixer")} == set()
