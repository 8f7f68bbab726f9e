"""The fleet registry's core: which racks exist, what each said about itself, and whether it
is online — sans I/O (no NATS, no files, no clock of its own).

States of a rack::

    never-seen --hello/heartbeat--> online --no heartbeat for offline_after--> offline
        ^ (added by ``mixer rack add``)    ^                                      |
                                           +------------hello/heartbeat-----------+

* ``add`` registers a rack the hub issued a passport for: ``never-seen`` until it speaks.
* ``observe`` records a hello or heartbeat (id, labels, version, rig hash, processes, start
  time) at the time the caller passes; a rack not added before is registered on the spot
  (the hub's permissions decide who may speak, not the registry).
* ``tick(now)`` turns racks silent for longer than ``offline_after`` offline.
* ``remove`` forgets a revoked rack.

Every state change is returned as a ``StateChange`` (and kept in ``history``) so the shell
can persist it and publish it; the registry itself never blocks. Times are nanoseconds
since the epoch, as in the racks' stats snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

NEVER_SEEN = "never-seen"
ONLINE = "online"
OFFLINE = "offline"
STATES = (NEVER_SEEN, ONLINE, OFFLINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class RackInfo:
    """What the registry knows of one rack.

    Attributes:
        id: the rack id.
        state: ``never-seen``, ``online`` or ``offline``.
        labels: the rack's labels (from its passport, then from what it says).
        version: the fluxrig version it runs ("" until it said).
        rig_hash: the hash of the rig it runs ("" until it said).
        processes: the number of processes it reported.
        started_ns: when the rack started (its own clock), 0 until it said.
        first_seen_ns, last_seen_ns: when the hub first/last heard it (0: never).
        changed_ns: when it entered its current state.
    """

    id: str
    state: str = NEVER_SEEN
    labels: Mapping[str, str] = field(default_factory=dict)
    version: str = ""
    rig_hash: str = ""
    processes: int = 0
    started_ns: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    changed_ns: int = 0

    def matches(self, selector: Mapping[str, str]) -> bool:
        """True when every ``key=value`` of ``selector`` is among the rack's labels."""
        return all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChange:
    """A rack moved from one state to another, at ``ts_ns``, for ``reason``."""

    rack: str
    ts_ns: int
    before: str
    after: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What a rack says of itself in a hello or a heartbeat (fields it leaves out: None)."""

    rack: str
    labels: Mapping[str, str] | None = None
    version: str | None = None
    rig_hash: str | None = None
    processes: int | None = None
    started_ns: int | None = None


class Registry:
    """Racks by id, their states and the history of state changes.

    Args:
        offline_after_ns: silence after which an online rack is offline (a few heartbeat
            intervals: one lost heartbeat must not flap the state).
    """

    def __init__(self, offline_after_ns: int):
        if offline_after_ns <= 0:
            raise ValueError(f"invalid offline_after_ns: {offline_after_ns}, rule=> 0")
        self.offline_after_ns = offline_after_ns
        self.racks: dict[str, RackInfo] = {}
        self.history: list[StateChange] = []
        # revoked racks: a report of theirs still in flight when they were removed (a stats
        # snapshot queued before the link was dropped) must not bring them back
        self.revoked: set[str] = set()

    def _move(self, info: RackInfo, after: str, ts_ns: int, reason: str) -> list[StateChange]:
        if info.state == after:
            return []
        change = StateChange(rack=info.id, ts_ns=ts_ns, before=info.state, after=after,
                             reason=reason)
        self.racks[info.id] = replace(info, state=after, changed_ns=ts_ns)
        self.history.append(change)
        return [change]

    def add(self, rack: str, labels: Mapping[str, str], now_ns: int) -> RackInfo:
        """Register ``rack`` (``never-seen``), or update the labels of a known one."""
        self.revoked.discard(rack)
        info = self.racks.get(rack)
        if info is None:
            info = RackInfo(id=rack, labels=dict(labels), changed_ns=now_ns)
        else:
            info = replace(info, labels={**info.labels, **labels})
        self.racks[rack] = info
        return info

    def remove(self, rack: str) -> bool:
        """Forget ``rack`` (revoked; its later reports are ignored); True if it was
        known."""
        self.revoked.add(rack)
        return self.racks.pop(rack, None) is not None

    def observe(self, report: Report, now_ns: int) -> list[StateChange]:
        """A hello or heartbeat from ``report.rack`` heard at ``now_ns`` (nothing for a
        revoked rack)."""
        if report.rack in self.revoked:
            return []
        info = self.racks.get(report.rack) or RackInfo(id=report.rack, changed_ns=now_ns)
        info = replace(
            info,
            labels=dict(report.labels) if report.labels is not None else info.labels,
            version=report.version if report.version is not None else info.version,
            rig_hash=report.rig_hash if report.rig_hash is not None else info.rig_hash,
            processes=report.processes if report.processes is not None else info.processes,
            started_ns=report.started_ns if report.started_ns is not None
            else info.started_ns,
            first_seen_ns=info.first_seen_ns or now_ns, last_seen_ns=now_ns)
        self.racks[report.rack] = info
        reason = "first heard" if info.state == NEVER_SEEN else "heard again"
        return self._move(info, ONLINE, now_ns, reason)

    def tick(self, now_ns: int) -> list[StateChange]:
        """Mark racks silent for longer than ``offline_after_ns`` offline."""
        changes: list[StateChange] = []
        for info in list(self.racks.values()):
            if info.state == ONLINE and now_ns - info.last_seen_ns > self.offline_after_ns:
                silent = (now_ns - info.last_seen_ns) / 1e9
                changes += self._move(info, OFFLINE, now_ns,
                                      f"no heartbeat for {silent:.1f} s")
        return changes

    def select(self, selector: Mapping[str, str] | None = None) -> list[RackInfo]:
        """Racks whose labels match ``selector`` (all without one), sorted by id."""
        return sorted((r for r in self.racks.values() if r.matches(selector or {})),
                      key=lambda r: r.id)

    def counts(self) -> dict[str, int]:
        """How many racks are in each state."""
        out = dict.fromkeys(STATES, 0)
        for info in self.racks.values():
            out[info.state] += 1
        return out


def parse_selector(items: Iterable[str]) -> dict[str, str]:
    """``["site=lab", "role=payments"]`` -> ``{"site": "lab", "role": "payments"}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid label selector {item!r} (expected key=value)")
        out[key] = value
    return out
