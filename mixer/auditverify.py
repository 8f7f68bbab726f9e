"""``mixer audit verify``: re-read the archive and prove it is whole and untouched.

For every rack and stream (its chain index, ``mixer.auditfiles``), the parts on disk are
read, their rows put in sequence order and the chain recomputed from the index's start
(genesis, or the head recorded where retention cut it)::

    h_n = SHA-256(h_{n-1} || cbor_n)

Findings (each names the file and, where it applies, the row — its 0-based position in
the file):

* ``tampered``: a row's bytes do not hash to its stored chain value (a flipped byte, an
  edited column) — or its chain value does not follow the row before (a row deleted or
  moved: the next row breaks);
* ``duplicate``: a sequence stored twice;
* ``gap``: sequences missing, with the range, whether the archiver saw it happen (events
  purged on the rack before the hub had them) and whether the rack still holds them;
* ``missing-file`` / ``unlisted-file``: the index and the directory disagree;
* ``misplaced``: a part whose footer, rows or name say another rack, stream or range
  (a swapped or renamed file);
* ``count``: a footer or index entry whose row count is not the file's;
* ``head``: the chain does not end where the index says (the newest rows gone);
* ``leak``: a run of 13-19 digits passing the Luhn check in an event (a clear card number).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from gears.coatcheck import luhn_valid
from mixer.auditfiles import (
    INDEX_DIR,
    PART_RE,
    AuditFileError,
    ChainIndex,
    PartEntry,
    load_index,
    part_meta,
)
from mixer.auditrow import GENESIS, SCHEMA, Batch

#: (rack, stream) -> (first, last) sequence the rack's stream holds now, or None: unknown
Holds = Callable[[str, str], tuple[int, int] | None]
_DIGITS = re.compile(rb"(?<![0-9])[0-9]{13,19}(?![0-9])")


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One thing wrong (module doc)."""

    kind: str
    rack: str
    stream: str
    detail: str
    file: str | None = None
    row: int | None = None

    def line(self) -> str:
        """One line for the terminal."""
        where = f" file={self.file}" if self.file else ""
        row = f" row={self.row}" if self.row is not None else ""
        return f"{self.kind}: rack={self.rack} stream={self.stream}{where}{row}: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        """The finding as a JSON object."""
        return {"kind": self.kind, "rack": self.rack, "stream": self.stream,
                "file": self.file, "row": self.row, "detail": self.detail}


@dataclass(slots=True)
class ChainReport:
    """What ``verify`` found for one rack's stream."""

    rack: str
    stream: str
    files: int = 0
    rows: int = 0
    first: int = 0
    last: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return {"rack": self.rack, "stream": self.stream, "files": self.files,
                "rows": self.rows, "first": self.first, "last": self.last,
                "ok": not self.findings, "findings": [f.as_json() for f in self.findings]}


def chains(root: Path, rack: str | None = None) -> list[tuple[str, str]]:
    """(stream, rack) of every chain in the archive (its index, or parts without one)."""
    found: set[tuple[str, str]] = set()
    for path in (root / INDEX_DIR).glob("*/*.json"):
        found.add((path.parent.name, path.stem))
    for d in root.glob("*/rack=*"):
        if d.is_dir() and not d.parent.name.startswith(("_", ".")):
            found.add((d.parent.name, d.name.removeprefix("rack=")))
    return sorted(c for c in found if rack is None or c[1] == rack)


def verify(root: Path, rack: str | None = None, since: str | None = None,
           holds: Holds | None = None) -> list[ChainReport]:
    """Check every chain of the archive under ``root`` (module doc).

    Args:
        root: the hub's ``audit/`` directory.
        rack: only this rack's chains.
        since: only parts of days from ``YYYY-MM-DD`` on (the chain taken up from the head
            before the first of them).
        holds: asks what a rack's stream still holds (for gaps); None: not asked.
    """
    return [verify_chain(root, stream, r, since, holds) for stream, r in chains(root, rack)]


def _date_of(rel: str) -> str:
    return Path(rel).parent.parent.name.removeprefix("date=")


def verify_chain(root: Path, stream: str, rack: str, since: str | None = None,
                 holds: Holds | None = None) -> ChainReport:
    """Check one rack's stream (see ``verify``)."""
    rep = ChainReport(rack=rack, stream=stream)

    def find(kind: str, detail: str, file: str | None = None, row: int | None = None) -> None:
        rep.findings.append(Finding(kind=kind, rack=rack, stream=stream, detail=detail,
                                    file=file, row=row))

    try:
        index = load_index(root, stream, rack)
    except AuditFileError as exc:
        find("index", str(exc))
        index = ChainIndex(stream=stream, rack=rack)
    rack_dir = root / stream / f"rack={rack}"
    on_disk = {str(p.relative_to(root)) for p in rack_dir.rglob("part-*.parquet")}
    listed = {p.path: p for p in index.parts}
    for rel in sorted(on_disk - listed.keys()):
        find("unlisted-file", "a part on disk the chain index does not list", rel)
        _footer_checks(root, rel, index, find)
    parts = sorted(index.parts, key=lambda p: p.first)
    if since:
        parts = [p for p in parts if _date_of(p.path) >= since]
    start_seq, prev = index.start_seq, bytes.fromhex(index.start_prev)
    if since and parts and parts[0].first != index.start_seq:
        start_seq, prev = parts[0].first, bytes.fromhex(parts[0].prev)
    missing: list[PartEntry] = []
    derived: list[Finding] = []  # query columns unlike the bytes (rows with changed bytes
    # say so once, as changed bytes)
    rows: list[tuple[int, bytes, bytes, str, int]] = []  # seq, cbor, chain, file, row
    for entry in parts:
        if entry.path not in on_disk:
            missing.append(entry)
            find("missing-file", f"listed with seq {entry.first}-{entry.last} "
                 f"({entry.count} rows) but not on disk", entry.path)
            continue
        rep.files += 1
        rows += _read_part(root, entry, index, find, derived)
    rep.rows = len(rows)
    rows.sort(key=lambda r: r[0])
    expected = start_seq or (rows[0][0] if rows else 0)
    last_seq = expected - 1
    known_gaps = [(g["from"], g["to"]) for g in index.gaps]
    bounds = {p.path: p for p in parts}
    for seq, cbor, chain, file, i in rows:
        part = bounds[file]
        if seq == part.first and prev.hex() != part.prev and seq != last_seq:
            find("tampered", f"seq {seq}: the part's recorded chain head before it "
                 f"({part.prev[:16]}...) is not the chain's ({prev.hex()[:16]}...)", file, i)
        if seq == last_seq:
            find("duplicate", f"seq {seq} stored twice", file, i)
            continue
        after_gap = seq > last_seq + 1
        if after_gap:
            _gap(find, last_seq + 1, seq - 1, known_gaps, missing, holds, rack, stream)
        if seq < expected:
            find("misplaced", f"seq {seq} is before the chain's start {expected}", file, i)
            continue
        if hashlib.sha256(prev + cbor).digest() != chain:
            if after_gap:
                find("tampered", f"seq {seq}: the chain breaks after the missing events "
                     f"(they were archived, then removed)", file, i)
            else:
                find("tampered", f"seq {seq}: the event's bytes or chain value were "
                     f"changed (they do not hash from the row before)", file, i)
        for m in _DIGITS.finditer(cbor):
            if luhn_valid(m.group().decode()):
                find("leak", f"seq {seq}: a clear card number in the event "
                     f"({len(m.group())} digits at byte {m.start()})", file, i)
        prev = chain  # go on from what is stored: one bad row is one finding
        last_seq = seq
        if seq == part.last and chain.hex() != part.head:
            find("tampered", f"seq {seq}: the part's recorded head ({part.head[:16]}...) is "
                 f"not its last row's chain value", file, i)
    bad = {(f.file, f.row) for f in rep.findings if f.kind == "tampered"}
    rep.findings += [f for f in derived if (f.file, f.row) not in bad]
    if rows:
        rep.first, rep.last = rows[0][0], last_seq
    if not since or (parts and parts[-1].last == index.last):
        if index.last and last_seq < index.last and not (missing and
                                                         missing[-1].last == index.last):
            _gap(find, last_seq + 1, index.last, known_gaps, missing, holds, rack, stream)
        if index.last and rows and last_seq == index.last and prev.hex() != index.head:
            find("head", f"the chain ends at {prev.hex()[:16]}..., the index says "
                 f"{index.head[:16]}...")
    return rep


def _gap(find: Callable[..., None], first: int, last: int, known: list[tuple[int, int]],
         missing: list[PartEntry], holds: Holds | None, rack: str, stream: str) -> None:
    why = []
    for m in missing:
        if m.first <= last and m.last >= first:
            why.append(f"in missing file {m.path}")
    if any(a <= first and last <= b for a, b in known):
        why.append("the archiver saw it: purged before the hub had it")
    if holds is not None:
        held = holds(rack, stream)
        if held is None:
            why.append("the rack could not be asked")
        elif held[0] <= first and last <= held[1]:
            why.append(f"the rack still holds it (its stream has {held[0]}-{held[1]})")
        else:
            why.append(f"the rack no longer holds it (its stream has {held[0]}-{held[1]})")
    find("gap", f"missing seq {first}-{last} ({last - first + 1} events)"
         + (f"; {'; '.join(why)}" if why else ""))


#: columns derived from an event's bytes: rebuilt and compared, so an edited query column
#: (an amount, a DE39) is caught although the chain covers the bytes only
DERIVED = tuple(f.name for f in SCHEMA if f.name not in ("seq", "hub_seq", "stream", "cbor",
                                                         "chain"))


def _differs(a: pa.ChunkedArray, b: pa.Array) -> list[int]:
    if a.equals(pa.chunked_array([b])):
        return []
    if pa.types.is_timestamp(a.type):
        a, b = a.cast(pa.int64()), b.cast(pa.int64())
    return [i for i, (x, y) in enumerate(zip(a.to_pylist(), b.to_pylist(), strict=False))
            if x != y]


def _footer_checks(root: Path, rel: str, index: ChainIndex,
                   find: Callable[..., None]) -> dict[str, Any] | None:
    try:
        meta = part_meta(root / rel)
    except AuditFileError as exc:
        find("unreadable", str(exc), rel)
        return None
    if meta.get("rack") != index.rack or meta.get("stream") != index.stream:
        find("misplaced", f"its footer says rack={meta.get('rack')} "
             f"stream={meta.get('stream')}", rel)
    return meta


def _read_part(root: Path, entry: PartEntry, index: ChainIndex, find: Callable[..., None],
               derived: list[Finding]) -> list[tuple[int, bytes, bytes, str, int]]:
    rel = entry.path
    meta = _footer_checks(root, rel, index, find)
    if meta is None:
        return []
    try:
        table = pq.read_table(root / rel)
    except (OSError, pa.ArrowException) as exc:
        find("unreadable", str(exc), rel)
        return []
    seqs = table.column("seq").to_pylist()
    n = len(seqs)
    streams = set(table.column("stream").unique().to_pylist())
    if streams - {index.stream}:
        find("misplaced", f"rows of stream={sorted(streams)}", rel)
    m = PART_RE.match(Path(rel).name)
    if seqs and m and (int(m.group(1)), int(m.group(2))) != (seqs[0], seqs[-1]):
        find("misplaced", f"named for seq {m.group(1)}-{m.group(2)}, holds "
             f"{seqs[0]}-{seqs[-1]}", rel)
    if n != meta.get("count") or n != entry.count:
        find("count", f"{n} rows; its footer says {meta.get('count')}, the index "
             f"{entry.count}", rel)
    if seqs and (seqs[0], seqs[-1]) != (entry.first, entry.last):
        find("misplaced", f"holds seq {seqs[0]}-{seqs[-1]}, the index lists it for "
             f"{entry.first}-{entry.last}", rel)
    if any(b <= a for a, b in zip(seqs, seqs[1:], strict=False)):
        find("order", "rows not in increasing sequence order", rel)
    cbors = table.column("cbor").to_pylist()
    chain = table.column("chain").to_pylist()
    rebuilt = Batch(index.rack, index.stream, GENESIS, b"", seqs,
                    table.column("hub_seq").to_pylist(), cbors, chain).table()
    for col in DERIVED:
        if col not in table.column_names:
            find("tampered", f"column {col} is missing", rel)
            continue
        for i in _differs(table.column(col), rebuilt.column(col).combine_chunks())[:10]:
            derived.append(Finding(kind="tampered", rack=index.rack, stream=index.stream,
                                   detail=f"seq {seqs[i]}: column {col} does not match the "
                                   f"event's bytes", file=rel, row=i))
    return [(seqs[i], cbors[i], chain[i], rel, i) for i in range(n)]


def ok(reports: Iterable[ChainReport]) -> bool:
    """Whether nothing was found."""
    return not any(r.findings for r in reports)


__all__ = ["ChainReport", "Finding", "Holds", "chains", "ok", "verify", "verify_chain"]
