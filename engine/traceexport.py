"""Telemetry's side of the signal tap: tap records -> OpenTelemetry spans and JSON log lines.

Theory of operation
-------------------
The telemetry process (the only rack process that imports the OpenTelemetry SDK, and only
after the fork: its threads and locks do not survive one) polls every process's tap ring
(``engine.tap``) a few times a second:

* ``TapReader`` maps the tap rings named in ``state.json`` and returns the records waiting,
  copied, then releases them to their writers;
* ``OtlpEncoder`` writes trace records as an OTLP ``ExportTraceServiceRequest`` (protobuf,
  ``engine.otlpwire``: 10x cheaper than the SDK's encoder), which telemetry publishes on
  ``fluxrig.traces.<rack>`` (core NATS: fire and forget, like the stats). The trace id is
  the record's (a transaction's id), span ids are derived from it and the span's position
  (a record exported twice gives the same spans), the resource names the rack and process;
* with ``telemetry.otlp``, ``span_batch`` turns the same records into the SDK's
  ``ReadableSpan``s (same ids) and the ``OtlpSender`` hands them to the SDK's OTLP/HTTP
  exporter on a thread of its own (a slow collector costs dropped batches, counted, never a
  stalled loop);
* ``LogShipper`` turns log records into JSON lines for ``fluxrig.logs.<rack>`` under a
  rack-wide token bucket (``rate``, ``burst``); what it drops it says in a notice record.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from engine.about import fluxrig_version
from engine.cbor import CBORDecodeError, loads
from engine.config import OtlpConfig
from engine.masking import mask_card_numbers
from engine.otlpwire import export_request, resource_spans, span, span_ids
from engine.ring import Consumer, Ring
from engine.shm import KIND_TAP
from engine.tap import LOG, TRACE, LogShipSettings

log = logging.getLogger("fluxrig.telemetry")

MAX_TRACES_PER_MESSAGE: Final = 256  # one NATS message stays well under max_payload
_KINDS: Final = (SpanKind.INTERNAL, SpanKind.SERVER, SpanKind.CLIENT, SpanKind.PRODUCER,
                 SpanKind.CONSUMER)
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_OK: Final = Status(StatusCode.UNSET)


@dataclass(slots=True)
class TapRecords:
    """What one poll of every tap ring found: traces and log records by process."""

    traces: list[tuple[str, list[object]]] = field(default_factory=list)
    logs: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    bad: int = 0  # records that did not decode (a bug or a torn ring: counted, skipped)


class TapReader:
    """The reading side of every tap ring of a rack (from its state file)."""

    def __init__(self, processes: Iterable[Mapping[str, object]]):
        self._taps: list[tuple[str, Ring, Consumer]] = []
        for p in processes:
            name = p.get("tap")
            if not isinstance(name, str) or not name:
                continue
            try:
                ring = Ring.attach(name, KIND_TAP)
            except (FileNotFoundError, ValueError) as exc:
                log.warning("tap ring not readable: process=%s, error=%s", p.get("name"), exc)
                continue
            self._taps.append((str(p.get("name")), ring, ring.consumer()))

    def poll(self, limit: int = 4096) -> TapRecords:
        """Take the records waiting in every tap (copied; the rings are released)."""
        out = TapRecords()
        for process, _, consumer in self._taps:
            views = consumer.poll(limit)
            if not views:
                continue
            for v in views:
                kind = v[0] if len(v) else 0
                try:
                    doc = loads(bytes(v[1:]))
                except (CBORDecodeError, ValueError):
                    out.bad += 1
                    continue
                if kind == TRACE and isinstance(doc, list) and len(doc) == 3:
                    out.traces.append((process, doc))
                elif kind == LOG and isinstance(doc, dict):
                    out.logs.append((process, doc))
                else:
                    out.bad += 1
            consumer.commit()
        return out

    def close(self) -> None:
        """Unmap every tap ring."""
        for _, ring, _ in self._taps:
            ring.close()
        self._taps.clear()


Checked = tuple[bytes, list[tuple[str, int, int, int, int, str, dict[str, object]]]]


def checked(record: Sequence[object]) -> Checked:
    """A trace record's trace id and spans, types checked and texts masked (the last guard:
    a gear's attribute must not leak a card number); ``ValueError`` when malformed."""
    if len(record) != 3:
        raise ValueError("not a trace record")
    trace_id, _keep, raw = record
    if not isinstance(trace_id, bytes) or len(trace_id) != 16 or not isinstance(raw, list) \
            or not raw or len(raw) > 1000:
        raise ValueError("not a trace record")
    spans = []
    for i, s in enumerate(raw):
        if not isinstance(s, list) or len(s) != 7:
            raise ValueError("malformed span")
        name, parent, start, end, kind, error, attrs = s
        if not isinstance(attrs, dict) or type(parent) is not int or \
                not -1 <= parent < len(raw) or parent == i or type(start) is not int or \
                type(end) is not int or not 0 <= start <= end < 1 << 64 or \
                type(kind) is not int or not 0 <= kind <= 4:
            raise ValueError("malformed span")
        clean: dict[str, object] = {}
        for k, v in attrs.items():
            key = mask_card_numbers(str(k))
            if isinstance(v, str):
                clean[key] = mask_card_numbers(v)
            elif isinstance(v, bool):
                clean[key] = v
            elif isinstance(v, int | float) and _card_like(v):
                clean[key] = mask_card_numbers(str(int(v)))  # a card number as a number
            elif isinstance(v, float) or (isinstance(v, int) and -(1 << 63) <= v < 1 << 63):
                clean[key] = v
        spans.append((mask_card_numbers(str(name)), parent, start, end, kind,
                      mask_card_numbers(str(error)) if error else "", clean))
    return trace_id, spans


def _card_like(v: int | float) -> bool:
    """A number that may be a card number: integral, 13-19 digits, Luhn-valid."""
    if isinstance(v, float) and not v.is_integer():
        return False
    n = int(v)
    return 10**12 <= abs(n) < 10**19 and mask_card_numbers(str(abs(n))) != str(abs(n))


class Resources:
    """The resource attributes of a rack's processes (one per process, cached)."""

    def __init__(self, rack_id: str, labels: Mapping[str, str] | None = None):
        self.rack_id = rack_id
        self.labels = dict(labels or {})
        self.scope = ("fluxrig", fluxrig_version())
        self._host = socket.gethostname()
        self._attrs: dict[str, dict[str, str]] = {}

    def of(self, process: str) -> dict[str, str]:
        """The resource attributes of a rack process's spans."""
        r = self._attrs.get(process)
        if r is None:
            r = {"service.name": "fluxrig", "service.version": fluxrig_version(),
                 "service.instance.id": self.rack_id, "fluxrig.rack": self.rack_id,
                 "fluxrig.process": process, "host.name": self._host}
            for k, v in self.labels.items():
                r[f"fluxrig.label.{k}"] = v
            self._attrs[process] = r
        return r


class OtlpEncoder:
    """Trace records -> one OTLP ``ExportTraceServiceRequest`` (``engine.otlpwire``)."""

    def __init__(self, resources: Resources):
        self.resources = resources

    def request(self, traces: Sequence[tuple[str, Sequence[object]]]) -> tuple[bytes, int, int]:
        """(the encoded request, spans in it, malformed records skipped)."""
        by_process: dict[str, list[bytes]] = {}
        bad = 0
        for process, record in traces:
            try:
                trace_id, spans = checked(record)
            except (ValueError, TypeError):
                bad += 1
                continue
            ids = span_ids(trace_id, len(spans))
            out = by_process.setdefault(process, [])
            for i, (name, parent, start, end, kind, error, attrs) in enumerate(spans):
                out.append(span(trace_id, ids[i], ids[parent] if parent >= 0 else b"", name,
                                kind, start, end, attrs, error))  # type: ignore[arg-type]
        groups = [resource_spans(self.resources.of(p), self.resources.scope, spans)
                  for p, spans in by_process.items()]
        return export_request(groups), sum(map(len, by_process.values())), bad


class SpanFactory:
    """Makes the SDK's ``ReadableSpan``s (for its OTLP/HTTP exporter), ids as ``OtlpEncoder``."""

    def __init__(self, resources: Resources):
        self.resources = resources
        self._sdk: dict[str, Resource] = {}
        self._scope = InstrumentationScope(*resources.scope)

    def spans(self, process: str, record: Sequence[object]) -> list[ReadableSpan]:
        """One trace record's spans; a malformed record raises ``ValueError``."""
        trace_id, spans = checked(record)
        resource = self._sdk.get(process)
        if resource is None:
            resource = self._sdk[process] = Resource(self.resources.of(process))
        tid = int.from_bytes(trace_id, "big")
        contexts = [SpanContext(tid, int.from_bytes(sid, "big"), False, _SAMPLED)
                    for sid in span_ids(trace_id, len(spans))]
        return [ReadableSpan(
            name=name, context=contexts[i], parent=contexts[parent] if parent >= 0 else None,
            resource=resource, attributes=attrs, kind=_KINDS[kind],  # type: ignore[arg-type]
            status=Status(StatusCode.ERROR, error) if error else _OK,
            start_time=start, end_time=end, instrumentation_scope=self._scope)
            for i, (name, parent, start, end, kind, error, attrs) in enumerate(spans)]


def span_batch(factory: SpanFactory, traces: Sequence[tuple[str, list[object]]]
               ) -> tuple[list[ReadableSpan], int]:
    """Every trace record's spans, and how many records were malformed (skipped)."""
    spans: list[ReadableSpan] = []
    bad = 0
    for process, record in traces:
        try:
            spans += factory.spans(process, record)
        except (ValueError, TypeError):
            bad += 1
    return spans, bad


class LogShipper:
    """JSON lines for ``fluxrig.logs.<rack>`` under a token bucket (``rate``/``burst``)."""

    def __init__(self, rack_id: str, settings: LogShipSettings):
        self.rack_id = rack_id
        self.settings = settings
        self._tokens = float(settings.burst)
        self._at: float | None = None
        self.dropped = 0  # since the last notice
        self.dropped_total = 0

    def lines(self, records: Sequence[tuple[str, Mapping[str, object]]], now: float) -> bytes:
        """The records allowed at ``now`` (wall-clock seconds) as JSON lines (b"" when
        none), with a notice of the records the bucket dropped since the last one."""
        s = self.settings
        if self._at is not None:
            self._tokens = min(float(s.burst), self._tokens + (now - self._at) * s.rate)
        self._at = now
        out = []
        for process, doc in records:
            if self._tokens < 1.0:
                self.dropped += 1
                self.dropped_total += 1
                continue
            self._tokens -= 1.0
            line = {"ts": doc.get("ts"), "level": doc.get("level"), "logger": doc.get("logger"),
                    "process": process, "rack": self.rack_id,
                    "msg": mask_card_numbers(str(doc.get("msg", "")))}
            if doc.get("exc"):
                line["exc"] = mask_card_numbers(str(doc["exc"]))
            try:
                out.append(orjson.dumps(line))
            except TypeError:  # a lone surrogate: one record lost, counted, not the batch
                self.dropped += 1
                self.dropped_total += 1
        if self.dropped and self._tokens >= 1.0:
            out.append(orjson.dumps({
                "ts": int(now * 1e9), "level": "WARNING",
                "logger": "fluxrig.logship", "process": "telemetry", "rack": self.rack_id,
                "msg": f"{self.dropped} log records dropped (telemetry.logs.rate "
                       f"{s.rate:g}/s)", "dropped": self.dropped}))
            self._tokens -= 1.0
            self.dropped = 0
        return b"\n".join(out) + b"\n" if out else b""


class OtlpSender:
    """Posts span batches to a collector (``telemetry.otlp``) from a thread of its own.

    The SDK's OTLP/HTTP exporter does the protocol (protobuf, headers, retries of 429/5xx
    with backoff within its timeout); a bounded queue between the loop and the thread drops
    what a slow or absent collector cannot take, counted in ``dropped``. ``report`` says how
    it went (telemetry logs it when something failed or was dropped); at a stop what is
    still queued is dropped, counted, rather than holding the rack's stop up.
    """

    def __init__(self, cfg: OtlpConfig, depth: int = 64):
        # the exporter logs each failed attempt; ``report`` says it once a minute instead
        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.ERROR)
        self.endpoint = f"{cfg.endpoint}/v1/traces"
        self.exporter = OTLPSpanExporter(endpoint=self.endpoint, headers=dict(cfg.headers),
                                         timeout=cfg.timeout)
        self.queue: queue.Queue[list[ReadableSpan] | None] = queue.Queue(depth)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._reported = (0, 0)
        self._thread = threading.Thread(target=self._run, name="otlp", daemon=True)
        self._thread.start()

    def submit(self, spans: list[ReadableSpan]) -> None:
        """Queue a batch; dropped (counted) when the queue is full."""
        try:
            self.queue.put_nowait(spans)
        except queue.Full:
            self.dropped += len(spans)

    def report(self) -> str | None:
        """A line saying what failed or was dropped since the last report, or None."""
        now = (self.failed, self.dropped)
        if now == self._reported:
            return None
        self._reported = now
        return (f"otlp export to {self.endpoint}: spans sent={self.sent}, failed={self.failed}, "
                f"dropped={self.dropped} (collector slow or down)")

    def _run(self) -> None:
        while True:
            spans = self.queue.get()
            if spans is None:
                return
            try:
                result = self.exporter.export(spans)
            except Exception:  # the exporter must not take the thread down
                result = SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                self.sent += len(spans)
            else:
                self.failed += len(spans)

    def close(self, timeout: float = 2.0) -> None:
        """Drop what is still queued (counted), let an export in flight end (up to
        ``timeout``), stop the thread."""
        while True:
            try:
                spans = self.queue.get_nowait()
            except queue.Empty:
                break
            if spans is not None:
                self.dropped += len(spans)
        self.queue.put_nowait(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.exporter.shutdown()


__all__ = ["LogShipper", "MAX_TRACES_PER_MESSAGE", "OtlpEncoder", "OtlpSender", "Resources",
           "SpanFactory", "TapReader", "TapRecords", "checked", "span_batch"]
