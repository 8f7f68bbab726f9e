"""The Mixer's ``traces`` process: every rack's spans and log records into Parquet.

Theory of operation
-------------------
A client of the hub's nats-server (user ``traces``: it may subscribe ``fluxrig.traces.*``,
``fluxrig.logs.*`` and its inbox, and publish nothing). Racks publish with core NATS, fire
and forget: nothing is acked, a message lost on the way (hub down, slow consumer) is lost.

* Each message is decoded on the event loop (``mixer.tracerows``: one row per trace per
  message; one row per log record). A payload that does not decode is counted and logged
  rate-limited with its rack and length; the process goes on.
* A row's hour (its partition) is its own time (``mixer.tracerows``) only when that lies
  within ``[now - traces.retention, now + 1 h]``; otherwise the hour it was received
  (``partition_ns``; its own time stays in its columns; counted as ``misdated``). A rack
  with a wrong clock, or a hostile one, thus adds at most the current hour, never a part per
  distinct hour of its choosing nor a ``date=`` directory retention would never reach.
* Rows wait in ``TelemetryBuffer`` (memory, per kind, rack and hour) and are written as one
  part per rack-hour when the oldest has waited ``traces.flush`` or when ``flush_rows``
  wait in all (``mixer.tracefiles.write_part``, in the writer thread, in order). A crash
  loses what waits (at most ``flush`` seconds): telemetry is best effort.
* Every ``HOUSEKEEP_EVERY``: closed hours merged into one part each, days past
  ``traces.retention`` deleted (``mixer.tracefiles``; a thread of their own, so a long merge
  never holds a flush back). At start, ``recover`` cleans what a crash left.
* With ``traces.forward``, each trace payload is also queued, unchanged, for an OTLP
  collector (``mixer.traceforward``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from nats.aio.msg import Msg

from engine.bus import BusAuth, close_quietly, connect
from engine.logutil import RateLimitedLog
from engine.plan import Runtime, signal_ready
from engine.schema import NAME_RE
from mixer.periodic import every
from mixer.settings import TracesSettings
from mixer.tracefiles import (
    HOUR_NS,
    LOGS_DIR,
    TRACES_DIR,
    PartNamer,
    compact_due,
    compact_hour,
    recover,
    retain,
    write_part,
)
from mixer.traceforward import Forwarder
from mixer.tracerows import TelemetryDecodeError, log_rows, trace_rows

log = logging.getLogger("fluxrig.mixer.traces")
RATELOG = RateLimitedLog(log, 10.0)

TICK: Final = 0.25           # seconds between flush checks
HOUSEKEEP_EVERY: Final = 60.0
REPORT_EVERY: Final = 60.0
TRACES_SUBJECT: Final = "fluxrig.traces.*"
LOGS_SUBJECT: Final = "fluxrig.logs.*"

Key = tuple[str, str, int]  # (kind, rack, hour start ns)
FUTURE_SLACK_NS: Final = HOUR_NS  # a rack's clock may run this far ahead of the Mixer's


def partition_ns(ts_ns: int, now_ns: int, retention_s: float) -> int:
    """The time whose hour holds a row of time ``ts_ns`` received at ``now_ns``: ``ts_ns``
    when it lies within ``[now_ns - retention, now_ns + 1 h]``, else ``now_ns`` (module
    doc)."""
    if now_ns - int(retention_s * 1e9) <= ts_ns <= now_ns + FUTURE_SLACK_NS:
        return ts_ns
    return now_ns


@dataclass(slots=True)
class TelemetryBuffer:
    """Rows waiting for their part, per (kind, rack, hour) — sans I/O, the clock passed in."""

    rows: dict[Key, list[dict[str, object]]] = field(default_factory=dict)
    since: dict[Key, float] = field(default_factory=dict)
    count: int = 0

    def add(self, kind: str, rack: str, ts_ns: int, row: dict[str, object],
            now: float) -> None:
        """One row of ``rack`` at ``ts_ns`` (its hour picks the part)."""
        key = (kind, rack, ts_ns - ts_ns % HOUR_NS)
        if key not in self.rows:
            self.rows[key] = []
            self.since[key] = now
        self.rows[key].append(row)
        self.count += 1

    def take(self, now: float, after: float, max_rows: int,
             everything: bool = False) -> list[tuple[Key, list[dict[str, object]]]]:
        """What is due: every group whose oldest row waited ``after`` seconds, or all of
        them when ``max_rows`` wait (or ``everything``); taken out of the buffer."""
        if everything or self.count >= max_rows:
            keys = list(self.rows)
        else:
            keys = [k for k, t in self.since.items() if now - t >= after]
        out = []
        for k in keys:
            rows = self.rows.pop(k)
            del self.since[k]
            self.count -= len(rows)
            out.append((k, rows))
        return out


@dataclass(slots=True)
class TraceStats:
    """What the process did since it started (logged every ``REPORT_EVERY``)."""

    messages: int = 0
    traces: int = 0
    logs: int = 0
    bad_traces: int = 0
    bad_lines: int = 0
    parts: int = 0
    lost_rows: int = 0
    misdated: int = 0  # rows stored in the hour received: their own time out of the window

    def line(self) -> str:
        """The counters as ``k=v``."""
        return ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True, kw_only=True)
class TracesPlan:
    """What the traces process needs (built by ``mixer.supervisor`` before forking)."""

    data_dir: str
    hub_url: str
    password: str
    settings: TracesSettings


class TraceShell:
    """The process's state, owned by the event loop."""

    def __init__(self, plan: TracesPlan, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns):
        """``clock``: seconds for the flush deadlines; ``wall_ns``: the time of day that
        bounds a row's own time (``partition_ns``)."""
        self.plan = plan
        self.s = plan.settings
        self.root = Path(plan.data_dir)
        self.clock = clock
        self.wall_ns = wall_ns
        self.buffer = TelemetryBuffer()
        self.stats = TraceStats()
        self.namer = PartNamer()
        self.writer = ThreadPoolExecutor(1, "traces-writer")
        self.keeper = ThreadPoolExecutor(1, "traces-housekeep")
        self.forward = Forwarder(self.s.forward) if self.s.forward is not None else None
        self.writes: set[asyncio.Future[None]] = set()

    @staticmethod
    def rack_of(subject: str) -> str | None:
        """The rack a subject names (``fluxrig.<kind>.<rack>``), or None."""
        parts = subject.split(".")
        return parts[2] if len(parts) == 3 and NAME_RE.match(parts[2]) else None

    async def on_traces(self, msg: Msg) -> None:
        """One ``fluxrig.traces.<rack>`` message."""
        rack = self.rack_of(msg.subject)
        self.stats.messages += 1
        if rack is None:
            return
        try:
            rows = trace_rows(rack, msg.data)
        except TelemetryDecodeError as exc:
            self.stats.bad_traces += 1
            RATELOG.warning(f"bad-traces-{rack}", "bad trace payload: rack=%s, bytes=%d, "
                            "error=%s, bad_traces=%d", rack, len(msg.data), exc,
                            self.stats.bad_traces)
            return
        now = self.clock()
        for r in rows:
            self.buffer.add(TRACES_DIR, rack, self._partition(r.hour_ns), r.as_dict(), now)
        self.stats.traces += len(rows)
        if self.forward is not None:
            self.forward.offer(rack, msg.data)

    async def on_logs(self, msg: Msg) -> None:
        """One ``fluxrig.logs.<rack>`` message."""
        rack = self.rack_of(msg.subject)
        self.stats.messages += 1
        if rack is None:
            return
        rows, bad = log_rows(rack, msg.data)  # never refuses a whole batch: bad lines only
        if bad:
            self.stats.bad_lines += bad
            RATELOG.warning(f"bad-lines-{rack}", "bad log lines skipped: rack=%s, bytes=%d, "
                            "lines=%d, bad_lines=%d", rack, len(msg.data), bad,
                            self.stats.bad_lines)
        now = self.clock()
        for r in rows:
            self.buffer.add(LOGS_DIR, rack, self._partition(r.ts), r.as_dict(), now)
        self.stats.logs += len(rows)

    def _partition(self, ts_ns: int) -> int:
        """``partition_ns`` with the wall clock, a misdated row counted."""
        now_ns = self.wall_ns()
        at = partition_ns(ts_ns, now_ns, self.s.retention)
        if at != ts_ns:
            self.stats.misdated += 1
        return at

    def tick(self, everything: bool = False) -> None:
        """Hand what is due to the writer thread."""
        due = self.buffer.take(self.clock(), self.s.flush, self.s.flush_rows, everything)
        loop = asyncio.get_running_loop()
        for (kind, rack, hour), rows in due:
            fut = loop.run_in_executor(self.writer, self._write, kind, rack, hour, rows)
            self.writes.add(fut)
            fut.add_done_callback(self.writes.discard)

    def _write(self, kind: str, rack: str, hour: int, rows: list[dict[str, object]]) -> None:
        """In the writer thread: one part; a failure costs these rows only (logged)."""
        try:
            write_part(self.root, kind, rack, hour, rows, self.namer.next())
            self.stats.parts += 1
        except Exception as exc:
            self.stats.lost_rows += len(rows)
            RATELOG.error("write", "telemetry part not written, rows lost: kind=%s, rack=%s, "
                          "rows=%d, error=%r", kind, rack, len(rows), exc)

    def housekeep_sync(self, now_ns: int | None = None) -> None:
        """Compaction and retention (in the housekeeping thread)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        for kind, d in compact_due(self.root, now_ns, self.s.compact_after):
            try:
                into = compact_hour(d, kind)
            except Exception as exc:
                RATELOG.error(f"compact-{d}", "compaction failed: dir=%s, error=%r", d, exc)
                continue
            if into is not None:
                log.info("compacted: kind=%s, dir=%s, into=%s", kind, d, into.name)
        for d in retain(self.root, now_ns, self.s.retention):
            log.info("retention: deleted=%s", d)

    async def housekeep(self) -> None:
        """``housekeep_sync`` off the event loop."""
        await asyncio.get_running_loop().run_in_executor(self.keeper, self.housekeep_sync)

    def report(self) -> None:
        """The counters, when anything came."""
        if self.stats.messages:
            extra = ""
            if self.forward is not None:
                f = self.forward.stats
                extra = (f", forwarded={f.sent}, forward_retries={f.retried}, "
                         f"forward_dropped={f.dropped_full + f.dropped_failed}, "
                         f"forward_errors={f.errors}")
            log.info("traces: %s%s", self.stats.line(), extra)

    async def drain(self) -> None:
        """Write everything that waits and wait for the writer."""
        self.tick(everything=True)
        if self.writes:
            await asyncio.gather(*list(self.writes), return_exceptions=True)


async def traces_main(plan: TracesPlan, rt: Runtime | None, name: str,
                      stopping: asyncio.Event | None = None) -> None:
    """The process body: recover, subscribe, store until SIGTERM, then write what waits."""
    if stopping is None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    shell = TraceShell(plan)
    done = recover(shell.root)
    if done.tmp_deleted or done.replaced_deleted:
        log.info("traces recovered: tmp_deleted=%d, replaced_deleted=%d", done.tmp_deleted,
                 done.replaced_deleted)
    nc = await connect(plan.hub_url, BusAuth(user="traces", password=plan.password),
                       "fluxrig-mixer-traces", max_reconnect_attempts=-1,
                       reconnect_time_wait=0.5)
    try:
        await nc.subscribe(TRACES_SUBJECT, cb=shell.on_traces,
                           pending_bytes_limit=256 << 20)
        await nc.subscribe(LOGS_SUBJECT, cb=shell.on_logs, pending_bytes_limit=64 << 20)
        await nc.flush()
        if shell.forward is not None:
            shell.forward.start()
        if rt is not None:
            signal_ready(rt, name)
        log.info("traces serving: dir=%s, flush=%.2fs, forward=%s", shell.root, plan.settings.flush,
                 shell.forward.url if shell.forward is not None else "off")
        jobs = asyncio.gather(every(TICK, shell.tick, stopping),
                              every(HOUSEKEEP_EVERY, shell.housekeep, stopping),
                              every(REPORT_EVERY, shell.report, stopping))
        await stopping.wait()
        jobs.cancel()
        try:
            await jobs
        except asyncio.CancelledError:
            pass
    finally:
        await close_quietly(nc)  # first: nothing new comes while the buffer is written
        await shell.drain()
        if shell.forward is not None:
            await shell.forward.close()  # never raises: the report and shutdown below run
        shell.report()
        shell.writer.shutdown(wait=True)
        shell.keeper.shutdown(wait=False, cancel_futures=True)


def run_traces(plan: TracesPlan, rt: Runtime, name: str) -> None:
    """Entry point in the forked child."""
    asyncio.run(traces_main(plan, rt, name))


__all__ = ["FUTURE_SLACK_NS", "TelemetryBuffer", "TraceShell", "TraceStats", "TracesPlan",
           "partition_ns", "run_traces", "traces_main"]
