"""Ask a running Mixer's registry, with as little as possible loaded: ``mixer racks`` and
``mixer top`` are typed by people and polled by scripts (bar: ``mixer racks --json`` in
200 ms with 1,000 racks), and importing the Mixer (DuckDB, Arrow, the rig checker), typer
and nats-py cost more than the 20 ms question.

The registry answers on a Unix socket in the hub data dir (``registry.sock``, mode 0600:
whoever may read the hub's passwords may ask): ``<racks|top> <json query>\\n`` in, JSON out.
``quick_main`` is the ``mixer`` entry point's fast path for exactly those two questions;
anything else (help, a typo) goes to the typer CLI, which stays the one description of
every command.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

ASK_TIMEOUT = 2.0
SOCKET = "registry.sock"


class AskError(RuntimeError):
    """No Mixer to ask, or no answer; the message says which."""


def running(data_dir: Path) -> bool:
    """True while a Mixer supervisor holds ``data_dir``'s lock."""
    try:
        fd = os.open(data_dir / "mixer.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ask(data_dir: Path, what: str, query: dict[str, object]) -> bytes:
    """The registry's answer to ``what`` (``racks`` or ``top``) with ``query``.

    Raises:
        AskError: no Mixer running there, or no answer in time.
    """
    if not running(data_dir):
        raise AskError(f"no mixer running: data_dir={data_dir}")
    path = data_dir / SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(ASK_TIMEOUT)
            s.connect(str(path))
            s.sendall(f"{what} {json.dumps(query)}\n".encode())
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except OSError as exc:
        raise AskError(f"the registry did not answer on {path}: "
                       f"{exc.strerror or type(exc).__name__}") from None
    answer = b"".join(chunks)
    if not answer:
        raise AskError(f"the registry closed {path} without an answer")
    return answer


def quick_main(argv: list[str]) -> bool:
    """``mixer racks DIR [--json] [--label k=v]...`` and ``mixer top DIR --json`` without
    loading the CLI framework; False (nothing done) for anything else, or when the Mixer is
    not running (the full CLI then reads the registry's file or says why)."""
    if len(argv) < 2 or argv[0] not in ("racks", "top") or argv[1].startswith("-"):
        return False
    data_dir, rest = Path(argv[1]), argv[2:]
    labels: dict[str, str] = {}
    as_json = False
    i = 0
    while i < len(rest):
        if rest[i] == "--json":
            as_json = True
        elif rest[i] == "--label" and argv[0] == "racks" and i + 1 < len(rest) \
                and "=" in rest[i + 1] and not rest[i + 1].startswith("="):
            key, _, value = rest[i + 1].partition("=")
            labels[key] = value
            i += 1
        else:
            return False
        i += 1
    if not as_json or not running(data_dir):
        return False  # tables and errors: the full CLI
    try:
        answer = ask(data_dir, argv[0], {"labels": labels} if argv[0] == "racks" else {})
    except AskError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(1) from None
    sys.stdout.write(answer.decode() + "\n")
    return True
