"""Independent ISO 8583 peers for whole-rack tests: an issuer host and acquirer terminals
written with asyncio streams, ``struct`` framing and pyiso8583 only — none of fluxrig's
framing, codec or load-generator code — so the switch is judged by a peer that does not
share its mistakes.

Both run on an event loop in a thread of their own (``PeerThread``), so a test can kill and
restart rack processes while the peers keep their own books:

* ``Issuer``: answers 0100/0200 with DE39 by BIN (after ``delay``), acknowledges reversals
  (0410), answers echoes; records every request and every reversal it saw.
* ``Acquirer``: terminals on their own connections sending 0100s with increasing STANs at a
  total rate; records every answer by (terminal, STAN) and anything it cannot match.
"""

from __future__ import annotations

import asyncio
import copy
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import iso8583
from iso8583.specs import default as DEFAULT_SPEC

SPEC = copy.deepcopy(DEFAULT_SPEC)


def request_doc(pan: str = "4761739001010119", **fields: str | None) -> dict:
    """A 0100 document with the usual fields; ``f11="000002"`` sets DE11, ``f41=None``
    removes DE41, ``t="0200"`` sets the MTI."""
    doc = {"t": "0100", "2": pan, "3": "000000", "4": "000000001000", "7": "1127153000",
           "11": "000001", "41": "TERM0001", "49": "840"}
    for k, v in fields.items():
        key = k.lstrip("f")
        if v is None:
            doc.pop(key, None)
        else:
            doc[key] = v
    return doc


def pack(doc: dict) -> bytes:
    """2-byte big-endian length + the message (pyiso8583)."""
    raw, _ = iso8583.encode(dict(doc), SPEC)
    return struct.pack(">H", len(raw)) + bytes(raw)


async def read_message(reader: asyncio.StreamReader) -> dict | None:
    """One framed message (None at EOF)."""
    try:
        head = await reader.readexactly(2)
        body = await reader.readexactly(struct.unpack(">H", head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    doc, _ = iso8583.decode(body, SPEC)
    return doc


class PeerThread:
    """An event loop in a daemon thread; ``call(coro)`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Issuer:
    """An issuer host: DE39 by the PAN's first digit (``codes``), else "00"."""

    codes: dict[str, str] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)  # first digits never answered
    delay: float = 0.0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (MTI, DE41, DE11)
    reversals: list[tuple[str, str, str, str]] = field(default_factory=list)  # + DE2
    answer_reversals: bool = True
    server: asyncio.AbstractServer | None = None
    writers: set = field(default_factory=set)

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while (doc := await read_message(reader)) is not None:
                mti = doc["t"]
                if mti == "0800":
                    writer.write(pack({**doc, "t": "0810", "39": "00"}))
                    continue
                if mti in ("0400", "0401"):
                    self.reversals.append((mti, doc.get("41", ""), doc.get("11", ""),
                                           doc.get("2", "")))
                    if self.answer_reversals:
                        writer.write(pack({**doc, "t": "0410", "39": "00"}))
                    continue
                self.requests.append((mti, doc.get("41", ""), doc.get("11", "")))
                first = doc.get("2", "0")[:1]
                if first in self.drop:
                    continue
                answer = pack({**doc, "t": mti[:2] + "1" + mti[3], "39":
                               self.codes.get(first, "00")})
                if self.delay:
                    asyncio.get_running_loop().call_later(self.delay, writer.write, answer)
                else:
                    writer.write(answer)
        finally:
            self.writers.discard(writer)

    def seen(self) -> set[tuple[str, str]]:
        """(terminal, STAN) of every authorisation the issuer received."""
        return {(t, s) for _, t, s in self.requests}


@dataclass
class Acquirer:
    """Terminals ``T<prefix><n>`` sending 0100s for ``pan`` at ``rate`` per second in total."""

    port: int
    terminals: int = 10
    rate: float = 200.0
    pan: str = "4761739001010119"
    prefix: str = "A"
    answers: dict[tuple[str, str], str] = field(default_factory=dict)  # -> DE39
    sent: set[tuple[str, str]] = field(default_factory=set)
    strays: int = 0  # answers matching nothing we sent
    refused: int = 0  # connections that failed or were closed on us
    gone: set[str] = field(default_factory=set)  # terminals whose connection closed
    running: bool = True

    async def run(self, seconds: float, on_tick: Callable[[float], None] | None = None) -> None:
        conns = []
        for i in range(self.terminals):
            term = f"T{self.prefix}{i:06d}"[:8]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.refused += 1
                continue
            conns.append((term, reader, writer))
        readers = [asyncio.create_task(self._read(t, r, w)) for t, r, w in conns]
        stan = 0
        t0 = time.monotonic()
        n = 0
        while self.running and time.monotonic() - t0 < seconds and conns:
            due = int((time.monotonic() - t0) * self.rate) - n
            for _ in range(max(0, due)):
                term, _, writer = conns[n % len(conns)]
                if writer.is_closing() or term in self.gone:
                    n += 1  # that terminal's connection was closed on it: skip its turn
                    continue
                stan = stan % 999_999 + 1
                key = (term, f"{stan:06d}")
                self.sent.add(key)
                writer.write(pack({"t": "0100", "2": self.pan, "3": "000000",
                                   "4": "000000002500", "7": "1127153000", "11": key[1],
                                   "41": term, "49": "840"}))
                n += 1
            if on_tick is not None:
                on_tick(time.monotonic() - t0)
            await asyncio.sleep(0.005)
        await asyncio.sleep(1.0)  # answers in flight
        for task in readers:
            task.cancel()
        for _, _, w in conns:
            w.close()

    async def _read(self, term: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        while (doc := await read_message(reader)) is not None:
            key = (doc.get("41", ""), doc.get("11", ""))
            if key[0] != term or key not in self.sent:
                self.strays += 1
                continue
            self.answers[key] = doc.get("39", "")
        self.gone.add(term)
        self.refused += 1
        writer.close()  # the switch ended the connection: a terminal closes its end too
