"""Pipeline benchmark: a whole rack, generator -> 2 mapping stages -> egress -> JetStream.

    python perf/pipeline_bench.py [--frames N] [--idle-seconds S] [--json PATH] [--quick]

For ``--workers 1`` and ``--workers 2`` (same run, same machine): starts ``engine start`` on a
generated rig (generator at full speed, ``count`` = N), waits until egress has N acks, and
reports end-to-end frames/s, p50/p99 latency (frame creation -> JetStream ack, from the egress
histogram), and CPU time per frame summed over every rack process (supervisor, nats-server,
source, stages, egress, telemetry). Then an idle rack (a source that sends one frame) is
measured for ``--idle-seconds``: total CPU of all its processes, as % of one CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _util import tree_cpu_seconds

from engine.counters import Counters
from engine.harness import start_rack
from engine.telemetry import read_state


def _rig(d: Path, rack_id: str, count: int, rate: float) -> Path:
    cfg = {
        "rack": {"id": rack_id, "data_dir": str(d / rack_id)},
        "rings": {"capacity": "4MiB", "batch": 256},
        "telemetry": {"interval": 1.0},
        "egress": {"streams": [{"name": "EV", "subjects": [f"bench.{rack_id}.>"]}]},
        "pipelines": [{
            "name": "p", "key": "headers.device",
            "source": {"gear": "generator", "settings": {
                "rate": rate, "count": count, "batch": 200, "keys": 64,
                "headers": {"device": "dev-{i}"},
                "body": {"seq": "$seq", "temp_c": 21.5, "device": "dev-{i}", "status": "ok"}}},
            "stages": [
                {"name": "filter", "gear": "mapping",
                 "settings": {"filter": {"body.status": "ok"}, "set": {"headers.site": "p7"}}},
                {"name": "enrich", "gear": "mapping",
                 "settings": {"copy": {"headers.seq": "body.seq"}, "kind": "demo.enriched"}},
            ],
            "sinks": [{"name": "js", "gear": "egress",
                       "settings": {"subject": f"bench.{rack_id}.events"}}],
        }],
    }
    path = d / f"{rack_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, data_dir: Path, workers: int) -> tuple[subprocess.Popen, dict]:
    run = start_rack(config, workers=workers)
    return run.proc, read_state(data_dir)


def run_pipeline(d: Path, workers: int, frames: int) -> dict:
    rack_id = f"pb-w{workers}"
    config = _rig(d, rack_id, frames, 0)
    proc, state = _start(config, d / rack_id, workers)
    try:
        egress = Counters.attach(next(p["counters"] for p in state["processes"]
                                      if p["role"] == "egress"))
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
        deadline = time.monotonic() + 600
        while egress.snapshot().frames_out < frames and time.monotonic() < deadline:
            time.sleep(0.01)  # shared-memory counter: polled
        dt = time.perf_counter() - t0
        cpu = tree_cpu_seconds(proc.pid) - cpu0
        snap = egress.snapshot()
        egress.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"workers": workers, "frames": snap.frames_out, "seconds": dt,
            "frames_per_s": snap.frames_out / dt, "p50_ms": (snap.percentile(0.5) or 0) / 1e6,
            "p99_ms": (snap.percentile(0.99) or 0) / 1e6,
            "cpu_us_per_frame": cpu / max(1, snap.frames_out) * 1e6, "cpu_seconds": cpu}


def run_idle(d: Path, seconds: float) -> dict:
    config = _rig(d, "pb-idle", 1, 0)
    proc, state = _start(config, d / "pb-idle", 1)
    try:
        time.sleep(3.0)  # let start-up work (imports, stream creation) finish first
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(seconds)  # the measurement window itself
        cpu = tree_cpu_seconds(proc.pid) - cpu0
        dt = time.perf_counter() - t0
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"seconds": dt, "cpu_seconds": cpu, "cpu_pct_of_one_core": 100 * cpu / dt,
            "processes": len(state["processes"]) + 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true",
                    help="at most 50,000 frames and 3 idle seconds (scripts/bench)")
    args = ap.parse_args()
    if args.quick:
        args.frames, args.idle_seconds = min(args.frames, 50_000), min(args.idle_seconds, 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        results = [run_pipeline(d, w, args.frames) for w in (1, 2)]
        idle = run_idle(d, args.idle_seconds)
    print(f"pipeline benchmark: generator -> filter -> enrich -> egress -> JetStream, "
          f"{args.frames:,} frames, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'frames/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/frame':>13} "
          f"{'ratio':>6}")
    for r in results:
        print(f"{r['workers']:>7} {r['frames_per_s']:10,.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['cpu_us_per_frame']:13.1f} {r['frames_per_s'] / results[0]['frames_per_s']:6.2f}")
    print(f"idle rack ({idle['processes']} processes incl. supervisor and nats-server): "
          f"{idle['cpu_pct_of_one_core']:.2f}% of one CPU over {idle['seconds']:.0f} s "
          f"(bar < 2%) — {'PASS' if idle['cpu_pct_of_one_core'] < 2 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "pipeline", "results": results, "idle": idle,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
