"""Where a rack's log lines go and what they look like.

* One destination, each line once: the rack's file (``<data_dir>/rack.log`` by default,
  size-rotated) or stderr (``--log-file -``, for systemd's journal or a terminal).
* Timestamps in UTC, ISO 8601 with milliseconds and ``Z``; every line names the process
  (``p.switch.1``, ``egress``, ``supervisor``) besides its pid.
* ``--log-format json``: one JSON object per line (``ts``, ``level``, ``logger``, ``pid``,
  ``process``, ``msg``, ``exc`` when there is a traceback), for log shippers.

Every process of the rack writes the same file: the supervisor sets logging up before it
forks, and the children inherit the handler. ``logging.handlers.RotatingFileHandler`` is not
safe with several writing processes (each rolls over on its own, and the others keep writing
into the renamed file — the logging cookbook says so), so the file handler is
``concurrent_log_handler.ConcurrentRotatingFileHandler``: it takes a lock file around each
write and rollover, and re-opens after a fork.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import orjson

#: the process name every line carries ("supervisor" until a forked child renames itself)
_process = "supervisor"

LOG_FORMATS = ("text", "json")
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_BACKUPS = 5


def set_process_name(name: str) -> None:
    """Name this process in every later log line (a forked child calls it first)."""
    global _process
    _process = name


def _utc(created: float) -> str:
    secs = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + \
        f".{int((created - secs) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-28T03:20:00.123Z 4242 p.switch.0 fluxrig.switch INFO message``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_utc(record.created)} {record.process} {_process} {record.name} "
                f"{record.levelname} {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback goes into ``exc`` (never across lines)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": _utc(record.created), "level": record.levelname, "logger": record.name,
               "pid": record.process, "process": _process, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(log_file: Path | None, *, fmt: str = "text", verbose: bool = False,
                  max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
    """Send every log line of this process (and of the children it forks) to one place.

    Args:
        log_file: the file (size-rotated, created 0600-free: the umask applies), or None
            for stderr.
        fmt: ``text`` or ``json``.
        verbose: DEBUG instead of INFO.
        max_bytes: rotate the file at this size (0: never).
        backups: rotated files kept (``rack.log.1`` ... ``rack.log.N``).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format: fmt={fmt!r}, expected one of {LOG_FORMATS}")
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = ConcurrentRotatingFileHandler(str(log_file), maxBytes=max_bytes,
                                                backupCount=backups)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # its reconnect noise is ours to log
