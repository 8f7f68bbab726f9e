"""engine.counters: bucket math, percentiles, and reading another process's counters live."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import FORK
from engine.counters import (
    BYTES_IN,
    ERRORS,
    FRAMES_IN,
    HIST_BUCKETS,
    RING_FULL_WAITS,
    Counters,
    bucket_bounds,
    bucket_index,
    percentiles,
)


@pytest.mark.parametrize(
    ("value", "index"),
    [(-5, 0), (0, 0), (1, 1), (15, 15), (16, 16), (17, 16), (18, 17), (31, 23), (32, 24),
     (1000, 63), (10**9, 8 * 26 + 14)],
)
def test_bucket_index_table(value, index):
    assert bucket_index(value) == index


def test_every_value_falls_inside_its_bucket_within_one_eighth():
    rng = random.Random(1)
    values = list(range(0, 5000)) + [rng.randrange(1, 2**40) for _ in range(20000)]
    for v in values:
        lo, hi = bucket_bounds(bucket_index(v))
        assert lo <= v <= hi
        assert hi - lo <= max(lo, 1) / 8


def test_buckets_are_contiguous_and_increasing():
    previous_hi = -1
    for i in range(HIST_BUCKETS - 1):
        lo, hi = bucket_bounds(i)
        assert lo == previous_hi + 1
        previous_hi = hi


def test_huge_values_land_in_the_last_bucket():
    assert bucket_index(2**60) == HIST_BUCKETS - 1


def test_percentiles_of_a_known_distribution():
    hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
    for v in range(1, 1001):  # 1..1000 ns, uniform
        hist[bucket_index(v * 1000)] += 1  # 1 us .. 1 ms
    p50, p99, p100 = percentiles(hist, (0.5, 0.99, 1.0))
    assert 500_000 <= p50 <= 500_000 * 1.125
    assert 990_000 <= p99 <= 990_000 * 1.125
    assert 1_000_000 <= p100 <= 1_000_000 * 1.125


def test_percentiles_of_nothing_are_none_and_bad_quantiles_raise():
    hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
    assert percentiles(hist, (0.5, 0.99)) == [None, None]
    with pytest.raises(ValueError) as exc:
        percentiles(hist, (1.5,))
    assert str(exc.value) == "quantile out of range: q=1.5, rule=0 <= q <= 1"


def test_counts_and_histogram_in_one_process(shm_name):
    c = Counters.create(shm_name("c"))
    try:
        c.count_batch(frames_in=3, frames_out=2, bytes_in=300, bytes_out=200)
        c.add(ERRORS)
        c.add(RING_FULL_WAITS, 4)
        for v in (100, 200, 300, 400):
            c.observe(v)
        snap = c.snapshot()
        assert (snap.frames_in, snap.frames_out, snap.errors) == (3, 2, 1)
        assert (snap.bytes_in, snap.bytes_out, snap.ring_full_waits) == (300, 200, 4)
        assert snap.latency_count == 4
        assert snap.percentile(0.5) == bucket_bounds(bucket_index(200))[1]
    finally:
        c.close()
        c.unlink()


def _writer(name: str, total: int, done) -> None:
    c = Counters.attach(name)
    for i in range(total):
        c.add(FRAMES_IN)
        c.add(BYTES_IN, 10)
        c.observe(1000 + (i % 1000) * 1000)  # 1 us .. 1 ms
    done.set()


def test_another_process_reads_counters_while_the_owner_writes(shm_name):
    name = shm_name("live")
    owner = Counters.create(name)
    reader = Counters.attach(name)
    done = FORK.Event()
    total = 200_000
    proc = FORK.Process(target=_writer, args=(name, total, done))
    proc.start()
    try:
        seen = []
        while not done.is_set():
            snap = reader.snapshot()
            seen.append(snap.frames_in)
            assert snap.frames_in <= total
        proc.join(30)
        assert proc.exitcode == 0
        assert seen == sorted(seen)  # monotonic as read from outside
        final = reader.snapshot()
        assert final.frames_in == total and final.bytes_in == 10 * total
        assert final.latency_count == total
        p50, p99 = percentiles(final.histogram, (0.5, 0.99))
        assert 500_000 <= p50 <= 501_000 * 1.125
        assert 990_000 <= p99 <= 991_000 * 1.125
    finally:
        reader.close()
        owner.close()
        owner.unlink()
