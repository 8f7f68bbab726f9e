"""Rig configuration: YAML in, a validated, typed ``RigConfig`` out — before anything starts.

Every error names the file, the key path and what was expected, e.g.::

    configs/x.yaml: pipelines[0].stages[2].gear: unknown gear 'iso8538' (known: generator, mapping)

Validation is pure (no sockets, no processes): ``load_config`` reads the file
(``engine.yamlfile``: ``${VAR}`` interpolation, duplicate keys refused) and ``parse_config``
checks a plain mapping, so tests feed dicts straight in. Every mapping is read through its
key table (``engine.rigkeys``; defaults and bounds are there, and ``docs/reference.md`` is
generated from them). Gear settings are checked by each gear's own ``parse_settings``
(``gears.base``) with the same helpers.

Shape of a rig file (all keys but ``rack.id`` and ``pipelines`` have defaults)::

    rack:      {id, labels, data_dir}         # data_dir: relative to the rig file's folder
    nats:      {url, auth | host, port, users}  # no url: the rack runs its own nats-server
    rings:     {capacity, batch}
    cpu:       {placement: auto | none | {process-name: cpu}}
    telemetry: {interval, prometheus: {host, port} | null, subject}
    egress:    {streams: [{name, subjects, storage, max_age, duplicate_window}],
                batch, max_inflight, ack_timeout}
    pipelines: [{name, key, source: {gear, settings}, stages: [{name, gear, settings}],
                 sinks: [{name, gear, settings}]}]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.bus import ADMIN, BusAuth
from engine.fanout import DISCARD
from engine.identity import IdentityError, Passport, read_passport
from engine.keytable import Reader
from engine.rigkeys import RIG
from engine.schema import (  # noqa: F401 - ConfigError and At are part of this module's API
    SUBJECT_PATTERN_RE,
    At,
    ConfigError,
    _type_name,
    get_http_header,
    get_otlp_endpoint,
)
from engine.streams import StreamConfig, subject_matches
from engine.tap import LogShipSettings, TraceSettings
from engine.units import is_decimal_size
from engine.yamlfile import load_yaml
from gears.base import Gear, Sink, gear_class, known_gears, lookup_gear

LABEL_RE = re.compile(r"^(?!__)[a-zA-Z_][a-zA-Z0-9_]{0,62}$")  # a Prometheus label name
MIN_JS_AGE = 0.1  # seconds: JetStream's smallest max_age / duplicate window
MAX_RING = 1 << 30  # bytes: no ring needs more, and a typo (2^80) must not reach shm_open


def shm_size() -> int:
    """Bytes /dev/shm can hold in all (its filesystem size)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return MAX_RING
    return st.f_blocks * st.f_frsize

# --- typed configuration -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GearConfig:
    """One gear in a pipeline: its place, its registered name and its parsed settings."""

    name: str
    gear: str
    role: str  # "source" | "stage" | "sink"
    settings: Any
    at: str  # key path, for messages at run time


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """A chain: one source, stages in order, one or more sinks fed by the last stage."""

    name: str
    key: str | None  # frame path choosing the lane; None: round robin by source batch
    source: GearConfig
    stages: tuple[GearConfig, ...]
    sinks: tuple[GearConfig, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressConfig:
    """Egress tuning and the streams it owns."""

    streams: tuple[StreamConfig, ...]
    batch: int = 1000
    max_inflight: int = 8
    ack_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsUserConfig:
    """An operator's read-only user of the embedded server (``nats.users``)."""

    name: str
    password: str
    streams: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsConfig:
    """The rack's NATS: an external ``url`` (with ``auth``), or an embedded server on
    ``host:port`` (with generated per-role users, plus the operator's ``users``)."""

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port is chosen at start and kept for restarts
    auth: BusAuth = field(default_factory=BusAuth)
    users: tuple[NatsUserConfig, ...] = ()

    @property
    def embedded(self) -> bool:
        """True when the rack runs its own nats-server."""
        return self.url is None


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpConfig:
    """A collector that gets the rack's spans over OTLP/HTTP (``telemetry.otlp``)."""

    endpoint: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    """Sampling interval, Prometheus endpoint (None: off), the stats subject, traces, log
    shipping and the direct OTLP export (None: off)."""

    interval: float = 1.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = None
    subject: str = ""
    traces: TraceSettings = TraceSettings()
    logs: LogShipSettings = LogShipSettings()
    otlp: OtlpConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RigConfig:
    """A validated rig file."""

    file: str
    rack_id: str
    labels: Mapping[str, str]
    data_dir: Path
    nats: NatsConfig
    ring_capacity: int
    ring_batch: int
    placement: str | Mapping[str, int]
    telemetry: TelemetryConfig
    egress: EgressConfig
    pipelines: tuple[PipelineConfig, ...] = field(default=())
    passport: Passport | None = None  # the hub link (``mixer.passport``), or None


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None
                ) -> RigConfig:
    """Read and validate a rig file, interpolating ``${VAR}`` from ``env`` (default: the
    process environment; ``engine.yamlfile``).

    Raises:
        ConfigError: unreadable file, bad YAML (with line and column), a duplicate key, an
            unset variable or invalid content.
    """
    loaded = load_yaml(path, env)
    return parse_config(loaded.data, str(path), base_dir=Path(path).resolve().parent,
                        origins=loaded.origins)


def _secret(r: Reader, key: str) -> str:
    """A secret named by ``<key>_env`` (an environment variable): never written in a rig."""
    name = r.string(f"{key}_env")
    if not name:
        return ""
    value = os.environ.get(name)
    if not value:
        raise r.where(f"{key}_env").error(f"environment variable {name} is not set")
    return value


def _nats_auth(r: Reader) -> BusAuth:
    tls = r.section("tls")
    for reader, k in ((r, "creds_file"), (r, "nkey_seed_file"), (tls, "ca"), (tls, "cert"),
                      (tls, "key")):
        path = reader.string(k)
        if path and not Path(path).is_file():
            raise reader.where(k).error(f"no such file: {reader.where(k).show(path)}")
    return BusAuth(user=r.string("user"), password=_secret(r, "password"),
                   token=_secret(r, "token"), creds_file=r.string("creds_file"),
                   nkey_seed_file=r.string("nkey_seed_file"), tls_ca=tls.string("ca"),
                   tls_cert=tls.string("cert"), tls_key=tls.string("key"))


def _nats(r: Reader) -> NatsConfig:
    url = r.raw("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("nats://", "tls://"))):
        raise r.where("url").error(f"expected a nats:// or tls:// URL, got "
                                   f"{r.where('url').show(url)}")
    if r.given("auth") and url is None:
        raise r.where("auth").error("only for an external nats.url (the embedded server "
                                    "makes its own users)")
    users = []
    for u in r.sections("users"):
        name = u.string("name")
        if name in (ADMIN, "egress", "telemetry"):
            raise u.where("name").error(f"{name!r} is one of the rack's own users")
        password = _secret(u, "password")
        if not password:
            raise u.where("password_env").error("required key missing")
        users.append(NatsUserConfig(name=name, password=password,
                                    streams=tuple(map(str, u.sequence("streams")))))
    return NatsConfig(url=url, host=r.string("host"), port=r.integer("port"),
                      auth=_nats_auth(r.section("auth")), users=tuple(users))


def _capacity(r: Reader) -> int:
    capacity = r.size("capacity")
    if capacity < 1024 or capacity & (capacity - 1):
        raw = r.raw("capacity")
        hint = (" (KB, MB, GB are powers of 1000: write KiB, MiB, GiB for powers of 1024)"
                if isinstance(raw, str) and is_decimal_size(raw) else "")
        raise r.where("capacity").error(f"must be a power of two >= 1024, got {capacity}"
                                        f"{hint}")
    shm_total = shm_size()
    if capacity > min(MAX_RING, shm_total):
        raise r.where("capacity").error(
            f"must be <= {min(MAX_RING, shm_total)} (1 GiB, and what /dev/shm holds: "
            f"{shm_total}), got {capacity}")
    return capacity


def _placement(r: Reader) -> str | Mapping[str, int]:
    raw = r.raw("placement")
    if raw is None or raw in ("auto", "none"):
        return "auto" if raw is None else str(raw)
    if isinstance(raw, Mapping):
        usable = sorted(os.sched_getaffinity(0))
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, int) or v not in usable:
                where = r.where("placement").key(str(k))
                raise where.error(f"expected one of this machine's usable CPUs {usable}, got "
                                  f"{where.show(v)}")
        return dict(raw)
    where = r.where("placement")
    raise where.error(f"expected 'auto', 'none' or a mapping process -> cpu, got "
                      f"{where.show(raw)}")


def _telemetry(r: Reader, rack_id: str) -> TelemetryConfig:
    prom_host, prom_port = "127.0.0.1", None
    if r.given("prometheus"):
        pm = r.section("prometheus")
        prom_host, prom_port = pm.string("host"), pm.integer("port")
    t = r.section("traces")
    tap = t.size("tap")
    if tap & (tap - 1):
        raise t.where("tap").error(f"expected a power of two (e.g. 1MiB), got {tap}")
    traces = TraceSettings(enabled=t.boolean("enabled"), sample=t.number("sample"),
                           keep_errors=t.boolean("keep_errors"),
                           keep_declines=t.boolean("keep_declines"),
                           keep_timeouts=t.boolean("keep_timeouts"),
                           slower_than=t.seconds("slower_than"), max_kept=t.integer("max_kept"),
                           tap=tap)
    lg = r.section("logs")
    logs = LogShipSettings(enabled=lg.boolean("enabled"), level=lg.string("level"),
                           rate=lg.number("rate"), burst=lg.integer("burst"))
    otlp = None
    if r.given("otlp"):
        o = r.section("otlp")
        raw = o.mapping("headers")
        headers = {str(k): get_http_header(raw, k, o.where("headers")) for k in raw}
        otlp = OtlpConfig(endpoint=get_otlp_endpoint(o.string("endpoint"), o.where("endpoint")),
                          headers=headers, timeout=o.seconds("timeout"))
    return TelemetryConfig(interval=r.seconds("interval"), prometheus_host=prom_host,
                           prometheus_port=prom_port,
                           subject=r.string("subject", default=f"fluxrig.stats.{rack_id}"),
                           traces=traces, logs=logs, otlp=otlp)


def _egress(r: Reader) -> EgressConfig:
    streams = []
    for s in r.sections("streams"):
        subjects = s.sequence("subjects")
        if not subjects:
            raise s.where("subjects").error("at least one subject is required")
        for j, subj in enumerate(subjects):
            if not isinstance(subj, str) or not SUBJECT_PATTERN_RE.match(subj):
                where = s.where("subjects").index(j)
                raise where.error(f"invalid subject pattern {where.show(subj)}")
        max_age, window = s.seconds("max_age"), s.seconds("duplicate_window")
        # what JetStream would refuse at stream creation, where egress could only retry
        # for ever: say it here, with the key
        if 0 < max_age < MIN_JS_AGE:
            raise s.where("max_age").error(
                f"must be 0 (kept) or at least {MIN_JS_AGE:g} s (JetStream's minimum), "
                f"got {max_age:g} s")
        if window < MIN_JS_AGE:
            raise s.where("duplicate_window").error(
                f"must be at least {MIN_JS_AGE:g} s, got {window:g} s")
        if max_age and window > max_age:
            raise s.where("duplicate_window").error(
                f"must not be longer than max_age ({max_age:g} s), got {window:g} s")
        last_values = s.optional_string("last_values") or ""
        if last_values and not any(str(x).endswith(".>") for x in subjects):
            raise s.where("last_values").error(
                "the stream needs a subject pattern ending in .> (its tail is the key)")
        streams.append(StreamConfig(
            name=s.string("name"), subjects=tuple(map(str, subjects)),
            storage=s.string("storage"), max_age=max_age, duplicate_window=window,
            max_msgs_per_subject=s.integer("max_msgs_per_subject"),
            hub=s.boolean("hub"), max_bytes=s.size("max_bytes"), last_values=last_values))
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise r.where("streams").error(f"duplicate stream names: {names}")
    return EgressConfig(streams=tuple(streams), batch=r.integer("batch"),
                        max_inflight=r.integer("max_inflight"),
                        ack_timeout=r.seconds("ack_timeout"))


def _gear(g: Reader, role: str, default_name: str) -> GearConfig:
    gname = g.string("gear")
    cls = lookup_gear(gname)
    if cls is None:
        raise g.where("gear").error(f"unknown gear {gname!r} (known: "
                                    f"{', '.join(known_gears())})")
    if cls.role != role:
        raise g.where("gear").error(f"gear {gname!r} is a {cls.role}, expected a {role}")
    return GearConfig(name=g.string("name", default=default_name), gear=gname, role=role,
                      settings=cls.parse_settings(g.raw("settings"), g.where("settings")),
                      at=g.at.path)


def _pipeline(p: Reader) -> PipelineConfig:
    name = p.string("name")
    key = p.raw("key")
    if key is not None and (not isinstance(key, str) or not key.startswith(("headers.", "body."))):
        raise p.where("key").error(f"expected a frame path like 'headers.device', got "
                                   f"{p.where('key').show(key)}")
    if not p.given("source"):
        raise p.where("source").error("required key missing")
    source = _gear(p.section("source"), "source", "source")
    stages = tuple(_gear(s, "stage", f"stage{j}") for j, s in enumerate(p.sections("stages")))
    sinks = tuple(_gear(s, "sink", f"sink{j}") for j, s in enumerate(p.sections("sinks")))
    if not sinks:
        raise p.where("sinks").error("at least one sink is required")
    if len(sinks) > 1 and not stages:
        raise p.where("sinks").error(
            f"{len(sinks)} sinks need a stage to fan out from (the last stage writes one ring "
            f"per sink); add one, e.g. a 'map' stage")
    seen: set[str] = set()
    for g in (source, *stages, *sinks):
        if g.name in seen:
            raise p.at.error(f"duplicate gear name {g.name!r}")
        seen.add(g.name)
    names = [sk.name for sk in sinks]
    if DISCARD in names:
        raise p.where("sinks").error(f"the sink name {DISCARD!r} is reserved (a route that "
                                     f"goes nowhere)")
    for j, stage in enumerate(stages):
        for route in gear_class(stage.gear, Gear).routes(stage.settings):
            if route != DISCARD and route not in names:
                raise p.where("stages").index(j).key("settings").error(
                    f"route {route!r} names no sink of the pipeline (sinks: "
                    f"{', '.join(names)})")
    if gear_class(source.gear, Gear).needs_durable(source.settings) and not any(
            gear_class(sk.gear, Sink).to_jetstream for sk in sinks):
        raise p.where("source").key("settings").error(
            "a durable acknowledgement needs an egress sink in the pipeline (frames are "
            "durable once JetStream stored them)")
    return PipelineConfig(name=name, key=key, source=source, stages=stages, sinks=sinks)


def _check_across(pipelines: tuple[PipelineConfig, ...], egress: EgressConfig, capacity: int,
                  rack_id: str, top: At) -> None:
    """What no single section can check: subjects against streams, ring capacity against
    every gear's records, gear-owned streams against configured ones."""
    at = top.key("pipelines")
    streams = egress.streams
    # every egress subject must land in exactly one configured stream
    for i, pipe in enumerate(pipelines):
        for j, sink in enumerate(pipe.sinks):
            subject = getattr(sink.settings, "subject", None)
            if not gear_class(sink.gear, Sink).to_jetstream or subject is None:
                continue
            owners = [st.name for st in streams if any(subject_matches(pt, subject)
                                                       for pt in st.subjects)]
            if len(owners) != 1:
                sat = at.index(i).key("sinks").index(j).key("settings").key("subject")
                raise sat.error(
                    f"subject {subject!r} must be captured by exactly one egress stream, "
                    f"captured by {owners or 'none'}"
                )

    for pipe in pipelines:
        for g in (pipe.source, *pipe.stages, *pipe.sinks):
            need = gear_class(g.gear, Gear).min_ring_capacity(g.settings)
            if capacity < need:
                raise top.key("rings").key("capacity").error(
                    f"must be >= {need} for gear {g.gear!r} at {g.at}, got {capacity}")

    # streams a gear owns (its outlets, e.g. the switch's SAF queue) must not clash with the
    # configured ones: JetStream refuses two streams capturing one subject
    for i, pipe in enumerate(pipelines):
        gear_cls = gear_class(pipe.source.gear, Gear)
        for o in gear_cls.outlets(pipe.source.settings, rack_id):
            sat = at.index(i).key("source")
            for st in streams:
                if st.name == o.stream.name or any(subject_matches(pt, o.subject)
                                                   for pt in st.subjects):
                    raise sat.error(
                        f"egress stream {st.name!r} clashes with the stream {o.stream.name!r} "
                        f"({o.subject}) this gear keeps for its {o.name!r} outlet")


def parse_config(raw: Any, file: str = "<config>", base_dir: Path | None = None,
                 origins: Mapping[str, str] | None = None) -> RigConfig:
    """Validate an already-parsed rig mapping (keys: ``engine.rigkeys``).

    A relative ``rack.data_dir`` is taken relative to ``base_dir`` (the rig file's folder,
    so the rack is the same whatever directory ``engine`` runs from), else to the current
    directory; the result is absolute. ``origins`` (``engine.yamlfile.RigYaml.origins``)
    marks the values taken from the environment: read from their text, never shown.
    """
    top = At(file, origins=origins or {})
    root = RIG.read(raw, top)
    if raw is None:
        raise top.error("empty rig file (expected at least rack and pipelines)")

    rack = root.section("rack")
    rack_id = rack.string("id")
    labels = rack.mapping("labels")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_RE.match(k):
            # labels go on every metric series and into the Mixer's registry: Prometheus
            # label names, refused here rather than rewritten on export
            raise rack.where("labels").error(
                f"invalid label name {k!r} (expected letters, digits and _, not starting "
                f"with a digit or __)")
        if not isinstance(v, str):
            raise rack.where("labels").key(k).error(f"expected a string, got {_type_name(v)}")
    data_dir = Path(rack.string("data_dir", default=f"var/{rack_id}"))
    if not data_dir.is_absolute():
        data_dir = (base_dir or Path.cwd()) / data_dir
    data_dir = Path(os.path.normpath(data_dir))

    nats = _nats(root.section("nats"))
    rings = root.section("rings")
    capacity = _capacity(rings)
    batch = rings.integer("batch")
    placement = _placement(root.section("cpu"))
    telemetry = _telemetry(root.section("telemetry"), rack_id)
    egress = _egress(root.section("egress"))

    pipelines = tuple(_pipeline(p) for p in root.sections("pipelines"))
    if not pipelines:
        raise top.key("pipelines").error("at least one pipeline is required")
    pnames = [p.name for p in pipelines]
    if len(set(pnames)) != len(pnames):
        raise top.key("pipelines").error(f"duplicate pipeline names: {pnames}")
    _check_across(pipelines, egress, capacity, rack_id, top)
    passport = None
    if "mixer" in raw:
        passport = _passport(root.section("mixer"), rack_id, nats, telemetry,
                             base_dir or Path.cwd())

    return RigConfig(
        file=file,
        rack_id=rack_id,
        labels={k: str(v) for k, v in labels.items()},
        data_dir=data_dir,
        nats=nats,
        ring_capacity=capacity,
        ring_batch=batch,
        placement=placement,
        telemetry=telemetry,
        egress=egress,
        pipelines=pipelines,
        passport=passport,
    )


RESERVED_RACK_IDS = frozenset({"hub", "up", "down", "src", "stats", "mixer", "traces", "logs"})


def _passport(m: Reader, rack_id: str, nats: NatsConfig, telemetry: TelemetryConfig,
              base_dir: Path) -> Passport:
    """The rack's passport, checked against the rig: its rack, an embedded NATS (the leaf
    link is the embedded server's), the stats subject the hub lets it publish."""
    path = Path(m.string("passport"))
    if not path.is_absolute():
        path = base_dir / path
    try:
        passport = read_passport(path)
    except IdentityError as exc:
        raise m.where("passport").error(str(exc)) from None
    if passport.rack != rack_id:
        raise m.where("passport").error(
            f"the passport is for rack {passport.rack!r}, this rig is rack {rack_id!r}")
    if rack_id in RESERVED_RACK_IDS:
        raise m.where("passport").error(
            f"rack id {rack_id!r} is reserved on a hub ({', '.join(sorted(RESERVED_RACK_IDS))})")
    if not nats.embedded:
        raise m.where("passport").error(
            "a hub link needs the rack's embedded nats-server (remove nats.url)")
    if telemetry.subject != f"fluxrig.stats.{rack_id}":
        raise m.where("passport").error(
            f"telemetry.subject must be fluxrig.stats.{rack_id} on a linked rack (the hub "
            f"accepts only that), got {telemetry.subject}")
    return passport
