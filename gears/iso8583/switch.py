"""The ISO 8583 switch's asyncio shell around ``SwitchCore`` (the gear is ``gear.py``).

Theory of operation
-------------------
One switch process per lane (``--workers N`` runs N; they all accept on the one listening
socket the supervisor bound before forking, so a connection stays in one process and keeps
its order) runs the whole transaction path on one event loop. The decisions are the
core's (``gears.iso8583.core``); this module only moves bytes and timers:

* acquirer connections (``AcquirerConn``) and issuer links (``IssuerLink``) are
  ``FramedProtocol``s that hand whole messages to the core;
* the core's actions are queued and carried out once per loop turn (``_flush``): first every
  ``Record`` is written to its outlet ring (the audit events to the lane ring, reversals to
  the ``saf`` ring), then — up to the first record that did not fit — answers and forwards are
  written, one ``write`` per connection, then journal slots are closed. So an answer never
  leaves before its audit event is in shared memory;
* a full ring is backpressure: the actions after the first unwritten record wait in the
  queue (bounded by what is in flight: no new request is read), every acquirer connection
  is paused, and a task waits on the ring's space doorbell;
* timers: the deadline timer is armed at the core's next deadline (10 ms granularity; none
  while nothing is in flight) and a 1 s sweep closes idle and slow connections, reloads the
  key ring after ``engine keys rotate`` and updates gauges. Both are guarded: an exception
  is counted, logged (rate-limited) and the timer lives on;
* at start the core settles what a predecessor left in the journal before anything is
  accepted; on stop the switch drains: no new connection, no new request read, everything
  in flight answered or timed out (91 + reversal), every record written; then connections
  end in order (``FramedProtocol.finish``: answers, FIN, linger), as for a bad message.

Issuer links: ``connections`` persistent TCP links per issuer, reconnecting with backoff
(0.1 s doubling to 5 s); a link idle for ``echo_interval`` sends a 0800 echo (DE70 301).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Mapping

from engine.counters import Stats
from engine.journal import Journal
from engine.listeners import bind
from engine.logutil import RateLimitedLog
from engine.outlet import WAKE_INTERVAL, Outlet
from engine.ring import RecordTooLargeError
from engine.tap import OFF, Tracer
from gears.coatcheck import KeyRing
from gears.io.tcp import ListenLimits, TcpListener
from gears.iso8583.conns import AcquirerConn, IssuerLink, finish_all
from gears.iso8583.core import (
    CLOSED_REASONS,
    REFUSED_REASONS,
    Action,
    Answer,
    Close,
    Forward,
    Record,
    Release,
    ReversalResponse,
    SwitchCore,
)
from gears.iso8583.saf import SafSender
from gears.iso8583.settings import SwitchSettings
from gears.iso8583.tracing import SENT, TxnTrace, finish_traces, mono_ns

log = logging.getLogger("fluxrig.iso.switch")

TIMER_GRANULARITY = 0.01  # deadlines fire at most this late; bounds timer wake-ups
SWEEP_INTERVAL = 1.0
LINGER = 2.0  # how long an ending connection waits for the peer's FIN before an abort



class SwitchShell:
    """Everything one switch process holds around its core; driven by the gear or tests."""

    def __init__(self, s: SwitchSettings, *, outlets: Mapping[str, Outlet], journal: Journal,
                 stats: Stats, keyring: KeyRing | None = None, src: str = "iso8583",
                 replica: int = 0, tracer: Tracer = OFF):
        self.s = s
        self.outlets = outlets
        self.journal = journal
        self.stats = stats
        self.keyring = keyring
        self.core = SwitchCore(s, stats=stats, journal=journal, keyring=keyring, src=src,
                               replica=replica, tracer=tracer)
        self.tracer, self.tracing = tracer, tracer.on
        self.coat_check = s.coatcheck is not None
        self.loop = asyncio.get_running_loop()
        self.ratelog = RateLimitedLog(log)
        self.conns: dict[int, AcquirerConn] = {}
        self.links: dict[str, list[IssuerLink]] = {}
        self.listener: TcpListener | None = None
        self.saf: SafSender | None = None
        self.blocked = False
        self.draining = False
        self._queue: deque[Action] = deque()
        self._scheduled = False
        self._next_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._waker: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._space_task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._settled.set()
        self._drained: asyncio.Event | None = None  # set once draining and nothing in flight
        self._link_event = asyncio.Event()
        st = stats.slot
        self._st_conns = st("iso8583.connections")
        self._st_refused = {r: st("iso8583.connections_refused", reason=r)
                            for r in REFUSED_REASONS}
        self._st_closed = {r: st("iso8583.connections_closed", reason=r) for r in CLOSED_REASONS}
        self._st_backpressure = st("iso8583.backpressure")
        self._st_blocked = st("iso8583.blocked")

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None, siblings: int = 1) -> int:
        """Settle the journal, connect issuer links, listen (on ``sock`` shared with
        ``siblings`` replicas, when given); returns the bound port."""
        self.handle(self.core.recover(self.journal.take_over()))
        await self.settled()
        for issuer in self.s.issuers:
            self.links[issuer.name] = [IssuerLink(self, issuer, i)
                                       for i in range(issuer.connections)]
            for link in self.links[issuer.name]:
                self._tasks.append(self.loop.create_task(link.run()))
        lst = self.s.listen
        if sock is None:  # a rack hands its replicas the socket its supervisor bound
            sock = bind(lst.host, lst.port)
        self.listener = TcpListener(
            sock, self._new_conn, ListenLimits(max_connections=lst.max_connections,
                                               max_per_address=lst.max_per_address),
            self._refused, name=f"acquirer {lst.host}:{lst.port}", siblings=siblings)
        self.listener.start()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        return sock.getsockname()[1]

    async def links_up(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) until every issuer has a link up; True if they do."""
        deadline = self.loop.time() + timeout
        want = {i.name for i in self.s.issuers}
        while not want <= self.core.router.up:
            self._link_event.clear()
            try:
                await asyncio.wait_for(self._link_event.wait(), deadline - self.loop.time())
            except TimeoutError:
                return want <= self.core.router.up
        return True

    def link_changed(self) -> None:
        """An issuer link connected or dropped (``conns.IssuerLink``)."""
        self._link_event.set()

    async def settled(self) -> None:
        """Wait until every queued action is carried out (records written)."""
        await self._settled.wait()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and reading; wait (up to ``timeout``) until everything in flight is
        answered or timed out and recorded. True if it got there."""
        self.draining = True
        if self.listener is not None:
            self.listener.close()
        for conn in self.conns.values():
            conn.pause()
        self._drained = asyncio.Event()
        self._check_drained()
        try:  # the matcher empties by responses and deadlines, each ending in a _flush
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _check_drained(self) -> None:
        if self._drained is not None and not self._queue and not len(self.core.matcher):
            self._drained.set()

    async def stop(self) -> None:
        """Close every connection and link, cancel timers and tasks."""
        if self.listener is not None:
            self.listener.close()
        for handle in (self._timer, self._sweeper, self._waker):
            if handle is not None:
                handle.cancel()
        self._wake_outlets()
        await finish_all(list(self.conns.values()), LINGER)
        for links in self.links.values():
            for link in links:
                link.close()
        for task in self._tasks + ([self._space_task] if self._space_task else []):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- connections ------------------------------------------------------------------------

    def _new_conn(self) -> AcquirerConn:
        self._next_id += 1
        return AcquirerConn(self, self._next_id)

    def opened(self, conn: AcquirerConn) -> None:
        """An acquirer connection is up."""
        self.conns[conn.id] = conn
        self.core.opened(conn.id)
        self.stats.set(self._st_conns, len(self.conns))
        if self.blocked or self.draining:
            conn.pause()

    def closed(self, conn: AcquirerConn) -> None:
        """An acquirer connection is gone."""
        if self.conns.pop(conn.id, None) is not None and self.listener is not None:
            self.listener.release(conn.host)
        self.core.closed(conn.id)
        self.stats.set(self._st_conns, len(self.conns))

    def _refused(self, reason: str) -> None:
        self.stats.add(self._st_refused[reason])

    # -- actions ----------------------------------------------------------------------------

    def guarded(self, fn: Callable[..., list[Action]], *args: object) -> None:
        """Run a core entry point and queue its actions; an exception is contained: counted,
        logged (rate-limited, no message data) and the switch goes on."""
        try:
            actions = fn(*args)
        except Exception as exc:  # a bug must cost one message, not the process
            self.core.contained_error()
            self.ratelog.error(f"bug.{fn.__name__}", "internal error contained: call=%s, "
                               "error=%s", fn.__name__, type(exc).__name__, exc_info=exc)
            return
        if actions:
            self.handle(actions)
            if self._timer is None:
                self._arm()

    def handle(self, actions: list[Action]) -> None:
        """Queue actions; they are carried out at the end of this loop turn, in order."""
        self._queue.extend(actions)
        if not self._scheduled:
            self._scheduled = True
            self._settled.clear()
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        q = self._queue
        if not q:
            self._settled.set()
            self._check_drained()
            return
        # 1. records, one ring write per outlet (each outlet writes a prefix of its list)
        batches: dict[str, list[Record]] = {}
        for a in q:
            if isinstance(a, Record) and not a.done:
                batches.setdefault(a.outlet, []).append(a)
        for name, recs in batches.items():
            try:
                n = self.outlets[name].try_write([r.frame for r in recs])
            except RecordTooLargeError as exc:  # cannot happen for our events; never wedge
                n = exc.index
                recs[n].done = True
                self.core.contained_error()
                self.ratelog.error("toolarge", "record dropped: %s", exc)
            for r in recs[:n]:
                r.done = True
        recorded = mono_ns() if self.tracing else 0
        # 2. everything up to the first record that is not written yet
        journal = self.journal
        out_conns: dict[int, list[Answer]] = {}
        out_links: dict[tuple[str, int], list[bytes]] = {}
        sent: list[TxnTrace] = []
        releases: list[int] = []
        closes: list[Close] = []
        undelivered: list[Answer] = []
        cut = 0
        for a in q:
            if isinstance(a, Record):
                if not a.done:
                    break
            elif isinstance(a, Answer):
                conn = self.conns.get(a.conn)
                if conn is None or conn.transport is None:
                    undelivered.append(a)
                else:
                    if a.reverse:  # an approval whose delivery is now pending
                        journal.decide(a.slot, True)
                    out_conns.setdefault(a.conn, []).append(a)
            elif isinstance(a, Forward):
                out_links.setdefault((a.issuer, a.link), []).append(a.data)
                if a.trace is not None:
                    sent.append(a.trace)
            elif isinstance(a, Release):
                releases.append(a.slot)
            elif isinstance(a, Close):
                closes.append(a)
            elif isinstance(a, ReversalResponse):
                if self.saf is None or not self.saf.on_response(a.key, a.de39):
                    self.ratelog.warning("revresp", "unexpected reversal response: issuer=%s",
                                         a.issuer)
            cut += 1
        for _ in range(cut):
            q.popleft()
        # 3. the bytes leave, then the slots close (delivery handed to the kernel)
        for conn_id, answers in out_conns.items():
            conn = self.conns[conn_id]
            frame = conn.framer.frame
            if conn.write_now(b"".join([frame(a.data, a.header) for a in answers])):
                releases += [a.slot for a in answers if a.slot >= 0]
                if self.tracing:
                    finish_traces(self.tracer, answers, recorded, conn.host, self.coat_check)
            else:  # closing under us: nothing of it reached the kernel
                undelivered += answers
        for (issuer, n), parts in out_links.items():
            link = self.links[issuer][n]
            header = link.issuer.link.header
            link.write_now(b"".join(link.framer.frame(p, header) for p in parts))
            link.last_io = self.loop.time()
        if sent:
            at = mono_ns()
            for tr in sent:
                tr.t[SENT] = at
        for slot in releases:
            journal.close(slot)
        for c in closes:
            conn = self.conns.get(c.conn)
            if conn is not None:
                conn.closing = True
                conn.finish(LINGER)
                self.stats.add(self._st_closed[c.reason])
        for a in undelivered:
            self.guarded(self.core.undeliverable, a, self.loop.time())
        if q:
            self._block()
        elif self.blocked:
            self._unblock()
        if self._waker is None and any(o.pending for o in self.outlets.values()):
            self._waker = self.loop.call_later(WAKE_INTERVAL, self._wake_outlets)
        if not q and not self._scheduled:
            self._settled.set()
            self._check_drained()

    def _wake_outlets(self) -> None:
        self._waker = None
        for outlet in self.outlets.values():
            outlet.wake_pending()

    def _block(self) -> None:
        self.stats.set(self._st_blocked, len(self._queue))
        if self.blocked:
            return
        self.blocked = True
        self.stats.add(self._st_backpressure)
        self.ratelog.warning("blocked", "ring full, intake paused: queued=%d",
                             len(self._queue))
        for conn in self.conns.values():
            conn.pause()
        self._space_task = self.loop.create_task(self._wait_space())

    def _unblock(self) -> None:
        self.blocked = False
        self.stats.set(self._st_blocked, 0)
        log.info("ring space again, intake resumed")
        if not self.draining:
            for conn in self.conns.values():
                conn.resume()

    async def _wait_space(self) -> None:
        while self._queue:
            first = next((a for a in self._queue if isinstance(a, Record) and not a.done),
                         None)
            if first is not None:
                await self.outlets[first.outlet].wait_space(len(first.frame), 1.0)
            self._flush()
            if self._queue:
                await asyncio.sleep(0)  # let responses and timers in between attempts
        self._space_task = None

    # -- timers -----------------------------------------------------------------------------

    def _arm(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is None or self._timer is not None:
            return
        when = max(deadline, self.loop.time() + TIMER_GRANULARITY)
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self.guarded(self.core.tick, self.loop.time())
        finally:
            self._arm()

    def _sweep(self) -> None:
        try:
            now = self.loop.time()
            for conn in list(self.conns.values()):
                reason = conn.overdue(now)
                if reason is None:
                    continue
                self.ratelog.warning(f"close.{reason}", "acquirer connection closed: "
                                     "reason=%s, address=%s", reason, conn.host)
                self.stats.add(self._st_closed[reason])
                conn.closing = True
                conn.abort()
            if self.keyring is not None:
                ring = self.keyring.reload_if_changed()  # after `engine keys rotate`
                if ring is not self.keyring:
                    self.keyring = self.core.keyring = ring
            self.core.update_gauges()
        except Exception as exc:  # the sweep must outlive any bad state
            self.core.contained_error()
            self.ratelog.error("sweep", "sweep failed: error=%r", exc)
        finally:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
            self._check_drained()  # a safety net: a path that emptied the matcher unflushed

    # -- reversals --------------------------------------------------------------------------

    def send_reversal(self, issuer: str, doc: Mapping[str, str]) -> bool:
        """``ReversalLinks`` for the SAF sender: the reversal goes out on a live link."""
        forward = self.core.reversal_forward(issuer, doc)
        if forward is None:
            return False
        self.handle([forward])
        return True

    def current_keyring(self) -> KeyRing:
        """The key ring in use (reloaded after a rotation)."""
        assert self.keyring is not None
        return self.keyring
