"""The core of the Mixer's ``fleet`` process: the latest stats snapshot of every rack, and
what is made of it (a Prometheus scrape, rollup rows, ``mixer top``) — sans I/O.

Theory of operation
-------------------
The shell subscribes ``fluxrig.stats.*`` on the hub and hands every message to
``Fleet.observe(subject, payload, now_ns)``; it passes the hub's record of each rack's
labels (``set_labels``) and the registry's states (``set_state``). Nothing here reads a
clock, a socket or a file, except ``write_parquet``, which writes the file it is asked to.

* ``observe`` keeps a rack's latest snapshot (``mixer.fleetsnap.parse``: the payload must
  name the subject's rack) or counts why it refused it in ``dropped``.
* The labels on a rack's series are the enrolled ones; what a snapshot says of its own
  labels is kept for display (``Snapshot.claimed_labels``) and never exported, so a rack
  cannot move itself into another label selection.
* ``render`` serves a scrape: a rack is rendered once per new snapshot or label change (at
  the first scrape after it), a scrape joins the parts (``mixer.fleetmetrics``).
* ``rollup`` and ``top_rows``/``top_table`` read the same snapshots.

Everything runs in the fleet process's one event loop: no locks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]

from mixer import fleetmetrics, fleetrollup
from mixer.fleetsnap import Refused, Snapshot, parse

#: rollups skip racks whose latest snapshot is older than this (offline racks)
ROLLUP_MAX_AGE_NS = 30 * 10**9

_MIB = 1 << 20


class Fleet:
    """Latest snapshots by rack, enrolled labels, registry states and refusal counts.

    Attributes:
        dropped: refused snapshots by reason (``mixer.fleetsnap.REASONS``).
    """

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}
        self._latest: dict[str, Snapshot] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._states: dict[str, str] = {}
        self._parts: dict[str, fleetmetrics.RackPart] = {}  # rendered; absent: to render

    def observe(self, subject: str, payload: bytes, now_ns: int) -> bool:
        """Take a snapshot received on ``subject`` at ``now_ns`` (ns since the epoch).

        Returns:
            True if kept as the rack's latest; False if refused (counted in ``dropped``).
        """
        try:
            snap = parse(subject, payload, now_ns)
        except Refused as exc:
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            return False
        self._latest[snap.rack] = snap
        self._parts.pop(snap.rack, None)
        return True

    def set_labels(self, rack: str, labels: Mapping[str, str]) -> None:
        """The hub's record of ``rack``'s labels (its passport / ``racks.json``); they label
        every series of the rack, whatever its snapshots claim."""
        self._labels[rack] = {str(k): str(v) for k, v in labels.items()}
        self._parts.pop(rack, None)

    def set_state(self, rack: str, state: str) -> None:
        """The registry's state of ``rack`` (``online``...), counted in
        ``fluxrig_fleet_racks{state}`` and shown by ``mixer top``."""
        self._states[rack] = state

    def forget(self, rack: str) -> None:
        """Drop everything about ``rack`` (revoked)."""
        for table in (self._latest, self._labels, self._states, self._parts):
            table.pop(rack, None)

    def latest(self, rack: str) -> Snapshot | None:
        """``rack``'s latest snapshot, None if none was kept."""
        return self._latest.get(rack)

    def render(self, accept: str, now_ns: int) -> tuple[bytes, str]:
        """A scrape of the whole fleet: (body, content type) for the request's ``Accept``
        header (OpenMetrics when asked for, else the text format 0.0.4).

        Args:
            accept: the scrape request's ``Accept`` header.
            now_ns: the time of the scrape, for ``fluxrig_fleet_snapshot_age_seconds``.
        """
        openmetrics, ctype = fleetmetrics.content_type(accept)
        parts = []
        ages = []
        for rack, snap in self._latest.items():
            part = self._parts.get(rack)
            if part is None:
                part = self._parts[rack] = fleetmetrics.render_rack(
                    snap, self._labels.get(rack, {}))
            parts.append(part)
            ages.append((part.labels, max(0, now_ns - snap.received_ns) / 1e9))
        states: dict[str, int] = {}
        for state in self._states.values():
            states[state] = states.get(state, 0) + 1
        body = fleetmetrics.expose(parts, ages, states, self.dropped, openmetrics)
        return body, ctype

    def rollup(self, now_ns: int, max_age_ns: int = ROLLUP_MAX_AGE_NS) -> list[dict[str, Any]]:
        """One row per rack and process of the latest snapshots received within
        ``max_age_ns`` (columns: ``mixer.fleetrollup.SCHEMA``; times in ns)."""
        return fleetrollup.rows(self._latest.values(), now_ns, max_age_ns)

    def top_rows(self, now_ns: int, states: Mapping[str, str] | None = None
                 ) -> list[dict[str, Any]]:
        """``mixer top --json``: one dict per rack (with a snapshot or a state), by id.

        Keys: ``rack``, ``state``, ``frames_per_s`` (frames the rack's sources emitted per
        second: for the ISO 8583 switch, finished transactions), ``p99_ms`` (the slowest
        process's), ``errors`` (total since start), ``cpu_pct`` (its processes, 100 = one
        core), ``rss_mib`` (its processes; shared memory counts in each), ``backlog``
        (frames not yet at the hub), ``link`` (the rack's view of its link to the hub),
        ``age_s``; None where unknown.

        Args:
            now_ns: now, for the ages.
            states: rack -> registry state; default: those given to ``set_state``.
        """
        states = self._states if states is None else states
        out = []
        for rack in sorted(self._latest.keys() | states.keys()):
            snap = self._latest.get(rack)
            row: dict[str, Any] = dict.fromkeys(
                ("frames_per_s", "p99_ms", "errors", "cpu_pct", "rss_mib", "backlog",
                 "link", "age_s"))
            row.update(rack=rack, state=states.get(rack))
            if snap is not None:
                ps = snap.processes
                row.update(
                    frames_per_s=_sum(p.out_per_s for p in ps if p.role == "source"),
                    p99_ms=_max(p.p99_ns for p in ps),
                    errors=_sum(p.errors for p in ps),
                    cpu_pct=_sum(p.cpu_pct for p in ps),
                    rss_mib=_sum(p.rss for p in ps),
                    backlog=snap.hub_backlog, link=snap.link,
                    age_s=max(0, now_ns - snap.received_ns) / 1e9)
                if row["p99_ms"] is not None:
                    row["p99_ms"] /= 1e6
                if row["rss_mib"] is not None:
                    row["rss_mib"] /= _MIB
            out.append(row)
        return out

    def top_table(self, now_ns: int, states: Mapping[str, str] | None = None) -> str:
        """``mixer top``: the rows of ``top_rows`` as an aligned text table ('-': unknown)."""
        return format_top(self.top_rows(now_ns, states))


def write_parquet(rows: list[dict[str, Any]] | pa.Table, directory: Path, now_ns: int) -> Path:
    """``mixer.fleetrollup.write_parquet``: rollup rows to
    ``<directory>/rollups/<yyyy-mm-dd>/<hhmm>.parquet``, atomically."""
    return fleetrollup.write_parquet(rows, directory, now_ns)


def _sum(values: Any) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _max(values: Any) -> Any:
    return max((v for v in values if v is not None), default=None)


from mixer.views import format_top  # noqa: E402,F401 - the table lives with the light views
