"""The switch's fault bars at full size (issue "Switch core"), with independent peers.

    python perf/switch_faults.py [--only NAME ...] [--outage-minutes 10] [--json PATH]

Runs the scenarios of ``tests/scenarios.py`` — the same code the test suite runs short —
with the bars' figures:

* kill-replica:     SIGKILL one of two replicas at 1,000 TPS, issuer delay 200 ms: every
                    request the issuer saw is answered with exactly one audit event or
                    reversed exactly once;
* stalled-egress:   egress SIGSTOPped 35 s at 1,500 TPS (default 4 MiB rings), then a
                    replica SIGKILLed: 0 answered transactions without an audit event;
* nats-outage:      NATS down 10 minutes with timeouts happening (and the switch killed
                    before it returns): 0 reversals lost, each delivered once after;
* connection-flood: 5,000 connections held idle under a 1,024-descriptor limit: the rack
                    stays up, logs < 100 lines a minute, refuses beyond its caps at once,
                    and a 200 TPS background load loses nothing;
* supervisor-kill:  (issue "Rack: survive") the supervisor SIGKILLed at 1,500 TPS, the rack
                    started again: every answered transaction has exactly one audit event,
                    every request the issuer saw is answered or reversed once;
* sigterm-drain:    SIGTERM at 1,500 TPS while acquirers keep sending: every request read
                    is answered, each with its event, exit 0 within the drain timeout.

Prints a table (figures and verdict per scenario), writes JSON, exits 1 if a promise broke.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import scenarios  # noqa: E402 - tests/ holds the scenarios the suite runs too
from peers import PeerThread  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["kill-replica", "stalled-egress", "nats-outage",
                             "connection-flood", "supervisor-kill", "sigterm-drain"])
    ap.add_argument("--outage-minutes", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = {
        "kill-replica": lambda d, p: scenarios.kill_replica(
            d, p, tps=1000, seconds=10, kill_at=5.0, issuer_delay=0.2),
        "stalled-egress": lambda d, p: scenarios.stalled_egress(
            d, p, tps=1500, seconds=45, stall_at=2.0, stall=35.0, ring="4MiB"),
        "nats-outage": lambda d, p: scenarios.nats_outage(
            d, p, outage=args.outage_minutes * 60, timeouts_per_s=1.0),
        "connection-flood": lambda d, p: scenarios.connection_flood(
            d, p, connections=5000, nofile=1024, tps=200, seconds=60),
        "supervisor-kill": lambda d, p: scenarios.supervisor_kill(
            d, p, tps=1500, seconds=12, kill_at=6.0),
        "sigterm-drain": lambda d, p: scenarios.sigterm_drain(
            d, p, tps=1500, seconds=20, stop_at=6.0),
    }
    results = []
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
        peers = PeerThread()
        t0 = time.monotonic()
        try:
            result = run(work, peers)
        finally:
            peers.stop()
            shutil.rmtree(work, ignore_errors=True)
        result.figures["seconds"] = round(time.monotonic() - t0, 1)
        results.append(result)
        verdict = "PASS" if not result.problems else "FAIL: " + "; ".join(result.problems)
        print(f"{name:<17} {json.dumps(result.figures)}\n{'':<17} {verdict}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{"name": r.name, "figures": r.figures,
                                          "problems": r.problems} for r in results], indent=2))
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
