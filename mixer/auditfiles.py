"""The audit trail on disk: Parquet parts in a hive layout and one chain index per rack and
stream.

Layout (under the hub's ``audit/`` directory)::

    <stream>/rack=<id>/date=YYYY-MM-DD/hour=HH/part-<first seq>-<last seq>.parquet
    _chain/<stream>/<id>.json          the chain index (below)

A part holds rows of one rack and stream and one hour of the events' own time (UTC), in the
rack's sequence order; its Parquet footer carries ``fluxrig.audit`` (JSON: stream, rack,
first, last, count, prev, head — the chain head before its first row and after its last).
Names starting with ``.`` or ``_`` are not data (Spark, Athena and the views skip them).

Theory of operation (what survives a crash)
-------------------------------------------
The chain index (``ChainIndex``) is the archiver's truth: which parts exist, the last
archived sequence and chain head, gaps it saw, retention cuts. It is replaced atomically
(``mixer.durable.replace_file``). A part is written to ``.<name>.tmp``, fsynced, *then*
listed in the index as ``pending``, then renamed; only after that are its messages acked.
At start ``recover`` finishes what a crash interrupted: a pending part whose temporary file
exists is renamed (it was whole: fsynced before it was listed); a temporary file not listed
is deleted (it was never promised). So a crash before the index write loses nothing (the
messages were not acked: they come again), and one after it duplicates nothing (their
sequences are at or below ``last``: skipped).

Compaction (``compact``) follows the same rule: the merged part is written and fsynced, the
index is replaced with ``compacting`` naming it and the parts it replaces, it is renamed,
the index is replaced again without them and with them in ``deleting``, and they are
deleted; ``recover`` completes or undoes a compaction it finds half-done and deletes what
``deleting`` names (a retention cut lists its parts there too). A temporary index file a
crash left is deleted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from mixer.auditrow import GENESIS, SCHEMA, SCHEMA_VERSION
from mixer.durable import fsync_dir, make_dirs, replace_file

AUDIT_DIR: Final = "audit"
INDEX_DIR: Final = "_chain"
META_KEY: Final = b"fluxrig.audit"
PART_RE: Final = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
STATS_COLUMNS: Final = [f.name for f in SCHEMA if f.name not in ("cbor", "chain")]
ROW_GROUP: Final = 131_072  # rows per row group: big enough for zstd, small enough to prune


class AuditFileError(RuntimeError):
    """An audit file or index that cannot be read or is not what it says (path named)."""


def hour_dir(root: Path, stream: str, rack: str, ts_ns: int) -> Path:
    """The partition directory of an event of ``rack``'s ``stream`` at ``ts_ns`` (UTC)."""
    t = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return root / stream / f"rack={rack}" / f"date={t:%Y-%m-%d}" / f"hour={t:%H}"


def hour_key(ts_ns: int) -> int:
    """The hour (since the epoch) an event's time falls in: what splits parts."""
    return ts_ns // 3_600_000_000_000


def part_name(first: int, last: int) -> str:
    """A part's file name."""
    return f"part-{first}-{last}.parquet"


def index_path(root: Path, stream: str, rack: str) -> Path:
    """Where the chain index of ``rack``'s ``stream`` lives."""
    return root / INDEX_DIR / stream / f"{rack}.json"


@dataclass(slots=True, kw_only=True)
class PartEntry:
    """One part as the index lists it (``path`` relative to the audit root)."""

    path: str
    first: int
    last: int
    count: int
    prev: str   # hex chain head before the first row
    head: str   # hex chain head after the last row
    hub_last: int = 0

    def as_json(self) -> dict[str, Any]:
        """The entry as stored."""
        return {"path": self.path, "first": self.first, "last": self.last,
                "count": self.count, "prev": self.prev, "head": self.head,
                "hub_last": self.hub_last}


@dataclass(slots=True, kw_only=True)
class ChainIndex:
    """The chain of one rack's stream (see module doc)."""

    stream: str
    rack: str
    start_seq: int = 0               # first sequence the chain covers (0: none yet)
    start_prev: str = GENESIS.hex()  # head before it: genesis, or where retention cut
    last: int = 0                    # last archived sequence
    head: str = GENESIS.hex()        # chain head after it
    hub_last: int = 0                # the hub copy's sequence of that event
    parts: list[PartEntry] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)   # parts whose rename may be undone
    compacting: dict[str, Any] | None = None
    deleting: list[str] = field(default_factory=list)  # parts the index let go: delete them
    gaps: list[dict[str, Any]] = field(default_factory=list)   # {from, to, seen}
    cuts: list[dict[str, Any]] = field(default_factory=list)   # retention: {through, head..}

    def as_json(self) -> dict[str, Any]:
        """The index as stored."""
        return {"version": SCHEMA_VERSION, "stream": self.stream, "rack": self.rack,
                "start_seq": self.start_seq, "start_prev": self.start_prev,
                "last": self.last, "head": self.head, "hub_last": self.hub_last,
                "parts": [p.as_json() for p in self.parts], "pending": self.pending,
                "compacting": self.compacting, "deleting": self.deleting, "gaps": self.gaps,
                "cuts": self.cuts}

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: Path) -> ChainIndex:
        """Parse a stored index.

        Raises:
            AuditFileError: not an index of this version.
        """
        try:
            if doc.get("version") != SCHEMA_VERSION:
                raise AuditFileError(f"{where}: unknown chain index version "
                                     f"{doc.get('version')!r}")
            return cls(stream=doc["stream"], rack=doc["rack"], start_seq=doc["start_seq"],
                       start_prev=doc["start_prev"], last=doc["last"], head=doc["head"],
                       hub_last=doc.get("hub_last", 0),
                       parts=[PartEntry(**p) for p in doc["parts"]],
                       pending=list(doc.get("pending", [])),
                       compacting=doc.get("compacting"),
                       deleting=list(doc.get("deleting", [])), gaps=list(doc.get("gaps", [])),
                       cuts=list(doc.get("cuts", [])))
        except (KeyError, TypeError) as exc:
            raise AuditFileError(f"{where}: not a chain index: {exc!r}") from None


def load_index(root: Path, stream: str, rack: str) -> ChainIndex:
    """The chain index of ``rack``'s ``stream`` (an empty one when there is none yet).

    Raises:
        AuditFileError: the file exists but cannot be read.
    """
    path = index_path(root, stream, rack)
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return ChainIndex(stream=stream, rack=rack)
    except (OSError, orjson.JSONDecodeError) as exc:
        raise AuditFileError(f"{path}: unreadable chain index: {exc}") from None
    return ChainIndex.from_json(doc, path)


def save_index(root: Path, index: ChainIndex) -> None:
    """Replace the chain index atomically."""
    path = index_path(root, index.stream, index.rack)
    if not path.parent.is_dir():
        make_dirs(path.parent)
    replace_file(path, orjson.dumps(index.as_json()))


def tmp_of(path: Path) -> Path:
    """The temporary name a part is written under."""
    return path.with_name(f".{path.name}.tmp")


def write_tmp(root: Path, rel: str, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write ``table`` (zstd) with ``meta`` in its footer to the temporary name of part
    ``rel``, fsynced; the final path (not there yet)."""
    path = root / rel
    if not path.parent.is_dir():
        make_dirs(path.parent)
    tmp = tmp_of(path)
    table = table.replace_schema_metadata({META_KEY: orjson.dumps(meta)})
    with open(tmp, "wb") as f:
        # no min/max statistics for the raw bytes: they would put two events' bytes in
        # clear in the (uncompressed) footer
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP,
                       write_statistics=STATS_COLUMNS,
                       use_dictionary=["stream", "kind", "src", "mti", "pcode",
                                       "currency", "de39", "outcome", "issuer", "route"])
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)  # the temporary file's name is durable before the index lists it
    return path


def promote(path: Path) -> None:
    """Rename a written part's temporary file to its name, durably."""
    os.rename(tmp_of(path), path)
    fsync_dir(path.parent)


def part_meta(path: Path) -> dict[str, Any]:
    """The ``fluxrig.audit`` footer of a part.

    Raises:
        AuditFileError: unreadable, or not a part of this archive.
    """
    try:
        meta = pq.read_metadata(path).metadata or {}
        return dict(orjson.loads(meta[META_KEY]))
    except (OSError, KeyError, pa.ArrowException, orjson.JSONDecodeError) as exc:
        raise AuditFileError(f"{path}: not an audit part: {exc}") from None


def recover(root: Path, index: ChainIndex) -> list[str]:
    """Finish what a crash interrupted (module doc); what was done, for the log.

    Raises:
        AuditFileError: a pending part is gone with its temporary file (someone deleted it).
    """
    done: list[str] = []
    dirty = bool(index.pending or index.deleting)
    for rel in index.pending:
        path = root / rel
        if tmp_of(path).exists():
            promote(path)
            done.append(f"renamed {rel}")
        elif not path.exists():
            raise AuditFileError(f"{path}: listed in the chain index but neither it nor its "
                                 f"temporary file exists")
    index.pending = []
    if index.compacting is not None:
        into = root / index.compacting["into"]
        olds = set(index.compacting["parts"])
        listed = {p.path for p in index.parts}
        if into.exists() or tmp_of(into).exists():
            if tmp_of(into).exists():
                promote(into)
            if index.compacting["into"] not in listed:
                _apply_compaction(index, index.compacting)
            index.deleting = sorted(set(index.deleting) | olds)
            done.append(f"completed compaction into {index.compacting['into']}")
        index.compacting = None
    for rel in index.deleting:  # let go by a compaction or retention cut: finish deleting
        if (root / rel).exists():
            (root / rel).unlink()
            done.append(f"deleted {rel} (no longer listed)")
    index.deleting = []
    for rack_dir in _rack_dirs(root, index):
        for tmp in rack_dir.rglob(".part-*.tmp"):
            tmp.unlink()
            done.append(f"deleted unlisted {tmp.name}")
    ipath = index_path(root, index.stream, index.rack)
    for tmp in ipath.parent.glob(f".{ipath.name}.*.tmp"):  # an index write a crash cut
        tmp.unlink()
        done.append(f"deleted {tmp.name}")
    if done or dirty:
        save_index(root, index)
    return done


def _rack_dirs(root: Path, index: ChainIndex) -> Iterator[Path]:
    d = root / index.stream / f"rack={index.rack}"
    if d.is_dir():
        yield d


def _apply_compaction(index: ChainIndex, plan: dict[str, Any]) -> None:
    olds = set(plan["parts"])
    kept = [p for p in index.parts if p.path not in olds]
    kept.append(PartEntry(**plan["entry"]))
    kept.sort(key=lambda p: p.first)
    index.parts = kept


def compact(root: Path, index: ChainIndex, parts: list[PartEntry]) -> PartEntry:
    """Merge ``parts`` (of one hour partition) into one part, crash-safe (module doc).

    Returns:
        The merged part's entry.
    """
    parts = sorted(parts, key=lambda p: p.first)
    tables = [pq.read_table(root / p.path) for p in parts]
    table = pa.concat_tables(tables).sort_by("seq")
    seqs = table.column("seq")
    first, last = seqs[0].as_py(), seqs[-1].as_py()
    rel = str(Path(parts[0].path).parent / part_name(first, last))
    # (never one of ``parts``' names: two or more parts cover more than any one of them)
    entry = PartEntry(path=rel, first=first, last=last, count=table.num_rows,
                      prev=parts[0].prev, head=max(parts, key=lambda p: p.last).head,
                      hub_last=max(p.hub_last for p in parts))
    meta = {"stream": index.stream, "rack": index.rack, "first": first, "last": last,
            "count": entry.count, "prev": entry.prev, "head": entry.head}
    write_tmp(root, rel, table.drop_columns([]), meta)
    plan = {"into": rel, "parts": [p.path for p in parts], "entry": entry.as_json()}
    index.compacting = plan
    save_index(root, index)
    promote(root / rel)
    _apply_compaction(index, plan)
    index.compacting = None
    index.deleting = [p.path for p in parts]
    save_index(root, index)
    for p in parts:
        (root / p.path).unlink(missing_ok=True)
    return entry


__all__ = ["AUDIT_DIR", "AuditFileError", "ChainIndex", "INDEX_DIR", "META_KEY", "PART_RE",
           "PartEntry", "compact", "hour_dir", "hour_key", "index_path", "load_index",
           "part_meta", "part_name", "promote", "recover", "save_index", "tmp_of",
           "write_tmp"]
