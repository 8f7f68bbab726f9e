"""How racks and the fleet print (``mixer racks``, ``mixer top``): pure formatting, no
DuckDB, no Arrow, so the commands that only ask the running registry stay light."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from mixer.registry import RackInfo


def _rack_age(ns: int) -> str:
    s = max(ns, 0) // 1_000_000_000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def racks_table(infos: Sequence[RackInfo], now_ns: int) -> str:
    """Racks as a fixed-width text table (columns two spaces apart, "-" for unknown);
    SINCE is the time in the current state, LAST SEEN the age of the last heartbeat."""
    rows = [("RACK", "STATE", "SINCE", "LABELS", "VERSION", "RIG", "PROCS", "LAST SEEN")]
    for i in infos:
        seen = bool(i.last_seen_ns)
        rows.append((i.id, i.state, _rack_age(now_ns - i.changed_ns),
                     ",".join(f"{k}={v}" for k, v in sorted(i.labels.items())) or "-",
                     i.version or "-", i.rig_hash[:12] or "-",
                     str(i.processes) if seen else "-",
                     f"{_rack_age(now_ns - i.last_seen_ns)} ago" if seen else "never"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in rows) + "\n"


def _rfc3339(ns: int) -> str | None:
    if not ns:
        return None
    secs, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rest // 1_000_000:03d}Z"


def racks_json(infos: Sequence[RackInfo]) -> bytes:
    """Racks as a JSON array: every ``RackInfo`` field, and each time twice, as ``*_ns``
    (exact) and ``*_at`` (RFC 3339 UTC, milliseconds, ``Z``; null for never)."""
    out = []
    for i in infos:
        doc: dict[str, object] = {"id": i.id, "state": i.state, "labels": dict(i.labels),
                                  "version": i.version, "rig_hash": i.rig_hash,
                                  "processes": i.processes}
        for name, ns in (("started", i.started_ns), ("first_seen", i.first_seen_ns),
                         ("last_seen", i.last_seen_ns), ("changed", i.changed_ns)):
            doc[f"{name}_at"], doc[f"{name}_ns"] = _rfc3339(ns), ns
        out.append(doc)
    return orjson.dumps(out)


def _age(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f}s"
    if seconds < 6000:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


#: column header, row key, format, left-aligned
_COLUMNS = (
    ("RACK", "rack", "{}", True),
    ("STATE", "state", "{}", True),
    ("FRAMES/S", "frames_per_s", "{:.1f}", False),
    ("P99 MS", "p99_ms", "{:.2f}", False),
    ("ERRORS", "errors", "{}", False),
    ("CPU %", "cpu_pct", "{:.1f}", False),
    ("RSS MiB", "rss_mib", "{:.1f}", False),
    ("BACKLOG", "backlog", "{}", False),
    ("AGE", "age_s", "", False),
)


def format_top(rows: list[dict[str, Any]]) -> str:
    """``top_rows`` as the ``mixer top`` table, one line per rack under a header."""
    cells = [[h for h, *_ in _COLUMNS]]
    for row in rows:
        line = []
        for _, key, fmt, _left in _COLUMNS:
            value = row.get(key)
            if value is None:
                line.append("-")
            else:
                line.append(_age(value) if key == "age_s" else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if left else c.rjust(w)
                               for c, w, (_, _, _, left) in zip(r, widths, _COLUMNS))
                     .rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        return value.hex() if len(value) <= 16 else value[:16].hex() + "..."
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Query results as a fixed-width table (numbers right-aligned, "-" for null, long
    bytes cut): ``mixer audit query``/``report``."""
    cells = [list(columns)] + [[_cell(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None
                                  for r in rows) for i in range(len(columns))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(r, widths, numeric)).rstrip()
                     for r in cells) + "\n"
