"""Racks' telemetry as rows — sans I/O: OTLP trace requests and JSON-lines log batches in,
the rows ``mixer.tracefiles`` stores out.

Traces (``fluxrig.traces.<rack>``: an OTLP ``ExportTraceServiceRequest``) become **one row
per trace per message**: the trace's spans as one compact JSON text (``spans``) beside the
columns a lookup filters on, copied from the trace's root span (the span without a parent:
``iso8583.mti``, ``iso8583.de39``, ``iso8583.stan``, ``iso8583.terminal``, ``fluxrig.token``,
``fluxrig.outcome``, ``fluxrig.keep``, ...). A lookup then reads one row, not one per span.
Spans of one trace that came in two messages are two rows (the second without a root: its
lookup columns are null); ``mixer.tracequery`` merges them by trace id, de-duplicating by
span id.

The rack is the subject's (the hub's permissions let a rack publish its own subject only),
never the ``fluxrig.rack`` resource attribute a rack writes itself.

A row's hour (its partition) is the trace id's own time when the id is a UUIDv7 (the first
48 bits: ms since the epoch; a fluxrig transaction id) within a day of its spans, else its
first span's start: so a lookup by trace id opens one hour directory.

Every text stored passes ``engine.masking.mask_card_numbers`` (a Luhn-valid run of 13-19
digits is masked): a last guard should a gear put a clear card number in a span name, an
attribute or a log message. A text is masked *before* it is cut to its stored length, so a
card number straddling the cut is never kept half clear; numbers that hold a card number
(an integer, an integral float) are stored as its masked text; a bytes attribute is stored
as hex, masked both as the text its bytes spell and as the hex digits (a BCD-packed card
number *is* its digits in hex). Ids (trace, span) are hex, never masked: they are not text.

Times are int64 ns in the files; a time beyond int64 (a protobuf ``fixed64``, a JSON
number) is clamped to its range, so one hostile value cannot cost the part it would sit in.
A log batch is decoded with invalid UTF-8 bytes replaced (U+FFFD), so one bad byte costs
neither its record nor its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from engine.masking import luhn_valid, mask_card_numbers, mask_digits
from mixer.tracelayout import LEVELS, ROOT_COLUMNS, trace_id_bytes, uuid7_ns

#: the columns of a trace row, in file order (``rack``, ``date``, ``hour``: the path's)
TRACE_COLUMNS: Final = ("trace_id", "process", "start_ns", "end_ns", "duration_us", "name",
                        *(c for c, _ in ROOT_COLUMNS), "span_count", "spans")
LOG_COLUMNS: Final = ("ts", "level", "logger", "process", "msg", "exc")
DAY_NS: Final = 86_400 * 10**9
_KINDS: Final = {Span.SPAN_KIND_INTERNAL: "INTERNAL", Span.SPAN_KIND_SERVER: "SERVER",
                 Span.SPAN_KIND_CLIENT: "CLIENT", Span.SPAN_KIND_PRODUCER: "PRODUCER",
                 Span.SPAN_KIND_CONSUMER: "CONSUMER"}
_STATUS: Final = {Status.STATUS_CODE_OK: "OK", Status.STATUS_CODE_ERROR: "ERROR"}
MAX_TEXT: Final = 16_384  # characters kept of one log message or traceback
MAX_NAME: Final = 256     # characters kept of a logger or process name
# masked before the cut: what a number straddling the cut needs past it (19 digits and
# their separators are at most 37 characters, with room for the forms masking may add)
MASK_SLACK: Final = 64
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
# below 2**53 every integer is a float exactly; above it a float's digits are not the
# number that was sent, so a Luhn check of them says nothing
_EXACT_FLOAT: Final = 2**53


class TelemetryDecodeError(ValueError):
    """A payload that is not what its subject says (the message says what is wrong)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceRow:
    """One trace's spans from one message (``as_dict``: the stored row)."""

    rack: str
    hour_ns: int        # the time that picks its hour partition (module doc)
    trace_id: str
    process: str | None
    start_ns: int
    end_ns: int
    name: str | None
    attrs: dict[str, str | None]   # ROOT_COLUMNS' columns
    span_count: int
    spans: str          # JSON array of the spans (``span_json``)

    def as_dict(self) -> dict[str, object]:
        """The row as ``TRACE_COLUMNS``."""
        return {"trace_id": self.trace_id, "process": self.process, "start_ns": self.start_ns,
                "end_ns": self.end_ns, "duration_us": (self.end_ns - self.start_ns) // 1000,
                "name": self.name, **self.attrs, "span_count": self.span_count,
                "spans": self.spans}


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRow:
    """One log record (``as_dict``: the stored row)."""

    rack: str
    ts: int
    level: str
    logger: str
    process: str
    msg: str
    exc: str | None

    def as_dict(self) -> dict[str, object]:
        """The row as ``LOG_COLUMNS``."""
        return {"ts": self.ts, "level": self.level, "logger": self.logger,
                "process": self.process, "msg": self.msg, "exc": self.exc}


def clamp_i64(value: int) -> int:
    """``value`` within the int64 range of the files' time columns."""
    return min(max(value, I64_MIN), I64_MAX)


def masked_cut(text: str, limit: int) -> str:
    """``text`` masked, then cut to ``limit`` characters (masking first: a card number that
    straddles the cut is masked whole; only ``MASK_SLACK`` past the cut is scanned)."""
    return mask_card_numbers(text[:limit + MASK_SLACK])[:limit]


def _masked_number(value: int | float) -> object:
    """A number that may be a card number: its masked digits when it is one (an integer, or
    an integral float, of 13-19 digits that passes Luhn; an integral float too large to be
    exact is masked whatever its digits), else ``value`` unchanged."""
    if isinstance(value, float):
        if not value.is_integer() or not 1e12 <= abs(value) < 1e19:
            return value
        whole = int(abs(value))
        digits = str(whole)
        if whole >= _EXACT_FLOAT:
            return mask_digits(digits)
    else:
        digits = str(abs(value))
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return mask_digits(digits)
    return value


def masked_bytes(data: bytes) -> str:
    """A bytes attribute as stored: hex, with any card number masked — spelled in the
    bytes (ASCII digits: the masked positions become ``*``, hex ``2a``) or packed in them
    (BCD: the hex text is the digits)."""
    text = data.decode("latin-1")
    spelled = mask_card_numbers(text)
    if spelled != text:
        data = spelled.encode("latin-1", "replace")
    return mask_card_numbers(data.hex())


def _masked(value: object) -> object:
    """An attribute value with card numbers masked: text by ``mask_card_numbers``, a number
    that is a card number as its masked text (``_masked_number``)."""
    if isinstance(value, str):
        return mask_card_numbers(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _masked_number(value)
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {mask_card_numbers(k): _masked(v) for k, v in value.items()}
    return value


def any_value(v: AnyValue) -> object:
    """An OTLP ``AnyValue`` as a JSON-able Python value (bytes as hex), card numbers
    masked."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if which == "bytes_value":
        return masked_bytes(v.bytes_value)
    return _masked(getattr(v, which))


def attributes(kvs: Iterable[KeyValue]) -> dict[str, object]:
    """OTLP attributes as a dict (masked values)."""
    return {mask_card_numbers(kv.key): any_value(kv.value) for kv in kvs}


def _text(value: object) -> str | None:
    return None if value is None else mask_card_numbers(str(value))


def trace_rows(rack: str, payload: bytes) -> list[TraceRow]:
    """The rows of one ``fluxrig.traces.<rack>`` message: one per trace it holds.

    Raises:
        TelemetryDecodeError: not an OTLP ``ExportTraceServiceRequest``, or a span without a
            trace id.
    """
    try:
        req = ExportTraceServiceRequest.FromString(payload)
    except (DecodeError, ValueError) as exc:
        raise TelemetryDecodeError(f"not an OTLP trace request: {exc}") from None
    groups: dict[bytes, list[tuple[Span, str | None]]] = {}
    for rs in req.resource_spans:
        res = attributes(rs.resource.attributes)
        process = _text(res.get("fluxrig.process"))
        for ss in rs.scope_spans:
            for span in ss.spans:
                if len(span.trace_id) != 16:
                    raise TelemetryDecodeError(
                        f"span {mask_card_numbers(span.name)[:64]!r}: trace id of "
                        f"{len(span.trace_id)} bytes (expected 16)")
                groups.setdefault(span.trace_id, []).append((span, process))
    return [_row(rack, tid, spans) for tid, spans in groups.items()]


def span_json(span: Span, process: str | None) -> dict[str, object]:
    """One span as stored in a row's ``spans`` (masked)."""
    doc: dict[str, object] = {
        "name": mask_card_numbers(span.name), "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() or None,
        "kind": _KINDS.get(span.kind, "UNSPECIFIED"),
        "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
        "status": _STATUS.get(span.status.code, "UNSET"),
        "attributes": attributes(span.attributes), "process": process}
    if span.status.message:
        doc["status_message"] = mask_card_numbers(span.status.message)
    return doc


def _row(rack: str, tid: bytes, spans: list[tuple[Span, str | None]]) -> TraceRow:
    docs = [span_json(s, p) for s, p in spans]
    root = next((i for i, (s, _) in enumerate(spans) if not s.parent_span_id), None)
    # fixed64 on the wire: a time past int64 would make the part unwritable
    start = clamp_i64(min(s.start_time_unix_nano for s, _ in spans))
    end = clamp_i64(max(max(s.end_time_unix_nano, s.start_time_unix_nano) for s, _ in spans))
    cols: dict[str, str | None] = dict.fromkeys((c for c, _ in ROOT_COLUMNS))
    name = None
    process = spans[0][1]
    if root is not None:
        rattrs = docs[root]["attributes"]
        assert isinstance(rattrs, dict)
        for col, key in ROOT_COLUMNS:
            cols[col] = _text(rattrs.get(key))
        name = str(docs[root]["name"])
        process = spans[root][1]
    v7 = uuid7_ns(tid)
    hour_ns = v7 if v7 is not None and abs(v7 - start) < DAY_NS else start
    return TraceRow(rack=rack, hour_ns=hour_ns, trace_id=tid.hex(), process=process,
                    start_ns=start, end_ns=end, name=name, attrs=cols,
                    span_count=len(docs), spans=orjson.dumps(docs).decode())


def log_rows(rack: str, payload: bytes) -> tuple[list[LogRow], int]:
    """The records of one ``fluxrig.logs.<rack>`` message (JSON lines) and how many lines
    were not a record (skipped: one bad line does not cost its neighbours). Invalid UTF-8
    bytes are replaced by U+FFFD (UTF-8 resynchronises at the next character, so a bad byte
    spoils only the text it sits in): the record is kept, or, when the damage is in its
    JSON syntax, that line alone is skipped."""
    text = payload.decode(errors="replace")
    rows: list[LogRow] = []
    bad = 0
    for line in _lines(text):
        row = _log_row(rack, line)
        if row is None:
            bad += 1
        else:
            rows.append(row)
    return rows, bad


def _lines(text: str) -> Iterator[str]:
    for line in text.split("\n"):
        if line.strip():
            yield line


def _log_row(rack: str, line: str) -> LogRow | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    ts, msg = doc.get("ts"), doc.get("msg")
    if isinstance(ts, bool) or not isinstance(ts, int) or not isinstance(msg, str):
        return None
    level = str(doc.get("level", "INFO")).upper()
    exc = doc.get("exc")
    return LogRow(rack=rack, ts=clamp_i64(ts), level=level if level in LEVELS else "INFO",
                  logger=masked_cut(str(doc.get("logger", "")), MAX_NAME),
                  process=masked_cut(str(doc.get("process", "")), MAX_NAME),
                  msg=masked_cut(msg, MAX_TEXT),
                  exc=masked_cut(str(exc), MAX_TEXT) if exc else None)


__all__ = ["DAY_NS", "I64_MAX", "I64_MIN", "LEVELS", "LOG_COLUMNS", "LogRow", "MASK_SLACK",
           "MAX_NAME", "MAX_TEXT", "ROOT_COLUMNS", "TRACE_COLUMNS", "TelemetryDecodeError",
           "TraceRow", "any_value", "attributes", "clamp_i64", "log_rows", "masked_bytes",
           "masked_cut", "span_json", "trace_id_bytes", "trace_rows", "uuid7_ns"]
