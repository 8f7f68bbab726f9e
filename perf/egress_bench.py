"""Egress benchmark: frames made durable in a local JetStream (file storage, acked).

    python perf/egress_bench.py [--frames N] [--json PATH] [--quick]

Same frames, same nats-server (started here on a free port, file storage), two ways:

* baseline: nats-py ``js.publish_async`` per frame with ``Nats-Msg-Id``, in one process,
  then wait for every ack (the fast way the nats-py docs offer);
* fluxrig: the frames sit in a shared-memory ring; the rack's egress process
  (``engine.egress``) publishes them and commits after the acks. Timed from the egress
  process start until its counters say every frame is acked.

Both runs check that the stream then holds exactly N messages. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nats

from engine.counters import Counters
from engine.frame import encode, frame_id_of, new_frame
from engine.natsd import NatsServer
from engine.plan import EgressPlan, ProcessSpec, Route, Runtime
from engine.ring import Ring
from engine.streams import StreamConfig, js_stream_config
from engine.worker import run_process

FORK = multiprocessing.get_context("fork")


def make_frames(n: int) -> list[bytes]:
    """N encoded frames shaped like a business event (~190 bytes each)."""
    return [encode(new_frame("acq:10.0.0.7:5123", "iso8583.txn",
                             headers={"lane": i % 4, "route": "visa-a"},
                             body={"mti": "0110", "de39": "00", "amount": 10000 + i,
                                   "pan": "476173******0119", "stan": f"{i % 1000000:06d}"}))
            for i in range(n)]


async def _stream(url: str, name: str, subject: str, reset: bool) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if reset:
            try:
                await js.delete_stream(name)
            except Exception:
                pass
            await js.add_stream(js_stream_config(StreamConfig(name=name, subjects=(subject,))))
            return 0
        return (await js.stream_info(name)).state.messages
    finally:
        await nc.close()


async def _baseline(url: str, subject: str, frames: list[bytes]) -> float:
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(timeout=30)
    t0 = time.perf_counter()
    futures = [await js.publish_async(subject, f, headers={"Nats-Msg-Id": frame_id_of(f).hex()})
               for f in frames]
    await asyncio.gather(*futures)
    dt = time.perf_counter() - t0
    await nc.close()
    return dt


def _fill(ring: Ring, frames: list[bytes]) -> None:
    p = ring.producer()
    for i in range(0, len(frames), 512):
        assert p.write(frames[i:i + 512], timeout=60) == len(frames[i:i + 512])


def run_fluxrig(url: str, subject: str, frames: list[bytes], batch: int, inflight: int) -> float:
    tag = f"fx-bench-eg-{os.getpid()}"
    ring = Ring.create(f"{tag}-ring", 1 << 26)
    counters = Counters.create(f"{tag}-c")
    try:
        _fill(ring, frames)
        spec = ProcessSpec(
            name="egress", role="egress", inputs=[ring], counters=counters,
            extra=EgressPlan(routes=[Route(subject=subject, stream="BENCH")],
                             streams=[StreamConfig(name="BENCH", subjects=(subject,))],
                             batch=batch, max_inflight=inflight, ack_timeout=10.0))
        rt = Runtime(rack_id="bench", data_dir=tempfile.gettempdir(), nats_url=url, batch=256)
        t0 = time.perf_counter()
        proc = FORK.Process(target=run_process, args=(spec, rt))
        proc.start()
        deadline = time.monotonic() + 300
        while counters.snapshot().frames_out < len(frames) and time.monotonic() < deadline:
            time.sleep(0.002)  # the counter is the only signal of progress
        dt = time.perf_counter() - t0
        proc.terminate()
        proc.join(30)
        return dt
    finally:
        ring.close()
        ring.unlink()
        counters.close()
        counters.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="at most 100,000 frames (scripts/bench)")
    args = ap.parse_args()
    if args.quick:
        args.frames = min(args.frames, 100_000)
    frames = make_frames(args.frames)
    subject = "bench.events"
    with tempfile.TemporaryDirectory() as d:
        server = NatsServer(rack_id="bench", data_dir=Path(d), host="127.0.0.1", port=0)
        server.start()
        try:
            asyncio.run(_stream(server.url, "BENCH", subject, reset=True))
            base_dt = asyncio.run(_baseline(server.url, subject, frames))
            base_n = asyncio.run(_stream(server.url, "BENCH", subject, reset=False))
            asyncio.run(_stream(server.url, "BENCH", subject, reset=True))
            flux_dt = run_fluxrig(server.url, subject, frames, args.batch, args.inflight)
            flux_n = asyncio.run(_stream(server.url, "BENCH", subject, reset=False))
        finally:
            server.stop()
    n = len(frames)
    base_rate, flux_rate = n / base_dt, n / flux_dt
    ratio = flux_rate / base_rate
    size = sum(map(len, frames)) / n
    print(f"egress benchmark: {n:,} frames of ~{size:.0f} B, JetStream file storage, acked")
    print(f"{'method':<40} {'seconds':>8} {'frames/s':>10} {'stored':>9} {'ratio':>6}")
    print(f"{'nats-py publish_async (1 process)':<40} {base_dt:8.2f} {base_rate:10,.0f} "
          f"{base_n:9,} {1.0:6.2f}")
    print(f"{'fluxrig egress (ring -> JetStream)':<40} {flux_dt:8.2f} {flux_rate:10,.0f} "
          f"{flux_n:9,} {ratio:6.2f}")
    ok_rate, ok_ratio = flux_rate >= 100_000, ratio >= 4.0
    print(f"bar: >= 100,000 frames/s: {flux_rate:,.0f} — {'PASS' if ok_rate else 'FAIL'}")
    print(f"bar: >= 4x publish_async: {ratio:.2f}x — {'PASS' if ok_ratio else 'FAIL'}")
    print(f"stored exactly N both times: {base_n == n and flux_n == n}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "egress", "frames": n, "frame_bytes": size,
            "baseline_publish_async": {"seconds": base_dt, "frames_per_s": base_rate,
                                       "stored": base_n},
            "fluxrig_egress": {"seconds": flux_dt, "frames_per_s": flux_rate, "stored": flux_n,
                               "batch": args.batch, "max_inflight": args.inflight},
            "ratio": ratio,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }, indent=2))
    return 0 if base_n == n and flux_n == n else 1


if __name__ == "__main__":
    sys.exit(main())
