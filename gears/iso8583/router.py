"""Routing of ISO 8583 requests to issuer endpoints (sans-I/O).

Rules are tried in order; the first whose every condition holds wins:

* ``bins``: PAN prefixes (``"4"``, ``"476173"``) or ranges of equal-length prefixes
  (``"510000-559999"``): the PAN's first ``len(lo)`` digits must lie in ``[lo, hi]``;
* ``mti``: accepted MTIs (``["0100", "0200"]``);
* ``processing_code``: prefixes of DE3 (``["00", "01"]``: purchase, cash);
* ``amount_min`` / ``amount_max``: DE4 as an integer, minor units, inclusive;
* ``currency``: accepted DE49 codes (``["840", "978"]``).

A rule names a destination ``group``: endpoints and a strategy:

* ``failover``: the first endpoint that is up, in listed order;
* ``round_robin``: rotate over the endpoints that are up;
* ``least_loaded``: the up endpoint with the fewest requests in flight (ties: listed order).

Endpoints are marked down by the link layer (connection lost) and skipped until marked up.
No rule: ``NoRoute`` (the switch declines with ``no_route_code``, default "92"); a rule but no
endpoint up: ``Unavailable`` (declined "91", issuer or switch inoperative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

STRATEGIES = ("failover", "round_robin", "least_loaded")


@dataclass(frozen=True, slots=True, kw_only=True)
class BinRange:
    """PAN prefixes ``lo``..``hi`` of equal length (a single prefix has lo == hi)."""

    lo: str
    hi: str

    @classmethod
    def parse(cls, text: str) -> BinRange:
        """``"4"`` or ``"510000-559999"``.

        Raises:
            ValueError: not digits, unequal lengths or lo > hi.
        """
        lo, _, hi = text.partition("-")
        hi = hi or lo
        if not (lo.isdigit() and hi.isdigit()) or len(lo) != len(hi) or lo > hi:
            raise ValueError(f"invalid BIN range {text!r} (expected digits like '4' or "
                             f"'510000-559999', equal lengths, lo <= hi)")
        return cls(lo=lo, hi=hi)

    def matches(self, pan: str) -> bool:
        """True when the PAN's prefix of this range's length lies in the range."""
        head = pan[: len(self.lo)]
        return len(head) == len(self.lo) and self.lo <= head <= self.hi


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One routing rule (see module docstring); None means "any"."""

    name: str
    group: str
    bins: tuple[BinRange, ...] = ()
    mti: frozenset[str] | None = None
    processing_code: tuple[str, ...] = ()
    amount_min: int | None = None
    amount_max: int | None = None
    currency: frozenset[str] | None = None

    def matches(self, mti: str, fields: Mapping[str, str]) -> bool:
        """Every condition of the rule holds for this request."""
        if self.mti is not None and mti not in self.mti:
            return False
        if self.bins:
            pan = fields.get("2", "")
            if not any(b.matches(pan) for b in self.bins):
                return False
        if self.processing_code and not fields.get("3", "").startswith(self.processing_code):
            return False
        if self.amount_min is not None or self.amount_max is not None:
            try:
                amount = int(fields.get("4", ""))
            except ValueError:
                return False
            if self.amount_min is not None and amount < self.amount_min:
                return False
            if self.amount_max is not None and amount > self.amount_max:
                return False
        if self.currency is not None and fields.get("49") not in self.currency:
            return False
        return True


@dataclass(slots=True, kw_only=True)
class Group:
    """Issuer endpoints behind one route, and how to pick one."""

    name: str
    endpoints: tuple[str, ...]
    strategy: str = "failover"
    _next: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"invalid strategy {self.strategy!r} (expected one of "
                             f"{', '.join(STRATEGIES)})")
        if not self.endpoints:
            raise ValueError(f"group {self.name!r} has no endpoints")


@dataclass(frozen=True, slots=True)
class Routed:
    """The request goes to ``endpoint`` of ``group`` because of ``rule``."""

    rule: str
    group: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No rule matched."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A rule matched but every endpoint of its group is down."""

    rule: str
    group: str


@dataclass(slots=True)
class Router:
    """Rules, groups and the live state of endpoints (up/down, in flight)."""

    rules: Sequence[Rule]
    groups: Mapping[str, Group]
    up: set[str] = field(default_factory=set)
    inflight: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rule in self.rules:
            if rule.group not in self.groups:
                raise ValueError(f"rule {rule.name!r} names unknown group {rule.group!r}")

    def mark_up(self, endpoint: str) -> None:
        """The link to ``endpoint`` is connected and usable."""
        self.up.add(endpoint)

    def mark_down(self, endpoint: str) -> None:
        """The link to ``endpoint`` is gone; skip it until ``mark_up``."""
        self.up.discard(endpoint)

    def begin(self, endpoint: str) -> None:
        """A request was sent to ``endpoint`` (for least_loaded)."""
        self.inflight[endpoint] = self.inflight.get(endpoint, 0) + 1

    def end(self, endpoint: str) -> None:
        """A request to ``endpoint`` completed, failed or timed out."""
        self.inflight[endpoint] = max(0, self.inflight.get(endpoint, 0) - 1)

    def route(self, mti: str, fields: Mapping[str, str]) -> Routed | NoRoute | Unavailable:
        """Where the request goes."""
        for rule in self.rules:
            if rule.matches(mti, fields):
                group = self.groups[rule.group]
                endpoint = self._pick(group)
                if endpoint is None:
                    return Unavailable(rule.name, group.name)
                return Routed(rule.name, group.name, endpoint)
        return NoRoute()

    def _pick(self, group: Group) -> str | None:
        live = [e for e in group.endpoints if e in self.up]
        if not live:
            return None
        if group.strategy == "failover":
            return live[0]
        if group.strategy == "round_robin":
            group._next = (group._next + 1) % len(live)
            return live[group._next]
        return min(live, key=lambda e: self.inflight.get(e, 0))
