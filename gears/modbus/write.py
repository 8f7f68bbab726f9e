"""Write-back: ``engine uns set PATH VALUE`` — what may be written, and how, sans I/O.

Theory of operation
-------------------
The request travels over the rack's NATS (``uns.cmd.<rack>.set.<path>``, JSON ``{value,
who}``; the answer goes to the requester's ``uns.cmd.<rack>.reply.<token>``). Every replica
of the modbus source hears it; the one that polls the tag's device answers (replica 0 says
"unknown path" when no device has the tag). ``check`` decides before anything is sent:
the tag must be ``writable``, on a holding register or a coil, the value of its type and
within ``min``/``max``; then it is unscaled and encoded with the tag's type and order
(``codec``). The poller applies the writes of one device one at a time, in the order they
came (a lock per device): a register bit is read, changed and written back under that lock;
then the tag is read back and compared word for word with what was written — ``confirmed``
or ``mismatch``. Every write asked for — refused, failed or done — becomes a ``uns.write``
audit event (who, old, new, result) in the stream ``UNS_WRITES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gears.modbus.codec import CodecError, unscaled
from gears.modbus.settings import TagSettings

WRITES_OUTLET: Final = "writes"
WRITES_STREAM: Final = "UNS_WRITES"
WRITE_KIND: Final = "uns.write"


def set_subject(rack: str, path: str = ">") -> str:
    """Where a write request for ``path`` goes."""
    return f"uns.cmd.{rack}.set.{path}"


def reply_prefix(rack: str) -> str:
    """Where answers go (the requester adds a token)."""
    return f"uns.cmd.{rack}.reply"


def writes_subject(rack: str) -> str:
    """The subject of the rack's write audit events."""
    return f"uns.writes.{rack}"


class WriteRefused(ValueError):
    """A write that is not allowed or not valid (the message says why)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedWrite:
    """What to send: the raw value (before encoding) and its words (or a coil bit)."""

    raw: int | float | str | bool
    words: list[int]  # for a register bit: the encoded bit alone (merged under the lock)


def check(tag: TagSettings, value: object) -> PlannedWrite:
    """Decide whether ``value`` may be written to ``tag`` and encode it.

    Raises:
        WriteRefused: not writable, read-only register type, wrong type, out of range.
    """
    if not tag.writable:
        raise WriteRefused(f"{tag.path} is not writable (writable: true in the rig)")
    if tag.register not in ("holding", "coil"):
        raise WriteRefused(f"{tag.path} is an {tag.register} register: read-only in Modbus")
    codec = tag.codec
    if codec.numeric:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WriteRefused(f"{tag.path} takes a number ({codec.type_text}), got "
                               f"{type(value).__name__}")
        if tag.minimum is not None and value < tag.minimum:
            raise WriteRefused(f"{value} is below the tag's min {tag.minimum:g}")
        if tag.maximum is not None and value > tag.maximum:
            raise WriteRefused(f"{value} is above the tag's max {tag.maximum:g}")
        try:
            raw = unscaled(value, tag.scale, tag.offset, codec)
        except CodecError as exc:
            raise WriteRefused(str(exc)) from None
    elif codec.type_text == "bool":
        if not isinstance(value, bool):
            raise WriteRefused(f"{tag.path} takes true or false, got {value!r}")
        raw = value
    else:
        if not isinstance(value, str):
            raise WriteRefused(f"{tag.path} takes text ({codec.type_text}), got "
                               f"{type(value).__name__}")
        raw = value
    if codec.bit_space:  # a coil: no words
        return PlannedWrite(raw=raw, words=[])
    try:
        words = codec.encode(raw, current=[0]) if codec.bit is not None \
            else codec.encode(raw)
    except CodecError as exc:
        raise WriteRefused(str(exc)) from None
    return PlannedWrite(raw=raw, words=words)


__all__ = ["PlannedWrite", "WRITES_OUTLET", "WRITES_STREAM", "WRITE_KIND", "WriteRefused",
           "check", "reply_prefix", "set_subject", "writes_subject"]
