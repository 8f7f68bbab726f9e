"""The quick-start demos.

``run_switch`` (what ``scripts/demo`` runs): the ISO 8583 switch from
``configs/iso8583-switch.yaml`` with ``--workers 2``, the issuer simulator on 9001-9003 and the
load generator offering 2,000 TPS from 50 terminals for ~20 s; live progress, then a drain and
a summary: TPS, latency, outcomes, cross-wired and lost replies (both must be 0), and the
audit trail re-read from JetStream (one event per transaction, no clear PAN anywhere).

``run`` (``scripts/demo --pipeline``): the generic rack from ``configs/demo.yaml``: generator ->
mapping -> egress; the stream must hold exactly the frames the generator produced.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config import load_config
from engine.counters import Counters
from engine.harness import read_store, start_rack
from engine.rigs import shipped_rig
from engine.telemetry import RackProbe, read_state, rows

CONFIG = shipped_rig("demo.yaml")  # the checkout's configs/, or the installed copy
SWITCH_CONFIG = shipped_rig("iso8583-switch.yaml")


def run(seconds: float = 20.0, config: Path = CONFIG, workers: int = 2) -> int:
    """Run the demo; returns 0 when every produced frame is in JetStream exactly once."""
    cfg = load_config(config)
    data_dir = Path(cfg.data_dir).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh stream, so counts compare 1:1
    stream = cfg.egress.streams[0].name
    print(f"starting rack '{cfg.rack_id}' from {config} with --workers {workers} "
          f"(generator -> mapping x{workers} -> egress -> JetStream '{stream}')", flush=True)
    rack = start_rack(config, workers=workers)
    proc = rack.proc
    held: list[Counters] = []
    try:
        state = read_state(data_dir)
        # Keep our own mapping of the counters: it outlives the rack's unlink at stop.
        by_role = {p["role"]: p for p in state["processes"]}
        source = Counters.attach(by_role["source"]["counters"])
        egress = Counters.attach(by_role["egress"]["counters"])
        held += [source, egress]
        probe = RackProbe(state)
        print(f"{'t(s)':>5} {'generated':>11} {'in JetStream':>13} {'rate/s':>9} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'rack CPU%':>9}")
        t0 = time.monotonic()
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
            prev = cur
        probe.close()
        elapsed = time.monotonic() - t0
        print("stopping (drain: intake stops, rings empty into JetStream) ...", flush=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
        produced = source.snapshot().frames_out
        eg_final = egress.snapshot()
        store = read_store(data_dir, cfg.rack_id, stream, messages=False)
        messages, last_seq = store.count, store.last_seq
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


def start_issuer_simulator(args: list[str], ports: int) -> subprocess.Popen[bytes]:
    """``engine iso issuer`` with ``args``, returned once it listens on its ``ports`` ports:
    it says so on stderr, one line per port (read here; the rest is drained by a thread)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "iso", "issuer", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for _ in range(ports):
        line = proc.stderr.readline()
        if b"listening" not in line:
            proc.kill()
            raise RuntimeError(f"issuer simulator did not start: {line.decode(errors='replace')}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc


def run_switch(seconds: float = 20.0, tps: float = 2000.0, workers: int = 2) -> int:
    """Run the switch demo; 0 when nothing was cross-wired or lost and the audit is complete."""
    from engine.frame import decode
    from gears.iso8583.codec import spec_by_name
    from gears.iso8583.framing import FramingConfig
    from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

    cfg = load_config(SWITCH_CONFIG)
    data_dir = Path(cfg.data_dir).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    stream = cfg.egress.streams[0]
    mix = (MixEntry(pan="4761739001010119", amount=2_500, weight=6),       # visa: approved
           MixEntry(pan="4000056655665556", amount=750_000, weight=1),     # visa, big: 51
           MixEntry(pan="5500000000000004", amount=12_000, weight=2),      # mastercard: 05
           MixEntry(pan="9000000000000001", amount=1_000, weight=1))       # no route: 92
    pans = [m.pan for m in mix]
    print(f"ISO 8583 switch demo: rack '{cfg.rack_id}' ({SWITCH_CONFIG.name}, --workers "
          f"{workers}), issuer simulator on 9001-9003, {tps:,.0f} TPS offered from 50 "
          f"terminals for {seconds:.0f} s", flush=True)
    issuer = start_issuer_simulator(
        ["--port", "9001", "--port", "9002", "--port", "9003", "--rule", "4:500000=51",
         "--rule", "4=00", "--rule", "5=05"], 3)
    run = start_rack(SWITCH_CONFIG, workers=workers)  # ready: listening, issuers reached
    rack = run.proc
    try:
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=8583, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=50, rate=tps, duration=seconds,
            grace=7.0, mix=mix))
        print(f"{'t(s)':>5} {'sent':>9} {'answered':>9} {'TPS':>7} {'p99 ms':>7} "
              f"{'cross-wired':>11}", flush=True)
        t0 = time.monotonic()
        last = [0, t0]

        def progress(g: LoadGenerator) -> None:
            r = g.report
            now = time.monotonic()
            rate = (r.received - last[0]) / max(1e-9, now - last[1])
            last[:] = [r.received, now]
            recent = r.latencies_ns[-int(max(1, rate)):]
            p99 = sorted(recent)[int(len(recent) * 0.99) - 1] / 1e6 if recent else 0.0
            print(f"{now - t0:5.1f} {r.sent:9,} {r.received:9,} {rate:7,.0f} {p99:7.2f} "
                  f"{r.cross_wired:11}", flush=True)

        gen.progress = progress
        report = asyncio.run(gen.run())
        summary = report.summary()
        print("stopping the rack (drain: in-flight answered, events flushed to JetStream) ...",
              flush=True)
        rack.send_signal(signal.SIGTERM)
        code = rack.wait(60)
        store = read_store(data_dir, cfg.rack_id, stream.name, stream.subjects[0])
        events, blobs = store.count, [data for _, data in store.messages]
        outcomes: dict[str, int] = {}
        for blob in blobs:
            body = decode(blob).body
            outcomes[body["de39"]] = outcomes.get(body["de39"], 0) + 1
        leaks = sum(blob.count(p.encode()) for blob in blobs for p in pans)
        leaks += sum(path.read_bytes().count(p.encode()) for path in data_dir.rglob("*")
                     if path.is_file() for p in pans)
        print()
        print(f"{'transactions answered':<34} {summary['received']:,} of {summary['sent']:,} "
              f"sent")
        print(f"{'throughput':<34} {summary['tps']:,.0f} TPS")
        print(f"{'latency p50 / p90 / p99 / max':<34} {summary['p50_ms']} / {summary['p90_ms']}"
              f" / {summary['p99_ms']} / {summary['max_ms']} ms")
        print(f"{'approved (00)':<34} {summary['codes'].get('00', 0):,}")
        print(f"{'declined: funds (51) / issuer (05)':<34} {summary['codes'].get('51', 0):,} / "
              f"{summary['codes'].get('05', 0):,}")
        print(f"{'no route (92) / timeouts (91)':<34} {summary['codes'].get('92', 0):,} / "
              f"{summary['codes'].get('91', 0):,}")
        print(f"{'cross-wired / lost replies':<34} {summary['cross_wired']} / {summary['lost']}")
        print(f"{'audit events in JetStream':<34} {events:,} (by DE39: {dict(sorted(outcomes.items()))})")
        print(f"{'clear PANs in stream and data dir':<34} {leaks}")
        print(f"{'rack exit code':<34} {code} (0 = drained cleanly)")
        ok = (report.ok and code == 0 and events == summary["received"] and leaks == 0)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for proc in (rack, issuer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    secs = float(args[0]) if args else 20.0
    sys.exit(run(secs) if "--pipeline" in sys.argv else run_switch(secs))
