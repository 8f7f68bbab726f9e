"""Rig configuration: YAML in, a validated, typed ``RigConfig`` out — before anything starts.

Every error names the file, the key path and what was expected, e.g.::

    configs/x.yaml: pipelines[0].stages[2].gear: unknown gear 'iso8538' (known: generator, mapping)

Validation is pure (no sockets, no processes): ``load_config`` reads the file and
``parse_config`` checks a plain mapping, so tests feed dicts straight in. Gear settings are
checked by each gear's own ``parse_settings`` (``gears.base``) with the same path helper.

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

import yaml

from engine.bus import ADMIN, BusAuth
from engine.schema import (  # noqa: F401 - ConfigError and At are part of this module's API
    NAME_RE,
    SUBJECT_PATTERN_RE,
    SUBJECT_RE,
    At,
    ConfigError,
    _type_name,
    get_float,
    get_int,
    get_list,
    get_map,
    get_size,
    get_str,
)
from engine.streams import StreamConfig, subject_matches  # noqa: F401 - part of the API
from gears.base import Gear, Sink, gear_class, known_gears, lookup_gear

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
class TelemetryConfig:
    """Sampling interval, Prometheus endpoint (None: off) and the stats subject."""

    interval: float = 1.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = None
    subject: str = ""


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


def load_config(path: str | os.PathLike[str]) -> RigConfig:
    """Read and validate a rig file.

    Raises:
        ConfigError: unreadable file, bad YAML (with line and column) or invalid content.
    """
    file = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text: byte offset {exc.start}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: {where}invalid YAML: {problem}") from exc
    return parse_config(raw, file, base_dir=Path(path).resolve().parent)


def _secret(m: Mapping[str, Any], key: str, at: At) -> str:
    """A secret named by ``<key>_env`` (an environment variable): never written in a rig."""
    name = m.get(f"{key}_env")
    if name is None:
        return ""
    if not isinstance(name, str) or not name:
        raise at.key(f"{key}_env").error(f"expected an environment variable name, got "
                                         f"{name!r}")
    value = os.environ.get(name)
    if not value:
        raise at.key(f"{key}_env").error(f"environment variable {name} is not set")
    return value


def _nats_auth(raw: Any, at: At) -> BusAuth:
    m = get_map(raw, at, {"user", "password_env", "token_env", "creds_file", "nkey_seed_file",
                          "tls"})
    tls = get_map(m.get("tls"), at.key("tls"), {"ca", "cert", "key"})
    for k, v in {**{f: m.get(f) for f in ("creds_file", "nkey_seed_file")}, **tls}.items():
        if v is not None and not Path(v).is_file():
            where = at.key(k) if k in m else at.key("tls").key(k)
            raise where.error(f"no such file: {v}")
    return BusAuth(user=get_str(m, "user", at, default=""), password=_secret(m, "password", at),
                   token=_secret(m, "token", at),
                   creds_file=get_str(m, "creds_file", at, default=""),
                   nkey_seed_file=get_str(m, "nkey_seed_file", at, default=""),
                   tls_ca=get_str(tls, "ca", at.key("tls"), default=""),
                   tls_cert=get_str(tls, "cert", at.key("tls"), default=""),
                   tls_key=get_str(tls, "key", at.key("tls"), default=""))


def _nats_users(raw: list[Any], at: At) -> tuple[NatsUserConfig, ...]:
    users = []
    for i, u_raw in enumerate(raw):
        uat = at.index(i)
        u = get_map(u_raw, uat, {"name", "password_env", "streams"})
        name = get_str(u, "name", uat, pattern=NAME_RE,
                       rule="lowercase letters, digits, '-' or '_', at most 32 characters")
        if name in (ADMIN, "egress", "telemetry"):
            raise uat.key("name").error(f"{name!r} is one of the rack's own users")
        password = _secret(u, "password", uat)
        if not password:
            raise uat.key("password_env").error("required key missing")
        streams = tuple(map(str, get_list(u, "streams", uat, required=True)))
        users.append(NatsUserConfig(name=name, password=password, streams=streams))
    return tuple(users)


def parse_config(raw: Any, file: str = "<config>", base_dir: Path | None = None) -> RigConfig:
    """Validate an already-parsed rig mapping (see module docstring for the shape).

    A relative ``rack.data_dir`` is taken relative to ``base_dir`` (the rig file's folder,
    so the rack is the same whatever directory ``engine`` runs from), else to the current
    directory; the result is absolute.
    """

    top = At(file)
    root = get_map(raw, top, {"rack", "nats", "rings", "cpu", "telemetry", "egress", "pipelines"})
    if raw is None:
        raise top.error("empty rig file (expected at least rack and pipelines)")

    at = top.key("rack")
    rack = get_map(root.get("rack"), at, {"id", "labels", "data_dir"})
    rack_id = get_str(rack, "id", at, pattern=NAME_RE,
                      rule="lowercase letters, digits, '-' or '_', at most 32 characters")
    labels_raw = get_map(rack.get("labels"), at.key("labels"))
    for k, v in labels_raw.items():
        if not isinstance(v, str):
            raise at.key("labels").key(k).error(f"expected a string, got {_type_name(v)}")
    data_dir = Path(get_str(rack, "data_dir", at, default=f"var/{rack_id}"))
    if not data_dir.is_absolute():
        data_dir = (base_dir or Path.cwd()) / data_dir
    data_dir = Path(os.path.normpath(data_dir))

    at = top.key("nats")
    nats_raw = get_map(root.get("nats"), at, {"url", "host", "port", "auth", "users"})
    url = nats_raw.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("nats://", "tls://"))):
        raise at.key("url").error(f"expected a nats:// or tls:// URL, got {url!r}")
    if nats_raw.get("auth") is not None and url is None:
        raise at.key("auth").error("only for an external nats.url (the embedded server makes "
                                   "its own users)")
    nats = NatsConfig(
        url=url,
        host=get_str(nats_raw, "host", at, default="127.0.0.1"),
        port=get_int(nats_raw, "port", at, 0, 0, 65535),
        auth=_nats_auth(nats_raw.get("auth"), at.key("auth")),
        users=_nats_users(get_list(nats_raw, "users", at), at.key("users")),
    )

    at = top.key("rings")
    rings = get_map(root.get("rings"), at, {"capacity", "batch"})
    capacity = get_size(rings, "capacity", at, 4 << 20)
    if capacity < 1024 or capacity & (capacity - 1):
        raise at.key("capacity").error(f"must be a power of two >= 1024, got {capacity}")
    shm_total = shm_size()
    if capacity > min(MAX_RING, shm_total):
        raise at.key("capacity").error(
            f"must be <= {min(MAX_RING, shm_total)} (1 GiB, and what /dev/shm holds: "
            f"{shm_total}), got {capacity}")
    batch = get_int(rings, "batch", at, 256, 1, 65536)

    at = top.key("cpu")
    cpu = get_map(root.get("cpu"), at, {"placement"})
    placement_raw = cpu.get("placement", "auto")
    placement: str | Mapping[str, int]
    if placement_raw in ("auto", "none"):
        placement = placement_raw
    elif isinstance(placement_raw, Mapping):
        usable = sorted(os.sched_getaffinity(0))
        for k, v in placement_raw.items():
            if isinstance(v, bool) or not isinstance(v, int) or v not in usable:
                raise at.key("placement").key(str(k)).error(
                    f"expected one of this machine's usable CPUs {usable}, got {v!r}"
                )
        placement = dict(placement_raw)
    else:
        raise at.key("placement").error(
            f"expected 'auto', 'none' or a mapping process -> cpu, got {placement_raw!r}"
        )

    at = top.key("telemetry")
    tel = get_map(root.get("telemetry"), at, {"interval", "prometheus", "subject"})
    prom = tel.get("prometheus")
    prom_host, prom_port = "127.0.0.1", None
    if prom is not None:
        pm = get_map(prom, at.key("prometheus"), {"host", "port"})
        prom_host = get_str(pm, "host", at.key("prometheus"), default="127.0.0.1")
        prom_port = get_int(pm, "port", at.key("prometheus"), 9464, 0, 65535)
    telemetry = TelemetryConfig(
        interval=get_float(tel, "interval", at, 1.0, maximum=3600.0),
        prometheus_host=prom_host,
        prometheus_port=prom_port,
        subject=get_str(tel, "subject", at, default=f"fluxrig.stats.{rack_id}",
                        pattern=SUBJECT_RE, rule="a NATS subject without wildcards"),
    )

    at = top.key("egress")
    eg = get_map(root.get("egress"), at, {"streams", "batch", "max_inflight", "ack_timeout"})
    streams = []
    for i, s_raw in enumerate(get_list(eg, "streams", at)):
        sat = at.key("streams").index(i)
        s = get_map(s_raw, sat, {"name", "subjects", "storage", "max_age", "duplicate_window"})
        subjects = get_list(s, "subjects", sat, required=True)
        if not subjects:
            raise sat.key("subjects").error("at least one subject is required")
        for j, subj in enumerate(subjects):
            if not isinstance(subj, str) or not SUBJECT_PATTERN_RE.match(subj):
                raise sat.key("subjects").index(j).error(f"invalid subject pattern {subj!r}")
        storage = get_str(s, "storage", sat, default="file")
        if storage not in ("file", "memory"):
            raise sat.key("storage").error(f"expected 'file' or 'memory', got {storage!r}")
        streams.append(StreamConfig(
            name=get_str(s, "name", sat, pattern=re.compile(r"^[A-Za-z0-9_-]{1,64}$"),
                         rule="letters, digits, '-' or '_'"),
            subjects=tuple(subjects),
            storage=storage,
            max_age=get_float(s, "max_age", sat, 0.0, exclusive=False),
            duplicate_window=get_float(s, "duplicate_window", sat, 120.0, maximum=86_400.0),
        ))
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise at.key("streams").error(f"duplicate stream names: {names}")
    egress = EgressConfig(
        streams=tuple(streams),
        batch=get_int(eg, "batch", at, 1000, 1, 100_000),
        max_inflight=get_int(eg, "max_inflight", at, 8, 1, 1024),
        ack_timeout=get_float(eg, "ack_timeout", at, 5.0, maximum=600.0),
    )

    at = top.key("pipelines")
    pipelines = []
    for i, p_raw in enumerate(get_list(root, "pipelines", top, required=True)):
        pat = at.index(i)
        p = get_map(p_raw, pat, {"name", "key", "source", "stages", "sinks"})
        name = get_str(p, "name", pat, pattern=NAME_RE,
                       rule="lowercase letters, digits, '-' or '_', at most 32 characters")
        key = p.get("key")
        if key is not None and (not isinstance(key, str) or not key.startswith(("headers.", "body."))):
            raise pat.key("key").error(f"expected a frame path like 'headers.device', got {key!r}")

        def gear(raw_gear: Any, gat: At, role: str, default_name: str) -> GearConfig:
            g = get_map(raw_gear, gat, {"name", "gear", "settings"})
            gname = get_str(g, "gear", gat)
            cls = lookup_gear(gname)
            if cls is None:
                raise gat.key("gear").error(
                    f"unknown gear {gname!r} (known: {', '.join(known_gears())})"
                )
            if cls.role != role:
                raise gat.key("gear").error(f"gear {gname!r} is a {cls.role}, expected a {role}")
            return GearConfig(
                name=get_str(g, "name", gat, default=default_name, pattern=NAME_RE,
                             rule="lowercase letters, digits, '-' or '_', at most 32 characters"),
                gear=gname,
                role=role,
                settings=cls.parse_settings(g.get("settings"), gat.key("settings")),
                at=gat.path,
            )

        if "source" not in p:
            raise pat.key("source").error("required key missing")
        source = gear(p["source"], pat.key("source"), "source", "source")
        stages = tuple(
            gear(s, pat.key("stages").index(j), "stage", f"stage{j}")
            for j, s in enumerate(get_list(p, "stages", pat))
        )
        sinks = tuple(
            gear(s, pat.key("sinks").index(j), "sink", f"sink{j}")
            for j, s in enumerate(get_list(p, "sinks", pat, required=True))
        )
        if not sinks:
            raise pat.key("sinks").error("at least one sink is required")
        if len(sinks) > 1:
            raise pat.key("sinks").error(
                f"one sink per pipeline for now, got {len(sinks)} (fan-out is planned)"
            )
        seen: set[str] = set()
        for g in (source, *stages, *sinks):
            if g.name in seen:
                raise pat.error(f"duplicate gear name {g.name!r}")
            seen.add(g.name)
        pipelines.append(PipelineConfig(name=name, key=key, source=source, stages=stages,
                                        sinks=sinks))
    if not pipelines:
        raise at.error("at least one pipeline is required")
    pnames = [p.name for p in pipelines]
    if len(set(pnames)) != len(pnames):
        raise at.error(f"duplicate pipeline names: {pnames}")

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

    for i, pipe in enumerate(pipelines):
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

    return RigConfig(
        file=file,
        rack_id=rack_id,
        labels=dict(labels_raw),
        data_dir=data_dir,
        nats=nats,
        ring_capacity=capacity,
        ring_batch=batch,
        placement=placement,
        telemetry=telemetry,
        egress=egress,
        pipelines=tuple(pipelines),
    )
