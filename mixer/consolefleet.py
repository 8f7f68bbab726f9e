"""The console's picture of the fleet — sans I/O.

Theory of operation
-------------------
Once a second the console asks the registry for ``top`` (figures of every rack's latest
snapshot) and ``racks`` (state, labels, version, rig hash) and hands both to
``FleetBoard.update``. The board merges them into one row per rack, keeps a short history
of each rack's frames per second (the sparkline) and of the increases of each process's
error counter (a rack's "recent errors": the registry holds counters, not the racks' log
lines), and returns the rows that changed — what the live page is sent. The age of a
snapshot changes every second for every rack and is left out of "changed": the page
shows the state the registry derives from it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mixer.consoledata import mask_pans

SPARK_POINTS: Final = 60     # a minute at one update per second
RECENT_ERRORS: Final = 50    # error increases kept per rack
FIGURES: Final = ("frames_per_s", "p99_ms", "errors", "cpu_pct", "rss_mib", "backlog",
                  "link")


@dataclass(slots=True)
class _Rack:
    row: dict[str, Any]
    spark: deque[float] = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))
    process_errors: dict[str, int] = field(default_factory=dict)


def _rounded(v: Any) -> Any:
    return round(v, 2) if isinstance(v, float) else v


class FleetBoard:
    """Every rack's row, sparkline and recent errors (module doc)."""

    def __init__(self) -> None:
        self._racks: dict[str, _Rack] = {}
        self.version = 0  # bumped by every update that changed something

    def update(self, top: Sequence[Mapping[str, Any]], racks: Sequence[Mapping[str, Any]]
               ) -> list[dict[str, Any]]:
        """Merge one ``top`` and one ``racks`` answer; the rows that changed (with their
        newest sparkline point as ``spark_last``). Racks in neither are dropped."""
        info = {str(r["id"]): r for r in racks}
        figures = {str(r["rack"]): r for r in top}
        changed: list[dict[str, Any]] = []
        for rack in sorted(info.keys() | figures.keys()):
            i, f = info.get(rack, {}), figures.get(rack, {})
            row: dict[str, Any] = {
                "rack": rack, "state": i.get("state") or f.get("state") or "unknown",
                # labels come from enrolment; masked all the same (no PAN leaves the console)
                "labels": mask_pans(dict(i.get("labels") or {})), "version": i.get("version"),
                # the rig's hash shortened, as git shows commits (the whole is in `mixer
                # racks`): 64 hex digits can hold a run a card-number scanner would flag
                "rig": str(i["rig_hash"])[:12] if i.get("rig_hash") else None,
                "age_s": _rounded(f.get("age_s")),
                **{k: _rounded(f.get(k)) for k in FIGURES}}
            entry = self._racks.get(rack)
            if entry is None:
                entry = self._racks[rack] = _Rack(row={})
            fps = row["frames_per_s"]
            entry.spark.append(float(fps) if isinstance(fps, int | float) else 0.0)
            old, entry.row = entry.row, row
            if {k: v for k, v in old.items() if k != "age_s"} != \
                    {k: v for k, v in row.items() if k != "age_s"}:
                changed.append({**row, "spark_last": entry.spark[-1]})
        for gone in self._racks.keys() - (info.keys() | figures.keys()):
            del self._racks[gone]
            changed.append({"rack": gone, "state": "removed"})
        if changed:
            self.version += 1
        return changed

    def observe_processes(self, rack: str, processes: Sequence[Mapping[str, Any]],
                          ts_ns: int) -> None:
        """Note a rack's process rows (its detail): an error counter that grew is a recent
        error entry ``{ts_ns, process, count}``; a counter that fell (a restart) restarts."""
        entry = self._racks.get(rack)
        if entry is None:
            return
        for p in processes:
            name, n = str(p.get("name")), p.get("errors")
            if not isinstance(n, int):
                continue
            before = entry.process_errors.get(name)
            entry.process_errors[name] = n
            if before is not None and n > before:
                entry.errors.appendleft({"ts_ns": ts_ns, "process": name, "count": n - before})

    def rows(self, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every rack's row with its sparkline, by rack id; only those whose labels hold
        every ``labels`` pair when given."""
        out = []
        for rack in sorted(self._racks):
            entry = self._racks[rack]
            if labels and any(entry.row["labels"].get(k) != v for k, v in labels.items()):
                continue
            out.append({**entry.row, "spark": list(entry.spark)})
        return out

    def row(self, rack: str) -> dict[str, Any] | None:
        """One rack's row with its sparkline and recent errors, or None."""
        entry = self._racks.get(rack)
        if entry is None:
            return None
        return {**entry.row, "spark": list(entry.spark), "recent_errors": list(entry.errors)}


__all__ = ["FIGURES", "FleetBoard", "RECENT_ERRORS", "SPARK_POINTS"]
