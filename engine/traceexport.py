"""Telemetry's side of the signal tap: tap records -> OpenTelemetry spans and JSON log lines.

Theory of operation
-------------------
The telemetry process (the only rack process that imports the OpenTelemetry SDK, and only
after the fork: its threads and locks do not survive one) polls every process's tap ring
(``engine.tap``) a few times a second:

* ``TapReader`` maps the tap rings named in ``state.json`` and returns the records waiting,
  copied, then releases them to their writers;
* ``span_batch`` turns trace records into the SDK's ``ReadableSpan``s: the trace id is the
  record's (a transaction's id), span ids are derived from it and the span's position (so a
  record exported twice gives the same spans), the resource names the rack and process;
* ``otlp_bytes`` encodes spans as an OTLP ``ExportTraceServiceRequest`` (protobuf, the SDK's
  own encoder), which telemetry publishes on ``fluxrig.traces.<rack>`` (core NATS: fire and
  forget, like the stats) and, with ``telemetry.otlp``, the ``OtlpSender`` posts to a
  collector from a thread of its own (a slow collector costs dropped batches, counted,
  never a stalled loop);
* ``LogShipper`` turns log records into JSON lines for ``fluxrig.logs.<rack>`` under a
  rack-wide token bucket (``rate``, ``burst``); what it drops it says in a notice record.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
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


def _span_id(trace_id: bytes, index: int) -> int:
    sid = int.from_bytes(hashlib.blake2b(trace_id + index.to_bytes(2, "big"),
                                         digest_size=8).digest(), "big")
    return sid or 1  # 0 is the invalid span id


class SpanFactory:
    """Makes ``ReadableSpan``s for one rack (resources cached per process)."""

    def __init__(self, rack_id: str, labels: Mapping[str, str] | None = None):
        self.rack_id = rack_id
        self.labels = dict(labels or {})
        self._resources: dict[str, Resource] = {}
        self._scope = InstrumentationScope("fluxrig", fluxrig_version())
        self._host = socket.gethostname()

    def resource(self, process: str) -> Resource:
        """The resource of a rack process's spans."""
        r = self._resources.get(process)
        if r is None:
            attrs: dict[str, str] = {"service.name": "fluxrig",
                                     "service.version": fluxrig_version(),
                                     "service.instance.id": self.rack_id,
                                     "fluxrig.rack": self.rack_id, "fluxrig.process": process,
                                     "host.name": self._host}
            for k, v in self.labels.items():
                attrs[f"fluxrig.label.{k}"] = v
            r = self._resources[process] = Resource(attrs)
        return r

    def spans(self, process: str, record: Sequence[object]) -> list[ReadableSpan]:
        """One trace record's spans; a malformed record raises ``ValueError``."""
        trace_id, keep, raw = record
        if not isinstance(trace_id, bytes) or len(trace_id) != 16 or not isinstance(raw, list):
            raise ValueError("not a trace record")
        tid = int.from_bytes(trace_id, "big")
        resource = self.resource(process)
        contexts = [SpanContext(tid, _span_id(trace_id, i), False, _SAMPLED)
                    for i in range(len(raw))]
        out = []
        for i, s in enumerate(raw):
            name, parent, start, end, kind, error, attrs = s
            if not isinstance(attrs, dict) or not isinstance(parent, int) or \
                    not -1 <= parent < len(raw) or parent == i:
                raise ValueError("malformed span")
            clean = {str(k): (mask_card_numbers(v) if isinstance(v, str) else v)
                     for k, v in attrs.items() if isinstance(v, str | int | float | bool)}
            out.append(ReadableSpan(
                name=mask_card_numbers(str(name)), context=contexts[i],
                parent=contexts[parent] if parent >= 0 else None, resource=resource,
                attributes=clean, kind=_KINDS[kind] if 0 <= kind < 5 else SpanKind.INTERNAL,
                status=Status(StatusCode.ERROR, mask_card_numbers(str(error))) if error
                else _OK,
                start_time=int(start), end_time=int(end), instrumentation_scope=self._scope))
        return out


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


def otlp_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    """An OTLP ``ExportTraceServiceRequest`` (protobuf) holding ``spans``."""
    return encode_spans(spans).SerializeToString()


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
            out.append(orjson.dumps(line))
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
    what a slow or absent collector cannot take, counted in ``dropped``.
    """

    def __init__(self, cfg: OtlpConfig, depth: int = 64):
        self.exporter = OTLPSpanExporter(endpoint=f"{cfg.endpoint}/v1/traces",
                                         headers=dict(cfg.headers), timeout=cfg.timeout)
        self.queue: queue.Queue[list[ReadableSpan] | None] = queue.Queue(depth)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="otlp", daemon=True)
        self._thread.start()

    def submit(self, spans: list[ReadableSpan]) -> None:
        """Queue a batch; dropped (counted) when the queue is full."""
        try:
            self.queue.put_nowait(spans)
        except queue.Full:
            self.dropped += len(spans)

    def _run(self) -> None:
        while True:
            spans = self.queue.get()
            if spans is None:
                return
            try:
                result = self.exporter.export(spans)
            except Exception as exc:  # the exporter must not take the thread down
                result = SpanExportResult.FAILURE
                log.warning("otlp export failed: error=%r", exc)
            if result is SpanExportResult.SUCCESS:
                self.sent += len(spans)
            else:
                self.failed += len(spans)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop the thread."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self.exporter.shutdown()


__all__ = ["LogShipper", "MAX_TRACES_PER_MESSAGE", "OtlpSender", "SpanFactory", "TapReader",
           "TapRecords", "otlp_bytes", "span_batch"]
