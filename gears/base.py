"""The gear contract: how a gear is configured, started in its process, fed and drained.

A gear never sees rings, processes or sockets of the rack. The rack gives it a
``GearContext`` and calls it; it hands frames back through ``emit``.

Life cycle (all in the gear's own process, after ``fork``):

1. ``parse_settings(raw, at)`` — a classmethod, run by ``engine check`` and at start, before
   any process exists. Validate everything here and raise ``at.error(...)`` (a
   ``ConfigError`` naming file and key path). Return any object; it is handed to ``__init__``.
   Declare every key in ``settings_table`` and read through it (``engine.keytable``): it
   refuses unknown keys, holds defaults and bounds, and is what ``docs/reference.md`` lists.
2. ``__init__(settings, ctx)`` — in the worker, once per process start (and again after a
   restart: a gear must not rely on state that only lived in a crashed process).
3. Role-specific calls:

   * ``Stage.process(frames, emit)``: a batch in, zero or more frames out via ``emit(frame)``.
     The batch is committed upstream only after everything emitted is in the output ring, so
     a crash replays the batch: make ``process`` deterministic and keep the frame ``id`` of a
     1:1 transform (use ``derive_id`` for extra frames) so replays de-duplicate downstream.
   * ``Source.run(emit, stopping)``: an asyncio coroutine producing frames with
     ``await emit(frames)`` until ``stopping`` is set; ``emit`` returns once the frames are in
     the ring (it waits on a full ring: that is backpressure). An item may also be a frame
     already encoded (``engine.frame.encode_parts``): a source making many small frames
     saves building and checking a ``Frame`` for each.
   * ``Sink.write(frames)``: an asyncio coroutine that makes a batch durable; the batch is
     committed upstream when it returns, so raising means "retry later".

4. ``close()`` — on a clean stop (drain), after the last batch; a sink's is awaited as
   ``aclose()`` in its event loop (default: ``close()``).

What a gear may ask the rack for (classmethods, answered from the settings before any
process exists, so ``engine check`` sees them and the supervisor sizes shared memory):

* ``stat_defs(settings)``: named counters and gauges (``engine.counters.StatDef``) the gear
  keeps in its process's counters segment; they reach ``engine status``, the stats snapshots
  and Prometheus. The gear gets them as ``ctx.stats``.
* ``journal_spec(settings)`` (sources): an in-flight journal in shared memory
  (``engine.journal``) that survives the process; its successor gets it as ``ctx.journal``.
* ``outlets(settings, rack_id)`` (sources): extra outputs, each a ring per lane published by
  egress to its own subject and stream (``engine.outlet``). A replicated source also gets
  its own lane as the outlet ``"out"``, for gears that must write synchronously.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from engine.bus import BusAuth, Permissions
from engine.counters import Counters, StatDef, Stats
from engine.frame import Frame, derive_id  # noqa: F401 - re-exported: part of the gear contract
from engine.journal import Journal, JournalSpec
from engine.keytable import Table
from engine.outlet import Outlet, OutletSpec
from engine.schema import At
from engine.tap import OFF, Tracer


class DeadLetterError(RuntimeError):
    """A gear gave up on a frame where no dead-letter file exists (outside a rack)."""


def _no_dead_letter(frame: Frame, reason: str) -> None:
    raise DeadLetterError(f"no dead-letter file outside a rack: frame_id={frame.id.hex()}, "
                          f"reason={reason}")


class Durable(Protocol):
    """What a source awaits before it tells a client its frames are safe (``engine.settle``)."""

    async def settle(self) -> None:
        """Return once every frame this process wrote before the call is in JetStream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkBatching:
    """How the rack hands frames to a sink's ``write``.

    Attributes:
        count: at most this many frames per call.
        linger: seconds to wait for more frames when fewer than ``count`` are there (0:
            hand over what there is at once).
    """

    count: int
    linger: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GearContext:
    """What the rack tells a gear about where it runs.

    Attributes:
        rack_id: the rack's id.
        pipeline: the pipeline name.
        name: the gear's name in the pipeline.
        replica: this process's lane (0-based); sources and sinks run once: 0.
        replicas: number of lanes of the pipeline (``--workers``).
        data_dir: the rack's data directory (for gears that keep files).
        log: a logger named ``fluxrig.<pipeline>.<name>``.
        counters: this process's ``engine.counters.Counters`` (a gear may record latencies
            with ``observe``; frames in/out are counted by the rack), or None in tests.
        nats_url: the rack's NATS (for gears that keep state in JetStream/KV), "" if none.
        stats: the gear's declared stats (``stat_defs``), or None when it declares none.
        journal: the gear's journal (``journal_spec``), or None.
        outlets: synchronous writers by name (``outlets`` plus ``"out"`` for a replicated
            source's own lane); empty for other gears.
        listeners: the bound listening sockets of ``listeners(settings)``, in that order.
        bus_auth: how to connect to ``nats_url`` (``engine.bus.connect``), or None.
        ready: tell the rack this process serves (sources with ``signals_ready`` call it
            themselves once they do; for the others the rack calls it).
        tracer: sampling decisions and the process's signal tap (``engine.tap``): a gear
            records spans of the transactions it keeps; ``engine.tap.OFF`` outside a rack.
        dead_letter: give up on one frame, with the reason (a sink's refused request): the
            frame is appended to ``<data_dir>/deadletter/<pipeline>.<gear>.cbor`` and
            counted as an error. Outside a rack it raises ``DeadLetterError``.
        durable: for a replicated source whose pipeline ends in an egress sink: ``await
            ctx.durable.settle()`` returns once every frame this process wrote before the
            call is stored in JetStream (``engine.settle``); None otherwise.
    """

    rack_id: str
    pipeline: str
    name: str
    replica: int
    replicas: int
    data_dir: str
    log: logging.Logger
    counters: Counters | None = None
    nats_url: str = ""
    stats: Stats | None = None
    journal: Journal | None = None
    outlets: Mapping[str, Outlet] = field(default_factory=dict)
    listeners: Sequence[socket.socket] = ()
    bus_auth: BusAuth | None = None
    ready: Callable[[], None] = lambda: None
    tracer: Tracer = OFF
    dead_letter: Callable[[Frame, str], None] = field(default=_no_dead_letter)
    durable: Durable | None = None


class Gear:
    """Base of every gear; subclass ``Source``, ``Stage`` or ``Sink``."""

    role: ClassVar[str] = ""
    # every settings key with type, default and meaning: parse_settings reads through it and
    # docs/reference.md is generated from it (engine.keytable)
    settings_table: ClassVar[Table] = Table("settings", "This gear takes no settings.", ())

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> Any:
        """Validate the ``settings`` mapping of this gear; default: none allowed."""
        cls.settings_table.read(raw, at)
        return None

    @classmethod
    def stat_defs(cls, settings: Any) -> tuple[StatDef, ...]:
        """Named stats this gear keeps (default: none)."""
        return ()

    @classmethod
    def bus_permissions(cls, settings: Any, rack_id: str) -> Permissions | None:
        """What the gear's processes may do on the rack's NATS (``engine.bus``); None: the
        gear does not use NATS (default). The rack makes it a user of its own with exactly
        these permissions and hands the credentials over as ``ctx.bus_auth``."""
        return None

    @classmethod
    def listeners(cls, settings: Any) -> tuple[tuple[str, int], ...]:
        """(host, port) of each TCP listener the gear serves; the supervisor binds them
        before forking and hands the sockets to the gear's processes (``ctx.listeners``)."""
        return ()

    @classmethod
    def describe(cls, settings: Any) -> tuple[str, ...]:
        """Lines ``engine check`` prints about what this gear will do (e.g. the modbus
        source's request plan); default: none."""
        return ()

    @classmethod
    def needs_durable(cls, settings: Any) -> bool:
        """True when the gear awaits ``ctx.durable`` (sources only; e.g. an HTTP source that
        answers once a request is in JetStream): ``engine check`` then requires the pipeline
        to end in an egress sink. Default: False."""
        return False

    @classmethod
    def routes(cls, settings: Any) -> tuple[str, ...]:
        """Names of the outputs this gear sends frames to by their ``route`` header (stages
        only; ``engine check`` requires each to be a sink of the pipeline, or ``discard``).
        Default: none."""
        return ()

    @classmethod
    def min_ring_capacity(cls, settings: Any) -> int:
        """The smallest ``rings.capacity`` this gear works with (a record may take 1/8)."""
        return 0

    @classmethod
    def journal_spec(cls, settings: Any) -> JournalSpec | None:
        """The in-flight journal this gear needs (sources only; default: none)."""
        return None

    @classmethod
    def outlets(cls, settings: Any, rack_id: str) -> tuple[OutletSpec, ...]:
        """Extra outputs published by egress (sources only; default: none)."""
        return ()

    def __init__(self, settings: Any, ctx: GearContext):
        self.settings = settings
        self.ctx = ctx

    def close(self) -> None:
        """Release resources at a clean stop."""


class Source(Gear):
    """A gear that brings frames into the rack (runs in an asyncio io process).

    ``replicated = True`` runs one source process per lane (``--workers N``), each writing
    its own lane; e.g. a TCP server whose replicas share the listening socket the supervisor
    bound. ``signals_ready = True``: the rack counts the process ready only when the gear
    calls ``ctx.ready()`` (e.g. once it listens), not when ``run`` starts.
    """

    role = "source"
    replicated: ClassVar[bool] = False
    signals_ready: ClassVar[bool] = False  # True: the gear calls ctx.ready() once serving

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        """Produce frames with ``await emit(frames)`` (``Frame`` objects or encoded frames)
        until ``stopping`` is set."""
        raise NotImplementedError


class Stage(Gear):
    """A processing step (runs in a pinned stage worker, one per lane)."""

    role = "stage"

    def process(self, frames: list[Frame], emit: Callable[[Frame], None]) -> None:
        """Handle a batch; call ``emit(frame)`` for every frame to pass on."""
        raise NotImplementedError


class Sink(Gear):
    """A gear that takes frames out of the rack (runs in an asyncio io process).

    ``to_jetstream = True`` marks a sink whose frames the rack's egress process publishes
    (its settings then have a ``subject``); such a sink gets no process of its own.
    """

    role = "sink"
    to_jetstream: ClassVar[bool] = False

    @classmethod
    def batching(cls, settings: Any) -> SinkBatching | None:
        """How many frames ``write`` takes at once and how long the rack waits to fill a
        batch; None (default): what one poll of a lane gives, at most ``rings.batch``."""
        return None

    async def write(self, frames: list[Frame]) -> None:
        """Make ``frames`` durable; returning commits them upstream."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release resources at a stop, in the sink's event loop (what a client library
        closes with a coroutine); the rack calls this, not ``close``. Default: ``close``."""
        self.close()


# Registered gears: name -> "module:Class". Imported on first use, so `engine check` does not
# import what a rig does not use.
_BUILTIN: Mapping[str, str] = {
    "generator": "gears.generator:Generator",
    "mapping": "gears.mapping:MappingStage",
    "map": "gears.map:MapStage",
    "file": "gears.io.file:FileSink",
    "http_client": "gears.io.http_sink:HttpSink",
    "stdout": "gears.io.stdout:StdoutSink",
    "egress": "gears.egress:Egress",
    "iso8583": "gears.iso8583.gear:SwitchGear",
    "modbus": "gears.modbus.gear:ModbusSource",
    "http_server": "gears.io.http_source:HttpSource",
}


G = TypeVar("G", bound="Gear")


def known_gears() -> list[str]:
    """Names of every registered gear, sorted."""
    return sorted(_BUILTIN)


def lookup_gear(name: str) -> type[Gear] | None:
    """The gear class registered as ``name``, or None."""
    target = _BUILTIN.get(name)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def gear_class(name: str, kind: type[G]) -> type[G]:
    """The gear class of a validated config: KeyError if unknown, TypeError if not a ``kind``."""
    cls = lookup_gear(name)
    if cls is None:
        raise KeyError(f"unknown gear {name!r}")
    if not issubclass(cls, kind):
        raise TypeError(f"gear {name!r} is not a {kind.__name__}")
    return cls
