"""Per-process counters and a latency histogram in shared memory.

Theory of operation
-------------------
Each rack process owns one counters segment (``engine.shm``, kind ``KIND_COUNTERS``). The
owning process is the only writer: it adds to integer slots and to histogram buckets. Any
other process (telemetry, ``engine status``, a test) maps the segment and reads it while the
writer runs; nobody ever resets a slot, so readers compute rates from differences between two
snapshots.

Every slot is an aligned int64, so each single value is read whole (an aligned 8-byte load is
atomic on the machines we run on). A snapshot is *not* a consistent cut across slots: a reader
may see ``frames_in`` from one batch and ``bytes_in`` from the next. That is fine for rates and
percentiles, and it keeps the writer free of locks.

Layout (segment payload, int64 slots)::

    slot 0 .. N_SCALARS-1      scalar counters: FRAMES_IN, FRAMES_OUT, ERRORS, BYTES_IN,
                               BYTES_OUT, RING_FULL_WAITS, then spares for later versions
    slot HIST_BASE ..          HIST_BUCKETS latency buckets, log-linear (see below)
    slot N_SLOTS ..            the gear's own named stats (``StatDef``), if it declares any

Gear stats: a gear declares named counters and gauges (``StatDef``: name, kind, labels,
help), e.g. the switch's outcomes by DE39 or its issuer links up. The supervisor sizes the
segment for them and writes their definitions into the rack's state file, so readers
(telemetry, ``engine status``) know each slot's name without importing the gear. The gear
increments them through ``Stats`` (a counter only grows; a gauge is set).

Histogram: latencies in nanoseconds go to log-linear buckets in the manner of HdrHistogram
with 3 sub-bucket bits: values below 16 have a bucket each; above, each power of two is cut
into 8 equal buckets, so a bucket's width is at most 1/8 of its lower bound (<= 12.5%
relative error). 320 buckets reach 2**41 ns (~36 min); larger values land in the last one.

The writer side uses a plain memoryview (an int64 add through a memoryview costs ~60 ns,
through a numpy scalar ~300 ns); readers use numpy views, where vectorised percentiles are
cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.shm import KIND_COUNTERS, Segment

FRAMES_IN = 0
FRAMES_OUT = 1
ERRORS = 2
BYTES_IN = 3
BYTES_OUT = 4
RING_FULL_WAITS = 5
TRACES_KEPT = 6  # the signal tap (``engine.tap``): traces written to the tap ring
TRACES_DROPPED = 7  # traces dropped: tap ring full, or over the keep-rule rate
LOGS_DROPPED = 8  # log records dropped: tap ring full
N_SCALARS = 16  # 9 used, the rest reserved so adding a counter keeps the layout
SCALAR_NAMES = ("frames_in", "frames_out", "errors", "bytes_in", "bytes_out", "ring_full_waits",
                "traces_kept", "traces_dropped", "logs_dropped")

SUB_BITS = 3
SUB_BUCKETS = 1 << SUB_BITS  # 8 buckets per power of two
HIST_BASE = N_SCALARS
HIST_BUCKETS = 320
N_SLOTS = HIST_BASE + HIST_BUCKETS
SEGMENT_SIZE = N_SLOTS * 8

_LINEAR_LIMIT = 2 * SUB_BUCKETS  # values below 16 are counted exactly
_MAX_BUCKET = HIST_BUCKETS - 1


def bucket_index(value_ns: int) -> int:
    """Histogram bucket of a latency in nanoseconds (negative values count as 0)."""
    if value_ns < _LINEAR_LIMIT:
        return value_ns if value_ns > 0 else 0
    shift = value_ns.bit_length() - (SUB_BITS + 1)  # keep the top 4 bits: 8..15
    index = shift * SUB_BUCKETS + (value_ns >> shift)
    return index if index < _MAX_BUCKET else _MAX_BUCKET


def bucket_bounds(index: int) -> tuple[int, int]:
    """Lowest and highest latency (ns, inclusive) that fall into bucket ``index``."""
    if index < _LINEAR_LIMIT:
        return index, index
    shift, sub = divmod(index, SUB_BUCKETS)
    shift -= 1
    mantissa = sub + SUB_BUCKETS
    return mantissa << shift, ((mantissa + 1) << shift) - 1


_UPPER = np.array([bucket_bounds(i)[1] for i in range(HIST_BUCKETS)], dtype=np.int64)


STAT_KINDS = ("counter", "gauge")


@dataclass(frozen=True, slots=True)
class StatDef:
    """One named stat slot of a gear.

    Attributes:
        name: metric name without the ``fluxrig`` prefix, dotted (``iso8583.responses``).
        kind: ``counter`` (only grows; rates are derived) or ``gauge`` (a level, set).
        help: one line for metric descriptions.
        labels: fixed label pairs telling slots of the same name apart (``(("de39", "00"),)``).
    """

    name: str
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STAT_KINDS:
            raise ValueError(f"invalid stat kind: name={self.name}, kind={self.kind!r}, "
                             f"allowed={','.join(STAT_KINDS)}")

    @property
    def key(self) -> str:
        """``name{k=v,...}``: unique per slot, used in snapshots and ``engine status``."""
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.labels) + "}"

    def to_json(self) -> list:
        """Plain form for the state file."""
        return [self.name, self.kind, self.help, [list(p) for p in self.labels]]

    @classmethod
    def from_json(cls, raw: Sequence) -> StatDef:
        """Inverse of ``to_json``."""
        return cls(raw[0], raw[1], raw[2], tuple((str(k), str(v)) for k, v in raw[3]))


class Stats:
    """A gear's named stat slots (owner process only writes; slots resolved once by key)."""

    __slots__ = ("defs", "values", "_index")

    def __init__(self, defs: Sequence[StatDef], view: memoryview):
        self.defs = tuple(defs)
        #: the int64 slots themselves, for hot paths: ``stats.values[i] += 1`` saves the
        #: method call (indices from ``slot``)
        self.values = view
        self._index = {d.key: i for i, d in enumerate(self.defs)}

    @classmethod
    def local(cls, defs: Sequence[StatDef]) -> Stats:
        """Stats in process memory (tests, tools): same interface, nobody else reads them."""
        return cls(defs, memoryview(bytearray(8 * max(1, len(defs)))).cast("q"))

    def slot(self, name: str, **labels: str) -> int:
        """Index of the slot ``name`` with exactly ``labels`` (declared order).

        Raises:
            KeyError: not declared by the gear.
        """
        d = StatDef(name, "counter", "", tuple(labels.items()))
        return self._index[d.key]

    def add(self, index: int, amount: int = 1) -> None:
        """Add to a counter (or move a gauge) at ``index``."""
        self.values[index] += amount

    def set(self, index: int, value: int) -> None:
        """Set a gauge."""
        self.values[index] = value

    def value(self, index: int) -> int:
        """Current value at ``index``."""
        return self.values[index]

    def as_dict(self) -> dict[str, int]:
        """``{key: value}`` for every slot."""
        return {d.key: self.values[i] for i, d in enumerate(self.defs)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CountersSnapshot:
    """A copy of one process's counters, taken by any process at one moment.

    Attributes:
        frames_in: frames the process took from its inputs.
        frames_out: frames it emitted.
        errors: frames or events it could not handle.
        bytes_in: payload bytes taken.
        bytes_out: payload bytes emitted.
        ring_full_waits: times it waited on a full output ring.
        traces_kept, traces_dropped, logs_dropped: what its signal tap took and dropped.
        histogram: latency bucket counts (int64 array of ``HIST_BUCKETS``).
        stats: the gear's named stat values (int64 array, one per declared ``StatDef``).
    """

    frames_in: int
    frames_out: int
    errors: int
    bytes_in: int
    bytes_out: int
    ring_full_waits: int
    histogram: np.ndarray
    stats: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    traces_kept: int = 0
    traces_dropped: int = 0
    logs_dropped: int = 0

    @property
    def latency_count(self) -> int:
        """Number of latencies recorded."""
        return int(self.histogram.sum())

    def percentile(self, q: float) -> int | None:
        """Latency (ns) at quantile ``q`` in [0, 1]: the upper bound of the bucket holding it.

        Returns:
            None when no latency was recorded.

        Raises:
            ValueError: ``q`` is outside [0, 1].
        """
        return percentiles(self.histogram, (q,))[0]


def percentiles(histogram: np.ndarray, qs: tuple[float, ...]) -> list[int | None]:
    """Latencies (ns) at quantiles ``qs`` of a bucket-count array; None where it is empty.

    The answer for a quantile is the upper bound of the bucket that holds it, so it never
    understates a latency (HdrHistogram's "highest equivalent value").

    Raises:
        ValueError: a quantile is outside [0, 1].
    """
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile out of range: q={q}, rule=0 <= q <= 1")
    cumulative = np.cumsum(histogram)
    total = int(cumulative[-1]) if len(cumulative) else 0
    if total == 0:
        return [None for _ in qs]
    out: list[int | None] = []
    for q in qs:
        rank = max(1, int(np.ceil(q * total)))
        index = int(np.searchsorted(cumulative, rank, side="left"))
        out.append(int(_UPPER[index]))
    return out


class Counters:
    """One process's counters segment: increment in the owner, snapshot anywhere."""

    __slots__ = ("segment", "_slots", "array", "n_stats")

    def __init__(self, segment: Segment):
        self.segment = segment
        total = segment.payload.nbytes // 8
        self.n_stats = total - N_SLOTS
        if self.n_stats < 0:
            raise ValueError(f"counters segment too small: name={segment.name}, "
                             f"slots={total}, min={N_SLOTS}")
        self._slots = segment.payload[:total * 8].cast("q")
        #: numpy view of every slot, for readers (shares memory with the segment)
        self.array: np.ndarray = np.frombuffer(segment.payload, dtype=np.int64, count=total)

    @classmethod
    def create(cls, name: str, stats: int = 0) -> Counters:
        """Create a zeroed counters segment ``name`` (replacing a stale one) with room for
        ``stats`` named gear stats after the histogram."""
        return cls(Segment.create(name, KIND_COUNTERS, SEGMENT_SIZE + 8 * stats))

    def stats(self, defs: Sequence[StatDef]) -> Stats:
        """The gear-stat slots of this segment, named by ``defs`` (owner process).

        Raises:
            ValueError: ``defs`` does not match the number of slots the segment was made for.
        """
        if len(defs) != self.n_stats:
            raise ValueError(f"stat definitions do not match the segment: "
                             f"name={self.segment.name}, defs={len(defs)}, "
                             f"slots={self.n_stats}")
        return Stats(defs, self._slots[N_SLOTS:])

    @classmethod
    def attach(cls, name: str) -> Counters:
        """Map an existing counters segment ``name`` (to read it)."""
        return cls(Segment.attach(name, KIND_COUNTERS))

    def add(self, slot: int, amount: int = 1) -> None:
        """Add ``amount`` to scalar ``slot`` (owner process only)."""
        self._slots[slot] += amount

    def count_batch(self, frames_in: int, frames_out: int, bytes_in: int, bytes_out: int) -> None:
        """Account a handled batch in one call (owner process only)."""
        s = self._slots
        s[FRAMES_IN] += frames_in
        s[FRAMES_OUT] += frames_out
        s[BYTES_IN] += bytes_in
        s[BYTES_OUT] += bytes_out

    def observe(self, latency_ns: int) -> None:
        """Record one latency in nanoseconds (owner process only)."""
        self._slots[HIST_BASE + bucket_index(latency_ns)] += 1

    def snapshot(self) -> CountersSnapshot:
        """Copy the counters now (any process, while the owner writes)."""
        values = self.array.copy()
        return CountersSnapshot(
            frames_in=int(values[FRAMES_IN]),
            frames_out=int(values[FRAMES_OUT]),
            errors=int(values[ERRORS]),
            bytes_in=int(values[BYTES_IN]),
            bytes_out=int(values[BYTES_OUT]),
            ring_full_waits=int(values[RING_FULL_WAITS]),
            histogram=values[HIST_BASE:N_SLOTS],
            stats=values[N_SLOTS:],
            traces_kept=int(values[TRACES_KEPT]),
            traces_dropped=int(values[TRACES_DROPPED]),
            logs_dropped=int(values[LOGS_DROPPED]),
        )

    def close(self) -> None:
        """Unmap the segment in this process."""
        self._slots.release()
        del self.array
        self.segment.close()

    def unlink(self) -> None:
        """Remove the segment name (owner, at shutdown)."""
        self.segment.unlink()
