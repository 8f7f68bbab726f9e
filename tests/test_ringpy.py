"""engine._ringpy (the pure-Python ring loops and ordered ops) against engine._ringcore (C):
the same bytes in one process, and one ring shared by a C side and a Python side across
forked processes."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
from conftest import FORK
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _ringcore, _ringpy
from engine import ring as ringmod
from engine.ring import Ring

CAP = 1024
IMPLS = {"C": _ringcore, "python": _ringpy}


def _region(fill: int = 0xAB) -> memoryview:
    return memoryview(bytearray([fill]) * CAP)


def _both_write(tail: int, limit: int, payloads: list, start: int = 0, type_: int = 1,
                max_payload: int = CAP // 8 - 8):
    """Run both writers on identical regions; return (C result, Python result, C bytes,
    Python bytes)."""
    regions = {name: _region() for name in IMPLS}
    results = {name: impl.write_records(regions[name], tail, limit, payloads, start, type_,
                                        max_payload) for name, impl in IMPLS.items()}
    return results["C"], results["python"], bytes(regions["C"]), bytes(regions["python"])


# --- one process: the same bytes, the same answers ----------------------------------------


@pytest.mark.parametrize(
    ("tail", "limit", "sizes", "result"),
    [
        (0, CAP, [0, 1, 7, 8, 9], (5, 8 + 16 + 16 + 16 + 24, 0)),
        (1000, 1000 + CAP, [8], (1, 1016, 0)),               # ends exactly at the end
        (1008, 1008 + CAP, [9], (1, 1008 + 16 + 24, 0)),      # padding of 16, then at 0
        (1016, 1016 + CAP, [0], (1, 1024, 0)),                # an empty record fills the end
        (1016, 1016 + 16, [8], (0, 1016, 1)),                 # padding + record do not fit
        (0, 24, [8, 8], (1, 16, 1)),                          # full after the first
        (0, CAP, [8, 200, 8], (1, 16, 2)),                    # 200 > max_payload=120
    ],
)
def test_writers_agree_on_counts_positions_and_bytes(tail, limit, sizes, result):
    payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    c, py, c_bytes, py_bytes = _both_write(tail, limit, payloads)
    assert c == py == result
    assert c_bytes == py_bytes


payload_lists = st.lists(st.binary(max_size=140), max_size=40)


@settings(max_examples=400, deadline=None)
@given(tail=st.integers(0, 4 * CAP).map(lambda t: t & ~7), slack=st.integers(0, CAP // 8),
       payloads=payload_lists, start=st.integers(0, 3),
       type_=st.sampled_from([0, 1, 2, 7, -2]))  # not -1: that type is the padding
def test_writers_give_identical_regions_and_readers_identical_records(tail, slack, payloads,
                                                                      start, type_):
    limit = tail + CAP - slack * 8
    c, py, c_bytes, py_bytes = _both_write(tail, limit, payloads, start, type_)
    assert c == py
    assert c_bytes == py_bytes
    count, new_tail, _ = c
    region = memoryview(bytearray(c_bytes)).toreadonly()
    for limit_ in (1, 3, 1 << 30):
        reads = {name: impl.read_records(region, tail, new_tail, limit_)
                 for name, impl in IMPLS.items()}
        (c_views, c_pos), (py_views, py_pos) = reads["C"], reads["python"]
        assert c_pos == py_pos
        assert [bytes(v) for v in c_views] == [bytes(v) for v in py_views]
        del c_views, py_views, reads
    views, pos = _ringpy.read_records(region, tail, new_tail, 1 << 30)
    assert [bytes(v) for v in views] == [bytes(p) for p in payloads[start:start + count]]
    assert pos == new_tail


def test_python_writer_takes_any_bytes_like_payload_as_c_does():
    payloads = [bytearray(b"abc"), memoryview(b"defgh"), memoryview(bytes(range(16))).cast("q")]
    c, py, c_bytes, py_bytes = _both_write(0, CAP, payloads)
    assert c == py == (3, 16 + 16 + 24, 0)
    assert c_bytes == py_bytes


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_corrupt_header_is_the_same_error_on_both_paths(impl):
    region = _region(0)
    region.cast("i")[0] = 4  # a length shorter than the header itself
    with pytest.raises(RuntimeError) as exc:
        impl.read_records(region.toreadonly(), 2048, 2048 + 64, 10)
    assert str(exc.value) == "corrupt ring record: position=2048, length=4, capacity=1024"


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_reader_refuses_a_region_that_is_not_a_byte_view(impl):
    with pytest.raises(TypeError) as exc:
        impl.read_records(_region().cast("q"), 0, 8, 1)
    assert str(exc.value) == "data must be a 1-D contiguous memoryview of format 'B'"


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_ordered_slot_ops_read_what_the_other_path_wrote(impl):
    other = _ringpy if impl is _ringcore else _ringcore
    slots = memoryview(bytearray(64)).cast("q")
    impl.store_release(slots, 3, -(2**63))
    impl.store_release(slots, 7, 2**63 - 1)
    assert other.load_acquire(slots, 3) == -(2**63)
    assert other.load_acquire(slots, 7) == 2**63 - 1
    impl.fence()
    with pytest.raises(IndexError):
        impl.load_acquire(slots, 8)
    with pytest.raises(IndexError):
        impl.store_release(slots, -1, 0)


# --- across processes: one ring, a C side and a Python side -------------------------------


def _use(impl: ModuleType) -> None:
    """In a forked child: make engine.ring run ``impl``'s loops and ordered ops (the names
    engine.ring calls are its module globals, bound once at import)."""
    for name in ("read_records", "write_records", "load_acquire", "store_release", "fence"):
        setattr(ringmod, name, getattr(impl, name))


BLOB = bytes(range(256)) * 3


def _payload(seq: int) -> bytes:
    # 8..300 bytes whose length and content both depend on seq: a misplaced, torn or
    # stale record cannot pass for the right one
    n = (seq * 7919) % 293
    start = seq % 251
    return seq.to_bytes(8, "little") + BLOB[start:start + n]


def _produce(ring: Ring, impl_name: str, total: int) -> None:
    _use(IMPLS[impl_name])
    p = ring.producer()
    sizes = random.Random(total)
    seq = 0
    while seq < total:
        batch = [_payload(seq + i) for i in range(min(sizes.randrange(1, 48), total - seq))]
        done = 0
        while done < len(batch):
            done += p.write(batch[done:], timeout=30.0)
        seq += len(batch)


def _consume(ring: Ring, impl_name: str, total: int, conn) -> None:
    _use(IMPLS[impl_name])
    c = ring.consumer()
    seen, bad = 0, None
    while seen < total:
        if not c.wait(10.0):
            break
        views = c.poll(100)
        for v in views:
            if bad is None and v != _payload(seen):
                bad = (seen, bytes(v[:8]).hex(), len(v))
            seen += 1
        del views
        c.commit()
    conn.send((seen, bad))


@pytest.mark.slow
@pytest.mark.parametrize(("producer_impl", "consumer_impl"),
                         [("C", "python"), ("python", "C"), ("python", "python")])
def test_c_and_python_sides_share_a_ring_across_processes(shm_name, producer_impl,
                                                          consumer_impl):
    """60,000 records of 8..300 bytes through a 4 KiB ring: thousands of wrap-arounds and
    ring-full waits on the doorbells, every record checked by sequence and content."""
    total = 60_000
    ring = Ring.create(shm_name("mix"), 4096)
    rx, tx = FORK.Pipe(duplex=False)
    consumer = FORK.Process(target=_consume, args=(ring, consumer_impl, total, tx))
    producer = FORK.Process(target=_produce, args=(ring, producer_impl, total))
    consumer.start()
    producer.start()
    try:
        assert rx.poll(120), "consumer did not report"
        seen, bad = rx.recv()
        producer.join(30)
        consumer.join(30)
        assert bad is None, f"first bad record (seq, first 8 bytes, length): {bad}"
        assert seen == total
        assert producer.exitcode == 0 and consumer.exitcode == 0
        stats = ring.statistics()
        assert stats.head == stats.tail > 500 * ring.capacity
        assert stats.full_waits > 0  # the producer really waited on the consumer
    finally:
        for proc in (producer, consumer):
            if proc.is_alive():
                proc.kill()
        ring.close()
        ring.unlink()
