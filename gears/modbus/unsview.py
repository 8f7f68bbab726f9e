"""How the UNS prints (``engine uns browse/get/watch``) — pure formatting.

``tree`` draws the hierarchy one level per indent, the tags at the leaves with their last
value, unit, quality and age::

    acme
      lyon
        press-shop
          line-7
            cell-1
              press-1
                cycles          4711            good     0.4s
                temperature     61.3 degC       good     0.4s
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def value_text(value: object, unit: str) -> str:
    """A sample's value as printed (floats to 6 significant digits, ``-`` for none)."""
    if value is None:
        return "-"
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def age_text(now_ns: int, ts_ns: int) -> str:
    """How long ago ``ts_ns`` was."""
    s = max(0, now_ns - ts_ns) / 1e9
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def tree(samples: Mapping[str, Mapping[str, Any]], now_ns: int) -> str:
    """The hierarchy of ``samples`` (path -> sample body), sorted by path."""
    lines: list[str] = []
    previous: Sequence[str] = ()
    paths = sorted(samples)
    width = max((len(p.rsplit(".", 1)[-1]) for p in paths), default=0)
    for path in paths:
        parts = path.split(".")
        common = 0
        while common < len(parts) - 1 and common < len(previous) - 1 \
                and parts[common] == previous[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * depth + parts[depth])
        s = samples[path]
        lines.append("  " * (len(parts) - 1) + f"{parts[-1]:<{width}}  "
                     f"{value_text(s.get('value'), s.get('unit', '')):<18} "
                     f"{s.get('quality', '?'):<10} {age_text(now_ns, int(s.get('ts', 0)))}")
        previous = parts
    return "\n".join(lines) + ("\n" if lines else "")


def line(sample: Mapping[str, Any], now_ns: int) -> str:
    """One sample on one line (``get``, ``watch``)."""
    return (f"{sample.get('path')}  {value_text(sample.get('value'), sample.get('unit', ''))}"
            f"  {sample.get('quality')}  {age_text(now_ns, int(sample.get('ts', 0)))}")


__all__ = ["age_text", "line", "tree", "value_text"]
