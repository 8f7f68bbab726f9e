"""A NATS client connection that only pulls JetStream messages and acks them — for the
archiver's hot path.

nats-py builds a ``Msg`` object (and a header dict) per message; at the archiver's rates
that, not the server, is the wall (~30k msgs/s fetch + ack here). This speaks the protocol
itself for the data path only: it subscribes one inbox wildcard, sends ``MSG.NEXT`` pull
requests and ``+ACK``\\ s, and hands every delivered message to a callback as the raw
``reply`` subject, header block and payload (slices of the read buffer, no copies beyond
them). Everything else (streams, consumers) goes through nats-py on a connection of its own.

Protocol (https://docs.nats.io/reference/reference-protocols/nats-protocol)::

    server: INFO {...}                  client: CONNECT {...}\\r\\nPING\\r\\n
    server: PONG | -ERR '...'           (the CONNECT's verdict)
    server: HMSG <subj> <sid> [reply] <hdr len> <total len>\\r\\n<hdr><payload>\\r\\n
    server: MSG  <subj> <sid> [reply] <len>\\r\\n<payload>\\r\\n
    server: PING                        client: PONG

A delivery keeps its own subject and has a reply subject (``$JS.ACK.<stream>...``: that
says which consumer it is for); a status (``408`` expired, ``409``...) has none and comes to
the pull's inbox, ``<prefix>.<n>``, where ``n`` says which pull it answers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Final

import orjson

CRLF: Final = b"\r\n"
MAX_LINE: Final = 4096  # a protocol line longer than this is not NATS

OnMessage = Callable[[bytes, bytes, bytes], None]        # reply, header, payload
OnStatus = Callable[[int, bytes], None]                  # pull inbox n, status header block


class PullError(ConnectionError):
    """The server refused the connection or broke the protocol (its words in the message)."""


def ack_fields(reply: bytes) -> tuple[int, int]:
    """(stream sequence, stream timestamp ns) from a ``$JS.ACK`` reply subject.

    Two layouts: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>``
    and, with a domain, ``$JS.ACK.<domain>.<account hash>.<stream>...`` (and maybe a trailing
    random token).
    """
    t = reply.split(b".")
    base = 2 if len(t) == 9 else 4
    return int(t[base + 3]), int(t[base + 5])


def pending_messages(header: bytes) -> int | None:
    """What an ended pull request still owed (``Nats-Pending-Messages`` of a 408/409
    status), or None when the status does not say."""
    i = header.find(b"Nats-Pending-Messages: ")
    if i < 0:
        return None
    e = header.find(CRLF, i)
    return int(header[i + 23:e if e >= 0 else None])


def source_seq(header: bytes) -> int:
    """The origin's sequence from a sourced message's ``Nats-Stream-Source`` header
    (``<stream...> <seq> ...``), or 0 when it has none."""
    i = header.find(b"Nats-Stream-Source: ")
    if i < 0:
        return 0
    j = header.index(b" ", i + 20)
    k = header.find(b" ", j + 1)
    e = header.find(CRLF, j + 1)
    if k < 0 or (0 <= e < k):
        k = e
    return int(header[j + 1:k])


class PullConnection(asyncio.Protocol):
    """One connection (see module doc). ``await open(...)``, then ``pull``/``ack``."""

    def __init__(self, on_message: OnMessage, on_status: OnStatus):
        self.on_message = on_message
        self.on_status = on_status
        self.prefix = b"_INBOX." + secrets.token_hex(8).encode()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.connected: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] | None = None
        self.error: Exception | None = None

    async def open(self, host: str, port: int, user: str, password: str, name: str,
                   timeout: float = 10.0) -> None:
        """Connect and log in.

        Raises:
            PullError: refused (authorization...) or not a NATS server.
            OSError: the port cannot be reached.
        """
        loop = asyncio.get_running_loop()
        self.connected = loop.create_future()
        self.closed = loop.create_future()
        self._creds = orjson.dumps({"verbose": False, "pedantic": False, "user": user,
                                    "pass": password, "headers": True, "no_responders": True,
                                    "protocol": 1, "name": name, "lang": "python-raw"})
        await asyncio.wait_for(loop.create_connection(lambda: self, host, port), timeout)
        await asyncio.wait_for(asyncio.shield(self.connected), timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        err = self.error or exc or PullError("connection closed")
        for fut in (self.connected, self.closed):
            if fut is not None and not fut.done():
                fut.set_exception(err) if fut is self.connected else fut.set_result(None)
        self.transport = None

    @property
    def is_open(self) -> bool:
        """Whether the connection is up (and logged in)."""
        return (self.transport is not None and self.connected is not None
                and self.connected.done() and self.connected.exception() is None)

    def close(self) -> None:
        """Close the connection (pending pulls are dropped by the server)."""
        if self.transport is not None:
            self.transport.close()

    def pull(self, n: int, api: str, batch: int, max_bytes: int, expires_ns: int) -> None:
        """Ask consumer ``api`` (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``) for up to
        ``batch`` messages / ``max_bytes``, delivered to inbox ``n``, for ``expires_ns``."""
        body = b'{"batch":%d,"max_bytes":%d,"expires":%d}' % (batch, max_bytes, expires_ns)
        self._write(b"PUB %s %s.%d %d\r\n%s\r\n" % (api.encode(), self.prefix, n, len(body),
                                                    body))

    def ack(self, reply: bytes) -> None:
        """Ack the delivery ``reply`` (with ack policy ``all``: and every one before it)."""
        self._write(b"PUB %s 4\r\n+ACK\r\n" % reply)

    def _write(self, data: bytes) -> None:
        if self.transport is None:
            raise PullError("not connected")
        self.transport.write(data)

    # --- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        on_message = self.on_message
        plen = len(self.prefix) + 1
        try:
            while pos < end:
                nl = buf.find(CRLF, pos)
                if nl < 0:
                    if end - pos > MAX_LINE:
                        raise PullError(f"protocol line too long: {buf[pos:pos + 40]!r}")
                    break
                op = buf[pos:pos + 4]
                if op == b"HMSG":
                    args = buf[pos + 5:nl].split(b" ")
                    total = int(args[-1])
                    stop = nl + 2 + total
                    if stop + 2 > end:
                        break
                    hlen = int(args[-2])
                    if len(args) == 5:
                        on_message(args[2], buf[nl + 2:nl + 2 + hlen],
                                   buf[nl + 2 + hlen:stop])
                    elif args[0].startswith(self.prefix):
                        self.on_status(int(args[0][plen:]), buf[nl + 2:nl + 2 + hlen])
                    pos = stop + 2
                elif op == b"MSG ":
                    args = buf[pos + 4:nl].split(b" ")
                    total = int(args[-1])
                    stop = nl + 2 + total
                    if stop + 2 > end:
                        break
                    if len(args) == 4:
                        on_message(args[2], b"", buf[nl + 2:stop])
                    pos = stop + 2
                else:
                    self._control(buf[pos:nl])
                    pos = nl + 2
        except PullError as exc:
            self.error = exc
            self.buf = b""
            if self.transport is not None:
                self.transport.close()
            return
        self.buf = buf[pos:] if pos < end else b""

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line.startswith(b"INFO"):
            if self.connected is not None and not self.connected.done() and not self._sent:
                self._sent = True
                self._write(b"CONNECT %s\r\nSUB %s.* 1\r\nPING\r\n" % (self._creds,
                                                                     self.prefix))
        elif line == b"PONG":
            if self.connected is not None and not self.connected.done():
                self.connected.set_result(None)
        elif line.startswith(b"-ERR"):
            text = line[4:].strip(b" '").decode(errors="replace")
            if self.connected is not None and not self.connected.done():
                raise PullError(f"the server refused: {text}")
            raise PullError(f"server error: {text}")
        elif line != b"+OK":
            raise PullError(f"unexpected protocol line: {line[:60]!r}")

    _sent = False


__all__ = ["PullConnection", "PullError", "ack_fields", "pending_messages", "source_seq"]
