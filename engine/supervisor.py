"""The supervisor: turns a rig config into running processes, keeps them running, drains.

Theory of operation
-------------------
Start (``Supervisor.start``):

1. take ``<data_dir>/rack.lock`` (``flock``; held for the supervisor's life, released by the
   kernel even on SIGKILL) — a second ``engine start`` on the same data dir is refused;
2. remove shared-memory segments of this rack whose owner is dead (a killed supervisor);
3. start the embedded nats-server (unless ``nats.url`` points elsewhere);
4. build the plan: one ring per edge (source -> stage 0 per lane, stage k -> k+1 per lane,
   last stage -> each sink per lane) and one counters segment per process;
5. fork every process (``engine.worker.run_process``), pinned per placement, with
   ``PR_SET_PDEATHSIG`` so no child outlives a killed supervisor;
6. write ``<data_dir>/state.json`` (pids, segments) for ``engine status``/``stop`` and the
   telemetry process; rewritten on every restart.

Forking, restarts, crash loops, readiness and the lock are ``engine.procset``'s (the Mixer
uses the same); this module is what makes the set a rack.

Run: the main loop sleeps on a signal wake-up fd. A child that exits while the rack runs is
restarted after a backoff (0.1 s doubling to 5 s, reset after 10 s of good health). Its input
rings kept everything it had not committed, so nothing is lost; see ``engine.worker``. A dead
embedded nats-server is restarted on the same port and store.

Drain (SIGTERM/SIGINT, or ``engine stop``): stop the sources; wait until every ring is empty
(everything reached its sink and, for egress, was acked by JetStream); stop stages, sinks,
egress; stop telemetry and nats-server; unlink the segments; remove the state file. If rings
do not empty within ``drain_timeout`` (e.g. NATS unreachable), the frames still in them are
counted and reported in the log before the segments are removed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import deployed
from engine._native import code_paths
from engine.about import fluxrig_version
from engine.bus import (
    BusAuth,
    BusUser,
    Permissions,
    hub_consumer_admin,
    masked_url,
    rack_users,
    stream_admin,
    stream_reader,
)
from engine.config import ConfigError, GearConfig, RigConfig, StreamConfig, load_config
from engine.counters import Counters, StatDef
from engine.egress import STAT_DEFS as EGRESS_STATS
from engine.journal import Journal
from engine.journal import segment_size as journal_segment_size
from engine.leftovers import LeftoverError, Leftovers
from engine.listeners import ListenerError, bind
from engine.natsd import LeafRemote, NatsServer
from engine.plan import (
    STATE_FILE,
    EgressPlan,
    HublinkPlan,
    ProcessSpec,
    Route,
    Runtime,
    TelemetryPlan,
)
from engine.procset import AlreadyRunning, Child, ProcessSet
from engine.procset import running_pid as procset_running_pid
from engine.ring import Ring
from engine.ring import segment_size as ring_segment_size
from engine.service import Notifier, process_title, set_process_title
from engine.shm import KIND_COUNTERS, KIND_JOURNAL, KIND_RING, KIND_TAP
from engine.tap import Tap, install_log_tap, logs_subject, traces_subject
from engine.worker import run_process
from gears.base import Gear, Sink, Source, gear_class

log = logging.getLogger("fluxrig.supervisor")

RackAlreadyRunning = AlreadyRunning  # the name engine.cli knows
GAVE_UP_DRAIN = 2.0  # seconds the rings get to empty when the rack gave up
LOCK = "rack.lock"


class RackStartError(RuntimeError):
    """The rack cannot work (a listener cannot be bound, ...): nothing was started."""


@dataclass(slots=True)
class _Plan:
    specs: list[ProcessSpec] = field(default_factory=list)
    rings: list[Ring] = field(default_factory=list)
    counters: list[Counters] = field(default_factory=list)
    journals: list[Journal] = field(default_factory=list)
    taps: list[Ring] = field(default_factory=list)
    own_tap: Ring | None = None  # the supervisor's log records


def running_pid(data_dir: str | os.PathLike[str]) -> int | None:
    """Pid of the supervisor holding ``data_dir``'s rack lock, or None (``engine.procset``)."""
    return procset_running_pid(data_dir, LOCK)


class Supervisor:
    """One rack on this machine."""

    def __init__(self, cfg: RigConfig, workers: int = 1, drain_timeout: float = 30.0,
                 ready_fd: int = -1, notifier: Notifier | None = None,
                 bootstrap: Path | None = None):
        if workers < 1:
            raise ValueError(f"invalid workers: workers={workers}, rule=>= 1")
        self.cfg = cfg
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.data_dir = Path(cfg.data_dir).resolve()
        self.nats: NatsServer | None = None
        self.plan = _Plan()
        self.procs: ProcessSet[ProcessSpec] = ProcessSet(
            self.data_dir, LOCK, f"rack={cfg.rack_id}", ready_fd, notifier, self._write_state,
            self._on_ready)
        # a linked rack's own rig file (``engine start --config``): hublink anchors deployed
        # rigs on it; ``reexec`` asks the caller to start again (a deployed rig to apply)
        self.bootstrap = Path(bootstrap or cfg.file).resolve()
        self.reexec = False
        self.nats_url = cfg.nats.url or ""
        self.listeners: dict[tuple[str, str], list[socket.socket]] = {}
        self.leftovers = Leftovers(cfg.rack_id, self.data_dir)
        self.bus_users: dict[str, BusUser] = {}
        self.left_in_rings = 0  # bytes a timed-out drain left behind
        self.notifier = self.procs.notifier

    # --- start ----------------------------------------------------------------------------

    def _segment(self, tag: str) -> str:
        return f"fx-{self.cfg.rack_id}-{tag}"

    def _ring(self, tag: str) -> Ring:
        name = self._segment(tag)
        adopted = self.leftovers.take(name, KIND_RING, ring_segment_size(self.cfg.ring_capacity))
        ring = Ring(adopted) if adopted is not None else Ring.create(name, self.cfg.ring_capacity)
        ring.segment.stamp(self.cfg.rack_id)
        self.plan.rings.append(ring)
        return ring

    def _journal(self, tag: str, slots: int, slot_size: int) -> Journal:
        name = self._segment(tag)
        adopted = self.leftovers.take(name, KIND_JOURNAL, journal_segment_size(slots, slot_size))
        journal = Journal(adopted) if adopted is not None else Journal.create(name, slots,
                                                                            slot_size)
        journal.segment.stamp(self.cfg.rack_id)
        self.plan.journals.append(journal)
        return journal

    def _counters(self, tag: str, stats: tuple[StatDef, ...] = ()) -> Counters:
        name = self._segment(f"c-{tag}")
        self.leftovers.take(name, KIND_COUNTERS, 0)  # counters start again at zero
        c = Counters.create(name, len(stats))
        c.segment.stamp(self.cfg.rack_id)
        self.plan.counters.append(c)
        return c

    def _tap(self, process: str) -> Ring:
        """A process's signal tap ring (``engine.tap``): always new and empty."""
        name = self._segment(f"t.{process}")
        self.leftovers.take(name, KIND_TAP, 0)  # a tap holds no work: start again empty
        ring = Ring.create(name, self.cfg.telemetry.traces.tap, KIND_TAP, doorbells=False)
        ring.segment.stamp(self.cfg.rack_id)
        self.plan.taps.append(ring)
        return ring

    def _gear_extras(self, p_name: str, gear: GearConfig, lanes: int, egress_inputs: list[Ring],
                     routes: list[Route], streams: dict[str, StreamConfig]
                     ) -> list[tuple[Journal | None, dict[str, Ring]]]:
        """A source's journal and extra outlet rings per lane (outlets routed to egress)."""
        cls = gear_class(gear.gear, Gear)
        jspec = cls.journal_spec(gear.settings)
        outlet_specs = cls.outlets(gear.settings, self.cfg.rack_id)
        out = []
        for i in range(lanes):
            journal = None
            if jspec is not None:
                journal = self._journal(f"j.{p_name}.{gear.name}.{i}", jspec.slots,
                                        jspec.slot_size)
            rings = {}
            for o in outlet_specs:
                ring = self._ring(f"o.{p_name}.{gear.name}.{o.name}.{i}")
                rings[o.name] = ring
                egress_inputs.append(ring)
                routes.append(Route(subject=o.subject, stream=o.stream.name))
                streams.setdefault(o.stream.name, o.stream)
            out.append((journal, rings))
        return out

    def _bus_users(self) -> dict[str, BusUser]:
        """The embedded server's users: a role each (``engine.bus``), with permissions."""
        cfg = self.cfg
        streams = list(cfg.egress.streams)
        roles: dict[str, Permissions | None] = {}
        for p in cfg.pipelines:
            for g in (p.source, *p.stages, *p.sinks):
                cls = gear_class(g.gear, Gear)
                if g is p.source:
                    streams += [o.stream for o in cls.outlets(g.settings, cfg.rack_id)]
                perms = cls.bus_permissions(g.settings, cfg.rack_id)
                if perms is not None:
                    roles[self._gear_user(p.name, g.name)] = perms
        subjects = sorted({subject for st in streams for subject in st.subjects})
        roles["egress"] = Permissions(publish=(
            *subjects, *stream_admin(s.name for s in streams),
            *stream_admin(f"KV_{s.last_values}" for s in cfg.egress.streams if s.last_values),
            *(p for s in cfg.egress.streams if s.hub for p in hub_consumer_admin(s.name))))
        if cfg.passport is not None:
            roles["hublink"] = self._hublink_permissions()
        roles["telemetry"] = Permissions(publish=(
            cfg.telemetry.subject, f"fluxrig.up.{cfg.rack_id}.hello",
            f"fluxrig.up.{cfg.rack_id}.reply.>", traces_subject(cfg.rack_id),
            logs_subject(cfg.rack_id),
            *(f"$JS.API.CONSUMER.INFO.{s}.hub" for s in self._hub_streams()),
            *(f"$JS.API.STREAM.INFO.{s}" for s in self._hub_streams())),
            subscribe=(f"fluxrig.down.{cfg.rack_id}.req.>",))
        extra = [BusUser(name=u.name, password=u.password,
                         permissions=stream_reader(u.streams)) for u in cfg.nats.users]
        return rack_users(self.data_dir, roles, extra)

    def _hello(self) -> dict[str, object] | None:
        """What a linked rack tells its hub about itself (``fluxrig.up.<r>.hello``)."""
        if self.cfg.passport is None:
            return None
        try:
            rig_hash = hashlib.sha256(Path(self.cfg.file).read_bytes()).hexdigest()
        except OSError:
            rig_hash = ""
        return {"rack": self.cfg.rack_id, "version": fluxrig_version(), "rig_hash": rig_hash,
                "labels": dict(self.cfg.labels), "streams": list(self._hub_streams()),
                "started_ns": time.time_ns(), "workers": self.workers}

    def _on_ready(self) -> None:
        if self.cfg.passport is not None:
            deployed.ready(self.data_dir)  # a revision being tried becomes the applied one

    def _candidate_ok(self) -> bool:
        """SIGHUP from hublink: is there a candidate rig this rack can run? (Checked again
        here: a bad config never takes a running rack down.)"""
        rev = deployed.candidate(self.data_dir)
        if rev is None:
            return False
        try:
            load_config(deployed.rig_path(self.data_dir, rev))
        except ConfigError as exc:
            deployed.refuse_candidate(self.data_dir, str(exc))
            return False
        log.info("applying config rev %d: draining, then starting on it", rev)
        return True

    def _hub_streams(self) -> tuple[str, ...]:
        """The streams a linked rack's hub keeps a copy of (none without a passport)."""
        if self.cfg.passport is None:
            return ()
        return tuple(s.name for s in self.cfg.egress.streams if s.hub)

    def _hublink_permissions(self) -> Permissions:
        """The hublink process: pull its own config consumer at the hub (answers come to
        ``fluxrig.down.<r>.inbox``), keep values in the local CONFIG stream, report."""
        r = self.cfg.rack_id
        consumer = f"KV_fluxrig_config.cfg_{r}"
        return Permissions(publish=(
            f"$JS.hub.API.CONSUMER.INFO.{consumer}", f"$JS.hub.API.CONSUMER.MSG.NEXT.{consumer}",
            f"$JS.ACK.hub.*.{consumer}.>", f"$JS.ACK.{consumer}.>",
            f"fluxrig.up.{r}.applied", f"fxlocal.{r}.config",
            "$JS.API.STREAM.INFO.CONFIG", "$JS.API.STREAM.CREATE.CONFIG"),
            subscribe=(f"fluxrig.down.{r}.inbox.>",))

    @staticmethod
    def _gear_user(pipeline: str, gear: str) -> str:
        return f"{pipeline}.{gear}"

    def _auth(self, user: str) -> BusAuth | None:
        """A process's credentials: its role's user (embedded), the rig's (external)."""
        if not self.cfg.nats.embedded:
            return self.cfg.nats.auth
        found = self.bus_users.get(user)
        return found.auth() if found is not None else None

    def bind_listeners(self) -> None:
        """Bind every gear's listeners before anything is forked (``engine.listeners``).

        Raises:
            RackStartError: a host does not resolve or a port cannot be bound.
        """
        for p in self.cfg.pipelines:
            for g in (p.source, *p.stages, *p.sinks):
                cls = gear_class(g.gear, Gear)
                socks = []
                for host, port in cls.listeners(g.settings):
                    try:
                        socks.append(bind(host, port))
                    except ListenerError as exc:
                        raise RackStartError(f"{exc} (pipeline {p.name}, gear {g.name}: "
                                             f"{self.cfg.file}: {g.at}.settings)") from None
                    log.info("listening: pipeline=%s, gear=%s, address=%s:%d", p.name, g.name,
                             host, socks[-1].getsockname()[1])
                self.listeners[(p.name, g.name)] = socks
        tel = self.cfg.telemetry
        if tel.prometheus_port is not None:  # served by telemetry (engine.metrics_http)
            try:
                sock = bind(tel.prometheus_host, tel.prometheus_port, backlog=64)
            except ListenerError as exc:
                raise RackStartError(f"{exc} (prometheus endpoint: {self.cfg.file}: "
                                     f"telemetry.prometheus)") from None
            log.info("prometheus endpoint: url=http://%s:%d/metrics", tel.prometheus_host,
                     sock.getsockname()[1])
            self.listeners[("", "telemetry")] = [sock]

    def build_plan(self) -> None:
        """Create rings and counters and the process specs (in start order)."""
        cfg, n = self.cfg, self.workers
        egress_inputs: list[Ring] = []
        routes: list[Route] = []
        stream_of = {}
        for s in cfg.egress.streams:
            for subj in s.subjects:
                stream_of[subj] = s.name
        from engine.streams import subject_matches

        sinks_specs, stage_specs, source_specs = [], [], []
        extra_streams: dict[str, StreamConfig] = {}

        def defs_of(gear: GearConfig) -> tuple[StatDef, ...]:
            cls = gear_class(gear.gear, Gear)
            return tuple(cls.stat_defs(gear.settings))

        for p in cfg.pipelines:
            lanes_in = [self._ring(f"{p.name}-{p.source.name}-{i}") for i in range(n)]
            src_defs = defs_of(p.source)
            replicated = gear_class(p.source.gear, Source).replicated
            extras = self._gear_extras(p.name, p.source, n if replicated else 1, egress_inputs,
                                       routes, extra_streams)
            if replicated:
                for i in range(n):  # one source per lane, each feeding its own lane
                    source_specs.append(ProcessSpec(
                        name=f"{p.name}.{p.source.name}.{i}", role="source", pipeline=p.name,
                        gear=p.source, replica=i, replicas=n, outputs=[lanes_in[i]],
                        counters=self._counters(f"{p.name}-{p.source.name}-{i}", src_defs),
                        journal=extras[i][0], outlets=extras[i][1], stat_defs=src_defs,
                        listeners=self.listeners.get((p.name, p.source.name), [])))
            else:
                source_specs.append(ProcessSpec(
                    name=f"{p.name}.{p.source.name}", role="source", pipeline=p.name,
                    gear=p.source, replicas=n, outputs=lanes_in, key=p.key,
                    counters=self._counters(f"{p.name}-{p.source.name}", src_defs),
                    journal=extras[0][0], outlets=extras[0][1], stat_defs=src_defs,
                    listeners=self.listeners.get((p.name, p.source.name), [])))
            # levels[i]: lane i's rings from the source's down to the last stage's (a
            # source's durable acknowledgement watches them: engine.settle)
            levels: list[list[list[Ring]]] = [[[ring]] for ring in lanes_in]
            current = lanes_in
            fan = len(p.sinks) > 1  # the last stage writes one ring per sink (engine.fanout)
            outs: list[list[Ring]] = [list(lanes_in)]  # per sink (one without fan-out): lanes
            for k, stage in enumerate(p.stages):
                last = k == len(p.stages) - 1
                if fan and last:
                    outs = [[self._ring(f"{p.name}-{stage.name}-{sink.name}-{i}")
                             for i in range(n)] for sink in p.sinks]
                    nxt_per_lane = [[outs[j][i] for j in range(len(p.sinks))] for i in range(n)]
                else:
                    ring_row = [self._ring(f"{p.name}-{stage.name}-{i}") for i in range(n)]
                    outs = [ring_row]
                    nxt_per_lane = [[ring_row[i]] for i in range(n)]
                stage_defs = defs_of(stage)
                for i in range(n):
                    stage_specs.append(ProcessSpec(
                        name=f"{p.name}.{stage.name}.{i}", role="stage", pipeline=p.name,
                        gear=stage, replica=i, replicas=n, inputs=[current[i]],
                        outputs=nxt_per_lane[i], stat_defs=stage_defs,
                        sinks=tuple(sk.name for sk in p.sinks) if fan and last else (),
                        counters=self._counters(f"{p.name}-{stage.name}-{i}", stage_defs)))
                    levels[i].append(nxt_per_lane[i])
                current = [lane[0] for lane in nxt_per_lane]
            to_js: list[int] = []  # indexes of the egress sinks
            for j, sink in enumerate(p.sinks):
                inputs = outs[j] if fan else outs[0]
                if gear_class(sink.gear, Sink).to_jetstream:
                    to_js.append(j)
                    subject = sink.settings.subject
                    stream = next(s.name for s in cfg.egress.streams
                                  if any(subject_matches(pt, subject) for pt in s.subjects))
                    for ring in inputs:
                        egress_inputs.append(ring)
                        routes.append(Route(subject=subject, stream=stream))
                else:
                    sink_defs = defs_of(sink)
                    sinks_specs.append(ProcessSpec(
                        name=f"{p.name}.{sink.name}", role="sink", pipeline=p.name, gear=sink,
                        replicas=n, inputs=inputs, stat_defs=sink_defs,
                        counters=self._counters(f"{p.name}-{sink.name}", sink_defs)))
            if to_js:  # the source may await its frames' arrival in JetStream
                chains = []
                for lane in levels:
                    chain = [list(level) for level in lane]
                    if fan:  # the last level: only the rings egress reads
                        chain[-1] = [chain[-1][j] for j in to_js]
                    chains.append(chain)
                for spec in source_specs:
                    if spec.pipeline == p.name:
                        spec.settle = ([chains[spec.replica]] if replicated else chains)
        specs: list[ProcessSpec] = []
        specs.append(ProcessSpec(
            name="telemetry", role="telemetry", counters=None,
            listeners=self.listeners.get(("", "telemetry"), []),
            extra=TelemetryPlan(interval=cfg.telemetry.interval,
                                prometheus_host=cfg.telemetry.prometheus_host,
                                prometheus_port=cfg.telemetry.prometheus_port,
                                subject=cfg.telemetry.subject, labels=dict(cfg.labels),
                                hello=self._hello(), hub_streams=self._hub_streams(),
                                otlp=cfg.telemetry.otlp)))
        if cfg.passport is not None:
            specs.append(ProcessSpec(name="hublink", role="hublink", counters=None,
                                     extra=HublinkPlan(bootstrap=str(self.bootstrap))))
        hub = set(self._hub_streams())
        if egress_inputs:
            specs.append(ProcessSpec(
                name="egress", role="egress", inputs=egress_inputs,
                counters=self._counters("egress", EGRESS_STATS), stat_defs=EGRESS_STATS,
                extra=EgressPlan(routes=routes,
                                 streams=[dataclasses.replace(s, linked=s.name in hub)
                                          for s in cfg.egress.streams]
                                 + list(extra_streams.values()),
                                 batch=cfg.egress.batch, max_inflight=cfg.egress.max_inflight,
                                 ack_timeout=cfg.egress.ack_timeout,
                                 hub_streams=self._hub_streams())))
        specs += sinks_specs + stage_specs + source_specs
        tel = cfg.telemetry
        if tel.traces.enabled or tel.logs.enabled:
            for spec in specs:
                spec.tap = self._tap(spec.name)
        if tel.logs.enabled:  # the supervisor's own records (restarts, crash loops, drain)
            self.plan.own_tap = self._tap("supervisor")
        for spec in specs:
            if spec.role in ("egress", "telemetry", "hublink"):
                spec.bus_auth = self._auth(spec.role)
            elif spec.gear is not None:
                spec.bus_auth = self._auth(self._gear_user(spec.pipeline, spec.gear.name))
        self._place(specs)
        self.plan.specs = specs

    def _place(self, specs: list[ProcessSpec]) -> None:
        placement = self.cfg.placement
        if placement == "none":
            return
        if isinstance(placement, dict):
            for s in specs:
                s.cpu = placement.get(s.name)
            return
        cpus = sorted(os.sched_getaffinity(0))
        # auto: stage workers get a CPU each, round robin; io, egress and telemetry float
        # (they mostly wait, and on a small machine the scheduler places them best)
        stage_no = 0
        for s in specs:
            if s.role == "stage":
                s.cpu = cpus[stage_no % len(cpus)]
                stage_no += 1

    def start(self) -> None:
        """Lock, bind listeners, clean, start NATS, create segments and fork every process.

        Raises:
            RackAlreadyRunning: another supervisor holds the data dir.
            RackStartError: the rack cannot work (say why; nothing is left running).
        """
        self.procs.lock()
        set_process_title(process_title(self.cfg.rack_id, "supervisor"))
        try:  # before binding: a survivor of the previous run may hold a port
            self.leftovers.scan()
        except LeftoverError as exc:
            raise RackStartError(str(exc)) from None
        self.bind_listeners()
        self.procs.clear_crash_files()
        if self.cfg.nats.embedded:
            self.bus_users = self._bus_users()
            self.nats = NatsServer(rack_id=self.cfg.rack_id, data_dir=self.data_dir,
                                   host=self.cfg.nats.host, port=self.cfg.nats.port,
                                   users=tuple(self.bus_users.values()),
                                   leaf=self._leaf())
            self.nats.start()
            self.nats_url = self.nats.url
            log.info("nats-server started: url=%s, pid=%s", self.nats_url, self.nats.pid)
        try:
            self.build_plan()
        except LeftoverError as exc:
            raise RackStartError(str(exc)) from None
        self.leftovers.settle()
        self.procs.install_signals()
        self.runtime = Runtime(rack_id=self.cfg.rack_id, data_dir=str(self.data_dir),
                               nats_url=self.nats_url, batch=self.cfg.ring_batch,
                               ready_fd=self.procs.ready_w, traces=self.cfg.telemetry.traces,
                               logs=self.cfg.telemetry.logs)
        self.procs.children = [Child(name=spec.name, role=spec.role, cpu=spec.cpu,
                                     title=self._title(spec), spec=spec,
                                     run=functools.partial(run_process, spec, self.runtime))
                               for spec in self.plan.specs]
        for child in self.procs.children:
            self.procs.fork(child)
        if self.plan.own_tap is not None:  # after the forks: a child takes its own tap
            install_log_tap(Tap(self.plan.own_tap, None), self.cfg.telemetry.logs)
        self._write_state()
        log.info("rack started: rack=%s, processes=%d, workers=%d",
                 self.cfg.rack_id, len(self.procs.children), self.workers)

    def _leaf(self) -> LeafRemote | None:
        """The hub link of a rig with a passport: its CA pinned in the data dir (the seed
        goes into nats-server.conf, 0600 like the passport)."""
        passport = self.cfg.passport
        if passport is None:
            return None
        ca_file = self.data_dir / "mixer-ca.pem"
        ca_file.write_text(passport.ca)
        log.info("hub link: rack=%s, hub=%s", passport.rack, ", ".join(passport.hub))
        return LeafRemote(urls=passport.hub, seed=passport.nkey_seed, ca_file=str(ca_file))

    def _title(self, spec: ProcessSpec) -> str:
        """``fluxrig <rack> <pipeline.gear> [replica]`` (``egress``, ``telemetry``)."""
        if spec.gear is None:
            return process_title(self.cfg.rack_id, spec.role)
        role = f"{spec.pipeline}.{spec.gear.name}"
        return process_title(self.cfg.rack_id, role,
                             spec.replica if spec.name == f"{role}.{spec.replica}" else None)

    def _write_state(self) -> None:
        state = {
            "rack": self.cfg.rack_id,
            "pid": os.getpid(),
            "config": self.cfg.file,
            "workers": self.workers,
            "nats_url": masked_url(self.nats_url),  # 0644: never a password
            "nats_pid": self.nats.pid if self.nats else None,
            "status": "failed" if self.procs.failed else "degraded" if self.procs.degraded
            else "running",
            "ready": self.procs.ready,
            "reason": self.procs.failed or self.procs.degraded,
            "code_paths": code_paths(),  # C or pure Python per part; children inherit it
            "data_dir": str(self.data_dir),
            "hub": list(self.cfg.passport.hub) if self.cfg.passport else None,
            "tap": self.plan.own_tap.segment.name if self.plan.own_tap else None,
            "processes": [
                {
                    "name": c.spec.name,
                    "role": c.spec.role,
                    "pid": c.pid,
                    "cpu": c.spec.cpu,
                    "restarts": c.restarts,
                    "last_error": c.last_error,
                    "counters": c.spec.counters.segment.name if c.spec.counters else None,
                    "inputs": [r.segment.name for r in c.spec.inputs],
                    "stats": [d.to_json() for d in c.spec.stat_defs],
                    "journal": c.spec.journal.segment.name if c.spec.journal else None,
                    "tap": c.spec.tap.segment.name if c.spec.tap else None,
                }
                for c in self.procs.children
            ],
        }
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.data_dir / STATE_FILE)

    # --- run --------------------------------------------------------------------------------

    def _reap(self) -> None:
        self.procs.reap(self._nats_exited)

    def _nats_exited(self, pid: int, status: int) -> bool:
        if self.nats is not None and self.nats.proc is not None and pid == self.nats.proc.pid:
            self.nats.proc.returncode = os.waitstatus_to_exitcode(status)
            return True
        return False

    def _restart_due(self) -> float:
        """Restart children whose backoff elapsed and a dead embedded nats-server; return
        seconds to the next restart (or 1)."""
        next_in = self.procs.restart_due()
        if self.nats is not None and self.nats.proc is not None and self.nats.proc.poll() is not None:
            log.error("nats-server died, restarting: code=%s", self.nats.proc.returncode)
            try:
                self.nats.start()
                self._write_state()
            except Exception as exc:
                log.error("nats-server restart failed: error=%s", exc)
                next_in = min(next_in, 1.0)
        return next_in

    @property
    def outcome(self) -> str:
        """Why the rack stopped the way it did (for the exit message)."""
        if self.left_in_rings:
            return f"drain timed out: bytes_left_in_rings={self.left_in_rings}"
        return self.procs.failed or self.procs.degraded or "clean"

    def run(self) -> int:
        """Supervise until a stop signal, then drain; returns the exit code. The service
        manager's watchdog is fed from this loop, so a stuck supervisor gets restarted, and
        no longer once the rack gave up."""
        while not self.procs.stop_requested:
            if self.procs.reload_requested:
                self.procs.reload_requested = False
                if self._candidate_ok():
                    self.reexec = True
                    break
            self._reap()
            timeout = self._restart_due()
            if (ping := self.procs.ping()) is not None:
                timeout = min(timeout, ping)
            self.procs.sleep(timeout)
        return self.drain()

    def request_stop(self) -> None:
        """Ask ``run`` to drain and return (from a signal handler or another thread)."""
        self.procs.request_stop()

    # --- drain -----------------------------------------------------------------------------

    def rings_empty(self) -> bool:
        """True when every ring's head has caught up with its tail."""
        return all(s.used == 0 for s in (r.statistics() for r in self.plan.rings))

    def drain(self) -> int:
        """Stop intake, let rings empty, stop everything, clean up; 0 if nothing was left."""
        log.info("draining: rack=%s", self.cfg.rack_id)
        # the drain may take drain_timeout plus the stop timeouts below: ask for it
        budget = self.drain_timeout + 20.0 + 15.0 + 5.0 + 10.0
        self.notifier.send("STOPPING=1", "STATUS=draining",
                           f"EXTEND_TIMEOUT_USEC={int(budget * 1e6)}")
        self.procs.stop_children({"source"}, 20.0)  # a switch answers what is in flight first
        # a rack that gave up has a process that will not consume its rings: what they hold
        # is kept for the next start (below), so there is no point waiting for it long
        deadline = time.monotonic() + (min(self.drain_timeout, GAVE_UP_DRAIN)
                                       if self.procs.failed else self.drain_timeout)
        while not self.rings_empty() and time.monotonic() < deadline:
            self._reap()
            self._restart_due()  # a stage that dies while draining still has to finish
            self.procs.sleep(0.05)  # ring positions live in shared memory: no event to wait on
        left = self.left_in_rings = sum(r.statistics().used for r in self.plan.rings)
        self.procs.stop_children({"stage", "sink", "egress"}, 15.0)
        self.procs.stop_children({"telemetry", "hublink"}, 5.0)
        if self.nats is not None:
            self.nats.stop()
        self.cleanup()
        if left:
            log.error("drain timed out: bytes_left_in_rings=%d", left)
            return 1
        if self.procs.failed or self.procs.degraded:
            log.error("rack stopped, not cleanly: rack=%s, reason=%s", self.cfg.rack_id,
                      self.procs.failed or self.procs.degraded)
            return 1
        log.info("rack stopped cleanly: rack=%s", self.cfg.rack_id)
        return 0

    def cleanup(self) -> None:
        """Unlink the segments that hold nothing, remove the state file, release the lock
        (idempotent). A ring with unconsumed records or a journal with open slots (a drain
        cut short: NATS away, a process stuck) is kept for the next start to adopt."""
        kept = []
        for ring in self.plan.rings:
            used = ring.statistics().used
            if used:
                kept.append(f"{ring.segment.name} ({used} bytes)")
                ring.segment.release()
            else:
                ring.unlink()
        for c in self.plan.counters:
            c.unlink()
        for t in self.plan.taps:
            t.unlink()
        for j in self.plan.journals:
            open_slots = sum(1 for _ in j.pending())
            if open_slots:
                kept.append(f"{j.segment.name} ({open_slots} slots)")
                j.segment.release()
            else:
                j.unlink()
        if kept:
            log.error("segments kept for the next start, they still hold work: %s",
                      ", ".join(kept))
        self.plan = _Plan()
        try:
            (self.data_dir / STATE_FILE).unlink()
        except FileNotFoundError:
            pass
        for socks in self.listeners.values():
            for sock in socks:
                sock.close()
        self.listeners.clear()
        self.procs.close()
