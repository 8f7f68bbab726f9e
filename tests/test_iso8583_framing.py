"""gears.iso8583.framing: every prefix kind, fed whole, byte by byte, and with trailing data."""

from __future__ import annotations

import pytest

from gears.iso8583.framing import (
    NEED_DATA,
    Framer,
    FramingConfig,
    FramingError,
    Message,
)

MSG = b"0800\x82\x20\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00301"
TPDU = b"\x60\x00\x03\x00\x00"

# (config, header, payload, exact wire bytes)
CASES = [
    (FramingConfig(prefix="2B"), b"", b"abc", b"\x00\x03abc"),
    (FramingConfig(prefix="2L"), b"", b"abc", b"\x03\x00abc"),
    (FramingConfig(prefix="4B"), b"", b"abc", b"\x00\x00\x00\x03abc"),
    (FramingConfig(prefix="4L"), b"", b"abc", b"\x03\x00\x00\x00abc"),
    (FramingConfig(prefix="4A"), b"", b"abc", b"0003abc"),
    (FramingConfig(prefix="2B", header_len=5), TPDU, MSG, b"\x00" + bytes([5 + len(MSG)]) + TPDU + MSG),
    (FramingConfig(prefix="4A", header_len=5), TPDU, MSG, b"%04d" % (5 + len(MSG)) + TPDU + MSG),
]
IDS = ["2B", "2L", "4B", "4L", "4A", "2B+tpdu", "4A+tpdu"]


@pytest.mark.parametrize(("config", "header", "payload", "wire"), CASES, ids=IDS)
def test_frame_gives_the_exact_wire_bytes(config, header, payload, wire):
    assert Framer(config).frame(payload, header) == wire


@pytest.mark.parametrize(("config", "header", "payload", "wire"), CASES, ids=IDS)
def test_whole_stream_gives_the_message_then_clean_end(config, header, payload, wire):
    f = Framer(config)
    f.receive_data(wire)
    assert f.next_message() == Message(header, payload)
    assert f.next_message() is NEED_DATA
    f.receive_data(b"")
    assert f.next_message() is None


@pytest.mark.parametrize(("config", "header", "payload", "wire"), CASES, ids=IDS)
def test_byte_by_byte_needs_data_until_the_last_byte(config, header, payload, wire):
    f = Framer(config)
    for i, byte in enumerate(wire):
        assert f.next_message() is NEED_DATA, i
        f.receive_data(bytes([byte]))
    assert f.next_message() == Message(header, payload)


@pytest.mark.parametrize(("config", "header", "payload", "wire"), CASES, ids=IDS)
def test_back_to_back_messages_and_trailing_partial_data(config, header, payload, wire):
    f = Framer(config)
    f.receive_data(wire * 3 + wire[:3])
    assert [f.next_message() for _ in range(3)] == [Message(header, payload)] * 3
    assert f.next_message() is NEED_DATA
    assert f.buffered == 3
    assert f.offset == 3 * len(wire)


@pytest.mark.parametrize(
    ("config", "wire", "message"),
    [
        (FramingConfig(prefix="2B"), b"\x00\x00", "bad frame length: length=0, offset=0, rule=0 < length <= 8192"),
        (FramingConfig(prefix="2B", max_frame=100), b"\x00\x65" + b"x" * 101,
         "bad frame length: length=101, offset=0, rule=0 < length <= 100"),
        (FramingConfig(prefix="2B", header_len=5), b"\x00\x05" + TPDU,
         "bad frame length: length=5, offset=0, rule=5 < length <= 8192"),
        (FramingConfig(prefix="4A"), b"00x1abc", "ascii length prefix is not 4 digits: prefix=30307831"),
        (FramingConfig(prefix="4L"), b"\xff\xff\xff\x7f", "bad frame length: length=2147483647, offset=0, rule=0 < length <= 8192"),
    ],
    ids=["zero", "oversize", "header-only", "ascii-garbage", "huge"],
)
def test_bad_lengths_break_the_framer_for_good(config, wire, message):
    f = Framer(config)
    f.receive_data(wire)
    with pytest.raises(FramingError) as exc:
        f.next_message()
    assert str(exc.value) == message
    with pytest.raises(FramingError):  # fails fast from now on
        f.next_message()


def test_error_offset_counts_the_messages_before_it():
    f = Framer(FramingConfig(prefix="2B"))
    f.receive_data(b"\x00\x03abc\x00\x00")
    assert f.next_message() == Message(b"", b"abc")
    with pytest.raises(FramingError) as exc:
        f.next_message()
    assert "offset=5" in str(exc.value)


def test_truncated_stream_is_an_error_not_a_message():
    f = Framer(FramingConfig(prefix="2B"))
    f.receive_data(b"\x00\x10abc")
    f.receive_data(b"")
    with pytest.raises(FramingError) as exc:
        f.next_message()
    assert str(exc.value) == "stream ended inside a frame: offset=0, buffered=5"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix": "3B"}, "invalid framing prefix: prefix='3B', allowed=2B,2L,4B,4L,4A"),
        ({"prefix": "4A", "max_frame": 10000}, "invalid max_frame: max_frame=10000, rule=0 < max_frame <= 9999"),
        ({"prefix": "2B", "max_frame": 70000}, "invalid max_frame: max_frame=70000, rule=0 < max_frame <= 65535"),
        ({"header_len": 65}, "invalid header_len: header_len=65, rule=0..64"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError) as exc:
        FramingConfig(**kwargs)
    assert str(exc.value) == message


def test_frame_refuses_wrong_header_and_oversize_payload():
    f = Framer(FramingConfig(prefix="2B", header_len=5, max_frame=50))
    with pytest.raises(FramingError) as exc:
        f.frame(b"abc", b"\x60")
    assert str(exc.value) == "header length mismatch: got=1, header_len=5"
    with pytest.raises(FramingError) as exc:
        f.frame(b"x" * 46, TPDU)
    assert str(exc.value) == "frame length out of range: length=51, max_frame=50"
