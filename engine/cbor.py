"""Core deterministic CBOR (RFC 8949 §4.2.1) on top of cbor2's native encoder.

Theory of operation
-------------------
Frames must be bit-exact across processes and releases, so every frame body is
encoded with the RFC 8949 §4.2.1 "core deterministic encoding requirements":
preferred serialization (shortest heads, shortest exact float), definite lengths
only, and map keys sorted by the bytewise order of their own encodings.

cbor2's ``canonical=True`` does not give us that: it implements the RFC 7049
"length-first" order (``{1000: .., "a": ..}`` comes out the other way round) and
it is ~5x slower than plain mode. Plain mode, however, already writes shortest
integer and length heads, definite lengths, and keeps dict insertion order.
So :func:`dumps` walks the object in Python only as far as it has to and hands
the native encoder a structure that is *already* canonical:

* dicts are rebuilt in deterministic key order. For all-``str`` keys the order
  of the encodings equals sorting by ``(len(utf8), utf8)`` (the head grows with
  the length and UTF-8 byte order is code point order), so it is computed with
  two C-level sorts and cached per key tuple: a re-encoded ISO 8583 body pays
  one tuple hash, not a sort. Other keys are encoded one by one, sorted by
  their bytes and handed over pre-encoded.
* floats are replaced by a slotted :class:`_Raw` holding their shortest
  encoding; cbor2 knows no such type and calls ``default=``, which writes the
  bytes verbatim. Keys of mixed maps travel the same way.
* containers whose members need no rewrite are passed through untouched.

:func:`loads` has two modes. The default hands the bytes to cbor2's native
decoder (fast, lenient). ``strict=True`` runs the small pure-Python parser
below, which accepts only core deterministic encodings and says what was wrong
and at which byte offset; it is meant for validation, not the hot path.
"""

from __future__ import annotations

import builtins
import math
import struct
from operator import itemgetter
from typing import Any, Final

import cbor2

from engine._native import load as _load_native

# The common subset (None, bool, 64-bit ints, float, str, bytes, list, tuple, str-keyed dict)
# is encoded in C (engine/_cborcore.c); it returns None for anything else, which takes the
# Python path below. The Python path is the reference: tests require identical bytes. Without
# the extension (not built, or FLUXRIG_PURE_PYTHON=1) everything takes the Python path.
_cborcore = _load_native("engine._cborcore")


def _no_fast_path(obj: object) -> bytes | None:
    return None


_fast_encode = _cborcore.encode if _cborcore is not None else _no_fast_path
# Decoding: the C decoder covers what frames hold (ints, strings, lists, dicts, floats,
# bools, null) and returns its FALLBACK object for anything else or anything malformed,
# which then goes to cbor2 — the reference, whose result or error stands. cbor2 6.3 takes
# ~7 µs for a switch event's frame, the C path ~1 µs: the archiver and every stage that
# decodes frames pay the difference per frame.
_FALLBACK: Final = getattr(_cborcore, "FALLBACK", object())
_fast_decode = getattr(_cborcore, "decode", None)

__all__ = [
    "CBORDecodeError",
    "CBOREncodeError",
    "CBORError",
    "NotDeterministicError",
    "dumps",
    "dumps_ordered_map",
    "loads",
]


class CBORError(ValueError):
    """Base class of every error raised by :mod:`engine.cbor`."""


class CBOREncodeError(CBORError):
    """The object cannot be encoded deterministically (type, duplicate key, ...)."""


class CBORDecodeError(CBORError):
    """The input is truncated or not well-formed CBOR."""


class NotDeterministicError(CBORDecodeError):
    """Well-formed CBOR that violates the core deterministic encoding rules."""


# --------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------


class _Raw:
    """Bytes that cbor2 must write verbatim (a float or a pre-encoded map key).

    Identity-hashed on purpose: as a map key each instance is a distinct slot,
    and duplicates have already been rejected by comparing the bytes.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _default(encoder: cbor2.CBOREncoder, value: object) -> None:
    # Only _Raw can get here: _canon rejects every type cbor2 would have to
    # guess about before the native encoder ever sees the object.
    encoder.write(value.raw)  # type: ignore[attr-defined]


class _Unsupported(Exception):
    """Internal: an object of a type we refuse; dumps() locates it afterwards."""

    def __init__(self, obj: object) -> None:
        super().__init__(obj)
        self.obj = obj


class _DuplicateKey(Exception):
    """Internal: two keys of one map encode to the same bytes."""

    def __init__(self, mapping: object, encoded: bytes) -> None:
        super().__init__(mapping, encoded)
        self.mapping = mapping
        self.encoded = encoded


_NoneType: Final = type(None)
_UndefinedType: Final = type(cbor2.undefined)

# Types cbor2's plain mode already writes deterministically, member for member.
_LEAF_TYPES: Final = frozenset({str, bytes, int, bool, _NoneType})
_STR_ONLY: Final = frozenset({str})

_HALF: Final = struct.Struct(">Be")  # 0xf9 + IEEE 754 binary16
_SINGLE: Final = struct.Struct(">Bf")  # 0xfa + binary32
_DOUBLE: Final = struct.Struct(">Bd")  # 0xfb + binary64
_CANONICAL_NAN: Final = b"\xf9\x7e\x00"  # RFC 8949 §4.2.2: quiet NaN, half width

# Key tuple (insertion order) -> (order, getter): the deterministic order and an
# itemgetter fetching the values in it, or (None, None) when the insertion
# order already is the deterministic one. Bounded by clearing: the working set
# of a pipeline is a handful of message layouts.
_ORDER_CACHE: dict[tuple[str, ...], tuple[Any, Any]] = {}
_ORDER_CACHE_MAX: Final = 4096
_SORTED: Final = (None, None)


def _float_bytes(x: float) -> bytes:
    """Return the shortest encoding of ``x`` that decodes to exactly ``x``."""
    if x != x:
        return _CANONICAL_NAN
    try:
        raw = _HALF.pack(0xF9, x)
        if _HALF.unpack(raw)[1] == x:
            return raw
    except OverflowError:  # |x| beyond float16's range
        pass
    try:
        raw = _SINGLE.pack(0xFA, x)
        if _SINGLE.unpack(raw)[1] == x:
            return raw
    except OverflowError:
        pass
    return _DOUBLE.pack(0xFB, x)


def _text_order(keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """Deterministic order of text keys, or None if ``keys`` is already in it."""
    if "".join(keys).isascii():
        # length is byte length; stable sort by len over a lexicographic sort
        # gives (len, bytes) order without a Python-level key function
        order = tuple(sorted(sorted(keys), key=len))
    else:
        order = tuple(sorted(keys, key=_utf8_sort_key))
    return None if order == keys else order


def _utf8_sort_key(key: str) -> tuple[int, str]:
    # code point order == UTF-8 byte order, so the str itself breaks ties
    return (len(key.encode("utf-8")), key)


def _canon_dict(d: dict[Any, Any]) -> object:
    keys = tuple(d)
    entry = _ORDER_CACHE.get(keys)
    if entry is None:
        if not _STR_ONLY.issuperset(map(type, keys)):
            return _canon_mixed_map(d)
        order = _text_order(keys)
        entry = _SORTED if order is None else (order, itemgetter(*order))
        if len(_ORDER_CACHE) >= _ORDER_CACHE_MAX:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[keys] = entry
    order, getter = entry
    values = d.values() if order is None else getter(d)
    try:
        # all-text values (the ISO 8583 case) need no rewrite; join is the
        # cheapest C-level proof of that
        "".join(values)
        leaves = True
    except TypeError:
        leaves = _LEAF_TYPES.issuperset(map(type, values))
    if order is None:
        return d if leaves else {k: _canon(v) for k, v in d.items()}
    if leaves:
        return dict(zip(order, values))
    return {k: _canon(v) for k, v in zip(order, values)}


def _canon_mixed_map(d: Any) -> dict[_Raw, object]:
    # Keys are encoded on their own (recursively deterministic) and sorted by
    # those bytes; equal bytes from distinct Python keys (two NaN objects,
    # False and CBORSimpleValue(20), ...) would make an invalid map.
    items = sorted(((_encode(k), v) for k, v in d.items()), key=itemgetter(0))
    for i in range(1, len(items)):
        if items[i][0] == items[i - 1][0]:
            raise _DuplicateKey(d, items[i][0])
    return {_Raw(kb): _canon(v) for kb, v in items}


def _canon_seq(seq: Any) -> object:
    if _LEAF_TYPES.issuperset(map(type, seq)):
        return seq
    return [_canon(v) for v in seq]


def _canon_tag(tag: cbor2.CBORTag) -> object:
    value = tag.value
    if tag.tag in (2, 3) and type(value) is bytes:
        # a hand-built bignum may have leading zeros or fit in 64 bits; the
        # int path gives the one preferred serialization of the same number
        n = int.from_bytes(value, "big")
        return n if tag.tag == 2 else -1 - n
    return cbor2.CBORTag(tag.tag, _canon(value))


def _canon_float(x: float) -> _Raw:
    return _Raw(_float_bytes(x))


def _identity(x: object) -> object:
    return x


_HANDLERS: Final[dict[type, Any]] = {
    dict: _canon_dict,
    list: _canon_seq,
    tuple: _canon_seq,
    float: _canon_float,
    bytearray: bytes,
    # cbor2 plain mode writes a memoryview as an array of ints
    memoryview: lambda m: m.tobytes(),
    cbor2.CBORTag: _canon_tag,
    cbor2.CBORSimpleValue: _identity,
    _UndefinedType: _identity,
}

# Subclasses (IntEnum, str-mixin enums, OrderedDict, defaultdict, ...) are
# reduced to their builtin base so cbor2 never applies its own rules to them.
_SUBCLASS_BASES: Final[tuple[tuple[type, Any], ...]] = (
    (bool, bool),
    (int, int.__int__),
    (float, lambda x: _canon_float(float.__float__(x))),
    (str, str.__str__),
    (bytes, bytes),
    (bytearray, bytes),
    (dict, lambda d: _canon_mixed_map(d)),
    (list, lambda s: _canon_seq(list(s))),
    (tuple, lambda s: _canon_seq(tuple(s))),
)


def _canon(obj: object) -> object:
    t = type(obj)
    if t in _LEAF_TYPES:
        return obj
    handler = _HANDLERS.get(t)
    if handler is not None:
        return handler(obj)
    frozen = getattr(cbor2, "frozendict", None)
    if frozen is not None and t is frozen:
        return _canon_mixed_map(obj)
    for base, convert in _SUBCLASS_BASES:
        if isinstance(obj, base):
            return convert(obj)
    raise _Unsupported(obj)


def _encode(obj: object) -> bytes:
    if type(obj) is dict:
        canon = _canon_dict(obj)
    else:
        canon = _canon(obj)
    return cbor2.dumps(canon, default=_default)


def _path_to(root: object, target: object) -> str | None:
    """Find ``target`` (by identity) inside ``root``; only used to word errors."""
    stack: list[tuple[object, str]] = [(root, "$")]
    seen: set[int] = set()
    while stack:
        obj, path = stack.pop()
        if obj is target:
            return path
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict) or (
            getattr(cbor2, "frozendict", None) is not None
            and isinstance(obj, cbor2.frozendict)
        ):
            for k, v in reversed(list(obj.items())):
                kp = f"{path}.{k}" if type(k) is str else f"{path}[{k!r}]"
                stack.append((v, kp))
                stack.append((k, f"{kp}<key>"))
        elif isinstance(obj, (list, tuple)):
            for i in reversed(range(len(obj))):
                stack.append((obj[i], f"{path}[{i}]"))
        elif isinstance(obj, cbor2.CBORTag):
            stack.append((obj.value, f"{path}<tag {obj.tag}>"))
    return None


def dumps(obj: object) -> bytes:
    """Encode ``obj`` with the RFC 8949 §4.2.1 core deterministic encoding.

    Equal data always gives equal bytes: preferred serialization (shortest
    heads, floats in the shortest of float16/32/64 that is exact, NaN as
    ``f97e00``), definite lengths, map keys in bytewise order of their
    encodings, whatever the dict insertion order.

    Args:
        obj: None, bool, int (any size; beyond 64 bits a tag 2/3 bignum),
            float, str, bytes/bytearray/memoryview, list/tuple, dict (any
            supported hashable keys), ``cbor2.CBORTag``,
            ``cbor2.CBORSimpleValue`` or ``cbor2.undefined``, nested freely.
            Subclasses of the builtins are encoded as their base type.

    Returns:
        The encoded bytes.

    Raises:
        CBOREncodeError: unsupported type (the message gives its JSONPath-like
            location), two map keys with the same encoding, nesting too deep
            or cyclic, or a value cbor2 rejects (e.g. lone surrogates in text).
    """
    fast = _fast_encode(obj)
    if fast is not None:
        return fast
    return _dumps_checked(obj, _canon_dict if type(obj) is dict else _canon)


def dumps_ordered_map(keys: tuple[str, ...], values: tuple[object, ...]) -> bytes:
    """Encode the map ``zip(keys, values)`` whose text ``keys`` are already distinct and in
    deterministic order (``(utf-8 length, text)``), skipping the sort ``dumps`` would do.

    For fixed envelopes such as the frame, whose keys never change; the values get the full
    deterministic treatment. Same errors as ``dumps``.
    """
    d = dict(zip(keys, values))
    fast = _fast_encode(d)
    if fast is not None:
        return fast
    return _dumps_checked(d, _canon_values)


def _canon_values(d: dict[str, object]) -> object:
    return {k: (v if type(v) in _LEAF_TYPES else _canon(v)) for k, v in d.items()}


def _dumps_checked(obj: object, prepare: Any) -> bytes:
    # One place maps our internal signals and cbor2's errors to CBOREncodeError.
    try:
        return cbor2.dumps(prepare(obj), default=_default)
    except _Unsupported as exc:
        path = _path_to(obj, exc.obj)
        msg = f"unsupported type: type={type(exc.obj).__qualname__}, path={path}"
        raise CBOREncodeError(msg) from None
    except _DuplicateKey as exc:
        path = _path_to(obj, exc.mapping)
        msg = f"duplicate map key: encoding={exc.encoded.hex()}, path={path}"
        raise CBOREncodeError(msg) from None
    except RecursionError:
        raise CBOREncodeError("nesting too deep or cyclic") from None
    except (cbor2.CBOREncodeError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise CBOREncodeError(f"cannot encode value: reason={exc}") from exc


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------


def loads(data: bytes | bytearray | memoryview, strict: bool = False) -> Any:
    """Decode one CBOR data item.

    Args:
        data: the encoded item.
        strict: False decodes with cbor2's native decoder: any well-formed
            CBOR is accepted, trailing bytes are ignored, and cbor2's semantic
            tags apply (tag 1 -> datetime, 258 -> set, ...). True accepts only
            the core deterministic encoding of exactly one item; tags other
            than bignums (2/3) come back as ``cbor2.CBORTag``.

    Returns:
        The decoded value; maps as dict (``cbor2.frozendict`` and tuple when
        used as map keys), simple values as ``cbor2.CBORSimpleValue`` or
        ``cbor2.undefined``.

    Raises:
        NotDeterministicError: (strict only) well-formed but not the
            deterministic encoding; the message names the rule and the offset.
        CBORDecodeError: truncated or malformed input.
    """
    if strict:
        return _StrictDecoder(bytes(data)).decode()
    if _fast_decode is not None:
        value = _fast_decode(data)
        if value is not _FALLBACK:
            return value
    try:
        return cbor2.loads(data)
    except cbor2.CBORError as exc:
        raise CBORDecodeError(f"malformed cbor: reason={exc}") from exc
    except RecursionError:
        raise CBORDecodeError("nesting too deep") from None


# Smallest value that needs additional information 24..27 (1, 2, 4, 8 bytes).
_MIN_FOR_INFO: Final = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x100000000}
_MAX_DEPTH: Final = 400  # cbor2's default max_depth
_FROZENDICT: Final = getattr(cbor2, "frozendict", None) or getattr(
    builtins, "frozendict", None
)


class _StrictDecoder:
    """Recursive-descent parser that rejects anything non-deterministic.

    Offsets in messages are those of the first byte of the offending head (or
    key, for ordering errors), counted from the start of ``data``.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def decode(self) -> Any:
        value = self._item(0, False)
        if self.pos != len(self.data):
            raise NotDeterministicError(
                f"trailing bytes: offset={self.pos}, count={len(self.data) - self.pos}"
            )
        return value

    def _take(self, n: int) -> bytes:
        start = self.pos
        end = start + n
        if end > len(self.data):
            raise CBORDecodeError(
                f"truncated input: offset={start}, needed={n}, "
                f"available={len(self.data) - start}"
            )
        self.pos = end
        return self.data[start:end]

    def _item(self, depth: int, immutable: bool) -> Any:
        if depth > _MAX_DEPTH:
            raise CBORDecodeError(
                f"nesting too deep: offset={self.pos}, max_depth={_MAX_DEPTH}"
            )
        start = self.pos
        initial = self._take(1)[0]
        major = initial >> 5
        info = initial & 0x1F

        if major == 7:
            return self._simple_or_float(start, info)

        if info < 24:
            arg = info
        elif info <= 27:
            arg = int.from_bytes(self._take(1 << (info - 24)), "big")
            if arg < _MIN_FOR_INFO[info]:
                raise NotDeterministicError(
                    f"non-shortest head: offset={start}, major={major}, value={arg}"
                )
        elif info == 31:
            if major in (2, 3, 4, 5):
                raise NotDeterministicError(f"indefinite length: offset={start}")
            raise CBORDecodeError(
                f"invalid additional information: offset={start}, major={major}, info=31"
            )
        else:
            raise CBORDecodeError(
                f"reserved additional information: offset={start}, major={major}, "
                f"info={info}"
            )

        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            raw = self._take(arg)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CBORDecodeError(
                    f"invalid utf-8: offset={start}, position={exc.start}"
                ) from None
        if major == 4:
            items = [self._item(depth + 1, immutable) for _ in range(arg)]
            return tuple(items) if immutable else items
        if major == 5:
            return self._map(start, arg, depth, immutable)
        return self._tag(start, arg, depth, immutable)

    def _map(self, start: int, count: int, depth: int, immutable: bool) -> Any:
        result: dict[Any, Any] = {}
        previous = b""
        for i in range(count):
            key_start = self.pos
            key = self._item(depth + 1, True)
            encoded = self.data[key_start : self.pos]
            if i:
                if encoded == previous:
                    raise NotDeterministicError(f"duplicate map key: offset={key_start}")
                if encoded < previous:
                    raise NotDeterministicError(
                        f"map keys out of order: offset={key_start}"
                    )
            previous = encoded
            try:
                collides = key in result
            except TypeError:
                raise CBORDecodeError(f"unhashable map key: offset={key_start}") from None
            if collides:
                # distinct CBOR keys that Python merges (0 and false, 1 and 1.0)
                raise CBORDecodeError(f"map keys equal in python: offset={key_start}")
            result[key] = self._item(depth + 1, immutable)
        if immutable and _FROZENDICT is not None:
            return _FROZENDICT(result)
        return result

    def _tag(self, start: int, number: int, depth: int, immutable: bool) -> Any:
        if number not in (2, 3):
            return cbor2.CBORTag(number, self._item(depth + 1, immutable))
        content_start = self.pos
        content = self._item(depth + 1, immutable)
        if type(content) is not bytes:
            raise CBORDecodeError(
                f"bignum content is not a byte string: offset={content_start}"
            )
        if content[:1] == b"\x00":
            raise NotDeterministicError(f"bignum with leading zero: offset={start}")
        n = int.from_bytes(content, "big")
        if n <= 0xFFFFFFFFFFFFFFFF:
            raise NotDeterministicError(
                f"bignum fits in 64 bits: offset={start}, tag={number}"
            )
        return n if number == 2 else -1 - n

    def _simple_or_float(self, start: int, info: int) -> Any:
        if info < 20:
            return cbor2.CBORSimpleValue(info)
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 23:
            return cbor2.undefined
        if info == 24:
            value = self._take(1)[0]
            if value < 32:
                # RFC 8949 §3.3: not well-formed, not merely non-preferred
                raise CBORDecodeError(
                    f"invalid simple value: offset={start}, value={value}"
                )
            return cbor2.CBORSimpleValue(value)
        if info in (25, 26, 27):
            raw = self.data[start : start + 1] + self._take(1 << (info - 24))
            fmt = _HALF if info == 25 else _SINGLE if info == 26 else _DOUBLE
            value = fmt.unpack(raw)[1]
            if math.isnan(value):
                if raw != _CANONICAL_NAN:
                    raise NotDeterministicError(
                        f"non-canonical nan: offset={start}, encoding={raw.hex()}"
                    )
            elif _float_bytes(value) != raw:
                raise NotDeterministicError(
                    f"non-shortest float: offset={start}, value={value!r}, "
                    f"bits={8 * (len(raw) - 1)}"
                )
            return value
        if info == 31:
            raise CBORDecodeError(f"unexpected break: offset={start}")
        raise CBORDecodeError(
            f"reserved additional information: offset={start}, major=7, info={info}"
        )
