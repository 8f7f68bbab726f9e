"""The switch's connections: acquirers in, issuer links out (asyncio, thin).

Both are ``FramedProtocol``s that hand whole messages to the switch's core through their
owner (``Owner``: the ``SwitchShell``) and tell it when they open and close; they decide
nothing themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from engine.logutil import RateLimitedLog
from gears.iso8583.codec import encode, spec_by_name
from gears.iso8583.core import Action, SwitchCore
from gears.iso8583.framed import FramedProtocol
from gears.iso8583.framing import Framer, FramingError
from gears.iso8583.settings import IssuerSettings, SwitchSettings

log = logging.getLogger("fluxrig.iso.switch")


class Owner(Protocol):
    """What a connection needs from the switch shell."""

    s: SwitchSettings
    core: SwitchCore
    ratelog: RateLimitedLog

    def guarded(self, fn: Callable[..., list[Action]], *args: object) -> None:
        """Run a core entry point, queue its actions, contain its exceptions."""

    def opened(self, conn: AcquirerConn) -> None:
        """An acquirer connection is up."""

    def closed(self, conn: AcquirerConn) -> None:
        """An acquirer connection is gone."""

    def link_changed(self) -> None:
        """An issuer link connected or dropped."""


class AcquirerConn(FramedProtocol):
    """One acquirer connection."""

    def __init__(self, shell: Owner, conn_id: int):
        super().__init__(shell.s.acquirer.framing)
        self.shell = shell
        self.id = conn_id
        self.host = ""
        self.closing = False

    def on_open(self) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.host = peer[0] if isinstance(peer, tuple) else str(peer)
        self.shell.opened(self)

    def on_message(self, header: bytes, payload: bytes) -> None:
        if not self.closing:
            shell = self.shell
            shell.guarded(shell.core.request, self.id, header, payload, self.loop.time(),
                          self.last_rx)

    def on_framing_error(self, error: FramingError) -> None:
        self.closing = True
        self.shell.guarded(self.shell.core.framing_error, self.id, str(error))

    def on_close(self, exc: Exception | None) -> None:
        self.shell.closed(self)

    def overdue(self, now: float) -> str | None:
        """Why the sweep should close this connection now ("frame_timeout", "idle"), or
        None. A paused or closing connection is never overdue: it waits on us; one we are
        ending (``finish``) is aborted here once its peer had ``finish_by`` to close."""
        if self.finish_by is not None:
            if now > self.finish_by:
                self.abort()
            return None
        if self.paused or self.closing:
            return None
        lst = self.shell.s.listen
        if self.partial_since is not None and now - self.partial_since > lst.frame_timeout:
            return "frame_timeout"
        if lst.idle_timeout and now - self.last_rx > lst.idle_timeout:
            return "idle"
        return None


async def finish_all(conns: list[AcquirerConn], linger: float) -> None:
    """End ``conns`` in order (``FramedProtocol.finish``); abort those whose peer did not
    close its end within ``linger``."""
    for conn in conns:
        conn.closing = True
        conn.finish(linger)
    if conns:
        await asyncio.wait([c.gone for c in conns], timeout=linger)
    for conn in conns:
        conn.abort()


class IssuerLink(FramedProtocol):
    """One persistent connection to an issuer; reconnects while the switch runs."""

    def __init__(self, shell: Owner, issuer: IssuerSettings, n: int):
        super().__init__(issuer.link.framing)
        self.shell = shell
        self.issuer = issuer
        self.n = n
        self.spec = spec_by_name(issuer.link.spec_name)
        self.last_io = self.loop.time()
        self.echo_stan = 0
        self._lost: asyncio.Event | None = None
        self._closed = False

    async def run(self) -> None:
        backoff = 0.1
        while not self._closed:
            self.framer = Framer(self.issuer.link.framing)  # a fresh stream
            self._lost = asyncio.Event()
            try:
                await self.loop.create_connection(lambda: self, self.issuer.host,
                                                  self.issuer.port)
            except OSError as exc:
                self.shell.ratelog.warning(f"link.{self.issuer.name}", "issuer link connect "
                                           "failed: issuer=%s, link=%d, error=%s",
                                           self.issuer.name, self.n, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            echo = self.loop.create_task(self._echo_loop())
            await self._lost.wait()
            echo.cancel()

    def on_open(self) -> None:
        self.last_io = self.loop.time()
        log.info("issuer link up: issuer=%s, link=%d", self.issuer.name, self.n)
        self.shell.core.link_up(self.issuer.name, self.n)
        self.shell.link_changed()

    def on_close(self, exc: Exception | None) -> None:
        if not self._closed:
            log.warning("issuer link down: issuer=%s, link=%d", self.issuer.name, self.n)
        self.shell.core.link_down(self.issuer.name, self.n)
        self.shell.link_changed()
        if self._lost is not None:
            self._lost.set()

    def on_message(self, header: bytes, payload: bytes) -> None:
        self.last_io = self.last_rx
        shell = self.shell
        shell.guarded(shell.core.response, self.issuer.name, self.n, payload, self.loop.time())

    def on_framing_error(self, error: FramingError) -> None:
        log.error("issuer framing error, dropping link: issuer=%s, error=%s",
                  self.issuer.name, error)
        self.abort()

    async def _echo_loop(self) -> None:
        interval = self.issuer.echo_interval
        while self.transport is not None:
            await asyncio.sleep(interval / 2)
            if self.transport is not None and self.loop.time() - self.last_io >= interval:
                self.echo_stan = self.echo_stan % 999_999 + 1
                doc = {"t": "0800", "7": time.strftime("%m%d%H%M%S", time.gmtime()),
                       "11": f"{self.echo_stan:06d}", "70": "301"}
                try:
                    self.send(encode(doc, self.spec), self.issuer.link.header)
                except Exception as exc:  # a timer must not die: contain, count, log
                    self.shell.core.contained_error()
                    self.shell.ratelog.error(f"echo.{self.issuer.name}", "issuer echo "
                                             "failed: issuer=%s, error=%r", self.issuer.name,
                                             exc)
                self.last_io = self.loop.time()

    def close(self) -> None:
        self._closed = True
        super().close()
