"""The Prometheus scrape endpoint: a small HTTP/1.1 responder with limits, on asyncio.

Theory of operation
-------------------
The supervisor binds the endpoint's socket before it forks (``engine.listeners``: a busy
port stops the start; 127.0.0.1 unless the rig says otherwise) and the telemetry process
serves it here, on its own event loop, so a scrape never touches the data path and needs no
thread. Each connection carries one request and is closed after the answer.

Limits, because anything that can connect can call it:

* at most ``MAX_CLIENTS`` connections at once; a new one takes the place of the oldest that
  is still sending its head (slow clients cannot hold the endpoint: with eight of them
  trickling a byte a second, 2 of 40 scrapes got through before), and is closed without an
  answer only when every place is busy answering;
* the request head (request line + headers) must arrive whole within ``HEAD_TIMEOUT`` and
  fit in ``MAX_HEAD`` bytes (else 408 / 431); a body is never read;
* only ``GET``/``HEAD`` of ``/metrics`` (405, 404 otherwise);
* the answer must be taken within ``WRITE_TIMEOUT``;
* the body is rendered once per telemetry sample whatever the scrape rate
  (``engine.metrics.RackCollector.render``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("fluxrig.metrics")

MAX_CLIENTS = 8  # a Prometheus pair and a few humans with curl
MAX_HEAD = 8192  # bytes; Prometheus sends ~300
HEAD_TIMEOUT = 2.0  # seconds for the request head to arrive whole
WRITE_TIMEOUT = 10.0  # seconds for the client to take the answer
PATH = "/metrics"

Render = Callable[[str], tuple[bytes, str]]  # Accept header -> (body, content type)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}


class MetricsEndpoint:
    """Serves ``render``'s output on an already bound, listening socket.

    Args:
        sock: the listening socket (bound by the supervisor, inherited through fork).
        render: called per request with its ``Accept`` header.
    """

    def __init__(self, sock: socket.socket, render: Render):
        self.sock = sock
        self.render = render
        self.active = 0
        self.refused = 0  # connections closed because MAX_CLIENTS were being served
        self.evicted = 0  # slow connections closed to make room for a new one
        self._heading: dict[asyncio.Task[None], None] = {}  # still reading a head, oldest first
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port the endpoint listens on."""
        return self.sock.getsockname()[1]

    async def start(self) -> None:
        """Start accepting (returns at once)."""
        self._server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    async def close(self) -> None:
        """Stop accepting and drop the connections being served (a scrape in progress at
        shutdown gets a reset, not a hang)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CLIENTS:
            if not self._heading:
                self.refused += 1
                writer.transport.abort()
                return
            oldest = next(iter(self._heading))
            self._heading.pop(oldest)
            oldest.cancel()
            self.evicted += 1
        self.active += 1
        task = asyncio.current_task()
        assert task is not None  # start_server runs each handler in a task of its own
        self._tasks.add(task)
        try:
            self._heading[task] = None
            try:
                status, head, body, send_body = await self._answer(reader)
            finally:
                self._heading.pop(task, None)
            lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *head,
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if send_body:
                writer.write(body)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            writer.close()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # a client that stalls or leaves gets nothing more
        except asyncio.CancelledError:
            # close(): end quietly (3.11's start_server logs a handler that ends cancelled)
            writer.transport.abort()
        finally:
            self.active -= 1
            self._tasks.discard(task)

    async def _answer(self, reader: asyncio.StreamReader
                      ) -> tuple[int, list[str], bytes, bool]:
        """(status, header lines, body, whether to send the body) for one request."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except TimeoutError:
            return 408, [], b"request head not received in time\n", True
        except asyncio.LimitOverrunError:
            return 431, [], b"request head too large\n", True
        except asyncio.IncompleteReadError:
            raise ConnectionResetError from None  # the client left before asking
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, [], b"bad request line\n", True
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, ["Allow: GET, HEAD"], b"only GET and HEAD\n", True
        if target.split("?", 1)[0] != PATH:
            return 404, [], f"metrics are at {PATH}\n".encode(), method == "GET"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            body, content_type = self.render(accept)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must not end telemetry
            log.error("metrics cannot be rendered: error=%r", exc)
            return 500, [], b"metrics cannot be rendered, see rack.log\n", True
        return 200, [f"Content-Type: {content_type}"], body, method == "GET"
