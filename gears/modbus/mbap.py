"""Modbus TCP (MBAP) requests and responses — sans I/O.

Frame (Modbus Messaging on TCP/IP Implementation Guide v1.0b, section 3.1.3)::

    +----------------+----------------+----------------+---------+------------------+
    | transaction id | protocol id = 0| length         | unit id | PDU              |
    | 2 bytes        | 2 bytes        | 2 bytes: unit  | 1 byte  | function + data  |
    |                |                | id + PDU bytes |         | (<= 253 bytes)   |
    +----------------+----------------+----------------+---------+------------------+

Requests built here (Modbus Application Protocol v1.1b3, section 6): read coils (1),
discrete inputs (2), holding registers (3), input registers (4): ``function, address,
count``; write single coil (5), single register (6), multiple coils (15), multiple
registers (16). A response is the function echoed with its data, or the function + 0x80
and an exception code.

``Reader`` takes bytes as they come (any split) and yields whole responses; a length
field that cannot be a Modbus frame (under 2 or over 254) is a ``ModbusProtocolError``:
the connection cannot be trusted any more and is closed by the caller.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

READ_COILS: Final = 1
READ_DISCRETE: Final = 2
READ_HOLDING: Final = 3
READ_INPUT: Final = 4
WRITE_COIL: Final = 5
WRITE_REGISTER: Final = 6
WRITE_COILS: Final = 15
WRITE_REGISTERS: Final = 16
MAX_PDU: Final = 253

#: exception codes (Application Protocol section 7) and their names in quality strings
EXCEPTIONS: Final = {1: "illegal function", 2: "illegal data address",
                     3: "illegal data value", 4: "server device failure", 5: "acknowledge",
                     6: "server device busy", 8: "memory parity error",
                     10: "gateway path unavailable",
                     11: "gateway target device failed to respond"}

_HEAD: Final = struct.Struct(">HHHB")  # transaction, protocol, length, unit


class ModbusProtocolError(ValueError):
    """Bytes from a device that are not Modbus TCP (the message says what and where)."""


@dataclass(frozen=True, slots=True)
class Response:
    """One response: its transaction id, unit, function (without the 0x80 bit) and either
    the PDU data after the function code or an exception code."""

    tid: int
    unit: int
    function: int
    data: bytes
    exception: int = 0

    @property
    def failed(self) -> bool:
        """Whether the device answered with an exception."""
        return self.exception != 0

    def reason(self) -> str:
        """The exception as a quality reason (``exception 2 (illegal data address)``)."""
        return f"exception {self.exception} ({EXCEPTIONS.get(self.exception, 'unknown')})"

    def registers(self, count: int) -> list[int]:
        """The words of a read (function 3/4) response.

        Raises:
            ModbusProtocolError: the byte count is not ``2 * count``.
        """
        d = self.data
        if not d or d[0] != 2 * count or len(d) != 1 + 2 * count:
            raise ModbusProtocolError(f"register response of {len(d) - 1 if d else 0} bytes "
                                      f"for {count} registers: tid={self.tid}")
        return list(struct.unpack_from(f">{count}H", d, 1))

    def bits(self, count: int) -> list[bool]:
        """The bits of a read (function 1/2) response, LSB of the first byte first.

        Raises:
            ModbusProtocolError: the byte count does not hold ``count`` bits.
        """
        d = self.data
        need = (count + 7) // 8
        if not d or d[0] != need or len(d) != 1 + need:
            raise ModbusProtocolError(f"bit response of {len(d) - 1 if d else 0} bytes "
                                      f"for {count} bits: tid={self.tid}")
        return [bool(d[1 + i // 8] >> (i % 8) & 1) for i in range(count)]


def _frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return _HEAD.pack(tid & 0xFFFF, 0, len(pdu) + 1, unit & 0xFF) + pdu


def read_request(tid: int, unit: int, function: int, address: int, count: int) -> bytes:
    """A read of ``count`` registers/bits from ``address`` (0-based) with ``function`` 1-4."""
    if function not in (READ_COILS, READ_DISCRETE, READ_HOLDING, READ_INPUT):
        raise ValueError(f"not a read function: function={function}")
    return _frame(tid, unit, struct.pack(">BHH", function, address, count))


def write_registers_request(tid: int, unit: int, address: int, words: Sequence[int]) -> bytes:
    """Write ``words`` from ``address``: function 6 for one word, 16 for more."""
    if len(words) == 1:
        return _frame(tid, unit, struct.pack(">BHH", WRITE_REGISTER, address, words[0]))
    return _frame(tid, unit, struct.pack(f">BHHB{len(words)}H", WRITE_REGISTERS, address,
                                         len(words), 2 * len(words), *words))


def write_coil_request(tid: int, unit: int, address: int, value: bool) -> bytes:
    """Write one coil (function 5: 0xFF00 on, 0x0000 off)."""
    return _frame(tid, unit, struct.pack(">BHH", WRITE_COIL, address,
                                         0xFF00 if value else 0))


class Reader:
    """Whole responses out of a byte stream (see module doc)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[Response]:
        """Take ``data``; the responses it completed.

        Raises:
            ModbusProtocolError: a frame that is not Modbus TCP.
        """
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 8:
            tid, proto, length, unit = _HEAD.unpack_from(buf, pos)
            if proto != 0 or not 2 <= length <= MAX_PDU + 1:
                raise ModbusProtocolError(f"not a Modbus TCP frame: protocol={proto}, "
                                          f"length={length}, offset={pos}")
            stop = pos + 6 + length
            if stop > end:
                break
            fn = buf[pos + 7]
            if fn & 0x80:
                out.append(Response(tid, unit, fn & 0x7F, b"", buf[pos + 8] if length > 2
                                    else 0xFF))
            else:
                out.append(Response(tid, unit, fn, buf[pos + 8:stop]))
            pos = stop
        self.buf = buf[pos:]
        return out


__all__ = ["EXCEPTIONS", "ModbusProtocolError", "READ_COILS", "READ_DISCRETE", "READ_HOLDING",
           "READ_INPUT", "Reader", "Response", "WRITE_COIL", "WRITE_COILS", "WRITE_REGISTER",
           "WRITE_REGISTERS", "read_request", "write_coil_request", "write_registers_request"]
