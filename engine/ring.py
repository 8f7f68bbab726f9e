"""Single-producer single-consumer ring buffer in shared memory, with eventfd doorbells.

Theory of operation
-------------------
Modelled on Agrona's ``OneToOneRingBuffer``. One process writes records, one process reads
them; both map the same segment (``engine.shm``). Positions are 64-bit byte counts that never
wrap; the byte index of a position is ``position & (capacity - 1)``.

Who writes what:

* the producer owns the data region between head and tail + capacity, the ``TAIL`` slot, the
  ``PRODUCER_WAITING`` flag and the ``FULL_WAITS`` count;
* the consumer owns the ``HEAD`` slot and the ``CONSUMER_WAITING`` flag.

Publication: the producer copies a whole batch of records, then stores ``TAIL`` once
(``engine._ordering.store_release``). The consumer loads ``TAIL`` once per poll and reads every
record below it. So a record is visible only when complete, and one index store covers a batch.
(Agrona publishes record by record through the header's length; we publish through the tail
because a batch then costs one ordered store instead of one per record.)

Consumption: ``poll`` hands out zero-copy views and advances a *private* read position;
``commit`` publishes it to ``HEAD``. Until ``commit`` the producer cannot reuse that space, and
a consumer that dies before committing is replaced by one that re-reads from ``HEAD``: records
are delivered at least once, never skipped.

Crash survival: everything that matters is in shared memory. A restarted producer resumes at
``TAIL`` (a half-written, unpublished batch is simply overwritten); a restarted consumer resumes
at ``HEAD``.

Doorbells: an idle consumer sets ``CONSUMER_WAITING``, fences, re-checks the tail, then blocks
on an eventfd; the producer publishes the tail, fences, and rings the eventfd only when the
flag is set. The two full fences (``engine._ordering.fence``) make it impossible for both sides
to miss each other, so the producer pays no system call while the consumer is busy. A producer
facing a full ring does the same with ``PRODUCER_WAITING`` and a second eventfd rung by
``commit``. Sleeps are still cut into ``WAKE_SLICE`` slices as a guard against a peer that died
between the two steps; an idle consumer thus wakes once a second. Eventfds are inherited
through ``fork``: create the ring in the parent, then fork the producer and consumer.

Layout (segment payload, after the 128-byte ``engine.shm`` header)::

    0                                                            CONTROL_SIZE
    +--------+--------+-----------+-----------+-------------+-- ... --+
    | TAIL   | HEAD   | CONSUMER_ | PRODUCER_ | FULL_WAITS  |         |
    |        |        | WAITING   | WAITING   |             |         |
    +--------+--------+-----------+-----------+-------------+-- ... --+
    each slot an int64 at the start of its own 128-byte block (two cache lines, as Agrona,
    so the adjacent-line prefetcher does not make producer and consumer share a line)

    CONTROL_SIZE                                       CONTROL_SIZE + capacity
    +--------------------------------------------------------------+
    | data region: records, capacity a power of two               |
    +--------------------------------------------------------------+

Record (8-byte aligned)::

    0        4        8                     8 + n         aligned to 8
    +--------+--------+---------------------+-------------+
    | length | type   | payload (n bytes)   | (pad)       |
    | int32  | int32  |                     |             |
    +--------+--------+---------------------+-------------+
    length = n + 8 (header included, pad excluded); type PADDING (-1) fills the end of the
    data region when a record does not fit before the wrap.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from engine._ordering import RING_IN_C, fence, load_acquire, store_release
from engine.shm import KIND_RING, Segment

if RING_IN_C:
    from engine._ringcore import read_records, write_records
else:  # no compiler at install time, or FLUXRIG_PURE_PYTHON=1: see engine._ordering
    from engine._ringpy import read_records, write_records

# --- layout constants -------------------------------------------------------------------

SLOT_STRIDE = 128  # bytes between control slots: two 64-byte cache lines (Agrona's padding)
_Q = SLOT_STRIDE // 8  # the same stride in int64 units
TAIL = 0 * _Q
HEAD = 1 * _Q
CONSUMER_WAITING = 2 * _Q
PRODUCER_WAITING = 3 * _Q
FULL_WAITS = 4 * _Q
CONTROL_SIZE = 4096  # control block rounded to a page, so the data region is page aligned

HEADER_SIZE = 8  # int32 length + int32 type
ALIGNMENT = 8
PADDING = -1  # record type of the filler at the end of the data region
MSG = 1  # default record type
MIN_CAPACITY = 1024
MAX_RECORD_FRACTION = 8  # a record may take at most capacity/8 (Agrona's maxMsgLength)

_FULL = 1  # write_records status codes
_TOO_LARGE = 2
_EMPTY: list[memoryview] = []  # shared, never mutated: poll's answer when nothing is new

WAKE_SLICE = 1.0  # seconds: longest single sleep before re-checking the condition


class RingError(Exception):
    """Base class of ring errors."""


class RecordTooLargeError(RingError, ValueError):
    """A record is larger than the ring accepts; it is refused, never truncated.

    Attributes:
        index: position of the refused record in the batch (those before it are written).
    """

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True, slots=True, kw_only=True)
class RingStatistics:
    """A snapshot of a ring's positions, read without stopping either side.

    Attributes:
        capacity: data region size in bytes.
        tail: bytes ever published by the producer.
        head: bytes ever committed by the consumer.
        used: ``tail - head``, bytes waiting to be consumed.
        fill: ``used / capacity`` in [0, 1].
        full_waits: times the producer found the ring full and had to wait.
    """

    capacity: int
    tail: int
    head: int
    used: int
    fill: float
    full_waits: int


def record_size(payload_len: int) -> int:
    """Bytes a record of ``payload_len`` takes in the ring: header plus payload, 8-aligned."""
    return (payload_len + HEADER_SIZE + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def segment_size(capacity: int) -> int:
    """Payload bytes of the shared-memory segment holding a ring of ``capacity``."""
    return CONTROL_SIZE + capacity


class Doorbell:
    """An eventfd plus a waiting flag in shared memory: wake a sleeper only when it sleeps.

    The sleeper calls ``wait(ready, timeout)``; the other side calls ``ring_if_waiting()``
    after making progress. ``fd`` can be given to ``loop.add_reader`` by an asyncio process,
    which then calls ``arm()`` before awaiting and ``drain()`` when woken.
    """

    __slots__ = ("fd", "_slots", "_flag")

    def __init__(self, slots: memoryview, flag: int):
        self.fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._slots = slots
        self._flag = flag

    def ring_if_waiting(self) -> None:
        """Wake the other side if it announced it is (about to be) asleep."""
        if load_acquire(self._slots, self._flag):
            os.eventfd_write(self.fd, 1)

    def arm(self) -> None:
        """Announce that this side is going to sleep on ``fd``.

        The fence orders the flag store before the caller's re-check of the other side's
        position; with the matching fence on the waking side no wake-up is lost.
        """
        store_release(self._slots, self._flag, 1)
        fence()

    def disarm(self) -> None:
        """Announce that this side is awake again."""
        store_release(self._slots, self._flag, 0)

    def drain(self) -> None:
        """Reset the eventfd counter after a wake-up."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def wait(self, ready, timeout: float, spin: float = 0.0) -> bool:
        """Sleep until ``ready()`` is true or ``timeout`` seconds passed.

        Args:
            ready: callable re-checked after arming, after each wake-up and each slice.
            timeout: seconds; 0 checks once without sleeping.
            spin: seconds to busy-poll ``ready()`` before sleeping (Aeron's backoff idea):
                a wake-up through the kernel costs ~55 us at the median and far more in the
                tail on a VM whose idle vCPUs halt, so a latency-bound consumer spins a little
                first; an idle one still ends up asleep.

        Returns:
            The last value of ``ready()``.
        """
        if ready():
            return True
        if timeout <= 0:
            return False
        if spin > 0:
            clock = time.perf_counter
            end = clock() + min(spin, timeout)
            while clock() < end:
                if ready():
                    return True
        deadline = time.monotonic() + timeout
        self.arm()
        try:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                r, _, _ = select.select((self.fd,), (), (), min(remaining, WAKE_SLICE))
                if r:
                    self.drain()
            return True
        finally:
            self.disarm()

    async def wait_async(self, ready, timeout: float) -> bool:
        """``wait`` for asyncio processes: the eventfd is watched with ``loop.add_reader``."""
        import asyncio  # only io processes need it; stage workers never import asyncio

        if ready():
            return True
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        loop.add_reader(self.fd, woken.set)
        deadline = loop.time() + timeout
        self.arm()
        try:
            while not ready():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(woken.wait(), min(remaining, WAKE_SLICE))
                except TimeoutError:
                    pass
                woken.clear()
                self.drain()
            return True
        finally:
            self.disarm()
            loop.remove_reader(self.fd)

    def close(self) -> None:
        """Close the eventfd in this process."""
        os.close(self.fd)


class _NoBell:
    """The doorbell of a ring nobody sleeps on: ringing it does nothing."""

    def ring_if_waiting(self) -> None:
        pass

    def close(self) -> None:
        pass


_NO_BELL = _NoBell()


class Ring:
    """A ring segment with its two doorbells; get the two sides with ``producer()``/``consumer()``.

    Create it in the parent before forking; each child then takes its side. The creator unlinks
    the segment with ``unlink()`` when the rack stops.
    """

    def __init__(self, segment: Segment, doorbells: bool = True):
        self.segment = segment
        payload = segment.payload
        self.capacity: int = payload.nbytes - CONTROL_SIZE
        self.max_payload: int = self.capacity // MAX_RECORD_FRACTION - HEADER_SIZE
        self._slots = payload[:CONTROL_SIZE].cast("q")
        self._data = payload[CONTROL_SIZE:]
        self._words = self._data.cast("i")
        # Consumers hand out views of this read-only alias, so a handler cannot scribble on
        # records the producer owns.
        self._rodata = self._data.toreadonly()
        self._doorbells = doorbells
        self.data_bell: Doorbell
        self.space_bell: Doorbell
        if doorbells:
            self.data_bell = Doorbell(self._slots, CONSUMER_WAITING)
            self.space_bell = Doorbell(self._slots, PRODUCER_WAITING)
        else:  # observed, or a polled ring (the signal tap): nobody sleeps on it (waiting on
            # one is a programming error: it has no eventfd)
            self.data_bell = self.space_bell = cast(Doorbell, _NO_BELL)

    @classmethod
    def create(cls, name: str, capacity: int, kind: int = KIND_RING,
               doorbells: bool = True) -> Ring:
        """Create the ring segment ``name`` with a data region of ``capacity`` bytes.

        Args:
            name: shared-memory name (see ``engine.shm.Segment.create``).
            capacity: power of two, at least ``MIN_CAPACITY``.
            kind: segment kind: ``KIND_RING``, or ``KIND_TAP`` for a signal tap
                (``engine.tap``: polled, lossy, never adopted after a crash).
            doorbells: False for a ring whose consumer polls (no eventfds, no wake-ups).

        Raises:
            ValueError: capacity is not a power of two >= MIN_CAPACITY.
            engine.shm.SegmentInUseError: a live process owns ``name``.
        """
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(
                f"invalid ring capacity: capacity={capacity}, "
                f"rule=power of two >= {MIN_CAPACITY}"
            )
        return cls(Segment.create(name, kind, segment_size(capacity)), doorbells=doorbells)

    @classmethod
    def attach(cls, name: str, kind: int = KIND_RING) -> Ring:
        """Map an existing ring to observe it (``statistics``), or a tap ring to poll it;
        no doorbells."""
        return cls(Segment.attach(name, kind), doorbells=False)

    def producer(self) -> Producer:
        """The writing side, resuming at the published tail."""
        return Producer(self)

    def consumer(self) -> Consumer:
        """The reading side, resuming at the committed head."""
        return Consumer(self)

    def head(self) -> int:
        """The committed head: every record before it is consumed for good."""
        return load_acquire(self._slots, HEAD)

    def tail(self) -> int:
        """The published tail: every record before it is written."""
        return load_acquire(self._slots, TAIL)

    def statistics(self) -> RingStatistics:
        """Positions and fill, readable from any process while both sides run."""
        head = load_acquire(self._slots, HEAD)
        tail = load_acquire(self._slots, TAIL)
        used = max(0, tail - head)
        return RingStatistics(
            capacity=self.capacity,
            tail=tail,
            head=head,
            used=used,
            fill=used / self.capacity,
            full_waits=self._slots[FULL_WAITS],
        )

    def close(self) -> None:
        """Release this process's mapping and doorbells (views from ``poll`` must be gone)."""
        if self._doorbells:
            self.data_bell.close()
            self.space_bell.close()
        self._words.release()
        self._rodata.release()
        self._data.release()
        self._slots.release()
        self.segment.close()

    def unlink(self) -> None:
        """Remove the segment name (the creator calls this once, at shutdown)."""
        self.segment.unlink()


class Producer:
    """The writing side of a ring. Only one may be in use at a time."""

    __slots__ = (
        "_ring", "_slots", "_data", "_words", "_cap", "_mask", "_max", "_tail", "_head_cache",
        "_bell", "_space",
    )

    def __init__(self, ring: Ring):
        self._ring = ring
        self._slots = ring._slots
        self._data = ring._data
        self._words = ring._words
        self._cap = ring.capacity
        self._mask = ring.capacity - 1
        self._max = ring.max_payload
        self._tail = load_acquire(self._slots, TAIL)
        self._head_cache = load_acquire(self._slots, HEAD)
        self._bell = ring.data_bell
        self._space = ring.space_bell

    def try_write(self, payloads: Sequence[bytes], type_: int = MSG, wake: bool = True) -> int:
        """Write as many of ``payloads`` as fit now, publish them, and return how many.

        One tail store and at most one doorbell write cover the whole batch. A full ring is
        the return value (fewer than ``len(payloads)``), not an exception. ``wake=False``
        publishes without ringing a sleeping consumer (call ``wake`` later): a producer
        writing a few records at a time lets its consumer sleep until a batch is worth it.

        Raises:
            RecordTooLargeError: a payload exceeds ``max_payload`` (records before it are
                published; none is truncated).
        """
        tail = self._tail
        count, new_tail, status = write_records(
            self._data, tail, self._head_cache + self._cap, payloads, 0, type_, self._max
        )
        if status == _FULL:
            # The cached head said full; only now pay for a load of the real one.
            self._head_cache = load_acquire(self._slots, HEAD)
            more, new_tail, status = write_records(
                self._data, new_tail, self._head_cache + self._cap, payloads, count, type_,
                self._max,
            )
            count += more
        if new_tail != tail:
            self._tail = new_tail
            store_release(self._slots, TAIL, new_tail)
            if wake:
                fence()  # tail store before the flag load: see engine._ordering
                self._bell.ring_if_waiting()
        if status == _TOO_LARGE:
            size = len(payloads[count])
            raise RecordTooLargeError(
                f"record too large: index={count}, size={size}, max={self._max}, "
                f"capacity={self._cap}", count
            )
        return count

    def write(self, payloads: Sequence[bytes], type_: int = MSG, timeout: float = 1.0) -> int:
        """Write ``payloads`` in order, waiting up to ``timeout`` seconds for space.

        Returns:
            How many were written; fewer than ``len(payloads)`` only if the ring stayed full
            for ``timeout`` seconds (each call that had to wait counts one ring-full wait).

        Raises:
            RecordTooLargeError: as ``try_write``.
        """
        total = len(payloads)
        done = self.try_write(payloads, type_)
        if done == total:
            return done
        self._slots[FULL_WAITS] += 1  # only the producer writes this slot
        deadline = time.monotonic() + timeout
        while done < total:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pending = payloads[done:]
            need = record_size(len(pending[0])) * 2  # room for it even after a wrap padding
            self._space.wait(lambda: self._free() >= need, remaining)
            done += self.try_write(pending, type_)
        return done

    def _free(self) -> int:
        self._head_cache = load_acquire(self._slots, HEAD)
        return self._head_cache + self._cap - self._tail

    def wake(self) -> None:
        """Ring the consumer's doorbell if it sleeps (after ``try_write(wake=False)``)."""
        fence()  # our tail store before its flag load: see engine._ordering
        self._bell.ring_if_waiting()

    @property
    def capacity(self) -> int:
        """Bytes of the ring's data region."""
        return self._cap

    @property
    def max_payload(self) -> int:
        """The largest record the ring takes (``RecordTooLargeError`` above it)."""
        return self._max

    def free_bytes(self) -> int:
        """Bytes the producer could write now (reads the consumer's head)."""
        return self._free()

    async def wait_free_async(self, nbytes: int, timeout: float) -> bool:
        """Wait (asyncio, on the space doorbell) until ``nbytes`` are free; True if they are.

        ``nbytes`` should be a record's ``record_size`` doubled, so it fits even after a
        wrap padding.
        """
        return await self._space.wait_async(lambda: self._free() >= nbytes, timeout)

    async def write_async(self, payloads: Sequence[bytes], type_: int = MSG,
                          timeout: float = float("inf")) -> int:
        """``write`` for asyncio processes: waits for space without blocking the loop."""
        total = len(payloads)
        done = self.try_write(payloads, type_)
        if done == total:
            return done
        self._slots[FULL_WAITS] += 1
        import asyncio

        deadline = asyncio.get_running_loop().time() + timeout
        while done < total:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            pending = payloads[done:]
            need = record_size(len(pending[0])) * 2
            await self._space.wait_async(lambda: self._free() >= need, remaining)
            done += self.try_write(pending, type_)
        return done

    @property
    def full_waits(self) -> int:
        """Times a ``write`` found the ring full and waited."""
        return self._slots[FULL_WAITS]


class Consumer:
    """The reading side of a ring. Only one may be in use at a time.

    ``poll`` returns memoryviews straight into shared memory; they stay valid until the next
    ``commit``, after which the producer may overwrite them. Copy (``bytes(view)``) what must
    outlive the batch.
    """

    __slots__ = ("_ring", "_slots", "_data", "_words", "_mask", "_pos", "_bell", "_space")

    def __init__(self, ring: Ring):
        self._ring = ring
        self._slots = ring._slots
        self._data = ring._rodata
        self._words = ring._words
        self._mask = ring.capacity - 1
        self._pos = load_acquire(self._slots, HEAD)
        self._bell = ring.data_bell
        self._space = ring.space_bell

    def poll(self, limit: int = 1024) -> list[memoryview]:
        """Return up to ``limit`` published records after those already polled.

        Polling again before ``commit`` continues after the previous batch.
        """
        tail = load_acquire(self._slots, TAIL)
        if tail == self._pos:
            return _EMPTY
        views, self._pos = read_records(self._data, self._pos, tail, limit)
        return views

    def commit(self, position: int | None = None) -> None:
        """Release records to the producer (one head store).

        Args:
            position: commit only up to this position (a value of ``position`` taken after
                an earlier poll), for consumers with several batches in flight; default:
                everything polled so far.
        """
        store_release(self._slots, HEAD, self._pos if position is None else position)
        fence()  # head store before the flag load: see engine._ordering
        self._space.ring_if_waiting()

    def wait(self, timeout: float, spin: float = 0.0) -> bool:
        """Block until a record is available or ``timeout`` seconds passed; True if available.

        ``spin`` seconds are spent busy-polling before the doorbell (see ``Doorbell.wait``).
        """
        return self._bell.wait(self.available, timeout, spin)

    async def wait_async(self, timeout: float) -> bool:
        """``wait`` for asyncio processes."""
        return await self._bell.wait_async(self.available, timeout)

    def available(self) -> bool:
        """True when records past those already polled are published."""
        return load_acquire(self._slots, TAIL) != self._pos

    @property
    def position(self) -> int:
        """Byte position of the next record to poll."""
        return self._pos

    @property
    def committed(self) -> int:
        """Byte position published to the producer as consumed."""
        return load_acquire(self._slots, HEAD)


async def wait_any(consumers: Sequence[Consumer], rings: Sequence[Ring], timeout: float) -> bool:
    """Wait until any of ``consumers`` has records (asyncio; one eventfd reader per ring).

    For processes that consume several rings on one event loop (sinks, egress): the data
    doorbell of each ring is armed and watched with ``loop.add_reader``.
    """
    import asyncio  # only io processes call this; stage workers never import asyncio

    if any(c.available() for c in consumers):
        return True
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    bells = [r.data_bell for r in rings]
    for bell in bells:
        loop.add_reader(bell.fd, woken.set)
        bell.arm()
    try:
        if any(c.available() for c in consumers):
            return True
        try:
            await asyncio.wait_for(woken.wait(), timeout)
        except TimeoutError:
            pass
        return any(c.available() for c in consumers)
    finally:
        for bell in bells:
            bell.disarm()
            bell.drain()
            loop.remove_reader(bell.fd)
