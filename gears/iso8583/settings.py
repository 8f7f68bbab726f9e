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

Errors name the file and key path (``engine.config.At``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.schema import At, get_float, get_int, get_list, get_map, get_str
from gears.coatcheck import SENSITIVE_FIELDS
from gears.iso8583.codec import CodecError, spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.matcher import DEFAULT_KEY
from gears.iso8583.router import BinRange, Group, Rule

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_NAME_RULE = "letters, digits, '_', '.' or '-', at most 48 characters"


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


def _seconds(m: Mapping[str, Any], key: str, at: At, default: float, *, minimum: float = 0.0,
             exclusive: bool = True, maximum: float = 86_400.0 * 30) -> float:
    """A finite duration in seconds within (minimum, maximum]: NaN and infinities refused."""
    return get_float(m, key, at, default, minimum, exclusive, maximum)


def _link(raw: Any, at: At, with_header: bool) -> LinkSettings:
    m = get_map(raw, at, {"framing", "spec", "header"} if with_header else {"framing", "spec"})
    fm = get_map(m.get("framing"), at.key("framing"), {"prefix", "header_len", "max_frame"})
    try:
        framing = FramingConfig(prefix=get_str(fm, "prefix", at.key("framing"), default="2B"),
                                header_len=get_int(fm, "header_len", at.key("framing"), 0, 0, 64),
                                max_frame=get_int(fm, "max_frame", at.key("framing"), 8192, 1))
    except ValueError as exc:
        raise at.key("framing").error(str(exc)) from None
    spec_name = get_str(m, "spec", at, default="default")
    try:
        spec_by_name(spec_name)
    except CodecError as exc:
        raise at.key("spec").error(str(exc)) from None
    header = b""
    if with_header:
        text = get_str(m, "header", at, default="")
        try:
            header = bytes.fromhex(text)
        except ValueError:
            raise at.key("header").error(f"expected hex bytes, got {text!r}") from None
        if len(header) != framing.header_len:
            raise at.key("header").error(
                f"header is {len(header)} bytes but framing.header_len is {framing.header_len}")
    return LinkSettings(framing=framing, spec_name=spec_name, header=header)


def _coatcheck(raw: Any, at: At) -> CoatCheckSettings | None:
    # bucket/ttl_margin/storage configured the vault's KV copy, which is no longer written
    # (docs/architecture.md, "The vault's KV copy"); still accepted so older rigs load
    cm = get_map(raw, at, {"enabled", "fields", "bucket", "key_file", "ttl_margin", "storage"})
    if not cm.get("enabled", True):
        return None
    fields = tuple(map(str, get_list(cm, "fields", at))) or SENSITIVE_FIELDS
    for j, f in enumerate(fields):
        if not (f.isdigit() and 2 <= int(f) <= 128):
            raise at.key("fields").index(j).error(f"expected a field number, got {f!r}")
    return CoatCheckSettings(fields=fields,
                             key_file=get_str(cm, "key_file", at, default="vault.keys"))


def _saf(raw: Any, at: At) -> SafSettings | None:
    sm = get_map(raw, at, {"enabled", "stream", "retry_interval", "retry_limit",
                           "expire_after", "inter_delay"})
    if not sm.get("enabled", True):
        return None
    return SafSettings(
        stream=get_str(sm, "stream", at, default="SAF", pattern=re.compile(r"^[A-Za-z0-9_-]+$"),
                       rule="letters, digits, '-' or '_'"),
        retry_interval=_seconds(sm, "retry_interval", at, 5.0),
        retry_limit=get_int(sm, "retry_limit", at, 10, 1, 1_000_000),
        expire_after=_seconds(sm, "expire_after", at, 86400.0, maximum=86_400.0 * 365),
        inter_delay=_seconds(sm, "inter_delay", at, 0.05, exclusive=False, maximum=60.0))


def _issuers(raw: Any, at: At) -> tuple[IssuerSettings, ...]:
    issuers = []
    for name, i_raw in get_map(raw, at).items():
        iat = at.key(name)
        if not _NAME.match(name):
            raise iat.error(f"invalid issuer name (expected {_NAME_RULE})")
        im = get_map(i_raw, iat, {"host", "port", "connections", "echo_interval", "framing",
                                  "spec", "header"})
        issuers.append(IssuerSettings(
            name=name, host=get_str(im, "host", iat, default="127.0.0.1"),
            port=get_int(im, "port", iat, 0, 1, 65535),
            connections=get_int(im, "connections", iat, 2, 1, 64),
            echo_interval=_seconds(im, "echo_interval", iat, 30.0, maximum=3600.0),
            link=_link({k: v for k, v in im.items() if k in ("framing", "spec", "header")},
                       iat, True)))
    if not issuers:
        raise at.error("at least one issuer is required")
    return tuple(issuers)


def _groups(raw: Any, at: At, names: set[str]) -> tuple[Group, ...]:
    groups = []
    for gname, g_raw in get_map(raw, at).items():
        gat = at.key(gname)
        gm = get_map(g_raw, gat, {"endpoints", "strategy"})
        endpoints = get_list(gm, "endpoints", gat, required=True)
        for j, e in enumerate(endpoints):
            if e not in names:
                raise gat.key("endpoints").index(j).error(
                    f"unknown issuer {e!r} (known: {', '.join(sorted(names))})")
        try:
            groups.append(Group(name=gname, endpoints=tuple(endpoints),
                                strategy=get_str(gm, "strategy", gat, default="failover")))
        except ValueError as exc:
            raise gat.error(str(exc)) from None
    return tuple(groups)


def _amount(r: Mapping[str, Any], key: str, at: At) -> int | None:
    value = r.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**12:
        raise at.key(key).error(f"expected an amount in minor units 0..999999999999, "
                                f"got {value!r}")
    return value


def _rules(raw: list[Any], at: At, gnames: set[str]) -> tuple[Rule, ...]:
    rules = []
    for j, r_raw in enumerate(raw):
        rat = at.index(j)
        r = get_map(r_raw, rat, {"name", "bins", "mti", "processing_code", "amount_min",
                                 "amount_max", "currency", "group"})
        group = get_str(r, "group", rat)
        if group not in gnames:
            raise rat.key("group").error(
                f"unknown group {group!r} (known: {', '.join(sorted(gnames))})")
        try:
            bins = tuple(BinRange.parse(str(b)) for b in get_list(r, "bins", rat))
        except ValueError as exc:
            raise rat.key("bins").error(str(exc)) from None
        mti = tuple(map(str, get_list(r, "mti", rat)))
        for k, v in enumerate(mti):
            if len(v) != 4 or not v.isdigit():
                raise rat.key("mti").index(k).error(f"expected a 4-digit MTI, got {v!r}")
        cur = get_list(r, "currency", rat)
        rules.append(Rule(
            name=get_str(r, "name", rat, default=f"route{j}", pattern=_NAME, rule=_NAME_RULE),
            group=group, bins=bins, mti=frozenset(mti) if mti else None,
            processing_code=tuple(map(str, get_list(r, "processing_code", rat))),
            amount_min=_amount(r, "amount_min", rat), amount_max=_amount(r, "amount_max", rat),
            currency=frozenset(map(str, cur)) if cur else None))
    return tuple(rules)


def _listen(raw: Any, at: At) -> ListenSettings:
    m = get_map(raw, at, {"host", "port", "max_connections", "max_per_address",
                          "idle_timeout", "frame_timeout"})
    return ListenSettings(
        host=get_str(m, "host", at, default="127.0.0.1"),
        port=get_int(m, "port", at, 8583, 0, 65535),
        max_connections=get_int(m, "max_connections", at, 1000, 1, 1_000_000),
        max_per_address=get_int(m, "max_per_address", at, 500, 1, 1_000_000),
        idle_timeout=_seconds(m, "idle_timeout", at, 300.0, exclusive=False),
        frame_timeout=_seconds(m, "frame_timeout", at, 10.0, maximum=3600.0))


def parse_switch_settings(raw: Any, at: At) -> SwitchSettings:
    """Validate the switch settings (see the module docstring)."""
    m = get_map(raw, at, {"listen", "acquirer", "on_malformed", "issuers", "groups", "routes",
                          "match_key", "timeout", "no_route_code", "event_batch", "coatcheck",
                          "saf", "idle_spin_us", "pan_luhn", "max_inflight"})
    coat = _coatcheck(m["coatcheck"], at.key("coatcheck")) if m.get("coatcheck") is not None \
        else None
    saf = _saf(m["saf"], at.key("saf")) if m.get("saf") is not None else None
    issuers = _issuers(m.get("issuers"), at.key("issuers"))
    groups = _groups(m.get("groups"), at.key("groups"), {i.name for i in issuers})
    rules = _rules(get_list(m, "routes", at, required=True), at.key("routes"),
                   {g.name for g in groups})
    on_malformed = get_str(m, "on_malformed", at, default="close")
    if on_malformed not in ("close", "keep"):
        raise at.key("on_malformed").error(f"expected 'close' or 'keep', got {on_malformed!r}")
    key = tuple(map(str, get_list(m, "match_key", at))) or DEFAULT_KEY
    for j, f in enumerate(key):
        if not (f.isdigit() and 2 <= int(f) <= 128):
            raise at.key("match_key").index(j).error(f"expected a field number, got {f!r}")
        if f in SENSITIVE_FIELDS:  # the key is logged and kept in memory: never card data
            raise at.key("match_key").index(j).error(
                f"field {f} holds card data and cannot be part of the match key")
    code = get_str(m, "no_route_code", at, default="92")
    if len(code) != 2 or not code.isascii() or not code.isalnum():
        raise at.key("no_route_code").error(f"expected a 2-character DE39 code, got {code!r}")
    pan_luhn = m.get("pan_luhn", False)
    if not isinstance(pan_luhn, bool):
        raise at.key("pan_luhn").error(f"expected true or false, got {pan_luhn!r}")
    get_int(m, "event_batch", at, 200, 1, 10_000)  # accepted for older rigs; events are
    # now written one decision at a time, before the answer leaves
    return SwitchSettings(
        listen=_listen(m.get("listen"), at.key("listen")),
        acquirer=_link(m.get("acquirer"), at.key("acquirer"), False),
        on_malformed=on_malformed, issuers=issuers, groups=groups, rules=rules, match_key=key,
        timeout=_seconds(m, "timeout", at, 5.0, maximum=600.0),
        no_route_code=code, pan_luhn=pan_luhn,
        max_inflight=get_int(m, "max_inflight", at, 8192, 16, 1 << 20),
        coatcheck=coat, saf=saf, idle_spin_us=get_int(m, "idle_spin_us", at, 0, 0, 100_000))
