"""Data-plane demo: frames through a shared-memory ring between two forked processes.

Runs until the supervisor exists (issue "Rack core II"); then ``scripts/demo`` starts a real
rack instead. A generator process builds frames, encodes them as deterministic CBOR and writes
them to a ring in batches; a sink process polls, decodes, checks each frame's bytes and records
its ring latency; this process reads both processes' counters live, like telemetry will.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

from engine.counters import ERRORS, Counters
from engine.frame import decode, encode, new_frame
from engine.ring import Ring

_FORK = multiprocessing.get_context("fork")
BATCH = 64


def _generator(ring: Ring, counters: Counters, stop) -> None:
    producer = ring.producer()
    seq = 0
    while not stop.is_set():
        batch = []
        for _ in range(BATCH):
            frame = new_frame(
                "demo:gen",
                "demo.reading",
                body={"seq": seq, "temp_c": 20.5 + (seq % 100) / 10, "site": "plant-7"},
                headers={"lane": seq % 4},
            )
            batch.append(encode(frame))
            seq += 1
        written = producer.write(batch, timeout=0.5)
        counters.count_batch(0, written, 0, sum(map(len, batch[:written])))


def _sink(ring: Ring, counters: Counters, stop) -> None:
    consumer = ring.consumer()
    while not stop.is_set() or consumer.available():
        if not consumer.wait(0.1):
            continue
        views = consumer.poll(256)
        now = time.time_ns()
        nbytes = 0
        for view in views:
            frame = decode(view)
            if encode(frame) != view:  # bit-exact round trip, frame by frame
                counters.add(ERRORS)
            counters.observe(now - frame.ts)
            nbytes += len(view)
        counters.count_batch(len(views), 0, nbytes, 0)
        del views
        consumer.commit()


def run(seconds: float = 5.0) -> int:
    """Run the demo for ``seconds`` and print a summary; returns a process exit code."""
    tag = f"fx-demo-{os.getpid()}"
    ring = Ring.create(f"{tag}-ring", 1 << 20)
    gen_c = Counters.create(f"{tag}-gen")
    sink_c = Counters.create(f"{tag}-sink")
    stop = _FORK.Event()
    procs = [
        _FORK.Process(target=_generator, args=(ring, gen_c, stop), name="generator"),
        _FORK.Process(target=_sink, args=(ring, sink_c, stop), name="sink"),
    ]
    try:
        for p in procs:
            p.start()
        print(f"{'t(s)':>5} {'frames out':>12} {'frames in':>12} {'rate/s':>10} "
              f"{'p50 us':>8} {'p99 us':>8} {'ring fill':>9}")
        t0 = time.monotonic()
        last_in, last_t = 0, t0
        while (elapsed := time.monotonic() - t0) < seconds:
            stop.wait(min(1.0, seconds - elapsed))
            now = time.monotonic()
            g, s = gen_c.snapshot(), sink_c.snapshot()
            rate = (s.frames_in - last_in) / (now - last_t)
            last_in, last_t = s.frames_in, now
            p50, p99 = (s.percentile(0.5) or 0) / 1e3, (s.percentile(0.99) or 0) / 1e3
            print(f"{now - t0:5.1f} {g.frames_out:12,} {s.frames_in:12,} {rate:10,.0f} "
                  f"{p50:8.0f} {p99:8.0f} {ring.statistics().fill:9.1%}", flush=True)
        stop.set()
        for p in procs:
            p.join(10)
        g, s = gen_c.snapshot(), sink_c.snapshot()
        total = time.monotonic() - t0
        print()
        print(f"frames generated   {g.frames_out:,}")
        print(f"frames received    {s.frames_in:,}  (lost: {g.frames_out - s.frames_in})")
        print(f"bit-exact errors   {s.errors}")
        print(f"mean rate          {s.frames_in / total:,.0f} frames/s (encode+ring+decode)")
        print(f"ring latency p50   {(s.percentile(0.5) or 0) / 1e3:,.0f} us, "
              f"p99 {(s.percentile(0.99) or 0) / 1e3:,.0f} us")
        ok = g.frames_out == s.frames_in and s.errors == 0 and all(p.exitcode == 0 for p in procs)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for seg in (ring, gen_c, sink_c):
            seg.close()
            seg.unlink()


if __name__ == "__main__":
    sys.exit(run(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0))
