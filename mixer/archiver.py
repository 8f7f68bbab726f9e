"""The Mixer's ``archiver`` process: every rack's business events, from the hub's copy of
its streams into the hash-chained Parquet audit trail (``mixer.auditfiles``).

Theory of operation
-------------------
Sources: every hub stream sourcing a rack's stream (``<STREAM>_<rack>``, made by the
registry; found by its source's ``$JS.<rack>.API``), checked every ``DISCOVER_EVERY``; a
plan may also name streams directly (a rack's own stream, read before it is linked).

Each source has a durable pull consumer ``archiver`` (ack policy ``all``). At start — and
after any lost connection — the consumer is made again at the sequence after the last one
the chain index says is archived: the files are the truth, the consumer only a cursor.
Messages come over ``mixer.jspull`` (the raw protocol: nats-py's per-message objects are the
wall at these rates). Each event is placed by the rack's own sequence — the
``Nats-Stream-Source`` header of a sourced message (the hub does not de-duplicate sourced
messages: after a source reset it may hold an event twice), or the stream's own sequence
for a direct source:

* at or below the last one taken: a copy, skipped (counted);
* above the next one: the events between are missing (purged on the rack before the hub
  had them): a gap, logged as an error and kept in the chain index; the chain goes on;
* else chained (``mixer.auditrow.Batch``).

A source's rows are written when ``flush_rows`` are waiting or the oldest has waited
``flush_after``: one part per hour of the events' own time, written, fsynced, listed in the
index, renamed, and only then is the last message acked (ack ``all`` acks every one before
it). A crash anywhere loses nothing and duplicates nothing (``mixer.auditfiles``).

Compaction (closed hours: parts smaller than ``COMPACT_ROWS`` merged) and retention
(``retention_days``: whole days deleted from the chain's start, the cut recorded) run on
the same loop between messages, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from engine.bus import BusAuth, close_quietly, connect
from engine.frame import frame_ts_of
from engine.logutil import RateLimitedLog
from engine.plan import Runtime, signal_ready
from mixer.auditfiles import (
    AUDIT_DIR,
    AuditFileError,
    ChainIndex,
    PartEntry,
    compact,
    hour_dir,
    hour_key,
    load_index,
    part_name,
    promote,
    recover,
    save_index,
    write_tmp,
)
from mixer.auditrow import Batch
from mixer.jspull import PullConnection, PullError, source_seq
from mixer.periodic import every
from mixer.settings import AuditSettings

log = logging.getLogger("fluxrig.mixer.archiver")
RATELOG = RateLimitedLog(log, 10.0)

CONSUMER: Final = "archiver"
PULL: Final = 4000            # messages per pull request (another is sent at half)
PULL_BYTES: Final = 16 << 20
EXPIRES: Final = 5.0          # seconds a pull request waits for messages
TICK: Final = 0.25            # seconds between timed flushes, acks and pull checks
DISCOVER_EVERY: Final = 5.0
HOUSEKEEP_EVERY: Final = 60.0  # compaction and retention
COMPACT_ROWS: Final = 250_000  # parts smaller than this are merged, up to COMPACT_MAX rows
COMPACT_MAX: Final = 2_000_000
REPORT_EVERY: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectSource:
    """A stream read as it is (no ``Nats-Stream-Source``): its own sequence is the chain's."""

    rack: str
    stream: str     # the rack's name for it (the archive's ``stream``)
    js_stream: str  # the JetStream stream to read


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchiverPlan:
    """What the archiver process needs (built by ``mixer.supervisor`` before forking)."""

    data_dir: str
    hub_url: str
    user: str
    password: str
    settings: AuditSettings
    discover: bool = True                   # find the hub's sourced streams
    direct: tuple[DirectSource, ...] = ()


@dataclass(slots=True)
class Source:
    """One stream being archived (owned by the event loop)."""

    n: int
    rack: str
    stream: str
    js_stream: str
    index: ChainIndex
    batch: Batch
    ts: list[int] = field(default_factory=list)
    expect: int = 0          # the last sequence taken (written or waiting)
    last_reply: bytes = b""  # reply subject of the last delivery: what an ack names
    ack_due: bool = False
    since: float = 0.0       # monotonic time the oldest waiting row came
    asked: int = 0           # messages asked for and not delivered or expired yet
    heard: float = 0.0       # monotonic time of the last delivery or status
    ready: bool = False
    taken: int = 0
    copies: int = 0
    gaps: int = 0

    @property
    def api(self) -> str:
        """The subject pull requests go to."""
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.js_stream}.{CONSUMER}"


def hub_sources(infos: list) -> list[tuple[str, str, str]]:
    """(rack, rack's stream, hub stream) of every hub stream that sources a rack's stream
    across its domain (``$JS.<rack>.API``) — what the registry makes for a linked rack."""
    out = []
    for info in infos:
        cfg = info.config
        srcs = cfg.sources or []
        if len(srcs) != 1 or srcs[0].external is None:
            continue
        api = srcs[0].external.api or ""
        parts = api.split(".")
        if len(parts) == 3 and parts[0] == "$JS" and parts[2] == "API" \
                and cfg.name == f"{srcs[0].name}_{parts[1]}":
            out.append((parts[1], srcs[0].name, cfg.name))
    return out


class Archiver:
    """The process's state and handlers (one event loop, no locks)."""

    def __init__(self, plan: ArchiverPlan):
        self.plan = plan
        self.s = plan.settings
        self.root = Path(plan.data_dir) / AUDIT_DIR
        self.sources: list[Source] = []
        self.by_stream: dict[str, Source] = {}
        self.by_name: dict[bytes, Source] = {}  # the same, by the bytes an ack subject has
        self.nc: Client | None = None
        self.conn: PullConnection | None = None
        self.lost = asyncio.Event()
        self.archived = 0
        self._reported = (time.monotonic(), 0)
        self.failed: str | None = None

    # --- the hot path -----------------------------------------------------------------------

    def on_message(self, reply: bytes, header: bytes, payload: bytes) -> None:
        """One delivered message (``PullConnection`` callback)."""
        t = reply.split(b".")
        base = 2 if len(t) == 9 else 4
        s = self.by_name.get(t[base])
        if s is None:
            return  # a consumer of a source let go
        s.asked -= 1
        hub_seq = int(t[base + 3])
        seq = source_seq(header) if header else 0
        if not seq:
            seq = hub_seq
        s.last_reply = reply
        if seq <= s.expect:
            s.copies += 1
            if not s.batch.seqs:
                s.ack_due = True
        else:
            if seq != s.expect + 1 and (s.expect or seq != 1):
                self._gap(s, s.expect + 1, seq - 1)
            if not s.batch.seqs:
                s.since = time.monotonic()
            s.batch.add(seq, hub_seq, payload)
            s.ts.append(frame_ts_of(payload) or int(t[base + 5]))
            s.expect = seq
            if len(s.batch.seqs) >= self.s.flush_rows:
                self.flush(s)
        if s.asked <= PULL // 2:
            self._pull(s)

    def on_status(self, n: int, line: bytes) -> None:
        """A status instead of messages: a pull request expired or was refused."""
        s = self.sources[n]
        s.heard = time.monotonic()
        code = line[9:12]
        if code in (b"408", b"409"):
            s.asked = 0  # what that request still promised will not come; ask again
            if b"Consumer Deleted" in line or b"Consumer is push based" in line:
                log.error("archive consumer gone: stream=%s, status=%s", s.js_stream,
                          line.decode(errors="replace"))
                s.ready = False
                self.lost.set()
                return
            self._pull(s)
        elif code != b"100":
            RATELOG.warning(f"status.{n}", "unexpected pull status: stream=%s, status=%s",
                            s.js_stream, line.decode(errors="replace"))

    def _pull(self, s: Source) -> None:
        if s.ready and self.conn is not None and self.conn.is_open:
            self.conn.pull(s.n, s.api, PULL, PULL_BYTES, int(EXPIRES * 1e9))
            s.asked += PULL
            s.heard = time.monotonic()

    def _gap(self, s: Source, first: int, last: int) -> None:
        s.gaps += last - first + 1
        s.index.gaps.append({"from": first, "to": last, "seen": time.time()})
        log.error("gap in the archive: rack=%s, stream=%s, missing=%d-%d (purged on the rack "
                  "before the hub had them?)", s.rack, s.stream, first, last)

    # --- writing ----------------------------------------------------------------------------

    def flush(self, s: Source) -> None:
        """Write what ``s`` has waiting (one part per hour), then ack it (module doc)."""
        batch = s.batch
        if not batch.seqs:
            if s.ack_due and self.conn is not None and self.conn.is_open:
                self.conn.ack(s.last_reply)
            s.ack_due = False
            return
        ts, n = s.ts, len(batch.seqs)
        runs = []
        start = 0
        for i in range(1, n + 1):
            if i == n or hour_key(ts[i]) != hour_key(ts[start]):
                runs.append((start, i))
                start = i
        entries = []
        for a, b in runs:
            part = batch.split(b - a) if b < n else batch
            t0 = ts[a]
            rel = str((hour_dir(Path(), s.stream, s.rack, t0)) / part_name(part.seqs[0],
                                                                           part.seqs[-1]))
            table = part.table()
            if part.clear_pans:
                log.error("clear card numbers in events: rack=%s, stream=%s, events=%d, "
                          "seq=%d-%d (masked in the columns; the events' bytes are the "
                          "rack's: fix the rig that wrote them)", s.rack, s.stream,
                          part.clear_pans, part.seqs[0], part.seqs[-1])
            entry = PartEntry(path=rel, first=part.seqs[0], last=part.seqs[-1],
                              count=len(part.seqs), prev=part.prev.hex(),
                              head=part.head.hex(), hub_last=part.hub_seqs[-1])
            write_tmp(self.root, rel, table,
                      {"stream": s.stream, "rack": s.rack, "first": entry.first,
                       "last": entry.last, "count": entry.count, "prev": entry.prev,
                       "head": entry.head})
            entries.append(entry)
        idx = s.index
        if not idx.start_seq:  # where the chain starts: before a gap seen at its start
            idx.start_seq = min([entries[0].first] + [g["from"] for g in idx.gaps])
        idx.parts.extend(entries)
        idx.pending = [e.path for e in entries]
        idx.deleting = []  # (a compaction or cut before this flush deleted them)
        idx.last, idx.head, idx.hub_last = entries[-1].last, entries[-1].head, \
            entries[-1].hub_last
        save_index(self.root, idx)
        for e in entries:
            promote(self.root / e.path)
        if self.conn is not None and self.conn.is_open:
            self.conn.ack(s.last_reply)
        s.ack_due = False
        s.taken += n
        self.archived += n
        s.batch = Batch(s.rack, s.stream, bytes.fromhex(idx.head))
        s.ts = []

    def tick(self) -> None:
        """Timed flushes, acks of skipped copies, pulls that went quiet."""
        now = time.monotonic()
        for s in self.sources:
            if not s.ready:
                continue
            if (s.batch.seqs and now - s.since >= self.s.flush_after) or \
                    (s.ack_due and not s.batch.seqs):
                self.flush(s)
            if now - s.heard > EXPIRES * 2:  # a request lost with a connection: ask again
                s.asked = 0
                self._pull(s)
        t0, n0 = self._reported
        if now - t0 >= REPORT_EVERY:
            if self.archived != n0:
                log.info("archived: events=%d, per_s=%.0f, sources=%d", self.archived,
                         (self.archived - n0) / (now - t0), len(self.sources))
            self._reported = (now, self.archived)

    def flush_all(self) -> None:
        """Write everything waiting (a stop, a lost connection)."""
        for s in self.sources:
            self.flush(s)

    # --- sources ----------------------------------------------------------------------------

    async def discover(self) -> None:
        """Take every hub stream sourcing a rack's stream not archived yet."""
        found: list[tuple[str, str, str]] = [(d.rack, d.stream, d.js_stream)
                                             for d in self.plan.direct]
        if self.plan.discover and self.nc is not None:
            found += hub_sources(await self.nc.jetstream().streams_info())
        for rack, stream, js_stream in found:
            if js_stream not in self.by_stream:
                await self.add_source(rack, stream, js_stream)

    async def add_source(self, rack: str, stream: str, js_stream: str) -> None:
        """Start archiving ``js_stream`` (recovering its chain index first)."""
        index = load_index(self.root, stream, rack)
        for done in recover(self.root, index):
            log.warning("archive recovered: rack=%s, stream=%s, %s", rack, stream, done)
        s = Source(n=len(self.sources), rack=rack, stream=stream, js_stream=js_stream,
                   index=index, batch=Batch(rack, stream, bytes.fromhex(index.head)),
                   expect=index.last)
        self.sources.append(s)
        self.by_stream[js_stream] = s
        self.by_name[js_stream.encode()] = s
        log.info("archiving: rack=%s, stream=%s, from=%s, archived_through=%d", rack, stream,
                 js_stream, index.last)
        await self.start_consumer(s)

    async def start_consumer(self, s: Source) -> None:
        """(Re)make ``s``'s consumer after its last archived event and start pulling."""
        assert self.nc is not None
        js = self.nc.jetstream()
        start = s.index.hub_last + 1
        if s.index.hub_last and not await self._same_copy(s):
            log.warning("the hub copy is not the one archived (made again?): stream=%s, "
                        "archived_hub_seq=%d, archived_seq=%d: reading it all, skipping what "
                        "is archived", s.js_stream, s.index.hub_last, s.index.last)
            start = 1
        try:
            await js.delete_consumer(s.js_stream, CONSUMER)
        except NotFoundError:
            pass
        pending = max(4 * self.s.flush_rows, 4 * PULL)
        await js.add_consumer(s.js_stream, ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(start, 1),
            max_ack_pending=pending, ack_wait=max(30.0, 4 * self.s.flush_after),
            max_waiting=64))
        s.batch = Batch(s.rack, s.stream, bytes.fromhex(s.index.head))
        s.ts = []
        s.expect = s.index.last
        s.asked = 0
        s.ready = True
        self._pull(s)

    async def _same_copy(self, s: Source) -> bool:
        """Whether the hub copy's message at the last archived hub sequence is the last
        archived event (a copy made again is numbered differently: its sequences say
        nothing of the rack's)."""
        assert self.nc is not None
        try:
            msg = await self.nc.jetstream().get_msg(s.js_stream, s.index.hub_last)
        except NotFoundError:
            return False
        header = "".join(f"{k}: {v}\r\n" for k, v in (msg.headers or {}).items()).encode()
        seq = source_seq(header) or s.index.hub_last
        return seq == s.index.last

    # --- housekeeping -----------------------------------------------------------------------

    def housekeep(self) -> None:
        """Compaction of closed hours; retention."""
        for s in self.sources:
            self.compact_source(s)
            if self.s.retention_days:
                self.retain(s, datetime.now(UTC).date() - timedelta(days=self.s.retention_days))

    def compact_source(self, s: Source) -> None:
        """Merge the small parts of every hour partition not written for ``compact_after``."""
        now_hour = hour_key(time.time_ns())
        groups: dict[str, list[PartEntry]] = defaultdict(list)
        for p in s.index.parts:
            groups[str(Path(p.path).parent)].append(p)
        for parts in groups.values():
            small = [p for p in parts if p.count < COMPACT_ROWS]
            if len(small) < 2:
                continue
            try:
                newest = max(os.stat(self.root / p.path).st_mtime for p in small)
            except FileNotFoundError:
                continue  # a listed part is gone: `mixer audit verify` says which
            if time.time() - newest < self.s.compact_after:
                continue
            if _hour_of(small[0].path) >= now_hour:
                continue
            group: list[PartEntry] = []
            rows = 0
            for p in sorted(small, key=lambda p: p.first):
                if rows + p.count > COMPACT_MAX and len(group) > 1:
                    break
                group.append(p)
                rows += p.count
            if len(group) > 1:
                entry = compact(self.root, s.index, group)
                log.info("compacted: rack=%s, stream=%s, parts=%d, into=%s, rows=%d", s.rack,
                         s.stream, len(group), entry.path, entry.count)

    def retain(self, s: Source, keep_from: object) -> None:
        """Delete whole days before ``keep_from`` from the chain's start (module doc)."""
        cut = retention_cut(s.index, str(keep_from))
        if cut is None:
            return
        parts, cut_doc = cut
        s.index.cuts.append(cut_doc)
        olds = {p.path for p in parts}
        s.index.parts = [p for p in s.index.parts if p.path not in olds]
        s.index.start_seq = cut_doc["through"] + 1
        s.index.start_prev = cut_doc["head"]
        s.index.deleting = sorted(olds)
        save_index(self.root, s.index)  # first: a crash now leaves them in `deleting`
        delete_parts(self.root, parts)
        log.info("retention: rack=%s, stream=%s, deleted_days=%s, parts=%d, rows=%d, "
                 "through_seq=%d", s.rack, s.stream, ",".join(cut_doc["dates"]), len(parts),
                 cut_doc["rows"], cut_doc["through"])


def _hour_of(rel: str) -> int:
    """The hour key of a part's partition (from its path)."""
    p = Path(rel)
    day = p.parent.parent.name.removeprefix("date=")
    hour = int(p.parent.name.removeprefix("hour="))
    t = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(hours=hour)
    return int(t.timestamp()) // 3600


def part_date(rel: str) -> str:
    """``YYYY-MM-DD`` of a part's partition."""
    return Path(rel).parent.parent.name.removeprefix("date=")


def retention_cut(index: ChainIndex, keep_from: str) -> tuple[list[PartEntry],
                                                                dict[str, Any]] | None:
    """The parts to delete so nothing before day ``keep_from`` stays, as a prefix of the
    chain (a part of an older day after a newer one waits for the next turn), and the cut's
    record; None when nothing goes."""
    parts = sorted(index.parts, key=lambda p: p.first)
    prefix: list[PartEntry] = []
    for p in parts:
        if part_date(p.path) >= keep_from:
            break
        prefix.append(p)
    if not prefix:
        return None
    return prefix, {"through": prefix[-1].last, "head": prefix[-1].head, "at": time.time(),
                    "dates": sorted({part_date(p.path) for p in prefix}),
                    "parts": len(prefix), "rows": sum(p.count for p in prefix),
                    "keep_from": keep_from}


def delete_parts(root: Path, parts: list[PartEntry]) -> None:
    """Delete parts and the partition directories they leave empty."""
    dirs = set()
    for p in parts:
        (root / p.path).unlink(missing_ok=True)
        dirs.add((root / p.path).parent)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        for level in (d, d.parent):
            try:
                level.rmdir()
            except OSError:
                break


async def archiver_main(plan: ArchiverPlan, rt: Runtime | None, name: str,
                        stopping: asyncio.Event | None = None) -> None:
    """The process body: connect, archive until SIGTERM (or ``stopping``: in-process
    benchmarks), then write what waits."""
    if stopping is None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    arch = Archiver(plan)
    url = urlsplit(plan.hub_url)
    arch.nc = await connect(plan.hub_url, BusAuth(user=plan.user, password=plan.password),
                            "fluxrig-mixer-archiver", max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5)
    ready = False
    try:
        backoff = 0.2
        while not stopping.is_set():
            arch.lost.clear()
            conn = PullConnection(arch.on_message, arch.on_status)
            try:
                await conn.open(url.hostname or "127.0.0.1", url.port or 4222, plan.user,
                                plan.password, "fluxrig-mixer-archiver-data")
                arch.conn = conn
                for s in arch.sources:
                    await arch.start_consumer(s)
                await arch.discover()
            except (OSError, PullError, TimeoutError, Exception) as exc:
                if isinstance(exc, AuditFileError):
                    raise
                log.warning("archiver cannot read the hub yet: error=%r, retry_in=%.1fs",
                            exc, backoff)
                conn.close()
                arch.conn = None
                try:
                    await asyncio.wait_for(stopping.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0) * random.uniform(0.8, 1.2)
                continue
            backoff = 0.2
            if not ready:
                if rt is not None:
                    signal_ready(rt, name)
                ready = True
            closed = conn.closed
            assert closed is not None
            jobs = asyncio.gather(
                every(TICK, arch.tick, stopping),
                every(DISCOVER_EVERY, arch.discover, stopping),
                every(HOUSEKEEP_EVERY, arch.housekeep, stopping))
            waits: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(closed),
                asyncio.ensure_future(arch.lost.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            jobs.cancel()
            try:
                await jobs
            except asyncio.CancelledError:
                pass
            arch.flush_all()  # acks are lost with a dead connection: the copies are skipped
            for s in arch.sources:
                s.ready = False
            conn.close()
            arch.conn = None
            if not stopping.is_set():
                log.warning("archiver lost the hub: error=%r; starting again from the "
                            "archive", conn.error)
    finally:
        arch.flush_all()
        if arch.conn is not None:
            arch.conn.close()
        await close_quietly(arch.nc)


def run_archiver(plan: ArchiverPlan, rt: Runtime, name: str) -> None:
    """Entry point in the forked child."""
    asyncio.run(archiver_main(plan, rt, name))


__all__ = ["ArchiverPlan", "Archiver", "DirectSource", "archiver_main", "delete_parts",
           "hub_sources", "retention_cut", "run_archiver"]
