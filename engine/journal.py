"""In-flight journal: a table of slots in shared memory that outlives the process using it.

Theory of operation
-------------------
A process that hands work to the outside world before it knows the outcome (the switch
forwarding a request to an issuer) writes what it would need to settle that work *if it
died* into a journal slot first, and clears the slot once the outcome is recorded and
delivered. The segment is created by the supervisor (``engine.shm``), so when the process is
killed the slots survive; its successor — or a supervisor adopting a dead rack's segments —
reads every slot that is not free and settles it (the switch queues a reversal).

Who writes what: one process at a time owns the journal (the replica it was made for); it
alone writes slots. Others read it only after the owner is gone. So there is no concurrency
to order, only *crash consistency*: a slot's payload is written before its header word, and
the header word is one aligned int64 store (``engine._ordering.store_release``), so a slot is
either free, or open with its whole payload, never half written.

Layout (segment payload)::

    0                  CONTROL_SIZE (128)                    CONTROL + slots * slot_size
    +------------------+-----------+-----------+-- ... --+-----------+
    | slot_size | slots| slot 0    | slot 1    |         | slot n-1  |
    | int64     | int64|           |           |         |           |
    +------------------+-----------+-----------+-- ... --+-----------+

    slot (slot_size bytes, a multiple of 16):
    0                8                                           slot_size
    +----------------+-------------------------------------------+
    | header (int64) | payload (length bytes, then zero)         |
    +----------------+-------------------------------------------+
    header: bits 0-7 state (FREE 0, OPEN 1, DECIDED 2), bits 8-15 flags (REVERSE 1),
            bits 32-62 payload length

* ``open(payload)`` -> slot: copy the payload, then publish ``OPEN|length``.
* ``decide(slot, reverse)``: the outcome is recorded elsewhere (the audit ring) but not yet
  delivered: ``DECIDED``, with ``REVERSE`` when the outcome must be undone if the delivery
  cannot be proven (an approval whose answer may not have left).
* ``close(slot)``: the header is set to FREE and, with ``wipe`` on, the payload zeroed (it
  may hold sealed card data, which must not outlive the transaction).
* ``take_over()``: the entries left open or decided by a predecessor, and the free list.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine._ordering import load_acquire, store_release
from engine.shm import KIND_JOURNAL, Segment

CONTROL_SIZE = 128
HEADER = 8
FREE, OPEN, DECIDED = 0, 1, 2
REVERSE = 1
MIN_SLOT_SIZE = 64
MAX_SLOTS = 1 << 20


class JournalError(Exception):
    """Base class of journal errors."""


class JournalFull(JournalError):
    """Every slot is in use (too much work in flight): a return value in ``try_open``."""


class PayloadTooLarge(JournalError, ValueError):
    """A payload does not fit a slot; nothing was written."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalSpec:
    """What a gear asks for: ``slots`` entries in flight of up to ``slot_size`` bytes."""

    slots: int
    slot_size: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalEntry:
    """A slot left by a predecessor: its index, state, whether to reverse, and payload."""

    slot: int
    state: int
    reverse: bool
    payload: bytes


def segment_size(slots: int, slot_size: int) -> int:
    """Payload bytes of a journal segment."""
    return CONTROL_SIZE + slots * slot_size


class Journal:
    """One journal segment; create it in the supervisor, use it in the forked owner."""

    __slots__ = ("segment", "slots", "slot_size", "max_payload", "wipe", "_q", "_data",
                 "_free", "_zero", "_words")

    def __init__(self, segment: Segment):
        self.segment = segment
        payload = segment.payload
        self._q = payload.cast("q")  # int64 view: control block and slot headers
        self.slot_size: int = self._q[0]
        self.slots: int = self._q[1]
        if (self.slot_size < MIN_SLOT_SIZE or self.slot_size % 16 or not 0 < self.slots
                <= MAX_SLOTS or segment_size(self.slots, self.slot_size) > payload.nbytes):
            raise JournalError(f"corrupt journal control block: name={segment.name}, "
                               f"slot_size={self.slot_size}, slots={self.slots}")
        self.max_payload = self.slot_size - HEADER
        self._data = payload
        self._words = self.slot_size // 8
        self._zero = memoryview(bytes(self.max_payload))
        self._free: list[int] | None = None  # built by take_over() in the owner
        #: zero a slot's payload on close (payloads holding sealed card data must not
        #: outlive their transaction); owners with nothing secret turn it off
        self.wipe = True

    @classmethod
    def create(cls, name: str, slots: int, slot_size: int = 1024) -> Journal:
        """Create journal ``name`` with ``slots`` slots of ``slot_size`` bytes, all free.

        Raises:
            ValueError: slots or slot_size out of range.
            engine.shm.SegmentInUseError: a live process owns ``name``.
        """
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"invalid journal slots: slots={slots}, rule=1..{MAX_SLOTS}")
        if slot_size < MIN_SLOT_SIZE or slot_size % 16:
            raise ValueError(f"invalid journal slot size: slot_size={slot_size}, "
                             f"rule=multiple of 16 >= {MIN_SLOT_SIZE}")
        seg = Segment.create(name, KIND_JOURNAL, segment_size(slots, slot_size))
        q = seg.payload.cast("q")
        q[0], q[1] = slot_size, slots
        q.release()
        return cls(seg)

    @classmethod
    def attach(cls, name: str) -> Journal:
        """Map an existing journal (to read or adopt it)."""
        return cls(Segment.attach(name, KIND_JOURNAL))

    def _header_index(self, slot: int) -> int:
        return (CONTROL_SIZE + slot * self.slot_size) // 8

    def pending(self) -> list[int]:
        """Slots not free (read by anyone, e.g. a supervisor at shutdown; owns nothing)."""
        return [slot for slot in range(self.slots)
                if load_acquire(self._q, self._header_index(slot)) & 0xFF != FREE]

    def take_over(self) -> list[JournalEntry]:
        """Become the owner: return the slots a predecessor left open or decided (to settle,
        then ``close``) and make every free slot available to ``open``."""
        entries, free = [], []
        for slot in range(self.slots - 1, -1, -1):
            word = load_acquire(self._q, self._header_index(slot))
            state = word & 0xFF
            if state == FREE:
                free.append(slot)
                continue
            length = word >> 32
            start = CONTROL_SIZE + slot * self.slot_size + HEADER
            if state not in (OPEN, DECIDED) or length > self.max_payload:
                # a header we never write: treat as an empty open slot so it is settled
                # (and wiped) rather than reused with garbage in it
                entries.append(JournalEntry(slot=slot, state=OPEN, reverse=False, payload=b""))
                continue
            entries.append(JournalEntry(
                slot=slot, state=state, reverse=bool(word >> 8 & REVERSE),
                payload=bytes(self._data[start:start + length])))
        self._free = free
        entries.reverse()
        return entries

    def open(self, payload: bytes) -> int:
        """Write ``payload`` to a free slot and publish it as OPEN; returns the slot.

        Raises:
            JournalFull: no free slot.
            PayloadTooLarge: more than ``max_payload`` bytes (nothing written).
            JournalError: ``take_over`` was not called in this process.
        """
        free = self._free
        if free is None:
            raise JournalError("journal used before take_over()")
        n = len(payload)
        if n > self.max_payload:
            raise PayloadTooLarge(f"journal payload too large: size={n}, "
                                  f"max={self.max_payload}")
        if not free:
            raise JournalFull(f"journal full: slots={self.slots}")
        slot = free.pop()
        start = CONTROL_SIZE + slot * self.slot_size + HEADER
        self._data[start:start + n] = payload
        store_release(self._q, self._header_index(slot), n << 32 | OPEN)
        return slot

    def decide(self, slot: int, reverse: bool) -> None:
        """Mark ``slot`` DECIDED (outcome recorded, delivery pending), optionally REVERSE."""
        h = self._header_index(slot)
        word = load_acquire(self._q, h)
        store_release(self._q, h, (word & ~0xFFFF) | (REVERSE << 8 if reverse else 0) | DECIDED)

    def close(self, slot: int) -> None:
        """Make ``slot`` free again (its payload wiped when ``wipe`` is on)."""
        h = self._header_index(slot)
        if not self.wipe:
            store_release(self._q, h, FREE)
            if self._free is not None:
                self._free.append(slot)
            return
        length = load_acquire(self._q, h) >> 32
        store_release(self._q, h, FREE)
        if length:
            start = CONTROL_SIZE + slot * self.slot_size + HEADER
            self._data[start:start + length] = self._zero[:min(length, self.max_payload)]
        if self._free is not None:
            self._free.append(slot)

    @property
    def in_use(self) -> int:
        """Slots open or decided (owner's view)."""
        return self.slots - len(self._free) if self._free is not None else 0

    def close_mapping(self) -> None:
        """Unmap in this process."""
        self._zero.release()
        self._q.release()
        self.segment.close()

    def unlink(self) -> None:
        """Remove the segment name (the creator, at shutdown)."""
        self.segment.unlink()
