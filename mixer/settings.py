"""The Mixer's settings file (``<hub data dir>/mixer.yaml``, written by ``mixer init``).

Read with the rig loader (``engine.yamlfile``: ``${VAR}``, duplicate keys refused) and
checked like a rig: a wrong value names the file, the key path and the rule. Defaults are
what a hub on one machine with its racks needs; ``configs/mixer.yaml`` documents every key.

```yaml
hub:
  host: 127.0.0.1        # the hub's client port: the Mixer's own processes and the CLI
  port: 4222
leaf:
  host: 0.0.0.0          # where racks link in (TLS, nkeys)
  port: 7422
  urls: [tls://hub.example:7422]   # what passports tell racks to dial
registry:
  offline_after: 10s     # a rack silent this long is offline
prometheus: {host: 127.0.0.1, port: 9464}   # the fleet's endpoint; omit or null: off
rollup_interval: 10s
simulator: false         # true: a `sim` user may publish any rack's stats (load tests only)
audit:                   # the archiver: every rack's events into audit/ (Parquet, chained)
  enabled: true
  flush_rows: 50000      # a part is written when this many events wait...
  flush_after: 5s        # ...or the oldest has waited this long
  compact_after: 10m     # an hour partition untouched this long has its small parts merged
  retention_days: 0      # whole days older than this are deleted (recorded); 0: keep all
traces:                  # the traces process: racks' spans and logs into traces/ and logs/
  enabled: true          # (Parquet; docs/traces.md)
  flush: 5s              # a part per rack-hour at most this often...
  flush_rows: 20000      # ...or when this many rows wait
  compact_after: 10m     # an hour ended this long ago has its parts merged into one
  retention: 14d         # date directories older than this are deleted (d, h, m, s)
  forward:               # optional: every OTLP payload also POSTed to a collector
    endpoint: http://collector:4318     # POST <endpoint>/v1/traces
    headers: {authorization: "Bearer ${OTLP_TOKEN}"}
    queue: 1000          # payloads waiting; a full queue drops (counted, logged)
    timeout: 10s
console:                 # the web console (off unless enabled; docs/console.md)
  enabled: false
  host: 127.0.0.1
  port: 8470             # 0: a free port (mixer status and the log say which)
  session_ttl: 12h
  max_clients: 64        # connections at once (live pages hold one each)
  login_attempts: 10     # failed logins per minute from one address before 429
```
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from engine.identity import hub_urls
from engine.schema import (
    At,
    ConfigError,
    get_bool,
    get_duration,
    get_http_header,
    get_int,
    get_list,
    get_map,
    get_otlp_endpoint,
    get_str,
)
from engine.yamlfile import load_yaml

SETTINGS_FILE = "mixer.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSettings:
    """The archiver's settings (``audit:``; see the module docstring)."""

    enabled: bool = True
    flush_rows: int = 50_000
    flush_after: float = 5.0
    compact_after: float = 600.0
    retention_days: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardSettings:
    """Where the traces process forwards OTLP payloads (``traces.forward:``)."""

    endpoint: str                       # http(s)://host[:port][/base]; POSTs go to /v1/traces
    headers: tuple[tuple[str, str], ...] = ()
    queue: int = 1000
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TracesSettings:
    """The traces process's settings (``traces:``; see the module docstring)."""

    enabled: bool = True
    flush: float = 5.0
    flush_rows: int = 20_000
    compact_after: float = 600.0
    retention: float = 14 * 86_400.0
    forward: ForwardSettings | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleSettings:
    """The web console's settings (``console:``; see the module docstring)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8470
    session_ttl: float = 12 * 3600.0
    max_clients: int = 64
    login_attempts: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class MixerSettings:
    """What ``mixer start`` runs with (see the module docstring)."""

    hub_host: str = "127.0.0.1"
    hub_port: int = 4222
    leaf_host: str = "0.0.0.0"
    leaf_port: int = 7422
    leaf_urls: tuple[str, ...] = ()
    offline_after: float = 10.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int | None = None
    rollup_interval: float = 10.0
    simulator: bool = False  # a ``sim`` hub user may speak for any rack (load tests only)
    audit: AuditSettings = AuditSettings()
    console: ConsoleSettings = ConsoleSettings()
    traces: TracesSettings = TracesSettings()

    @property
    def hub_url(self) -> str:
        """The hub's client URL."""
        return f"nats://{self.hub_host}:{self.hub_port}"


def _port(m: dict[str, object], key: str, at: At, default: int) -> int:
    return get_int(m, key, at, default, minimum=1, maximum=65535)


def parse_settings(raw: object, file: str,
                   origins: Mapping[str, str] | None = None) -> MixerSettings:
    """Check ``raw`` (the parsed YAML) and return the settings; ``origins`` (from the
    loader) marks values that came from ``${VAR}``, so errors do not show them.

    Raises:
        ConfigError: file, key path and rule of the first wrong value.
    """
    at = At(file, origins=origins or {})
    top = dict(get_map(raw if raw is not None else {}, at,
                       ("hub", "leaf", "registry", "prometheus", "rollup_interval",
                        "simulator", "audit", "console", "traces")))
    hub = dict(get_map(top.get("hub") or {}, at.key("hub"), ("host", "port")))
    leaf = dict(get_map(top.get("leaf") or {}, at.key("leaf"), ("host", "port", "urls")))
    reg = dict(get_map(top.get("registry") or {}, at.key("registry"), ("offline_after",)))
    leaf_port = _port(leaf, "port", at.key("leaf"), 7422)
    urls = tuple(str(u) for u in get_list(leaf, "urls", at.key("leaf")))
    for i, url in enumerate(urls):
        if not _tls_url(url):
            raise at.key("leaf").key("urls").index(i).error(
                f"invalid URL {url!r} (expected tls://HOST:PORT: racks link over TLS only)")
    prom_host, prom_port = "127.0.0.1", None
    if top.get("prometheus") is not None:
        prom = dict(get_map(top["prometheus"], at.key("prometheus"), ("host", "port")))
        prom_host = get_str(prom, "host", at.key("prometheus"), "127.0.0.1")
        # 0: a free port, logged and in `mixer status`
        prom_port = get_int(prom, "port", at.key("prometheus"), 9464, minimum=0, maximum=65535)
    aud = dict(get_map(top.get("audit") or {}, at.key("audit"),
                       ("enabled", "flush_rows", "flush_after", "compact_after",
                        "retention_days")))
    audit = AuditSettings(
        enabled=get_bool(aud, "enabled", at.key("audit"), True),
        flush_rows=get_int(aud, "flush_rows", at.key("audit"), 50_000, minimum=1,
                           maximum=2_000_000),
        flush_after=get_duration(aud, "flush_after", at.key("audit"), 5.0, minimum=0.1,
                                 exclusive=False),
        compact_after=get_duration(aud, "compact_after", at.key("audit"), 600.0,
                                   minimum=0.0, exclusive=False),
        retention_days=get_int(aud, "retention_days", at.key("audit"), 0, minimum=0,
                               maximum=100_000))
    con = dict(get_map(top.get("console") or {}, at.key("console"),
                       ("enabled", "host", "port", "session_ttl", "max_clients",
                        "login_attempts")))
    ca = at.key("console")
    console = ConsoleSettings(
        enabled=get_bool(con, "enabled", ca, False),
        host=get_str(con, "host", ca, "127.0.0.1"),
        port=get_int(con, "port", ca, 8470, minimum=0, maximum=65535),
        session_ttl=get_duration(con, "session_ttl", ca, 12 * 3600.0, minimum=60.0,
                                 exclusive=False),
        max_clients=get_int(con, "max_clients", ca, 64, minimum=1, maximum=10_000),
        login_attempts=get_int(con, "login_attempts", ca, 10, minimum=1, maximum=10_000))
    return MixerSettings(
        audit=audit,
        console=console,
        traces=_traces(top.get("traces"), at.key("traces")),
        hub_host=get_str(hub, "host", at.key("hub"), "127.0.0.1"),
        hub_port=_port(hub, "port", at.key("hub"), 4222),
        leaf_host=get_str(leaf, "host", at.key("leaf"), "0.0.0.0"),
        leaf_port=leaf_port,
        leaf_urls=urls or (f"tls://127.0.0.1:{leaf_port}",),
        offline_after=get_duration(reg, "offline_after", at.key("registry"), 10.0,
                                   minimum=1.0, exclusive=False),
        prometheus_host=prom_host,
        prometheus_port=prom_port,
        rollup_interval=get_duration(top, "rollup_interval", at, 10.0, minimum=1.0,
                                     exclusive=False),
        simulator=get_bool(top, "simulator", at, False),
    )


def _days_or_duration(m: Mapping[str, object], key: str, at: At, default: float) -> float:
    """A duration that may also be written in days (``14d``): retention is counted in days,
    and ``engine.units`` stops at hours."""
    value = m.get(key)
    if isinstance(value, str) and value.endswith("d") and value[:-1].isdigit():
        days = int(value[:-1])
        if not 1 <= days <= 100_000:
            raise at.key(key).error(f"must be between 1d and 100000d, got {value!r}")
        return days * 86_400.0
    return get_duration(m, key, at, default, minimum=3600.0, exclusive=False)


def _traces(raw: object, at: At) -> TracesSettings:
    """``traces:`` checked."""
    t = dict(get_map(raw or {}, at, ("enabled", "flush", "flush_rows", "compact_after",
                                     "retention", "forward")))
    forward = None
    if t.get("forward") is not None:
        fa = at.key("forward")
        f = dict(get_map(t["forward"], fa, ("endpoint", "headers", "queue", "timeout")))
        ha = fa.key("headers")
        headers = dict(get_map(f.get("headers") or {}, ha))
        for k in headers:
            get_http_header(headers, k, ha)
        forward = ForwardSettings(
            endpoint=get_otlp_endpoint(get_str(f, "endpoint", fa), fa.key("endpoint")),
            headers=tuple((k, str(v)) for k, v in headers.items()),
            queue=get_int(f, "queue", fa, 1000, minimum=1, maximum=1_000_000),
            timeout=get_duration(f, "timeout", fa, 10.0, minimum=0.1, exclusive=False,
                                 maximum=300.0))
    return TracesSettings(
        enabled=get_bool(t, "enabled", at, True),
        flush=get_duration(t, "flush", at, 5.0, minimum=0.05, exclusive=False, maximum=3600.0),
        flush_rows=get_int(t, "flush_rows", at, 20_000, minimum=1, maximum=1_000_000),
        compact_after=get_duration(t, "compact_after", at, 600.0, minimum=0.0,
                                   exclusive=False, maximum=86_400.0),
        retention=_days_or_duration(t, "retention", at, 14 * 86_400.0),
        forward=forward)


def _tls_url(url: str) -> bool:
    """``tls://HOST:PORT`` with a host and a port in range."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "tls" and bool(parts.hostname) and port is not None
            and 0 < port < 65536 and parts.path in ("", "/"))


def load_settings(data_dir: Path) -> MixerSettings:
    """The settings of the hub in ``data_dir`` (defaults when it has no ``mixer.yaml``).

    Raises:
        ConfigError: a wrong value (file, key path, rule) or an unreadable file.
    """
    path = data_dir / SETTINGS_FILE
    if not path.exists():
        return MixerSettings(leaf_urls=("tls://127.0.0.1:7422",))
    doc = load_yaml(path)
    return parse_settings(doc.data, str(path), doc.origins)


def settings_text(hosts: list[str], hub_port: int = 4222, leaf_port: int = 7422) -> str:
    """The ``mixer.yaml`` that ``mixer init`` writes: the leaf URLs from its ``--host``s."""
    urls = ", ".join(json.dumps(u) for u in hub_urls(hosts, leaf_port))  # quoted: [ ] in IPv6
    return (f"# fluxrig Mixer settings (see configs/mixer.yaml for every key)\n"
            f"hub: {{host: 127.0.0.1, port: {hub_port}}}\n"
            f"leaf:\n  host: 0.0.0.0\n  port: {leaf_port}\n  urls: [{urls}]\n"
            f"registry: {{offline_after: 10s}}\n"
            f"prometheus: null\n"
            f"rollup_interval: 10s\n")


__all__ = ["AuditSettings", "ConfigError", "ConsoleSettings", "ForwardSettings",
           "MixerSettings", "SETTINGS_FILE", "TracesSettings", "load_settings",
           "parse_settings", "settings_text"]
