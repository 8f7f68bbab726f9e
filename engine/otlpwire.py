"""OTLP trace requests written straight from tap records, in protobuf wire format.

Why by hand: the OpenTelemetry SDK's encoder (``encode_spans`` over ``ReadableSpan``s) costs
~18 µs per span here and building ``opentelemetry-proto`` messages ~13 µs: 130-230 µs for a
switch transaction's ten spans, so telemetry could export a few thousand traces a second on
a whole CPU. The messages we send are a small, fixed subset of OTLP (``ExportTraceService
Request`` -> ``ResourceSpans`` -> ``ScopeSpans`` -> ``Span`` with attributes and status),
and their wire format is a few rules (protobuf encoding: varints, length-delimited fields,
fixed64 times). Attribute pairs repeat from one transaction to the next (``iso8583.mti``
``0100``), so their encoded bytes are cached. Tests decode what this writes with
``opentelemetry-proto``'s own classes and compare it with messages built by them.

Field numbers are those of ``opentelemetry/proto/trace/v1/trace.proto`` and
``common/v1/common.proto`` (OTLP 1.x, stable).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Final

_FIXED64: Final = struct.Struct("<Q")
_TIMES: Final = struct.Struct("<BQBQ")  # tag 7 + start, tag 8 + end (fixed64 each)
_DOUBLE: Final = struct.Struct("<d")
# field 16 (fixed32): bit 8 "is-remote known", bit 9 clear: a local parent (as the SDK writes)
_FLAGS: Final = b"\x85\x01" + struct.pack("<I", 0x100)
_STATUS_UNSET: Final = b"\x7a\x00"  # field 15, an empty Status (as the SDK writes)
STATUS_ERROR: Final = 2


def _varint_of(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL: Final = [_varint_of(i) for i in range(1 << 14)]  # lengths and tags: one lookup
_TAGS: Final = [_varint_of(n << 3 | 2) for n in range(16)]  # length-delimited field tags


def _varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 16384 else _varint_of(n)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages)."""
    n = len(payload)
    return _TAGS[number] + (_SMALL[n] if n < 16384 else _varint_of(n)) + payload


def key_value(key: str, value: str | bool | int | float) -> bytes:
    """One encoded ``KeyValue`` (cached: attribute pairs repeat)."""
    # the type is part of the cache key: 0, 0.0 and False are equal keys
    return _key_value(key, _KINDS.get(type(value), "str"), value)


_KINDS: Final[dict[type, str]] = {bool: "bool", int: "int", float: "float"}


@lru_cache(maxsize=4096)
def _key_value(key: str, kind: str, value: str | bool | int | float) -> bytes:
    if kind == "bool":
        any_value = b"\x10" + (b"\x01" if value else b"\x00")
    elif kind == "int":
        any_value = b"\x18" + _varint(value)  # type: ignore[arg-type]
    elif kind == "float":
        any_value = b"\x21" + _DOUBLE.pack(value)
    else:
        any_value = _field(1, str(value).encode())
    return _field(1, key.encode()) + _field(2, any_value)


@lru_cache(maxsize=1024)
def _name(name: str) -> bytes:
    return _field(5, name.encode())


def span_ids(trace_id: bytes, count: int) -> list[bytes]:
    """The span ids of a trace's spans: derived from the trace id and the position, so a
    record exported twice gives the same ids (never the invalid all-zero id)."""
    out = []
    for i in range(count):
        sid = hashlib.blake2b(trace_id + i.to_bytes(2, "big"), digest_size=8).digest()
        out.append(sid if any(sid) else b"\x00" * 7 + b"\x01")
    return out


def span(trace_id: bytes, span_id: bytes, parent_id: bytes, name: str, kind: int,
         start_ns: int, end_ns: int, attributes: Mapping[str, str | bool | int | float],
         error: str) -> bytes:
    """One encoded ``Span`` (``kind`` as OpenTelemetry numbers it in the API: 0 internal ..
    4 consumer; the wire's enum is one more)."""
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if parent_id:
        parts += [b"\x22\x08", parent_id]
    parts += [_name(name), b"\x30", _varint(kind + 1), _TIMES.pack(0x39, start_ns, 0x41, end_ns)]
    for k, v in attributes.items():
        parts.append(_field(9, key_value(k, v)))
    if error:
        parts.append(_field(15, _field(2, error.encode()) + b"\x18" + _varint(STATUS_ERROR)))
    else:
        parts.append(_STATUS_UNSET)
    parts.append(_FLAGS)
    return b"".join(parts)


def resource_spans(resource: Mapping[str, str], scope: tuple[str, str],
                   spans: Sequence[bytes]) -> bytes:
    """One encoded ``ResourceSpans``: a resource, one scope, its spans."""
    res = b"".join(_field(1, key_value(k, v)) for k, v in resource.items())
    sc = _field(1, scope[0].encode()) + _field(2, scope[1].encode())
    scope_spans = _field(1, sc) + b"".join(_field(2, s) for s in spans)
    return _field(1, res) + _field(2, scope_spans)


def export_request(groups: Sequence[bytes]) -> bytes:
    """An encoded ``ExportTraceServiceRequest`` of ``ResourceSpans`` groups."""
    return b"".join(_field(1, g) for g in groups)


__all__ = ["export_request", "key_value", "resource_spans", "span", "span_ids"]
