"""The Mixer's ``registry`` process: the thin asyncio shell around the registry, the fleet
telemetry and the hub's sourced streams.

It is a client of the hub's nats-server (user ``registry``) and:

* takes every rack's stats snapshot (``fluxrig.stats.<r>``) into ``mixer.fleet.Fleet`` (the
  latest per rack, the fleet's Prometheus endpoint, 10 s rollups written to
  ``rollups/<day>/<hhmm>.parquet``) and counts it as the rack's heartbeat in
  ``mixer.registry.Registry`` (online / offline / never-seen, persisted by
  ``mixer.registrydb.RegistryStore`` in ``registry.duckdb``);
* takes a rack's hello (``fluxrig.up.<r>.hello``: version, rig hash, labels, the streams
  the hub keeps a copy of) and makes sure the hub sources each of those streams as
  ``<STREAM>_<r>`` through the rack's durable ``hub`` consumer (cross-domain, exactly once:
  ``docs/mixer-design.md`` sections 1 and 7);
* answers the CLI: ``fluxrig.mixer.racks`` (``mixer racks``) and ``fluxrig.mixer.top``;
* follows ``racks.json``: a rack added appears ``never-seen`` with its enrolled labels (they,
  not what a rack says of itself, are what ``--label`` selects on); a revoked one leaves.

One process for registry and fleet telemetry, not the design's two: both consume the same
stats subject, and one decode per snapshot is half the CPU at 1,000 racks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ExternalStream, StreamConfig, StreamConsumerSource, StreamSource
from nats.js.errors import NotFoundError

from engine.bus import BusAuth, close_quietly, connect
from engine.cbor import loads
from engine.metrics_http import MetricsEndpoint
from engine.plan import Runtime, signal_ready
from engine.streams import HUB_CONSUMER, hub_deliver_subject
from mixer.fleet import Fleet, write_parquet
from mixer.hubfiles import RACKS_FILE, read_racks
from mixer.registry import Registry, Report, StateChange, parse_selector
from mixer.registrydb import RegistryStore, racks_json

log = logging.getLogger("fluxrig.mixer.registry")

TICK = 1.0  # seconds between offline checks
FLUSH_EVERY = 10.0  # seconds between flushes of last-seen times to the DuckDB file
FILE_EVERY = 600.0  # seconds of rollups per Parquet file


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryPlan:
    """What the registry process needs (built by ``mixer.supervisor`` before forking)."""

    data_dir: str
    hub_url: str
    password: str
    offline_after: float
    rollup_interval: float


def hub_stream_name(stream: str, rack: str) -> str:
    """The hub's copy of a rack's stream."""
    return f"{stream}_{rack}"


def hub_stream_config(stream: str, rack: str) -> StreamConfig:
    """The hub stream sourcing ``stream`` of ``rack`` across the domain boundary through the
    rack's durable ``hub`` consumer. It captures no subject of its own: one that matched the
    racks' business subjects would pull every egress publish over the link a second time."""
    return StreamConfig(
        name=hub_stream_name(stream, rack), subjects=[],
        sources=[StreamSource(
            name=stream, external=ExternalStream(api=f"$JS.{rack}.API"),
            consumer=StreamConsumerSource(name=HUB_CONSUMER,
                                          deliver_subject=hub_deliver_subject(rack, stream)))])


class RegistryShell:
    """The process's state and handlers (one event loop, no locks)."""

    def __init__(self, plan: RegistryPlan, store: RegistryStore):
        self.plan = plan
        self.data_dir = Path(plan.data_dir)
        self.store = store
        self.registry = Registry(int(plan.offline_after * 1e9))
        store.load(self.registry)
        self.fleet = Fleet()
        self.nc: Client | None = None
        self.sourced: set[str] = set()  # hub streams known to exist
        self.rollups: list[dict[str, Any]] = []
        self.dropped_hellos = 0
        self._racks_mtime = -1.0
        self.follow_enrolled()

    # --- enrolled racks ---------------------------------------------------------------------

    def follow_enrolled(self) -> None:
        """Take ``racks.json`` again when it changed (``mixer rack add/revoke``)."""
        try:
            mtime = (self.data_dir / RACKS_FILE).stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if mtime == self._racks_mtime:
            return
        self._racks_mtime = mtime
        now = time.time_ns()
        for r in read_racks(self.data_dir):
            if r.revoked:
                if self.registry.remove(r.id):
                    self.store.revoke(r.id, now)
                    self.fleet.forget(r.id)
                continue
            if r.id not in self.registry.racks:
                self.store.enroll(r.id, r.nkey, r.labels, now)
            self.registry.add(r.id, r.labels, now)
            self.fleet.set_labels(r.id, r.labels)
            self.fleet.set_state(r.id, self.registry.racks[r.id].state)

    def _persist(self, changes: list[StateChange]) -> None:
        if changes:
            self.store.save_changes(changes, self.registry.racks)
            for c in changes:
                self.fleet.set_state(c.rack, c.after)
                log.info("rack %s: %s -> %s (%s)", c.rack, c.before, c.after, c.reason)

    def _enrolled_labels(self, rack: str) -> Mapping[str, str]:
        info = self.registry.racks.get(rack)
        return info.labels if info is not None else {}

    # --- messages ---------------------------------------------------------------------------

    async def on_stats(self, msg: Msg) -> None:
        """A rack's snapshot: the fleet's figures and the rack's heartbeat."""
        now = time.time_ns()
        if not self.fleet.observe(msg.subject, msg.data, now):
            return
        rack = msg.subject.rsplit(".", 1)[1]
        # the labels stay the enrolled ones: a rack cannot move itself into a selection
        self._persist(self.registry.observe(
            Report(rack=rack, labels=self._enrolled_labels(rack)), now))

    async def on_hello(self, msg: Msg) -> None:
        """A rack announces itself: what it runs, and the streams the hub keeps a copy of."""
        rack = msg.subject.split(".")[2]
        try:
            hello = loads(msg.data)
            if not isinstance(hello, dict) or hello.get("rack") != rack:
                raise ValueError("rack does not match the subject")
            streams = [s for s in hello.get("streams", []) if isinstance(s, str)]
            report = Report(rack=rack, labels=self._enrolled_labels(rack),
                            version=str(hello.get("version", "")),
                            rig_hash=str(hello.get("rig_hash", "")),
                            started_ns=int(hello.get("started_ns", 0)))
        except (ValueError, TypeError) as exc:
            self.dropped_hellos += 1
            log.warning("hello dropped: subject=%s, error=%s", msg.subject, exc)
            return
        self._persist(self.registry.observe(report, time.time_ns()))
        for stream in streams:
            await self.ensure_source(rack, stream)

    async def ensure_source(self, rack: str, stream: str) -> None:
        """Make the hub stream ``<stream>_<rack>`` exist (once per process life)."""
        name = hub_stream_name(stream, rack)
        if name in self.sourced or self.nc is None:
            return
        js = self.nc.jetstream()
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(hub_stream_config(stream, rack))
            log.info("hub stream created: stream=%s, rack=%s, source=%s", name, rack, stream)
        self.sourced.add(name)

    async def on_racks(self, msg: Msg) -> None:
        """``mixer racks``: ``{"labels": {...}}`` -> the matching racks as JSON."""
        try:
            query = orjson.loads(msg.data) if msg.data else {}
            selector = parse_selector(f"{k}={v}" for k, v in query.get("labels", {}).items())
        except (ValueError, AttributeError) as exc:
            await msg.respond(orjson.dumps({"error": f"bad query: {exc}"}))
            return
        await msg.respond(racks_json(self.registry.select(selector)))

    async def on_top(self, msg: Msg) -> None:
        """``mixer top``: one row per rack."""
        await msg.respond(orjson.dumps(self.fleet.top_rows(time.time_ns())))

    # --- periodic ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Offline checks and ``racks.json``."""
        self.follow_enrolled()
        self._persist(self.registry.tick(time.time_ns()))

    def rollup(self) -> None:
        """One 10 s rollup row per rack and process."""
        self.rollups += self.fleet.rollup(time.time_ns())

    def write_rollups(self) -> None:
        """The rollups gathered so far into one Parquet file."""
        if self.rollups:
            path = write_parquet(self.rollups, self.data_dir / "rollups", time.time_ns())
            log.info("rollups written: file=%s, rows=%d", path, len(self.rollups))
            self.rollups = []


async def _every(period: float, fn: Callable[[], None], stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), period)
        except TimeoutError:
            try:
                fn()
            except Exception as exc:  # a periodic job must outlive one bad turn
                log.error("periodic job failed: job=%s, error=%r", fn.__name__, exc)


async def registry_main(plan: RegistryPlan, rt: Runtime, name: str,
                        prometheus: socket.socket | None = None) -> None:
    """The process body: connect, subscribe, serve until SIGTERM, then flush."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = RegistryStore.open(Path(plan.data_dir) / "registry.duckdb")
    shell = RegistryShell(plan, store)
    endpoint = None
    if prometheus is not None:
        endpoint = MetricsEndpoint(prometheus, lambda accept: shell.fleet.render(
            accept, time.time_ns()))
        await endpoint.start()
    nc = await connect(plan.hub_url, BusAuth(user="registry", password=plan.password),
                       "fluxrig-mixer-registry", max_reconnect_attempts=-1,
                       reconnect_time_wait=0.5)
    shell.nc = nc
    try:
        await nc.subscribe("fluxrig.stats.*", cb=shell.on_stats)
        await nc.subscribe("fluxrig.up.*.hello", cb=shell.on_hello)
        await nc.subscribe("fluxrig.mixer.racks", cb=shell.on_racks)
        await nc.subscribe("fluxrig.mixer.top", cb=shell.on_top)
        await nc.flush()
        signal_ready(rt, name)
        await asyncio.gather(
            _every(TICK, shell.tick, stopping),
            _every(FLUSH_EVERY, lambda: store.flush_seen(shell.registry.racks.values()),
                   stopping),
            _every(plan.rollup_interval, shell.rollup, stopping),
            _every(FILE_EVERY, shell.write_rollups, stopping))
    finally:
        shell.rollup()
        shell.write_rollups()
        store.flush_seen(shell.registry.racks.values())
        store.close()
        if endpoint is not None:
            await endpoint.close()
        await close_quietly(nc)


def run_registry(plan: RegistryPlan, rt: Runtime, name: str,
                 prometheus: socket.socket | None = None) -> None:
    """Entry point in the forked child."""
    asyncio.run(registry_main(plan, rt, name, prometheus))
