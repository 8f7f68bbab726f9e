"""The quick-start demo: a real rack from ``configs/demo.yaml`` for ~20 s, then a summary.

It runs ``engine start --config configs/demo.yaml --workers 2`` as a child, shows the live
table that telemetry sees, stops the rack with SIGTERM (a full drain), then re-opens the rack's
JetStream store with a fresh nats-server and counts the stream: it must hold exactly the
frames the generator produced, one message per frame id.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config import load_config
from engine.counters import Counters
from engine.natsd import NatsServer
from engine.telemetry import RackProbe, read_state, rows

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _wait_for_state(data_dir: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rack exited during start: code={proc.returncode}")
        try:
            return read_state(data_dir)
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)  # the rack announces itself only through its state file
    raise RuntimeError("rack did not start in time")


async def _stream_count(url: str, stream: str) -> tuple[int, int]:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages, info.state.last_seq
    finally:
        await nc.close()


def run(seconds: float = 20.0, config: Path = CONFIG, workers: int = 2) -> int:
    """Run the demo; returns 0 when every produced frame is in JetStream exactly once."""
    cfg = load_config(config)
    data_dir = Path(cfg.data_dir).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh stream, so counts compare 1:1
    stream = cfg.egress.streams[0].name
    print(f"starting rack '{cfg.rack_id}' from {config} with --workers {workers} "
          f"(generator -> mapping x{workers} -> egress -> JetStream '{stream}')", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "start", "--config", str(config),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    held: list[Counters] = []
    try:
        state = _wait_for_state(data_dir, proc, 30.0)
        # Keep our own mapping of the counters: it outlives the rack's unlink at stop.
        by_role = {p["role"]: p for p in state["processes"]}
        source = Counters.attach(by_role["source"]["counters"])
        egress = Counters.attach(by_role["egress"]["counters"])
        held += [source, egress]
        probe = RackProbe(state)
        print(f"{'t(s)':>5} {'generated':>11} {'in JetStream':>13} {'rate/s':>9} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'rack CPU%':>9}")
        t0 = prev_t = time.monotonic()
        prev = probe.sample()
        while time.monotonic() - t0 < seconds and proc.poll() is None:
            time.sleep(1.0)  # the display interval
            cur = probe.sample()
            table = {r["name"]: r for r in rows(prev, cur)}
            eg = table["egress"]
            cpu = sum(r.get("cpu_pct", 0.0) for r in table.values())
            p50 = (eg.get("p50_ns") or 0) / 1e6
            p99 = (eg.get("p99_ns") or 0) / 1e6
            print(f"{cur.t - t0:5.1f} {source.snapshot().frames_out:11,} "
                  f"{egress.snapshot().frames_out:13,} {eg.get('out_per_s', 0):9,.0f} "
                  f"{p50:7.1f} {p99:7.1f} {cpu:9.1f}", flush=True)
            prev, prev_t = cur, time.monotonic()
        probe.close()
        elapsed = time.monotonic() - t0
        print("stopping (drain: intake stops, rings empty into JetStream) ...", flush=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
        produced = source.snapshot().frames_out
        eg_final = egress.snapshot()
        server = NatsServer(rack_id=cfg.rack_id, data_dir=data_dir, host="127.0.0.1", port=0)
        server.start()
        try:
            messages, last_seq = asyncio.run(_stream_count(server.url, stream))
        finally:
            server.stop()
        p99 = (eg_final.percentile(0.99) or 0) / 1e6
        print()
        print(f"frames generated           {produced:,}")
        print(f"frames acked by JetStream  {eg_final.frames_out:,}")
        print(f"JetStream '{stream}' holds  {messages:,} messages (last seq {last_seq:,})")
        print(f"mean rate                  {eg_final.frames_out / elapsed:,.0f} frames/s")
        print(f"end-to-end p99             {p99:.1f} ms (frame created -> JetStream ack)")
        print(f"rack exit code             {code} (0 = drained cleanly)")
        ok = code == 0 and messages == produced == eg_final.frames_out and produced > 0
        print("OK: every generated frame is in JetStream exactly once" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in held:
            c.close()


if __name__ == "__main__":
    sys.exit(run(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0))
