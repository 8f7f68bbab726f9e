"""Structure the code promises: sans-I/O cores, typed seams, small shells."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = {"asyncio", "socket", "selectors", "multiprocessing", "typer", "nats"}
SANS_IO = ["gears/iso8583/core.py", "gears/iso8583/validate.py", "gears/iso8583/codec.py",
           "gears/iso8583/framing.py", "gears/iso8583/matcher.py", "gears/iso8583/router.py",
           "gears/iso8583/reversal.py", "gears/iso8583/settings.py", "engine/journal.py"]


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
    assert len((ROOT / "gears/iso8583/switch.py").read_text().splitlines()) <= 420
