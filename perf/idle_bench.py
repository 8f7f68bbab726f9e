"""Idle switch rack: CPU burnt with no traffic, this tree vs another commit in the same run.

    python perf/idle_bench.py [--seconds 30] [--workers 2] [--against REV] [--repeat N]
                              [--json PATH] [--quick]

The rack of ``configs/iso8583-switch.yaml`` as shipped (coat check and SAF on), its issuer
links up to the issuer simulator, no acquirer: every process of the rack (supervisor,
switch replicas, egress, telemetry, nats-server) is sampled with psutil before and after
``--seconds``, and the sum is reported as a percentage of one CPU, per process role too.
``--against REV`` runs REV's rack the same way, alternating (REV, this tree, ...
``--repeat`` times each), and reports the ratio of the medians.

Memory: RSS and PSS summed over the same processes at the end of the interval (bar, issue
"Operations": PSS <= 150 MB with ``--workers 2``, nats-server included).

Bar (issue "Rack: survive"): < 2% of one CPU with ``--workers 2`` (3.8% measured on
2026-11-27, before the switch's timers were armed at the next deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from switch_bench import ROOT, checkout, start_switch_rack, stop_rack, switch_rig_file

from engine.demo import start_issuer_simulator
from engine.natsd import free_port

BAR = 2.0  # percent of one CPU
PSS_BAR = 150.0  # MB, all processes of the idle rack with --workers 2, nats-server included


def _memory(rack_pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over the rack's processes. PSS splits each shared page
    between the processes that map it, so the sum is what the rack costs the machine; RSS
    counts shared pages (interpreter, libraries, rings) once per process."""
    rss = pss = 0
    root = psutil.Process(rack_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += info.pss
    return rss / 1e6, pss / 1e6


def _names(data_dir: Path, rack_pid: int) -> dict[int, str]:
    """Process names by pid from the rack's state file (``engine status`` reads the same)."""
    state = json.loads((data_dir / "state.json").read_text())
    names = {int(p["pid"]): p["name"] for p in state.get("processes", []) if p.get("pid")}
    names[rack_pid] = "supervisor"
    return names


def _cpu(rack_pid: int, names: dict[int, str]) -> dict[int, tuple[str, float]]:
    out = {}
    root = psutil.Process(rack_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = names.get(p.pid) or ("nats-server" if "nats-server" in p.name() else "other")
            out[p.pid] = (name, t.user + t.system)
        except psutil.Error:
            pass
    return out


def measure(root: Path, tmp: Path, issuer_port: int, seconds: float, workers: int) -> dict:
    """CPU % of one core of an idle switch rack of ``root`` over ``seconds``."""
    path, data_dir, port = switch_rig_file(tmp, issuer_port, coatcheck=True, root=root)
    rack = start_switch_rack(path, port, workers, root)
    try:
        time.sleep(2.0)  # start-up work (JetStream stream creation, imports) is not idling
        names = _names(data_dir, rack.pid)
        before = _cpu(rack.pid, names)
        t0 = time.monotonic()
        time.sleep(seconds)  # measuring an interval of doing nothing: nothing to await
        after = _cpu(rack.pid, names)
        wall = time.monotonic() - t0
        rss, pss = _memory(rack.pid)
    finally:
        stop_rack(rack)
        shutil.rmtree(data_dir, ignore_errors=True)
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        used = cpu - before.get(pid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + used / wall * 100
    return {"total_pct": round(sum(roles.values()), 3),
            "roles_pct": {k: round(v, 3) for k, v in sorted(roles.items())},
            "rss_mb": round(rss, 1), "pss_mb": round(pss, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--against", metavar="REV")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="at most 8 s (scripts/bench)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 8.0)
    issuer_port = free_port()
    issuer = start_issuer_simulator(["--port", str(issuer_port), "--rule", "4=00"], 1)
    tmp = Path(tempfile.mkdtemp(prefix="idle-bench-"))
    worktree = None
    mine: list[dict] = []
    theirs: list[dict] = []
    try:
        if args.against:
            worktree = checkout(args.against, tmp)
        for _ in range(max(1, args.repeat)):
            if worktree is not None:
                theirs.append(measure(worktree, tmp, issuer_port, args.seconds, args.workers))
            mine.append(measure(ROOT, tmp, issuer_port, args.seconds, args.workers))
    finally:
        issuer.kill()
        issuer.wait()
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                           capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda r: r["total_pct"])[len(runs) // 2]

    flux = median(mine)
    other = median(theirs) if theirs else None
    print(f"idle switch rack: configs/iso8583-switch.yaml, --workers {args.workers}, issuer "
          f"links up, no traffic, {args.seconds:.0f} s; % of one CPU, median of "
          f"{len(mine)}")
    roles = sorted(set(flux["roles_pct"]) | set(other["roles_pct"] if other else ()))
    head = f"{'process':<22} {'this tree':>10}"
    if other is not None:
        head += f" {'@' + args.against[:12]:>14}"
    print(head)
    for role in roles:
        line = f"{role:<22} {flux['roles_pct'].get(role, 0.0):10.2f}"
        if other is not None:
            line += f" {other['roles_pct'].get(role, 0.0):14.2f}"
        print(line)
    line = f"{'total':<22} {flux['total_pct']:10.2f}"
    ratio = None
    if other is not None:
        ratio = flux["total_pct"] / other["total_pct"] if other["total_pct"] else 0.0
        line += f" {other['total_pct']:14.2f}   ratio {ratio:.2f}x"
    print(line)
    line = f"{'memory RSS / PSS MB':<22} {flux['rss_mb']:5.0f}/{flux['pss_mb']:.0f}"
    if other is not None:
        line += f" {other['rss_mb']:9.0f}/{other['pss_mb']:.0f}"
    print(line)
    ok = flux["total_pct"] < BAR
    print(f"bar: idle < {BAR:g}% of one CPU: {flux['total_pct']:.2f}% — "
          f"{'PASS' if ok else 'FAIL'}")
    mem_ok = flux["pss_mb"] <= PSS_BAR
    print(f"bar: idle PSS <= {PSS_BAR:g} MB: {flux['pss_mb']:.0f} MB (RSS {flux['rss_mb']:.0f} MB)"
          f" — {'PASS' if mem_ok else 'FAIL'}")
    ok = ok and mem_ok
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "bench": "idle", "seconds": args.seconds, "workers": args.workers,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "this_tree": flux, "runs": mine, "against": args.against,
            "other": other, "other_runs": theirs, "ratio": ratio, "bar_met": ok,
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
