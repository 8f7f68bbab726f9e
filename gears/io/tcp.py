"""A TCP listener with limits, for gears that accept connections (asyncio).

asyncio's own server has no connection cap, and when the process runs out of file
descriptors it logs the same accept error at every retry (megabytes a minute under a
connection flood) while the backlog fills and every new client, good or bad, hangs. This
listener:

* accepts from a listening socket it is given (bound by the supervisor, shared by a gear's
  replicas) through ``loop.add_reader``, one connection per wake-up so replicas share
  them;
* refuses at once — accepts and closes — a connection over ``max_connections`` or over
  ``max_per_address`` for its source address, counting each;
* when ``accept`` fails with EMFILE/ENFILE (no descriptor left), frees a reserve descriptor
  to accept-and-close the waiting connection, so even then a client is refused at once
  instead of hanging, and pauses accepting for a moment with back-off;
* logs refusals and accept errors through ``RateLimitedLog``: one line per interval with
  the count of what it held back.

The effective cap never exceeds the process's open-file limit minus a reserve for the
gear's other descriptors (issuer links, NATS, rings, logs).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from engine.logutil import RateLimitedLog

log = logging.getLogger("fluxrig.io.tcp")

FD_RESERVE = 64  # descriptors kept for everything but acquirer connections
# One accept per wake-up: the replicas of a gear all watch the one listening socket their
# supervisor bound; each is woken for a new connection and the first to run takes it, so
# an idle replica wins over a busy one and connections spread by load (a replica taking
# everything waiting in one go would end up with all of a burst).
ACCEPTS_PER_WAKEUP = 1
# Who runs first is not enough in a burst (every replica idle, 50 terminals connecting at
# once: a 17/33 split was measured). With siblings, a replica that already holds
# connections waits PACE_PER_CONN per connection it holds (at most PACE_MAX) before it
# takes the next one, so the one holding fewer gets there first and the counts even out.
# Cost: that wait on a connection's accept, once; none for a replica at its cap (what it
# accepts then is refused at once).
PACE_PER_CONN = 20e-6
PACE_MAX = 0.002
_NO_FD = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenLimits:
    """Caps of one listener (per process)."""

    max_connections: int
    max_per_address: int


def effective_cap(requested: int, reserve: int = FD_RESERVE) -> int:
    """``requested`` clamped below this process's soft open-file limit minus ``reserve``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - reserve))


class TcpListener:
    """Accepts connections from ``sock`` into protocols made by ``factory``, within limits.

    ``on_refused(reason)`` is called for every refused connection (``max_connections``,
    ``max_per_address``, ``no_file_descriptors``) so the owner can count it.
    """

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol],
                 limits: ListenLimits, on_refused: Callable[[str], None],
                 name: str = "listener", siblings: int = 1,
                 tls: ssl.SSLContext | None = None, tls_handshake_timeout: float = 10.0):
        self.sock = sock
        self.siblings = siblings  # processes accepting from the same socket
        self.tls = tls  # each connection's handshake runs in its own task, bounded
        self.tls_handshake_timeout = tls_handshake_timeout
        self.factory = factory
        self.cap = effective_cap(limits.max_connections)
        if self.cap < limits.max_connections:
            log.warning("connection cap lowered to the open-file limit: %s, requested=%d, "
                        "cap=%d", name, limits.max_connections, self.cap)
        self.per_address = limits.max_per_address
        self.on_refused = on_refused
        self.name = name
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.loop = asyncio.get_running_loop()
        self.ratelog = RateLimitedLog(log)
        self._reserve: int | None = None
        self._backoff = 0.05
        self._reading = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)

    def start(self) -> None:
        """Begin accepting."""
        self._reserve_fd()
        self._resume()

    def _resume(self) -> None:
        if not self._reading and not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _reserve_fd(self) -> None:
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _on_readable(self) -> None:
        if self.siblings > 1 and 0 < self.open < self.cap:
            self._pause()
            self.loop.call_later(min(self.open * PACE_PER_CONN, PACE_MAX), self._paced)
            return
        self._accept()

    def _paced(self) -> None:
        if not self._closed and self._accept():
            self._resume()

    def _accept(self) -> bool:
        """Accept up to ``ACCEPTS_PER_WAKEUP``; False when accepting is paused (backing off
        after an error)."""
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self._backoff = 0.05
                return True
            except OSError as exc:
                if exc.errno in _NO_FD:
                    self._shed(exc)
                else:
                    self.ratelog.error(f"accept.{exc.errno}", "accept failed: %s, error=%s",
                                       self.name, exc)
                self._pause()
                self.loop.call_later(self._backoff, self._resume)
                self._backoff = min(self._backoff * 2, 1.0)
                return False
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            if self.open >= self.cap:
                self._refuse(conn, "max_connections", host)
                continue
            if self.by_address.get(host, 0) >= self.per_address:
                self._refuse(conn, "max_per_address", host)
                continue
            self._admit(conn, host)
        return True

    def _refuse(self, conn: socket.socket, reason: str, host: str) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00"
                                                                 b"\x00\x00")  # RST, no wait
        except OSError:
            pass
        conn.close()
        self.on_refused(reason)
        self.ratelog.warning(f"refuse.{reason}", "connection refused: %s, reason=%s, "
                             "address=%s, open=%d, cap=%d", self.name, reason, host, self.open,
                             self.cap)

    def _shed(self, exc: OSError) -> None:
        """No descriptor left: use the reserve one to refuse the waiting client at once."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, addr = self.sock.accept()
            except OSError:
                pass
            else:
                host = addr[0] if isinstance(addr, tuple) else str(addr)
                self._refuse(conn, "no_file_descriptors", host)
            self._reserve_fd()
        self.ratelog.error("accept.nofd", "accept failed, no file descriptor left: %s, "
                           "error=%s, open=%d", self.name, exc.strerror, self.open)

    def _admit(self, conn: socket.socket, host: str) -> None:
        self.open += 1
        self.by_address[host] = self.by_address.get(host, 0) + 1
        conn.setblocking(False)
        protocol = self.factory()
        task = self.loop.create_task(self._connect(conn, protocol, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, protocol: asyncio.Protocol, host: str) -> None:
        try:
            if self.tls is None:
                await self.loop.connect_accepted_socket(lambda: protocol, conn)
            else:  # ssl.SSLError and a handshake timeout are OSErrors too
                await self.loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=self.tls,
                    ssl_handshake_timeout=self.tls_handshake_timeout)
        except OSError:
            conn.close()
            self.release(host)

    def release(self, host: str) -> None:
        """A connection from ``host`` closed: its place is free again."""
        self.open = max(0, self.open - 1)
        n = self.by_address.get(host, 0) - 1
        if n > 0:
            self.by_address[host] = n
        else:
            self.by_address.pop(host, None)

    def close(self) -> None:
        """Stop accepting (open connections are the owner's to close)."""
        self._closed = True
        self._pause()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
