"""The switch's decisions, sans-I/O: events in, actions out.

Theory of operation
-------------------
``SwitchCore`` holds everything a switch process decides on — validation, coat check,
routing, the in-flight table, deadlines, the journal — and none of the I/O. The asyncio
shell (``gears.iso8583.switch``) feeds it events and carries out the actions it returns, in
order:

    events in                                   actions out
    request(conn, header, raw, now)        ->   Record, Answer, Forward, Close
    response(issuer, link, raw, now)       ->   Record, Answer, ReversalResponse
    tick(now)  (deadlines)                 ->   Record (reversal, event), Answer (91)
    link_up / link_down, opened / closed   ->   (state only)
    recover(journal entries)               ->   Record (interrupted, reversal), Release
    undeliverable(answer)                  ->   Record (reversal, event), Release

The durability order is in the action lists, and the shell keeps it:

* **record before you answer**: an ``Answer`` or ``Release`` follows the ``Record`` actions
  of the same decision; the shell writes records to the shared-memory rings and sends
  nothing that comes after a record it could not write (full ring: backpressure);
* **journal before you forward**: the core writes a request's journal slot (``engine.
  journal``) *before* it returns the ``Forward`` — what a reversal needs, sealed, so no clear
  PAN lies in shared memory — and the slot is closed only once the outcome is recorded and
  delivered. A successor finding open slots (``recover``) reverses them;
* **a reversal is a frame on a ring before anything else happens**: a timeout returns the
  SAF ``Record`` first, then the audit event, then the "91".

Ids: the transaction id (UUIDv7, made when the request is forwarded) is the id of its audit
event frame and of its reversal frame (they go to different streams), so an outcome or a
reversal recorded twice — by a process and then by its successor — is stored once
(JetStream de-duplicates by ``Nats-Msg-Id``). A reversal decided only after the crash gets its
own event id (``derive_id(tid, 2)``).

Clock: ``now`` is monotonic seconds from the caller (deadlines, latency); wall-clock
timestamps come from the injected ``wall_ns``. Nothing here sleeps, reads a socket or logs
a clear PAN; logged wire values go through ``engine.logutil.escape``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engine.cbor import CBORDecodeError, dumps, loads
from engine.counters import StatDef, Stats
from engine.frame import derive_id, encode_parts, uuid7
from engine.journal import DECIDED, Journal, JournalEntry, JournalFull, PayloadTooLarge
from engine.logutil import RateLimitedLog, escape
from engine.tap import OFF, Tracer
from gears.coatcheck import SENSITIVE_FIELDS, KeyRing, Vault
from gears.iso8583.codec import (
    CodecError,
    FieldIndex,
    Spec,
    decode,
    encode,
    spec_by_name,
)
from gears.iso8583.matcher import Matcher, match_key
from gears.iso8583.reversal import REVERSAL_FIELDS
from gears.iso8583.router import NoRoute, Router, Unavailable
from gears.iso8583.settings import SwitchSettings
from gears.iso8583.tracing import (
    CHECKED,
    DECODED,
    ISSUER,
    JOURNALED,
    ROUTED,
    VALIDATED,
    TxnTrace,
    mono_ns,
)
from gears.iso8583.validate import (
    FORMAT_ERROR,
    Rejection,
    Validator,
    mti_problem,
    response_mti,
)

log = logging.getLogger("fluxrig.iso.switch")

EVENTS = "out"  # outlet of audit events (the switch's lane ring)
SAF = "saf"  # outlet of reversals (the SAF work queue)
TXN_KIND = "iso8583.txn"
REJECTED_KIND = "iso8583.rejected"
REVERSAL_KIND = "iso8583.reversal"

# fields read from every request: routing, matching, validation, the audit event
READ_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "37", "41", "49")
OUTCOMES = ("answered", "timeout", "no_route", "unavailable", "duplicate", "rejected",
            "saturated", "undeliverable", "interrupted")
REJECT_REASONS = ("mti", "missing", "format", "pan", "undecodable", "framing")
# acquirer connections refused at accept (``gears.io.tcp``) / closed by the switch
REFUSED_REASONS = ("max_connections", "max_per_address", "no_file_descriptors")
CLOSED_REASONS = ("idle", "frame_timeout", "framing", "malformed")


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest as ``*`` (short values are fully masked)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


# --- actions ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """Write ``frame`` (encoded) to outlet ``outlet`` before any later action."""

    outlet: str
    frame: bytes
    done: bool = False  # written (the shell's bookkeeping across partial writes)


@dataclass(slots=True)
class Answer:
    """Send ``data`` (framed with ``header``) to acquirer connection ``conn``.

    With a journal ``slot``: once the records before it are written, mark the slot DECIDED
    (``reverse``: undo it if delivery cannot be proven); close it once the bytes are handed
    to the kernel. ``txn`` lets the shell report an answer it could not deliver.
    """

    conn: int
    header: bytes
    data: bytes
    slot: int = -1
    reverse: bool = False
    txn: Txn | None = None
    trace: TxnTrace | None = None  # its transaction's clock readings (tracing on)


@dataclass(slots=True)
class Forward:
    """Send ``data`` (already in the issuer's spec) on link ``link`` of ``issuer``."""

    issuer: str
    link: int
    data: bytes
    trace: TxnTrace | None = None


@dataclass(slots=True)
class Release:
    """Close journal ``slot``: its outcome is recorded by the actions before."""

    slot: int


@dataclass(slots=True)
class Close:
    """Close acquirer connection ``conn`` (why, for the counters)."""

    conn: int
    reason: str


@dataclass(slots=True)
class ReversalResponse:
    """An issuer answered a reversal (04x0): for the SAF sender waiting on ``key``."""

    issuer: str
    key: str
    de39: str


Action = Record | Answer | Forward | Release | Close | ReversalResponse


@dataclass(slots=True)
class Txn:
    """A request forwarded to an issuer and not yet settled."""

    tid: bytes  # transaction id: event id, reversal id
    conn: int
    header: bytes
    raw: bytes  # as forwarded by us: tokenised when coat check is on
    mti: str
    key: str
    t0: float  # monotonic at receipt
    issuer: str
    base: dict  # the audit event's fields known at forwarding time
    slot: int
    item: dict | None  # the SAF item (sealed reversal) when SAF is on and it is reversible
    vkey: str | None = None
    spans: list | None = None
    trace: TxnTrace | None = None


def stat_defs(s: SwitchSettings) -> tuple[StatDef, ...]:
    """Every stat slot a switch process keeps (``engine status``, snapshots, Prometheus)."""
    c, g = "counter", "gauge"
    defs = [StatDef("iso8583.requests", c, "requests read from acquirers (echoes excluded)"),
            StatDef("iso8583.echoes", c, "network management requests answered locally")]
    defs += [StatDef("iso8583.answers", c, "answers sent to acquirers by DE39",
                     (("de39", f"{i:02d}"),)) for i in range(100)]
    defs.append(StatDef("iso8583.answers", c, "answers sent to acquirers by DE39",
                        (("de39", "other"),)))
    defs += [StatDef("iso8583.outcomes", c, "finished transactions by outcome",
                     (("outcome", o),)) for o in OUTCOMES]
    defs += [StatDef("iso8583.rejected", c, "requests refused at the edge by reason",
                     (("reason", r),)) for r in REJECT_REASONS]
    defs += [StatDef("iso8583.late", c, "issuer responses after the deadline (dropped)"),
             StatDef("iso8583.unknown", c, "issuer responses matching nothing (dropped)"),
             StatDef("iso8583.issuer_errors", c, "undecodable issuer messages (dropped)"),
             StatDef("iso8583.inflight", g, "requests waiting for an issuer"),
             StatDef("iso8583.journal", g, "journal slots in use")]
    for i in s.issuers:
        defs += [StatDef("iso8583.links_up", g, "connected links per issuer",
                         (("issuer", i.name),)),
                 StatDef("iso8583.issuer_inflight", g, "requests in flight per issuer",
                         (("issuer", i.name),))]
    defs += [StatDef("iso8583.connections", g, "open acquirer connections"),
             *(StatDef("iso8583.connections_refused", c, "acquirer connections refused",
                       (("reason", r),)) for r in REFUSED_REASONS),
             *(StatDef("iso8583.connections_closed", c, "acquirer connections closed by us",
                       (("reason", r),)) for r in CLOSED_REASONS)]
    defs += [StatDef("iso8583.backpressure", c, "times intake paused on a full ring"),
             StatDef("iso8583.blocked", g, "actions waiting for ring space"),
             StatDef("iso8583.errors", c, "internal errors contained (see rack.log)"),
             StatDef("saf.queued", c, "reversals written to the SAF ring"),
             StatDef("saf.recovered", c, "reversals queued for a predecessor's requests"),
             StatDef("saf.sent", c, "reversals acknowledged by the issuer"),
             StatDef("saf.dead", c, "reversals dead-lettered")]
    return tuple(defs)


class SwitchCore:
    """One switch process's decisions (see module docstring)."""

    def __init__(self, s: SwitchSettings, *, stats: Stats, journal: Journal,
                 keyring: KeyRing | None = None, src: str = "iso8583",
                 wall_ns: Callable[[], int] = time.time_ns, replica: int = 0,
                 tracer: Tracer = OFF):
        self.s = s
        self.tracer = tracer
        self.tracing = tracer.on
        self.stats = stats
        self.journal = journal
        self.keyring = keyring
        self.src = src
        self.wall_ns = wall_ns
        self.acq_spec: Spec = spec_by_name(s.acquirer.spec_name)
        self.sensitive = frozenset(
            (*s.coatcheck.fields, *(k for k, f in self.acq_spec.items() if f.get("sensitive")))
        ) if s.coatcheck else frozenset()
        self.saf_on = s.saf is not None
        if (self.saf_on or s.coatcheck is not None) and keyring is None:
            raise ValueError("coat check and SAF need a key ring")
        journal.wipe = self.saf_on  # only sealed reversals are worth wiping
        wanted = set(READ_FIELDS) | set(s.match_key) | self.sensitive
        if self.saf_on:
            wanted |= set(REVERSAL_FIELDS)
        self.acq_index = FieldIndex(self.acq_spec, wanted)
        self._sensitive_nums = frozenset(int(k) for k in self.sensitive)
        # coat check filler per sensitive field: one byte of it per byte of the field
        self._filler = {int(k): (b"\0" if self.acq_spec[k]["data_enc"] in ("b", "bcd")
                                 else "0".encode(self.acq_spec[k]["data_enc"]))
                        for k in self.sensitive if k in self.acq_spec}
        self.validator = Validator(
            self.acq_spec, wanted, required_card=(*s.match_key, "2", "3", "4", "11"),
            required_other=s.match_key, pan_luhn=s.pan_luhn)
        self.vault = Vault(f"l{replica}") if s.coatcheck is not None else None
        self.router = Router(list(s.rules), {g.name: g for g in s.groups})
        self.matcher = Matcher(timeout=s.timeout)
        self.issuer_specs: dict[str, Spec] = {}
        self.issuer_index: dict[str, FieldIndex] = {}
        self.links: dict[str, list[bool]] = {}
        self._rr: dict[str, int] = {}
        self.issuer_addr = {i.name: (i.host, i.port) for i in s.issuers}
        for i in s.issuers:
            spec = spec_by_name(i.link.spec_name)
            self.issuer_specs[i.name] = spec
            self.issuer_index[i.name] = FieldIndex(spec, {"39"} | set(s.match_key))
            self.links[i.name] = [False] * i.connections
        self.conns: set[int] = set()
        self.ratelog = RateLimitedLog(log)
        self.reordered = 0  # responses that overtook an older request (diagnostics)
        self._last_t0 = 0.0
        st = stats.slot
        self._sv = stats.values  # incremented inline on the hot path
        self._st_requests = st("iso8583.requests")
        self._st_echoes = st("iso8583.echoes")
        self._st_answer0 = st("iso8583.answers", de39="00")
        self._st_answer_other = st("iso8583.answers", de39="other")
        self._st_outcome = {o: st("iso8583.outcomes", outcome=o) for o in OUTCOMES}
        self._st_reject = {r: st("iso8583.rejected", reason=r) for r in REJECT_REASONS}
        self._st_late = st("iso8583.late")
        self._st_unknown = st("iso8583.unknown")
        self._st_issuer_errors = st("iso8583.issuer_errors")
        self._st_inflight = st("iso8583.inflight")
        self._st_journal = st("iso8583.journal")
        self._st_links = {i.name: st("iso8583.links_up", issuer=i.name) for i in s.issuers}
        self._st_issuer_inflight = {i.name: st("iso8583.issuer_inflight", issuer=i.name)
                                    for i in s.issuers}
        self._st_saf_queued = st("saf.queued")
        self._st_saf_recovered = st("saf.recovered")
        self._st_errors = st("iso8583.errors")

    # -- connections and links ------------------------------------------------------------

    def opened(self, conn: int) -> None:
        """Acquirer connection ``conn`` is open."""
        self.conns.add(conn)

    def closed(self, conn: int) -> None:
        """Acquirer connection ``conn`` is gone: answers for it cannot be delivered."""
        self.conns.discard(conn)

    def link_up(self, issuer: str, link: int) -> None:
        """Link ``link`` of ``issuer`` connected."""
        self._set_link(issuer, link, True)

    def link_down(self, issuer: str, link: int) -> None:
        """Link ``link`` of ``issuer`` dropped (requests on it are left to their deadline:
        the issuer may have processed them, which the reversal settles)."""
        self._set_link(issuer, link, False)

    def _set_link(self, issuer: str, link: int, up: bool) -> None:
        states = self.links[issuer]
        states[link] = up
        n = sum(states)
        self.stats.set(self._st_links[issuer], n)
        if n:
            self.router.mark_up(issuer)
        else:
            self.router.mark_down(issuer)

    def pick_link(self, issuer: str) -> int | None:
        """A connected link of ``issuer`` (round robin), or None."""
        states = self.links.get(issuer)
        if not states:
            return None
        n = len(states)
        start = self._rr.get(issuer, 0)
        for k in range(n):
            i = (start + k) % n
            if states[i]:
                self._rr[issuer] = i + 1
                return i
        return None

    # -- acquirer side --------------------------------------------------------------------

    def request(self, conn: int, header: bytes, raw: bytes, now: float,
                received: float | None = None) -> list[Action]:
        """One framed message from acquirer connection ``conn`` (``received``: when its
        bytes arrived, monotonic seconds, for its trace)."""
        tr = None
        if self.tracing:
            tr = TxnTrace(int((now if received is None else received) * 1e9),
                          self.tracer.head())
        try:
            if self.vault is None:
                mti, fields = self.acq_index.read(raw)
                spans = None
            else:
                mti, fields, spans = self.acq_index.read_spans(raw)
        except CodecError as exc:
            return self._undecodable(conn, header, raw, exc, now, tr)
        if tr is not None:
            tr.t[DECODED] = mono_ns()
        problem = self.validator.check(mti, fields)
        if tr is not None:
            tr.t[VALIDATED] = mono_ns()
        if problem is not None:
            return self._reject(conn, header, raw, mti, fields, problem, now, tr)
        if mti[1] == "8":
            self._sv[self._st_echoes] += 1
            return [Answer(conn, header, self.acq_index.respond(raw, "00"))]
        self._sv[self._st_requests] += 1
        key = match_key(fields, self.s.match_key)
        clear_fields = fields
        clear = raw  # as the acquirer sent it: for the issuer and our own answers only
        vkey = None
        if spans is not None and not self.sensitive.isdisjoint(fields):
            raw, fields, vkey = self._tokenise(raw, fields, spans)
            if tr is not None:
                tr.t[CHECKED] = mono_ns()
        decision = self.router.route(mti, fields)
        if isinstance(decision, NoRoute):
            return self._local(conn, header, clear, mti, fields, self.s.no_route_code, "", "",
                               "no_route", vkey, tr)
        if isinstance(decision, Unavailable):
            return self._local(conn, header, clear, mti, fields, "91", decision.rule, "",
                               "unavailable", vkey, tr)
        issuer = decision.endpoint
        link = self.pick_link(issuer)
        if link is None:  # the router thought it up; the links say otherwise
            return self._local(conn, header, clear, mti, fields, "91", decision.rule, "",
                               "unavailable", vkey, tr)
        if key in self.matcher.pending:
            self.ratelog.warning("dup", "duplicate in-flight key answered 94: key=%s",
                                 escape(key))
            return self._local(conn, header, clear, mti, fields, "94", decision.rule, issuer,
                               "duplicate", vkey, tr)
        if tr is not None:
            tr.t[ROUTED] = mono_ns()
        tid = uuid7()
        base = self._base(mti, fields, decision.rule, issuer)
        item = None
        if self.saf_on and mti[1] in "12":
            item = self._saf_item(tid, issuer, key, mti, clear_fields)
        try:
            slot = self.journal.open(dumps({"id": tid, "ev": base, "saf": item}))
        except (JournalFull, PayloadTooLarge) as exc:
            self.ratelog.error("journal", "request not forwarded, journal refused it: "
                                          "error=%s", exc)
            return self._local(conn, header, clear, mti, fields, "91", decision.rule, issuer,
                               "saturated", vkey, tr)
        if tr is not None:
            tr.t[JOURNALED] = mono_ns()
            tr.tid, tr.doc, tr.server = tid, base, self.issuer_addr[issuer]
        txn = Txn(tid, conn, header, raw, mti, key, now, issuer, base, slot, item, vkey, spans,
                  tr)
        self.matcher.add(key, txn, now)
        self.router.begin(issuer)
        ispec = self.issuer_specs[issuer]
        if ispec is not self.acq_spec:
            clear = encode(decode(clear, self.acq_spec), ispec)
        return [Forward(issuer, link, clear, tr)]

    def _base(self, mti: str, fields: Mapping[str, str], route: str, issuer: str) -> dict:
        pan = fields.get("2", "")
        base = {"mti": mti, "pan": mask_pan(pan), "pcode": fields.get("3", ""),
                "amount": fields.get("4", ""),
                "currency": fields.get("49", ""), "stan": fields.get("11", ""),
                "terminal": fields.get("41", ""), "route": route, "issuer": issuer,
                "t_req": self.wall_ns()}
        if self.vault is not None:
            base["token"] = pan
        return base

    def _saf_item(self, tid: bytes, issuer: str, key: str, mti: str,
                  clear_fields: Mapping[str, str]) -> dict:
        assert self.keyring is not None
        # what the reversal needs; only the card number is sealed (the rest is what audit
        # events carry anyway); the 0400 itself is built when it is sent
        doc = {k: clear_fields[k] for k in REVERSAL_FIELDS if k in clear_fields}
        pan = doc.pop("2", "")
        doc["t"] = mti
        item_id = tid.hex()
        return {"id": item_id, "issuer": issuer, "created": self.wall_ns() / 1e9, "key": key,
                "doc": doc, "sealed": self.keyring.seal(item_id, {"2": pan})}

    def _tokenise(self, raw: bytes, clear_fields: dict[str, str],
                  spans: list) -> tuple[bytes, dict[str, str], str]:
        """Coat check: sensitive fields to the vault, token/filler into the message.

        The token has the PAN's length and every filler its field's byte length, so the
        tokenised message has the same layout (the spans stay valid for detokenising).
        """
        assert self.vault is not None
        sens = {k: clear_fields[k] for k in self.sensitive if k in clear_fields}
        token, vkey = self.vault.check_in(sens.get("2", ""), sens)
        parts, last = [], 0
        wanted = self._sensitive_nums
        for n, _, d, e in spans:
            if n in wanted:
                parts.append(raw[last:d])
                if n == 2:
                    parts.append(self.acq_index.field_bytes("2", token))
                else:
                    parts.append(self._filler[n] * (e - d))
                last = e
        parts.append(raw[last:])
        fields = dict(clear_fields)
        for k in sens:
            del fields[k]
        if "2" in sens:
            fields["2"] = token
        return b"".join(parts), fields, vkey

    def _clear_raw(self, raw: bytes, vkey: str | None, spans: list | None) -> bytes:
        """The request as the acquirer sent it: the vault's clear values spliced back in
        (for the issuer-facing leg and answers to the acquirer only)."""
        if vkey is None:
            return raw
        assert self.vault is not None and spans is not None
        clear = self.vault.claim(vkey)
        if clear is None:
            raise RuntimeError(f"vault entry missing: key={vkey}")
        parts, last = [], 0
        for n, _, d, e in spans:
            k = str(n)
            if k in clear:
                parts += [raw[last:d], self.acq_index.field_bytes(k, clear[k])]
                last = e
        parts.append(raw[last:])
        return b"".join(parts)

    def _local(self, conn: int, header: bytes, clear: bytes, mti: str,
               fields: Mapping[str, str], code: str, route: str, issuer: str, outcome: str,
               vkey: str | None, tr: TxnTrace | None = None) -> list[Action]:
        """An answer the switch gives itself (92, 91, 94) to the request ``clear`` (as the
        acquirer sent it: its own data goes back to it): recorded, then sent."""
        base = self._base(mti, fields, route, issuer)
        if vkey is not None:
            self.vault.release(vkey)  # type: ignore[union-attr]
        self._count(code, outcome)
        tid = uuid7()
        if tr is not None:
            tr.t[ROUTED] = mono_ns()
            tr.tid, tr.doc, tr.code, tr.outcome = tid, base, code, outcome
        return [Record(EVENTS, self._event(tid, base, code, outcome, 0)),
                Answer(conn, header, self.acq_index.respond(clear, code), trace=tr)]

    def _reject(self, conn: int, header: bytes, raw: bytes, mti: str,
                fields: Mapping[str, str], problem: Rejection, now: float,
                tr: TxnTrace | None = None) -> list[Action]:
        """A request that decodes but may not be routed: 30 / 14, or no answer at all."""
        reason = _reason(problem)
        self.stats.add(self._st_reject[reason])
        self.ratelog.warning(f"reject.{reason}", "request rejected: field=%s, reason=%s, "
                             "mti=%s, key=%s", problem.field, problem.reason, escape(mti),
                             escape(match_key(fields, self.s.match_key)))
        good = self.validator.echoable(fields)
        code = problem.code if mti_problem(mti) is None else None
        record = Record(EVENTS, self._rejected_event(
            mti if mti_problem(mti) is None else "", good, problem, code is not None, tr))
        if code is None:
            return self._no_answer(conn, record)
        self._count(code, "rejected")
        return [record, Answer(conn, header, self.acq_index.respond(raw, code), trace=tr)]

    def _undecodable(self, conn: int, header: bytes, raw: bytes, exc: CodecError,
                     now: float, tr: TxnTrace | None = None) -> list[Action]:
        """A frame that is not a message under the spec: 30 with what can be read, or none."""
        self.stats.add(self._st_reject["undecodable"])
        mti, partial = self.acq_index.salvage(raw)
        good = self.validator.echoable(partial)
        problem = Rejection(FORMAT_ERROR, exc.field or "?", f"undecodable at offset "
                                                            f"{exc.offset}")
        self.ratelog.warning("undecodable", "undecodable request: field=%s, offset=%s, "
                             "mti=%s", exc.field, exc.offset, escape(mti))
        valid_mti = mti is not None and mti_problem(mti) is None
        answer = None
        if valid_mti:
            doc = {k: v for k, v in good.items()}
            doc["t"] = response_mti(mti)  # type: ignore[arg-type]
            doc["39"] = FORMAT_ERROR
            try:
                answer = encode(doc, self.acq_spec)
            except CodecError:
                answer = None
        if tr is not None:
            tr.t[DECODED] = mono_ns()
        record = Record(EVENTS, self._rejected_event((mti or "") if valid_mti else "", good,
                                                     problem, answer is not None, tr))
        if answer is None:
            return self._no_answer(conn, record)
        self._count(FORMAT_ERROR, "rejected")
        return [record, Answer(conn, header, answer, trace=tr)]

    def _no_answer(self, conn: int, record: Record) -> list[Action]:
        self.stats.add(self._st_outcome["rejected"])
        if self.s.on_malformed == "close":
            return [record, Close(conn, "malformed")]
        return [record]

    def framing_error(self, conn: int, error: str) -> list[Action]:
        """Acquirer ``conn`` broke framing (bad length, oversize): recorded, then closed."""
        self.stats.add(self._st_reject["framing"])
        self.stats.add(self._st_outcome["rejected"])
        self.ratelog.warning("framing", "acquirer framing error, closing connection: %s",
                             escape(error, 200))
        problem = Rejection(None, "length", escape(error, 200))
        return [Record(EVENTS, self._rejected_event("", {}, problem, False)),
                Close(conn, "framing")]

    def _rejected_event(self, mti: str, good: Mapping[str, str], problem: Rejection,
                        answered: bool, tr: TxnTrace | None = None) -> bytes:
        wall = self.wall_ns()
        pan = good.get("2", "")
        body = {"mti": mti, "pan": mask_pan(pan), "stan": good.get("11", ""),
                "terminal": good.get("41", ""), "field": problem.field,
                "reason": problem.reason, "de39": problem.code if answered else "",
                "outcome": "rejected", "t_req": wall, "t_resp": wall}
        tid = uuid7(wall)
        if tr is not None:
            tr.tid, tr.doc, tr.code, tr.outcome = tid, body, body["de39"], "rejected"
        return encode_parts(tid, wall, self.src, REJECTED_KIND,
                            {"de39": body["de39"], "reason": _reason(problem)}, body)

    # -- issuer side ----------------------------------------------------------------------

    def response(self, issuer: str, link: int, raw: bytes, now: float) -> list[Action]:
        """One framed message from link ``link`` of ``issuer``."""
        try:
            mti, fields = self.issuer_index[issuer].read(raw)
        except CodecError as exc:
            self.stats.add(self._st_issuer_errors)
            self.ratelog.error(f"issuer.{issuer}", "undecodable issuer message dropped: "
                               "issuer=%s, error=%s", issuer, exc)
            return []
        if mti[1:2] == "8":
            return []  # an answer to our echo: the link is alive
        key = match_key(fields, self.s.match_key)
        if mti[1:2] == "4" and mti[2:3] == "1":
            return [ReversalResponse(issuer, key, fields.get("39", ""))]
        verdict, txn = self.matcher.match(key, now)
        if verdict == "late":
            self.stats.add(self._st_late)
            self.ratelog.warning("late", "late issuer response dropped: issuer=%s, key=%s, "
                                 "de39=%s", issuer, escape(key), escape(fields.get("39")))
            return []
        if verdict == "unknown":
            self.stats.add(self._st_unknown)
            self.ratelog.warning("unknown", "unmatched issuer response dropped: issuer=%s, "
                                 "key=%s", issuer, escape(key))
            return []
        self._settle(txn)
        if txn.t0 < self._last_t0:
            self.reordered += 1
        self._last_t0 = txn.t0
        code = fields.get("39", "")
        aspec = self.acq_spec
        ispec = self.issuer_specs[issuer]
        out = raw if ispec is aspec else encode(decode(raw, ispec), aspec)
        if txn.conn not in self.conns:
            return self._undelivered(txn, code, now)
        self._count(code, "answered")
        tr = txn.trace
        if tr is not None:
            tr.t[ISSUER] = int(now * 1e9)
            tr.code, tr.outcome = code, "answered"
        return [Record(EVENTS, self._event(txn.tid, txn.base, code, "answered", now - txn.t0)),
                Answer(txn.conn, txn.header, out, txn.slot, txn.item is not None, txn, tr)]

    def _settle(self, txn: Txn) -> None:
        self.router.end(txn.issuer)
        if txn.vkey is not None and self.vault is not None:
            self.vault.release(txn.vkey)

    def update_gauges(self) -> None:
        """Refresh the level stats (in flight, journal, per issuer); the shell calls this
        once a second instead of paying for it per message."""
        st = self.stats
        st.set(self._st_inflight, len(self.matcher))
        st.set(self._st_journal, self.journal.in_use)
        for issuer, slot in self._st_issuer_inflight.items():
            st.set(slot, self.router.inflight.get(issuer, 0))

    def _undelivered(self, txn: Txn, code: str, now: float) -> list[Action]:
        """The issuer answered but the acquirer is gone: the answer cannot be delivered, so
        an approval must not stand — reverse it (with SAF on)."""
        self.stats.add(self._st_outcome["undeliverable"])
        out: list[Action] = []
        reversal = txn.item is not None
        if reversal:
            out.append(Record(SAF, self._saf_frame(txn.tid, txn.item)))  # type: ignore[arg-type]
            self.stats.add(self._st_saf_queued)
        out += [Record(EVENTS, self._event(txn.tid, txn.base, code, "undeliverable",
                                           now - txn.t0, reversal)), Release(txn.slot)]
        return out

    def undeliverable(self, answer: Answer, now: float) -> list[Action]:
        """The shell found ``answer``'s connection closed when it came to send it (its event
        is recorded already): reverse what it approved and free its slot."""
        txn = answer.txn
        if txn is None or answer.slot < 0:
            return []
        self.stats.add(self._st_outcome["undeliverable"])
        out: list[Action] = []
        if answer.reverse and txn.item is not None:
            out.append(Record(SAF, self._saf_frame(txn.tid, txn.item)))
            self.stats.add(self._st_saf_queued)
            wall = self.wall_ns()
            body = dict(txn.base, de39="", outcome="undeliverable", reversal=True,
                        latency_us=round((now - txn.t0) * 1e6), t_resp=wall)
            out.append(Record(EVENTS, encode_parts(derive_id(txn.tid, 2), wall, self.src,
                                                   TXN_KIND, {"route": txn.base["route"],
                                                              "de39": ""}, body)))
        out.append(Release(answer.slot))
        return out

    # -- deadlines ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (monotonic seconds), or None."""
        return self.matcher.next_deadline()

    def tick(self, now: float) -> list[Action]:
        """Answer "91" to every request past its deadline, reversal first."""
        out: list[Action] = []
        for txn in self.matcher.expire(now):
            clear = self._clear_raw(txn.raw, txn.vkey, txn.spans)  # before the vault lets go
            self._settle(txn)
            self.ratelog.warning("timeout", "issuer timeout answered 91: issuer=%s, key=%s, "
                                 "pan=%s", txn.issuer, escape(txn.key), txn.base["pan"])
            reversal = txn.item is not None
            if reversal:
                out.append(Record(SAF, self._saf_frame(txn.tid, txn.item)))  # type: ignore[arg-type]
                self.stats.add(self._st_saf_queued)
            out.append(Record(EVENTS, self._event(txn.tid, txn.base, "91", "timeout",
                                                  now - txn.t0, reversal)))
            if txn.conn in self.conns:
                self._count("91", "timeout")
                tr = txn.trace
                if tr is not None:
                    tr.t[ISSUER] = int(now * 1e9)
                    tr.code, tr.outcome = "91", "timeout"
                # the reversal is recorded: nothing left to undo if the 91 is lost
                out.append(Answer(txn.conn, txn.header, self.acq_index.respond(clear, "91"),
                                  txn.slot, False, txn, tr))
            else:
                self.stats.add(self._st_outcome["timeout"])
                out.append(Release(txn.slot))
        return out

    # -- recovery -------------------------------------------------------------------------

    def recover(self, entries: Sequence[JournalEntry]) -> list[Action]:
        """Settle what a predecessor left in the journal: an OPEN slot's request was
        forwarded and never answered (an "interrupted" event and, with SAF, its reversal);
        a DECIDED slot's outcome is recorded but its answer may not have left (reversed when
        flagged). Each slot is released after its records."""
        out: list[Action] = []
        for e in entries:
            try:
                doc = loads(e.payload) if e.payload else None
            except (CBORDecodeError, ValueError):
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), bytes):
                self.ratelog.error("recover", "unreadable journal slot released: slot=%d",
                                   e.slot)
                self.stats.add(self._st_errors)
                out.append(Release(e.slot))
                continue
            tid, base, item = doc["id"], doc.get("ev") or {}, doc.get("saf")
            wall = self.wall_ns()
            reverse = isinstance(item, dict) and (e.state != DECIDED or e.reverse)
            if isinstance(item, dict) and reverse:
                out.append(Record(SAF, self._saf_frame(tid, item)))
                self.stats.add(self._st_saf_recovered)
            if e.state != DECIDED:
                self.stats.add(self._st_outcome["interrupted"])
                body = dict(base, de39="", outcome="interrupted", reversal=reverse,
                            latency_us=max(0, (wall - base.get("t_req", wall)) // 1000),
                            t_resp=wall)
                out.append(Record(EVENTS, encode_parts(tid, wall, self.src, TXN_KIND, {
                    "route": base.get("route", ""), "de39": ""}, body)))
            elif reverse:
                body = dict(base, de39="", outcome="reversed_after_restart", reversal=True,
                            latency_us=max(0, (wall - base.get("t_req", wall)) // 1000),
                            t_resp=wall)
                out.append(Record(EVENTS, encode_parts(derive_id(tid, 2), wall, self.src,
                                                       TXN_KIND, {"route": base.get("route",
                                                                                    ""),
                                                                  "de39": ""}, body)))
            out.append(Release(e.slot))
        if entries:
            log.warning("journal recovered: slots=%d, reversals=%d", len(entries),
                        sum(isinstance(a, Record) and a.outlet == SAF for a in out))
        return out

    # -- reversals (SAF sender) -----------------------------------------------------------

    def reversal_forward(self, issuer: str, doc: Mapping[str, str]) -> Forward | None:
        """A reversal ready to send to a live link of ``issuer``, or None when no link of
        the issuer is up.

        Raises:
            gears.iso8583.codec.CodecError: the document does not encode under the issuer's
                spec.
        """
        link = self.pick_link(issuer)
        if link is None:
            return None
        return Forward(issuer, link, encode(doc, self.issuer_specs[issuer]))

    # -- helpers --------------------------------------------------------------------------

    def _saf_frame(self, tid: bytes, item: dict) -> bytes:
        wall = self.wall_ns()
        return encode_parts(tid, wall, self.src, REVERSAL_KIND, {"issuer": item["issuer"]},
                            item)

    def _event(self, tid: bytes, base: dict, code: str, outcome: str, elapsed: float,
               reversal: bool = False) -> bytes:
        wall = self.wall_ns()
        body = dict(base)
        body["de39"] = code
        body["outcome"] = outcome
        body["latency_us"] = round(elapsed * 1e6)
        body["t_resp"] = wall
        if reversal:
            body["reversal"] = True
        return encode_parts(tid, wall, self.src, TXN_KIND, {"route": base["route"], "de39": code},
                            body)

    def _count(self, code: str, outcome: str) -> None:
        sv = self._sv
        if len(code) == 2 and code.isdigit():
            sv[self._st_answer0 + int(code)] += 1
        else:
            sv[self._st_answer_other] += 1
        sv[self._st_outcome[outcome]] += 1

    def contained_error(self) -> None:
        """Count an internal error the shell contained (so it shows in the stats)."""
        self.stats.add(self._st_errors)


def _reason(problem: Rejection) -> str:
    if problem.field == "t":
        return "mti"
    if problem.field == "length":
        return "framing"
    if problem.reason == "required field missing":
        return "missing"
    if problem.field == "2":
        return "pan"
    if problem.reason.startswith("undecodable"):
        return "undecodable"
    return "format"


__all__ = ["Action", "Answer", "Close", "Forward", "Record", "Release", "ReversalResponse",
           "SENSITIVE_FIELDS", "SwitchCore", "Txn", "mask_pan", "stat_defs"]
