"""The ISO 8583 switch: acquirer server, issuer link pool, routing, matching, deadlines.

Theory of operation
-------------------
One switch process (a replicated source gear: ``--workers N`` runs N of them, all listening
on the acquirer port with ``SO_REUSEPORT``, so the kernel spreads acquirer connections over
them and each connection stays in one process, keeping its order) does the whole
transaction path on one asyncio loop, with asyncio Protocols (no stream objects):

1. acquirer bytes -> ``Framer`` -> message; ``FieldIndex.read`` takes only MTI, DE2, DE3,
   DE4, DE11, DE41, DE49 (+ key fields) by slicing;
2. 0800 is answered 0810 locally; other requests go to the ``Router``;
3. the request is registered in the ``Matcher`` under its key (DE41+DE11 by default; a key in
   flight already is answered "94") and forwarded *as bytes* to a link of the chosen issuer
   (re-encoded only when the issuer's spec differs from the acquirer's);
4. an issuer response is matched by key and its bytes go back on the acquirer connection the
   request came from, with that connection's header/TPDU echoed — never to another;
5. deadlines: a timer answers "91" for every request past ``timeout``; a response arriving
   later is counted and logged as late and dropped;
6. every finished transaction becomes a business event frame (masked PAN, amount, currency,
   route, issuer, DE39, latency, timestamps) emitted to the rack's ring in small batches, so
   the egress makes it durable in JetStream (``fluxrig.<rack>.txn``).

Why one process per lane instead of a ring between each step: a ring hop costs a frame
encode + decode (~20 us in Python); the per-transaction budget on a 2-core host running the
load generator and issuer simulator too is ~150 us. Rings carry what leaves the hot path
(business events), which is what they are for.

Issuer links: ``connections`` persistent TCP links per issuer, reconnecting with backoff
(0.1 s doubling to 5 s); an issuer with no connected link is marked down in the router and
skipped; a link idle for ``echo_interval`` sends a 0800 echo (DE70 301). Requests in flight
on a link that drops are left to their deadline ("91") — the issuer may have processed
them, which the reversal flow (Payments II) settles.

Malformed input: a framing error (bad length, oversize) closes that connection only; a
message that frames but does not decode gets DE39 "30" when its MTI can be read, otherwise
it is counted (and the connection closed if ``on_malformed: close``). Logs carry the match
key and the masked PAN (first 6, last 4), never a clear PAN or raw bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import iso8583

from engine.config import At, get_float, get_int, get_list, get_map, get_str
from engine.frame import Frame, new_frame
from gears.base import Source
from gears.coatcheck import SENSITIVE_FIELDS, KeyRing, Vault
from gears.iso8583.coalesce import Coalescer
from gears.iso8583.codec import CodecError, FieldIndex, Spec, decode, encode, spec_by_name
from gears.iso8583.framing import NEED_DATA, Framer, FramingConfig, FramingError
from gears.iso8583.matcher import DEFAULT_KEY, Matcher, match_key
from gears.iso8583.router import BinRange, Group, NoRoute, Router, Rule, Unavailable

log = logging.getLogger("fluxrig.iso.switch")

ROUTING_FIELDS = ("2", "3", "4", "11", "37", "41", "49")
ECHO_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49")


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest as ``*`` (short values are fully masked)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


# --- settings --------------------------------------------------------------------------------


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
class CoatCheckSettings:
    """Card data to the vault right after decode (Payments II)."""

    fields: tuple[str, ...]
    bucket: str
    key_file: str
    ttl_margin: float
    storage: str = "memory"


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

    host: str
    port: int
    acquirer: LinkSettings
    on_malformed: str
    issuers: tuple[IssuerSettings, ...]
    groups: tuple[Group, ...]
    rules: tuple[Rule, ...]
    match_key: tuple[str, ...]
    timeout: float
    no_route_code: str
    event_batch: int
    coatcheck: CoatCheckSettings | None = None
    saf: SafSettings | None = None
    idle_spin_us: int = 0


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


def parse_switch_settings(raw: Any, at: At) -> SwitchSettings:
    """Validate the switch settings (see configs/iso8583-switch.yaml)."""
    m = get_map(raw, at, {"listen", "acquirer", "on_malformed", "issuers", "groups", "routes",
                          "match_key", "timeout", "no_route_code", "event_batch", "coatcheck",
                          "saf", "idle_spin_us"})
    coat = None
    if m.get("coatcheck") is not None:
        cat = at.key("coatcheck")
        cm = get_map(m["coatcheck"], cat, {"enabled", "fields", "bucket", "key_file",
                                           "ttl_margin", "storage"})
        storage = get_str(cm, "storage", cat, default="memory")
        if storage not in ("memory", "file"):
            raise cat.key("storage").error(f"expected 'memory' or 'file', got {storage!r}")
        if cm.get("enabled", True):
            fields = tuple(map(str, get_list(cm, "fields", cat))) or SENSITIVE_FIELDS
            for j, f in enumerate(fields):
                if not (f.isdigit() and 2 <= int(f) <= 128):
                    raise cat.key("fields").index(j).error(f"expected a field number, got {f!r}")
            coat = CoatCheckSettings(
                fields=fields,
                bucket=get_str(cm, "bucket", cat, default="fluxrig_vault",
                               pattern=re.compile(r"^[A-Za-z0-9_-]+$"),
                               rule="letters, digits, '-' or '_'"),
                key_file=get_str(cm, "key_file", cat, default="vault.keys"),
                ttl_margin=get_float(cm, "ttl_margin", cat, 30.0), storage=storage)
    saf = None
    if m.get("saf") is not None:
        sat = at.key("saf")
        sm = get_map(m["saf"], sat, {"enabled", "stream", "retry_interval", "retry_limit",
                                     "expire_after", "inter_delay"})
        if sm.get("enabled", True):
            saf = SafSettings(
                stream=get_str(sm, "stream", sat, default="SAF",
                               pattern=re.compile(r"^[A-Za-z0-9_-]+$"),
                               rule="letters, digits, '-' or '_'"),
                retry_interval=get_float(sm, "retry_interval", sat, 5.0),
                retry_limit=get_int(sm, "retry_limit", sat, 10, 1),
                expire_after=get_float(sm, "expire_after", sat, 86400.0),
                inter_delay=get_float(sm, "inter_delay", sat, 0.05, exclusive=False))
    listen = get_map(m.get("listen"), at.key("listen"), {"host", "port"})
    issuers = []
    iat = at.key("issuers")
    for name, i_raw in get_map(m.get("issuers"), iat).items():
        im = get_map(i_raw, iat.key(name), {"host", "port", "connections", "echo_interval",
                                            "framing", "spec", "header"})
        issuers.append(IssuerSettings(
            name=name, host=get_str(im, "host", iat.key(name), default="127.0.0.1"),
            port=get_int(im, "port", iat.key(name), 0, 1, 65535),
            connections=get_int(im, "connections", iat.key(name), 2, 1, 64),
            echo_interval=get_float(im, "echo_interval", iat.key(name), 30.0),
            link=_link({k: v for k, v in im.items() if k in ("framing", "spec", "header")},
                       iat.key(name), True)))
    if not issuers:
        raise iat.error("at least one issuer is required")
    names = {i.name for i in issuers}
    groups = []
    gat = at.key("groups")
    for gname, g_raw in get_map(m.get("groups"), gat).items():
        gm = get_map(g_raw, gat.key(gname), {"endpoints", "strategy"})
        endpoints = get_list(gm, "endpoints", gat.key(gname), required=True)
        for j, e in enumerate(endpoints):
            if e not in names:
                raise gat.key(gname).key("endpoints").index(j).error(
                    f"unknown issuer {e!r} (known: {', '.join(sorted(names))})")
        try:
            groups.append(Group(name=gname, endpoints=tuple(endpoints),
                                strategy=get_str(gm, "strategy", gat.key(gname),
                                                 default="failover")))
        except ValueError as exc:
            raise gat.key(gname).error(str(exc)) from None
    gnames = {g.name for g in groups}
    rules = []
    rat = at.key("routes")
    for j, r_raw in enumerate(get_list(m, "routes", at, required=True)):
        r = get_map(r_raw, rat.index(j), {"name", "bins", "mti", "processing_code",
                                          "amount_min", "amount_max", "currency", "group"})
        group = get_str(r, "group", rat.index(j))
        if group not in gnames:
            raise rat.index(j).key("group").error(
                f"unknown group {group!r} (known: {', '.join(sorted(gnames))})")
        try:
            bins = tuple(BinRange.parse(str(b)) for b in get_list(r, "bins", rat.index(j)))
        except ValueError as exc:
            raise rat.index(j).key("bins").error(str(exc)) from None
        mti = get_list(r, "mti", rat.index(j))
        cur = get_list(r, "currency", rat.index(j))
        rules.append(Rule(
            name=get_str(r, "name", rat.index(j), default=f"route{j}"), group=group, bins=bins,
            mti=frozenset(map(str, mti)) if mti else None,
            processing_code=tuple(map(str, get_list(r, "processing_code", rat.index(j)))),
            amount_min=r.get("amount_min"), amount_max=r.get("amount_max"),
            currency=frozenset(map(str, cur)) if cur else None))
    on_malformed = get_str(m, "on_malformed", at, default="close")
    if on_malformed not in ("close", "keep"):
        raise at.key("on_malformed").error(f"expected 'close' or 'keep', got {on_malformed!r}")
    key = tuple(map(str, get_list(m, "match_key", at))) or DEFAULT_KEY
    for j, f in enumerate(key):
        if f in SENSITIVE_FIELDS:  # the key is logged and kept in memory: never card data
            raise at.key("match_key").index(j).error(
                f"field {f} holds card data and cannot be part of the match key")
    code = get_str(m, "no_route_code", at, default="92")
    if len(code) != 2:
        raise at.key("no_route_code").error(f"expected a 2-character DE39 code, got {code!r}")
    return SwitchSettings(
        host=get_str(listen, "host", at.key("listen"), default="127.0.0.1"),
        port=get_int(listen, "port", at.key("listen"), 8583, 0, 65535),
        acquirer=_link(m.get("acquirer"), at.key("acquirer"), False),
        on_malformed=on_malformed, issuers=tuple(issuers), groups=tuple(groups),
        rules=tuple(rules), match_key=key, timeout=get_float(m, "timeout", at, 5.0),
        no_route_code=code, event_batch=get_int(m, "event_batch", at, 200, 1, 10_000),
        coatcheck=coat, saf=saf,
        idle_spin_us=get_int(m, "idle_spin_us", at, 0, 0, 100_000))


# --- run-time ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Txn:
    conn: _AcquirerConn
    header: bytes
    raw: bytes
    mti: str
    fields: dict[str, str]
    t0: int  # perf_counter_ns at receipt
    ts: int  # wall clock ns at receipt
    route: str
    issuer: str
    key: str
    vkey: str | None = None  # vault key when coat check tokenised the request
    spans: list | None = None


@dataclass(slots=True)
class SwitchStats:
    """Counters of one switch process (also exported through the rack counters)."""

    requests: int = 0
    responses: int = 0
    echoes: int = 0
    no_route: int = 0
    unavailable: int = 0
    duplicates: int = 0
    timeouts: int = 0
    late: int = 0
    unknown: int = 0
    format_errors: int = 0
    framing_errors: int = 0
    acquirer_gone: int = 0
    tokenised: int = 0
    reversals_queued: int = 0
    reversals_done: int = 0
    reversals_dead: int = 0
    codes: dict[str, int] = field(default_factory=dict)


class Switch:
    """Everything one switch process holds; driven by the Source gear or by tests."""

    def __init__(self, s: SwitchSettings, emit_event: Callable[[dict], None] | None = None,
                 counters: Any = None, data_dir: str = ".", replica: int = 0):
        self.s = s
        self.acq_spec: Spec = spec_by_name(s.acquirer.spec_name)
        self.sensitive = frozenset(
            (*s.coatcheck.fields, *(k for k, f in self.acq_spec.items() if f.get("sensitive")))
        ) if s.coatcheck else frozenset()
        self.acq_index = FieldIndex(self.acq_spec,
                                    set(ROUTING_FIELDS) | set(s.match_key) | self.sensitive)
        self.vault: Vault | None = None
        self.keyring: KeyRing | None = None
        if s.coatcheck is not None or s.saf is not None:
            key_file = s.coatcheck.key_file if s.coatcheck else "vault.keys"
            self.keyring = KeyRing.load_or_create(f"{data_dir}/{key_file}")
        if s.coatcheck is not None:
            self.vault = Vault(self.keyring, s.coatcheck.bucket, f"l{replica}")
        self.saf: Any = None  # gears.iso8583.saf.SafQueue once NATS is attached
        self.router = Router(list(s.rules), {g.name: g for g in s.groups})
        self.matcher = Matcher(timeout=s.timeout)
        self.stats = SwitchStats()
        self.links: dict[str, list[_IssuerLink]] = {}
        self.emit_event = emit_event
        self.counters = counters
        self.server: asyncio.AbstractServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self._rr: dict[str, int] = {}
        self.closing = False
        self.reordered = 0  # responses that overtook an older request (diagnostics)
        self._nc: Any = None
        self._last_t0 = 0

    # -- lifecycle --

    async def start(self) -> int:
        """Listen for acquirers and connect every issuer link; returns the bound port."""
        loop = asyncio.get_running_loop()
        for issuer in self.s.issuers:
            self.links[issuer.name] = [_IssuerLink(self, issuer, i)
                                       for i in range(issuer.connections)]
            for link in self.links[issuer.name]:
                self._tasks.append(loop.create_task(link.run()))
        self.server = await loop.create_server(
            lambda: _AcquirerConn(self), self.s.host, self.s.port, reuse_port=True,
            backlog=1024)
        self._schedule_expiry()
        return self.server.sockets[0].getsockname()[1]

    async def attach_nats(self, nc: Any, rack_id: str) -> None:
        """Create/open the vault bucket and the SAF queue on the rack's JetStream."""
        from nats.js.api import KeyValueConfig, StorageType

        self._nc = nc
        js = nc.jetstream()
        if self.s.coatcheck is not None:
            ttl = self.s.timeout + self.s.coatcheck.ttl_margin
            try:
                await js.create_key_value(KeyValueConfig(
                    bucket=self.s.coatcheck.bucket, ttl=ttl, history=1,
                    storage=(StorageType.MEMORY if self.s.coatcheck.storage == "memory"
                             else StorageType.FILE)))
            except Exception as exc:  # exists with the same config: fine; else say so
                if "already in use" not in str(exc) and "exist" not in str(exc):
                    raise
        if self.s.saf is not None:
            from gears.iso8583.saf import SafQueue

            self.saf = SafQueue(self, js, rack_id)
            await self.saf.setup()
            self._tasks.append(asyncio.get_running_loop().create_task(self.saf.run()))

    async def flush_vault(self) -> None:
        """Write the sealed vault entries queued since the last flush (fire and forget)."""
        if self.vault is None or self._nc is None:
            return
        ring = self.vault.ring.reload_if_changed()  # after `engine keys rotate`
        if ring is not self.vault.ring:
            self.vault.ring = self.keyring = ring
            if self.saf is not None:
                self.saf.ring = ring
        page = self.vault.take_page()
        if page is not None:
            await self._nc.publish(*page)

    async def drain(self, timeout: float) -> None:
        """Stop accepting connections and wait (up to ``timeout``) for answers in flight."""
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + timeout
        while len(self.matcher) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the matcher empties by responses and deadlines

    async def stop(self) -> None:
        """Stop accepting, answer nothing more, close every link."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        if self._timer is not None:
            self._timer.cancel()
        if self.saf is not None and self.saf._publishes:
            await asyncio.gather(*self.saf._publishes, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for links in self.links.values():
            for link in links:
                link.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- acquirer side --

    def on_request(self, conn: _AcquirerConn, header: bytes, raw: bytes) -> None:
        """One framed message from an acquirer."""
        t0 = time.perf_counter_ns()
        try:
            if self.vault is None:
                mti, fields = self.acq_index.read(raw)
                spans = None
            else:
                mti, fields, spans = self.acq_index.read_spans(raw)
        except CodecError as exc:
            self._malformed(conn, header, raw, exc)
            return
        if mti == "0800":
            self.stats.echoes += 1
            conn.send(self.acq_index.respond(raw, "00"), header)
            return
        self.stats.requests += 1
        key = match_key(fields, self.s.match_key)
        vkey = None
        if spans is not None and not self.sensitive.isdisjoint(fields):
            raw, fields, vkey = self._tokenise(raw, fields, spans)
        decision = self.router.route(mti, fields)
        if isinstance(decision, NoRoute):
            self.stats.no_route += 1
            self._local_answer(conn, header, raw, mti, fields, self.s.no_route_code, t0,
                               "", "", "no_route", vkey, spans)
            return
        if isinstance(decision, Unavailable):
            self.stats.unavailable += 1
            self._local_answer(conn, header, raw, mti, fields, "91", t0, decision.rule, "",
                               "unavailable", vkey, spans)
            return
        link = self._pick_link(decision.endpoint)
        if link is None:  # router thought it up; the links say otherwise
            self.stats.unavailable += 1
            self._local_answer(conn, header, raw, mti, fields, "91", t0, decision.rule, "",
                               "unavailable", vkey, spans)
            return
        txn = _Txn(conn, header, raw, mti, fields, t0, time.time_ns(), decision.rule,
                   decision.endpoint, key, vkey, spans)
        if not self.matcher.add(key, txn, time.monotonic()):
            self.stats.duplicates += 1
            log.warning("duplicate in-flight key answered 94: key=%s, pan=%s", key,
                        mask_pan(fields.get("2", "")))
            self._local_answer(conn, header, raw, mti, fields, "94", t0, decision.rule,
                               decision.endpoint, "duplicate", vkey, spans)
            return
        self.router.begin(decision.endpoint)
        link.send_request(self.clear_raw(txn), self.acq_spec)

    def _pick_link(self, issuer: str) -> _IssuerLink | None:
        links = [link for link in self.links.get(issuer, ()) if link.connected]
        if not links:
            return None
        n = self._rr.get(issuer, 0) + 1
        self._rr[issuer] = n
        return links[n % len(links)]

    def _malformed(self, conn: _AcquirerConn, header: bytes, raw: bytes, exc: CodecError) -> None:
        self.stats.format_errors += 1
        mti = None
        partial: dict[str, str] = {}
        try:
            iso8583.decode(raw, self.acq_spec)
        except iso8583.DecodeError as err:
            # the field that failed is half-decoded: echo only the ones before it
            partial = {k: v for k, v in err.doc_dec.items()
                       if (k in ECHO_FIELDS or k == "t") and k != err.field and v}
            mti = partial.get("t") or None
        except Exception:
            pass
        log.warning("malformed request: error=%s, mti=%s, pan=%s", exc, mti,
                    mask_pan(partial.get("2", "")))
        if mti and len(mti) == 4 and mti.isdigit():
            doc = {k: v for k, v in partial.items() if k in ECHO_FIELDS}
            doc["t"] = mti[:2] + str(int(mti[2]) + 1 if mti[2] != "9" else 9) + mti[3:]
            doc["39"] = "30"
            try:
                conn.send(encode(doc, self.acq_spec), header)
                self._count_code("30")
                return
            except CodecError:
                pass
        if self.s.on_malformed == "close":
            conn.close()

    def _tokenise(self, raw: bytes, clear_fields: dict[str, str],
                  spans: list) -> tuple[bytes, dict[str, str], str]:
        """Coat check: sensitive fields to the vault, token/filler into the message.

        The token has the PAN's length and every filler its field's byte length, so the
        tokenised message has the same layout (the spans stay valid for detokenising).
        """
        sens = {k: clear_fields[k] for k in self.sensitive if k in clear_fields}
        token, vkey = self.vault.check_in(sens.get("2", ""), sens)  # type: ignore[union-attr]
        parts, last = [], 0
        for n, _, d, e in spans:
            k = str(n)
            if k in sens:
                parts.append(raw[last:d])
                if k == "2":
                    parts.append(self.acq_index.field_bytes("2", token))
                else:
                    f = self.acq_spec[k]
                    parts.append(b"\0" * (e - d) if f["data_enc"] in ("b", "bcd")
                                 else ("0" * (e - d)).encode(f["data_enc"]))
                last = e
        parts.append(raw[last:])
        fields = {k: v for k, v in clear_fields.items() if k not in sens}
        if "2" in sens:
            fields["2"] = token
        self.stats.tokenised += 1
        return b"".join(parts), fields, vkey

    def clear_raw(self, txn: _Txn) -> bytes:
        """The request as the acquirer sent it: the vault's clear values spliced back in
        (for the issuer-facing leg and answers to the acquirer only)."""
        if txn.vkey is None:
            return txn.raw
        clear = self.vault.claim(txn.vkey)  # type: ignore[union-attr]
        if clear is None:
            raise RuntimeError(f"vault entry missing: key={txn.vkey}")
        parts, last = [], 0
        for n, _, d, e in txn.spans:  # type: ignore[union-attr]
            k = str(n)
            if k in clear:
                parts += [txn.raw[last:d], self.acq_index.field_bytes(k, clear[k])]
                last = e
        parts.append(txn.raw[last:])
        return b"".join(parts)

    def _local_answer(self, conn: _AcquirerConn, header: bytes, raw: bytes, mti: str,
                      fields: dict[str, str], code: str, t0: int, route: str, issuer: str,
                      outcome: str, vkey: str | None = None, spans: list | None = None) -> None:
        if vkey is not None:
            raw = self.clear_raw(_Txn(conn, header, raw, mti, fields, t0, 0, route, issuer,
                                      "", vkey, spans))
            self.vault.release(vkey)  # type: ignore[union-attr]
        conn.send(self.acq_index.respond(raw, code), header)
        self._count_code(code)
        self._event(mti, fields, code, t0, time.time_ns(), route, issuer, outcome)

    def _count_code(self, code: str) -> None:
        self.stats.codes[code] = self.stats.codes.get(code, 0) + 1

    # -- issuer side --

    def on_response(self, link: _IssuerLink, raw: bytes, mti: str, fields: dict[str, str]) -> None:
        """One framed message from an issuer link (not an echo reply)."""
        key = match_key(fields, self.s.match_key)
        if mti[:3] == "041" and self.saf is not None and self.saf.on_reversal_response(
                link.issuer.name, key, fields):
            return
        verdict, txn = self.matcher.match(key, time.monotonic())
        if verdict == "late":
            self.stats.late += 1
            log.warning("late issuer response dropped: issuer=%s, key=%s, de39=%s",
                        link.issuer.name, key, fields.get("39"))
            return
        if verdict == "unknown":
            self.stats.unknown += 1
            log.warning("unmatched issuer response dropped: issuer=%s, key=%s",
                        link.issuer.name, key)
            return
        self.router.end(txn.issuer)
        self.stats.responses += 1
        if txn.t0 < self._last_t0:
            self.reordered += 1
        self._last_t0 = txn.t0
        out = raw if link.spec is self.acq_spec else encode(decode(raw, link.spec), self.acq_spec)
        code = fields.get("39", "")
        self._count_code(code)
        if txn.vkey is not None:
            self.vault.release(txn.vkey)  # type: ignore[union-attr]
        if not txn.conn.send(out, txn.header):
            self.stats.acquirer_gone += 1
        self._event(txn.mti, txn.fields, code, txn.t0, txn.ts, txn.route, txn.issuer,
                    "answered")

    def _schedule_expiry(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(0.02, self._expire)

    def _expire(self) -> None:
        if self.closing:
            return
        for txn in self.matcher.expire(time.monotonic()):
            self.router.end(txn.issuer)
            self.stats.timeouts += 1
            log.warning("issuer timeout answered 91: issuer=%s, key=%s, pan=%s", txn.issuer,
                        txn.key, mask_pan(txn.fields.get("2", "")))
            clear = self.clear_raw(txn)
            if self.saf is not None and txn.mti[:2] in ("01", "02"):
                self.saf.enqueue(txn, clear)  # the issuer may have approved: reverse it
            if txn.vkey is not None:
                self.vault.release(txn.vkey)  # type: ignore[union-attr]
            txn.conn.send(self.acq_index.respond(clear, "91"), txn.header)
            self._count_code("91")
            self._event(txn.mti, txn.fields, "91", txn.t0, txn.ts, txn.route, txn.issuer,
                        "timeout")
        self._schedule_expiry()

    def link_state(self, issuer: str) -> None:
        """A link of ``issuer`` connected or dropped: update the router."""
        if any(link.connected for link in self.links.get(issuer, ())):
            self.router.mark_up(issuer)
        else:
            self.router.mark_down(issuer)

    # -- events --

    def _event(self, mti: str, fields: dict[str, str], code: str, t0: int, ts: int,
               route: str, issuer: str, outcome: str) -> None:
        latency_ns = time.perf_counter_ns() - t0
        if self.counters is not None:
            self.counters.observe(latency_ns)
        if self.emit_event is None:
            return
        self.emit_event({
            "mti": mti, "pan": mask_pan(fields.get("2", "")), "amount": fields.get("4", ""),
            **({"token": fields.get("2", "")} if self.vault is not None else {}),
            "currency": fields.get("49", ""), "stan": fields.get("11", ""),
            "terminal": fields.get("41", ""), "route": route, "issuer": issuer, "de39": code,
            "outcome": outcome, "latency_us": latency_ns // 1000, "t_req": ts,
            "t_resp": time.time_ns(),
        })


class _AcquirerConn(asyncio.Protocol):
    def __init__(self, switch: Switch):
        self.switch = switch
        self.framer = Framer(switch.s.acquirer.framing)
        self.transport: asyncio.Transport | None = None
        self.out = Coalescer(asyncio.get_running_loop())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.out.attach(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.out.transport = None

    def data_received(self, data: bytes) -> None:
        self.framer.receive_data(data)
        while self.transport is not None:
            try:
                msg = self.framer.next_message()
            except FramingError as exc:
                self.switch.stats.framing_errors += 1
                log.warning("acquirer framing error, closing connection: %s", exc)
                self.close()
                return
            if msg is NEED_DATA or msg is None:
                return
            self.switch.on_request(self, msg.header, msg.payload)

    def send(self, raw: bytes, header: bytes) -> bool:
        """Write one message; False if the connection is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.out.write(self.framer.frame(raw, header))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _IssuerLink(asyncio.Protocol):
    """One persistent connection to an issuer; reconnects while the switch runs."""

    def __init__(self, switch: Switch, issuer: IssuerSettings, n: int):
        self.switch = switch
        self.issuer = issuer
        self.n = n
        self.spec: Spec = spec_by_name(issuer.link.spec_name)
        self.index = FieldIndex(self.spec, {"39"} | set(switch.s.match_key))
        self.framer = Framer(issuer.link.framing)
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.last_io = time.monotonic()
        self.lost: asyncio.Event | None = None
        self.echo_stan = 0
        self._closed = False
        self.out = Coalescer(asyncio.get_running_loop())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not self._closed:
            self.framer = Framer(self.issuer.link.framing)
            self.lost = asyncio.Event()
            try:
                await loop.create_connection(lambda: self, self.issuer.host, self.issuer.port)
            except OSError as exc:
                log.debug("issuer link connect failed: issuer=%s, link=%d, error=%s",
                          self.issuer.name, self.n, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            echo = loop.create_task(self._echo_loop())
            await self.lost.wait()
            echo.cancel()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.out.attach(transport)
        self.connected = True
        self.last_io = time.monotonic()
        log.info("issuer link up: issuer=%s, link=%d", self.issuer.name, self.n)
        self.switch.link_state(self.issuer.name)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.transport = None
        self.out.transport = None
        if not self._closed:
            log.warning("issuer link down: issuer=%s, link=%d", self.issuer.name, self.n)
        self.switch.link_state(self.issuer.name)
        if self.lost is not None:
            self.lost.set()

    def send_raw(self, raw: bytes) -> None:
        """Send bytes already in this issuer's spec (SAF reversals)."""
        self.out.write(self.framer.frame(raw, self.issuer.link.header))
        self.last_io = time.monotonic()

    def send_request(self, raw: bytes, acq_spec: Spec) -> None:
        out = raw if self.spec is acq_spec else encode(decode(raw, acq_spec), self.spec)
        self.out.write(self.framer.frame(out, self.issuer.link.header))
        self.last_io = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.framer.receive_data(data)
        self.last_io = time.monotonic()
        while True:
            try:
                msg = self.framer.next_message()
            except FramingError as exc:
                log.error("issuer framing error, dropping link: issuer=%s, error=%s",
                          self.issuer.name, exc)
                self.transport.abort()
                return
            if msg is NEED_DATA or msg is None:
                return
            try:
                mti, fields = self.index.read(msg.payload)
            except CodecError as exc:
                self.switch.stats.format_errors += 1
                log.error("undecodable issuer response dropped: issuer=%s, error=%s",
                          self.issuer.name, exc)
                continue
            if mti == "0810":
                continue  # our echo's answer: the link is alive
            self.switch.on_response(self, msg.payload, mti, fields)

    async def _echo_loop(self) -> None:
        interval = self.issuer.echo_interval
        while self.connected:
            await asyncio.sleep(interval / 2)
            if self.connected and time.monotonic() - self.last_io >= interval:
                self.echo_stan = self.echo_stan % 999_999 + 1
                doc = {"t": "0800", "7": time.strftime("%m%d%H%M%S", time.gmtime()),
                       "11": f"{self.echo_stan:06d}", "70": "301"}
                self.transport.write(self.framer.frame(encode(doc, self.spec),
                                                       self.issuer.link.header))
                self.last_io = time.monotonic()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()


# --- the gear ----------------------------------------------------------------------------------


def spin_before_sleep(loop: asyncio.AbstractEventLoop, spin: float) -> None:
    """Make ``loop`` poll its sockets for ``spin`` seconds before it blocks in epoll.

    A process woken by the kernel pays the host's wake-up latency (p99 150-750 us on the dev
    VM); polling a little first catches the next message while still running. It trades CPU
    for tail latency: every time the loop would sleep it burns up to ``spin`` first, which
    also shows on an idle rack. Uses the loop's selector (a CPython asyncio detail).
    """
    sel = loop._selector  # type: ignore[attr-defined]
    blocking_select = sel.select
    clock = time.perf_counter

    def select(timeout: float | None = None):
        if timeout is None or timeout > 0:
            end = clock() + spin
            while clock() < end:
                ready = blocking_select(0)
                if ready:
                    return ready
        return blocking_select(timeout)

    sel.select = select



class SwitchGear(Source):
    """``gear: iso8583`` — a replicated source: one switch per lane, events to the ring."""

    replicated = True

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> SwitchSettings:
        return parse_switch_settings(raw, at)

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        src = f"iso8583:{self.ctx.pipeline}.{self.ctx.replica}"
        pending: list[Frame] = []
        wake = asyncio.Event()
        batch = self.settings.event_batch

        def on_event(body: dict) -> None:
            pending.append(new_frame(src, "iso8583.txn", body=body,
                                     headers={"route": body["route"], "de39": body["de39"]}))
            if len(pending) >= batch:
                wake.set()

        if self.settings.idle_spin_us:
            spin_before_sleep(asyncio.get_running_loop(), self.settings.idle_spin_us / 1e6)
        switch = Switch(self.settings, on_event, self.ctx.counters, self.ctx.data_dir,
                        self.ctx.replica)
        nc = None
        if self.settings.coatcheck is not None or self.settings.saf is not None:
            import nats

            nc = await nats.connect(self.ctx.nats_url, max_reconnect_attempts=-1,
                                    reconnect_time_wait=0.5,
                                    name=f"fluxrig-switch-{self.ctx.rack_id}-{self.ctx.replica}")
            await switch.attach_nats(nc, self.ctx.rack_id)
        port = await switch.start()
        self.ctx.log.info("switch listening: port=%d, replica=%d", port, self.ctx.replica)
        try:
            while not stopping.is_set():
                try:
                    await asyncio.wait_for(wake.wait(), 0.02)
                except TimeoutError:
                    pass
                wake.clear()
                await switch.flush_vault()
                if pending:
                    out, pending[:] = list(pending), []
                    await emit(out)
        finally:
            await switch.drain(self.settings.timeout + 1.0)
            await switch.flush_vault()
            await switch.stop()
            if pending:
                await emit(list(pending))
            if nc is not None:
                try:
                    await asyncio.wait_for(nc.flush(), 5)  # the last vault writes out
                except Exception:
                    pass
                await nc.close()
