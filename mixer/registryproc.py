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
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    ExternalStream,
    KeyValueConfig,
    StreamConfig,
    StreamConsumerSource,
    StreamSource,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from engine.bus import BusAuth, close_quietly, connect
from engine.cbor import loads
from engine.metrics_http import MetricsEndpoint
from engine.plan import Runtime, signal_ready
from engine.streams import HUB_CONSUMER, hub_deliver_subject
from mixer.deploy import APPLIED_BUCKET
from mixer.fleet import Fleet, write_parquet
from mixer.fleetrollup import rollup_table
from mixer.hubfiles import RACKS_FILE, read_racks
from mixer.periodic import every
from mixer.registry import Registry, Report, StateChange, parse_selector
from mixer.registrydb import RegistryStore, racks_json

log = logging.getLogger("fluxrig.mixer.registry")

TICK = 1.0  # seconds between offline checks
WRITE_SLOW = 1.0  # seconds: a registry write this slow is logged
LOCAL_SOCKET = "registry.sock"  # in the hub data dir: the CLI's quick way to ask
LOCAL_TIMEOUT = 2.0
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
    racks' business subjects would pull every egress publish over the link a second time.
    Direct gets are allowed: the console reads a copy's newest message per subject and a
    subject's history with them, without a consumer."""
    return StreamConfig(
        name=hub_stream_name(stream, rack), subjects=[], allow_direct=True,
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
        self.rollups: list[pa.Table] = []  # 10 s batches, columnar (1,000 racks: ~1 MB/s)
        self.dropped_hellos = 0
        self.changes: list[StateChange] = []  # not written yet: one transaction per tick
        self._racks_seen: tuple[int, int, int] | None = None
        self._enrolled: list[tuple[str, str, Mapping[str, str]]] = []
        self._revoked: list[str] = []
        self.follow_enrolled()
        self.write()  # at start, in this thread: nothing else runs yet

    # --- enrolled racks ---------------------------------------------------------------------

    def follow_enrolled(self) -> None:
        """Take ``racks.json`` again when it changed (``mixer rack add/revoke``)."""
        try:  # the inode too: every write replaces the file (a new inode), and a file
            st = (self.data_dir / RACKS_FILE).stat()  # system may keep whole-second mtimes
            seen: tuple[int, int, int] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = (0, 0, 0)
        if seen == self._racks_seen:
            return
        now = time.time_ns()
        for r in read_racks(self.data_dir):
            if r.revoked:
                if self.registry.remove(r.id):
                    self._revoked.append(r.id)
                    self.fleet.forget(r.id)
                continue
            if r.id not in self.registry.racks:
                self._enrolled.append((r.id, r.nkey, r.labels))
            self.registry.add(r.id, r.labels, now)
            self.fleet.set_labels(r.id, r.labels)
            self.fleet.set_state(r.id, self.registry.racks[r.id].state)
        self._racks_seen = seen  # only now: a pass that failed half-way is tried again

    def _persist(self, changes: list[StateChange]) -> None:
        """Take state changes: at once in memory (queries, the fleet's state gauge), on disk
        with the next ``write`` (a transaction per change would block the loop ~8 ms each:
        1,000 racks saying hello at once kept the registry from its socket for seconds)."""
        for c in changes:
            self.fleet.set_state(c.rack, c.after)
            log.info("rack %s: %s -> %s (%s)", c.rack, c.before, c.after, c.reason)
        self.changes += changes

    def write(self) -> None:
        """Everything not on disk yet (in this thread)."""
        self.pending()()

    def pending(self) -> Callable[[], None]:
        """Take what is not on disk yet (in the loop's thread) and return the job that
        writes it, one transaction each kind, to run on the store's one thread."""
        now = time.time_ns()
        enrolled, self._enrolled = self._enrolled, []
        revoked, self._revoked = self._revoked, []
        changes, self.changes = self.changes, []
        racks = {c.rack: self.registry.racks[c.rack] for c in changes
                 if c.rack in self.registry.racks}
        store = self.store

        def job() -> None:
            if enrolled:
                store.enroll_many(enrolled, now)
            for rack in revoked:
                store.revoke(rack, now)
            if changes:
                store.save_changes(changes, racks)
        return job

    def _enrolled_labels(self, rack: str) -> Mapping[str, str]:
        info = self.registry.racks.get(rack)
        return info.labels if info is not None else {}

    # --- messages ---------------------------------------------------------------------------

    async def on_stats(self, msg: Msg) -> None:
        """A rack's snapshot: the fleet's figures and the rack's heartbeat."""
        now = time.time_ns()
        rack = msg.subject.rsplit(".", 1)[-1]
        if rack in self.registry.revoked:  # in flight when it was revoked: not back
            return
        if not self.fleet.observe(msg.subject, msg.data, now):
            return
        # the labels stay the enrolled ones: a rack cannot move itself into a selection
        snap = self.fleet.latest(rack)
        self._persist(self.registry.observe(
            Report(rack=rack, labels=self._enrolled_labels(rack),
                   processes=len(snap.processes) if snap is not None else None), now))

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
            info = await js.stream_info(name)
            if not info.config.allow_direct:  # made before the console read them
                info.config.allow_direct = True
                await js.update_stream(info.config)
        except NotFoundError:
            await js.add_stream(hub_stream_config(stream, rack))
            log.info("hub stream created: stream=%s, rack=%s, source=%s", name, rack, stream)
        self.sourced.add(name)

    async def on_applied(self, msg: Msg) -> None:
        """A rack reports a config revision applied or failed: kept for ``mixer deploy
        --status`` in the hub's KV bucket ``fluxrig_applied``."""
        rack = msg.subject.split(".")[2]
        try:
            report = orjson.loads(msg.data)
            if not isinstance(report, dict) or report.get("rack") != rack \
                    or not isinstance(report.get("rev"), int):
                raise ValueError("not a report of this rack")
        except ValueError as exc:
            log.warning("applied report dropped: subject=%s, error=%s", msg.subject, exc)
            return
        if self.nc is None:
            return
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(APPLIED_BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(bucket=APPLIED_BUCKET, history=16))
        await kv.put(rack, orjson.dumps(report))
        if msg.reply:
            await msg.respond(b"ok")  # the rack stops repeating it
        log.info("rack %s config rev %s: %s%s", rack, report["rev"], report.get("status"),
                 f" ({report.get('error')})" if report.get("error") else "")

    def answer(self, what: str, data: bytes) -> bytes:
        """The answer to a question of the CLI or the console: ``racks`` (``{"labels":
        {...}}`` -> the matching racks), ``top`` (one row per rack) or ``rack`` (``{"rack":
        id}`` -> its latest snapshot), as JSON."""
        if what == "top":
            return orjson.dumps(self.fleet.top_rows(time.time_ns()))
        if what == "rack":  # one rack's latest snapshot, process by process (the console)
            try:
                rack = str(orjson.loads(data).get("rack", "")) if data else ""
            except (ValueError, AttributeError) as exc:
                return orjson.dumps({"error": f"bad query: {exc}"})
            snap = self.fleet.latest(rack)
            if snap is None:
                return orjson.dumps({"rack": rack, "snapshot": None})
            return orjson.dumps({"rack": rack, "snapshot": {
                "received_ns": snap.received_ns, "ts_ns": snap.ts_ns,
                "host_cpu_pct": snap.host_cpu_pct, "host_mem_used": snap.host_mem_used,
                "hub_backlog": snap.hub_backlog,
                "processes": [p._asdict() for p in snap.processes]}})
        try:
            query = orjson.loads(data) if data else {}
            selector = parse_selector(f"{k}={v}" for k, v in query.get("labels", {}).items())
        except (ValueError, AttributeError) as exc:
            return orjson.dumps({"error": f"bad query: {exc}"})
        return racks_json(self.registry.select(selector))

    async def on_racks(self, msg: Msg) -> None:
        """``fluxrig.mixer.racks`` (tools on the hub's bus)."""
        await msg.respond(self.answer("racks", msg.data))

    async def on_top(self, msg: Msg) -> None:
        """``fluxrig.mixer.top``."""
        await msg.respond(self.answer("top", msg.data))

    async def on_local(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """One question on the local socket (``mixer.ask``): ``<racks|top> <json>\\n`` in,
        the answer out, then closed. The socket is the hub data dir's, mode 0600: whoever
        may read the hub's passwords may ask."""
        try:
            line = await asyncio.wait_for(reader.readline(), LOCAL_TIMEOUT)
            what, _, data = line.strip().partition(b" ")
            writer.write(self.answer(what.decode(errors="replace"), data))
            await asyncio.wait_for(writer.drain(), LOCAL_TIMEOUT)
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    # --- periodic ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Offline checks and ``racks.json``."""
        self.follow_enrolled()
        self._persist(self.registry.tick(time.time_ns()))

    def rollup(self) -> None:
        """One 10 s rollup row per rack and process."""
        rows = self.fleet.rollup(time.time_ns())
        if rows:
            self.rollups.append(rollup_table(rows))

    def take_rollups(self) -> pa.Table | None:
        """The rollups gathered so far, as one table (and forget them)."""
        tables, self.rollups = self.rollups, []
        return pa.concat_tables(tables) if tables else None

    def write_rollups(self, table: pa.Table | None) -> None:
        """One Parquet file under ``rollups/`` (off the event loop: 600,000 rows take
        seconds)."""
        if table is not None and table.num_rows:
            path = write_parquet(table, self.data_dir, time.time_ns())
            log.info("rollups written: file=%s, rows=%d", path, table.num_rows)


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
    local = None
    try:
        await nc.subscribe("fluxrig.stats.*", cb=shell.on_stats)
        await nc.subscribe("fluxrig.up.*.hello", cb=shell.on_hello)
        await nc.subscribe("fluxrig.up.*.applied", cb=shell.on_applied)
        await nc.subscribe("fluxrig.mixer.racks", cb=shell.on_racks)
        await nc.subscribe("fluxrig.mixer.top", cb=shell.on_top)
        await nc.flush()
        sock_path = Path(plan.data_dir) / LOCAL_SOCKET
        sock_path.unlink(missing_ok=True)
        old = os.umask(0o177)  # 0600 from its birth: no window where others may connect
        try:
            local = await asyncio.start_unix_server(shell.on_local, str(sock_path),
                                                    limit=64 * 1024)
        finally:
            os.umask(old)
        signal_ready(rt, name)
        db = ThreadPoolExecutor(1, "registry-db")  # the store's one thread

        async def write() -> None:  # its own task: a slow disk never holds up the ticks
            t0 = time.monotonic()
            await loop.run_in_executor(db, shell.pending())
            if time.monotonic() - t0 > WRITE_SLOW:
                log.warning("registry write slow: seconds=%.1f", time.monotonic() - t0)

        async def flush() -> None:
            racks = list(shell.registry.racks.values())
            await loop.run_in_executor(db, store.flush_seen, racks)

        async def rollups() -> None:
            await loop.run_in_executor(None, shell.write_rollups, shell.take_rollups())

        await asyncio.gather(
            every(TICK, shell.tick, stopping),
            every(TICK, write, stopping),
            every(FLUSH_EVERY, flush, stopping),
            every(plan.rollup_interval, shell.rollup, stopping),
            every(FILE_EVERY, rollups, stopping))
    finally:
        if local is not None:
            local.close()
            (Path(plan.data_dir) / LOCAL_SOCKET).unlink(missing_ok=True)
        shell.rollup()
        shell.write_rollups(shell.take_rollups())
        shell.write()
        store.flush_seen(shell.registry.racks.values())
        store.close()
        if endpoint is not None:
            await endpoint.close()
        await close_quietly(nc)


def run_registry(plan: RegistryPlan, rt: Runtime, name: str,
                 prometheus: socket.socket | None = None) -> None:
    """Entry point in the forked child."""
    asyncio.run(registry_main(plan, rt, name, prometheus))
