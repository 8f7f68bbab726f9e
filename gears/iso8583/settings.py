"""Settings of the ``iso8583`` switch gear: parsed and validated before anything starts.

Shape (see ``configs/iso8583-switch.yaml`` for a commented example; every key but
``issuers``, ``groups`` and ``routes`` has a default)::

    listen:     {host, port, max_connections, max_per_address, idle_timeout, frame_timeout}
    acquirer:   {framing: {prefix, header_len, max_frame}, spec}
    issuers:    {<name>: {host, port, connections, echo_interval, framing, spec, header}}
    groups:     {<name>: {endpoints: [issuer...], strategy}}
    routes:     [{name, bins, mti, processing_code, amount_min, amount_max, currency, group}]
    match_key, timeout, no_route_code, on_malformed, pan_luhn, max_inflight, idle_spin_us
    coatcheck:  {enabled, fields, key_file}
    saf:        {enabled, stream, retry_interval, retry_limit, expire_after, inter_delay}

Every key, with type, default and meaning, is in the key tables below (``SETTINGS`` and the
tables it nests; ``docs/reference.md`` is generated from them). Durations take ``250ms`` /
``5s`` / ``1m`` forms, ``max_frame`` takes sizes (``4KiB``). Errors name the file and key
path (``engine.schema.At``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.keytable import (
    BOOLEAN,
    CUSTOM,
    DURATION,
    INTEGER,
    LIST,
    NAMED,
    REQUIRED,
    SECTION,
    SECTIONS,
    SIZE,
    STRING,
    Computed,
    Key,
    Reader,
    Table,
)
from engine.schema import At
from gears.coatcheck import SENSITIVE_FIELDS
from gears.iso8583.codec import CodecError, spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.matcher import DEFAULT_KEY
from gears.iso8583.router import STRATEGIES, BinRange, Group, Rule

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_NAME_RULE = "letters, digits, '_', '.' or '-', at most 48 characters"
_MONTH = 86_400.0 * 30  # longest sensible wait for timeouts and retries, seconds
_AMOUNT_MAX = 10**12 - 1  # DE4: 12 digits


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    """One side's wire format."""

    framing: FramingConfig
    spec_name: str
    header: bytes = b""  # for issuer links: the header/TPDU to send


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuerSettings:
    """An issuer endpoint."""

    name: str
    host: str
    port: int
    connections: int
    echo_interval: float
    link: LinkSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenSettings:
    """The acquirer listener and its limits.

    Attributes:
        host, port: where acquirers connect.
        max_connections: open acquirer connections per switch process; more are closed as
            soon as they are accepted (clamped below the process's open-file limit).
        max_per_address: open connections per source address and switch process.
        idle_timeout: seconds without a byte from the acquirer before its connection is
            closed (0: never).
        frame_timeout: seconds a started frame may take to arrive whole (slow senders).
    """

    host: str = "127.0.0.1"
    port: int = 8583
    max_connections: int = 1000
    max_per_address: int = 500
    idle_timeout: float = 300.0
    frame_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CoatCheckSettings:
    """Card data out of the message right after validation (Payments II)."""

    fields: tuple[str, ...]
    key_file: str = "vault.keys"


@dataclass(frozen=True, slots=True, kw_only=True)
class SafSettings:
    """Store-and-forward reversals."""

    stream: str
    retry_interval: float
    retry_limit: int
    expire_after: float
    inter_delay: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchSettings:
    """Validated settings of the ``iso8583`` source gear."""

    listen: ListenSettings
    acquirer: LinkSettings
    on_malformed: str
    issuers: tuple[IssuerSettings, ...]
    groups: tuple[Group, ...]
    rules: tuple[Rule, ...]
    match_key: tuple[str, ...]
    timeout: float
    no_route_code: str
    pan_luhn: bool = False
    max_inflight: int = 8192
    coatcheck: CoatCheckSettings | None = None
    saf: SafSettings | None = None
    idle_spin_us: int = 0


_FRAMING = Table("framing", "Length prefix and header of one side's messages.", (
    Key("prefix", STRING, "Length prefix: ``2B``/``2L`` 2-byte binary big/little endian, "
        "``4B``/``4L`` 4-byte, ``4A`` 4 ASCII digits.", "2B"),
    Key("header_len", INTEGER, "Bytes of header/TPDU after the prefix (kept and echoed).", 0,
        minimum=0, maximum=64),
    Key("max_frame", SIZE, "Largest accepted length (prefix value).", 8192, minimum=1),
))
_SPEC_DOC = "Codec spec: a built-in name or a YAML spec file."

LISTEN = Table("listen", "The acquirer listener and its limits (per switch process).", (
    Key("host", STRING, "Address acquirers connect to.", "127.0.0.1"),
    Key("port", INTEGER, "Port acquirers connect to.", 8583, minimum=0, maximum=65535),
    Key("max_connections", INTEGER, "Open acquirer connections; more are closed as soon as "
        "accepted (clamped below the open-file limit).", 1000, minimum=1, maximum=1_000_000),
    Key("max_per_address", INTEGER, "Open connections per source address.", 500, minimum=1,
        maximum=1_000_000),
    Key("idle_timeout", DURATION, "Time without a byte from the acquirer before its "
        "connection is closed; 0: never.", 300.0, minimum=0, maximum=_MONTH),
    Key("frame_timeout", DURATION, "Time a started frame may take to arrive whole (slow "
        "senders).", 10.0, minimum=0, exclusive=True, maximum=3600),
))

ACQUIRER = Table("acquirer", "The acquirers' wire format.", (
    Key("framing", SECTION, "Framing.", table=_FRAMING),
    Key("spec", STRING, _SPEC_DOC, "default"),
))

ISSUER = Table("issuers.<name>", "An issuer endpoint (the name is used by groups).", (
    Key("host", STRING, "Issuer host.", "127.0.0.1"),
    Key("port", INTEGER, "Issuer port.", REQUIRED, minimum=1, maximum=65535),
    Key("connections", INTEGER, "Connections per switch process.", 2, minimum=1, maximum=64),
    Key("echo_interval", DURATION, "Network management echo (0800) interval on an idle "
        "link.", 30.0, minimum=0, exclusive=True, maximum=3600),
    Key("framing", SECTION, "Framing.", table=_FRAMING),
    Key("spec", STRING, _SPEC_DOC, "default"),
    Key("header", STRING, "Header/TPDU to send, as hex (``framing.header_len`` bytes).", ""),
))

GROUP = Table("groups.<name>", "Issuers a route sends to, and how it picks one.", (
    Key("endpoints", LIST, "Issuer names.", REQUIRED, items="issuer name"),
    Key("strategy", STRING, "How an endpoint is picked.", "failover",
        choices=STRATEGIES),
))

ROUTE = Table("routes[]", "A routing rule; the first that matches wins.", (
    Key("name", STRING, "Rule name.", Computed("route<i>"), pattern=_NAME, rule=_NAME_RULE),
    Key("bins", LIST, "PAN prefixes (``4``) or ranges (``510000-559999``); absent: any.",
        items="prefix or range"),
    Key("mti", LIST, "Message types; absent: any.", items="4-digit MTI"),
    Key("processing_code", LIST, "Prefixes of DE3; absent: any.", items="prefix"),
    Key("amount_min", INTEGER, "Least DE4 amount, minor units.", minimum=0,
        maximum=_AMOUNT_MAX),
    Key("amount_max", INTEGER, "Largest DE4 amount, minor units.", minimum=0,
        maximum=_AMOUNT_MAX),
    Key("currency", LIST, "Accepted DE49 codes; absent: any.", items="currency code"),
    Key("group", STRING, "The group that gets the request.", REQUIRED),
))

COATCHECK = Table("coatcheck", "Card data out of the message right after validation, held "
                  "in the switch process (absent: off).", (
    Key("enabled", BOOLEAN, "false: off.", True),
    Key("fields", LIST, "Fields taken out.", SENSITIVE_FIELDS, items="field number"),
    Key("key_file", STRING, "Vault key file, relative to the data dir.", "vault.keys"),
    Key("bucket", CUSTOM, "Ignored (the vault's KV copy is no longer written).",
        type_text="any", deprecated=True),
    Key("ttl_margin", CUSTOM, "Ignored.", type_text="any", deprecated=True),
    Key("storage", CUSTOM, "Ignored.", type_text="any", deprecated=True),
))

SAF = Table("saf", "Store-and-forward reversals, durable in JetStream (absent: off).", (
    Key("enabled", BOOLEAN, "false: off.", True),
    Key("stream", STRING, "Work-queue stream of pending reversals.", "SAF",
        pattern=re.compile(r"^[A-Za-z0-9_-]+$"), rule="letters, digits, '-' or '_'"),
    Key("retry_interval", DURATION, "Wait before a reversal is sent again.", 5.0, minimum=0,
        exclusive=True, maximum=_MONTH),
    Key("retry_limit", INTEGER, "Attempts before a reversal goes to the dead letters.", 10,
        minimum=1, maximum=1_000_000),
    Key("expire_after", DURATION, "Age at which an unsent reversal goes to the dead "
        "letters.", 86400.0, minimum=0, exclusive=True, maximum=_MONTH * 12),
    Key("inter_delay", DURATION, "Pause between two reversals sent.", 0.05, minimum=0,
        maximum=60),
))

SETTINGS = Table("iso8583", "The ISO 8583 switch (a replicated source).", (
    Key("listen", SECTION, "Acquirer listener.", table=LISTEN),
    Key("acquirer", SECTION, "Acquirer wire format.", table=ACQUIRER),
    Key("on_malformed", STRING, "A message that cannot be answered at all: ``close`` its "
        "connection or ``keep`` it.", "close", choices=("close", "keep")),
    Key("issuers", NAMED, "Issuer endpoints by name (at least one).", table=ISSUER),
    Key("groups", NAMED, "Groups of issuers by name.", table=GROUP),
    Key("routes", SECTIONS, "Routing rules, in order.", REQUIRED, table=ROUTE),
    Key("match_key", LIST, "Fields matching an answer to its request (never card data).",
        DEFAULT_KEY, items="field number"),
    Key("timeout", DURATION, "Time an issuer has to answer before the request is answered "
        "91 and reversed.", 5.0, minimum=0, exclusive=True, maximum=600),
    Key("no_route_code", STRING, "DE39 answered when no route matches.", "92"),
    Key("event_batch", INTEGER, "Ignored (events are written one decision at a time).", 200,
        minimum=1, maximum=10_000, deprecated=True),
    Key("coatcheck", SECTION, "Coat check.", table=COATCHECK),
    Key("saf", SECTION, "Store-and-forward reversals.", table=SAF),
    Key("idle_spin_us", INTEGER, "Microseconds to poll before sleeping when idle (lower "
        "p99, CPU burnt when idle); 0: sleep at once.", 0, minimum=0, maximum=100_000),
    Key("pan_luhn", BOOLEAN, "Answer 14 to PANs that fail the Luhn check.", False),
    Key("max_inflight", INTEGER, "Requests in flight per process (the journal's size).",
        8192, minimum=16, maximum=1 << 20),
))


def _link(r: Reader, with_header: bool) -> LinkSettings:
    fm = r.section("framing")
    prefix, header_len, max_frame = (fm.string("prefix"), fm.integer("header_len"),
                                     fm.size("max_frame"))
    try:  # what the key table cannot say: the prefix's kinds, max_frame within its range
        framing = FramingConfig(prefix=prefix, header_len=header_len, max_frame=max_frame)
    except ValueError as exc:
        raise r.where("framing").error(str(exc)) from None
    spec_name = r.string("spec")
    try:
        spec_by_name(spec_name)
    except CodecError as exc:
        raise r.where("spec").error(str(exc)) from None
    header = b""
    if with_header:
        text = r.string("header")
        try:
            header = bytes.fromhex(text)
        except ValueError:
            raise r.where("header").error(f"expected hex bytes, got "
                                          f"{r.where('header').show(text)}") from None
        if len(header) != framing.header_len:
            raise r.where("header").error(
                f"header is {len(header)} bytes but framing.header_len is {framing.header_len}")
    return LinkSettings(framing=framing, spec_name=spec_name, header=header)


def _fields(r: Reader, name: str) -> tuple[str, ...]:
    fields = tuple(map(str, r.sequence(name)))
    for j, f in enumerate(fields):
        if not (f.isdigit() and 2 <= int(f) <= 128):
            raise r.where(name).index(j).error(f"expected a field number, got {f!r}")
    return fields


def _coatcheck(r: Reader) -> CoatCheckSettings | None:
    # bucket/ttl_margin/storage configured the vault's KV copy, which is no longer written
    # (docs/architecture.md, "The vault's KV copy"); still accepted so older rigs load
    if not r.boolean("enabled"):
        return None
    return CoatCheckSettings(fields=_fields(r, "fields") or SENSITIVE_FIELDS,
                             key_file=r.string("key_file"))


def _saf(r: Reader) -> SafSettings | None:
    if not r.boolean("enabled"):
        return None
    return SafSettings(stream=r.string("stream"), retry_interval=r.seconds("retry_interval"),
                       retry_limit=r.integer("retry_limit"),
                       expire_after=r.seconds("expire_after"),
                       inter_delay=r.seconds("inter_delay"))


def _issuers(r: Reader) -> tuple[IssuerSettings, ...]:
    issuers = []
    for name, i in r.named("issuers"):
        if not _NAME.match(name):
            raise i.at.error(f"invalid issuer name (expected {_NAME_RULE})")
        issuers.append(IssuerSettings(
            name=name, host=i.string("host"), port=i.integer("port"),
            connections=i.integer("connections"), echo_interval=i.seconds("echo_interval"),
            link=_link(i, True)))
    if not issuers:
        raise r.where("issuers").error("at least one issuer is required")
    return tuple(issuers)


def _groups(r: Reader, names: set[str]) -> tuple[Group, ...]:
    groups = []
    for gname, g in r.named("groups"):
        endpoints = g.sequence("endpoints")
        for j, e in enumerate(endpoints):
            if e not in names:
                raise g.where("endpoints").index(j).error(
                    f"unknown issuer {e!r} (known: {', '.join(sorted(names))})")
        strategy = g.string("strategy")
        try:
            groups.append(Group(name=gname, endpoints=tuple(map(str, endpoints)),
                                strategy=strategy))
        except ValueError as exc:
            raise g.at.error(str(exc)) from None
    return tuple(groups)


def _rules(r: Reader, gnames: set[str]) -> tuple[Rule, ...]:
    rules = []
    for j, rr in enumerate(r.sections("routes")):
        group = rr.string("group")
        if group not in gnames:
            raise rr.where("group").error(
                f"unknown group {group!r} (known: {', '.join(sorted(gnames))})")
        try:
            bins = tuple(BinRange.parse(str(b)) for b in rr.sequence("bins"))
        except ValueError as exc:
            raise rr.where("bins").error(str(exc)) from None
        mti = tuple(map(str, rr.sequence("mti")))
        for k, v in enumerate(mti):
            if len(v) != 4 or not v.isdigit():
                raise rr.where("mti").index(k).error(f"expected a 4-digit MTI, got {v!r}")
        cur = rr.sequence("currency")
        rules.append(Rule(
            name=rr.string("name", default=f"route{j}"), group=group, bins=bins,
            mti=frozenset(mti) if mti else None,
            processing_code=tuple(map(str, rr.sequence("processing_code"))),
            amount_min=rr.integer("amount_min") if rr.given("amount_min") else None,
            amount_max=rr.integer("amount_max") if rr.given("amount_max") else None,
            currency=frozenset(map(str, cur)) if cur else None))
    return tuple(rules)


def _listen(r: Reader) -> ListenSettings:
    return ListenSettings(
        host=r.string("host"), port=r.integer("port"),
        max_connections=r.integer("max_connections"),
        max_per_address=r.integer("max_per_address"),
        idle_timeout=r.seconds("idle_timeout"), frame_timeout=r.seconds("frame_timeout"))


def parse_switch_settings(raw: Any, at: At) -> SwitchSettings:
    """Validate the switch settings (keys: ``SETTINGS``; see the module docstring)."""
    r = SETTINGS.read(raw, at)
    coat = _coatcheck(r.section("coatcheck")) if r.given("coatcheck") else None
    saf = _saf(r.section("saf")) if r.given("saf") else None
    issuers = _issuers(r)
    groups = _groups(r, {i.name for i in issuers})
    rules = _rules(r, {g.name for g in groups})
    on_malformed = r.string("on_malformed")
    key = _fields(r, "match_key") or DEFAULT_KEY
    for j, f in enumerate(key):
        if f in SENSITIVE_FIELDS:  # the key is logged and kept in memory: never card data
            raise r.where("match_key").index(j).error(
                f"field {f} holds card data and cannot be part of the match key")
    code = r.string("no_route_code")
    if len(code) != 2 or not code.isascii() or not code.isalnum():
        raise r.where("no_route_code").error(f"expected a 2-character DE39 code, got "
                                             f"{r.where('no_route_code').show(code)}")
    r.integer("event_batch")  # accepted for older rigs; events are now written one
    # decision at a time, before the answer leaves
    return SwitchSettings(
        listen=_listen(r.section("listen")), acquirer=_link(r.section("acquirer"), False),
        on_malformed=on_malformed, issuers=issuers, groups=groups, rules=rules, match_key=key,
        timeout=r.seconds("timeout"), no_route_code=code, pan_luhn=r.boolean("pan_luhn"),
        max_inflight=r.integer("max_inflight"), coatcheck=coat, saf=saf,
        idle_spin_us=r.integer("idle_spin_us"))
