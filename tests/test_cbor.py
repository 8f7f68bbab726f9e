"""Tests for engine.cbor: RFC 8949 Appendix A, deterministic order, strict decoding."""

from __future__ import annotations

import datetime
import math
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import cbor
from engine.cbor import CBORDecodeError, CBOREncodeError, NotDeterministicError

INF = float("inf")
NAN = float("nan")

# RFC 8949 Appendix A, preferred serializations: dumps(value) == hex and
# loads(hex) == value, in both modes.
PREFERRED = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (18446744073709551616, "c249010000000000000000"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-18446744073709551617, "c349010000000000000000"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"),
    (INF, "f97c00"),
    (NAN, "f97e00"),
    (-INF, "f9fc00"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (cbor2.undefined, "f7"),
    (cbor2.CBORSimpleValue(16), "f0"),
    (cbor2.CBORSimpleValue(255), "f8ff"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]

# Appendix A tags: cbor2's non-strict decoder applies semantics (tag 0/1 ->
# datetime), so the round trip is pinned for dumps and strict loads only.
TAGS = [
    (cbor2.CBORTag(0, "2013-03-21T20:04:00Z"), "c074323031332d30332d32315432303a30343a30305a"),
    (cbor2.CBORTag(1, 1363896240), "c11a514b67b0"),
    (cbor2.CBORTag(1, 1363896240.5), "c1fb41d452d9ec200000"),
    (cbor2.CBORTag(23, b"\x01\x02\x03\x04"), "d74401020304"),
    (cbor2.CBORTag(24, b"dIETF"), "d818456449455446"),
    (
        cbor2.CBORTag(32, "http://www.example.com"),
        "d82076687474703a2f2f7777772e6578616d706c652e636f6d",
    ),
]

# Appendix A items that are valid CBOR but not deterministic: non-preferred
# floats and indefinite lengths. Strict mode must reject them, with the
# offset of the first offending head.
NOT_DETERMINISTIC = [
    ("fa7f800000", INF, "non-shortest float: offset=0, value=inf, bits=32"),
    ("fa7fc00000", NAN, "non-canonical nan: offset=0, encoding=fa7fc00000"),
    ("faff800000", -INF, "non-shortest float: offset=0, value=-inf, bits=32"),
    ("fb7ff0000000000000", INF, "non-shortest float: offset=0, value=inf, bits=64"),
    ("fb7ff8000000000000", NAN, "non-canonical nan: offset=0, encoding=fb7ff8000000000000"),
    ("fbfff0000000000000", -INF, "non-shortest float: offset=0, value=-inf, bits=64"),
    ("5f42010243030405ff", b"\x01\x02\x03\x04\x05", "indefinite length: offset=0"),
    ("7f657374726561646d696e67ff", "streaming", "indefinite length: offset=0"),
    ("9fff", [], "indefinite length: offset=0"),
    ("9f018202039f0405ffff", [1, [2, 3], [4, 5]], "indefinite length: offset=0"),
    ("9f01820203820405ff", [1, [2, 3], [4, 5]], "indefinite length: offset=0"),
    ("83018202039f0405ff", [1, [2, 3], [4, 5]], "indefinite length: offset=5"),
    ("83019f0203ff820405", [1, [2, 3], [4, 5]], "indefinite length: offset=2"),
    (
        "9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff",
        list(range(1, 26)),
        "indefinite length: offset=0",
    ),
    ("bf61610161629f0203ffff", {"a": 1, "b": [2, 3]}, "indefinite length: offset=0"),
    ("826161bf61626163ff", ["a", {"b": "c"}], "indefinite length: offset=3"),
    ("bf6346756ef563416d7421ff", {"Fun": True, "Amt": -2}, "indefinite length: offset=0"),
]


def same(a: object, b: object) -> bool:
    """Structural equality where NaN equals NaN and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)  # type: ignore[arg-type]
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)  # type: ignore[arg-type]
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) or (  # type: ignore[arg-type]
            a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)  # type: ignore[union-attr,index]
        )
    return a == b


@pytest.mark.parametrize(("value", "hexed"), PREFERRED, ids=[h for _, h in PREFERRED])
def test_appendix_a_preferred_encoding(value: object, hexed: str) -> None:
    assert cbor.dumps(value).hex() == hexed
    data = bytes.fromhex(hexed)
    assert same(cbor.loads(data), value)
    assert same(cbor.loads(data, strict=True), value)


@pytest.mark.parametrize(("tag", "hexed"), TAGS, ids=[h for _, h in TAGS])
def test_appendix_a_tags(tag: cbor2.CBORTag, hexed: str) -> None:
    assert cbor.dumps(tag).hex() == hexed
    assert cbor.loads(bytes.fromhex(hexed), strict=True) == tag


def test_non_strict_loads_applies_cbor2_tag_semantics() -> None:
    expected = datetime.datetime(2013, 3, 21, 20, 4, tzinfo=datetime.timezone.utc)
    assert cbor.loads(bytes.fromhex("c11a514b67b0")) == expected


@pytest.mark.parametrize(
    ("hexed", "value", "message"), NOT_DETERMINISTIC, ids=[h for h, _, _ in NOT_DETERMINISTIC]
)
def test_appendix_a_non_deterministic(hexed: str, value: object, message: str) -> None:
    data = bytes.fromhex(hexed)
    assert same(cbor.loads(data), value)
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(data, strict=True)
    assert str(info.value) == message


def test_mixed_key_map_sorted_by_encoded_key_bytes() -> None:
    value = {1000: 0, "a": 1, -1: 2, b"x": 3, 10: 4}
    # 0a < 1903e8 < 20 < 4178 < 6161, compared byte by byte
    expected = "a5" "0a04" "1903e800" "2002" "417803" "616101"
    assert cbor.dumps(value).hex() == expected
    assert cbor.loads(bytes.fromhex(expected), strict=True) == value
    # cbor2's canonical=True is RFC 7049 length-first: 1000 (3 bytes) goes last
    assert cbor2.dumps(value, canonical=True).hex() == "a50a0420024178036161011903e800"


def test_int_and_float_keys_are_distinct_and_sorted() -> None:
    # 1 and 1.0 are one Python key; 1, 1.5 and -1 are three CBOR keys
    assert cbor.dumps({1.5: "b", -1: "c", 1: "a"}).hex() == "a3" "016161" "206163" "f93e006162"


def test_nested_maps_are_sorted_and_floats_shortened() -> None:
    value = {"zz": {"b": 1.0, "a": [2.5, {"y": None, "x": 1e300}]}, "y": b"\x00"}
    expected = (
        "a2" "61794100" "627a7a" "a2"
        "6161" "82" "f94100" "a2" "6178" "fb7e37e43c8800759c" "6179" "f6"
        "6162" "f93c00"
    )
    assert cbor.dumps(value).hex() == expected


def test_text_keys_sorted_by_utf8_length_then_bytes() -> None:
    # "\u00fc" is one code point but two bytes, so it sorts after "b" and
    # before "ab" (same encoded length, 62 c3 > 62 61)
    value = {"ab": 1, "\u00fc": 2, "b": 3, "\U00010151": 4, "": 5}
    assert cbor.dumps(value).hex() == "a5" "6005" "616203" "62616201" "62c3bc02" "64f090859104"


def test_bytearray_and_memoryview_encode_as_byte_strings() -> None:
    assert cbor.dumps([bytearray(b"ab"), memoryview(b"cd")]).hex() == "82" "426162" "426364"


def test_tag_contents_are_canonicalised() -> None:
    assert cbor.dumps(cbor2.CBORTag(99, {"b": 1.0, "a": 2})).hex() == "d863a2616102" "6162f93c00"


def test_hand_built_bignum_tags_are_normalised() -> None:
    assert cbor.dumps(cbor2.CBORTag(2, b"\x00\x01")).hex() == "01"
    assert cbor.dumps(cbor2.CBORTag(3, b"\x00" + (2**64).to_bytes(9, "big"))).hex() == (
        "c349010000000000000000"
    )


def test_subclasses_encode_as_their_base_type() -> None:
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 7

    value = collections.OrderedDict([("b", Color.RED), ("a", (1.5,))])
    assert cbor.dumps(value).hex() == "a2" "616181f93e00" "616207"


# --- strict mode: one rejection kind per test, message pinned ------------------


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("1817", "non-shortest head: offset=0, major=0, value=23"),
        ("3900ff", "non-shortest head: offset=0, major=1, value=255"),
        ("8219000101", "non-shortest head: offset=1, major=0, value=1"),
        ("d8017f", "non-shortest head: offset=0, major=6, value=1"),
    ],
)
def test_strict_rejects_non_shortest_int_head(hexed: str, message: str) -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex(hexed), strict=True)
    assert str(info.value) == message


def test_strict_rejects_non_shortest_length() -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("8178036162" "63"), strict=True)
    assert str(info.value) == "non-shortest head: offset=1, major=3, value=3"


def test_strict_rejects_non_shortest_float() -> None:
    assert cbor.loads(bytes.fromhex("f93c00"), strict=True) == 1.0
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("fa3f800000"), strict=True)
    assert str(info.value) == "non-shortest float: offset=0, value=1.0, bits=32"


def test_strict_rejects_non_canonical_nan() -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("f97e01"), strict=True)
    assert str(info.value) == "non-canonical nan: offset=0, encoding=f97e01"


def test_strict_rejects_unsorted_keys() -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("a2" "616201" "616102"), strict=True)
    assert str(info.value) == "map keys out of order: offset=4"


def test_strict_rejects_length_first_order() -> None:
    # what cbor2 canonical=True writes for {1000: 0, "a": 1}
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("a2" "616101" "1903e800"), strict=True)
    assert str(info.value) == "map keys out of order: offset=4"


def test_strict_rejects_duplicate_keys() -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("a2" "616101" "616102"), strict=True)
    assert str(info.value) == "duplicate map key: offset=4"


def test_strict_rejects_keys_python_cannot_keep_apart() -> None:
    # 0 and false are distinct CBOR keys but one Python key
    with pytest.raises(CBORDecodeError) as info:
        cbor.loads(bytes.fromhex("a2" "0001" "f402"), strict=True)
    assert str(info.value) == "map keys equal in python: offset=3"


def test_strict_rejects_indefinite_length() -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("9fff"), strict=True)
    assert str(info.value) == "indefinite length: offset=0"


def test_strict_rejects_trailing_bytes() -> None:
    assert cbor.loads(bytes.fromhex("0100")) == 1  # cbor2 ignores them
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex("0100"), strict=True)
    assert str(info.value) == "trailing bytes: offset=1, count=1"


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("c2420001", "bignum with leading zero: offset=0"),
        ("c24101", "bignum fits in 64 bits: offset=0, tag=2"),
    ],
)
def test_strict_rejects_non_preferred_bignum(hexed: str, message: str) -> None:
    with pytest.raises(NotDeterministicError) as info:
        cbor.loads(bytes.fromhex(hexed), strict=True)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("", "truncated input: offset=0, needed=1, available=0"),
        ("19", "truncated input: offset=1, needed=2, available=0"),
        ("a161", "truncated input: offset=2, needed=1, available=0"),
        ("6461", "truncated input: offset=1, needed=4, available=1"),
        ("8201", "truncated input: offset=2, needed=1, available=0"),
    ],
)
def test_strict_truncated_input_is_decode_error(hexed: str, message: str) -> None:
    with pytest.raises(CBORDecodeError) as info:
        cbor.loads(bytes.fromhex(hexed), strict=True)
    assert type(info.value) is CBORDecodeError
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("hexed", "message"),
    [
        ("1c", "reserved additional information: offset=0, major=0, info=28"),
        ("ff", "unexpected break: offset=0"),
        ("1f", "invalid additional information: offset=0, major=0, info=31"),
        ("f818", "invalid simple value: offset=0, value=24"),
        ("62c328", "invalid utf-8: offset=0, position=0"),
        ("c201", "bignum content is not a byte string: offset=1"),
    ],
)
def test_strict_malformed_input_is_decode_error(hexed: str, message: str) -> None:
    with pytest.raises(CBORDecodeError) as info:
        cbor.loads(bytes.fromhex(hexed), strict=True)
    assert type(info.value) is CBORDecodeError
    assert str(info.value) == message


def test_non_strict_wraps_cbor2_errors() -> None:
    with pytest.raises(CBORDecodeError) as info:
        cbor.loads(b"\x19")
    assert type(info.value.__cause__).__module__.startswith("cbor2")
    assert str(info.value).startswith("malformed cbor: reason=")


def test_strict_map_and_array_keys_decode_hashable() -> None:
    value = cbor.loads(bytes.fromhex("a2" "8101" "02" "a10102" "03"), strict=True)
    assert value == cbor2.loads(bytes.fromhex("a2810102a1010203"))
    assert (1,) in value


# --- encode errors ---------------------------------------------------------------


def test_unsupported_type_names_type_and_path() -> None:
    with pytest.raises(CBOREncodeError) as info:
        cbor.dumps({"a": [1, {"x": datetime.date(2024, 1, 2)}]})
    assert str(info.value) == "unsupported type: type=date, path=$.a[1].x"


@pytest.mark.parametrize("value", [{1, 2}, object(), 1j, frozenset()])
def test_unsupported_top_level_types(value: object) -> None:
    with pytest.raises(CBOREncodeError) as info:
        cbor.dumps(value)
    assert str(info.value) == f"unsupported type: type={type(value).__qualname__}, path=$"


def test_distinct_keys_with_equal_encoding_are_rejected() -> None:
    # two NaN objects are two dict keys but both encode as f97e00
    with pytest.raises(CBOREncodeError) as info:
        cbor.dumps({"m": {float("nan"): 1, float("nan"): 2}})
    assert str(info.value) == "duplicate map key: encoding=f97e00, path=$.m"
    # False and simple(20) are different Python keys, both f4
    with pytest.raises(CBOREncodeError):
        cbor.dumps({False: 1, cbor2.CBORSimpleValue(20): 2})


def test_cyclic_structure_is_rejected() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(CBOREncodeError) as info:
        cbor.dumps(loop)
    assert str(info.value) == "nesting too deep or cyclic"


def test_lone_surrogate_is_encode_error() -> None:
    with pytest.raises(CBOREncodeError):
        cbor.dumps({"a": "\ud800"})


# --- properties --------------------------------------------------------------------

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**130), max_value=2**130)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([NAN, INF, -INF, -0.0, 0.0, 65504.0, 5.960464477539063e-8])
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
KEYS = st.text(max_size=6) | st.integers(min_value=-(2**70), max_value=2**70) | st.binary(max_size=6)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
TEXT_KEYED_NO_FLOATS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_round_trip_strict(value: object) -> None:
    data = cbor.dumps(value)
    decoded = cbor.loads(data, strict=True)
    assert same(decoded, value) or _has_nan(value)
    assert cbor.dumps(decoded) == data  # idempotent, and the NaN-safe comparison
    assert same(cbor.loads(data), decoded)


def _has_nan(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(KEYS, LEAVES | st.lists(LEAVES, max_size=3), max_size=10),
    st.randoms(use_true_random=False),
)
def test_insertion_order_does_not_matter(value: dict[object, object], rnd: object) -> None:
    items = list(value.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    assert cbor.dumps(dict(items)) == cbor.dumps(value)


@settings(max_examples=200, deadline=None)
@given(TEXT_KEYED_NO_FLOATS)
def test_text_keyed_maps_match_cbor2_canonical(value: object) -> None:
    # with only text keys, length-first (RFC 7049) and bytewise order agree
    assert cbor.dumps(value) == cbor2.dumps(value, canonical=True)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False))
def test_float_encoding_is_shortest_exact(x: float) -> None:
    data = cbor.dumps(x)
    width = {0xF9: 2, 0xFA: 4, 0xFB: 8}[data[0]]
    assert len(data) == 1 + width
    assert same(cbor.loads(data, strict=True), x)
    if width > 2:
        try:
            assert struct.unpack(">e", struct.pack(">e", x))[0] != x
        except OverflowError:
            pass
