"""A killed rack's segments, found at the next start: adopted, removed or kept.

A supervisor killed with SIGKILL leaves its rings (with records egress never stored), its
journals (with requests forwarded and never settled) and its counters in ``/dev/shm``. The
next start must not throw that work away, nor trust a file it did not make: each segment is
inspected without mapping (``engine.shm.inspect``: ours, mode 0600, a whole header), a
foreign one stops the start by name, one whose owner still lives means the rack is running
already, and the rest are offered to the new plan as it creates its segments
(:meth:`Leftovers.take`). What the plan did not take is removed when verifiably empty and
kept, and reported, when it still holds work (:meth:`Leftovers.settle`).

This lives beside ``engine/shm.py`` rather than in it: telling "empty" from "holds work"
needs the ring and journal layouts, which are built on ``shm``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from engine.journal import Journal
from engine.plan import STATE_FILE
from engine.ring import Ring
from engine.shm import (
    KIND_COUNTERS,
    KIND_JOURNAL,
    KIND_RING,
    KIND_TAP,
    SHM_DIR,
    ForeignSegmentError,
    Segment,
    SegmentHeader,
    inspect,
    mapping_pids,
    owner_alive,
    process_start_ticks,
    segment_names,
    unlink,
)

log = logging.getLogger("fluxrig.supervisor")


class LeftoverError(RuntimeError):
    """A leftover segment the rack must not touch: foreign, or owned by a live process."""


class Leftovers:
    """A killed supervisor's segments, found at start: adopted into the new plan where they
    fit (rings keep their unconsumed records, journals their open slots), removed only when
    verifiably empty, kept (and reported) otherwise.

    The processes of the previous run still alive (they got SIGTERM when their supervisor
    died and may still be draining) are stopped first, so nobody else touches a segment the
    new plan adopts.
    """

    def __init__(self, rack_id: str, data_dir: Path):
        self.prefix = f"fx-{rack_id}-"
        self.rack_id = rack_id
        self.data_dir = data_dir
        self.found: dict[str, SegmentHeader] = {}
        self.adopted: list[str] = []

    def scan(self) -> None:
        """Find the previous run's segments and stop its surviving processes.

        Raises:
            LeftoverError: a segment is not ours to touch, or its owner is alive (the same
                rack id running from another data dir).
        """
        for name in segment_names(self.prefix):
            try:
                header = inspect(name)
            except FileNotFoundError:
                continue
            except ForeignSegmentError as exc:
                raise LeftoverError(f"{exc}: remove it once you know who made it "
                                     f"(rm {SHM_DIR}/{name})") from None
            if header is not None and header.rack and header.rack != self.rack_id:
                continue  # another rack's, whose id extends ours (plant, plant-2)
            if header is None:  # our own, never sized: a creator killed mid-way
                log.warning("empty segment removed: name=%s", name)
                unlink(name)
                continue
            if owner_alive(header.owner_pid, header.owner_start):
                raise LeftoverError(
                    f"rack {self.rack_id!r} is running already: its segment {name} belongs "
                    f"to live pid {header.owner_pid} (the same rack id from another data dir?)")
            self.found[name] = header
        # only now: every owner is dead, so whoever still maps these is an orphan of the
        # killed run (stopping them first would have hit a live twin's workers)
        self._stop_survivors()

    def _stop_survivors(self) -> None:
        pids = set(mapping_pids(self.found))
        try:  # the previous run's nats-server (it maps no segment)
            old = json.loads((self.data_dir / STATE_FILE).read_text()).get("nats_pid")
            with open(f"/proc/{old}/cmdline", "rb") as f:
                if str(self.data_dir).encode() in f.read():
                    pids.add(int(old))
        except (OSError, ValueError, TypeError):
            pass
        if not pids:
            return
        log.warning("stopping processes of the previous run: rack=%s, pids=%s", self.rack_id,
                    sorted(pids))
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                pids = {p for p in pids if process_start_ticks(p) is not None}
                if not pids:
                    return
                time.sleep(0.05)  # other processes' exits have no event to wait on here

    def take(self, name: str, kind: int, payload_size: int) -> Segment | None:
        """The leftover ``name`` adopted as it is, or None: create a new one (there was none,
        or it was counters or empty work of another size, now removed).

        Raises:
            LeftoverError: the leftover holds work but this plan sizes it differently (ring
                capacity or journal slots changed since the run that made it): creating
                the new segment would throw that work away.
        """
        header = self.found.pop(name, None)
        if header is None:
            return None
        if (header.kind == kind and header.payload_size == payload_size
                and kind not in (KIND_COUNTERS, KIND_TAP)):  # these start again empty
            self.adopted.append(name)
            return Segment.adopt(name, kind, payload_size)
        held = _pending(name, header)
        if held:
            raise LeftoverError(
                f"segment {name} holds work of the previous run ({held}) but this plan sizes "
                f"it differently (payload {header.payload_size} bytes, now {payload_size}): "
                f"start the rack once with the settings that made it (rings.capacity, the "
                f"gear's journal) to drain it, or remove it to give that work up "
                f"(rm {SHM_DIR}/{name})")
        unlink(name)
        return None

    def settle(self) -> None:
        """Remove what is left and empty; keep and report what still holds work."""
        kept = []
        for name, header in sorted(self.found.items()):
            held = _pending(name, header)
            if held:
                kept.append(f"{name} ({held})")
            else:
                unlink(name)
        if self.adopted:
            log.warning("segments of the previous run adopted: rack=%s, count=%d", self.rack_id,
                        len(self.adopted))
        if kept:
            log.error("segments of the previous run kept, they still hold work no process of "
                      "this plan takes (start the rack with the plan that made them to drain "
                      "them): %s", ", ".join(kept))


def _pending(name: str, header: SegmentHeader) -> str:
    """What segment ``name`` still holds ("120 bytes", "3 slots"), or "" when it holds no
    work (counters never do)."""
    if header.kind == KIND_RING:
        ring = Ring.attach(name)
        try:
            used = ring.statistics().used
        finally:
            ring.close()
        return f"{used} bytes" if used else ""
    if header.kind == KIND_JOURNAL:
        journal = Journal.attach(name)
        try:
            slots = len(journal.pending())
        finally:
            journal.close_mapping()
        return f"{slots} slots" if slots else ""
    return ""
