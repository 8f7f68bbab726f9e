"""The pure-Python ordered operations (engine._ringpy, argued in engine/_ordering.py) between
real processes on this machine: an 8-byte slot stored through a memoryview is never seen
half-written.

(The fence has no test of its own here: a store-buffering race run from Python does show
the reordering — both sides miss in ~0.3 % of rounds — but only with no call at all between
the store and the load; any Python call there, even an empty one, already hides it, so a
test could not tell the lock's barrier from the delay. engine/_ordering.py gives the figures
and the SDM argument; the doorbell tests of tests/test_ring.py run on this path in the
pure-Python suite.)"""

from __future__ import annotations

import mmap
import time

import pytest
from conftest import FORK

from engine._ringpy import load_acquire, store_release

# Slots of a shared anonymous mapping (inherited by fork), each on its own 128-byte block as
# in the ring's control block.
SLOT, READY, STOP = 0, 16, 32
# Every byte of each value equal: a torn load shows up as a value outside the set.
PATTERNS = [int.from_bytes(bytes([b]) * 8, "little", signed=True) for b in range(256)]


def _shared() -> memoryview:
    return memoryview(mmap.mmap(-1, 16 * 8 * 8)).cast("q")  # MAP_SHARED | MAP_ANONYMOUS


def _spin_until(slots: memoryview, index: int, value: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while load_acquire(slots, index) != value:  # the peer has nothing else to wait on
        if time.monotonic() > deadline:
            raise TimeoutError(f"slot {index} never became {value}")


def _hammer(slots: memoryview) -> None:
    store_release(slots, READY, 1)
    k = 0
    while load_acquire(slots, STOP) == 0:
        store_release(slots, SLOT, PATTERNS[k & 0xFF])
        k += 1


@pytest.mark.slow
def test_an_8_byte_slot_is_never_seen_half_written_by_another_process():
    slots = _shared()
    writer = FORK.Process(target=_hammer, args=(slots,))
    writer.start()
    try:
        _spin_until(slots, READY, 1)
        allowed = set(PATTERNS)
        torn, changes, last = [], 0, None
        deadline = time.monotonic() + 10.0
        while changes < 20_000 and time.monotonic() < deadline:
            for _ in range(1000):
                v = load_acquire(slots, SLOT)
                if v not in allowed:
                    torn.append(hex(v & (2**64 - 1)))
                changes += v != last
                last = v
        store_release(slots, STOP, 1)
        writer.join(10)
        assert writer.exitcode == 0
        assert torn == []
        assert changes >= 2_000  # the writer really ran on another core while we read
    finally:
        if writer.is_alive():
            writer.kill()
