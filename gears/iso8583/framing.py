"""ISO 8583 message framing on a TCP stream, sans-I/O (in the manner of h11).

Feed bytes in with ``receive_data`` (``b""`` means the peer closed), pull messages out with
``next_message`` until it returns ``NEED_DATA``; turn an outgoing message into bytes with
``frame``. Nothing here touches a socket.

Wire format::

    +-----------------+---------------------+------------------------------+
    | length prefix   | header / TPDU       | ISO 8583 message             |
    | 2 or 4 bytes    | header_len bytes    | (MTI, bitmap, fields)        |
    +-----------------+---------------------+------------------------------+
                      <------------- length (value of the prefix) ---------->

Prefix kinds (``FramingConfig.prefix``):

* ``2B`` / ``2L``: 2-byte unsigned binary, big / little endian (max 65535)
* ``4B`` / ``4L``: 4-byte unsigned binary, big / little endian
* ``4A``: 4 ASCII decimal digits (max 9999)

The length counts everything after the prefix (header included). The header (often a 5-byte
TPDU) is handed out separately and echoed back by the switch on the response.

A length of zero, beyond ``max_frame``, shorter than the header, or non-digit ASCII is a
``FramingError``; the stream cannot be resynchronised after it, so the framer stays broken
and every later call fails fast with the same error. The caller closes that connection only.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIXES = ("2B", "2L", "4B", "4L", "4A")


class FramingError(Exception):
    """The byte stream is not framed as configured; the connection must be closed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FramingConfig:
    """How messages are delimited on one link.

    Attributes:
        prefix: one of ``PREFIXES``.
        header_len: bytes of header/TPDU after the prefix (kept and echoed), 0 for none.
        max_frame: largest accepted length (prefix value), bytes.
    """

    prefix: str = "2B"
    header_len: int = 0
    max_frame: int = 8192

    def __post_init__(self) -> None:
        if self.prefix not in PREFIXES:
            raise ValueError(f"invalid framing prefix: prefix={self.prefix!r}, "
                             f"allowed={','.join(PREFIXES)}")
        if not 0 <= self.header_len <= 64:
            raise ValueError(f"invalid header_len: header_len={self.header_len}, rule=0..64")
        limit = 9999 if self.prefix == "4A" else (65535 if self.prefix[0] == "2" else 2**31 - 1)
        if not self.header_len < self.max_frame <= limit:
            raise ValueError(f"invalid max_frame: max_frame={self.max_frame}, "
                             f"rule={self.header_len} < max_frame <= {limit}")

    @property
    def prefix_len(self) -> int:
        """Bytes of the length prefix."""
        return int(self.prefix[0])


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message: the header/TPDU (may be empty) and the ISO 8583 bytes."""

    header: bytes
    payload: bytes


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def encode_length(config: FramingConfig, length: int) -> bytes:
    """The prefix bytes for a frame of ``length`` (header + message)."""
    if not 0 < length <= config.max_frame:
        raise FramingError(f"frame length out of range: length={length}, "
                           f"max_frame={config.max_frame}")
    p = config.prefix
    if p == "4A":
        return b"%04d" % length
    return length.to_bytes(int(p[0]), "big" if p[1] == "B" else "little")


def decode_length(config: FramingConfig, prefix: bytes) -> int:
    """The length a prefix announces (no range check)."""
    if config.prefix == "4A":
        if not prefix.isdigit():
            raise FramingError(f"ascii length prefix is not 4 digits: prefix={prefix.hex()}")
        return int(prefix)
    return int.from_bytes(prefix, "big" if config.prefix[1] == "B" else "little")


class Framer:
    """Splits one connection's byte stream into messages and frames outgoing ones."""

    __slots__ = ("config", "_buf", "_eof", "_error", "offset")

    def __init__(self, config: FramingConfig):
        self.config = config
        self._buf = bytearray()
        self._eof = False
        self._error: FramingError | None = None
        self.offset = 0  # stream offset of the first unread byte, for error messages

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` marks the end of the stream."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_message(self) -> Message | _NeedData | None:
        """The next complete message, ``NEED_DATA``, or None at a clean end of stream.

        Raises:
            FramingError: bad length, or the stream ended inside a message; then always.
        """
        if self._error is not None:
            raise self._error
        cfg = self.config
        n = cfg.prefix_len
        buf = self._buf
        if len(buf) < n:
            return self._end_or_need(buf)
        length = self._check(decode_length(cfg, bytes(buf[:n])))
        if len(buf) < n + length:
            return self._end_or_need(buf)
        header = bytes(buf[n:n + cfg.header_len])
        payload = bytes(buf[n + cfg.header_len:n + length])
        del buf[:n + length]
        self.offset += n + length
        return Message(header, payload)

    def _check(self, length: int) -> int:
        cfg = self.config
        if length <= cfg.header_len or length > cfg.max_frame:
            self._error = FramingError(
                f"bad frame length: length={length}, offset={self.offset}, "
                f"rule={cfg.header_len} < length <= {cfg.max_frame}")
            raise self._error
        return length

    def _end_or_need(self, buf: bytearray) -> _NeedData | None:
        if not self._eof:
            return NEED_DATA
        if not buf:
            return None
        self._error = FramingError(f"stream ended inside a frame: offset={self.offset}, "
                                   f"buffered={len(buf)}")
        raise self._error

    def frame(self, payload: bytes, header: bytes = b"") -> bytes:
        """Bytes to send for ``payload`` with ``header`` (must be ``header_len`` bytes)."""
        if len(header) != self.config.header_len:
            raise FramingError(f"header length mismatch: got={len(header)}, "
                               f"header_len={self.config.header_len}")
        return encode_length(self.config, len(header) + len(payload)) + header + payload

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf)
