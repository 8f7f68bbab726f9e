"""Fleet rollups: one row per rack and process, and the Parquet files they are kept in.

Theory of operation
-------------------
Every 10 s the fleet process takes one row per rack and process from the latest snapshots
(``rows``); every 10 minutes it writes what it gathered to
``rollups/<yyyy-mm-dd>/<hhmm>.parquet`` (UTC, the time passed in), zstd-compressed, typed by
``SCHEMA`` so DuckDB reads ``ts`` as a timestamp with time zone and every figure as BIGINT
or DOUBLE even when a whole file has no value for it.

A file appears whole or not at all: it is written to a hidden temporary name in the same
directory, fsynced, renamed, and the directory fsynced. A file of the same minute is never
replaced (a restart within a minute would lose its rows): the new one is named
``<hhmm>-2.parquet``, ``-3``... which ``read_parquet('rollups/*/*.parquet')`` reads alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from mixer.durable import fsync_dir
from mixer.fleetsnap import Snapshot

_TS = pa.timestamp("us", tz="UTC")

#: rollup columns: time of the rollup, the process, then what its latest row held
SCHEMA = pa.schema([
    ("ts", _TS),  # when the rollup was taken (the hub's clock)
    ("rack", pa.string()),
    ("process", pa.string()),
    ("role", pa.string()),
    ("pid", pa.int64()),
    ("frames_in", pa.int64()),  # cumulative since the process started
    ("frames_out", pa.int64()),
    ("in_per_s", pa.float64()),  # over the rack's last telemetry interval
    ("out_per_s", pa.float64()),
    ("errors", pa.int64()),  # cumulative
    ("bytes_in", pa.int64()),
    ("bytes_out", pa.int64()),
    ("ring_full_waits", pa.int64()),
    ("cpu_pct", pa.float64()),  # over the rack's last telemetry interval; 100 = one core
    ("rss", pa.int64()),  # bytes
    ("ring_fill", pa.float64()),  # 0..1
    ("p50_ns", pa.int64()),  # frame age percentiles over the rack's last interval
    ("p99_ns", pa.int64()),
    ("hub_backlog", pa.int64()),  # the rack's, repeated on each of its rows
    ("snapshot_ts", _TS),  # the rack's own timestamp of the snapshot (its clock)
    ("age_s", pa.float64()),  # snapshot age at the rollup (the hub's clock)
])

_FIGURES = ("pid", "frames_in", "frames_out", "in_per_s", "out_per_s", "errors", "bytes_in",
            "bytes_out", "ring_full_waits", "cpu_pct", "rss", "ring_fill", "p50_ns", "p99_ns")


def rows(snapshots: Iterable[Snapshot], now_ns: int, max_age_ns: int) -> list[dict[str, Any]]:
    """One row per rack and process of the snapshots received within ``max_age_ns`` of
    ``now_ns`` (an offline rack's last figures are not repeated into history).

    Times are ns since the epoch (``ts``, ``snapshot_ts``); ``rollup_table`` converts.
    """
    out = []
    for snap in snapshots:
        age_ns = now_ns - snap.received_ns
        if age_ns > max_age_ns:
            continue
        for p in snap.processes:
            row: dict[str, Any] = {"ts": now_ns, "rack": snap.rack, "process": p.name,
                                   "role": p.role}
            for key in _FIGURES:
                row[key] = getattr(p, key)
            row.update(hub_backlog=snap.hub_backlog, snapshot_ts=snap.ts_ns,
                       age_s=age_ns / 1e9)
            out.append(row)
    return out


def rollup_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (``rows``' dicts) as an Arrow table of ``SCHEMA``; a missing key is null."""
    columns = []
    for field in SCHEMA:
        values = [r.get(field.name) for r in rows]
        if field.type == _TS:  # ns since the epoch -> us
            values = [None if v is None else v // 1000 for v in values]
        columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def rollup_path(directory: Path, now_ns: int) -> Path:
    """``<directory>/rollups/<yyyy-mm-dd>/<hhmm>.parquet`` for ``now_ns`` (UTC)."""
    t = datetime.fromtimestamp(now_ns / 1e9, UTC)
    return directory / "rollups" / t.strftime("%Y-%m-%d") / t.strftime("%H%M.parquet")


def write_parquet(rows: Sequence[Mapping[str, Any]] | pa.Table, directory: Path,
                  now_ns: int) -> Path:
    """Write rollup rows to ``rollups/<yyyy-mm-dd>/<hhmm>.parquet`` under ``directory``,
    atomically (temporary file, fsync, rename, directory fsync).

    Args:
        rows: rollup rows, or a table of ``SCHEMA`` (``rollup_table``: a shell gathering
            10 minutes of a large fleet can convert each batch as it comes).
        directory: the fleet's data directory.
        now_ns: the time naming the file (ns since the epoch, UTC).

    Returns:
        The file written; ``<hhmm>-<n>.parquet`` when a file of that minute exists.
    """
    table = rows if isinstance(rows, pa.Table) else rollup_table(rows)
    target = rollup_path(directory, now_ns)
    day = target.parent
    new_day = not day.is_dir()
    day.mkdir(parents=True, exist_ok=True)
    if new_day:
        fsync_dir(day.parent)
    n = 1
    while target.exists():  # one writer (the fleet process): no race to guard
        n += 1
        target = day / f"{rollup_path(directory, now_ns).stem}-{n}.parquet"
    tmp = day / f".{target.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(day)
    return target
