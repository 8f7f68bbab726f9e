"""gears.modbus.mbap against the examples of the Modbus Application Protocol specification
v1.1b3 (section 6) and the TCP implementation guide: requests byte for byte, responses
parsed whole, byte by byte and run together, and frames that are not Modbus refused."""

from __future__ import annotations

import pytest

from gears.modbus import mbap


def _mbap(tid: int, unit: int, pdu: str) -> bytes:
    body = bytes.fromhex(pdu)
    return tid.to_bytes(2, "big") + b"\x00\x00" + (len(body) + 1).to_bytes(2, "big") + \
        bytes([unit]) + body


@pytest.mark.parametrize("built, pdu", [
    (mbap.read_request(1, 17, mbap.READ_HOLDING, 107, 3), "03006b0003"),   # spec 6.3
    (mbap.read_request(1, 17, mbap.READ_COILS, 19, 19), "0100130013"),     # spec 6.1
    (mbap.read_request(1, 17, mbap.READ_DISCRETE, 196, 22), "0200c40016"),  # spec 6.2
    (mbap.read_request(1, 17, mbap.READ_INPUT, 8, 1), "0400080001"),        # spec 6.4
    (mbap.write_coil_request(1, 17, 172, True), "0500acff00"),              # spec 6.5
    (mbap.write_registers_request(1, 17, 1, [3]), "0600010003"),            # spec 6.6
    (mbap.write_registers_request(1, 17, 1, [0x000A, 0x0102]),
     "100001000204000a0102"),                                               # spec 6.12
])
def test_requests_are_the_specs_bytes(built: bytes, pdu: str) -> None:
    assert built == _mbap(1, 17, pdu)


def test_a_read_function_only_for_reads() -> None:
    with pytest.raises(ValueError, match="not a read function: function=6"):
        mbap.read_request(1, 1, 6, 0, 1)


def test_register_bit_and_exception_responses() -> None:
    r = mbap.Reader()
    (regs,) = r.feed(_mbap(7, 17, "0306022b00000064"))
    assert (regs.tid, regs.unit, regs.function, regs.failed) == (7, 17, 3, False)
    assert regs.registers(3) == [0x022B, 0, 0x64]
    (bits,) = r.feed(_mbap(8, 17, "0103cd6b05"))
    want = [1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]  # coils 20..38
    assert bits.bits(19) == [bool(b) for b in want]
    (exc,) = r.feed(_mbap(9, 17, "8302"))
    assert exc.failed and exc.function == 3 and exc.reason() == \
        "exception 2 (illegal data address)"


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_responses_in_any_split_and_run_together(step: int) -> None:
    wire = (_mbap(1, 1, "0306022b00000064") + _mbap(2, 1, "8304")
            + _mbap(3, 1, "0104cd6b0501"))
    r = mbap.Reader()
    got = []
    for i in range(0, len(wire), step):
        got += r.feed(wire[i:i + step])
    assert [(x.tid, x.function, x.exception) for x in got] == [(1, 3, 0), (2, 3, 4), (3, 1, 0)]
    assert r.buf == b""


def test_a_short_register_answer_is_a_protocol_error() -> None:
    (resp,) = mbap.Reader().feed(_mbap(4, 1, "0304022b0000"))
    with pytest.raises(mbap.ModbusProtocolError, match="register response of 4 bytes for 3 "
                       "registers: tid=4"):
        resp.registers(3)


@pytest.mark.parametrize("frame, what", [
    (bytes.fromhex("0001000100030103"), "protocol=1"),
    (bytes.fromhex("00010000000101"), None),  # incomplete: waits
    (bytes.fromhex("0001000000010103"), "length=1"),
    (bytes.fromhex("00010000ffff0103"), "length=65535"),
])
def test_frames_that_are_not_modbus_are_refused(frame: bytes, what: str | None) -> None:
    r = mbap.Reader()
    if what is None:
        assert r.feed(frame) == [] and r.buf == frame
        return
    with pytest.raises(mbap.ModbusProtocolError, match=what):
        r.feed(frame)
