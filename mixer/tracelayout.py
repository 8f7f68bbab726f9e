"""What the traces store's writers and readers agree on, with no heavy import (the CLI's
lookups import this, not pyarrow or protobuf): directory names, the root-span attributes
that become columns, log levels, trace-id parsing."""

from __future__ import annotations

import binascii
from typing import Final

TRACES_DIR: Final = "traces"
LOGS_DIR: Final = "logs"
HOUR_NS: Final = 3_600 * 10**9
#: root-span attributes copied into columns (column <- attribute)
ROOT_COLUMNS: Final = (
    ("mti", "iso8583.mti"), ("de39", "iso8583.de39"), ("stan", "iso8583.stan"),
    ("terminal", "iso8583.terminal"), ("token", "fluxrig.token"),
    ("outcome", "fluxrig.outcome"), ("keep", "fluxrig.keep"), ("issuer", "fluxrig.issuer"),
    ("route", "fluxrig.route"))
LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def uuid7_ns(trace_id: bytes) -> int | None:
    """The time in a UUIDv7 (ns since the epoch, ms precision), or None when ``trace_id``
    is not one (version 7, variant 10)."""
    if len(trace_id) != 16 or trace_id[6] >> 4 != 7 or trace_id[8] >> 6 != 0b10:
        return None
    return int.from_bytes(trace_id[:6], "big") * 1_000_000


def trace_id_bytes(text: str) -> bytes | None:
    """A trace id written as 32 hex digits or a UUID with dashes, or None."""
    t = text.strip().lower().replace("-", "")
    if len(t) != 32:
        return None
    try:
        return binascii.unhexlify(t)
    except (binascii.Error, ValueError):
        return None


__all__ = ["HOUR_NS", "LEVELS", "LOGS_DIR", "ROOT_COLUMNS", "TRACES_DIR", "trace_id_bytes",
           "uuid7_ns"]
