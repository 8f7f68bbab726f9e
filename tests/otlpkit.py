"""OTLP trace requests and log batches as a rack sends them, built with the
opentelemetry-proto classes only (no code of the Mixer's store): switch-like transactions,
one trace each, a root span and nine children."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import (
    ResourceSpans,
    ScopeSpans,
    Span,
    Status,
)

CHILDREN = ("acquirer receive", "validate", "coat check", "route", "journal", "issuer send",
            "issuer answer", "audit write", "respond")


def uuid7(ts_ns: int) -> bytes:
    """A UUIDv7 (48-bit ms time, version 7, variant 10, random rest)."""
    raw = bytearray((ts_ns // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return bytes(raw)


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


@dataclass
class Txn:
    """One switch transaction's trace: what a test asserts on."""

    trace_id: bytes
    start_ns: int
    token: str
    terminal: str
    stan: str
    de39: str = "00"
    outcome: str = "answered"
    keep: str = "sampled"
    mti: str = "0200"
    extra: dict[str, object] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)

    def offsets_ms(self) -> dict[str, tuple[float, float]]:
        """name -> (start offset, duration) in ms."""
        return {s.name: ((s.start_time_unix_nano - self.start_ns) / 1e6,
                         (s.end_time_unix_nano - s.start_time_unix_nano) / 1e6)
                for s in self.spans}


def switch_txn(start_ns: int, token: str, terminal: str, stan: str, *,
               step_us: int = 1000, rng: random.Random | None = None, **kw: object) -> Txn:
    """A root span ``iso8583 0200`` (SERVER) and its nine children, ``step_us`` apart, each
    lasting ``step_us`` (issuer answer: CLIENT with server.address/port)."""
    rng = rng or random.Random()
    t = Txn(trace_id=uuid7(start_ns), start_ns=start_ns, token=token, terminal=terminal,
            stan=stan, **kw)  # type: ignore[arg-type]
    root_id = rng.randbytes(8)
    end = start_ns + (len(CHILDREN) + 1) * step_us * 1000
    attrs = {"iso8583.mti": t.mti, "iso8583.de39": t.de39, "iso8583.stan": stan,
             "iso8583.terminal": terminal, "fluxrig.token": token,
             "iso8583.pan": token[:6] + "******" + token[-4:], "fluxrig.issuer": "visa",
             "fluxrig.route": "visa-1", "fluxrig.outcome": t.outcome, "fluxrig.keep": t.keep,
             **t.extra}
    t.spans.append(Span(trace_id=t.trace_id, span_id=root_id, name=f"iso8583 {t.mti}",
                        kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=start_ns,
                        end_time_unix_nano=end,
                        attributes=[kv(k, v) for k, v in attrs.items()],
                        status=Status(code=Status.STATUS_CODE_OK)))
    for i, name in enumerate(CHILDREN):
        s0 = start_ns + (i + 1) * step_us * 1000 // 2
        a = [kv("server.address", "10.0.0.9"), kv("server.port", 9100)] \
            if name.startswith("issuer") else []
        t.spans.append(Span(trace_id=t.trace_id, span_id=rng.randbytes(8),
                            parent_span_id=root_id, name=name,
                            kind=Span.SPAN_KIND_CLIENT if name == "issuer answer"
                            else Span.SPAN_KIND_INTERNAL,
                            start_time_unix_nano=s0, end_time_unix_nano=s0 + step_us * 1000,
                            attributes=a))
    return t


def request(spans: list[Span], rack: str, process: str = "pay.switch.0") -> bytes:
    """An ``ExportTraceServiceRequest`` with the rack's resource attributes."""
    res = Resource(attributes=[kv("service.name", "fluxrig"), kv("service.instance.id", rack),
                               kv("fluxrig.rack", rack), kv("fluxrig.process", process),
                               kv("host.name", "h1")])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=res, scope_spans=[ScopeSpans(spans=spans)])]).SerializeToString()


def log_batch(rack: str, records: list[dict[str, object]]) -> bytes:
    """JSON lines as a rack's log shipper sends them."""
    lines = []
    for r in records:
        doc = {"ts": time.time_ns(), "level": "INFO", "logger": "fluxrig.iso.switch",
               "process": "pay.switch.0", "rack": rack, **r}
        lines.append(json.dumps(doc))
    return ("\n".join(lines) + "\n").encode()
