"""Durations and byte sizes as an operator writes them: ``250ms``, ``1.5s``, ``4MiB``, ``4MB``.

Pure text -> number conversions, shared by the rig-file getters (``engine.schema``) and the
settings reference (``engine.reference``), which prints defaults in the same notation.

Durations: a number of seconds, or a decimal number with one unit ``us``, ``ms``, ``s``,
``m`` or ``h`` (lowercase, no space): ``250ms``, ``1.5s``, ``1m``, ``2h``. No compound forms
(``1h30m``): one unit is enough for every setting we have, and easier to read.

Sizes: a number of bytes, or a number with a unit, the Kubernetes convention: binary units
``Ki``/``KiB``, ``Mi``/``MiB``, ``Gi``/``GiB``, ``Ti``/``TiB`` are powers of 1024; decimal
units ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB`` are powers of 1000 (SI), so
``4MB`` is 4,000,000 bytes — not a power of two, which a ring capacity refuses by name.
Letters are case-insensitive (``4mib``), a space before the unit is allowed; the result must
be a whole number of bytes (``1.5KiB`` = 1536 is, ``0.3KiB`` is not).
"""

from __future__ import annotations

import re
from fractions import Fraction

DURATION_FORMS = "seconds, or a number with a unit: 250ms, 1.5s, 1m, 2h (us, ms, s, m, h)"
SIZE_FORMS = "bytes, or a number with a unit: 4MiB, 512Ki (powers of 1024) or 4MB, 4M (of 1000)"

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s|m|h)$")
_SECONDS = {"us": Fraction(1, 1_000_000), "ms": Fraction(1, 1000), "s": Fraction(1),
            "m": Fraction(60), "h": Fraction(3600)}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgt]i?b?|b)?$", re.IGNORECASE)
_PREFIX = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(text: str) -> float | None:
    """Seconds written as ``text`` (``"250ms"`` -> 0.25), or None if it is not a duration."""
    match = _DURATION_RE.match(text)
    if match is None:
        return None
    return float(Fraction(match.group(1)) * _SECONDS[match.group(2)])


def _size_unit(unit: str) -> int:
    """Bytes in one ``unit`` (already lowercase): '' and 'b' are bytes."""
    if unit in ("", "b"):
        return 1
    base = 1024 if unit[1:2] == "i" else 1000
    return base ** _PREFIX[unit[0]]


def parse_size(text: str) -> int | None:
    """Bytes written as ``text`` (``"4MiB"`` -> 4194304, ``"4MB"`` -> 4000000), or None if it
    is not a size or not a whole number of bytes."""
    match = _SIZE_RE.match(text.strip())
    if match is None:
        return None
    unit = (match.group(2) or "").lower()
    value = Fraction(match.group(1)) * _size_unit(unit)
    return int(value) if value.denominator == 1 else None


def is_decimal_size(text: str) -> bool:
    """True when ``text`` is a size in a decimal unit (``4MB``, ``4M``): the form someone who
    meant MiB writes, worth a hint when a power of two is required."""
    match = _SIZE_RE.match(text.strip())
    unit = (match.group(2) or "").lower() if match else ""
    return bool(unit) and unit != "b" and unit[1:2] != "i"


def format_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that writes it exactly: 0.05 -> ``50ms``, 300 -> ``5m``."""
    if seconds == 0:
        return "0s"
    exact = Fraction(seconds).limit_denominator(1_000_000)
    for unit in ("h", "m", "s", "ms", "us"):
        count = exact / _SECONDS[unit]
        if count.denominator == 1 and (count >= 1 or unit == "us"):
            return f"{count.numerator}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that writes it exactly: 4194304 -> ``4MiB``."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size and size % (1024 ** power) == 0:
            return f"{size // 1024 ** power}{unit}"
    return str(size)
