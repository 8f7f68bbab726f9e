"""What a tag publishes, and when — sans I/O.

Theory of operation
-------------------
One ``TagState`` per tag, owned by the poller of its device. The poller tells it what each
poll cycle found — ``good(value, now)`` (a decoded, scaled value), ``bad(reason, now)`` (a
Modbus exception code, ``timeout``, ``disconnected``) — and asks ``tick(now)`` once a cycle
for staleness. Each call returns the sample to publish, or None:

* ``good``: with ``publish: every_poll`` always; with ``on_change`` when the value moved by
  more than the deadband from the last *published* value (absolute, or percent of it; any
  change for text and booleans), when the quality was not ``good`` before, or when the last
  publication is ``heartbeat`` seconds old (unchanged values are republished at least that
  often, so a subscriber can tell "unchanged" from "gone");
* ``bad``: once per change of reason — a device that fails every poll publishes its failure
  once, not every poll — carrying the last good value (still visible, with the bad
  quality) and the time it was read;
* ``tick``: ``stale`` once, when the value is ``good`` but no read of it came for
  ``stale_after`` (polls overrunning, a read group starved); a failure says ``bad`` instead
  and stays ``bad`` (no bad/stale flapping); a later good read publishes ``good`` again.

Times are the caller's (``now``: ns since the epoch); nothing here reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

Value = int | float | str | bool
Quality = str  # "good" | "bad: <reason>" | "stale"

GOOD: Final = "good"
STALE: Final = "stale"


@dataclass(frozen=True, slots=True, kw_only=True)
class Publishing:
    """How a tag publishes (from its settings)."""

    mode: Literal["on_change", "every_poll"] = "on_change"
    deadband: float = 0.0          # 0: any change
    deadband_percent: bool = False  # the deadband is a percentage of the last value
    heartbeat_ns: int = 60_000_000_000  # 0: never republish an unchanged value
    stale_after_ns: int = 0        # 0: never stale


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One publication: the tag's value, quality and times (the frame body's fields)."""

    value: Value | None  # None: never read good
    quality: Quality
    ts_source: int       # when the value was read from the device (ns); 0: never
    ts: int              # when this sample was made (ns)


class TagState:
    """One tag's last value and publication (module doc)."""

    __slots__ = ("p", "value", "value_ts", "quality", "published", "published_ts")

    def __init__(self, publishing: Publishing):
        self.p = publishing
        self.value: Value | None = None   # last good value
        self.value_ts = 0                 # when it was read
        self.quality: Quality | None = None  # last published quality (None: nothing yet)
        self.published: Value | None = None  # last published value
        self.published_ts = 0

    def good(self, value: Value, now: int) -> Sample | None:
        """A good read of ``value`` at ``now``; the sample to publish, if any."""
        self.value, self.value_ts = value, now
        p = self.p
        due = (p.mode == "every_poll" or self.quality != GOOD
               or _moved(self.published, value, p.deadband, p.deadband_percent)
               or (p.heartbeat_ns > 0 and now - self.published_ts >= p.heartbeat_ns))
        return self._publish(GOOD, now) if due else None

    def bad(self, reason: str, now: int) -> Sample | None:
        """A failed read (``reason``: an exception code name, ``timeout``...)."""
        quality = f"bad: {reason}"
        return self._publish(quality, now) if quality != self.quality else None

    def tick(self, now: int) -> Sample | None:
        """Once a cycle: ``stale`` when no good read came for ``stale_after``."""
        p = self.p
        if (p.stale_after_ns > 0 and self.quality == GOOD
                and now - self.value_ts >= p.stale_after_ns):
            return self._publish(STALE, now)
        return None

    def _publish(self, quality: Quality, now: int) -> Sample:
        self.quality = quality
        self.published, self.published_ts = self.value, now
        return Sample(value=self.value, quality=quality, ts_source=self.value_ts, ts=now)


def _moved(last: Value | None, value: Value, deadband: float, percent: bool) -> bool:
    """Whether ``value`` differs from the last published one by more than the deadband."""
    if last is None or type(last) is not type(value):
        return True
    if isinstance(value, bool) or isinstance(value, str):
        return value != last
    assert isinstance(last, int | float)
    if isinstance(value, float) and (math.isnan(value) or math.isnan(last)):
        return not (math.isnan(value) and math.isnan(last))
    band = abs(last) * deadband / 100.0 if percent else deadband
    return abs(value - last) > band if band > 0 else value != last


__all__ = ["GOOD", "STALE", "Publishing", "Quality", "Sample", "TagState", "Value"]
