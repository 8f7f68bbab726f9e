"""Reading the stored traces and logs: lookups (DuckDB over the Parquet parts, read-only)
and their terminal rendering (sans I/O: ``waterfall``, ``log_line``).

A lookup never globs the whole tree: it lists the hour directories its window covers
(every rack), so DuckDB opens only those files. A trace id that is a UUIDv7 names its own
hour (``mixer.tracerows``: rows are partitioned by it), so that lookup opens one hour
whatever ``--since`` says. Passes: the newest ``limit`` trace ids matching the query (the
lookup columns only); their rows (with ``spans``) in the files they were found in; then the
rest of those traces — rows without a root, spans that came in another message — in the
same hours of every rack. Rows are merged by span id: a row seen twice (a compaction
half-way) changes nothing.

The connection may read the hub's ``traces/`` and ``logs/`` only, external access off and
its configuration locked, as ``mixer audit query``'s.

Rendering: every stored text is a rack's (span names, attribute values, log messages,
logger and process names) and goes to a terminal, so each passes
``engine.logutil.printable`` (control and format characters as ``\\xNN``/``\\uNNNN``): a
rack can neither move the cursor, retitle the window nor forge a second line. A traceback
keeps its lines, each made printable. ``--json`` needs none of this (JSON escapes).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import duckdb
import orjson

from engine.logutil import printable
from mixer.tracelayout import (
    HOUR_NS,
    LEVELS,
    LOGS_DIR,
    ROOT_COLUMNS,
    TRACES_DIR,
    trace_id_bytes,
    uuid7_ns,
)

HEADER_COLUMNS: Final = tuple(c for c, _ in ROOT_COLUMNS)
_TERMINAL_STAN: Final = re.compile(r"^([^:\s]{1,32}):(\d{1,12})$")
_TOKEN: Final = re.compile(r"^\d{6,19}$")
SHARED_AXIS_SLACK_NS: Final = 100_000_000  # traces this close share one time axis


class TraceLookupError(ValueError):
    """A query that is not a token, TERMINAL:STAN or trace id (the message says so)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookup:
    """What to look for: exactly one of token, (terminal, stan), trace id."""

    token: str | None = None
    terminal: str | None = None
    stan: str | None = None
    trace_id: str | None = None  # 32 lowercase hex

    def where(self) -> tuple[str, list[object]]:
        """The SQL condition and its parameters."""
        if self.trace_id is not None:
            return "trace_id = ?", [self.trace_id]
        if self.token is not None:
            return "token = ?", [self.token]
        # DE11 is six digits on the wire; a gear may have dropped the zeros
        stan = str(self.stan)
        return "terminal = ? AND stan IN (?, ?)", [self.terminal, stan.zfill(6),
                                                   stan.lstrip("0") or "0"]


def parse_lookup(text: str) -> Lookup:
    """``QUERY`` of ``mixer traces``: a trace id (32 hex digits or a UUID with dashes), a
    token (digits), or ``TERMINAL:STAN``.

    Raises:
        TraceLookupError: none of those.
    """
    t = text.strip()
    tid = trace_id_bytes(t)
    if tid is not None:  # 32 hex digits: longer than any token (at most 19)
        return Lookup(trace_id=tid.hex())
    if _TOKEN.match(t):
        return Lookup(token=t)
    m = _TERMINAL_STAN.match(t)
    if m:
        return Lookup(terminal=m.group(1), stan=m.group(2))
    raise TraceLookupError(f"invalid query {text!r} (expected a token: digits; TERMINAL:STAN; or "
                       f"a trace id: 32 hex digits or a UUID)")


def readonly(root: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that may read under ``root`` (the hub's data dir)'s ``traces/``
    and ``logs/`` only."""
    con = duckdb.connect()
    dirs = [str((root / d).resolve()) + "/" for d in (TRACES_DIR, LOGS_DIR)]
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def hour_files(root: Path, kind: str, start_ns: int, end_ns: int,
               racks: Iterable[str] | None = None) -> list[str]:
    """The parts of every hour from ``start_ns`` to ``end_ns`` (of ``racks``, or all)."""
    base = root / kind
    if not base.is_dir():
        return []
    rack_dirs = ([base / f"rack={r}" for r in racks] if racks is not None
                 else sorted(base.glob("rack=*")))
    files: list[str] = []
    h = start_ns - start_ns % HOUR_NS
    while h <= end_ns:
        t = datetime.fromtimestamp(h // 10**9, UTC)
        rel = f"date={t:%Y-%m-%d}/hour={t:%H}"
        for rd in rack_dirs:
            d = rd / rel
            if d.is_dir():
                files.extend(str(p) for p in sorted(d.glob("*.parquet")))
        h += HOUR_NS
    return files


@dataclass(slots=True, kw_only=True)
class SpanView:
    """One span as shown."""

    name: str
    span_id: str
    parent_span_id: str | None
    kind: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, object]
    rack: str
    process: str | None
    depth: int = 0


@dataclass(slots=True, kw_only=True)
class TraceView:
    """One trace, its rows merged."""

    trace_id: str
    rack: str
    process: str | None
    start_ns: int
    end_ns: int
    name: str | None
    header: dict[str, str | None]
    spans: list[SpanView] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        """The trace as ``--json`` prints it (offsets from its own start)."""
        return {"trace_id": self.trace_id, "rack": self.rack, "process": self.process,
                "name": self.name, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_ms": (self.end_ns - self.start_ns) / 1e6, **self.header,
                "spans": [{"name": s.name, "span_id": s.span_id,
                           "parent_span_id": s.parent_span_id, "kind": s.kind,
                           "depth": s.depth, "rack": s.rack, "process": s.process,
                           "start_ns": s.start_ns, "end_ns": s.end_ns,
                           "offset_ms": (s.start_ns - self.start_ns) / 1e6,
                           "duration_ms": (s.end_ns - s.start_ns) / 1e6, "status": s.status,
                           "attributes": s.attributes} for s in self.spans]}


_ROW_COLUMNS: Final = ("rack", "trace_id", "process", "start_ns", "end_ns", "name",
                       *HEADER_COLUMNS, "spans")


def find_traces(con: duckdb.DuckDBPyConnection, root: Path, lookup: Lookup, since_s: float,
                limit: int, now_ns: int | None = None) -> list[TraceView]:
    """The newest ``limit`` traces matching ``lookup`` within ``since_s`` (a UUIDv7 trace id:
    in its own hour, whatever ``since_s``), newest first, across every rack."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    since_ns = now_ns - int(since_s * 1e9)
    cond, params = lookup.where()
    v7 = uuid7_ns(bytes.fromhex(lookup.trace_id)) if lookup.trace_id else None
    if v7 is not None:
        files = hour_files(root, TRACES_DIR, v7, v7)
        time_cond: list[object] = []
    else:
        files = hour_files(root, TRACES_DIR, since_ns, now_ns)
        time_cond = [since_ns]
    found = _match(con, files, cond + (" AND end_ns >= ?" if time_cond else ""),
                   params + time_cond, limit)
    if not found and v7 is not None:  # an id that only looks like a v7: its spans' hour
        files = hour_files(root, TRACES_DIR, since_ns, now_ns)
        found = _match(con, files, cond + " AND end_ns >= ?", params + [since_ns], limit)
    if not found:
        return []
    ids = list(dict.fromkeys(tid for tid, _ in found))
    marks = ", ".join("?" * len(ids))
    read = (f"SELECT {', '.join(_ROW_COLUMNS)} FROM read_parquet(?, hive_partitioning = true, "
            f"hive_types_autocast = false) WHERE ")
    # DuckDB pushes an equality (and IS NULL) into the scan, so ``spans`` is read only for
    # the rows that pass it; an IN list of several ids is checked after every column was
    # read. So: the lookup's own condition first, the ids after it...
    hit_files = sorted({f for _, f in found})
    rows = con.execute(read + f"{cond} AND trace_id IN ({marks})",
                       [hit_files, *params, *ids]).fetchall()
    if lookup.trace_id is None:
        # ...then the rest of those traces (spans that came in another message: rows
        # without a root, ``name`` null), in the hours they were found in, every rack
        hours = {Path(f).parent.relative_to(Path(f).parent.parent.parent) for f in hit_files}
        more = [str(p) for rd in sorted((root / TRACES_DIR).glob("rack=*")) for h in hours
                for p in sorted((rd / h).glob("*.parquet"))]
        rows += con.execute(read + f"name IS NULL AND trace_id IN ({marks})",
                            [more, *ids]).fetchall()
    traces = merge_rows([dict(zip(_ROW_COLUMNS, r)) for r in rows])
    traces.sort(key=lambda t: t.start_ns, reverse=True)
    return traces[:limit]


def _match(con: duckdb.DuckDBPyConnection, files: list[str], cond: str,
           params: list[object], limit: int) -> list[tuple[str, str]]:
    """(trace id, file) of the newest ``limit`` ids matching ``cond``."""
    if not files:
        return []
    rows = con.execute(
        f"SELECT trace_id, filename, end_ns FROM read_parquet(?, filename = true, "
        f"hive_partitioning = false) WHERE {cond}", [files, *params]).fetchall()
    newest: dict[str, int] = {}
    for tid, _, end in rows:
        newest[tid] = max(end, newest.get(tid, end))
    keep = set(sorted(newest, key=lambda t: newest[t], reverse=True)[:limit])
    return [(tid, f) for tid, f, _ in rows if tid in keep]


def merge_rows(rows: Sequence[dict[str, object]]) -> list[TraceView]:
    """Rows (``_ROW_COLUMNS``) grouped by trace id, spans de-duplicated by span id and
    ordered as a tree (children after their parent, siblings by start)."""
    by_id: dict[str, TraceView] = {}
    seen: dict[str, set[str]] = {}
    for r in rows:
        tid = str(r["trace_id"])
        t = by_id.get(tid)
        if t is None:
            t = by_id[tid] = TraceView(trace_id=tid, rack=str(r["rack"]),
                                       process=_opt(r["process"]), start_ns=int(r["start_ns"]),  # type: ignore[call-overload]
                                       end_ns=int(r["end_ns"]), name=None,  # type: ignore[call-overload]
                                       header=dict.fromkeys(HEADER_COLUMNS))
            seen[tid] = set()
        t.start_ns = min(t.start_ns, int(r["start_ns"]))  # type: ignore[call-overload]
        t.end_ns = max(t.end_ns, int(r["end_ns"]))  # type: ignore[call-overload]
        if r["name"] is not None and t.name is None:  # the row holding the root
            t.name = str(r["name"])
            t.rack = str(r["rack"])
            t.process = _opt(r["process"])
        for c in HEADER_COLUMNS:
            if t.header[c] is None and r[c] is not None:
                t.header[c] = str(r[c])
        for doc in orjson.loads(str(r["spans"])):
            if doc["span_id"] in seen[tid]:
                continue
            seen[tid].add(doc["span_id"])
            t.spans.append(SpanView(
                name=doc["name"], span_id=doc["span_id"], parent_span_id=doc["parent_span_id"],
                kind=doc["kind"], start_ns=doc["start_ns"], end_ns=doc["end_ns"],
                status=doc["status"], attributes=doc["attributes"], rack=str(r["rack"]),
                process=doc.get("process") or _opt(r["process"])))
    for t in by_id.values():
        t.spans = tree_order(t.spans)
    return list(by_id.values())


def _opt(v: object) -> str | None:
    return None if v is None else str(v)


def tree_order(spans: list[SpanView]) -> list[SpanView]:
    """Spans depth-first from the roots (a span whose parent is absent is a root), siblings
    by start time; ``depth`` set."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanView]] = {}
    for s in spans:
        parent = s.parent_span_id if s.parent_span_id in ids else None
        children.setdefault(parent, []).append(s)
    out: list[SpanView] = []
    stack = [(s, 0) for s in sorted(children.get(None, []), key=lambda s: s.start_ns,
                                    reverse=True)]
    while stack:
        s, depth = stack.pop()
        s.depth = depth
        out.append(s)
        for c in sorted(children.get(s.span_id, []), key=lambda s: s.start_ns, reverse=True):
            if c is not s:
                stack.append((c, depth + 1))
    return out


# --- rendering (sans I/O) ------------------------------------------------------------------


def clusters(traces: Sequence[TraceView]) -> list[list[TraceView]]:
    """Traces that overlap in time (within ``SHARED_AXIS_SLACK_NS``) grouped to share one
    time axis (the same terminal:stan through two racks), newest group first."""
    groups: list[list[TraceView]] = []
    end = None
    for t in sorted(traces, key=lambda t: t.start_ns):
        if groups and end is not None and t.start_ns <= end + SHARED_AXIS_SLACK_NS:
            groups[-1].append(t)
            end = max(end, t.end_ns)
        else:
            groups.append([t])
            end = t.end_ns
    groups.reverse()
    return groups


def _header(t: TraceView, width: int) -> list[str]:
    h = t.header
    ts = datetime.fromtimestamp(t.start_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    fields = [f"trace {printable(t.trace_id)}", f"rack={printable(t.rack)}",
              f"total={(t.end_ns - t.start_ns) / 1e6:.2f} ms", f"at={ts}Z"]
    for c in ("token", "terminal", "stan", "mti", "de39", "outcome", "keep"):
        if h.get(c) is not None:
            fields.append(f"{c}={printable(str(h[c]))}")
    lines = [fields[0]]
    for f in fields[1:]:  # wrapped to the terminal, continuation lines indented
        if len(lines[-1]) + 2 + len(f) > width:
            lines.append("   " + f)
        else:
            lines[-1] += "  " + f
    return lines


def waterfall(traces: Sequence[TraceView], width: int = 100) -> str:
    """The traces as terminal waterfalls: per trace a header (id, rack, token, terminal,
    stan, mti, de39, outcome, keep, total), then a line per span: indented by depth, name,
    start offset and duration in ms, a bar on the group's time axis, and rack/process when
    the group holds more than one."""
    out: list[str] = []
    for group in clusters(traces):
        t0 = min(t.start_ns for t in group)
        total = max(max(t.end_ns for t in group) - t0, 1)
        names = {id(s): printable(s.name) for t in group for s in t.spans}
        whos = {(s.rack, s.process) for t in group for s in t.spans}
        show_who = len(whos) > 1
        name_w = min(max((2 * s.depth + len(names[id(s)]) for t in group for s in t.spans),
                         default=10), 40)
        who_w = max((len(_who(r, p)) for r, p in whos), default=0) if show_who else 0
        bar_w = max(width - (2 + name_w + 2 + 9 + 1 + 9 + 2 + 2) - (who_w + 2 if show_who
                                                                     else 0), 10)
        if len(group) > 1:
            out.append(f"== {len(group)} traces on one time axis "
                       f"({total / 1e6:.2f} ms) ==")
        for t in group:
            out.extend(_header(t, width))
            for s in t.spans:
                off = s.start_ns - t0
                dur = max(s.end_ns - s.start_ns, 0)
                a = min(int(off / total * bar_w), bar_w - 1)
                b = max(a + 1, min(round((off + dur) / total * bar_w), bar_w))
                bar = " " * a + "█" * (b - a) + " " * (bar_w - b)
                label = ("  " * s.depth + names[id(s)])[:name_w]
                line = (f"  {label:<{name_w}}  {off / 1e6:>7.2f}ms {dur / 1e6:>7.2f}ms  "
                        f"|{bar}|")
                if show_who:
                    line += f"  {_who(s.rack, s.process)}"
                if s.status == "ERROR":
                    line += "  !error"
                out.append(line)
            out.append("")
    return "\n".join(out)


def _who(rack: str, process: str | None) -> str:
    """``rack/process`` as a waterfall line shows it (printable)."""
    return printable(f"{rack}/{process or '-'}")


# --- logs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRecord:
    """One stored or live log record."""

    ts: int
    level: str
    rack: str
    process: str
    logger: str
    msg: str
    exc: str | None

    def key(self) -> tuple[object, ...]:
        """What makes a record the same when seen stored and live."""
        return (self.rack, self.ts, self.process, self.logger, self.msg)


def levels_from(level: str) -> tuple[str, ...]:
    """The levels at or above ``level``.

    Raises:
        ValueError: not a level.
    """
    u = level.upper()
    if u == "WARN":
        u = "WARNING"
    if u not in LEVELS:
        raise ValueError(f"invalid level {level!r} (expected one of "
                         f"{', '.join(x.lower() for x in LEVELS)})")
    return LEVELS[LEVELS.index(u):]


def record_matches(r: LogRecord, levels: Sequence[str], grep: str | None) -> bool:
    """``r`` passes the level and the (case-insensitive) text filter."""
    if r.level not in levels:
        return False
    if grep:
        g = grep.lower()
        return g in r.msg.lower() or (r.exc is not None and g in r.exc.lower())
    return True


def read_logs(con: duckdb.DuckDBPyConnection, root: Path, since_ns: int, now_ns: int,
              rack: str | None, levels: Sequence[str], grep: str | None) -> list[LogRecord]:
    """Stored records from ``since_ns`` (of ``rack`` or all), oldest first."""
    files = hour_files(root, LOGS_DIR, since_ns, now_ns, None if rack is None else [rack])
    if not files:
        return []
    sql = ("SELECT ts, level, rack, process, logger, msg, exc FROM read_parquet(?, "
           "hive_partitioning = true, hive_types_autocast = false) WHERE ts >= ? "
           f"AND level IN ({', '.join('?' * len(levels))})")  # pushed into the scan
    params: list[object] = [files, since_ns, *levels]
    if grep:
        sql += " AND (contains(lower(msg), ?) OR contains(lower(coalesce(exc, '')), ?))"
        params += [grep.lower(), grep.lower()]
    rows = con.execute(sql + " ORDER BY ts, rack", params).fetchall()
    return [LogRecord(ts=r[0], level=r[1], rack=r[2], process=r[3], logger=r[4], msg=r[5],
                      exc=r[6]) for r in rows]


def log_line(r: LogRecord) -> str:
    """``ts level rack process logger: msg`` (the traceback indented below, one line of it
    per line): every stored text printable (module doc), so a record's header is one line."""
    ts = datetime.fromtimestamp(r.ts / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    line = (f"{ts}Z {printable(r.level):<8} {printable(r.rack)} {printable(r.process)} "
            f"{printable(r.logger)}: {printable(r.msg)}")
    if r.exc:
        line += "\n" + "\n".join("    " + printable(x) for x in r.exc.rstrip().splitlines())
    return line


__all__ = ["HEADER_COLUMNS", "LogRecord", "Lookup", "TraceLookupError", "SpanView", "TraceView",
           "clusters", "find_traces", "hour_files", "levels_from", "log_line", "merge_rows",
           "parse_lookup", "read_logs", "readonly", "record_matches", "tree_order",
           "waterfall"]
