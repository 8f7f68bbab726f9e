"""A switch transaction's trace: clock readings taken on the way, spans built at the end.

Theory of operation
-------------------
The core (``gears.iso8583.core``) gives every request it reads a ``TxnTrace`` when tracing
is on, and the core and the shell (``gears.iso8583.switch``) write monotonic-clock readings
into its fixed slots as the request passes each step — about 50 ns a reading, taken for
every transaction so that one kept by a rule (a timeout, a decline, a slow one) has the same
spans as one the head sampler picked. When the answer is handed to the kernel the shell
asks the tracer whether to keep it (``engine.tap.Tracer.keep``); only then are spans built
(``spans``) and written to the tap. A step not taken (a request refused before routing)
leaves its slot at 0 and has no span.

    slot        taken when                              span ending there
    RECV        the acquirer's bytes arrived            (the root starts here)
    DECODED     the request was read (bitmap, fields)   acquirer receive
    VALIDATED   the edge checks passed or failed        validate
    CHECKED     sensitive fields went to the vault      coat check
    ROUTED      a route and a live link were chosen     route
    JOURNALED   the journal slot was written            journal
    SENT        the request was written to the link     issuer send
    ISSUER      the issuer's answer was read            issuer answer (or its deadline)
    RECORDED    the audit event was in the ring         audit write
    RESPONDED   the answer was handed to the kernel     respond; the root ends here

Attributes follow OpenTelemetry's semantic conventions where they exist (``client.address``,
``server.address``, ``server.port``, ``network.transport``) and fluxrig's own elsewhere
(``iso8583.*``, ``fluxrig.*``). They carry the token and the masked PAN, never a clear one:
they are read from the audit event's fields, which are tokenised and masked already.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Final, Protocol

from engine.tap import CLIENT, INTERNAL, SERVER, AttrValue, Span, Tracer

RECV, DECODED, VALIDATED, CHECKED, ROUTED, JOURNALED, SENT, ISSUER, RECORDED, RESPONDED = \
    range(10)
N_SLOTS: Final = 10
# the child span ending at each slot (RECV starts the root: no span ends there)
STEP_NAMES: Final = ("", "acquirer receive", "validate", "coat check", "route", "journal",
                     "issuer send", "issuer answer", "audit write", "respond")
# approvals (ISO 8583:1987 DE39): anything else is a decline for the keep rules
APPROVALS: Final = frozenset({"00", "08", "10", "11", "16"})
ERROR_OUTCOMES: Final = frozenset({"rejected", "saturated", "unavailable"})
# audit event fields -> span attributes of the root
_ATTRS: Final = (("mti", "iso8583.mti"), ("stan", "iso8583.stan"),
                 ("terminal", "iso8583.terminal"), ("pcode", "iso8583.pcode"),
                 ("amount", "iso8583.amount"), ("currency", "iso8583.currency"),
                 ("pan", "iso8583.pan"), ("token", "fluxrig.token"),
                 ("route", "fluxrig.route"), ("issuer", "fluxrig.issuer"))

mono_ns = time.monotonic_ns  # the clock of loop.time(), in ns


class TxnTrace:
    """One transaction's clock readings and what its spans will say."""

    __slots__ = ("t", "sampled", "tid", "doc", "code", "outcome", "server")

    def __init__(self, received_ns: int, sampled: bool):
        # every request makes one: only what is known now is set here; tid, doc, code,
        # outcome and server are set on the way (before anything reads them)
        self.t = [received_ns, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        self.sampled = sampled
        self.server: tuple[str, int] | None = None  # the issuer link's address

    tid: bytes  # trace id = the transaction's (audit event's) id
    doc: Mapping[str, object]  # the audit event's fields (masked, tokenised)
    code: str  # DE39 answered
    outcome: str

    def keep_facts(self) -> tuple[bool, bool, bool, float]:
        """(error, decline, timeout, seconds) for ``Tracer.keep``."""
        t = self.t
        return (self.outcome in ERROR_OUTCOMES, self.code not in APPROVALS,
                self.outcome == "timeout", (t[RESPONDED] - t[RECV]) / 1e9)

    def spans(self, keep: str, peer: str, coat_check: bool) -> list[Span]:
        """The transaction's spans in wall-clock ns: the root (SERVER), then one child per
        step taken, in order."""
        t = self.t
        shift = time.time_ns() - mono_ns()  # monotonic -> wall clock
        d = self.doc
        attrs: dict[str, AttrValue] = {"network.transport": "tcp", "fluxrig.keep": keep,
                                       "fluxrig.outcome": self.outcome,
                                       "iso8583.de39": self.code}
        if peer:
            attrs["client.address"] = peer
        for field, name in _ATTRS:
            v = d.get(field)
            if isinstance(v, str) and v:
                attrs[name] = v
        end = t[RESPONDED] or max(t)
        root_error = self.outcome if self.outcome in ERROR_OUTCOMES or \
            self.outcome == "timeout" else ""
        out: list[Span] = [(f"iso8583 {d.get('mti') or 'request'}", -1, t[RECV] + shift,
                            end + shift, SERVER, root_error, attrs)]
        last = t[RECV]
        for slot in range(DECODED, N_SLOTS):
            at = t[slot]
            if not at:
                continue
            if slot == CHECKED and not coat_check:
                continue
            kind, error, sattrs = INTERNAL, "", _NO_ATTRS
            if slot == ISSUER:
                kind = CLIENT
                error = "timeout" if self.outcome == "timeout" else ""
                sattrs = {"network.transport": "tcp",
                          "fluxrig.issuer": str(d.get("issuer", ""))}
                if self.server is not None:
                    sattrs["server.address"], sattrs["server.port"] = self.server
            out.append((STEP_NAMES[slot], 0, last + shift, at + shift, kind, error, sattrs))
            last = at
        return out


_NO_ATTRS: Final[Mapping[str, AttrValue]] = {}


class _Traced(Protocol):
    trace: TxnTrace | None


def finish_traces(tracer: Tracer, answers: Iterable[_Traced], recorded: int, peer: str,
                  coat_check: bool) -> None:
    """Answers just handed to the kernel (their events recorded at ``recorded``): write the
    traces the tracer keeps to the tap. An approval in time that the head sampler did not
    pick — nearly every transaction — leaves after three comparisons."""
    responded = mono_ns()
    slow = tracer.slow_ns
    for a in answers:
        tr = a.trace
        if tr is None:
            continue
        t = tr.t
        if not tr.sampled and tr.code in APPROVALS and tr.outcome == "answered" \
                and responded - t[RECV] <= slow:
            continue
        t[RECORDED], t[RESPONDED] = recorded, responded
        error, decline, timeout, seconds = tr.keep_facts()
        keep = tracer.keep(tr.sampled, error=error, decline=decline, timeout=timeout,
                           seconds=seconds)
        if keep is not None:
            tracer.emit(tr.tid, keep, tr.spans(keep, peer, coat_check))


__all__ = ["APPROVALS", "CHECKED", "DECODED", "ISSUER", "JOURNALED", "N_SLOTS", "RECORDED",
           "RECV", "RESPONDED", "ROUTED", "SENT", "STEP_NAMES", "TxnTrace", "VALIDATED",
           "finish_traces", "mono_ns"]
