"""A linked rack's view of its hub link, for ``engine status`` and the stats snapshot.

nats-server keeps no error state for a leaf remote (``/leafz`` lists only live links), so
why a link is down is only in the rack's ``nats-server.log`` (``docs/mixer-design.md``
section 1). ``link_state`` reads the lines in order and keeps the last verdict:

==============================================================  ===============================
log line                                                        state
==============================================================  ===============================
``JetStream using domains: local ..., remote "hub"``            ``up``
``Leafnode Error 'Authorization Violation'``                    ``refused (authorization)``
``TLS leafnode handshake error: <why>``                         ``refused (tls: <why>)``
``Error trying to connect as leafnode ...: <why>``              ``down (<why>)``
``Duplicate Remote LeafNode Connection``                        ``flapping (another leaf uses
                                                                this rack's name)``
``Leafnode connection closed`` after ``up``                     ``down (link closed)``
==============================================================  ===============================
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TAIL_BYTES = 1 << 20  # the log's last MiB: a link's story, not the whole file
NEVER = "connecting (no answer from the hub yet)"


def link_state(lines: Iterable[str]) -> str:
    """The link's state after ``lines`` (a nats-server log, oldest first)."""
    return _verdict(lines) or NEVER


def _verdict(lines: Iterable[str]) -> str | None:
    state: str | None = None
    for line in lines:
        if "Leafnode" not in line and "leafnode" not in line and "JetStream using" not in line:
            continue
        if "JetStream using domains" in line:
            state = "up"
        elif "Authorization Violation" in line:
            state = "refused (authorization)"
        elif "TLS leafnode handshake error" in line:
            why = line.split("handshake error:", 1)[1].strip()
            state = f"refused (tls: {why.removeprefix('tls: ')})"
        elif "Error trying to connect as leafnode" in line:
            why = line.rsplit(": ", 1)[-1].strip()
            state = f"down ({why})"
        elif "Duplicate Remote LeafNode" in line:
            state = "flapping (another leaf uses this rack's name)"
        elif "Leafnode connection closed" in line and state == "up":
            state = "down (link closed)"
    return state


def _read(path: Path, tail: int | None) -> list[str]:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = 0 if tail is None else max(0, size - tail)
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    return lines[1:] if start else lines  # the first line of a tail may be cut


def read_link_state(data_dir: Path) -> str:
    """``link_state`` of ``<data_dir>/nats-server.log``: its last MiB, else the whole file
    (the server rotates it at 16 MiB), else the newest rotated file; NEVER without any."""
    path = Path(data_dir) / "nats-server.log"
    rotated = sorted(path.parent.glob(path.name + ".*"),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate, tail in ((path, TAIL_BYTES), (path, None), *((r, None) for r in rotated[:1])):
        try:
            verdict = _verdict(_read(candidate, tail))
        except OSError:
            continue
        if verdict is not None:
            return verdict
    return NEVER
