"""What machine and which code a bench run measured: stored beside every result.

Ratios are compared across runs; when two runs come from different CPUs, kernels, Pythons or
package versions the comparison still holds (both sides of each ratio moved together) but a
reader must be told, so ``perf/compare.py`` prints the differences it finds here.
"""

from __future__ import annotations

# The code lives in the engine package (``engine bench`` writes the same fingerprint, and the
# engine must not import perf/); this module keeps the names the perf scripts import.
from engine.benchkit import (  # noqa: F401  (re-exported)
    COMPARED,
    EXTRA_PACKAGES,
    ROOT,
    differences,
    fingerprint,
    git_commit,
    package_versions,
)
