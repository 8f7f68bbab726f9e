"""ISO 8583 load generator (``engine iso load``): many acquirer connections, exact accounting.

Each connection is one terminal (DE41 ``T`` + 7 digits) with its own STAN sequence, so every
reply can be checked: a reply whose DE41 is not this connection's terminal or whose STAN is
not outstanding here is *cross-wired*; a request never answered by the end (after a grace
period) is *lost*. Requests come from pre-encoded templates (one per mix entry and terminal)
whose STAN bytes are patched in place, so generating load costs little CPU.

Pacing: ``rate > 0`` sends that many requests per second in total (open loop, spread over
the connections); ``rate == 0`` keeps ``window`` requests outstanding per connection (closed
loop, as fast as the switch answers).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gears.iso8583.codec import FieldIndex, Spec, encode
from gears.iso8583.framed import FramedProtocol
from gears.iso8583.framing import FramingConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class MixEntry:
    """One kind of request in the mix."""

    pan: str
    mti: str = "0100"
    amount: int = 10_000
    currency: str = "840"
    weight: int = 1
    track2: bool = False  # also send DE35 (PAN=expiry+service code+discretionary data)


@dataclass(slots=True, kw_only=True)
class LoadConfig:
    """What to send, where, how fast and for how long."""

    host: str
    port: int
    spec: Spec
    framing: FramingConfig
    header: bytes = b""
    connections: int = 10
    rate: float = 0.0
    window: int = 4
    duration: float = 10.0
    count: int = 0  # stop after this many requests (0: by duration)
    grace: float = 7.0  # seconds to wait for outstanding replies at the end
    mix: tuple[MixEntry, ...] = (MixEntry(pan="4761739001010119"),)


@dataclass(slots=True)
class LoadReport:
    """Results of a run; ``ok`` is false on any cross-wired or lost reply."""

    sent: int = 0
    received: int = 0
    cross_wired: int = 0
    lost: int = 0
    codes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    connect_errors: int = 0
    connect_error: str = ""  # the last one, e.g. "127.0.0.1:8583: Connection refused"

    @property
    def ok(self) -> bool:
        """No reply went to the wrong terminal and none was lost."""
        return self.cross_wired == 0 and self.lost == 0 and self.sent > 0

    def summary(self) -> dict:
        """Figures for tables and ``--json``."""
        lat = np.array(self.latencies_ns, dtype=np.int64) if self.latencies_ns else None

        def pct(q: float) -> float | None:
            return None if lat is None else round(float(np.percentile(lat, q)) / 1e6, 3)

        return {
            "sent": self.sent, "received": self.received, "tps": round(
                self.received / self.seconds, 1) if self.seconds else 0.0,
            "seconds": round(self.seconds, 3), "approved": self.codes.get("00", 0),
            "declined": sum(v for k, v in self.codes.items() if k not in ("00", "91")),
            "timeouts": self.codes.get("91", 0), "codes": dict(sorted(self.codes.items())),
            "cross_wired": self.cross_wired, "lost": self.lost,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": None if lat is None else round(float(lat.max()) / 1e6, 3),
            "connect_errors": self.connect_errors, "connect_error": self.connect_error,
            "ok": self.ok,
        }


def _field_bytes(spec: Spec, key: str, value: str) -> bytes:
    f = spec[key]
    if f["data_enc"] == "b":
        return bytes.fromhex(value if len(value) % 2 == 0 else f.get("left_pad", "0")[:1] + value)
    return value.encode(f["data_enc"])


class _Template:
    """A pre-encoded request with the offsets of its STAN and terminal id."""

    __slots__ = ("head", "tail", "stan_len", "mti")

    def __init__(self, spec: Spec, entry: MixEntry, terminal: str):
        doc = {"t": entry.mti, "2": entry.pan, "3": "000000", "4": f"{entry.amount:012d}",
               "7": "1127153000", "11": "000000", "12": "153000", "13": "1127",
               "22": "051", "25": "00", "41": terminal, "42": "MERCHANT0000001",
               "49": entry.currency}
        if entry.track2:
            doc["35"] = f"{entry.pan}=27121011234500000"
        raw = encode(doc, spec)
        _, _, spans = FieldIndex(spec, ()).spans(raw)
        _, _, start, end = next(s for s in spans if s[0] == 11)
        self.head, self.tail = raw[:start], raw[end:]
        self.stan_len = end - start
        self.mti = entry.mti


class _Conn(FramedProtocol):
    def __init__(self, gen: LoadGenerator, terminal: str, templates: list[_Template]):
        super().__init__(gen.cfg.framing)
        self.gen = gen
        self.terminal = terminal
        self.templates = templates
        self.outstanding: dict[str, int] = {}
        self.stan = 0
        self.next_template = 0
        self.closed = self.loop.create_future()

    def on_close(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send_one(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        gen = self.gen
        self.stan = self.stan % 999_999 + 1
        stan = f"{self.stan:06d}"
        if stan in self.outstanding:
            return  # this terminal still waits for that STAN: skip, never duplicate
        t = self.templates[self.next_template]
        self.next_template = (self.next_template + 1) % len(self.templates)
        raw = t.head + _field_bytes(gen.cfg.spec, "11", stan) + t.tail
        self.outstanding[stan] = time.perf_counter_ns()
        gen.report.sent += 1
        self.send(raw, gen.cfg.header)

    def on_message(self, header: bytes, payload: bytes) -> None:
        gen = self.gen
        now = time.perf_counter_ns()
        try:
            mti, f = gen.index.read(payload)
        except Exception:
            gen.report.cross_wired += 1  # unreadable: cannot be ours
            return
        if mti == "0810":
            return
        sent = self.outstanding.pop(f.get("11", ""), None) if f.get("41") == self.terminal \
            else None
        if sent is None:
            gen.report.cross_wired += 1
            return
        gen.report.received += 1
        gen.report.codes[f.get("39", "")] += 1
        gen.report.latencies_ns.append(now - sent)
        if gen.cfg.rate == 0 and gen.sending:
            self.send_one()


class LoadGenerator:
    """Runs one load test (``await run()``)."""

    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self.index = FieldIndex(cfg.spec, ("11", "39", "41"))
        self.report = LoadReport()
        self.sending = False
        self.conns: list[_Conn] = []
        self.progress: Callable[[LoadGenerator], None] | None = None  # once a second

    def _templates(self, terminal: str) -> list[_Template]:
        out = []
        for entry in self.cfg.mix:
            out += [_Template(self.cfg.spec, entry, terminal)] * entry.weight
        return out

    async def run(self) -> LoadReport:
        """Connect, send, wait for the stragglers, close; return the report."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for i in range(cfg.connections):
            terminal = f"T{i:07d}"
            try:
                _, conn = await loop.create_connection(
                    lambda t=terminal: _Conn(self, t, self._templates(t)), cfg.host, cfg.port)
            except OSError as exc:
                self.report.connect_errors += 1
                # a resolver error (socket.gaierror) carries its own text; errno is negative
                reason = (os.strerror(exc.errno) if exc.errno and exc.errno > 0
                          else exc.strerror or str(exc))
                self.report.connect_error = f"{cfg.host}:{cfg.port}: {reason}"
                continue
            self.conns.append(conn)
        if not self.conns:
            return self.report
        t0 = time.perf_counter()
        self.sending = True
        deadline = t0 + cfg.duration if cfg.count == 0 else float("inf")
        if cfg.rate == 0:
            for conn in self.conns:
                for _ in range(cfg.window):
                    conn.send_one()
            last = 0.0
            while time.perf_counter() < deadline and (cfg.count == 0 or
                                                      self.report.sent < cfg.count):
                await asyncio.sleep(0.01)
                if self.progress and time.perf_counter() - last >= 1.0:
                    last = time.perf_counter()
                    self.progress(self)
        else:
            i = 0
            tick = 0.001
            last = 0.0
            while True:
                now = time.perf_counter()
                if now >= deadline or (cfg.count and self.report.sent >= cfg.count):
                    break
                due = int((now - t0) * cfg.rate) - self.report.sent
                if cfg.count:
                    due = min(due, cfg.count - self.report.sent)
                for _ in range(max(0, due)):
                    self.conns[i].send_one()
                    i = (i + 1) % len(self.conns)
                if self.progress and now - last >= 1.0:
                    last = now
                    self.progress(self)
                await asyncio.sleep(tick)
        self.sending = False
        send_end = time.perf_counter()
        grace_end = send_end + cfg.grace
        while any(c.outstanding for c in self.conns) and time.perf_counter() < grace_end:
            await asyncio.sleep(0.01)
        self.report.seconds = send_end - t0
        self.report.lost = sum(len(c.outstanding) for c in self.conns)
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        return self.report
