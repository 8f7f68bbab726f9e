"""Which C extensions this process uses, and why not when it does not.

fluxrig has two C extensions (``engine._ringcore``: the ring's loops and ordered loads and
stores; ``engine._cborcore``: the deterministic CBOR encoder and the common-subset decoder)
and a pure-Python twin of each (``engine._ringpy`` with the Python branch of
``engine._ordering``; the reference encoder in ``engine.cbor``, cbor2's decoder). An install without a compiler has no extensions (``setup.py`` skips what
does not build); ``FLUXRIG_PURE_PYTHON=1`` refuses them even when they are built, so tests
can run the Python path on a machine that has both.

The choice is made once per process, at the first import of the module that needs it, and
forked children inherit it: every process of a rack runs the path its supervisor chose.
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass
from types import ModuleType
from typing import Final

PURE_ENV: Final = "FLUXRIG_PURE_PYTHON"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})

#: Machines whose memory model the pure-Python ring is proven for (``engine/_ordering.py``).
PYTHON_RING_MACHINES: Final = frozenset({"x86_64", "amd64"})

#: The C extensions and the part of fluxrig each one speeds up.
EXTENSIONS: Final = {"engine._ringcore": "ring", "engine._cborcore": "cbor"}


@dataclass(frozen=True, slots=True, kw_only=True)
class NativeStatus:
    """Whether one C extension is in use in this process.

    Attributes:
        module: the extension's import name (``engine._ringcore``).
        part: what it speeds up (``ring``, ``cbor``).
        loaded: True when the C code is in use.
        reason: ``built`` when loaded; otherwise ``forced by FLUXRIG_PURE_PYTHON=1``,
            ``missing`` (not built: no compiler or headers at install time) or
            ``failed: <error>`` (built but not importable, e.g. for another Python).
    """

    module: str
    part: str
    loaded: bool
    reason: str

    @property
    def path(self) -> str:
        """``C`` or ``python (<reason>)``, as ``engine version`` and ``engine status`` say it."""
        return "C" if self.loaded else f"python ({self.reason})"


def python_ring_allowed() -> bool:
    """True on machines where the pure-Python ring is correct (x86-64 only)."""
    return platform.machine().lower() in PYTHON_RING_MACHINES


_loaded: dict[str, tuple[ModuleType | None, NativeStatus]] = {}


def pure_forced() -> bool:
    """True when ``FLUXRIG_PURE_PYTHON`` asks for the pure-Python path.

    Raises:
        ValueError: the variable holds something other than a yes/no word.
    """
    raw = os.environ.get(PURE_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"invalid environment variable: {PURE_ENV}={os.environ[PURE_ENV]!r}, "
                     f"expected one of 1/0, true/false, yes/no, on/off")


def load(module: str) -> ModuleType | None:
    """The C extension ``module`` (a key of ``EXTENSIONS``), or None when the pure-Python
    path must be used; the decision and its reason are kept for ``status``.

    Raises:
        ValueError: ``FLUXRIG_PURE_PYTHON`` is not a yes/no word.
    """
    if module in _loaded:
        return _loaded[module][0]
    part = EXTENSIONS[module]
    ext: ModuleType | None = None
    if pure_forced():
        reason = f"forced by {PURE_ENV}={os.environ[PURE_ENV]}"
    else:
        try:
            ext = importlib.import_module(module)
            reason = "built"
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # the extension exists but something it needs does not: a real bug
            reason = "missing"
        except ImportError as exc:  # e.g. built for another Python: undefined symbol
            reason = f"failed: {exc}"
    _loaded[module] = (ext, NativeStatus(module=module, part=part, loaded=ext is not None,
                                         reason=reason))
    return ext


def status() -> tuple[NativeStatus, ...]:
    """The decision for every C extension (deciding now for those not imported yet)."""
    for module in EXTENSIONS:
        load(module)
    return tuple(_loaded[module][1] for module in EXTENSIONS)


def code_paths() -> dict[str, str]:
    """Part -> ``C`` or ``python (<reason>)``, e.g. ``{"ring": "C", "cbor": "C"}``: what
    the supervisor writes to ``state.json`` and ``engine status`` prints."""
    return {s.part: s.path for s in status()}
