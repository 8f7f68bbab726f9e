"""Matching issuer responses to requests in flight, with deadlines (sans-I/O, injected clock).

A request in flight is stored under its *key* (default DE41 + DE11; configurable, e.g. add
DE37) until its response arrives (``match``) or its deadline passes (``expire``). A second
request with a key already in flight is refused (the switch answers "94", duplicate
transmission). A response whose request already expired is *late*: it is recognised for
``late_window`` seconds after the deadline (counted, logged, never forwarded); anything else
is *unknown*.

Deadlines are kept in a heap; ``expire(now)`` pops everything due. Time comes from the
caller, so tests drive it without sleeping.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_KEY = ("41", "11")


def match_key(fields: Mapping[str, str], key_fields: Sequence[str] = DEFAULT_KEY) -> str:
    """The matching key of a message: its key fields joined by ``|`` (missing = empty)."""
    return "|".join(fields.get(f, "") for f in key_fields)


@dataclass(slots=True)
class Pending:
    """One request in flight."""

    key: str
    deadline: float
    context: Any


@dataclass(slots=True)
class MatcherStats:
    """Counts since start: matched, timed out, late responses, unknown responses, duplicates."""

    matched: int = 0
    timed_out: int = 0
    late: int = 0
    unknown: int = 0
    duplicates: int = 0


@dataclass(slots=True)
class Matcher:
    """In-flight table for one switch process."""

    timeout: float = 5.0
    late_window: float = 60.0
    pending: dict[str, Pending] = field(default_factory=dict)
    stats: MatcherStats = field(default_factory=MatcherStats)
    _heap: list[tuple[float, int, str]] = field(default_factory=list)
    _expired: dict[str, float] = field(default_factory=dict)  # key -> deadline, for "late"
    _seq: int = 0

    def add(self, key: str, context: Any, now: float) -> bool:
        """Register a request; False (and counted) if ``key`` is already in flight."""
        if key in self.pending:
            self.stats.duplicates += 1
            return False
        deadline = now + self.timeout
        self.pending[key] = Pending(key, deadline, context)
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, key))
        self._expired.pop(key, None)
        return True

    def match(self, key: str, now: float) -> tuple[str, Any]:
        """Classify a response: ``("matched", context)``, ``("late", None)`` or
        ``("unknown", None)``. A matched request leaves the table."""
        pending = self.pending.pop(key, None)
        if pending is not None:
            self.stats.matched += 1
            return "matched", pending.context
        deadline = self._expired.get(key)
        if deadline is not None and now - deadline <= self.late_window:
            del self._expired[key]
            self.stats.late += 1
            return "late", None
        self.stats.unknown += 1
        return "unknown", None

    def cancel(self, key: str) -> Any:
        """Remove a request without a response (e.g. the send failed); its context or None."""
        pending = self.pending.pop(key, None)
        return pending.context if pending else None

    def expire(self, now: float) -> list[Any]:
        """Contexts of every request whose deadline is <= ``now`` (removed from the table)."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            pending = self.pending.get(key)
            if pending is None or pending.deadline != deadline:
                continue  # answered already, or a newer request reuses the key
            del self.pending[key]
            self._expired[key] = deadline
            self.stats.timed_out += 1
            out.append(pending.context)
        if len(self._expired) > 100_000:  # bound memory under a storm of timeouts
            horizon = now - self.late_window
            self._expired = {k: d for k, d in self._expired.items() if d >= horizon}
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline in the table (possibly of an answered request), or None."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self.pending)
