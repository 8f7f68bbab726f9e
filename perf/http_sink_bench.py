"""HTTP sink benchmark: frames out of a rack to an HTTP receiver that fails and goes away.

    python perf/http_sink_bench.py [--frames 100000] [--fail 0.10] [--outage 10]
                                   [--batch 100] [--json PATH] [--quick]

A rack (generator -> ``http_client`` sink) sends ``--frames`` frames (~200-byte payment-like
bodies, ``jsonl``) to a receiver running in a separate process (this file's ``serve`` mode:
aiohttp.web, parsing the bodies with orjson — nothing shared with the gear). Three runs:

* ``faulty`` (the bar): the receiver answers a deterministic ``--fail`` share of requests
  500, 503 or 429 (in turn, evenly spread; 429 with ``Retry-After: 1``, which the sink
  honours: most of the faulty wall time is those waits) and, once a third of the frames
  arrived, stops listening for ``--outage`` seconds and comes back on the same port; after
  the outage, two thirds through, the sink process is SIGKILLed once (the supervisor starts
  another, which sends the batch in hand again);
* ``perfect`` (the baseline): the same frames, no failures, no outage;
* ``batch=1``: a perfect receiver, one frame per request (a tenth of the frames): what
  batching buys.

The receiver records every frame id it answered 2xx; at the end it reports unique frames,
duplicates (the same id answered twice: a request the sink sent again after a timeout or
whose answer it never saw, e.g. killed between the answer and the ring commit) and the
sequence numbers missing; a control port (``GET /count``, up through the outage) tells the
bench when every frame arrived. Wall time is the receiver's: first request to last new
frame. Bar (issue "Connectors"):
``faulty`` delivers every frame at least once (lost = 0), duplicates identifiable by id.
Ratio: ``faulty`` throughput / ``perfect`` throughput (the outage is in the faulty wall time).

The sink's retry is ``initial 100ms, max 2s`` (the default max, 30 s, would add up to 30 s
of backoff after the outage to the wall time: a schedule choice, not a throughput figure).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

RESULTS = ROOT / "perf" / "results" / "http_sink_bench.json"


# --- the receiver (a process of its own) ---------------------------------------------------


def serve(port: int, control: int, fail: float, outage: float, outage_after: int,
          out: Path) -> None:
    """Receive on ``port`` until SIGTERM, then write what was received to ``out`` (JSON);
    ``GET /count`` on ``control`` (up through the outage) says how many frames so far."""
    import cbor2
    import orjson
    from aiohttp import web

    seen: set[str] = set()
    seqs: set[int] = set()
    st: dict[str, Any] = {"requests": 0, "answered_2xx": 0, "failures": 0, "duplicates": 0,
                          "frames_2xx": 0, "first_at": None, "last_new_at": None, "outage_start": None, "outage_end": None,
                          "statuses": {}}
    runner: web.AppRunner | None = None
    done = asyncio.Event()

    def frames(ctype: str, body: bytes) -> list[tuple[str, int]]:
        if ctype == "application/x-ndjson":
            docs = [orjson.loads(line) for line in body.split(b"\n") if line]
        elif ctype == "application/json":
            docs = orjson.loads(body)
        else:
            stream, docs = io.BytesIO(body), []
            while stream.tell() < len(body):
                d = cbor2.load(stream)
                docs.append({"id": d["id"].hex(), "body": d["body"]})
        return [(d["id"], d["body"]["seq"]) for d in docs]

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if st["first_at"] is None:
            st["first_at"] = time.time()
        n = st["requests"]
        st["requests"] += 1
        if fail and int((n + 1) * fail) > int(n * fail):  # evenly spread, deterministic
            status = (500, 503, 429)[st["failures"] % 3]
            st["failures"] += 1
        else:
            status = 200
            for fid, seq in frames(request.headers.get("Content-Type", ""), body):
                st["frames_2xx"] += 1
                if fid in seen:
                    st["duplicates"] += 1
                else:
                    seen.add(fid)
                    seqs.add(seq)
                    st["last_new_at"] = time.time()
            st["answered_2xx"] += 1
            if outage and st["outage_start"] is None and len(seen) >= outage_after:
                st["outage_start"] = time.time()
                asyncio.get_running_loop().create_task(go_away())
        st["statuses"][str(status)] = st["statuses"].get(str(status), 0) + 1
        return web.Response(status=status, text="ok" if status == 200 else "try later",
                            headers={"Retry-After": "1"} if status == 429 else None)

    async def start() -> web.AppRunner:
        app = web.Application(client_max_size=256 << 20)
        app.router.add_post("/in", handle)
        r = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start()
        return r

    async def go_away() -> None:
        nonlocal runner
        old, runner = runner, None
        if old is not None:
            await old.cleanup()  # listener closed, connections dropped
        await asyncio.sleep(outage)  # the fault being injected: down for this long
        runner = await start()
        st["outage_end"] = time.time()

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"unique": len(seen), "outage_end": st["outage_end"]})

    async def main() -> None:
        nonlocal runner
        runner = await start()
        ctl = web.Application()
        ctl.router.add_get("/count", count)
        ctl_runner = web.AppRunner(ctl, access_log=None, shutdown_timeout=0.1)
        await ctl_runner.setup()
        await web.TCPSite(ctl_runner, "127.0.0.1", control).start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        await done.wait()
        if runner is not None:
            await runner.cleanup()
        await ctl_runner.cleanup()

    asyncio.run(main())
    st["unique"] = len(seen)
    out.write_text(json.dumps({**st, "seqs": sorted(seqs)}))


# --- the bench ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rig(tmp: Path, name: str, url: str, frames: int, batch: int) -> tuple[Path, Path]:
    import yaml

    rack_id = f"{name}-{os.getpid()}"
    data = tmp / name
    cfg = {
        "rack": {"id": rack_id, "data_dir": str(data)},
        "rings": {"capacity": "4MiB", "batch": 256},
        "telemetry": {"interval": 1.0},
        "pipelines": [{
            "name": "p",
            "source": {"name": "src", "gear": "generator", "settings": {
                "rate": 0, "count": frames, "batch": 256, "keys": 1000,
                "kind": "iso8583.txn",
                "headers": {"route": "visa-a"},
                "body": {"seq": "$seq", "mti": "0110", "de39": "00", "amount": 10000,
                         "pan": "476173******0119", "stan": "{i}",
                         "merchant": "ACME STORE {i}", "terminal": "T{i}"}}},
            "sinks": [{"name": "out", "gear": "http_client", "settings": {
                "url": url, "batch": {"count": batch, "bytes": "1MiB", "time": "20ms"},
                "timeout": "5s", "retry": {"initial": "100ms", "max": "2s"}}}],
        }],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data


def _count(control: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{control}/count", timeout=5) as r:
        return json.loads(r.read())


def run_one(tmp: Path, name: str, frames: int, batch: int, fail: float,
            outage: float, kill: bool = False) -> dict[str, Any]:
    """One rack against one receiver process; the receiver's report and the sink's stats.
    ``kill``: SIGKILL the sink process once, after the outage, two thirds through."""
    from _util import tree_cpu_seconds, wait_port

    from engine.counters import Counters, StatDef
    from engine.harness import RackRun
    from engine.telemetry import read_state

    port, control = _free_port(), _free_port()
    report = tmp / f"{name}-receiver.json"
    recv = subprocess.Popen([sys.executable, __file__, "serve", "--port", str(port),
                             "--control", str(control), "--fail", str(fail),
                             "--outage", str(outage), "--outage-after", str(frames // 3),
                             "--out", str(report)])
    try:
        wait_port(port)
        wait_port(control)
        config, data = _rig(tmp, name, f"http://127.0.0.1:{port}/in", frames, batch)
        with open(tmp / f"{name}-rack.out", "wb") as log:
            run = RackRun(config, stdout=log, drain_timeout=30)
            try:
                run.wait_ready(60)
                state = read_state(data)
                proc = next(p for p in state["processes"] if p["name"] == "p.out")
                defs = [StatDef.from_json(d) for d in proc["stats"]]
                counters = Counters.attach(proc["counters"])

                def stats() -> dict[str, int]:
                    return {d.key: v for d, v in zip(defs, counters.snapshot().stats.tolist(),
                                                     strict=True)}

                deadline = time.monotonic() + 600
                killed = 0
                while True:
                    s = stats()
                    c = _count(control)
                    if c["unique"] + s["http_out.dead_lettered"] >= frames:
                        break
                    if kill and not killed and c["unique"] >= frames * 2 // 3 and \
                            (c["outage_end"] or not outage):
                        os.kill(next(p["pid"] for p in read_state(data)["processes"]
                                     if p["name"] == "p.out"), signal.SIGKILL)
                        killed += 1  # the batch in hand is sent again by the next sink
                    if time.monotonic() > deadline or run.proc.poll() is not None:
                        raise RuntimeError(f"{name}: not settled: stats={s}, rack exit="
                                           f"{run.proc.poll()}")
                    time.sleep(0.02)  # the receiver's count: polled (a process of its own)
                cpu = tree_cpu_seconds(run.proc.pid)
                s = stats()
                counters.close()
                code = run.stop(120)
            finally:
                run.kill()  # a no-op once stopped; a failed run leaves no rack behind
    finally:
        recv.send_signal(signal.SIGTERM)
        recv.wait(30)
    r = json.loads(report.read_text())
    seqs = set(r.pop("seqs"))
    lost = frames - len(seqs & set(range(frames)))
    requests = sum(v for k, v in s.items() if k.startswith("http_out.requests"))
    outage_s = (r["outage_end"] - r["outage_start"]) if r["outage_end"] else 0.0
    # the receiver's clock, first request to the last new frame: the rack may be done
    # before it reports ready, so the bench's own clock would start late
    wall = r["last_new_at"] - r["first_at"]
    return {"frames": frames, "batch": batch, "fail": fail, "outage": outage,
            "delivered_unique": r["unique"], "duplicates": r["duplicates"],
            "dead_lettered": s["http_out.dead_lettered"], "lost": lost,
            "requests_receiver": r["requests"], "requests_sink": requests,
            "failures_injected": r["failures"], "statuses": r["statuses"],
            "retries": s["http_out.retries"], "backoff_s": s["http_out.backoff_ms"] / 1000,
            "errors_no_answer":
            s["http_out.requests{status=error}"], "outage_measured_s": outage_s,
            "seconds": wall, "frames_per_s": frames / wall,
            "rack_cpu_s": cpu, "rack_exit": code, "sink_kills": killed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    sv = sub.add_parser("serve", help="(internal) the receiver process")
    sv.add_argument("--port", type=int, required=True)
    sv.add_argument("--control", type=int, required=True)
    sv.add_argument("--fail", type=float, default=0.0)
    sv.add_argument("--outage", type=float, default=0.0)
    sv.add_argument("--outage-after", type=int, default=0)
    sv.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--fail", type=float, default=0.10, help="share of requests failed")
    ap.add_argument("--outage", type=float, default=10.0, help="seconds the receiver is down")
    ap.add_argument("--batch", type=int, default=100, help="batch.count of the sink")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true",
                    help="20,000 frames, a 3 s outage (scripts/bench)")
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args.port, args.control, args.fail, args.outage, args.outage_after, args.out)
        return 0
    if args.quick:
        args.frames, args.outage = min(args.frames, 20_000), min(args.outage, 3.0)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="http-sink-bench-") as d:
        tmp = Path(d)
        faulty = run_one(tmp, "faulty", args.frames, args.batch, args.fail, args.outage,
                         kill=True)
        perfect = run_one(tmp, "perfect", args.frames, args.batch, 0.0, 0.0)
        single = run_one(tmp, "single", max(1000, args.frames // 10), 1, 0.0, 0.0)
    ratio = faulty["frames_per_s"] / perfect["frames_per_s"]
    batching = perfect["frames_per_s"] / single["frames_per_s"]
    print(f"http sink benchmark: {args.frames:,} frames (jsonl, ~{_frame_size()} B each), "
          f"receiver in its own process; load average at start {load:.2f}")
    cols = [("frames sent", "frames", "{:,}"), ("delivered unique", "delivered_unique", "{:,}"),
            ("duplicates (by id)", "duplicates", "{:,}"),
            ("dead-lettered", "dead_lettered", "{:,}"), ("lost (must be 0)", "lost", "{:,}"),
            ("requests (receiver)", "requests_receiver", "{:,}"),
            ("failures injected", "failures_injected", "{:,}"),
            ("no answer (outage)", "errors_no_answer", "{:,}"),
            ("sink SIGKILLs", "sink_kills", "{:,}"), ("retries", "retries", "{:,}"),
            ("outage (s)", "outage_measured_s", "{:.1f}"),
            ("sink waiting (s)", "backoff_s", "{:.1f}"),
            ("wall time (s)", "seconds", "{:.2f}"), ("frames/s", "frames_per_s", "{:,.0f}"),
            ("rack CPU (s, live processes)", "rack_cpu_s", "{:.1f}")]
    runs = [("faulty", faulty), ("perfect", perfect), ("batch=1", single)]
    print(f"{'':<30}" + "".join(f"{n:>14}" for n, _ in runs))
    for label, key, fmt in cols:
        print(f"{label:<30}" + "".join(f"{fmt.format(r[key]):>14}" for _, r in runs))
    ok = faulty["lost"] == 0 and faulty["delivered_unique"] == args.frames \
        and perfect["lost"] == 0 and single["lost"] == 0
    print(f"ratio faulty/perfect throughput: {ratio:.2f} (the {faulty['outage_measured_s']:.1f} "
          f"s outage is in the faulty wall time)")
    busy = faulty["seconds"] - faulty["backoff_s"]
    print(f"faulty minus the sink's waits (backoff, Retry-After, outage): {busy:.2f} s, "
          f"{args.frames / busy:,.0f} frames/s")
    print(f"batching: batch={args.batch} is {batching:.1f}x batch=1")
    print(f"bar: every frame delivered at least once, none lost: {'PASS' if ok else 'FAIL'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "http_sink", "frames": args.frames, "batch": args.batch,
        "fail": args.fail, "outage": args.outage,
        "faulty": faulty, "perfect": perfect, "batch_1": single,
        "ratio": ratio, "batching_ratio": batching, "bar_pass": ok,
        "faulty_busy_s": busy,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "load_at_start": load},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))
    return 0 if ok else 1


def _frame_size() -> int:
    from engine.frame import new_frame
    from gears.io.jsonl import frame_json

    return len(frame_json(new_frame("gen:p.src", "iso8583.txn", headers={"route": "visa-a"},
                                    body={"seq": 12345, "mti": "0110", "de39": "00",
                                          "amount": 10000, "pan": "476173******0119",
                                          "stan": "345", "merchant": "ACME STORE 345",
                                          "terminal": "T345"})))


if __name__ == "__main__":
    sys.exit(main())
