"""The pure-Python twin of ``engine/_ringcore.c``: the same five functions, the same bytes.

Used when the C extension is not built (no compiler at install time) or refused
(``FLUXRIG_PURE_PYTHON=1``); ``engine._ordering`` and ``engine.ring`` pick one or the other
once per process. Both write the record layout drawn in ``engine/ring.py`` (native int32
length including the 8-byte header, int32 type, payload, padding to 8; a type -1 filler
before the wrap), so a C producer and a Python consumer share a ring, and the other way
round (``tests/test_ringpy.py``). Why the plain loads and stores below are ordered enough —
on x86-64 only — is argued in ``engine/_ordering.py``, which refuses this path elsewhere.

Cost on the dev machine (100-byte records in batches of 1,000): ~330 ns per record written
and ~260 ns read, against ~5 ns and ~40 ns in C; ``fence`` ~125 ns against ~50 ns. The
switch at max rate spent 12-24 % more CPU per transaction on the pure-Python path (this and
the CBOR reference encoder, ~6 µs a frame against ~1 µs) in ``perf/switch_bench.py --quick``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from typing import Final

__all__ = ["fence", "load_acquire", "read_records", "store_release", "write_records"]

_HEADER: Final = struct.Struct("=ii")  # native int32 length, int32 type: what the C side writes
_HEADER_SIZE: Final = 8
_PADDING: Final = -1
_FULL: Final = 1
_TOO_LARGE: Final = 2


def load_acquire(slots: memoryview, index: int) -> int:
    """Load int64 slot ``index`` of the ``"q"`` view ``slots`` with acquire order.

    Raises:
        IndexError: ``index`` is outside ``slots``.
    """
    if index < 0:  # a memoryview would count from the end; the C side refuses it
        raise IndexError(f"slot out of range: index={index}, slots={len(slots)}")
    return slots[index]  # type: ignore[no-any-return]  # a "q" view holds ints


def store_release(slots: memoryview, index: int, value: int) -> None:
    """Store int64 ``value`` at slot ``index`` of the ``"q"`` view ``slots`` with release order.

    Raises:
        IndexError: ``index`` is outside ``slots``.
    """
    if index < 0:
        raise IndexError(f"slot out of range: index={index}, slots={len(slots)}")
    slots[index] = value


_barrier = threading.Lock()


def fence() -> None:
    """Full memory fence: an uncontended lock taken and given back (two ``lock``-prefixed
    read-modify-writes on x86-64; see ``engine/_ordering.py``)."""
    _barrier.acquire()
    _barrier.release()


def _fresh_barrier() -> None:
    # A thread of the parent may have held the lock at the fork; the child's copy would
    # then stay held forever.
    global _barrier
    _barrier = threading.Lock()


os.register_at_fork(after_in_child=_fresh_barrier)


def write_records(data: memoryview, tail: int, limit: int, payloads: Sequence[bytes | bytearray | memoryview],
                  start: int, type_: int, max_payload: int) -> tuple[int, int, int]:
    """Copy records from ``payloads[start:]`` into the data region ``data`` from position
    ``tail``, never past position ``limit`` (committed head + capacity). Does not publish.

    Returns:
        ``(count, new_tail, status)``: status 0 all written, 1 stopped because the ring is
        full, 2 stopped at a payload larger than ``max_payload``.
    """
    cap = data.nbytes
    mask = cap - 1
    pack = _HEADER.pack_into
    count = 0
    status = 0
    for i in range(start, len(payloads)):
        item = payloads[i]
        if type(item) is not bytes:
            item = memoryview(item).cast("B")  # slice assignment wants matching formats
        n = len(item)
        if n > max_payload:
            status = _TOO_LARGE
            break
        size = (n + _HEADER_SIZE + 7) & ~7
        index = tail & mask
        to_end = cap - index
        if size > to_end:
            if tail + to_end + size > limit:
                status = _FULL
                break
            pack(data, index, to_end, _PADDING)
            tail += to_end
            index = 0
        elif tail + size > limit:
            status = _FULL
            break
        pack(data, index, n + _HEADER_SIZE, type_)
        data[index + _HEADER_SIZE:index + _HEADER_SIZE + n] = item
        tail += size
        count += 1
    return count, tail, status


def read_records(data: memoryview, pos: int, tail: int, limit: int) -> tuple[list[memoryview], int]:
    """Views of up to ``limit`` records between positions ``pos`` and ``tail`` of the data
    region ``data`` (a 1-D ``"B"`` memoryview), skipping padding, and the position after the
    last one. No payload byte is copied.

    Raises:
        TypeError: ``data`` is not a 1-D byte memoryview.
        RuntimeError: a record header is impossible (corrupt ring; the C text exactly).
    """
    if type(data) is not memoryview or data.ndim != 1 or data.format != "B":
        raise TypeError("data must be a 1-D contiguous memoryview of format 'B'")
    cap = data.nbytes
    mask = cap - 1
    unpack = _HEADER.unpack_from
    out: list[memoryview] = []
    count = 0
    while pos < tail and count < limit:
        index = pos & mask
        length, type_ = unpack(data, index)
        if length < _HEADER_SIZE or index + length > cap:
            raise RuntimeError(f"corrupt ring record: position={pos}, length={length}, "
                               f"capacity={cap}")
        if type_ == _PADDING:
            pos += length
            continue
        out.append(data[index + _HEADER_SIZE:index + length])
        pos += (length + 7) & ~7
        count += 1
    return out, pos
