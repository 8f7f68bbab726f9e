"""The signal tap: spans and log records diverted off the data path into a shared-memory ring.

Theory of operation
-------------------
Every rack process owns one **tap ring** (a ring segment of kind ``KIND_TAP``, created by the
supervisor like its counters). The process writes; the telemetry process reads every tap
ring a few times a second and exports what it finds (``engine.traceexport``):

    gear / logging  --(try_write, never waits)-->  tap ring  --(poll)-->  telemetry
                                                                           -> OTLP on NATS
                                                                           -> JSON lines

A tap ring is lossy on purpose, the only lossy ring of the rack: a full ring drops the
record and counts it (``traces_dropped``, ``logs_dropped`` in the process's counters), and
the writer never waits, never rings a doorbell (the reader polls) and never makes a system
call. Tracing therefore costs the transaction path the time to take a few clock readings
and, for the transactions kept, one CBOR encoding and one ring copy. A tap ring holds no
work: a restart starts it empty (``engine.leftovers`` never adopts one).

Records (a first byte says which, then deterministic CBOR):

* ``TRACE``: ``[trace_id (16 bytes), keep reason, [[name, parent, start_ns, end_ns, kind,
  error, attributes], ...]]`` — one transaction; ``parent`` is the index of the parent span
  in the list (-1 for the root); times are wall-clock ns; ``error`` is "" or why the span
  failed; attributes are text, int, float or bool values (never a clear card number: the
  writer passes tokens and masked values only);
* ``LOG``: ``{"ts", "level", "logger", "msg"[, "exc"]}`` — one log record, its text already
  masked (``engine.masking``).

Sampling (``Tracer``): a head-based ratio decided when a transaction starts (``head``) plus
"always keep" rules decided when it ends (``keep``): errors, declines, timeouts and latency
over a threshold. A transaction's clock readings are taken whether or not it is sampled
(~50 ns each), so a transaction kept by a rule has the same spans as a sampled one. Kept
by a rule beyond ``max_kept`` per second are dropped and counted: a decline storm must
not turn the tap into a second audit trail.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from engine.cbor import dumps
from engine.counters import LOGS_DROPPED, TRACES_DROPPED, TRACES_KEPT, Counters
from engine.masking import mask_card_numbers
from engine.ring import Producer, RecordTooLargeError, Ring

TRACE: Final = 1  # a tap record's first byte
LOG: Final = 2
_TRACE: Final = bytes((TRACE,))
_LOG: Final = bytes((LOG,))

# span kinds, as OpenTelemetry numbers them (opentelemetry.trace.SpanKind)
INTERNAL: Final = 0
SERVER: Final = 1
CLIENT: Final = 2
PRODUCER: Final = 3
CONSUMER: Final = 4

KEEP_REASONS: Final = ("sampled", "error", "decline", "timeout", "slow")
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
MAX_LOG_TEXT: Final = 4096  # a log message longer than this is cut (a tap record stays small)

AttrValue = str | int | float | bool
Span = tuple[str, int, int, int, int, str, Mapping[str, AttrValue]]
"""One span record: name, parent index (-1: root), start ns, end ns, kind, error, attributes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSettings:
    """How a rack samples transaction traces (rig key ``telemetry.traces``).

    Attributes:
        enabled: record traces at all.
        sample: head-based share of transactions traced (0..1).
        keep_errors: always keep transactions refused as malformed or failed internally.
        keep_declines: always keep transactions answered with a code other than approval.
        keep_timeouts: always keep transactions the issuer did not answer in time.
        slower_than: always keep transactions slower than this (seconds; 0: off).
        max_kept: transactions kept by a rule per second and process, at most.
        tap: bytes of each process's tap ring.
    """

    enabled: bool = True
    sample: float = 0.01
    keep_errors: bool = True
    keep_declines: bool = True
    keep_timeouts: bool = True
    slower_than: float = 0.5
    max_kept: int = 200
    tap: int = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LogShipSettings:
    """Which log records a rack ships to ``fluxrig.logs.<rack>`` (rig key
    ``telemetry.logs``): at or above ``level``, at most ``rate`` per second (``burst``
    at once) for the whole rack."""

    enabled: bool = True
    level: str = "info"
    rate: float = 100.0
    burst: int = 1000


class Tap:
    """The writing side of a process's tap ring (thread-safe: a log record may come from a
    helper thread while the loop records a span)."""

    __slots__ = ("_producer", "_counters", "_lock", "ring")

    def __init__(self, ring: Ring, counters: Counters | None):
        self.ring = ring
        self._producer: Producer = ring.producer()
        self._counters = counters
        self._lock = threading.Lock()

    def _write(self, payload: bytes, dropped: int) -> bool:
        with self._lock:
            try:
                n = self._producer.try_write((payload,), wake=False)
            except RecordTooLargeError:
                n = 0
        if not n and self._counters is not None:
            self._counters.add(dropped)
        return bool(n)

    def trace(self, trace_id: bytes, keep: str, spans: Sequence[Span]) -> bool:
        """Write one transaction's spans; False (counted) when the ring is full."""
        ok = self._write(_TRACE + dumps([trace_id, keep, [list(s) for s in spans]]),
                         TRACES_DROPPED)
        if ok and self._counters is not None:
            self._counters.add(TRACES_KEPT)
        return ok

    def log(self, doc: Mapping[str, object]) -> bool:
        """Write one log record; False (counted) when the ring is full."""
        return self._write(_LOG + dumps(doc), LOGS_DROPPED)

    def dropped(self, traces: bool = False) -> None:
        """Count a record that could not be written (``traces``: a trace, else a log)."""
        if self._counters is not None:
            self._counters.add(TRACES_DROPPED if traces else LOGS_DROPPED)


class Tracer:
    """What a gear traces with (``GearContext.tracer``): the sampling decisions and the tap.

    A gear calls ``head()`` when a transaction starts, takes its clock readings with
    ``time.time_ns()`` (or monotonic readings converted by the caller), and at the end asks
    ``keep(...)``; when that gives a reason it calls ``emit``.
    """

    __slots__ = ("settings", "tap", "slow_ns", "_rand", "_window", "_kept", "_clock")

    def __init__(self, settings: TraceSettings, tap: Tap | None,
                 clock: object = time.monotonic):
        self.settings = settings
        self.tap = tap if settings.enabled else None
        # slower than this (ns) keeps a transaction: callers test it before asking ``keep``
        self.slow_ns = int(settings.slower_than * 1e9) if settings.slower_than else 1 << 62
        self._rand = random.random
        self._clock = clock
        self._window = 0.0
        self._kept = 0

    @property
    def on(self) -> bool:
        """Whether anything is traced at all."""
        return self.tap is not None

    def head(self) -> bool:
        """The head-based decision for a transaction starting now."""
        return self.tap is not None and self._rand() < self.settings.sample

    def keep(self, sampled: bool, *, error: bool = False, decline: bool = False,
             timeout: bool = False, seconds: float = 0.0) -> str | None:
        """Why a finished transaction is kept (``KEEP_REASONS``), or None: drop it."""
        if self.tap is None:
            return None
        if sampled:
            return "sampled"
        s = self.settings
        if timeout and s.keep_timeouts:
            reason = "timeout"
        elif error and s.keep_errors:
            reason = "error"
        elif decline and s.keep_declines:
            reason = "decline"
        elif s.slower_than and seconds > s.slower_than:
            reason = "slow"
        else:
            return None
        now = self._clock()  # type: ignore[operator]
        if now >= self._window:
            self._window, self._kept = now + 1.0, 0
        if self._kept >= s.max_kept:
            self.tap.dropped(traces=True)
            return None
        self._kept += 1
        return reason

    def emit(self, trace_id: bytes, keep: str, spans: Sequence[Span]) -> bool:
        """Write a kept transaction's spans to the tap (False: dropped, counted)."""
        if self.tap is None:
            return False
        return self.tap.trace(trace_id, keep, spans)


OFF: Final = Tracer(TraceSettings(enabled=False), None)
"""A tracer that traces nothing (tests, gears outside a rack)."""


def traces_subject(rack_id: str) -> str:
    """Where a rack's telemetry publishes its spans (OTLP protobuf)."""
    return f"fluxrig.traces.{rack_id}"


def logs_subject(rack_id: str) -> str:
    """Where a rack's telemetry publishes its log records (JSON lines)."""
    return f"fluxrig.logs.{rack_id}"


class TapLogHandler(logging.Handler):
    """Ships the process's log records at or above a level into its tap ring, masked."""

    def __init__(self, tap: Tap, level: int):
        super().__init__(level)
        self.tap = tap

    def emit(self, record: logging.LogRecord) -> None:
        # never raises into the caller (a log call on the transaction path): a record that
        # cannot be shipped is counted as dropped
        try:
            try:
                msg = record.getMessage()
            except Exception:  # a bad format string must not lose the record's existence
                msg = str(record.msg)
            doc: dict[str, object] = {
                "ts": int(record.created * 1e9), "level": record.levelname,
                "logger": record.name, "msg": _shippable(msg)}
            if record.exc_info:
                doc["exc"] = _shippable(logging.Formatter().formatException(record.exc_info))
            self.tap.log(doc)
        except Exception:
            self.tap.dropped()


def _shippable(text: str) -> str:
    """Masked, then cut to ``MAX_LOG_TEXT`` (masking keeps the length, so a card number
    across the cut is masked too), lone surrogates (undecodable file names) escaped."""
    text = mask_card_numbers(text[:MAX_LOG_TEXT + 32])[:MAX_LOG_TEXT]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def install_log_tap(tap: Tap | None, settings: LogShipSettings) -> TapLogHandler | None:
    """Add the tap handler to the root logger of this process (after the fork), or None when
    log shipping is off. A handler inherited through the fork (the supervisor's) is removed
    first: a tap ring has one writer."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, TapLogHandler):
            root.removeHandler(h)
    if tap is None or not settings.enabled:
        return None
    handler = TapLogHandler(tap, logging.getLevelName(settings.level.upper()))
    root.addHandler(handler)
    return handler


__all__ = ["CLIENT", "CONSUMER", "INTERNAL", "KEEP_REASONS", "LOG", "LOG_LEVELS",
           "LogShipSettings", "OFF", "PRODUCER", "SERVER", "Span", "TRACE", "Tap",
           "TapLogHandler", "TraceSettings", "Tracer", "install_log_tap", "logs_subject",
           "traces_subject"]
