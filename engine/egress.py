"""Egress: rings -> NATS JetStream, one message per frame, acked and de-duplicated.

Theory of operation
-------------------
Each input ring carries frames for one egress route (a subject in one stream). Every frame
becomes one JetStream message with ``Nats-Msg-Id`` = the frame id (hex), so a frame published
twice — after an egress crash, a NATS outage, or a stage replay — is stored once: the server
drops the copy inside the stream's duplicate window.

Throughput without one awaited ack per message: a batch of up to ``egress.batch`` frames
from one ring is written to the socket as plain (core) ``HPUB`` commands, all but the last;
the last goes as a JetStream publish whose ack we wait for. JetStream stores a stream's
messages in arrival order, so when that ack says sequence ``S`` and the previous batch ended
at ``S - n`` for an ``n``-frame batch, every frame of the batch is stored: we commit the ring up
to the batch's end. Several batches are in flight (``egress.max_inflight``), acks are settled
in order. (Design choice recorded in docs/architecture.md: one message per frame keeps each
frame addressable and de-duplicated by the server, instead of packing frames per message.)

If the arithmetic does not hold (a copy was dropped as duplicate, a core message was lost in
a reconnect) or an ack fails or times out, egress *recovers*: it waits for NATS, republishes
every in-flight frame with an individually acked publish (duplicates are dropped by id,
missing ones stored), commits, re-reads each stream's last sequence, and resumes the fast path.

Backpressure: while NATS is unreachable nothing is committed and no new batch is taken; the
rings fill and the stages upstream block on them. Nothing leaves a ring before its ack.

The ``HPUB`` bytes are built here (sans-I/O, ``hpub``) and queued on nats-py's connection
with its internal ``_send_command``: nats-py's own ``publish`` builds headers through a
regex check and a bytearray per message and caps a Python sender at ~90k msgs/s here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nats.js.errors import NoStreamResponseError

from engine.bus import close_quietly, connect, masked_url
from engine.cbor import CBORDecodeError, loads
from engine.counters import ERRORS, StatDef, Stats
from engine.frame import frame_id_of, frame_ts_of
from engine.logutil import RateLimitedLog
from engine.plan import EgressPlan, ProcessSpec, Runtime, signal_ready
from engine.ring import Consumer, wait_any
from engine.streams import drop_hub_consumer, ensure_hub_consumer, ensure_streams

log = logging.getLogger("fluxrig.egress")

STAT_DEFS = (
    StatDef("egress.waiting", "gauge", "frames taken from rings, waiting for NATS to store "
            "them (recovery)"),
    StatDef("egress.retries", "counter", "publish attempts that failed and were retried"),
    StatDef("egress.streams_recreated", "counter", "streams found missing and created again"),
    StatDef("egress.budget_full", "counter", "publishes refused because a stream reached its "
            "max_bytes budget (a linked rack: the hub has not taken the events yet); they "
            "wait in the rings"),
)
TAIL_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")  # a subject tail: no wildcard, no space
BUDGET_FULL = 10077  # JetStream's err_code for "maximum bytes exceeded" with discard new


def hpub(subject: bytes, msg_id: bytes, payload: bytes | memoryview) -> bytes:
    """One NATS ``HPUB`` protocol command carrying ``Nats-Msg-Id: msg_id`` (no reply)."""
    header = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id + b"\r\n\r\n"
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        subject, len(header), len(header) + len(payload), header, payload)


@dataclass(slots=True)
class _Batch:
    lane: int
    end: int  # ring position after the batch: commit target
    stream: str
    messages: list[tuple[str, str, bytes]]  # subject, msg id, payload (for recovery)
    ts: list[int]
    nbytes: int
    expect: int  # stream sequence the sentinel ack must carry
    ack: asyncio.Future[Any] = field(default=None)  # type: ignore[assignment]


class EgressProcess:
    """The egress loop (one per rack)."""

    def __init__(self, spec: ProcessSpec, rt: Runtime):
        self.spec = spec
        self.rt = rt
        assert isinstance(spec.extra, EgressPlan)
        self.plan: EgressPlan = spec.extra
        self.consumers: list[Consumer] = [r.consumer() for r in spec.inputs]
        self.counters = spec.counters
        self.stopping = asyncio.Event()
        self.inflight: deque[_Batch] = deque()
        self.tail_seq: dict[str, int] = {}
        self.nc: Any = None
        self.js: Any = None
        self._subjects = [r.subject.encode() for r in self.plan.routes]
        # the stats live in shared memory when the supervisor sized the segment for them
        self.stats = (spec.counters.stats(spec.stat_defs) if spec.stat_defs
                      else Stats.local(STAT_DEFS))
        self._st_waiting, self._st_retries, self._st_recreated, self._st_budget = range(4)
        self.ratelog = RateLimitedLog(log)

    async def connect(self) -> None:
        """Connect to the rack's NATS (retrying until it answers or the rack stops)."""
        while not self.stopping.is_set():
            try:
                self.nc = await connect(
                    self.rt.nats_url, self.spec.bus_auth, f"fluxrig-egress-{self.rt.rack_id}",
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    pending_size=64 * 1024 * 1024, error_cb=self._on_error)
                self.js = self.nc.jetstream(timeout=self.plan.ack_timeout)
                self.tail_seq = await ensure_streams(self.js, self.plan.streams)
                for s in self.plan.streams:  # before the first event of this run
                    if s.name in self.plan.hub_streams:
                        await ensure_hub_consumer(self.js, self.rt.rack_id, s.name)
                    elif s.hub:
                        await drop_hub_consumer(self.js, s.name)
                log.info("egress connected: url=%s, streams=%s", masked_url(self.rt.nats_url),
                         ",".join(self.tail_seq))
                signal_ready(self.rt, self.spec.name)
                return
            except Exception as exc:
                self.ratelog.warning("connect", "egress cannot reach nats yet: url=%s, "
                                     "error=%r", masked_url(self.rt.nats_url), exc)
                if self.nc is not None:
                    await self._close_quietly()
                await asyncio.sleep(0.5)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats client error: %r", exc)

    async def _close_quietly(self) -> None:
        await close_quietly(self.nc)
        self.nc = None

    def _subject_of(self, prefix: str, payload: bytes) -> str:
        """A ``<prefix>.>`` route's subject for one frame: the prefix and the frame's
        ``subject`` header; ``<prefix>._unrouted`` (logged) when it has none or a bad one."""
        try:
            tail = loads(payload)["headers"].get("subject")
        except (CBORDecodeError, KeyError, TypeError, AttributeError):
            tail = None
        if isinstance(tail, str) and TAIL_RE.match(tail):
            return prefix + tail
        self.ratelog.error("unrouted", "frame without a valid subject header published to "
                           "%s_unrouted: id=%s", prefix, frame_id_of(payload).hex())
        return prefix + "_unrouted"

    def _send(self, lane: int, views: list[memoryview]) -> _Batch:
        route = self.plan.routes[lane]
        messages = []
        stamps = []
        nbytes = 0
        prefix = route.subject[:-1] if route.subject.endswith(".>") else None
        for view in views:
            payload = bytes(view)
            msg_id = frame_id_of(payload).hex()
            subject = route.subject if prefix is None else self._subject_of(prefix, payload)
            messages.append((subject, msg_id, payload))
            ts = frame_ts_of(payload)
            if ts is not None:
                stamps.append(ts)
            nbytes += len(payload)
        n = len(messages)
        expect = self.tail_seq[route.stream] + n
        self.tail_seq[route.stream] = expect
        batch = _Batch(lane=lane, end=self.consumers[lane].position, stream=route.stream,
                       messages=messages, ts=stamps, nbytes=nbytes, expect=expect)
        return batch

    async def _publish(self, batch: _Batch) -> None:
        subject, msg_id, payload = batch.messages[-1]
        if len(batch.messages) > 1:
            wire = self._subjects[batch.lane]
            if wire.endswith(b".>"):  # per-frame subjects
                blob = b"".join([hpub(s.encode(), m.encode(), p)
                                 for s, m, p in batch.messages[:-1]])
            else:
                blob = b"".join([hpub(wire, m.encode(), p) for _, m, p in batch.messages[:-1]])
            await self.nc._send_command(blob)
        batch.ack = await self.js.publish_async(
            subject, payload, headers={"Nats-Msg-Id": msg_id})

    def _settled(self, batch: _Batch) -> None:
        self.consumers[batch.lane].commit(batch.end)
        now = time.time_ns()
        for ts in batch.ts:
            self.counters.observe(now - ts)
        n = len(batch.messages)
        self.counters.count_batch(0, n, 0, batch.nbytes)

    async def _settle_oldest(self) -> None:
        batch = self.inflight[0]
        try:
            ack = await asyncio.wait_for(asyncio.shield(batch.ack), self.plan.ack_timeout)
            ok = ack.seq == batch.expect and not ack.duplicate
        except Exception as exc:
            log.warning("egress ack failed, recovering: stream=%s, error=%r", batch.stream, exc)
            if isinstance(exc, NoStreamResponseError):
                await self._recreate_streams(batch.stream)
            ok = False
        if ok:
            self.inflight.popleft()
            self._settled(batch)
        else:
            await self._recover()

    async def _recover(self) -> None:
        """Republish every in-flight frame with acked publishes until all are stored; for as
        long as it takes (NATS away for hours is a wait, not a loss), counted and logged at
        most once per 10 s."""
        self.counters.add(ERRORS)
        pending = list(self.inflight)
        self.stats.set(self._st_waiting, sum(len(b.messages) for b in pending))
        self.inflight.clear()
        for batch in pending:
            if batch.ack is not None and not batch.ack.done():
                batch.ack.cancel()
        for batch in pending:
            remaining = list(batch.messages)
            while True:
                if self.stopping.is_set():
                    # told to stop while NATS is away: what is not stored stays in the rings,
                    # uncommitted, for the next start (egress de-duplicates by frame id)
                    log.error("egress stopping with frames not stored: frames=%d",
                              sum(len(b.messages) for b in pending))
                    self.stats.set(self._st_waiting, 0)
                    return
                try:
                    await self._wait_connected()
                    # request-style publishes, not publish_async: nats-py 2.16 loses the
                    # error of an async ack ("maximum bytes exceeded" only times out). The
                    # first alone: while JetStream refuses, one request per attempt
                    s, m, p = remaining[0]
                    await self.js.publish(s, p, headers={"Nats-Msg-Id": m})
                    results = await asyncio.wait_for(asyncio.gather(*[
                        self.js.publish(s, p, headers={"Nats-Msg-Id": m})
                        for s, m, p in remaining[1:]], return_exceptions=True),
                        self.plan.ack_timeout * 2)
                    failed = [(msg, r) for msg, r in zip(remaining[1:], results)
                              if isinstance(r, BaseException)]
                    if not failed:
                        break
                    remaining = [msg for msg, _ in failed]  # the stored ones are done
                    raise failed[0][1]
                except Exception as exc:
                    self.stats.add(self._st_retries)
                    if getattr(exc, "err_code", None) == BUDGET_FULL:
                        self.stats.add(self._st_budget)
                        self.ratelog.error("budget", "stream budget full, events wait in the "
                                           "rings until the hub takes some: stream=%s "
                                           "(intake stops when the rings fill)", batch.stream)
                    else:
                        self.ratelog.warning("republish", "egress republish failed, retrying: "
                                             "stream=%s, error=%r", batch.stream, exc)
                    if isinstance(exc, NoStreamResponseError):
                        await self._recreate_streams(batch.stream)
                    await asyncio.sleep(0.2)
            self._settled(batch)
            self.stats.add(self._st_waiting, -len(batch.messages))
        while not self.stopping.is_set():
            try:
                await self._wait_connected()
                for s in self.plan.streams:
                    self.tail_seq[s.name] = (await self.js.stream_info(s.name)).state.last_seq
                break
            except Exception as exc:
                self.ratelog.warning("state", "egress cannot read stream state, retrying: "
                                     "error=%r", exc)
                await asyncio.sleep(0.2)
        self.stats.set(self._st_waiting, 0)
        log.info("egress recovered: batches=%d", len(pending))

    async def _recreate_streams(self, stream: str) -> None:
        """A stream we publish to is gone (deleted by hand, or a wiped store): create it again
        from the plan and raise the alarm — frames waiting for it stay in their rings."""
        self.counters.add(ERRORS)
        self.stats.add(self._st_recreated)
        log.error("egress stream missing, recreating it: stream=%s", stream)
        try:
            await ensure_streams(self.js, self.plan.streams)
        except Exception as exc:
            self.ratelog.error("recreate", "egress cannot recreate streams, retrying: "
                               "error=%r", exc)

    async def _wait_connected(self) -> None:
        while not self.nc.is_connected and not self.stopping.is_set():
            await asyncio.sleep(0.05)  # nats-py offers no awaitable "reconnected" state
        if not self.nc.is_connected:
            raise ConnectionError("stopping while disconnected")

    async def run(self) -> None:
        """Serve until SIGTERM, then settle what is in flight and return."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        await self.connect()
        lanes = len(self.consumers)
        lane = 0
        while not self.stopping.is_set():
            sent = False
            if len(self.inflight) < self.plan.max_inflight and self.nc.is_connected:
                for _ in range(lanes):
                    views = self.consumers[lane].poll(self.plan.batch)
                    current = lane
                    lane = (lane + 1) % lanes
                    if views:
                        batch = self._send(current, views)
                        del views
                        self.counters.count_batch(len(batch.messages), 0, batch.nbytes, 0)
                        self.inflight.append(batch)
                        try:
                            await self._publish(batch)
                        except Exception as exc:
                            log.warning("egress publish failed, recovering: error=%r", exc)
                            await self._recover()
                        sent = True
                        break
            if self.inflight and (not sent or len(self.inflight) >= self.plan.max_inflight
                                  or self.inflight[0].ack.done()):
                await self._settle_oldest()
            elif not sent and not self.inflight:
                if self.nc.is_connected:
                    await wait_any(self.consumers, self.spec.inputs, 0.2)
                else:
                    await asyncio.sleep(0.05)  # reconnecting: nats-py offers no event for it
        while self.inflight:  # bounded: _recover gives up once stopping is set
            await self._settle_oldest()
        await self._close_quietly()


def run_egress(spec: ProcessSpec, rt: Runtime) -> None:
    """Process body of the egress process."""
    asyncio.run(EgressProcess(spec, rt).run())
