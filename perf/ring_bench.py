"""Two-process benchmark of engine.ring against other ways to move records between processes.

Usage: python perf/ring_bench.py [--json PATH] [--quick] [--records N] [--only NAME]

Theory of operation
-------------------
Every measurement forks two children from the parent with ``get_context("fork")``: a
producer and a consumer, pinned to different CPUs when the machine has two or more. The
parent creates the channel (ring, queue, pipe) before forking, then only coordinates and
measures; it never moves a record.

Throughput: the consumer sets itself up first, then both children meet at a barrier. The
consumer's clock runs from the barrier to the last record received (the same rule for every
scenario), and it touches every record (``total += len(record)``); the parent checks that the
count and byte total received equal those sent. Each child also reports its CPU time over its
run, which shows which side is saturated. Payloads are 64 B, 200 B and 4096 B; MB/s counts
payload bytes only (no headers, prefixes or pickling). Ratios are against
"mp.Queue per message" at the same size. Rivals: see ``perf/_rivals.py``. Ring consumers get
zero-copy views and so read only each record's header; the "ring batched + bytes()" row copies
every payload out, as the rivals' consumers must.

Latency: the producer sends 200 B records at 10,000 records/s, each carrying
``time.perf_counter_ns()`` taken just before ``write``; the consumer blocks in
``consumer.wait`` when idle and computes ``perf_counter_ns() - sent`` per record (CLOCK_MONOTONIC
is system-wide, so the two processes share it). Before timing, the producer pushes two ring
capacities of filler records, so page faults on first touch of the segment are not counted.
Two references run under the same pacing, for reading the result: the ring with a consumer
that busy-polls (the ring's own cost, no sleep) and a bare eventfd + ``select`` wake-up with no
ring at all (the platform's floor under any blocking doorbell).

Idle CPU: a consumer loops on ``consumer.wait(1.0)`` over an empty ring; the parent reads its
user+system CPU time with psutil over a fixed window.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing as mp
import os
import platform
import select
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from _rivals import (  # noqa: E402
    BATCH,
    CONSUMER_LIMIT,
    RIVALS,
    Iceoryx2,
    MpQueuePerMessage,
    TransportTimeout,
    iceoryx2_problem,
    make_batch,
)
from _inject import install_from_env  # noqa: E402
from engine.ring import Ring  # noqa: E402

SIZES = (64, 200, 4096)
RING_CAPACITY = 4 << 20  # >= 8x the largest record (the ring's max record fraction)
LATENCY_CAPACITY = 1 << 20
BACKOFF_US = (50, 200)  # spin-then-doorbell settings measured beside the pure doorbell
IDLE_SLICE = 0.1  # seconds a ring consumer blocks in wait() when the ring is empty
RUN_TIMEOUT = 60.0  # seconds a single run may take before it is declared hung
BASELINE = "mp.Queue per message"

# Records per run, by scenario and payload size, sized for ~1-3 s each on a 2-core EPYC VM
# (measured with this script); --quick divides them by 10, --records replaces them.
RECORDS: dict[str, dict[int, int]] = {
    "ring per-record": {64: 1_000_000, 200: 1_000_000, 4096: 600_000},
    "ring batched": {64: 10_000_000, 200: 8_000_000, 4096: 5_000_000},
    "ring batched + bytes()": {64: 6_000_000, 200: 6_000_000, 4096: 4_000_000},
    "mp.Queue per message": {64: 150_000, 200: 150_000, 4096: 100_000},
    "mp.Queue list of 64": {64: 3_000_000, 200: 3_000_000, 4096: 80_000},
    "os.pipe len-prefixed x64": {64: 3_000_000, 200: 2_500_000, 4096: 300_000},
    "faster-fifo many x64": {64: 300_000, 200: 300_000, 4096: 200_000},
    "faster-fifo raw x64": {64: 600_000, 200: 600_000, 4096: 300_000},
    "iceoryx2 pub/sub": {64: 400_000, 200: 300_000, 4096: 300_000},
}

LATENCY_RATE = 10_000  # records/s
LATENCY_SECONDS = 3.0
LATENCY_SIZE = 200
IDLE_SECONDS = 3.0

BARS = {
    "ring_batched_200_rps": 3_000_000,
    "ring_batched_200_vs_queue": 20.0,
    "ring_batched_4k_gbps": 3.0,
    "latency_p99_us": 100.0,
    "idle_cpu_percent": 1.0,
}

_names = itertools.count()


def ring_name() -> str:
    """A segment name no other run (or concurrent benchmark) uses."""
    return f"fx-bench-{os.getpid()}-{next(_names)}"


# --- the ring scenarios, behind the interface of perf/_rivals.py --------------------


class RingPerRecord:
    """fluxrig ring, one ``write([payload])`` per record, ``poll(1)`` + ``commit()`` per record."""

    name = "ring per-record"

    def open(self, ctx: Any, size: int) -> None:
        self.ring = Ring.create(ring_name(), RING_CAPACITY)

    def producer_setup(self) -> None:
        self.producer = self.ring.producer()

    def consumer_setup(self) -> None:
        self.consumer = self.ring.consumer()

    def produce(self, payload: bytes, n: int) -> None:
        write = self.producer.write
        for _ in range(n):
            if write([payload], timeout=RUN_TIMEOUT) != 1:
                raise TransportTimeout("ring stayed full: producer gave up")

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        consumer = self.consumer
        poll, commit, wait = consumer.poll, consumer.commit, consumer.wait
        count = total = 0
        while count < n:
            views = poll(1)
            if not views:
                if not wait(IDLE_SLICE) and time.monotonic() > deadline:
                    raise TransportTimeout(f"consumer timed out: received={count}, expected={n}")
                continue
            for view in views:
                total += len(view)
            count += len(views)
            del views, view
            commit()
        return count, total

    def close(self) -> None:
        try:
            self.ring.close()
        finally:
            self.ring.unlink()


class RingBatched(RingPerRecord):
    """fluxrig ring, ``write`` of BATCH records, ``poll(1024)`` then one ``commit()``."""

    name = "ring batched"

    def produce(self, payload: bytes, n: int) -> None:
        batch = make_batch(payload)
        write = self.producer.write
        for _ in range(n // BATCH):
            if write(batch, timeout=RUN_TIMEOUT) != BATCH:
                raise TransportTimeout("ring stayed full: producer gave up")

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        consumer = self.consumer
        poll, commit, wait = consumer.poll, consumer.commit, consumer.wait
        count = total = 0
        while count < n:
            views = poll(CONSUMER_LIMIT)
            if not views:
                if not wait(IDLE_SLICE) and time.monotonic() > deadline:
                    raise TransportTimeout(f"consumer timed out: received={count}, expected={n}")
                continue
            for view in views:
                total += len(view)
            count += len(views)
            del views, view  # the views must be gone before the space is handed back
            commit()
        return count, total


class RingBatchedCopy(RingBatched):
    """As ``RingBatched``, but the consumer copies each record out (``bytes(view)``).

    Rivals hand the consumer a bytes object; the ring hands a view, and its consumer then
    reads only the 8-byte header. This row shows the ring when the consumer does read every
    payload byte, as the rivals' consumers do.
    """

    name = "ring batched + bytes()"

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        consumer = self.consumer
        poll, commit, wait = consumer.poll, consumer.commit, consumer.wait
        count = total = 0
        while count < n:
            views = poll(CONSUMER_LIMIT)
            if not views:
                if not wait(IDLE_SLICE) and time.monotonic() > deadline:
                    raise TransportTimeout(f"consumer timed out: received={count}, expected={n}")
                continue
            for view in views:
                total += len(bytes(view))
            count += len(views)
            del views, view
            commit()
        return count, total


# The baseline runs first at each size, so every later row can print its ratio at once.
SCENARIOS: tuple[Callable[[], Any], ...] = (
    MpQueuePerMessage,
    RingPerRecord,
    RingBatched,
    RingBatchedCopy,
    *(rival for rival in RIVALS if rival is not MpQueuePerMessage),
)


# --- process plumbing ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pinning:
    """CPUs for the two children (None: leave the scheduler free)."""

    producer: int | None
    consumer: int | None

    @classmethod
    def detect(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            return cls(producer=cpus[0], consumer=cpus[1])
        return cls(producer=None, consumer=None)


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _child(conn: Any, body: Callable[[], dict[str, Any]]) -> None:
    try:
        result = body()
    except BaseException as exc:  # everything goes back to the parent, which reports it
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    conn.send(result)
    conn.close()


def _timed(run: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run ``run``; return its result, elapsed ns and the CPU seconds this process spent."""
    cpu0 = time.process_time()
    t0 = time.perf_counter_ns()
    out = run()
    t1 = time.perf_counter_ns()
    return out, t1 - t0, time.process_time() - cpu0


def _collect(procs: list[Any], conns: list[Any], timeout: float) -> list[dict[str, Any]]:
    """Each child's result, or an error entry for one that hung or died without answering."""
    deadline = time.monotonic() + timeout
    results = []
    for proc, conn in zip(procs, conns):
        remaining = max(0.0, deadline - time.monotonic())
        if conn.poll(remaining):
            try:
                results.append(conn.recv())
            except EOFError:
                results.append({"error": f"child died: exitcode={proc.exitcode}"})
        else:
            results.append({"error": f"child hung: timeout={timeout}s"})
    for proc in procs:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()  # our own child, by its Process handle
            proc.join()
    return results


def run_throughput(factory: Callable[[], Any], size: int, n: int, pin: Pinning) -> dict[str, Any]:
    """One producer/consumer run of ``n`` records of ``size`` bytes; figures or an error."""
    ctx = mp.get_context("fork")
    transport = factory()
    transport.open(ctx, size)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    try:
        consumer_ready, consumer_done = ctx.Event(), ctx.Event()
        barrier = ctx.Barrier(2, timeout=RUN_TIMEOUT)
        finish = getattr(transport, "finish", None)

        def produce() -> dict[str, Any]:
            _pin(pin.producer)
            if not consumer_ready.wait(RUN_TIMEOUT):
                raise TransportTimeout("consumer never got ready")
            transport.producer_setup()
            barrier.wait()
            _, ns, cpu = _timed(lambda: transport.produce(payload, n))
            if finish:
                consumer_done.wait(RUN_TIMEOUT)  # keep the publisher until all is received
                finish()
            return {"sent": n, "ns": ns, "cpu_s": cpu}

        def consume() -> dict[str, Any]:
            _pin(pin.consumer)
            transport.consumer_setup()
            consumer_ready.set()
            barrier.wait()
            deadline = time.monotonic() + RUN_TIMEOUT
            (count, total), ns, cpu = _timed(lambda: transport.consume(n, deadline))
            consumer_done.set()
            if finish:
                finish()
            return {"received": count, "bytes": total, "ns": ns, "cpu_s": cpu}

        return _run_pair(ctx, produce, consume, n, size)
    finally:
        transport.close()


def _spawn_pair(ctx: Any, produce: Callable, consume: Callable) -> tuple[dict, dict]:
    """Fork the consumer then the producer; their two result dicts, consumer first."""
    conns, procs = [], []
    for role, body in (("consumer", consume), ("producer", produce)):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, body), name=f"ring-bench-{role}")
        proc.start()
        send.close()
        conns.append(recv)
        procs.append(proc)
    cons, prod = _collect(procs, conns, RUN_TIMEOUT + 10)
    return cons, prod


def _run_pair(ctx: Any, produce: Callable, consume: Callable, n: int, size: int) -> dict[str, Any]:
    cons, prod = _spawn_pair(ctx, produce, consume)
    for role, res in (("consumer", cons), ("producer", prod)):
        if "error" in res:
            return {"error": f"{role}: {res['error']}", "traceback": res.get("traceback")}
    if cons["received"] != prod["sent"] or cons["bytes"] != prod["sent"] * size:
        return {
            "error": (
                f"count mismatch: sent={prod['sent']}, received={cons['received']}, "
                f"bytes={cons['bytes']}, expected_bytes={prod['sent'] * size}"
            )
        }
    seconds = cons["ns"] / 1e9
    return {
        "records": n,
        "seconds": seconds,
        "records_per_s": n / seconds,
        "mb_per_s": n * size / seconds / 1e6,
        "producer_seconds": prod["ns"] / 1e9,
        "producer_cpu_percent": 100 * prod["cpu_s"] / (prod["ns"] / 1e9),
        "consumer_cpu_percent": 100 * cons["cpu_s"] / seconds,
        "ns_per_record": cons["ns"] / n,
    }


# --- latency and idle CPU -----------------------------------------------------------------

_TS = struct.Struct("<q")


def _paced(n: int, send: Callable[[], None]) -> dict[str, Any]:
    """Call ``send`` ``n`` times at LATENCY_RATE, sleeping until each send time."""
    interval = 1_000_000_000 // LATENCY_RATE
    clock, sleep = time.perf_counter_ns, time.sleep
    start = clock() + interval
    late = 0
    for i in range(n):
        ahead = start + i * interval - clock()
        if ahead > 0:
            sleep(ahead / 1e9)
        else:
            late += 1  # time.sleep overshot the previous slot: send at once, do not skip
        send()
    elapsed = clock() - start
    return {"sent": n, "late": late, "rate": n / (elapsed / 1e9)}


def _percentiles(lat_ns: list[int]) -> dict[str, float]:
    lat = sorted(lat_ns)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000

    return {
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": lat[-1] / 1000,
        "mean_us": sum(lat) / len(lat) / 1000,
    }


def run_latency(pin: Pinning, seconds: float, spin: bool = False,
                backoff: float = 0.0) -> dict[str, Any]:
    """Paced 10k records/s through a ring; one-way latency percentiles in µs.

    With ``spin`` the consumer polls in a busy loop and never sleeps: the ring's own cost
    without the doorbell's wake-up, for comparison only. With ``backoff`` > 0 the consumer
    calls ``consumer.wait(1.0, spin=backoff)``: it busy-polls that long, then sleeps on the
    doorbell (the rack's latency-bound setting); its CPU share is reported too.
    """
    ctx = mp.get_context("fork")
    ring = Ring.create(ring_name(), LATENCY_CAPACITY)
    n = int(LATENCY_RATE * seconds)
    warm = 2 * LATENCY_CAPACITY // (LATENCY_SIZE + 8)
    try:
        consumer_ready = ctx.Event()
        barrier = ctx.Barrier(2, timeout=RUN_TIMEOUT)

        def produce() -> dict[str, Any]:
            _pin(pin.producer)
            producer = ring.producer()
            consumer_ready.wait(RUN_TIMEOUT)
            barrier.wait()
            filler = make_batch(bytes(LATENCY_SIZE))  # timestamp 0: not measured
            for _ in range(0, warm, BATCH):
                producer.write(filler, timeout=RUN_TIMEOUT)
            time.sleep(0.05)  # let the consumer drain and fall asleep before timing starts
            buf = bytearray(LATENCY_SIZE)
            records = [buf]
            clock, pack_into, write = time.perf_counter_ns, _TS.pack_into, producer.write

            def send() -> None:
                pack_into(buf, 0, clock())
                write(records, timeout=RUN_TIMEOUT)

            return _paced(n, send)

        def consume() -> dict[str, Any]:
            _pin(pin.consumer)
            consumer = ring.consumer()
            consumer_ready.set()
            barrier.wait()
            lat = []
            clock, unpack_from = time.perf_counter_ns, _TS.unpack_from
            deadline = time.monotonic() + RUN_TIMEOUT
            waits = 0
            while len(lat) < n:
                views = consumer.poll(CONSUMER_LIMIT)
                if not views:
                    if spin:
                        continue
                    waits += 1
                    if not consumer.wait(1.0, backoff) and time.monotonic() > deadline:
                        raise TransportTimeout(f"consumer timed out: received={len(lat)}")
                    continue
                for view in views:
                    now = clock()
                    (sent,) = unpack_from(view, 0)
                    if sent:
                        lat.append(now - sent)
                del views, view
                consumer.commit()
            t = os.times()
            return {"latencies_ns": lat, "waits": waits, "cpu_s": t.user + t.system}

        cons, prod = _spawn_pair(ctx, produce, consume)
    finally:
        ring.close()
        ring.unlink()
    for role, res in (("consumer", cons), ("producer", prod)):
        if "error" in res:
            return {"error": f"{role}: {res['error']}", "traceback": res.get("traceback")}
    if len(cons["latencies_ns"]) != n:
        return {"error": f"count mismatch: sent={n}, received={len(cons['latencies_ns'])}"}
    return {
        "consumer": ("busy poll" if spin else
                     f"consumer.wait(spin={backoff * 1e6:.0f} us) when idle" if backoff else
                     "consumer.wait() when idle"),
        "consumer_cpu_pct": round(100 * cons["cpu_s"] / (n / LATENCY_RATE), 1),
        "records": n,
        "record_size": LATENCY_SIZE,
        "offered_rate": LATENCY_RATE,
        "achieved_rate": prod["rate"],
        "sends_behind_schedule": prod["late"],
        "warmup_records": warm,
        "consumer_waits": cons["waits"],
        **_percentiles(cons["latencies_ns"]),
    }


def run_wakeup_floor(pin: Pinning, seconds: float) -> dict[str, Any]:
    """The platform's floor under any doorbell: eventfd write -> select() wake-up, no ring.

    Same pacing, pinning and per-record accounting as ``run_latency``: the producer stores
    each send time in a shared array, bumps a sequence number and writes the eventfd; the
    consumer sleeps in ``select`` and, on waking, counts ``now - sent`` for every send since
    its previous wake-up (a late wake-up delays every record sent meanwhile, as in a ring).
    """
    ctx = mp.get_context("fork")
    n = int(LATENCY_RATE * seconds)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    seq = ctx.RawArray("q", 16)  # [0]: sends so far, alone on its cache line
    sent_at = ctx.RawArray("q", n)
    try:
        consumer_ready = ctx.Event()
        barrier = ctx.Barrier(2, timeout=RUN_TIMEOUT)

        def produce() -> dict[str, Any]:
            _pin(pin.producer)
            consumer_ready.wait(RUN_TIMEOUT)
            barrier.wait()
            time.sleep(0.05)
            clock, write = time.perf_counter_ns, os.eventfd_write
            counter = itertools.count()

            def send() -> None:
                i = next(counter)
                sent_at[i] = clock()
                seq[0] = i + 1  # x86-64 TSO: the timestamp store is visible first
                write(efd, 1)

            return _paced(n, send)

        def consume() -> dict[str, Any]:
            _pin(pin.consumer)
            consumer_ready.set()
            barrier.wait()
            lat = []
            clock, sel, read = time.perf_counter_ns, select.select, os.eventfd_read
            deadline = time.monotonic() + RUN_TIMEOUT
            seen = wakeups = 0
            while seen < n and time.monotonic() < deadline:
                if not sel((efd,), (), (), 0.1)[0]:
                    continue
                wakeups += 1
                read(efd)
                upto = seq[0]
                for i in range(seen, upto):
                    lat.append(clock() - sent_at[i])
                seen = upto
            return {"latencies_ns": lat, "wakeups": wakeups}

        cons, prod = _spawn_pair(ctx, produce, consume)
    finally:
        os.close(efd)
    for role, res in (("consumer", cons), ("producer", prod)):
        if "error" in res:
            return {"error": f"{role}: {res['error']}", "traceback": res.get("traceback")}
    if len(cons["latencies_ns"]) != n:
        return {"error": f"count mismatch: sent={n}, received={len(cons['latencies_ns'])}"}
    return {
        "consumer": "select() on an eventfd, no ring",
        "records": n,
        "wakeups": cons["wakeups"],
        "achieved_rate": prod["rate"],
        **_percentiles(cons["latencies_ns"]),
    }


def run_idle(pin: Pinning, seconds: float) -> dict[str, Any]:
    """CPU share of a consumer blocked in ``wait(1.0)`` on an empty ring, via psutil."""
    ctx = mp.get_context("fork")
    ring = Ring.create(ring_name(), RING_CAPACITY)
    try:
        ready, stop = ctx.Event(), ctx.Event()

        def idle() -> None:
            _pin(pin.consumer)
            consumer = ring.consumer()
            ready.set()
            while not stop.is_set():
                consumer.wait(1.0)

        proc = ctx.Process(target=idle, name="ring-bench-idle")
        proc.start()
        try:
            if not ready.wait(RUN_TIMEOUT):
                return {"error": "idle consumer never got ready"}
            time.sleep(0.2)  # past the first wait() call
            ps = psutil.Process(proc.pid)
            c0, s0, t0 = ps.cpu_times(), _run_ns(proc.pid), time.monotonic()
            time.sleep(seconds)
            c1, s1, t1 = ps.cpu_times(), _run_ns(proc.pid), time.monotonic()
        finally:
            stop.set()
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    finally:
        ring.close()
        ring.unlink()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    wall = t1 - t0
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "cpu_percent": 100 * cpu / wall,
        "resolution_percent": 100 / os.sysconf("SC_CLK_TCK") / wall,
        "schedstat_cpu_percent": (
            100 * (s1 - s0) / 1e9 / wall if s0 is not None and s1 is not None else None
        ),
    }


def _run_ns(pid: int) -> int | None:
    """Nanoseconds ``pid`` has run on a CPU (/proc/<pid>/schedstat), finer than psutil's ticks."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- report ---------------------------------------------------------------------------------


def machine_info(pin: Pinning) -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def sysfs(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_available": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "pinned": pin.producer is not None,
        "producer_cpu": pin.producer,
        "consumer_cpu": pin.consumer,
        "packages": {p: pkg(p) for p in ("faster-fifo", "iceoryx2", "psutil")},
        # how an idle CPU sleeps decides what a wake-up costs (see the latency section)
        "cpuidle_driver": sysfs("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": sysfs("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="a tenth of the records")
    parser.add_argument(
        "--records", type=int, help="records per throughput run, the same for every scenario"
    )
    parser.add_argument(
        "--only", action="append",
        help="run only throughput scenarios whose name contains this (repeatable; the "
             "mp.Queue baseline always runs)",
    )
    args = parser.parse_args(argv)
    install_from_env()  # FLUXRIG_BENCH_INJECT, before the children fork: see perf/_inject.py

    pin = Pinning.detect()
    info = machine_info(pin)
    scale = 10 if args.quick else 1
    print(
        f"python {info['python']} on {info['platform']}, {info['cpu_count']} CPUs "
        f"({info['cpu_model']}), "
        + (f"producer on CPU {pin.producer}, consumer on CPU {pin.consumer}"
           if info["pinned"] else "not pinned (fewer than 2 CPUs)")
    )

    skipped: dict[str, str] = {}
    iox_problem = iceoryx2_problem()
    rows: list[dict[str, Any]] = []
    header = (
        f"{'scenario':<26} {'size':>6} {'records':>10} {'records/s':>12} {'MB/s':>9} "
        f"{'vs Queue':>9} {'ns/rec':>8} {'prod CPU':>8} {'cons CPU':>8}"
    )
    print(header)
    print("-" * len(header))
    t_start = time.monotonic()
    for size in SIZES:
        base = None
        for factory in SCENARIOS:
            name = factory.name
            if args.only and not any(o in name for o in args.only) and name != BASELINE:
                continue
            if factory is Iceoryx2 and iox_problem:
                skipped[name] = iox_problem
                continue
            if name in skipped:
                continue
            n = args.records or RECORDS[name][size]
            n = max(BATCH, n // scale // BATCH * BATCH)
            res = run_throughput(factory, size, n, pin)
            row = {"scenario": name, "size": size, **res}
            if "error" in res:
                if factory is Iceoryx2:
                    skipped[name] = res["error"]
                    print(f"iceoryx2: skipped ({res['error']})")
                else:
                    print(f"{name:<26} {size:>6} ERROR {res['error']}")
                    if res.get("traceback"):
                        print(res["traceback"])
                rows.append(row)
                continue
            if name == BASELINE:
                base = res["records_per_s"]
            row["ratio_vs_queue"] = res["records_per_s"] / base if base else None
            rows.append(row)
            ratio = f"{row['ratio_vs_queue']:>8.1f}x" if base else f"{'n/a':>9}"
            print(
                f"{name:<26} {size:>6} {n:>10,} {res['records_per_s']:>12,.0f} "
                f"{res['mb_per_s']:>9,.1f} {ratio} {res['ns_per_record']:>8,.0f} "
                f"{res['producer_cpu_percent']:>7.0f}% {res['consumer_cpu_percent']:>7.0f}%",
                flush=True,
            )
    for name, reason in skipped.items():
        if not any(r["scenario"] == name and "error" in r for r in rows):
            print(f"iceoryx2: skipped ({reason})")
    throughput_seconds = time.monotonic() - t_start

    latency_s = LATENCY_SECONDS / (3 if args.quick else 1)
    idle_s = IDLE_SECONDS / (3 if args.quick else 1)
    floor = run_wakeup_floor(pin, latency_s)
    latency = run_latency(pin, latency_s)
    latency_spin = run_latency(pin, latency_s, spin=True)
    latency_backoff = {us: run_latency(pin, latency_s, backoff=us / 1e6) for us in BACKOFF_US}
    idle = run_idle(pin, idle_s)
    print()
    for label, res in (
        ("ring, doorbell (consumer.wait when idle)", latency),
        *((f"ring, spin {us} us then doorbell", latency_backoff[us]) for us in BACKOFF_US),
        ("ring, consumer busy-polling (reference)", latency_spin),
        ("bare eventfd + select wake-up (floor)", floor),
    ):
        if "error" in res:
            print(f"latency {label}: ERROR {res['error']}")
            continue
        cpu = res.get("consumer_cpu_pct")
        print(
            f"latency {label:<42} p50 {res['p50_us']:7.1f}  p90 {res['p90_us']:7.1f}  "
            f"p99 {res['p99_us']:7.1f}  p99.9 {res['p999_us']:7.1f}  max {res['max_us']:8.1f} us"
            + (f"  consumer CPU {cpu:5.1f}%" if cpu is not None else "")
        )
    if "error" not in latency:
        print(
            f"  ({latency['record_size']} B records offered at {latency['offered_rate']:,}/s, "
            f"{latency['achieved_rate']:,.0f}/s achieved, {latency['records']:,} records, "
            f"{latency['consumer_waits']:,} consumer sleeps)"
        )
    if "error" in idle:
        print(f"idle: ERROR {idle['error']}")
    else:
        fine = idle["schedstat_cpu_percent"]
        print(
            f"idle consumer: {idle['cpu_seconds'] * 1000:.1f} ms CPU in {idle['seconds']:.2f} s "
            f"by psutil (resolution {idle['resolution_percent']:.2f}%)"
            + (f"; {fine:.4f}% by /proc/<pid>/schedstat" if fine is not None else "")
        )

    def find(name: str, size: int) -> dict[str, Any] | None:
        for r in rows:
            if r["scenario"] == name and r["size"] == size and "error" not in r:
                return r
        return None

    bars = []
    print()
    b200 = find("ring batched", 200)
    if b200:
        v = b200["records_per_s"]
        ok = v >= BARS["ring_batched_200_rps"]
        bars.append({"bar": "ring batched 200 B records/s", "value": v,
                     "threshold": BARS["ring_batched_200_rps"], "pass": ok})
        print(f"ring batched 200 B: {v:,.0f} records/s (bar >= 3,000,000) — {verdict(ok)}")
        if b200.get("ratio_vs_queue"):
            v = b200["ratio_vs_queue"]
            ok = v >= BARS["ring_batched_200_vs_queue"]
            bars.append({"bar": "ring batched 200 B vs mp.Queue per message", "value": v,
                         "threshold": BARS["ring_batched_200_vs_queue"], "pass": ok})
            print(f"ring batched 200 B vs mp.Queue per message: {v:.1f}x (bar >= 20x) — "
                  f"{verdict(ok)}")
    b4k = find("ring batched", 4096)
    if b4k:
        v = b4k["mb_per_s"] / 1000
        ok = v >= BARS["ring_batched_4k_gbps"]
        bars.append({"bar": "ring batched 4 KiB GB/s", "value": v,
                     "threshold": BARS["ring_batched_4k_gbps"], "pass": ok})
        print(f"ring batched 4 KiB: {v:.2f} GB/s (bar >= 3 GB/s) — {verdict(ok)}")
    if "error" not in latency:
        v = latency["p99_us"]
        ok = v <= BARS["latency_p99_us"]
        bars.append({"bar": "doorbell latency p99 us at 10k/s", "value": v,
                     "threshold": BARS["latency_p99_us"], "pass": ok})
        print(f"doorbell latency at 10k/s: p99 {v:.1f} us (bar <= 100 us) — {verdict(ok)}")
    for us in BACKOFF_US:
        res = latency_backoff[us]
        if "error" in res:
            continue
        v = res["p99_us"]
        print(f"spin {us} us then doorbell at 10k/s: p99 {v:.1f} us, consumer CPU "
              f"{res['consumer_cpu_pct']:.0f}% (bar <= 100 us) — {verdict(v <= BARS['latency_p99_us'])}"
              " [not counted: reported beside the doorbell-only bar]")
    if "error" not in idle:
        v = idle["cpu_percent"]
        ok = v < BARS["idle_cpu_percent"]
        bars.append({"bar": "idle consumer CPU percent", "value": v,
                     "threshold": BARS["idle_cpu_percent"], "pass": ok})
        print(f"idle consumer CPU: {v:.2f}% (bar < 1%) — {verdict(ok)}")

    if args.json:
        args.json.write_text(json.dumps({
            "machine": info,
            "config": {
                "quick": args.quick,
                "records_override": args.records,
                "sizes": SIZES,
                "ring_capacity": RING_CAPACITY,
                "batch": BATCH,
                "consumer_limit": CONSUMER_LIMIT,
                "timing": "consumer side, from the start barrier to the last record received",
                "touch": "consumer adds len(record) of every record; ring records are "
                         "zero-copy views (header read only), rivals hand over bytes "
                         "objects; 'ring batched + bytes()' copies every ring payload out",
                "ring_consumer_idle": "consumer.wait(0.1) when poll() finds nothing",
                "iceoryx2_consumer_idle": "busy receive() loop (no waitset)",
                "mb": "payload bytes / 1e6 per second",
                "baseline": BASELINE,
                "throughput_seconds": throughput_seconds,
            },
            "throughput": rows,
            "skipped": skipped,
            "latency": latency,
            "latency_busy_poll": latency_spin,
            "latency_spin_then_doorbell": {str(k): v for k, v in latency_backoff.items()},
            "latency_wakeup_floor": floor,
            "idle": idle,
            "bars": bars,
        }, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(b["pass"] for b in bars) else 1


if __name__ == "__main__":
    raise SystemExit(main())
