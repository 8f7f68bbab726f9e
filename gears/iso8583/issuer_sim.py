"""Issuer host simulator (``engine iso issuer``): answers ISO 8583 requests over TCP.

Rules pick DE39 by BIN prefix and amount (first match wins, default "00"); a rule may also
``drop`` (never answer). Every answer waits ``delay`` seconds plus a uniform random
``jitter``, so answers leave in a different order than the requests came. Responses are built by splicing DE39 and the
response MTI into the request bytes (``FieldIndex.respond``), so the simulator stays cheap at
thousands of TPS. 0800 is answered 0810 "00".

Rule syntax (CLI ``--rule``): ``BIN[:min_amount]=DE39`` or ``BIN=drop``, e.g. ``4=00``,
``5=05``, ``6=drop``, ``4:100000=51`` (amounts in minor units, >= min_amount).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from gears.iso8583.codec import CodecError, FieldIndex, Spec
from gears.iso8583.framed import FramedProtocol
from gears.iso8583.framing import FramingConfig, FramingError

log = logging.getLogger("fluxrig.iso.issuer")


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuerRule:
    """``bin`` prefix (and minimum amount) -> response code, or drop."""

    bin: str
    min_amount: int = 0
    de39: str = "00"
    drop: bool = False

    @classmethod
    def parse(cls, text: str) -> IssuerRule:
        """``BIN[:min_amount]=DE39|drop``.

        Raises:
            ValueError: malformed rule.
        """
        left, sep, right = text.partition("=")
        bin_, _, amount = left.partition(":")
        if not sep or not bin_.isdigit() or (amount and not amount.isdigit()) or not (
                right == "drop" or (len(right) == 2 and right.isalnum())):
            raise ValueError(f"invalid issuer rule {text!r} (expected BIN[:min_amount]=DE39 "
                             f"or BIN=drop, e.g. 4=00, 6=drop, 4:100000=51)")
        return cls(bin=bin_, min_amount=int(amount or 0), de39="" if right == "drop" else right,
                   drop=right == "drop")


@dataclass(slots=True)
class IssuerStats:
    """What the simulator saw."""

    requests: int = 0
    answered: int = 0
    dropped: int = 0
    echoes: int = 0
    malformed: int = 0
    reversals: list = field(default_factory=list)  # (MTI, DE11, DE2, DE41) of each 0400/0401
    pans: set = field(default_factory=set)  # DE2 values received (tests: the issuer gets the PAN)


class IssuerSimulator:
    """Serve one or more issuer endpoints from one asyncio loop."""

    def __init__(self, spec: Spec, framing: FramingConfig, rules: list[IssuerRule],
                 delay: float = 0.0, drop_rate: float = 0.0, seed: int | None = None,
                 jitter: float = 0.0):
        self.index = FieldIndex(spec, ("2", "4", "11", "41"))
        self.framing = framing
        self.rules = rules
        self.delay = delay
        self.jitter = jitter  # extra uniform random delay: answers leave out of order
        self.record_pans = False
        self.drop_all = False  # a hung issuer: reads everything, answers nothing
        self.drop_rate = drop_rate
        self.stats = IssuerStats()
        self._rng = random.Random(seed)
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: set[asyncio.Transport] = set()

    def decide(self, pan: str, amount: int) -> IssuerRule | None:
        """The first rule for this PAN and amount (None: approve)."""
        for rule in self.rules:
            if pan.startswith(rule.bin) and amount >= rule.min_amount:
                return rule
        return None

    def handle(self, raw: bytes) -> tuple[bytes | None, float]:
        """The response bytes for one request (None: drop) and its delay."""
        mti, fields = self.index.read(raw)
        if mti == "0800":
            self.stats.echoes += 1
            return self.index.respond(raw, "00"), 0.0
        if mti in ("0400", "0401"):
            # reversals are acknowledged (0410) unless the issuer hangs: the rules model
            # authorisations
            self.stats.reversals.append((mti, fields.get("11", ""), fields.get("2", ""),
                                         fields.get("41", "")))
            if self.drop_all:
                return None, 0.0
            return self.index.respond(raw, "00"), 0.0
        if self.drop_all:
            self.stats.dropped += 1
            return None, 0.0
        self.stats.requests += 1
        if self.record_pans:
            self.stats.pans.add(fields.get("2", ""))
        try:
            amount = int(fields.get("4") or 0)
        except ValueError:
            amount = 0
        rule = self.decide(fields.get("2", ""), amount)
        if (rule is not None and rule.drop) or (self.drop_rate and
                                                 self._rng.random() < self.drop_rate):
            self.stats.dropped += 1
            return None, 0.0
        self.stats.answered += 1
        delay = self.delay + (self._rng.random() * self.jitter if self.jitter else 0.0)
        return self.index.respond(raw, rule.de39 if rule else "00"), delay

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _IssuerProtocol(self), host, port)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection (as a crashed issuer would)."""
        for server in self.servers:
            server.close()
        for t in list(self.transports):
            t.abort()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()


class _IssuerProtocol(FramedProtocol):
    def __init__(self, sim: IssuerSimulator):
        super().__init__(sim.framing)
        self.sim = sim

    def on_open(self) -> None:
        self.sim.transports.add(self.transport)  # type: ignore[arg-type]

    def on_close(self, exc: Exception | None) -> None:
        self.sim.transports.discard(self.transport)  # type: ignore[arg-type]

    def on_framing_error(self, error: FramingError) -> None:
        self.sim.stats.malformed += 1
        log.warning("issuer sim closing connection: %s", error)
        self.abort()

    def on_message(self, header: bytes, payload: bytes) -> None:
        try:
            response, delay = self.sim.handle(payload)
        except CodecError as exc:
            self.sim.stats.malformed += 1
            log.warning("issuer sim malformed request: %s", exc)
            return
        if response is None:
            return
        if delay > 0:
            self.loop.call_later(delay, self.send, response, header)
        else:
            self.send(response, header)
