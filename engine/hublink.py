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


def _verdict(lines: Iterable[str], state: str | None = None) -> str | None:
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


class LinkWatch:
    """``read_link_state`` for a process that asks every second (telemetry): it reads only
    what the log gained since the last call, and the whole story again only when the log
    was rotated or replaced (a long-linked rack's verdict may sit megabytes back)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._file: tuple[int, int] | None = None  # (inode, bytes read)
        self._state: str | None = None

    def state(self) -> str:
        """The link's state now."""
        path = self.data_dir / "nats-server.log"
        try:
            st = path.stat()
        except OSError:
            self._file = None
            return NEVER
        if self._file is None or self._file[0] != st.st_ino or st.st_size < self._file[1]:
            self._state = None if (s := read_link_state(self.data_dir)) == NEVER else s
        elif st.st_size > self._file[1]:
            with open(path, "rb") as f:
                f.seek(self._file[1])
                new = f.read(st.st_size - self._file[1]).decode(errors="replace")
            self._state = _verdict(new.splitlines(), self._state)
        self._file = (st.st_ino, st.st_size)
        return self._state or NEVER


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
