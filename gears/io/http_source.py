"""The ``http_server`` source: an HTTP/1.1 server (keep-alive, optional TLS) whose POSTs
become frames in the lane's ring. Decisions and answers are ``gears.io.httpin``'s; this is
the asyncio shell that moves bytes, waits and keeps time.

Theory of operation
-------------------
A replicated source: ``--workers N`` runs N processes accepting on the one socket the
supervisor bound (``gears.io.tcp.TcpListener``: connection caps, one accept per wake-up).
Each connection is an ``asyncio.Protocol`` feeding httptools (llhttp); the callbacks
collect only the headers the core asks for and hand the request to the core at the end of
the request line + headers (route, authentication, size, media type, concurrency, rate:
refused before a byte of the body is read) and at the end of the body (decode to frames).

Ring before answer: the frames of a request are written synchronously into the lane's
ring (``ctx.outlets["out"].try_write``) and the 200 goes out only after they are there
(``ack: ring``) or after ``ctx.durable.settle()`` says JetStream stored them (``ack:
durable``; one settle covers every request written in the same loop turn). The frames of
one request go in all at once or not at all (space is checked first), so a JSON-lines
request is never half taken.

A full ring is a return value: the request waits in a FIFO (``pending``) while a task
waits on the ring's space doorbell, up to ``queue_wait`` from its arrival; then 503 with
Retry-After. The event loop never blocks.

Answers on a connection leave in request order (pipelining): each request takes a sequence
number when it begins and an answer that is ready early waits for those before it.

Timers: a sweep (at most 1 s apart, tighter for short timeouts) answers 408 to requests
not read within ``request_timeout`` (slow senders), closes keep-alive connections idle for
``idle_timeout``, refreshes the ``Date`` header and the gauges; a waker wakes the ring's
consumer at most ``WAKE_INTERVAL`` after a write (``engine.outlet``).

A connection the server ends (a protocol error, a refusal with a body left unread, 408)
gets its answer, then a FIN, and what the client still sends is read and dropped for up to
``LINGER`` seconds, so the client reads the answer instead of a reset.

Never logged: bodies and header values (they may hold card numbers or credentials).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from engine.counters import StatDef, Stats
from engine.frame import Frame
from engine.listeners import bind
from engine.logutil import RateLimitedLog
from engine.masking import mask_card_numbers
from engine.outlet import MAIN, WAKE_INTERVAL, Outlet
from engine.ring import record_size
from engine.schema import At
from gears.base import Source
from gears.io import httpin
from gears.io.httpin import (
    CONTINUE,
    DATA,
    HEALTH_LIVE,
    REFUSALS,
    SETTINGS,
    STATUSES,
    Head,
    HttpIn,
    HttpSettings,
    Refusal,
)
from gears.io.tcp import ListenLimits, TcpListener

log = logging.getLogger("fluxrig.io.http")

LINGER = 2.0  # s: how long an ending connection keeps reading (and dropping) what comes
MAX_PIPELINED = 32  # answers waiting on one connection before it is no longer read
REFUSED_CONNS = ("max_connections", "max_per_address", "no_file_descriptors")
TLS_HANDSHAKE_TIMEOUT = 10.0

# what on_header does with a header (by lower-cased name)
_CT, _AUTH, _CL, _EXPECT, _TE, _COPY = range(6)


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing this connection's input."""


def stat_defs(s: HttpSettings) -> tuple[StatDef, ...]:
    """Every stat of the ``http_server`` source."""
    return (
        *(StatDef("http.requests", "counter", "Requests answered, by status.",
                  (("status", str(code)),)) for code in STATUSES),
        *(StatDef("http.refused", "counter", "Requests refused, by reason.",
                  (("reason", r),)) for r in REFUSALS),
        StatDef("http.frames", "counter", "Frames written to the ring."),
        StatDef("http.backpressure", "counter", "Requests that waited for ring space."),
        StatDef("http.inflight", "gauge", "Requests read and not yet answered."),
        StatDef("http.connections", "gauge", "Open connections."),
        *(StatDef("http.connections_refused", "counter", "Connections refused at accept.",
                  (("reason", r),)) for r in REFUSED_CONNS),
    )


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with ``cert`` and ``key`` loaded.

    Raises:
        OSError, ssl.SSLError: a file is missing or not a matching PEM certificate/key.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class HttpSource(Source):
    """``gear: http_server`` — POSTed JSON, CBOR, JSON lines or raw bytes as frames.

    One process per lane (``--workers N``) on the socket the supervisor bound; the answer
    follows the ring write (``ack: ring``) or JetStream's ack (``ack: durable``). ``GET
    /live`` and ``GET /ready`` are the only routes answered without authentication.
    """

    replicated = True
    signals_ready = True  # once accepting
    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> HttpSettings:
        s = httpin.parse_settings(raw, at)
        if s.tls is not None:  # relative to the rig file, checked now so engine check sees it
            base = os.path.dirname(os.path.abspath(at.file)) if at.file else os.getcwd()
            cert = os.path.join(base, s.tls.cert)
            key = os.path.join(base, s.tls.key)
            try:
                server_tls(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise at.key("tls").error(f"cannot load certificate and key: cert={cert}, "
                                          f"key={key}, error={exc}") from None
            s = _replace_tls(s, httpin.TlsSettings(cert=cert, key=key))
        return s

    @classmethod
    def stat_defs(cls, settings: HttpSettings) -> tuple[StatDef, ...]:
        return stat_defs(settings)

    @classmethod
    def listeners(cls, settings: HttpSettings) -> tuple[tuple[str, int], ...]:
        return ((settings.host, settings.port),)

    @classmethod
    def needs_durable(cls, settings: HttpSettings) -> bool:
        return settings.ack == "durable"

    @classmethod
    def describe(cls, settings: HttpSettings) -> tuple[str, ...]:
        scheme = "https" if settings.tls else "http"
        paths = ",".join(sorted(p.decode() for p in settings.paths))
        line = (f"http_server: {scheme}://{settings.host}:{settings.port} paths={paths} "
                f"auth={settings.auth.scheme} ack={settings.ack}")
        return (line,)

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        s: HttpSettings = self.settings
        ctx = self.ctx
        outlet = ctx.outlets.get(MAIN)
        if outlet is None:
            raise RuntimeError(f"http_server has no lane outlet: pipeline={ctx.pipeline}, "
                               f"gear={ctx.name}")
        durable = getattr(ctx, "durable", None)
        if s.ack == "durable" and durable is None:
            raise RuntimeError(f"http_server ack=durable needs an egress sink in its pipeline: "
                               f"pipeline={ctx.pipeline}, gear={ctx.name}")
        stats = ctx.stats if ctx.stats is not None else Stats.local(stat_defs(s))
        server = HttpServer(s, outlet=outlet, stats=stats, src=f"{ctx.pipeline}.{ctx.name}",
                            durable=durable if s.ack == "durable" else None)
        sock = ctx.listeners[0] if ctx.listeners else bind(s.host, s.port)
        port = server.start(sock, siblings=max(1, ctx.replicas) if ctx.listeners else 1)
        ctx.log.info("http server listening: port=%d, replica=%d, tls=%s, ack=%s", port,
                     ctx.replica, s.tls is not None, s.ack)
        if s.max_body > server.core.max_payload:
            ctx.log.warning("max_body exceeds the largest frame the ring takes: larger "
                            "frames get 413: max_body=%d, max_frame=%d (rings.capacity / 8)",
                            s.max_body, server.core.max_payload)
        ctx.ready()
        try:
            await stopping.wait()
        finally:
            if not await server.drain(s.queue_wait + s.durable_timeout + 1.0):
                ctx.log.error("http server drain incomplete: inflight=%d, pending=%d",
                              server.inflight, len(server.pending))
            await server.stop()


def _replace_tls(s: HttpSettings, tls: httpin.TlsSettings) -> HttpSettings:
    from dataclasses import replace

    return replace(s, tls=tls)


class _Job:
    """A request whose frames are decoded and not yet in the ring (or not yet acked)."""

    __slots__ = ("conn", "deadline", "ids", "keep_alive", "need", "payloads", "seq")

    def __init__(self, conn: Conn, seq: int, payloads: list[bytes], ids: list[str],
                 need: int, keep_alive: bool):
        self.conn = conn
        self.seq = seq
        self.payloads = payloads
        self.ids = ids
        self.need = need
        self.deadline = 0.0
        self.keep_alive = keep_alive


class HttpServer:
    """Everything one server process holds: connections, the waiting requests, timers."""

    def __init__(self, s: HttpSettings, *, outlet: Outlet, stats: Stats, src: str,
                 durable: Any = None):
        self.s = s
        self.loop = asyncio.get_running_loop()
        self.outlet = outlet
        self.producer = outlet.producer
        self.capacity: int = outlet.producer.capacity
        self.core = HttpIn(s, src, outlet.producer.max_payload, self.loop.time())
        self.durable = durable
        self.stats = stats
        self.ratelog = RateLimitedLog(log)
        self.conns: set[Conn] = set()
        self.inflight = 0
        self.pending: deque[_Job] = deque()
        self.accepting = False
        self.draining = False
        self.listener: TcpListener | None = None
        self.wanted: dict[bytes, int] = {b"content-type": _CT, b"authorization": _AUTH,
                                         b"content-length": _CL, b"expect": _EXPECT,
                                         b"transfer-encoding": _TE}
        for name in self.core.copied_names:
            self.wanted.setdefault(name, _COPY)
        self._space_task: asyncio.Task[None] | None = None
        self._durable_batch: list[_Job] = []
        self._turn: list[_Job] = []  # decoded this loop turn, written at its end
        self._tasks: set[asyncio.Task[None]] = set()
        self._waker: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._quiet: asyncio.Event | None = None
        timeouts = [t for t in (s.request_timeout, s.idle_timeout) if t > 0]
        self.sweep_every = min(1.0, max(0.02, min(timeouts) / 4))
        self.tls = server_tls(s.tls.cert, s.tls.key) if s.tls is not None else None
        st = stats.slot
        self.st_status = {code: st("http.requests", status=str(code)) for code in STATUSES}
        self.st_refused = {r: st("http.refused", reason=r) for r in REFUSALS}
        self.st_conn_refused = {r: st("http.connections_refused", reason=r)
                                for r in REFUSED_CONNS}
        self.st_frames = st("http.frames")
        self.st_backpressure = st("http.backpressure")
        self.st_inflight = st("http.inflight")
        self.st_conns = st("http.connections")
        self.values = stats.values
        self.ok_slot = self.st_status[200]

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, sock: socket.socket, siblings: int = 1) -> int:
        """Begin accepting on ``sock`` (shared with ``siblings`` processes); the port."""
        limits = ListenLimits(max_connections=self.s.max_connections,
                              max_per_address=self.s.max_per_address)
        name = f"http {self.s.host}:{self.s.port}"
        self.listener = TcpListener(sock, self._new_conn, limits, self._conn_refused,
                                    name=name, siblings=siblings, tls=self.tls,
                                    tls_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.listener.start()
        self.accepting = True
        self._sweeper = self.loop.call_later(self.sweep_every, self._sweep)
        return sock.getsockname()[1]

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; answer what was read; close connections once they are quiet.
        True if everything was answered within ``timeout``."""
        self.accepting = False
        self.draining = True
        if self.listener is not None:
            self.listener.close()
        self._quiet = asyncio.Event()
        for conn in list(self.conns):
            conn.close_if_idle()
        self._check_quiet()
        try:
            await asyncio.wait_for(self._quiet.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _check_quiet(self) -> None:
        if self._quiet is not None and not self.inflight and not self.pending \
                and not self._turn and not any(
                c.started for c in self.conns):
            self._quiet.set()

    async def stop(self) -> None:
        """Close every connection, cancel timers and tasks, wake the ring's consumer."""
        if self.listener is not None:
            self.listener.close()
        for handle in (self._waker, self._sweeper):
            if handle is not None:
                handle.cancel()
        self.outlet.wake_pending()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        tasks = list(self._tasks) + ([self._space_task] if self._space_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- connections ------------------------------------------------------------------------

    def _new_conn(self) -> Conn:
        return Conn(self)

    def _conn_refused(self, reason: str) -> None:
        self.values[self.st_conn_refused[reason]] += 1

    def closed(self, conn: Conn) -> None:
        """``conn`` is gone: free its place."""
        self.conns.discard(conn)
        if self.listener is not None:
            self.listener.release(conn.host)
        if self.draining:
            self._check_quiet()

    def ready(self) -> bool:
        """``/ready``: accepting, nothing waiting for ring space, room for a largest record."""
        return (self.accepting and not self.pending
                and self.producer.free_bytes() >= self.capacity // 8)

    # -- answers ----------------------------------------------------------------------------

    def count(self, status: int, reason: str | None = None) -> None:
        """Count an answer (and, for a refusal, its reason)."""
        v = self.values
        v[self.st_status.get(status, self.st_status[500])] += 1
        if reason is not None:
            v[self.st_refused[reason]] += 1

    def refuse(self, conn: Conn, seq: int, r: Refusal, keep_alive: bool,
               admitted: bool) -> None:
        """Answer ``r`` (``admitted``: the request counted as in flight)."""
        if admitted:
            self._done()
        self.count(r.status, r.reason)
        close = r.close or not keep_alive
        conn.respond(seq, self.core.render(r, keep_alive and not close), close)

    def _done(self) -> None:
        self.inflight -= 1
        if self.draining:
            self._check_quiet()

    def _ok(self, job: _Job) -> None:
        self.inflight -= 1
        self.values[self.ok_slot] += 1
        job.conn.respond(job.seq, self.core.ok(job.ids, job.keep_alive), not job.keep_alive)
        if self.draining:
            self._check_quiet()

    # -- the data path ----------------------------------------------------------------------

    def submit(self, conn: Conn, seq: int, head: Head, body: bytes, keep_alive: bool) -> None:
        """A complete, admitted data request: decode, write, answer (now or later)."""
        res = self.core.frames(head, body, time.time_ns())
        if isinstance(res, Refusal):
            self.refuse(conn, seq, res, keep_alive, True)
            return
        payloads = res.payloads
        if len(payloads) == 1:
            rs = record_size(len(payloads[0]))
            need = 2 * rs  # room for it even after a wrap padding
        else:
            sizes = [record_size(len(p)) for p in payloads]
            need = sum(sizes) + max(sizes)
        if need > self.capacity:
            self.refuse(conn, seq, Refusal(
                status=413, reason="too_large",
                error=f"request needs more than the ring holds: frames={len(payloads)}, "
                      f"bytes={need}, capacity={self.capacity}"), keep_alive, True)
            return
        job = _Job(conn, seq, payloads, res.ids, need, keep_alive)
        # written at the end of this loop turn with every other request read in it: one
        # ring write (and one count) for the lot instead of one per request
        if not self._turn:
            self.loop.call_soon(self._flush_turn)
        self._turn.append(job)

    def _flush_turn(self) -> None:
        jobs, self._turn = self._turn, []
        if not self.pending:
            payloads = [p for job in jobs for p in job.payloads] if len(jobs) > 1 \
                else jobs[0].payloads
            sizes = [record_size(len(p)) for p in payloads]
            if self.producer.free_bytes() >= sum(sizes) + max(sizes):  # with a wrap padding
                n = self.outlet.try_write(payloads)
                assert n == len(payloads), "space checked before the write"
                for job in jobs:
                    self._written(job)
                return
            while jobs:  # not all fit: in order, each request whole or not at all
                job = jobs[0]
                if self.producer.free_bytes() < job.need:
                    break
                n = self.outlet.try_write(job.payloads)
                assert n == len(job.payloads), "space checked before the write"
                self._written(jobs.pop(0))
        deadline = self.loop.time() + self.s.queue_wait
        for job in jobs:
            job.deadline = deadline
            self.pending.append(job)
        self.values[self.st_backpressure] += len(jobs)
        if jobs and self._space_task is None:
            self._space_task = self.loop.create_task(self._wait_space())

    def _written(self, job: _Job) -> None:
        self.values[self.st_frames] += len(job.payloads)
        if self.durable is not None:
            if not self._durable_batch:  # one settle for every request of this loop turn
                self.loop.call_soon(self._settle_batch)
            self._durable_batch.append(job)
            return
        if self._waker is None and self.outlet.pending:
            self._waker = self.loop.call_later(WAKE_INTERVAL, self._wake)
        self._ok(job)

    def _wake(self) -> None:
        self._waker = None
        self.outlet.wake_pending()

    async def _wait_space(self) -> None:
        """Write waiting requests in order as space frees; 503 those whose ``queue_wait``
        ran out."""
        try:
            pending = self.pending
            while pending:
                job = pending[0]
                left = job.deadline - self.loop.time()
                if left > 0 and await self.producer.wait_free_async(job.need, left):
                    while pending and self.producer.free_bytes() >= pending[0].need:
                        job = pending.popleft()
                        n = self.outlet.try_write(job.payloads)
                        assert n == len(job.payloads), "space checked before the write"
                        self._written(job)
                    continue
                if pending and pending[0] is job:
                    pending.popleft()
                    self.refuse(job.conn, job.seq, Refusal(
                        status=503, reason="ring_full", error="busy: queue full",
                        retry_after=1), job.keep_alive, True)
        finally:
            self._space_task = None

    def _settle_batch(self) -> None:
        batch, self._durable_batch = self._durable_batch, []
        self.outlet.wake_pending()  # the client waits on this one: no lazy wake-up
        task = self.loop.create_task(self._settle(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, batch: list[_Job]) -> None:
        try:
            await asyncio.wait_for(self.durable.settle(), self.s.durable_timeout)
        except Exception as exc:  # noqa: BLE001 - a timeout or a broken settle: same answer
            if not isinstance(exc, TimeoutError):
                self.ratelog.error("settle", "durable settle failed: error=%r", exc)
            for job in batch:
                self.refuse(job.conn, job.seq, Refusal(
                    status=504, reason="durable_timeout",
                    error="in the ring, not confirmed stored in time; retry with the same "
                          "idempotency key", ids=tuple(job.ids)), job.keep_alive, True)
            return
        for job in batch:
            self._ok(job)

    # -- timers -----------------------------------------------------------------------------

    def _sweep(self) -> None:
        try:
            now = self.loop.time()
            self.core.tick(time.time())
            rt, it = self.s.request_timeout, self.s.idle_timeout
            for conn in list(self.conns):
                conn.check_time(now, rt, it)
            self.values[self.st_inflight] = self.inflight
            self.values[self.st_conns] = len(self.conns)
        except Exception as exc:  # noqa: BLE001 - the timer must live on
            self.ratelog.error("sweep", "http sweep failed: error=%r", exc, exc_info=exc)
        finally:
            self._sweeper = self.loop.call_later(self.sweep_every, self._sweep)


class Conn(asyncio.Protocol):
    """One client connection: httptools callbacks in, ordered answers out."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.core = server.core
        self.s = server.s
        self.parser = httptools.HttpRequestParser(self)
        self.max_headers = server.s.max_headers
        self.max_header_size = server.s.max_header_size
        self.transport: asyncio.Transport | None = None
        self.host = ""
        self.loop = server.loop
        self.last = 0.0
        self.started = 0.0  # when the request being read began; 0: none
        self.seq = 0  # the request being read
        self.next_seq = 0
        self.write_seq = 0  # the next answer to write
        self.waiting: dict[int, tuple[bytes, bool]] = {}  # answers ready early
        self.head: Head | None = None
        self.url = b""
        self.route: int | Refusal = 0
        self.admitted = False
        self.expect = False
        self.chunked = False
        self.body: list[bytes] = []
        self.body_len = 0
        self.head_bytes = 0
        self.nheaders = 0
        self.head_fed = 0  # bytes fed since the last request's headers ended
        self.in_head = True
        self.closing = False  # answered for the last time: input is dropped
        self.finished = False  # FIN sent: nothing more may be written
        self.paused = False
        self.eof = False  # the client half-closed: close once every answer is written

    # -- transport callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.host = peer[0] if isinstance(peer, tuple) else str(peer)
        self.last = self.loop.time()
        self.server.conns.add(self)
        if self.server.draining:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:  # read, not yet handed over: no answer will come
            self.admitted = False
            self.server._done()
        self.started = 0.0
        self.closing = True
        self.server.closed(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after our last answer: dropped
        if self.in_head:
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                self._protocol_error("internal error")
                self.server.ratelog.error("callback", "http callback failed: error=%r",
                                          exc.__context__)
            return
        except httptools.HttpParserUpgrade:
            self._protocol_error("upgrade not supported")
            return
        except httptools.HttpParserError as exc:
            self._protocol_error(f"malformed request: {_reason(exc)}")
            return
        if self.in_head and self.head_fed > self.s.max_header_size:
            self._protocol_error("request line and headers too large", status=431,
                                 reason="headers_too_large")

    def eof_received(self) -> bool | None:
        # the client is done sending (a half-close): answer what it sent, then close
        if self.closing or (not self.started and self.write_seq == self.next_seq):
            return False
        self.eof = True
        return True

    def pause_writing(self) -> None:  # the client does not read its answers
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.paused and not self.closing:
            self.transport.resume_reading()

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.started = self.loop.time()
        self.seq = self.next_seq
        self.next_seq += 1
        self.head = Head(b"", b"")
        self.url = b""
        self.route = 0
        self.admitted = self.expect = self.chunked = False
        self.body = []
        self.body_len = self.head_bytes = self.nheaders = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.max_header_size:  # a 20 KB URL in one packet: 431 too
            self._protocol_error("request line and headers too large", status=431,
                                 reason="headers_too_large")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nheaders += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.nheaders > self.max_headers or self.head_bytes > self.max_header_size:
            self._protocol_error("request line and headers too large", status=431,
                                 reason="headers_too_large")
            raise _Stop
        lname = name.lower()
        what = self.server.wanted.get(lname)
        if what is None:
            return
        head = self.head
        assert head is not None
        if what == _CT:
            head.content_type = value
        elif what == _AUTH:
            if head.authorization is not None:  # which one counts? a proxy may disagree
                self._protocol_error("more than one Authorization header")
                raise _Stop
            head.authorization = value
        elif what == _CL:
            head.content_length = int(value)  # llhttp checked: digits, one value
        elif what == _EXPECT:
            self.expect = value.strip().lower() == b"100-continue"
        elif what == _TE:
            # llhttp checked that chunked comes last; any other coding (gzip, deflate) would
            # hand the stages a body still encoded: 501, as RFC 9112 asks
            if value.replace(b" ", b"").lower() != b"chunked":
                self._protocol_error("transfer coding not implemented (chunked only)",
                                     status=501, reason="protocol")
                raise _Stop
            self.chunked = True
        else:
            if head.copied is None:
                head.copied = {}
            # a header value reaches JetStream as it is: no card number in one (a sender put
            # a PAN in Idempotency-Key, copied by default, in a probe)
            head.copied[self.core.copied_names[lname]] = mask_card_numbers(
                value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_fed = 0
        head = self.head
        assert head is not None
        if self.parser.should_upgrade():
            # llhttp ends an upgrade request at its headers and hands the rest over as the
            # new protocol: its body would be lost and read as the next request (curl
            # --http2 got a 400 about empty JSON, then a second answer). One clear refusal.
            self._protocol_error("protocol upgrade not supported (h2c, websocket): send "
                                 "plain HTTP/1.1 without Upgrade")
            raise _Stop
        head.method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0].split(b"#", 1)[0]
        if path[:7].lower() == b"http://" or path[:8].lower() == b"https://":
            # absolute-form (a client talking to a proxy): RFC 9112 3.2.2, the path after
            # the authority counts
            path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
        head.path = path
        route = self.core.route(head.method, path)
        if type(route) is int and route == DATA:
            refusal = self.core.admit(head, self.loop.time(), self.server.inflight)
            if refusal is None:
                self.server.inflight += 1
                self.admitted = True
                self.route = DATA
                if self.expect and self.write_seq == self.seq and self.transport is not None \
                        and self.parser.get_http_version() == "1.1":  # never to 1.0 clients
                    self.transport.write(CONTINUE)
                return
            route = refusal
        self.route = route
        if type(route) is Refusal and (head.content_length > self.s.max_body or (
                self.expect and (head.content_length > 0 or self.chunked))):
            # a body too large to read through, or a client waiting for a go-ahead before
            # its body: answer now and end the connection
            self.server.refuse(self, self.seq, route, False, False)
            self._end_reading()
            raise _Stop
        # otherwise a body of a refused request is read and dropped (within max_body) and
        # the refusal answered at its end: the connection stays usable (a 429 or 401 does
        # not cost the client a reconnect)

    def on_body(self, chunk: bytes) -> None:
        self.body_len += len(chunk)
        if self.body_len > self.s.max_body:
            admitted, self.admitted = self.admitted, False
            self.server.refuse(self, self.seq, self.core.too_large(), False, admitted)
            self._end_reading()
            raise _Stop
        if self.admitted:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.started = 0.0
        self.in_head = True
        self.last = self.loop.time()
        keep_alive = self.parser.should_keep_alive() and not self.server.draining
        route = self.route
        server = self.server
        if type(route) is Refusal:
            server.refuse(self, self.seq, route, keep_alive, False)
        elif route == DATA:
            self.admitted = False
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.body = []
            server.submit(self, self.seq, self.head, body, keep_alive)  # type: ignore[arg-type]
        else:
            up = route == HEALTH_LIVE or server.ready()
            server.count(200 if up else 503, None if up else "busy")
            head_only = self.head is not None and self.head.method == b"HEAD"
            self.respond(self.seq, self.core.health(up, keep_alive, head_only), not keep_alive)
        if self.next_seq - self.write_seq > MAX_PIPELINED and not self.paused:
            self.paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        if server.draining:
            server._check_quiet()
        if not keep_alive:  # nothing after a request that ends the connection is read
            self._end_reading()
            raise _Stop

    # -- answers ----------------------------------------------------------------------------

    def respond(self, seq: int, data: bytes, close: bool) -> None:
        """Send the answer of request ``seq`` once the answers before it are sent;
        ``close``: end the connection after it."""
        if self.transport is None or self.transport.is_closing() or self.finished:
            if seq == self.write_seq:  # the connection ended (a FIN sent): nothing more goes
                self.write_seq += 1
            return
        if seq != self.write_seq:
            self.waiting[seq] = (data, close)
            return
        while True:
            self.transport.write(data)
            self.write_seq += 1
            if close:
                self._finish()
                return
            nxt = self.waiting.pop(self.write_seq, None)
            if nxt is None:
                break
            data, close = nxt
        if self.paused and self.next_seq - self.write_seq <= MAX_PIPELINED // 2:
            self.paused = False
            self.transport.resume_reading()
        if (self.server.draining or self.eof) and self.write_seq == self.next_seq \
                and not self.started:
            self._finish()

    def _end_reading(self) -> None:
        """Nothing more of this connection's input will be parsed."""
        self.closing = True
        self.started = 0.0
        if self.admitted:
            self.admitted = False
            self.server._done()

    def _finish(self) -> None:
        """After the last answer: FIN, then drop what still comes for up to ``LINGER``."""
        self.closing = True
        self.finished = True
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.eof:  # the client closed its side already: nothing more will come
            t.close()
        elif t.can_write_eof():
            t.write_eof()
            self.loop.call_later(LINGER, t.abort)
        else:  # TLS: close_notify and close
            t.close()

    def _protocol_error(self, error: str, status: int = 400, reason: str = "protocol") -> None:
        seq = self.seq if self.started else self.next_seq
        if not self.started:
            self.next_seq += 1
        admitted, self.admitted = self.admitted, False
        self._end_reading()
        self.server.refuse(self, seq, Refusal(status=status, reason=reason, error=error,
                                              close=True), False, admitted)

    def close_if_idle(self) -> None:
        """Draining: close now if no request is being read or answered."""
        if not self.started and self.write_seq == self.next_seq and self.transport is not None:
            self._finish()

    def check_time(self, now: float, request_timeout: float, idle_timeout: float) -> None:
        """The sweep: 408 a request read too slowly; close a connection idle too long."""
        if self.closing or self.transport is None:
            return
        if self.started:
            if now - self.started > request_timeout:
                self._protocol_error("request not received in time", status=408,
                                     reason="timeout")
        elif idle_timeout and self.write_seq == self.next_seq and now - self.last > idle_timeout:
            self.closing = True
            self.transport.close()


def _reason(exc: Exception) -> str:
    """llhttp's reason, printable and short (it never holds the client's bytes)."""
    text = str(exc)
    return "".join(c if c.isprintable() else "?" for c in text)[:80]
