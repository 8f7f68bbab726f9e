"""gears.modbus.codec: the issue's vectors, round trips for every type and order, decode equal
to pymodbus (word orders) and to a struct reference written from the byte-order definition
(every order), scaling, and the exact error texts."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from gears.modbus.codec import (
    MAX_STRING_CHARS,
    NUMERIC_TYPES,
    ORDERS,
    Codec,
    CodecError,
    parse_type,
    scaled,
    unscaled,
)

DT = ModbusTcpClient.DATATYPE
PYMODBUS_TYPE = {
    "int16": DT.INT16, "uint16": DT.UINT16, "int32": DT.INT32, "uint32": DT.UINT32,
    "int64": DT.INT64, "uint64": DT.UINT64, "float32": DT.FLOAT32, "float64": DT.FLOAT64,
}
PYMODBUS_WORD_ORDER = {"ABCD": "big", "CDAB": "little"}  # the orders pymodbus can express
STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q",
               "uint64": "Q", "float32": "f", "float64": "d"}
INT_RANGE = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
             "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
             "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}
TYPE_ORDER = [(t, o) for t in NUMERIC_TYPES for o in ORDERS]


def words(text: str) -> list[int]:
    return [int(w, 16) for w in text.split()]


def bits(value: object) -> object:
    """Floats by their IEEE-754 bits (so -0.0 != 0.0 and a NaN equals its own bits)."""
    return struct.pack(">d", value) if isinstance(value, float) else value


def reference_value_bytes(regs: list[int], order: str) -> bytes:
    """The value's bytes, most significant first, from the wire words by the order's definition:
    CDAB reverses the registers, BADC swaps the bytes in each register, DCBA does both."""
    if order in ("CDAB", "DCBA"):
        regs = regs[::-1]
    data = b"".join(w.to_bytes(2, "big") for w in regs)
    if order in ("BADC", "DCBA"):
        data = bytes(data[i ^ 1] for i in range(len(data)))
    return data


def word_lists(count: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count)


def values_of(dtype: str) -> st.SearchStrategy[object]:
    if dtype == "float32":
        return st.floats(width=32)
    if dtype == "float64":
        return st.floats()
    low, high = INT_RANGE[dtype]
    return st.integers(low, high)


# -- the vectors (and the same values laid out in every order) -----------------------

VECTORS = [
    # type, order, value, wire words
    ("float32", "ABCD", 123.456, "42F6 E979"),
    ("float32", "CDAB", 123.456, "E979 42F6"),
    ("float32", "BADC", 123.456, "F642 79E9"),
    ("float32", "DCBA", 123.456, "79E9 F642"),
    ("int32", "ABCD", -123456789, "F8A4 32EB"),
    ("int32", "CDAB", -123456789, "32EB F8A4"),
    ("int32", "BADC", -123456789, "A4F8 EB32"),
    ("int32", "DCBA", -123456789, "EB32 A4F8"),
    ("float64", "ABCD", -9876.54321, "C0C3 4A45 87E7 C06E"),
    ("float64", "CDAB", -9876.54321, "C06E 87E7 4A45 C0C3"),
    ("float64", "BADC", -9876.54321, "C3C0 454A E787 6EC0"),
    ("float64", "DCBA", -9876.54321, "6EC0 E787 454A C3C0"),
    ("int16", "ABCD", -2, "FFFE"),
    ("int16", "CDAB", -2, "FFFE"),
    ("int16", "BADC", -2, "FEFF"),
    ("int16", "DCBA", -2, "FEFF"),
    ("uint16", "BADC", 0x1234, "3412"),
    ("uint32", "CDAB", 0x12345678, "5678 1234"),
    ("int64", "ABCD", -2, "FFFF FFFF FFFF FFFE"),
    ("uint64", "CDAB", 0x0102030405060708, "0708 0506 0304 0102"),
    ("uint64", "BADC", 0x0102030405060708, "0201 0403 0605 0807"),
    ("uint64", "DCBA", 0x0102030405060708, "0807 0605 0403 0201"),
]


@pytest.mark.parametrize(("dtype", "order", "value", "wire"), VECTORS)
def test_vector_encodes_to_exactly_the_wire_words(dtype, order, value, wire):
    assert parse_type(dtype, order).encode(value) == words(wire)


@pytest.mark.parametrize(("dtype", "order", "value", "wire"), VECTORS)
def test_vector_decodes_from_the_wire_words(dtype, order, value, wire):
    got = parse_type(dtype, order).decode(words(wire))
    if dtype == "float32":  # 123.456 is not a float32: expect its nearest float32
        assert got == struct.unpack(">f", struct.pack(">f", value))[0]
        assert got == pytest.approx(value, rel=1e-7)
    else:
        assert got == value and type(got) is type(value)


STRING_VECTORS = [
    # type, order, text, wire words (high byte first)
    ("string(5)", "ABCD", "HELLO", "4845 4C4C 4F00"),
    ("string(5)", "CDAB", "HELLO", "4845 4C4C 4F00"),  # word order does not apply to strings
    ("string(5)", "BADC", "HELLO", "4548 4C4C 004F"),
    ("string(5)", "DCBA", "HELLO", "4548 4C4C 004F"),
    ("string(6)", "ABCD", "AB", "4142 0000 0000"),
    ("string(2)", "ABCD", "\xe9t", "E974"),  # latin-1: one byte per character
]


@pytest.mark.parametrize(("dtype", "order", "text", "wire"), STRING_VECTORS)
def test_string_vector_encodes_and_decodes(dtype, order, text, wire):
    codec = parse_type(dtype, order)
    assert codec.encode(text) == words(wire)
    assert codec.decode(words(wire)) == text


@pytest.mark.parametrize(("wire", "text"), [
    ("4142 2020 2000", "AB"),      # trailing spaces and NULs stripped
    ("2041 0042 0000", " A\x00B"),  # leading and inner ones kept
    ("4142 4344 45FF", "ABCDE"),   # odd length: the unused low byte is ignored
    ("FFC0 4100 0000", "\xff\xc0A"),  # any byte decodes (latin-1), never a UnicodeDecodeError
])
def test_string_decode_strips_trailing_nuls_and_spaces_only(wire, text):
    assert parse_type("string(5)").decode(words(wire)) == text


# -- round trips, every type and order -------------------------------------------------------

@pytest.mark.parametrize(("dtype", "order"), TYPE_ORDER)
@given(data=st.data())
def test_decode_of_encode_is_the_value(dtype, order, data):
    codec = parse_type(dtype, order)
    value = data.draw(values_of(dtype))
    got = codec.decode(codec.encode(value))
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(got)
    else:
        assert bits(got) == bits(value) and type(got) is type(value)


@pytest.mark.parametrize(("dtype", "order"), TYPE_ORDER)
@given(data=st.data())
def test_encode_of_decode_gives_back_the_words(dtype, order, data):
    codec = parse_type(dtype, order)
    regs = data.draw(word_lists(codec.registers))
    value = codec.decode(regs)
    if dtype == "float32" and math.isnan(value):
        return  # float32 -> float64 -> float32 may quiet a signalling NaN: not bit-exact
    assert codec.encode(value) == regs


@pytest.mark.parametrize("length", [1, 2, 7, MAX_STRING_CHARS])
@pytest.mark.parametrize("order", ORDERS)
@given(data=st.data())
def test_string_round_trip(length, order, data):
    codec = parse_type(f"string({length})", order)
    text = data.draw(st.text(st.characters(max_codepoint=0xFF), max_size=length)
                     .map(lambda s: s.rstrip("\x00 ")))
    regs = codec.encode(text)
    assert len(regs) == codec.registers == (length + 1) // 2
    assert codec.decode(regs) == text


# -- against pymodbus (word orders) and struct (every order) ---------------------------------

@pytest.mark.parametrize(("dtype", "order"), [(t, o) for t, o in TYPE_ORDER
                                              if o in PYMODBUS_WORD_ORDER])
@given(data=st.data())
def test_decode_equals_pymodbus_convert_from_registers(dtype, order, data):
    codec = parse_type(dtype, order)
    regs = data.draw(word_lists(codec.registers))
    expected = ModbusTcpClient.convert_from_registers(
        regs, PYMODBUS_TYPE[dtype], word_order=PYMODBUS_WORD_ORDER[order])
    assert bits(codec.decode(regs)) == bits(expected)


@pytest.mark.parametrize(("dtype", "order"), [(t, o) for t, o in TYPE_ORDER
                                              if o in PYMODBUS_WORD_ORDER])
@given(data=st.data())
def test_encode_equals_pymodbus_convert_to_registers(dtype, order, data):
    value = data.draw(values_of(dtype))
    expected = ModbusTcpClient.convert_to_registers(
        value, PYMODBUS_TYPE[dtype], word_order=PYMODBUS_WORD_ORDER[order])
    assert parse_type(dtype, order).encode(value) == expected


@pytest.mark.parametrize(("dtype", "order"), TYPE_ORDER)
@given(data=st.data())
def test_decode_equals_struct_on_the_bytes_the_order_defines(dtype, order, data):
    codec = parse_type(dtype, order)
    regs = data.draw(word_lists(codec.registers))
    expected = struct.unpack(">" + STRUCT_CODE[dtype], reference_value_bytes(regs, order))[0]
    assert bits(codec.decode(regs)) == bits(expected)


@pytest.mark.parametrize("length", [1, 4, 9])
@pytest.mark.parametrize("order", ORDERS)
@given(data=st.data())
def test_string_decode_equals_pymodbus_and_byte_swap_reference(length, order, data):
    codec = parse_type(f"string({length})", order)
    regs = data.draw(word_lists(codec.registers))
    if order in ("BADC", "DCBA"):  # pymodbus has no byte swap: swap each register first
        plain = [((w & 0xFF) << 8) | (w >> 8) for w in regs]
    else:
        plain = regs
    # pymodbus strips trailing NULs only and keeps an odd length's padding byte
    expected = ModbusTcpClient.convert_from_registers(plain, DT.STRING, word_order="big",
                                                      string_encoding="latin-1")
    assert codec.decode(regs) == expected[:length].rstrip("\x00 ")


@pytest.mark.parametrize("order", ["ABCD", "CDAB"])
@given(text=st.text(st.characters(max_codepoint=0xFF), max_size=9))
def test_string_encode_equals_pymodbus_word_order_big_padded(order, text):
    expected = ModbusTcpClient.convert_to_registers(text, DT.STRING, word_order="big",
                                                    string_encoding="latin-1")
    got = parse_type("string(9)", order).encode(text)
    assert got[: len(expected)] == expected and set(got[len(expected):]) <= {0}


def test_string_word_order_is_ignored_unlike_pymodbus_little():
    regs = words("4142 4344")  # "ABCD"
    assert parse_type("string(4)", "CDAB").decode(regs) == "ABCD"
    assert ModbusTcpClient.convert_from_registers(regs, DT.STRING, word_order="little") == "CDAB"


# -- bits: coils and bits of a register ------------------------------------------------------

def test_bool_without_bit_is_a_coil_bit():
    coil = parse_type("BOOL")
    assert coil.bit_space and coil.registers == 1 and not coil.numeric
    assert coil.decode([True]) is True and coil.decode([0]) is False
    assert coil.encode(True) == [1] and coil.encode(0) == [0]


@pytest.mark.parametrize("order", ORDERS)
@given(word=st.integers(0, 0xFFFF), bit=st.integers(0, 15))
def test_register_bit_reads_the_value_in_the_tags_byte_order(order, word, bit):
    codec = parse_type("bool", order, bit)
    value16 = ((word & 0xFF) << 8) | (word >> 8) if order in ("BADC", "DCBA") else word
    assert not codec.bit_space and codec.registers == 1
    assert codec.decode([word]) is bool((value16 >> bit) & 1)


@pytest.mark.parametrize("order", ORDERS)
@given(word=st.integers(0, 0xFFFF), bit=st.integers(0, 15), flag=st.booleans())
def test_register_bit_write_changes_only_that_bit_and_mask_write_agrees(order, word, bit, flag):
    codec = parse_type("bool", order, bit)
    (new,) = codec.encode(flag, current=[word])
    assert codec.decode([new]) is flag
    assert bin(new ^ word).count("1") <= 1
    and_mask, or_mask = codec.mask_write(flag)
    assert (word & and_mask) | (or_mask & ~and_mask & 0xFFFF) == new  # FC 22 on the device


@pytest.mark.parametrize(("order", "bit", "wire"), [
    ("ABCD", 0, 0x0001), ("ABCD", 15, 0x8000), ("CDAB", 3, 0x0008),
    ("BADC", 0, 0x0100), ("DCBA", 15, 0x0080), ("BADC", 8, 0x0001),
])
def test_register_bit_vectors(order, bit, wire):
    codec = parse_type("bool", order, bit)
    assert codec.decode([wire]) is True and codec.decode([0xFFFF ^ wire]) is False
    assert codec.encode(True, current=[0]) == [wire]


# -- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "order", "registers"), [
    ("int16", "ABCD", 1), ("UINT16", "dcba", 1), ("int32", "CDAB", 2), ("uint32", "BADC", 2),
    ("int64", "ABCD", 4), ("uint64", "ABCD", 4), ("Float32", " cdab ", 2), ("float64", "ABCD", 4),
    ("string(1)", "ABCD", 1), ("STRING(10)", "BADC", 5), ("string( 11 )", "ABCD", 6),
])
def test_parse_type_normalises_and_counts_registers(text, order, registers):
    codec = parse_type(text, order)
    assert codec.registers == registers
    assert codec.order == order.strip().upper()
    assert codec.type_text == text.lower().replace(" ", "")


def test_codec_is_a_frozen_value_equal_to_its_direct_construction():
    codec = parse_type("FLOAT32", "cdab")
    assert codec == Codec(dtype="float32", order="CDAB") and hash(codec) == hash(
        Codec(dtype="float32", order="CDAB"))
    assert codec != parse_type("float32", "ABCD")
    with pytest.raises(AttributeError):
        codec.order = "ABCD"  # type: ignore[misc]


@pytest.mark.parametrize(("text", "order", "bit", "message"), [
    ("int24", "ABCD", None,
     "unknown type: type='int24', known=bool,int16,uint16,int32,uint32,int64,uint64,float32,"
     "float64,string(n)"),
    ("", "ABCD", None, "unknown type: type='',"),
    ("float32", "ABDC", None, "unknown order: order='ABDC', known=ABCD,CDAB,BADC,DCBA"),
    ("int16", "AB", None, "unknown order: order='AB', known=ABCD,CDAB,BADC,DCBA"),
    ("string(0)", "ABCD", None, "bad string length: length=0, range=1..250"),
    ("string(251)", "ABCD", None, "bad string length: length=251, range=1..250"),
    ("string(-1)", "ABCD", None, "bad string length: type='string(-1)', range=1..250"),
    ("string(x)", "ABCD", None, "bad string length: type='string(x)', range=1..250"),
    ("string", "ABCD", None,
     "bad string length: type='string', string needs a length as string(n)"),
    ("bool", "ABCD", 16, "bit out of range: bit=16, range=0..15"),
    ("bool", "ABCD", -1, "bit out of range: bit=-1, range=0..15"),
    ("int16", "ABCD", 3, "bit applies to type bool only: type=int16, bit=3"),
])
def test_parse_type_refuses_with_a_clear_message(text, order, bit, message):
    with pytest.raises(CodecError) as info:
        parse_type(text, order, bit)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)


# -- encode and decode refusals --------------------------------------------------------------

@pytest.mark.parametrize(("text", "value", "message"), [
    ("int16", 70000, "value out of range: type=int16, value=70000, range=-32768..32767"),
    ("uint16", -1, "value out of range: type=uint16, value=-1, range=0..65535"),
    ("uint64", 2**64, "value out of range: type=uint64, value=18446744073709551616, "
                      "range=0..18446744073709551615"),
    ("int64", float(2**63), "value out of range: type=int64, value=9223372036854775808, "
                            "range=-9223372036854775808..9223372036854775807"),
    ("int32", math.nan, "not a finite number: type=int32, value=nan"),
    ("int16", -math.inf, "not a finite number: type=int16, value=-inf"),
    ("int16", 1.5, "not an integer: type=int16, value=1.5"),
    ("int16", "5", "expected an integer: type=int16, value_type=str"),
    ("int16", True, "expected an integer: type=int16, value_type=bool"),
    ("float32", 1e39, "value out of range: type=float32, value=1e+39, "
                      "range=+-3.4028234663852886e+38"),
    ("float64", None, "expected a number: type=float64, value_type=NoneType"),
    ("float64", 10**400, "value out of range: type=float64, value="),
    ("string(4)", "HELLO!", "string too long: type=string(4), length=6, max=4"),
    ("string(4)", "a\u20ac", "not a latin-1 string: type=string(4), position=1"),
    ("string(4)", 5, "expected a string: type=string(4), value_type=int"),
    ("bool", 2, "expected a bool: type=bool, value=2"),
    ("bool", "true", "expected a bool: type=bool, value='true'"),
])
def test_encode_refuses_values_that_do_not_fit(text, value, message):
    with pytest.raises(CodecError) as info:
        parse_type(text).encode(value)
    assert str(info.value).startswith(message)


def test_encode_accepts_integral_floats_and_full_ranges():
    assert parse_type("int16").encode(-32768.0) == [0x8000]
    assert parse_type("uint64").encode(2**64 - 1) == [0xFFFF] * 4
    assert parse_type("float32").encode(math.inf) == words("7F80 0000")
    assert parse_type("float64", "DCBA").encode(-0.0) == words("0000 0000 0000 0080")


def test_register_bit_write_needs_the_current_word_and_mask_write_needs_a_bit():
    bit = parse_type("bool", "ABCD", 3)
    with pytest.raises(CodecError) as info:
        bit.encode(True)
    assert str(info.value) == ("bit of a register needs the current register to write: "
                               "type=bool, bit=3, current=None")
    with pytest.raises(CodecError) as info:
        parse_type("bool").mask_write(True)
    assert str(info.value) == "mask write applies to a bit of a register only: type=bool, bit=None"


@pytest.mark.parametrize(("text", "regs", "message"), [
    ("float32", [1, 2, 3], "wrong register count: type=float32, expected=2, got=3"),
    ("float64", [1], "wrong register count: type=float64, expected=4, got=1"),
    ("int16", [], "wrong register count: type=int16, expected=1, got=0"),
    ("string(5)", [0x4142], "wrong register count: type=string(5), expected=3, got=1"),
    ("bool", [True, False], "wrong register count: type=bool, expected=1, got=2"),
    ("int16", [70000], "register out of range: type=int16, words=[70000], range=0..65535"),
    ("uint32", [1, -1], "register out of range: type=uint32, words=[1, -1], range=0..65535"),
])
def test_decode_refuses_a_wrong_word_list(text, regs, message):
    with pytest.raises(CodecError) as info:
        parse_type(text).decode(regs)
    assert str(info.value) == message


def test_register_bit_decode_refuses_a_word_out_of_range():
    with pytest.raises(CodecError) as info:
        parse_type("bool", "ABCD", 0).decode([0x10000])
    assert str(info.value) == "register out of range: type=bool, words=[65536], range=0..65535"


# -- scaling ---------------------------------------------------------------------------------

def test_scaled_is_raw_times_scale_plus_offset_and_identity_keeps_ints():
    assert scaled(1234, 0.1, 0) == pytest.approx(123.4)
    assert scaled(-40, 0.5, 20) == 0.0
    assert scaled(7) == 7 and type(scaled(7, 1, 0)) is int
    assert type(scaled(7, 1.0, 0.0)) is int


@pytest.mark.parametrize(("value", "scale", "offset", "text", "raw"), [
    (10, 2, 4, "int16", 3),
    (1.25, 0.5, 0, "int16", 3),      # 2.5 rounds away from zero
    (-1.25, 0.5, 0, "int16", -3),
    (0.49999999999999994, 1, 0, "int16", 0),  # not rounded up by a floor(x + 0.5)
    (123.4, 0.1, 0, "uint16", 1234),
    (21.5, 0.1, -10, "int32", 315),
    (7, 1, 0, "int64", 7),
    (1.5, 0.5, 0, "float32", 3.0),
    ("ok", 1, 0, "string(2)", "ok"),
    (True, 1, 0, "bool", True),
])
def test_unscaled_inverts_scaling_for_writes(value, scale, offset, text, raw):
    got = unscaled(value, scale, offset, parse_type(text))
    assert got == raw and type(got) is type(raw)


@pytest.mark.parametrize(("value", "scale", "offset", "text", "message"), [
    (3276.8, 0.1, 0, "int16", "value out of range: type=int16, value=32768, "
                              "range=-32768..32767"),
    (-0.6, 1, 0, "uint16", "value out of range: type=uint16, value=-1, range=0..65535"),
    (math.nan, 2, 0, "int16", "not a finite number: type=int16, value=nan"),
    (math.inf, 1, 0, "int16", "not a finite number: type=int16, value=inf"),
    (5, 0, 0, "int16", "scale must not be zero: type=int16, scale=0"),
    ("5", 2, 0, "int16", "expected a number: type=int16, value_type=str"),
    (1e39, 1, 0, "float32", "value out of range: type=float32, value=1e+39"),
    ("ab", 2, 0, "string(2)", "scale and offset apply to numeric types only: "
                              "type=string(2), scale=2, offset=0"),
    (True, 1, 1, "bool", "scale and offset apply to numeric types only: "
                         "type=bool, scale=1, offset=1"),
])
def test_unscaled_refuses_with_a_clear_message(value, scale, offset, text, message):
    with pytest.raises(CodecError) as info:
        unscaled(value, scale, offset, parse_type(text))
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "uint32"])
@given(data=st.data(), scale=st.sampled_from([0.25, 0.5, 2, 4, -0.5]),
       offset=st.integers(-1000, 1000))
def test_unscaled_of_scaled_gives_back_the_raw_register_value(dtype, data, scale, offset):
    codec = parse_type(dtype)
    raw = data.draw(values_of(dtype))
    assert unscaled(scaled(raw, scale, offset), scale, offset, codec) == raw
