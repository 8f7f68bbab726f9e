"""Test harness: a switch shell on the test's event loop with its real shared-memory parts —
rings for audit events and reversals, the in-flight journal, counters — and optionally the
rack's real egress process body publishing those rings to a real nats-server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from peers import request_doc

from engine.counters import Counters
from engine.egress import EgressProcess
from engine.frame import Frame
from engine.frame import decode as decode_frame
from engine.journal import Journal
from engine.outlet import MAIN, Outlet
from engine.plan import EgressPlan, ProcessSpec, Route, Runtime
from engine.ring import Ring
from engine.schema import At
from engine.streams import StreamConfig
from engine.tap import OFF, Tracer
from gears.coatcheck import KeyRing
from gears.iso8583.codec import decode, encode, spec_by_name
from gears.iso8583.core import SAF, stat_defs
from gears.iso8583.framing import NEED_DATA, Framer, FramingConfig
from gears.iso8583.gear import saf_outlet
from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry
from gears.iso8583.saf import SafSender
from gears.iso8583.settings import SwitchSettings, parse_switch_settings
from gears.iso8583.switch import SwitchShell

PANS = {"4": "4761739001010119", "5": "5500000000000004", "6": "6011000990139424",
        "9": "9000000000000001"}
SPEC = spec_by_name("default")
RACK = "t"


def settings(issuers: dict[str, int], groups=None, routes=None, timeout=0.5, spec="default",
             framing=None, issuer_framing=None, header="", **extra) -> SwitchSettings:
    """Switch settings as a rig file would give them (validated the same way)."""
    framing = framing or {"prefix": "2B"}
    raw = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "acquirer": {"framing": framing, "spec": spec},
        "issuers": {name: {"host": "127.0.0.1", "port": port, "connections": 2,
                           "echo_interval": 0.2,
                           "framing": issuer_framing or framing, "spec": spec,
                           "header": header}
                    for name, port in issuers.items()},
        "groups": groups or {"A": {"endpoints": ["a"]}, "B": {"endpoints": ["b"]},
                             "C": {"endpoints": ["c"]}},
        "routes": routes or [
            {"name": "visa", "bins": ["4"], "group": "A"},
            {"name": "mc", "bins": ["5"], "group": "B"},
            {"name": "disc", "bins": ["6"], "group": "C"},
        ],
        "timeout": timeout,
    }
    raw.update(extra)
    return parse_switch_settings(raw, At("test.yaml", "settings"))


class Kit:
    """A switch shell with real rings, journal and counters; ``events()`` reads what it
    recorded (unless egress runs, which consumes the rings into JetStream)."""

    def __init__(self, s: SwitchSettings, name: Callable[[str], str], data_dir: Path,
                 ring_capacity: int = 1 << 20, journal_slots: int = 4096, reader: bool = True,
                 tracer: Tracer = OFF):
        self.s = s
        self.tracer = tracer
        self.ring = Ring.create(name("ev"), ring_capacity)
        self.saf_ring = Ring.create(name("saf"), ring_capacity) if s.saf else None
        self.journal = Journal.create(name("j"), journal_slots, 1024)
        self.defs = stat_defs(s)
        self.counters = Counters.create(name("c"), len(self.defs))
        self.stats = self.counters.stats(self.defs)
        self.keyring = (KeyRing.load_or_create(data_dir / "vault.keys")
                        if s.saf or s.coatcheck else None)
        self.data_dir = data_dir
        self.name = name
        self.reader = reader  # drain the rings in the background, as egress would
        self._seen: list[Frame] = []
        self._seen_saf: list[Frame] = []
        self._egress_task: asyncio.Task | None = None
        self._events = self.ring.consumer()
        self._saf = self.saf_ring.consumer() if self.saf_ring else None
        self.shell: SwitchShell | None = None
        self.egress: EgressProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self.nc = None

    async def start(self, nats_url: str | None = None) -> int:
        """Start the shell (and, with ``nats_url``, egress and the SAF sender)."""
        outlets = {MAIN: Outlet(MAIN, self.ring.producer(), self.counters)}
        if self.saf_ring is not None:
            outlets[SAF] = Outlet(SAF, self.saf_ring.producer(), None)
        self.shell = SwitchShell(self.s, outlets=outlets, journal=self.journal,
                                 stats=self.stats, keyring=self.keyring, src="test",
                                 tracer=self.tracer)
        if nats_url is not None:
            await self._start_egress(nats_url)
        port = await self.shell.start()
        if nats_url is None and self.reader:
            self._tasks.append(asyncio.get_running_loop().create_task(self._drain()))
        if nats_url is not None and self.s.saf is not None:
            import nats

            self.nc = await nats.connect(nats_url)
            saf = self.s.saf
            sender = SafSender(self.nc.jetstream(), stream=saf.stream, rack_id=RACK,
                               retry_interval=saf.retry_interval, retry_limit=saf.retry_limit,
                               expire_after=saf.expire_after, inter_delay=saf.inter_delay,
                               keyring=self.shell.current_keyring, links=self.shell,
                               stats=self.stats, key_fields=self.s.match_key)
            self.shell.saf = sender
            self._tasks.append(asyncio.get_running_loop().create_task(sender.run()))
        return port

    async def _start_egress(self, nats_url: str) -> None:
        rings, routes, streams = [self.ring], [Route(subject=f"fluxrig.{RACK}.txn",
                                                     stream="TXN")], [
            StreamConfig(name="TXN", subjects=(f"fluxrig.{RACK}.txn",))]
        if self.saf_ring is not None:
            o = saf_outlet(self.s, RACK)
            rings.append(self.saf_ring)
            routes.append(Route(subject=o.subject, stream=o.stream.name))
            streams.append(o.stream)
        spec = ProcessSpec(name="egress", role="egress", inputs=rings,
                           counters=Counters.create(self.name("egc")),
                           extra=EgressPlan(routes=routes, streams=streams, batch=500,
                                            max_inflight=4, ack_timeout=2.0))
        self.egress = EgressProcess(spec, Runtime(rack_id=RACK, data_dir=str(self.data_dir),
                                                  nats_url=nats_url, batch=256))
        self._egress_task = asyncio.get_running_loop().create_task(self.egress.run())
        while self.egress.js is None:
            await asyncio.sleep(0.01)  # egress connects and creates its streams first

    async def _drain(self) -> None:
        while True:
            self._seen += self._read(self._events, None)
            if self._saf is not None:
                self._seen_saf += self._read(self._saf, None)
            await asyncio.sleep(0.005)  # a reader, as egress is; nothing to wake us

    def events(self, kind: str | None = None) -> list[Frame]:
        """Frames recorded on the events ring since the last call (committed)."""
        out, self._seen = self._seen + self._read(self._events, None), []
        return [f for f in out if kind is None or f.kind == kind]

    def reversals(self) -> list[Frame]:
        """Frames recorded on the saf ring since the last call."""
        assert self._saf is not None
        out, self._seen_saf = self._seen_saf + self._read(self._saf, None), []
        return out

    @staticmethod
    def _read(consumer, kind) -> list[Frame]:
        out = []
        while True:
            views = consumer.poll(1000)
            if not views:
                break
            out += [decode_frame(v) for v in views]
            del views
            consumer.commit()
        return out

    async def stop(self, drain: float = 0.0) -> None:
        """Drain (optionally), stop the shell, egress and the SAF sender."""
        if self.shell is not None:
            if drain:
                await self.shell.drain(drain)
            await self.shell.settled()
            await self.shell.stop()
        if self.reader and self.egress is None:
            self._seen += self._read(self._events, None)
            if self._saf is not None:
                self._seen_saf += self._read(self._saf, None)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.egress is not None and self._egress_task is not None:
            while any(r.statistics().used for r in self.egress.spec.inputs):
                await asyncio.sleep(0.01)  # let egress publish everything recorded
            self.egress.stopping.set()
            await self._egress_task
        if self.nc is not None:
            await self.nc.close()

    async def wait_links(self, names) -> None:
        """Until every issuer has a connected link (``names``: the ones the test needs)."""
        assert self.shell is not None
        await self.shell.links_up(10.0)
        missing = set(names) - self.shell.core.router.up
        assert not missing, f"issuer links not up: {sorted(missing)}"

    def stat(self, key: str) -> int:
        """A stat by key (``iso8583.answers{de39=00}``)."""
        return self.stats.as_dict()[key]


async def issuers(rules: dict[str, list[str]], spec="default", framing=None):
    """Issuer simulators by name; returns (sims, ports)."""
    sims, ports = {}, {}
    for name, rs in rules.items():
        sim = IssuerSimulator(spec_by_name(spec), framing or FramingConfig(prefix="2B"),
                              [IssuerRule.parse(r) for r in rs])
        ports[name] = await sim.start("127.0.0.1", 0)
        sims[name] = sim
    return sims, ports


async def load(port: int, pan: str, count: int, conns=5, spec="default", framing=None,
               header=b"", rate=0.0, window=2, grace=3.0) -> dict:
    """A load run; its summary."""
    gen = LoadGenerator(LoadConfig(
        host="127.0.0.1", port=port, spec=spec_by_name(spec),
        framing=framing or FramingConfig(prefix="2B"), header=header, connections=conns,
        rate=rate, window=window, count=count, duration=60, grace=grace,
        mix=(MixEntry(pan=pan),)))
    return (await gen.run()).summary()


async def exchange(port: int, chunks: list[bytes], replies: int, timeout: float = 5.0
                   ) -> tuple[list[dict], bool]:
    """Write raw chunks, read ``replies`` framed answers; (answers, closed by the switch)."""
    framer = Framer(FramingConfig(prefix="2B"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for c in chunks:
        writer.write(c)
    out = []
    closed = False
    while len(out) < replies and not closed:
        msg = framer.next_message()
        if msg is NEED_DATA:
            data = await asyncio.wait_for(reader.read(4096), timeout)
            if not data:
                closed = True
            framer.receive_data(data)
        elif msg is None:
            closed = True
        else:
            out.append(decode(msg.payload, SPEC))
    if not closed:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        except ConnectionError:
            closed = True
    writer.close()
    return out, closed


def frame(doc: dict) -> bytes:
    """A 2B-framed request."""
    return Framer(FramingConfig(prefix="2B")).frame(encode(doc, SPEC))


def request(**fields) -> dict:
    """A 0100 document with the usual fields (``None`` removes one)."""
    return request_doc(PANS["4"], **fields)


logging.getLogger("nats").setLevel(logging.CRITICAL)
