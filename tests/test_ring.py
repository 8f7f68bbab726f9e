"""engine.ring: layout edges in one process, then real producer/consumer processes."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from conftest import FORK
from engine import ring as ringmod
from engine.ring import MSG, RecordTooLargeError, Ring, record_size
from engine.shm import SegmentInUseError, process_start_ticks


def _drain(consumer, limit=1 << 30) -> list[bytes]:
    out = []
    while True:
        views = consumer.poll(limit)
        if not views:
            return out
        out.extend(bytes(v) for v in views)
        del views
        consumer.commit()


@pytest.fixture
def ring(shm_name):
    r = Ring.create(shm_name("ring"), 4096)
    yield r
    r.close()
    r.unlink()


# --- single process: layout and edges ------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "message"),
    [
        (1000, "invalid ring capacity: capacity=1000, rule=power of two >= 1024"),
        (512, "invalid ring capacity: capacity=512, rule=power of two >= 1024"),
        (3 << 10, "invalid ring capacity: capacity=3072, rule=power of two >= 1024"),
    ],
)
def test_create_rejects_bad_capacity(shm_name, capacity, message):
    with pytest.raises(ValueError) as exc:
        Ring.create(shm_name(), capacity)
    assert str(exc.value) == message


@pytest.mark.parametrize(("n", "size"), [(0, 8), (1, 16), (7, 16), (8, 16), (9, 24), (200, 208)])
def test_record_size_is_header_plus_payload_aligned_to_8(n, size):
    assert record_size(n) == size


def test_records_come_out_in_order_with_their_bytes(ring):
    p, c = ring.producer(), ring.consumer()
    payloads = [b"", b"a", b"hello world", bytes(range(256))]
    assert p.try_write(payloads) == 4
    assert _drain(c) == payloads


def test_empty_ring_polls_nothing_and_does_not_wait(ring):
    c = ring.consumer()
    assert c.poll() == []
    assert not c.available()
    assert c.wait(0) is False


def test_poll_limit_and_repeated_polls_continue(ring):
    p, c = ring.producer(), ring.consumer()
    p.try_write([bytes([i]) for i in range(10)])
    first = [bytes(v) for v in c.poll(limit=4)]
    second = [bytes(v) for v in c.poll(limit=100)]
    assert first == [bytes([i]) for i in range(4)]
    assert second == [bytes([i]) for i in range(4, 10)]


def test_views_are_zero_copy_and_read_only(ring):
    p, c = ring.producer(), ring.consumer()
    p.try_write([b"abcdef"])
    (view,) = c.poll()
    assert view.readonly
    assert view.obj is not None  # shares the ring's buffer rather than owning bytes
    with pytest.raises(TypeError):
        view[0] = 0
    del view


def test_full_ring_is_a_return_value_and_commit_frees_space(ring):
    p, c = ring.producer(), ring.consumer()
    payload = b"x" * (record_size(100) - 8)  # 104-byte records, 112 in the ring
    batch = [payload] * 100  # 11,200 bytes offered to a 4,096-byte ring
    written = p.try_write(batch)
    assert written == 4096 // 112
    assert p.try_write([payload]) == 0
    assert len(c.poll()) == written
    assert p.try_write([payload]) == 0  # polled but not committed: space still held
    c.commit()
    assert p.try_write([payload]) == 1


def test_write_waits_bounded_and_counts_the_wait(ring):
    p = ring.producer()
    payload = b"y" * 100
    p.try_write([payload] * 100)
    t0 = time.monotonic()
    assert p.write([payload], timeout=0.05) == 0
    assert time.monotonic() - t0 >= 0.05
    assert p.full_waits == 1
    assert ring.statistics().full_waits == 1


def test_a_record_ending_exactly_at_the_end_is_followed_by_one_at_zero(ring):
    p, c = ring.producer(), ring.consumer()
    assert p.try_write([b"a" * 496] * 7) == 7  # 7 * 504 = 3,528: 568 bytes before the end
    assert len(_drain(c)) == 7
    batch = [b"b" * 400, b"c" * 152, b"d" * 300]  # 408 + 160 = 568 exactly, then wrap
    assert p.try_write(batch) == 3
    assert _drain(c) == batch
    stats = ring.statistics()
    assert stats.head == stats.tail == 3528 + 568 + 312
    assert ring._words[0] == 300 + 8  # no padding record: the third record sits at 0


def test_wrap_needs_room_for_padding_plus_record(ring):
    p, c = ring.producer(), ring.consumer()
    p.try_write([b"a" * 496] * 7)  # 7 * 504 = 3,528; 568 left before the end
    c.poll()
    c.commit()
    big = b"z" * (ring.max_payload)  # 504 bytes -> 512 in the ring: fits before the end
    assert p.try_write([big, big]) == 2  # second one pads 56 bytes and wraps
    assert _drain(c) == [big, big]


def test_oversize_record_is_refused_whole_and_earlier_ones_publish(ring):
    p, c = ring.producer(), ring.consumer()
    assert ring.max_payload == 4096 // 8 - 8
    with pytest.raises(RecordTooLargeError) as exc:
        p.try_write([b"ok", b"q" * (ring.max_payload + 1), b"never"])
    assert str(exc.value) == "record too large: index=1, size=505, max=504, capacity=4096"
    assert _drain(c) == [b"ok"]
    assert p.try_write([b"q" * ring.max_payload]) == 1


def test_uncommitted_records_are_read_again_by_a_new_consumer(ring):
    p = ring.producer()
    p.try_write([b"one", b"two", b"three"])
    c1 = ring.consumer()
    views = c1.poll(limit=1)
    assert bytes(views[0]) == b"one"
    del views
    c1.commit()
    assert [bytes(v) for v in c1.poll()] == [b"two", b"three"]
    # c1 dies here without committing: its successor starts at the committed head
    c2 = ring.consumer()
    assert c2.position == c2.committed
    assert _drain(c2) == [b"two", b"three"]


def test_a_new_producer_resumes_at_the_published_tail(ring):
    ring.producer().try_write([b"first"])
    ring.producer().try_write([b"second"])
    assert _drain(ring.consumer()) == [b"first", b"second"]


def test_record_type_is_stored_in_the_header(ring):
    p = ring.producer()
    p.try_write([b"abc"], type_=7)
    words = ring._words
    assert (words[0], words[1]) == (3 + 8, 7)
    p.try_write([b"d"])
    assert words[(16 >> 2) + 1] == MSG


# --- segment ownership ------------------------------------------------------------------


def test_second_create_while_owner_lives_is_refused(ring):
    with pytest.raises(SegmentInUseError) as exc:
        Ring.create(ring.segment.name, 4096)
    assert str(exc.value) == f"segment in use: name={ring.segment.name}, owner_pid={os.getpid()}"


def test_stale_segment_of_a_killed_owner_is_replaced(shm_name, caplog):
    name = shm_name("stale")

    def owner():
        r = Ring.create(name, 4096)
        r.producer().try_write([b"left behind"])
        os.kill(os.getpid(), signal.SIGKILL)

    proc = FORK.Process(target=owner)
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert os.path.exists(f"/dev/shm/{name}")
    r = Ring.create(name, 4096)
    try:
        assert r.consumer().poll() == []  # a fresh ring, not the dead owner's data
        assert r.segment.header.owner_pid == os.getpid()
        assert f"stale segment replaced: name={name}, dead_owner_pid={proc.pid}" in caplog.text
    finally:
        r.close()
        r.unlink()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_process_start_ticks_tells_a_recycled_pid_apart():
    mine = process_start_ticks(os.getpid())
    assert mine is not None and mine > 0
    assert process_start_ticks(2**22 + 12345) is None


# --- real processes ---------------------------------------------------------------------

BLOB = random.Random(99).randbytes(1 << 16)


def _payload(seq: int, rng: random.Random) -> bytes:
    n = rng.randrange(0, 600)
    start = rng.randrange(0, len(BLOB) - n)
    return seq.to_bytes(8, "little") + BLOB[start : start + n]


def _produce(ring: Ring, total: int, seed: int) -> None:
    p = ring.producer()
    rng = random.Random(seed)  # payloads: the consumer replays the same sequence
    sizes = random.Random(seed + 1)  # batch sizes: producer only
    seq = 0
    while seq < total:
        n = min(sizes.randrange(1, 65), total - seq)
        batch = [_payload(seq + i, rng) for i in range(n)]
        done = 0
        while done < len(batch):
            done += p.write(batch[done:], timeout=30.0)
        seq += len(batch)


def _verify(ring: Ring, total: int, seed: int, conn) -> None:
    c = ring.consumer()
    rng = random.Random(seed)
    expected = 0
    bad = None
    while expected < total:
        if not c.wait(10.0):
            break
        views = c.poll(256)
        for v in views:
            want = _payload(expected, rng)
            if v != want and bad is None:
                bad = (expected, len(v), len(want))
            expected += 1
        del views
        c.commit()
    conn.send((expected, bad))


@pytest.mark.slow
def test_two_processes_move_a_million_random_records_in_order(shm_name):
    """1,000,000 records of 8..607 bytes through a 64 KiB ring: thousands of wrap-arounds."""
    total, seed = 1_000_000, 12345
    ring = Ring.create(shm_name("million"), 1 << 16)
    rx, tx = FORK.Pipe(duplex=False)
    consumer = FORK.Process(target=_verify, args=(ring, total, seed, tx))
    producer = FORK.Process(target=_produce, args=(ring, total, seed))
    consumer.start()
    producer.start()
    try:
        assert rx.poll(240), "consumer did not report"
        count, bad = rx.recv()
        producer.join(30)
        consumer.join(30)
        assert bad is None, f"first mismatch (seq, got_len, want_len): {bad}"
        assert count == total
        assert producer.exitcode == 0 and consumer.exitcode == 0
        stats = ring.statistics()
        assert stats.tail == stats.head and stats.tail > 50 * ring.capacity  # many wraps
    finally:
        for proc in (producer, consumer):
            if proc.is_alive():
                proc.kill()
        ring.close()
        ring.unlink()


def _logging_consumer(ring: Ring, log_path: str, total: int, started) -> None:
    c = ring.consumer()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    handled = 0
    while True:
        if not c.wait(10.0):
            return
        views = c.poll(64)
        seqs = b"".join(bytes(v[:8]) for v in views)
        del views
        os.write(fd, seqs)  # "handled": recorded before the commit, like a real sink
        c.commit()
        handled += len(seqs) // 8
        if handled >= total // 4:
            started.set()
        if seqs and int.from_bytes(seqs[-8:], "little") == total - 1:
            return


@pytest.mark.slow
def test_consumer_killed_mid_stream_restarts_at_committed_head_and_loses_nothing(
    shm_name, tmp_path
):
    total, seed = 200_000, 7
    ring = Ring.create(shm_name("kill"), 1 << 15)
    log_path = str(tmp_path / "handled.bin")
    producer = FORK.Process(target=_produce, args=(ring, total, seed))
    started = FORK.Event()
    first = FORK.Process(target=_logging_consumer, args=(ring, log_path, total, started))
    first.start()
    producer.start()
    second = None
    try:
        assert started.wait(60)
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        assert first.exitcode == -signal.SIGKILL
        with open(log_path, "rb") as f:
            before = f.read()
        committed_at_kill = ring.statistics().head
        second = FORK.Process(target=_logging_consumer, args=(ring, log_path, total, FORK.Event()))
        second.start()
        second.join(120)
        producer.join(60)
        assert second.exitcode == 0 and producer.exitcode == 0
        with open(log_path, "rb") as f:
            log = f.read()
        seqs = [int.from_bytes(log[i : i + 8], "little") for i in range(0, len(log), 8)]
        n_before = len(before) // 8
        run1, run2 = seqs[:n_before], seqs[n_before:]
        assert run1 == list(range(n_before))
        # the successor starts at or before the first record the dead one did not log
        assert run2[0] <= n_before
        assert run2 == list(range(run2[0], total))
        assert set(seqs) == set(range(total))  # nothing lost
        assert committed_at_kill > 0
    finally:
        for proc in (producer, first, second):
            if proc is not None and proc.is_alive():
                proc.kill()
        ring.close()
        ring.unlink()


def _sleepy_consumer(ring: Ring, armed, conn, timeout: float) -> None:
    c = ring.consumer()
    armed.set()
    t0 = time.monotonic()
    ok = c.wait(timeout)
    conn.send((ok, time.monotonic() - t0, [bytes(v) for v in c.poll()]))


def test_doorbell_wakes_a_sleeping_consumer_in_another_process(ring):
    rx, tx = FORK.Pipe(duplex=False)
    armed = FORK.Event()
    proc = FORK.Process(target=_sleepy_consumer, args=(ring, armed, tx, 30.0))
    proc.start()
    assert armed.wait(10)
    ring.producer().try_write([b"ding"])
    assert rx.poll(30)
    ok, elapsed, got = rx.recv()
    proc.join(10)
    assert ok and got == [b"ding"]
    assert elapsed < 30.0


def test_idle_consumer_sleeps_instead_of_spinning(ring):
    rx, tx = FORK.Pipe(duplex=False)
    armed = FORK.Event()
    proc = FORK.Process(target=_sleepy_consumer, args=(ring, armed, tx, 1.0))
    proc.start()
    assert armed.wait(10)
    ps = psutil.Process(proc.pid)
    cpu0 = sum(ps.cpu_times()[:2])
    assert rx.poll(30)
    ok, elapsed, _ = rx.recv()
    cpu1 = sum(ps.cpu_times()[:2])
    proc.join(10)
    assert not ok and elapsed >= 1.0
    assert cpu1 - cpu0 < 0.05  # a spinning consumer would burn ~1 s of CPU here


def _commit_once_producer_sleeps(ring: Ring) -> None:
    c = ring.consumer()
    # The producer announces its sleep only in shared memory; watch that flag.
    deadline = time.monotonic() + 10
    while not ring._slots[ringmod.PRODUCER_WAITING] and time.monotonic() < deadline:
        time.sleep(0.001)
    c.poll()
    c.commit()


def test_producer_blocked_on_a_full_ring_wakes_when_the_consumer_commits(ring):
    p = ring.producer()
    p.try_write([b"f" * 100] * 100)
    proc = FORK.Process(target=_commit_once_producer_sleeps, args=(ring,))
    proc.start()
    t0 = time.monotonic()
    assert p.write([b"l" * 100], timeout=20.0) == 1
    assert time.monotonic() - t0 < 20.0
    proc.join(10)
    assert p.full_waits == 1
