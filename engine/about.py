"""What is installed: fluxrig's version, the code path in use (C or pure Python, and why)
and the versions of its dependencies — ``engine version [--verbose]``."""

from __future__ import annotations

import platform
import re
from importlib import metadata
from pathlib import Path

from engine._native import python_ring_allowed, status

DIST = "fluxrig"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def fluxrig_version() -> str:
    """The installed distribution's version, or ``unknown (not installed)``."""
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def dependency_versions() -> list[tuple[str, str]]:
    """``(name, installed version or "missing")`` for each runtime requirement of fluxrig
    (extras left out), in the order ``pyproject.toml`` lists them."""
    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return []
    out: list[tuple[str, str]] = []
    for req in requires:
        name_match = _NAME.match(req)
        if name_match is None or "extra ==" in req:
            continue
        name = name_match.group(0)
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "missing"))
    return out


def version_lines(verbose: bool) -> list[str]:
    """The lines ``engine version`` prints: the version alone, or with ``verbose`` where
    fluxrig runs from, on what, which code path each part uses, and the dependencies.

    Raises:
        ValueError: ``FLUXRIG_PURE_PYTHON`` is not a yes/no word.
    """
    if not verbose:
        return [fluxrig_version()]
    lines = [
        f"fluxrig {fluxrig_version()} ({Path(__file__).resolve().parent})",
        (f"python {platform.python_version()} ({platform.python_implementation()}, "
         f"{platform.system()} {platform.machine()})"),
    ]
    for st in status():
        line = f"{st.part}: {st.path} [{st.module}]"
        if st.part == "ring" and not st.loaded and not python_ring_allowed():
            line += f" - unusable: the pure-Python ring needs x86-64, not {platform.machine()}"
        lines.append(line)
    deps = dependency_versions()
    if deps:
        lines.append("packages:")
        lines += [f"  {name} {version}" for name, version in deps]
    return lines
