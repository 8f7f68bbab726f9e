"""The frame: one signal, as a deterministic CBOR map.

A frame is the unit every gear, ring, egress and audit row deals in::

    {"id": h'<16 bytes, UUIDv7>', "ts": <int ns since the Unix epoch>,
     "src": "<where it entered the rack>", "kind": "<what it is, e.g. iso8583.0100>",
     "headers": {<str>: <any>}, "body": <any CBOR value>}

encoded with ``engine.cbor.dumps`` (RFC 8949 §4.2.1), so its bytes are a pure function of its
content: the same frame always hashes, de-duplicates and audits to the same bytes. Text keys
(rather than small ints) cost a few bytes per frame and keep frames readable by any CBOR tool,
which matters for an audit trail that outlives this code.

Ids are UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then a 12-bit counter that keeps ids
from one process strictly increasing within a millisecond (method 1 of §6.2), then 62 random
bits that keep processes apart (``random`` is re-seeded in every forked child).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.cbor import CBORDecodeError, dumps_ordered_map, loads

ID_SIZE = 16
_KEYS = frozenset(("id", "ts", "src", "kind", "headers", "body"))
# The envelope's keys in deterministic order (by encoded length, then bytes); fixed, so
# encode() never sorts them.
_ORDER = ("id", "ts", "src", "body", "kind", "headers")


class FrameError(ValueError):
    """Bytes that are not a frame, or a frame built with invalid fields."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """One signal.

    Attributes:
        id: 16-byte UUIDv7, unique per signal; the de-duplication key downstream.
        ts: creation time, integer nanoseconds since the Unix epoch.
        src: where the signal entered the rack (e.g. ``acq:10.0.0.7:5123``, ``modbus:plc1``).
        kind: what the signal is (e.g. ``iso8583.0100``, ``uns.sample``).
        headers: small metadata map (routing keys, trace ids); values are CBOR values.
        body: the payload, any CBOR-encodable value.
    """

    id: bytes
    ts: int
    src: str
    kind: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    body: Any = None

    def __post_init__(self) -> None:
        if type(self.id) is not bytes or len(self.id) != ID_SIZE:
            raise FrameError(f"invalid frame field: field=id, rule=16 bytes, got={self.id!r}")
        if type(self.ts) is not int or self.ts < 0:
            raise FrameError(f"invalid frame field: field=ts, rule=int >= 0, got={self.ts!r}")
        if type(self.src) is not str:
            raise FrameError(
                f"invalid frame field: field=src, rule=str, got={type(self.src).__name__}"
            )
        if type(self.kind) is not str:
            raise FrameError(
                f"invalid frame field: field=kind, rule=str, got={type(self.kind).__name__}"
            )
        if type(self.headers) is not dict and not isinstance(self.headers, Mapping):
            raise FrameError(
                f"invalid frame field: field=headers, rule=map, got={type(self.headers).__name__}"
            )


def new_frame(
    src: str,
    kind: str,
    body: Any = None,
    headers: Mapping[str, Any] | None = None,
    ts: int | None = None,
) -> Frame:
    """Build a frame with a fresh UUIDv7 id, stamped now unless ``ts`` is given."""
    now = time.time_ns() if ts is None else ts
    return Frame(id=uuid7(now), ts=now, src=src, kind=kind, headers=headers or {}, body=body)


_new = object.__new__
_set = object.__setattr__


def transformed(frame: Frame, kind: str, headers: dict[str, Any], body: Any) -> Frame:
    """``frame`` with a new kind, headers and body: the same signal (id, ts, src), built
    without ``Frame``'s checks, which ``frame`` passed already and a stage's dict of
    headers and text kind cannot fail (a map stage builds one per frame: ~1 µs saved)."""
    out = _new(Frame)
    _set(out, "id", frame.id)
    _set(out, "ts", frame.ts)
    _set(out, "src", frame.src)
    _set(out, "kind", kind)
    _set(out, "headers", headers)
    _set(out, "body", body)
    return out


def encode(frame: Frame) -> bytes:
    """Deterministic CBOR bytes of ``frame``.

    Raises:
        engine.cbor.CBOREncodeError: a header or body value is not CBOR-encodable.
    """
    return dumps_ordered_map(
        _ORDER, (frame.id, frame.ts, frame.src, frame.body, frame.kind, frame.headers)
    )


def encode_parts(id: bytes, ts: int, src: str, kind: str, headers: Mapping[str, Any],
                 body: Any) -> bytes:
    """``encode(Frame(...))`` without building the Frame: for hot paths whose fields are
    correct by construction (a 16-byte id, an int ts, str src and kind, a dict headers).
    Same bytes as ``encode``."""
    return dumps_ordered_map(_ORDER, (id, ts, src, body, kind, headers))


def decode(data: bytes | memoryview, strict: bool = False) -> Frame:
    """Frame from its CBOR bytes.

    Args:
        data: the encoded frame (a ring view works, nothing is kept referencing it).
        strict: also require deterministic encoding (``engine.cbor.loads(strict=True)``).

    Raises:
        FrameError: not CBOR, not a map, missing/extra keys or wrong field types; the message
            names the field. Chained from the CBOR error when there is one.
    """
    try:
        obj = loads(data, strict=strict)
    except CBORDecodeError as exc:
        raise FrameError(f"frame is not valid CBOR: {exc}") from exc
    if type(obj) is not dict:
        raise FrameError(f"frame is not a map: got={type(obj).__name__}")
    if obj.keys() != _KEYS:
        missing = sorted(_KEYS - obj.keys())
        extra = sorted(map(repr, obj.keys() - _KEYS))
        raise FrameError(f"frame keys wrong: missing={missing}, extra={extra}")
    return Frame(
        id=obj["id"],
        ts=obj["ts"],
        src=obj["src"],
        kind=obj["kind"],
        headers=obj["headers"],
        body=obj["body"],
    )


def derive_id(parent: bytes, n: int) -> bytes:
    """A stable 16-byte id for the ``n``-th extra frame derived from frame ``parent``.

    Keeps the parent's UUIDv7 time prefix (so ids still sort by time) and replaces the rest
    by a hash of (parent, n) with the version and variant bits set: still a UUIDv7, and the
    same input replayed after a crash gives the same ids.
    """
    digest = bytearray(hashlib.blake2b(parent + n.to_bytes(4, "big"), digest_size=10).digest())
    digest[0] = 0x70 | (digest[0] & 0x0F)  # byte 6 of the UUID: version 7
    digest[2] = 0x80 | (digest[2] & 0x3F)  # byte 8: RFC 9562 variant 0b10
    return parent[:6] + bytes(digest)


# --- UUIDv7 ------------------------------------------------------------------------------

_last_ms = -1
_counter = 0
_COUNTER_MAX = 0xFFF


def uuid7(ts_ns: int | None = None) -> bytes:
    """A UUIDv7 as 16 bytes, strictly increasing for calls in one process.

    Args:
        ts_ns: the time to encode (ns since epoch); now if None.
    """
    global _last_ms, _counter
    ms = (time.time_ns() if ts_ns is None else ts_ns) // 1_000_000
    if ms > _last_ms:
        _last_ms = ms
        _counter = random.getrandbits(11)  # start in the lower half: room to count up
    else:
        # Same millisecond (or the clock stepped back): count; on overflow borrow the next
        # millisecond rather than lose monotonicity.
        _counter += 1
        if _counter > _COUNTER_MAX:
            _last_ms += 1
            _counter = 0
        ms = _last_ms
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | _counter << 64
        | 0b10 << 62
        | random.getrandbits(62)
    )
    return value.to_bytes(16, "big")


def uuid7_ms(frame_id: bytes) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return int.from_bytes(frame_id[:6], "big")


def path_get(frame: Frame, path: str, default: Any = None) -> Any:
    """Value at ``path`` ("headers.a.b", "body.x", "kind", "src") in ``frame``, or ``default``."""
    head, _, rest = path.partition(".")
    value: Any = getattr(frame, head, default) if head in _KEYS else default
    if not rest:
        return value
    for part in rest.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return default
    return value


def frame_id_of(data: bytes | memoryview) -> bytes:
    """The id of an encoded frame without decoding it.

    Deterministic encoding puts ``"id"`` first (its encoding sorts lowest of the six keys),
    so a frame always starts ``a6 62 69 64 50`` and the 16 id bytes follow at offset 5.

    Raises:
        FrameError: the bytes do not start like a frame.
    """
    if data[:5] != _ID_PREFIX:
        raise FrameError(f"not an encoded frame: prefix={bytes(data[:5]).hex()}")
    return bytes(data[5:21])


_ID_PREFIX = b"\xa6\x62id\x50"  # map(6), text(2) "id", bytes(16)
_TS_PREFIX = b"\x62ts\x1b"  # text(2) "ts", uint64 (every ns timestamp after 1970-01-01T00:00:04)


def frame_ts_of(data: bytes | memoryview) -> int | None:
    """The ``ts`` of an encoded frame without decoding it (None if not at its usual place)."""
    if data[21:25] != _TS_PREFIX:
        return None
    return int.from_bytes(data[25:33], "big")
