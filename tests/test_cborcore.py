"""engine._cborcore (the C fast path of engine.cbor.dumps) against the Python reference path."""

from __future__ import annotations

import math

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import cbor
from engine._cborcore import encode as fast


def reference(obj):
    """The pure-Python deterministic encoder (engine.cbor without its C fast path)."""
    return cbor._dumps_checked(obj, cbor._canon_dict if type(obj) is dict else cbor._canon)


common = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=6) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=6), kids, max_size=6),
    max_leaves=40,
)


@settings(max_examples=1500, deadline=None)
@given(common)
def test_fast_path_gives_the_reference_bytes(obj):
    out = fast(obj)
    assert out is not None
    assert out == reference(obj)


def test_fast_path_declines_what_it_does_not_cover():
    for obj in (2**64, -(2**64) - 1, {1: "int key"}, bytearray(b"x"), cbor2.CBORTag(1, 2),
                [1, {b"k": 1}], "\ud800", {"\ud800": 1}, True.__class__.__mro__):
        assert fast(obj) is None, obj
    # and dumps still handles them through the Python path
    assert cbor.dumps(2**64) == reference(2**64)
    assert cbor.dumps({1: "int key", "a": 2}) == reference({1: "int key", "a": 2})


def test_float_widths_and_specials():
    table = [(0.0, "f90000"), (-0.0, "f98000"), (1.5, "f93e00"), (65504.0, "f97bff"),
             (100000.0, "fa47c35000"), (1.1, "fb3ff199999999999a"), (math.inf, "f97c00"),
             (-math.inf, "f9fc00"), (5.960464477539063e-8, "f90001"),
             (1e300, "fb7e37e43c8800759c")]  # pairs, not a dict: 0.0 == -0.0 as keys
    for value, hexed in table:
        assert fast(value).hex() == hexed, value
    assert fast(math.nan).hex() == "f97e00"
    assert fast(float("-nan")).hex() == "f97e00"


def test_map_keys_sorted_by_encoded_length_then_bytes():
    assert fast({"bb": 1, "a": 2, "c": 3, "\u00fc": 4}).hex() == "a4616102616303626262" "0162c3bc04"


# --- decoding ---------------------------------------------------------------------------

from engine._cborcore import FALLBACK  # noqa: E402
from engine._cborcore import decode as fast_decode  # noqa: E402

decodable = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=6)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5) | st.binary(max_size=3), kids,
                      max_size=6),
    max_leaves=40,
)


@settings(max_examples=600, deadline=None)
@given(decodable, st.booleans())
def test_fast_decode_gives_cbor2s_value(obj, canonical):
    data = cbor2.dumps(obj, canonical=canonical)  # cbor2's own choices of widths too
    got = fast_decode(data)
    assert got is not FALLBACK
    assert got == cbor2.loads(data)
    assert cbor.loads(memoryview(data)) == obj


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_fast_decode_of_any_bytes_is_cbor2s_value_or_falls_back(data):
    """Fuzz: never a crash, never a value cbor2 would not give."""
    got = fast_decode(data)
    if got is FALLBACK:
        return
    ref = cbor2.loads(data)
    assert cbor2.dumps(got) == cbor2.dumps(ref)  # (NaN != NaN: compare encodings)


@settings(max_examples=500, deadline=None)
@given(decodable, st.integers(0, 200))
def test_fast_decode_of_a_truncated_item_falls_back(obj, cut):
    data = cbor2.dumps(obj)
    short = data[:min(cut, len(data) - 1)]
    assert fast_decode(short) is FALLBACK


def test_fast_decode_falls_back_for_what_it_does_not_cover():
    for hexed in ("f7", "f0", "c11a514b67b0", "9f01ff", "bf6161 01ff".replace(" ", ""),
                  "a1a0616101", "a1810101", "62c328", "5affffffff", "9bffffffffffffffff",
                  "bbffffffffffffffff", "1c", "ff", ""):
        assert fast_decode(bytes.fromhex(hexed)) is FALLBACK, hexed
    deep = b"\x81" * 100_000 + b"\x01"  # nesting is bounded: no C stack overflow
    assert fast_decode(deep) is FALLBACK
    import pytest

    with pytest.raises(cbor.CBORDecodeError):
        cbor.loads(deep)  # cbor2 has the last word: too deep


def test_a_frame_decodes_the_same_on_both_paths():
    from engine.frame import encode_parts, uuid7

    raw = encode_parts(uuid7(), 1_795_000_000_000_000_000, "acq:x", "iso8583.txn",
                       {"de39": "00"}, {"mti": "0100", "amount": "000000001000",
                                        "latency_us": 12, "t": 1.5, "ok": True, "n": None,
                                        "list": [1, -2, "x", b"y"]})
    assert fast_decode(raw) == cbor2.loads(raw)
