"""Logging helpers for values that come from the wire, and for floods.

* ``escape`` makes a wire value safe to put in a log line: printable ASCII stays, anything
  else (newlines, ANSI escapes, NUL, non-ASCII) becomes ``\\xNN``, and long values are cut.
  A peer must never be able to forge or hide log lines (log injection, CWE-117).
* ``RateLimitedLog`` logs the first occurrence of a kind of event at once and then at most
  one line per ``interval`` with the count of what it held back, so a hostile peer (5,000
  connections, a malformed-message storm) costs a few lines a minute, not megabytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

_SAFE = frozenset(range(0x20, 0x7F)) - {ord("\\")}


def escape(value: str | bytes | bytearray | memoryview | None, limit: int = 64) -> str:
    """``value`` as printable ASCII: other bytes/characters as ``\\xNN`` (``\\uNNNN`` for
    non-Latin-1 text), a backslash doubled, cut to ``limit`` characters with ``...``."""
    if value is None:
        return ""
    if isinstance(value, str):
        out = []
        for ch in value[:limit]:
            code = ord(ch)
            if code in _SAFE:
                out.append(ch)
            elif ch == "\\":
                out.append("\\\\")
            elif code < 0x100:
                out.append(f"\\x{code:02x}")
            else:
                out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        text = "".join(out)
        cut = len(value) > limit
    else:
        data = bytes(value[:limit])
        text = "".join(chr(b) if b in _SAFE else ("\\\\" if b == 0x5C else f"\\x{b:02x}")
                       for b in data)
        cut = len(value) > limit
    return text + "..." if cut else text


def printable(text: str) -> str:
    """``text`` safe for a terminal, readable text kept: control and format characters (C0,
    DEL, C1, bidi overrides, lone surrogates: Unicode categories C*) become ``\\xNN`` /
    ``\\uNNNN``, a backslash doubled; letters of any script stay. For stored texts shown to
    a user (``mixer logs``, ``mixer traces``): a line written by a rack can neither move the
    cursor, retitle the window nor forge a second line."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


class RateLimitedLog:
    """At most one line per ``interval`` seconds per key; held-back lines are counted.

    ``log(key, level, msg, *args)`` writes the line when the key's window is open and
    appends ``suppressed=N`` for the lines held back since the last one written.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
        """Write (True) or count (False) one occurrence of ``key`` (``exc_info``: append the
        traceback of this exception when the line is written)."""
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._next[key] = now + self.interval
        held = self._held.pop(key, 0)
        if held:
            msg += ", suppressed=%d"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """``log`` at WARNING."""
        return self.log(key, logging.WARNING, msg, *args)

    def error(self, key: str, msg: str, *args: object,
              exc_info: BaseException | None = None) -> bool:
        """``log`` at ERROR."""
        return self.log(key, logging.ERROR, msg, *args, exc_info=exc_info)
