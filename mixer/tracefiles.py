"""Traces and logs on disk: Parquet parts in a hive layout, their compaction and retention.
Blocking file I/O only (no asyncio, no NATS): the ``traces`` process runs these in a thread;
tests and the bench call them directly with their own clock.

Layout (under the hub's data dir)::

    traces/rack=<id>/date=YYYY-MM-DD/hour=HH/part-<ns>-<n>.parquet     one row per trace
    logs/rack=<id>/date=YYYY-MM-DD/hour=HH/part-<ns>-<n>.parquet       one row per record
    .../hour=HH/compact-<ns>.parquet                                    a closed hour merged

Columns: ``mixer.tracerows.TRACE_COLUMNS`` and ``LOG_COLUMNS``; ``rack``, ``date`` and
``hour`` are in the path only (hive partitions: Spark and Arrow refuse a column that is in
both, as in the audit trail). Every part's footer holds ``fluxrig.telemetry`` (JSON: kind,
rack, rows; a compacted part also ``replaces``, the names of the parts it merged). zstd, no
statistics for the big text columns (``spans``, ``msg``, ``exc``).

Theory of operation (what survives a crash)
-------------------------------------------
Telemetry is best effort: rows wait in the process's memory up to ``traces.flush`` seconds,
and a crash (or SIGKILL) loses them; nothing is acked or replayed. What is on disk is never
half a file:

* a part is written as ``.<name>.tmp``, fsynced, renamed, and its directory fsynced;
  ``recover`` (at start) deletes any ``.tmp`` a crash left;
* compaction writes ``compact-<ns>.parquet`` the same way, its footer naming the parts it
  replaces, and only then deletes them; ``recover`` deletes replaced parts a crash left
  beside it. Between the rename and the deletes a reader may see a row twice: queries
  merge spans by span id, so a duplicate row changes nothing;
* retention deletes whole ``date=`` directories older than the retention, oldest first; a
  crash half-way leaves an older day partly there, deleted at the next turn.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

import orjson
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from mixer.durable import atomic_file, fsync_dir, make_dirs
from mixer.tracelayout import HOUR_NS, LOGS_DIR, TRACES_DIR
from mixer.tracerows import LOG_COLUMNS, TRACE_COLUMNS

KINDS: Final = (TRACES_DIR, LOGS_DIR)
META_KEY: Final = b"fluxrig.telemetry"
ROW_GROUP: Final = 32_768  # rows per row group: a token lookup skips the others' spans
COMPACT_READ: Final = 65_536  # rows buffered while merging (bounded memory per rack-hour)

_STR = pa.string()
_I64 = pa.int64()
TRACE_SCHEMA: Final = pa.schema(
    [pa.field(c, _I64 if c in ("start_ns", "end_ns", "duration_us") else
              pa.int32() if c == "span_count" else _STR) for c in TRACE_COLUMNS])
LOG_SCHEMA: Final = pa.schema([pa.field(c, _I64 if c == "ts" else _STR) for c in LOG_COLUMNS])
SCHEMAS: Final = {TRACES_DIR: TRACE_SCHEMA, LOGS_DIR: LOG_SCHEMA}
_NO_STATS: Final = {"spans", "msg", "exc"}
_DICT: Final = ["process", "name", "de39", "outcome", "keep", "mti", "issuer", "route",
                "level", "logger"]


class TelemetryFileError(RuntimeError):
    """A telemetry part that cannot be written or read (the path is named)."""


def hour_dir(root: Path, kind: str, rack: str, ts_ns: int) -> Path:
    """The partition directory of ``kind`` (``traces``/``logs``) for ``rack`` at ``ts_ns``."""
    t = datetime.fromtimestamp(ts_ns // 10**9, UTC)
    return root / kind / f"rack={rack}" / f"date={t:%Y-%m-%d}" / f"hour={t:%H}"


def hour_start_ns(path: Path) -> int:
    """Start of the hour a partition directory ``.../date=D/hour=H`` holds (ns)."""
    day = datetime.strptime(path.parent.name.removeprefix("date="), "%Y-%m-%d")
    hour = int(path.name.removeprefix("hour="))
    return int((day.replace(tzinfo=UTC) + timedelta(hours=hour)).timestamp()) * 10**9


def _stats_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.name not in _NO_STATS]


def _write(path: Path, table: pa.Table, meta: dict[str, object]) -> None:
    """``table`` to ``path`` through ``.<name>.tmp``, fsynced, renamed, directory fsynced."""
    if not path.parent.is_dir():
        make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    table = table.replace_schema_metadata({META_KEY: orjson.dumps(meta)})
    with atomic_file(path, tmp) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP,
                       write_statistics=_stats_columns(table.schema),
                       use_dictionary=[c for c in _DICT if c in table.schema.names])


class PartNamer:
    """Unique part names: the writer's start time and a counter (a restart starts a new
    time, so names never repeat)."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns):
        self.start = clock_ns()
        self.n = 0

    def next(self) -> str:
        """A new part name."""
        self.n += 1
        return f"part-{self.start}-{self.n}.parquet"


def write_part(root: Path, kind: str, rack: str, hour_ns: int,
               rows: Sequence[dict[str, object]], name: str) -> Path:
    """Write ``rows`` (dicts of ``kind``'s columns) of ``rack``'s hour at ``hour_ns`` as one
    part, crash-safe (module doc); its path.

    Raises:
        OSError: the disk refused (full, read-only): the rows are lost, the caller logs it.
    """
    schema = SCHEMAS[kind]
    table = pa.Table.from_pylist(list(rows), schema=schema)
    path = hour_dir(root, kind, rack, hour_ns) / name
    _write(path, table, {"kind": kind, "rack": rack, "rows": table.num_rows})
    return path


def part_meta(path: Path) -> dict[str, object]:
    """A part's ``fluxrig.telemetry`` footer ({} when it has none).

    Raises:
        TelemetryFileError: not a readable Parquet file.
    """
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise TelemetryFileError(f"{path}: not a Parquet part: {exc}") from None
    raw = meta.get(META_KEY)
    return dict(orjson.loads(raw)) if raw else {}


def hour_dirs(root: Path, kind: str) -> Iterator[Path]:
    """Every ``rack=/date=/hour=`` directory of ``kind``."""
    base = root / kind
    if not base.is_dir():
        return
    for rack in sorted(base.glob("rack=*")):
        for day in sorted(rack.glob("date=*")):
            for hour in sorted(day.glob("hour=*")):
                if hour.is_dir():
                    yield hour


def _parts(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and
                  not p.name.startswith("."))


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered:
    """What ``recover`` found and did."""

    tmp_deleted: int
    replaced_deleted: int


def recover(root: Path) -> Recovered:
    """At start: delete temporary files a crash left, and parts a compaction replaced but
    a crash kept from deleting (module doc)."""
    tmps = replaced = 0
    for kind in KINDS:
        for d in hour_dirs(root, kind):
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                tmps += 1
            parts = _parts(d)
            compacts = [p for p in parts if p.name.startswith("compact-")]
            if not compacts or len(parts) == len(compacts) == 1:
                continue
            names = {p.name for p in parts}
            for c in compacts:
                replaces = part_meta(c).get("replaces")
                for old in replaces if isinstance(replaces, list) else []:
                    if old in names and old != c.name:
                        (d / old).unlink(missing_ok=True)
                        names.discard(old)
                        replaced += 1
    return Recovered(tmp_deleted=tmps, replaced_deleted=replaced)


def compact_hour(d: Path, kind: str, clock_ns: Callable[[], int] = time.time_ns) -> Path | None:
    """Merge every part of partition ``d`` into one ``compact-<ns>.parquet`` (rows in the
    parts' order, row groups of ``ROW_GROUP``), then delete them; crash-safe (module doc).
    None when there is nothing to merge (fewer than two parts).

    Raises:
        TelemetryFileError: a part cannot be read.
        OSError: the merged part cannot be written (the parts stay).
    """
    parts = _parts(d)
    if len(parts) < 2:
        return None
    schema = SCHEMAS[kind]
    rack = d.parent.parent.name.removeprefix("rack=")
    path = d / f"compact-{clock_ns()}.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    meta = {"kind": kind, "rack": rack, "replaces": [p.name for p in parts]}
    with atomic_file(path, tmp) as f:
        writer = pq.ParquetWriter(
            f, schema.with_metadata({META_KEY: orjson.dumps(meta)}),
            compression="zstd", write_statistics=_stats_columns(schema),
            use_dictionary=[c for c in _DICT if c in schema.names])
        pending: list[pa.RecordBatch] = []
        held = 0
        for p in parts:
            try:
                table = pq.read_table(p, schema=schema)
            except (OSError, pa.ArrowException) as exc:
                raise TelemetryFileError(f"{p}: unreadable part: {exc}") from None
            rows += table.num_rows
            for batch in table.to_batches():
                pending.append(batch)
                held += batch.num_rows
            if held >= COMPACT_READ:
                _flush_groups(writer, schema, pending)
                pending, held = [], 0
        _flush_groups(writer, schema, pending)
        writer.close()
    for p in parts:
        p.unlink(missing_ok=True)
    fsync_dir(d)
    return path


def _flush_groups(writer: pq.ParquetWriter, schema: pa.Schema,
                  batches: list[pa.RecordBatch]) -> None:
    if batches:
        writer.write_table(pa.Table.from_batches(batches, schema=schema),
                           row_group_size=ROW_GROUP)


def compact_due(root: Path, now_ns: int, after_s: float) -> list[tuple[str, Path]]:
    """Partitions to compact: hours that ended ``after_s`` ago or more and hold two parts
    or more, as (kind, directory)."""
    due = []
    for kind in KINDS:
        for d in hour_dirs(root, kind):
            if hour_start_ns(d) + HOUR_NS + int(after_s * 1e9) > now_ns:
                continue
            n = sum(1 for p in d.iterdir() if p.suffix == ".parquet"
                    and not p.name.startswith("."))
            if n >= 2:
                due.append((kind, d))
    return due


def retention_cut(now_ns: int, retention_s: float) -> date:
    """The first day kept: a ``date=`` directory before it holds only rows older than the
    retention."""
    return (datetime.fromtimestamp(now_ns // 10**9, UTC) - timedelta(seconds=retention_s)).date()


def retain(root: Path, now_ns: int, retention_s: float) -> list[Path]:
    """Delete the ``date=`` directories (traces and logs, every rack) before the cut,
    oldest first; those deleted."""
    keep_from = retention_cut(now_ns, retention_s).isoformat()
    gone = []
    for kind in KINDS:
        base = root / kind
        if not base.is_dir():
            continue
        days = sorted(((d.name.removeprefix("date="), d) for r in base.glob("rack=*")
                       for d in r.glob("date=*")), key=lambda x: x[0])
        for day, d in days:
            if day >= keep_from:
                break
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        for r in base.glob("rack=*"):
            try:
                r.rmdir()  # a rack with nothing left
            except OSError:
                pass
    return gone


__all__ = ["HOUR_NS", "KINDS", "LOGS_DIR", "LOG_SCHEMA", "META_KEY", "PartNamer", "Recovered",
           "SCHEMAS", "TRACES_DIR", "TRACE_SCHEMA", "TelemetryFileError", "compact_due",
           "compact_hour", "hour_dir", "hour_dirs", "hour_start_ns", "part_meta", "recover",
           "retain", "retention_cut", "write_part"]
