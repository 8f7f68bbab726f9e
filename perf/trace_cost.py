"""What tracing costs the switch process, per transaction, without the noise of a whole rack.

Usage: python perf/trace_cost.py [--count N] [--repeat R] [--json PATH]

The switch's own decisions (``SwitchCore.request`` and ``.response`` for an approved 0100
with coat check off) and the shell's trace step (``finish_traces``: keep rules, spans,
CBOR, the tap write) run in one process over real shared memory (journal, counters, a tap
ring that a reader empties between repeats), tracing off, at 1% + keep rules and at 100%.
Each figure is the best of ``--repeat`` runs of ``--count`` transactions (scheduler noise
only ever makes a figure worse). The rack-wide cost, with I/O, egress, nats-server and the
telemetry process's export, is ``switch_bench.py --tracing``; this is the part the
transaction path itself pays, the bound the issue asks to be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from switchkit import settings  # noqa: E402

from engine.counters import Counters  # noqa: E402
from engine.journal import Journal  # noqa: E402
from engine.ring import Ring  # noqa: E402
from engine.shm import KIND_TAP, unlink  # noqa: E402
from engine.tap import Tap, Tracer, TraceSettings  # noqa: E402
from engine.traceexport import TapReader  # noqa: E402
from gears.iso8583.codec import FieldIndex, encode, spec_by_name  # noqa: E402
from gears.iso8583.core import Answer, Forward, SwitchCore, stat_defs  # noqa: E402
from gears.iso8583.tracing import finish_traces, mono_ns  # noqa: E402

SPEC = spec_by_name("default")
VARIANTS = (("off", TraceSettings(enabled=False)),
            ("1% + keep rules", TraceSettings(sample=0.01)),
            ("100%", TraceSettings(sample=1.0)))


def _requests(n: int) -> list[bytes]:
    return [encode({"t": "0100", "2": "4761739001010119", "3": "000000", "4": "000000002500",
                    "7": "1127153000", "11": f"{i % 1_000_000:06d}",
                    "41": f"T{i // 1_000_000:07d}", "49": "840"}, SPEC) for i in range(n)]


def run(trace: TraceSettings, raws: list[bytes], tag: str) -> tuple[float, int]:
    """Seconds of CPU for ``raws`` through request -> response -> trace, and traces kept."""
    names = [f"fx-tracecost-{os.getpid()}-{tag}-{k}-{uuid.uuid4().hex[:6]}"
             for k in ("j", "c", "t")]
    s = settings({"a": 9, "b": 9, "c": 9}, timeout=30.0)
    journal = Journal.create(names[0], len(raws) + 16, 1024)
    journal.take_over()  # a fresh journal: nothing to settle
    counters = Counters.create(names[1], len(stat_defs(s)))
    tap_ring = Ring.create(names[2], 1 << 26, KIND_TAP, doorbells=False)
    try:
        tracer = Tracer(trace, Tap(tap_ring, counters))
        core = SwitchCore(s, stats=counters.stats(stat_defs(s)), journal=journal,
                          tracer=tracer)
        core.link_up("a", 0)
        core.opened(1)
        issuer = FieldIndex(SPEC, {"39", "41", "11"})
        t0 = time.process_time()
        for raw in raws:
            now = time.monotonic()
            fwd = core.request(1, b"", raw, now, now)[0]
            assert isinstance(fwd, Forward)
            if fwd.trace is not None:
                fwd.trace.t[6] = mono_ns()  # SENT: the shell's reading
            actions = core.response("a", 0, issuer.respond(fwd.data, "00"), time.monotonic())
            answer = actions[-1]
            assert isinstance(answer, Answer)
            if answer.trace is not None:
                finish_traces(tracer, [answer], mono_ns(), "127.0.0.1", False)
            journal.close(answer.slot)
        cpu = time.process_time() - t0
        reader = TapReader([{"name": "switch", "tap": tap_ring.segment.name}])
        kept = len(reader.poll(limit=1 << 20).traces)
        reader.close()
        return cpu, kept
    finally:  # the mappings go with the process (views into them are still held)
        for name in names:
            unlink(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=ROOT / "perf" / "results" / "trace_cost.json")
    args = ap.parse_args()
    raws = _requests(args.count)
    best: dict[str, float] = {}
    kept: dict[str, int] = {}
    for r in range(args.repeat):  # alternating, so a slow moment hits every variant alike
        for name, trace in VARIANTS:
            cpu, k = run(trace, raws, f"{r}{len(best)}")
            us = cpu / args.count * 1e6
            best[name] = min(best.get(name, us), us)
            kept[name] = k
    off = best["off"]
    print(f"switch core + trace step, {args.count:,} approved 0100s per run, best of "
          f"{args.repeat} (CPU µs per transaction, one process)")
    print(f"{'tracing':<18} {'µs/txn':>8} {'vs off':>8} {'traces kept':>12}")
    for name, _ in VARIANTS:
        print(f"{name:<18} {best[name]:8.2f} {best[name] / off:8.3f} {kept[name]:12,}")
    print(f"the transaction path pays {best['1% + keep rules'] - off:.2f} µs per transaction "
          f"at 1% (clock readings for every transaction, spans for the kept), "
          f"{best['100%'] - off:.2f} µs at 100%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "trace_cost", "count": args.count, "repeat": args.repeat,
        "us_per_txn": best, "ratio": {k: round(v / off, 4) for k, v in best.items()},
        "kept": kept, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                  "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
