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
``flush_after``: one part per hour of the events' own time. The chain is computed here, as
events come; turning rows into a Parquet part (decode, flatten, compress, fsync under a
temporary name) is the writer's job — a process of its own (``writer_pool``), so reading
and writing use both cores. Each source's commits run in order (``_commit``: wait for its
parts, list them in the index, rename them, and only then ack the last message — ack
``all`` acks every one before it); a source with ``INFLIGHT_BATCHES`` batches at the writer
asks for no more. A crash anywhere loses nothing and duplicates nothing
(``mixer.auditfiles``); a part that cannot be written stops the archiver (exit 1: the
supervisor restarts it, and what was not committed is read again).

Compaction (closed hours: parts smaller than ``COMPACT_ROWS`` merged) and retention
(``retention_days``: whole days deleted from the chain's start, the cut recorded) run on
the same loop between messages, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import signal
import time
from collections import defaultdict
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
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
from mixer.jspull import PullConnection, PullError, pending_messages, source_seq
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
INFLIGHT_BATCHES: Final = 2    # batches a source may have at the writer before pulls wait
WRITER_PROBE: Final = 1.0      # seconds between checks that the writer process lives


class ArchiveWriteError(RuntimeError):
    """A part could not be written (disk full, the writer process died): the archiver
    stops; what was not committed is read again after a restart."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PartJob:
    """One part for the writer: where, and its rows (the chain already computed)."""

    rel: str
    batch: Batch


@dataclass(frozen=True, slots=True, kw_only=True)
class PartWritten:
    """What the writer saw in a part it wrote."""

    clear_pans: int
    undecodable: int


def write_part(root: str, job: PartJob) -> PartWritten:
    """The writer's job (in the writer process): the part's table, written under its
    temporary name and fsynced (``mixer.auditfiles.write_tmp``)."""
    b = job.batch
    table = b.table()
    write_tmp(Path(root), job.rel, table,
              {"stream": b.stream, "rack": b.rack, "first": b.seqs[0], "last": b.seqs[-1],
               "count": len(b.seqs), "prev": b.prev.hex(), "head": b.head.hex()})
    return PartWritten(clear_pans=b.clear_pans, undecodable=b.undecodable)


def _writer_init() -> None:
    """In the writer process: it dies with the archiver, and leaves signals to it (a
    SIGTERM to every process of the service must not kill a write half-way)."""
    from engine.natsd import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _writer_ready() -> bool:
    return True


def _ignore(fut: Any) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a probe that failed is not an unhandled error


def writer_pool() -> Executor:
    """The archiver's writer: one process that turns batches into Parquet parts while the
    archiver reads on. Forked, and started at once (``archiver_main`` asks it a first
    question before it opens a connection or a thread): a fork with only the main thread
    copies no held lock. (``spawn`` would start multiprocessing's resource tracker too,
    which warns of leaked semaphores and leaves them in /dev/shm when the archiver is
    killed.)"""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                               initializer=_writer_init)


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
    inflight: int = 0        # events handed to the writer, not committed yet
    commit: asyncio.Future[None] | None = None  # the last commit queued (they run in order)
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

    def __init__(self, plan: ArchiverPlan, writer: Executor | None = None):
        """``writer`` runs ``write_part`` (``writer_pool()`` in the process; None: a thread
        of this process, for tests that drive the archiver themselves)."""
        self.plan = plan
        self.writer = writer or ThreadPoolExecutor(1, "audit-writer")
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
        self._probed = 0.0

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

    def on_status(self, n: int, header: bytes) -> None:
        """A status instead of messages (on pull inbox ``n``, the source's index).

        ``409 Batch Completed``: a request was served whole (its messages were counted as
        they came); ``408`` (expired) and other ``409`` statuses end a request with
        ``Nats-Pending-Messages`` it will not deliver; without that figure every request
        is taken as ended. Pull requests are served in order, so only the figure matters.
        """
        s = self.sources[n]
        s.heard = time.monotonic()
        line = header.split(b"\r\n", 1)[0]
        code = line[9:12]
        if code == b"409" and b"Batch Completed" in line:
            return
        if code in (b"408", b"409"):
            if b"Consumer Deleted" in line or b"Consumer is push based" in line:
                log.error("archive consumer gone: stream=%s, status=%s", s.js_stream,
                          line.decode(errors="replace"))
                s.ready = False
                self.lost.set()
                return
            owed = pending_messages(header)
            s.asked = max(0, s.asked - owed) if owed is not None else 0
            if s.asked <= PULL // 2:
                self._pull(s)
        elif code != b"100":
            RATELOG.warning(f"status.{n}", "unexpected pull status: stream=%s, status=%s",
                            s.js_stream, line.decode(errors="replace"))

    def _pull(self, s: Source) -> None:
        # events handed to the writer and not committed yet hold the pulls back: the
        # archiver never takes more than the writer keeps up with
        if s.ready and self.conn is not None and self.conn.is_open \
                and s.inflight <= INFLIGHT_BATCHES * self.s.flush_rows:
            self.conn.pull(s.n, s.api, PULL, PULL_BYTES, int(EXPIRES * 1e9))
            s.asked += PULL
            s.heard = time.monotonic()

    def _gap(self, s: Source, first: int, last: int) -> None:
        s.gaps += last - first + 1
        s.index.gaps.append({"from": first, "to": last, "seen": time.time()})
        log.error("gap in the archive: rack=%s, stream=%s, missing=%d-%d (purged on the rack "
                  "before the hub had them?)", s.rack, s.stream, first, last)

    # --- writing ----------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        """Stop taking and committing (the process exits: what was not committed is not
        acked, and comes again after the restart)."""
        if self.failed is None:
            self.failed = why
            log.error("archiver failing: %s", why)
        for s in self.sources:
            s.ready = False
        self.lost.set()

    def flush(self, s: Source) -> None:
        """Hand what ``s`` has waiting to the writer (one part per hour) and queue its
        commit behind the source's earlier ones (module doc); the loop goes on reading."""
        if self.failed is not None:
            return
        batch = s.batch
        if not batch.seqs:
            if s.ack_due:  # copies skipped: ack them once what came before is committed
                s.ack_due = False
                self._chain(s, [], [], s.last_reply, 0)
            return
        ts, n = s.ts, len(batch.seqs)
        runs = []
        start = 0
        for i in range(1, n + 1):
            if i == n or hour_key(ts[i]) != hour_key(ts[start]):
                runs.append((start, i))
                start = i
        loop = asyncio.get_running_loop()
        entries, futures = [], []
        for a, b in runs:
            part = batch.split(b - a) if b < n else batch
            rel = str(hour_dir(Path(), s.stream, s.rack, ts[a])
                      / part_name(part.seqs[0], part.seqs[-1]))
            entry = PartEntry(path=rel, first=part.seqs[0], last=part.seqs[-1],
                              count=len(part.seqs), prev=part.prev.hex(),
                              head=part.head.hex(), hub_last=part.hub_seqs[-1])
            entries.append(entry)
            try:
                futures.append(loop.run_in_executor(self.writer, write_part, str(self.root),
                                                    PartJob(rel=rel, batch=part)))
            except RuntimeError as exc:  # BrokenProcessPool: the writer died
                for f in futures:
                    f.cancel()
                self._fail(f"the writer cannot take rack={s.rack}, stream={s.stream}: "
                           f"{exc!r}")
                return
        s.ack_due = False
        s.inflight += n
        self._chain(s, entries, futures, s.last_reply, n)
        s.batch = Batch(s.rack, s.stream, bytes.fromhex(entries[-1].head))
        s.ts = []

    def _chain(self, s: Source, entries: list[PartEntry],
               futures: list[asyncio.Future[PartWritten]], reply: bytes, n: int) -> None:
        s.commit = asyncio.ensure_future(self._commit(s, s.commit, entries, futures, reply, n))

    async def _commit(self, s: Source, before: asyncio.Future[None] | None,
                      entries: list[PartEntry], futures: list[asyncio.Future[PartWritten]],
                      reply: bytes, n: int) -> None:
        """After the source's earlier commits: wait for the parts to be written (and
        fsynced), list them in the index, rename them, ack ``reply``."""
        try:
            if before is not None:
                await before
            written = [await f for f in futures]
            if self.failed is not None:
                raise ArchiveWriteError(self.failed)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        for e, w in zip(entries, written, strict=True):
            if w.clear_pans:
                log.error("clear card numbers in events: rack=%s, stream=%s, events=%d, "
                          "seq=%d-%d (masked in the columns; the events' bytes are the "
                          "rack's: fix the rig that wrote them)", s.rack, s.stream,
                          w.clear_pans, e.first, e.last)
        if entries:
            idx = s.index
            if not idx.start_seq:  # where the chain starts: before a gap seen at its start
                idx.start_seq = min([entries[0].first] + [g["from"] for g in idx.gaps])
            idx.parts.extend(entries)
            idx.pending = [e.path for e in entries]
            idx.deleting = []  # (a compaction or cut before this commit deleted them)
            idx.last, idx.head, idx.hub_last = entries[-1].last, entries[-1].head, \
                entries[-1].hub_last
            save_index(self.root, idx)
            for e in entries:
                promote(self.root / e.path)
        if reply and self.conn is not None and self.conn.is_open:
            self.conn.ack(reply)  # (a dead connection: the copies come again, skipped)
        s.inflight -= n
        s.taken += n
        self.archived += n
        if s.asked <= PULL // 2:
            self._pull(s)

    def tick(self) -> None:
        """Timed flushes, acks of skipped copies, pulls that went quiet, a failed write, a
        dead writer."""
        now = time.monotonic()
        if now - self._probed >= WRITER_PROBE and self.failed is None:
            # an idle archiver would learn of a dead writer only at its next write: ask the
            # pool for a no-op (refused at once once it knows its process died)
            self._probed = now
            try:
                self.writer.submit(_writer_ready).add_done_callback(_ignore)
            except RuntimeError as exc:  # BrokenProcessPool
                self._fail(f"the writer process is gone: {exc!r}")
        for s in self.sources:
            if s.commit is not None and s.commit.done() and not s.commit.cancelled() \
                    and s.commit.exception() is not None and self.failed is None:
                self._fail(f"writing the archive of rack={s.rack}, stream={s.stream} "
                           f"failed: {s.commit.exception()!r}")
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

    async def drain(self) -> None:
        """Write and commit everything waiting (a stop, a lost connection).

        Raises:
            ArchiveWriteError: a part could not be written (the archive on disk stays
                consistent: what was not committed comes again).
        """
        if self.failed is not None:
            raise ArchiveWriteError(self.failed)
        for s in self.sources:
            self.flush(s)
        for s in self.sources:
            if s.commit is not None:
                try:
                    await s.commit
                except Exception as exc:
                    raise ArchiveWriteError(f"writing the archive of rack={s.rack}, "
                                            f"stream={s.stream} failed: {exc!r}") from exc

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
        if s.commit is not None:
            await s.commit  # the index says what is archived only once they are in
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
    arch = Archiver(plan, writer_pool())
    # start the writer now: no other thread runs yet (see writer_pool)
    await asyncio.get_running_loop().run_in_executor(arch.writer, _writer_ready)
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
                if isinstance(exc, (AuditFileError, ArchiveWriteError)):
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
            for s in arch.sources:
                s.ready = False
            if arch.failed is not None:
                raise ArchiveWriteError(arch.failed)
            await arch.drain()  # acks are lost with a dead connection: the copies are skipped
            conn.close()
            arch.conn = None
            if not stopping.is_set():
                log.warning("archiver lost the hub: error=%r; starting again from the "
                            "archive", conn.error)
    finally:
        try:
            if arch.failed is None:
                await arch.drain()
        except ArchiveWriteError as exc:
            log.error("archiver stopping: %s", exc)
        finally:
            if arch.conn is not None:
                arch.conn.close()
            await close_quietly(arch.nc)
            arch.writer.shutdown(wait=True)


def run_archiver(plan: ArchiverPlan, rt: Runtime, name: str) -> None:
    """Entry point in the forked child; exits 1 when the archive cannot be written or read
    (the supervisor restarts it, the archive on disk is consistent)."""
    try:
        asyncio.run(archiver_main(plan, rt, name))
    except (ArchiveWriteError, AuditFileError) as exc:
        log.error("archiver stopped: %s", exc)
        raise SystemExit(1) from None


__all__ = ["ArchiveWriteError", "ArchiverPlan", "Archiver", "DirectSource", "PartJob",
           "PartWritten", "write_part", "writer_pool", "archiver_main", "delete_parts",
           "hub_sources", "retention_cut", "run_archiver"]
