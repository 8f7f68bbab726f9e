"""Write coalescing for asyncio transports.

On loopback (and on a busy host) the cost of a TCP message is mostly the ``send`` system
call and the receive path the kernel runs in the sender's context. Messages produced while
handling one ``data_received`` batch are therefore gathered and written once, at the end of
the event-loop turn (``call_soon``): same order, one system call, no added wait.
"""

from __future__ import annotations

import asyncio
import socket


class Coalescer:
    """Gathers the writes of one event-loop turn into a single ``transport.write``."""

    __slots__ = ("transport", "_parts", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.transport: asyncio.Transport | None = None
        self._parts: list[bytes] = []
        self._loop = loop

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Write to ``transport`` from now on; small messages go out at once (TCP_NODELAY):
        the coalescing already batches them, Nagle would only add delay."""
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is written before the loop's next turn."""
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(parts[0] if len(parts) == 1 else b"".join(parts))
