"""What the supervisor hands each forked process: typed plans per role, built before the fork.

Nothing here does anything; the supervisor fills these in (``engine.supervisor``) and the
process bodies read them (``engine.worker``, ``engine.egress``, ``engine.telemetry``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from engine.bus import BusAuth
from engine.config import GearConfig, OtlpConfig
from engine.counters import Counters, StatDef
from engine.journal import Journal
from engine.ring import Ring
from engine.streams import StreamConfig
from engine.tap import LogShipSettings, TraceSettings

STATE_FILE = "state.json"  # the supervisor's state in the data dir: pids, ready, status


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where the frames of one input ring go."""

    subject: str
    stream: str


@dataclass(slots=True, kw_only=True)
class EgressPlan:
    """The egress process's part of the rig: routes parallel to ``spec.inputs``."""

    routes: list[Route]
    streams: list[StreamConfig]
    batch: int
    max_inflight: int
    ack_timeout: float
    hub_streams: tuple[str, ...] = ()  # linked to a Mixer: make their ``hub`` consumers


@dataclass(frozen=True, slots=True, kw_only=True)
class HublinkPlan:
    """A linked rack's hublink process: where its bootstrap rig is (the rack's own keys)."""

    bootstrap: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryPlan:
    """The telemetry process's part of the rig."""

    interval: float
    prometheus_host: str
    prometheus_port: int | None
    subject: str
    labels: dict[str, str]
    hello: dict[str, object] | None = None  # linked to a Mixer: announced on fluxrig.up.<r>
    hub_streams: tuple[str, ...] = ()  # linked: their ``hub`` consumers' backlog is reported
    otlp: OtlpConfig | None = None  # a collector that gets the spans directly


@dataclass(slots=True, kw_only=True)
class ProcessSpec:
    """Everything a forked rack process needs; built by the supervisor before forking.

    Attributes:
        name: unique process name, e.g. ``demo.map.1`` (used for logs, counters, placement).
        role: ``source``, ``stage``, ``sink``, ``egress`` or ``telemetry``.
        pipeline: pipeline name ("" for rack-wide processes).
        gear: the gear configuration (None for egress/telemetry).
        replica: lane index for stages, 0 otherwise.
        replicas: number of lanes.
        inputs: rings this process consumes.
        outputs: rings this process produces into (a source: one per lane).
        counters: this process's counters segment.
        key: lane key path (sources only).
        cpu: CPU to pin to, or None.
        extra: role-specific data (egress routes, telemetry targets).
        outlets: the gear's extra outlet rings by name (sources only).
        journal: the gear's in-flight journal (sources only), or None.
        stat_defs: the gear's named stats (slots after the histogram in ``counters``).
        tap: the process's signal tap ring (``engine.tap``), or None (traces and log
            shipping off).
        listeners: sockets the supervisor bound for the gear (``Gear.listeners`` order).
        bus_auth: the process's credentials for the rack's NATS (``engine.bus``), or None.
        sinks: a fan-out stage's sink names, parallel to ``outputs`` (``engine.fanout``);
            empty for a stage with one output.
        settle: a source's rings level by level down to egress, one chain per output lane
            (``engine.settle``); empty when its pipeline has no egress sink.
    """

    name: str
    role: str
    pipeline: str = ""
    gear: GearConfig | None = None
    replica: int = 0
    replicas: int = 1
    inputs: list[Ring] = field(default_factory=list)
    outputs: list[Ring] = field(default_factory=list)
    counters: Counters | None = None
    key: str | None = None
    cpu: int | None = None
    extra: EgressPlan | TelemetryPlan | HublinkPlan | None = None
    outlets: dict[str, Ring] = field(default_factory=dict)
    listeners: list[socket.socket] = field(default_factory=list)
    bus_auth: BusAuth | None = None
    journal: Journal | None = None
    stat_defs: tuple[StatDef, ...] = ()
    tap: Ring | None = None
    sinks: tuple[str, ...] = ()
    settle: list[list[list[Ring]]] = field(default_factory=list)


@dataclass(slots=True)
class Runtime:
    """Rack-wide facts for process bodies (identical in every child)."""

    rack_id: str
    data_dir: str
    nats_url: str
    batch: int
    ready_fd: int = -1  # write end of the supervisor's readiness pipe (``signal_ready``)
    traces: TraceSettings = TraceSettings()  # how gears sample traces into their tap
    logs: LogShipSettings = LogShipSettings()  # which log records go into the tap


def signal_ready(rt: Runtime, name: str) -> None:
    """Tell the supervisor process ``name`` is ready (serving). One line on a pipe every
    process inherited: writes below PIPE_BUF are atomic, so lines never interleave."""
    if rt.ready_fd >= 0:
        try:
            os.write(rt.ready_fd, f"{name}\n".encode())
        except OSError:
            pass  # the supervisor is gone; nobody to tell
