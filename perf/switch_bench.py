"""Switch benchmark: fluxrig's ISO 8583 switch vs a plain asyncio switch on pyiso8583, and
optionally vs fluxrig at another commit (regression check), all in the same run.

    python perf/switch_bench.py [--seconds 60] [--p99-seconds 20] [--workers 2] [--coatcheck] [--tracing]
                                [--against REV] [--repeat N] [--json PATH] [--quick]

``--against REV`` checks out REV (``git worktree``, extensions built in place), runs its rack
with the same config, load and issuer, and reports TPS and CPU per transaction of this tree
relative to REV. Runs alternate (REV, this tree, REV, this tree ... ``--repeat`` times each)
because on a shared VM whichever system runs later in a bench can be slower; the table
reports the median of each.

Same machine, same run, same issuer simulator (``engine iso issuer``, approves BIN 4) and
same load generator (``engine iso load``, a separate process, 50 terminals):

1. fixed 2,000 TPS offered for ``--p99-seconds`` on the fresh system: latency percentiles;
2. max rate: closed loop, 4 outstanding requests per terminal, for ``--seconds`` — sustained
   TPS, latency, cross-wired and lost replies (must be 0), and CPU time per transaction
   summed over every process of the system under test (for fluxrig: supervisor, switch
   replicas, egress, telemetry and nats-server; the audit trail is part of the work).

Bars (issue "Payments I"): >= 8,000 TPS sustained with 0 cross-wired / 0 lost; >= 2x the
baseline's TPS; p99 <= 5 ms at 2,000 TPS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml
from _util import tree_cpu_seconds, wait_port

from engine.demo import start_issuer_simulator
from engine.harness import start_rack
from engine.natsd import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SAF = True  # the coat check run has store-and-forward on too (--no-saf: coat check alone)


MIX = ["4761739001010119:0100:2500"]


def _load(port: int, seconds: float, rate: float) -> dict:
    cmd = [PY, "-m", "engine.cli", "iso", "load", "--port", str(port), "--connections", "50",
           "--window", "4", "--duration", str(seconds), "--rate", str(rate), "--json"]
    for m in MIX:
        cmd += ["--mix", m]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def _measure(pid: int, port: int, seconds: float, p99_seconds: float) -> dict:
    # the latency run first, on a fresh system: after a minute at full load the rack's
    # nats-server is still digesting ~600k audit events, which is not what 2,000 TPS sees
    steady = _load(port, p99_seconds, 2000)
    cpu0 = tree_cpu_seconds(pid)
    peak = _load(port, seconds, 0)
    cpu = tree_cpu_seconds(pid) - cpu0
    return {
        "max": peak, "at_2000": steady,
        "cpu_us_per_txn": round(cpu / max(1, peak["received"]) * 1e6, 1),
    }


def switch_rig_file(tmp: Path, issuer_port: int, coatcheck: bool, idle_spin_us: int = 0,
                    root: Path = ROOT, traces: dict | None = None) -> tuple[Path, Path, int]:
    """``configs/iso8583-switch.yaml`` of ``root`` on a free port, its issuers on
    ``issuer_port``, data dir under ``tmp``: (rig file, data dir, port)."""
    port = free_port()
    cfg = yaml.safe_load((root / "configs" / "iso8583-switch.yaml").read_text())
    cfg["rack"]["id"] = "bench"
    data_dir = tmp / f"rack-{'coat' if coatcheck else 'plain'}-{time.monotonic_ns()}"
    cfg["rack"]["data_dir"] = str(data_dir)
    cfg["egress"]["streams"][0]["subjects"] = ["fluxrig.bench.txn"]
    if (cfg.get("telemetry") or {}).get("prometheus"):  # on, as shipped, but not on a fixed port
        cfg["telemetry"]["prometheus"]["port"] = free_port()
    if traces is not None:  # --tracing: the variant's telemetry.traces
        cfg.setdefault("telemetry", {})["traces"] = traces
    pipeline = cfg["pipelines"][0]
    pipeline["sinks"][0]["settings"]["subject"] = "fluxrig.bench.txn"
    s = pipeline["source"]["settings"]
    s["listen"]["port"] = port
    s["coatcheck"]["enabled"] = coatcheck
    s["idle_spin_us"] = idle_spin_us
    s["saf"]["enabled"] = coatcheck and SAF
    for issuer in s["issuers"].values():
        issuer["port"] = issuer_port
    path = tmp / "bench-switch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data_dir, port


def start_switch_rack(path: Path, port: int, workers: int,
                      root: Path = ROOT) -> subprocess.Popen[bytes]:
    """``engine start`` of ``root`` for ``path``, returned once it serves."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if root == ROOT:  # ready: every process serving, issuer links up
        return start_rack(path, workers=workers, cwd=root, env=env).proc
    # another revision may predate --ready-fd: wait for its port, then a moment
    rack = subprocess.Popen([PY, "-m", "engine.cli", "start", "--config", str(path),
                             "--workers", str(workers)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
    except BaseException:
        rack.kill()
        raise
    time.sleep(1.5)  # its issuer links connect right after the listener
    return rack


def stop_rack(rack: subprocess.Popen[bytes]) -> None:
    """SIGTERM (drain), SIGKILL after 60 s."""
    rack.send_signal(signal.SIGTERM)
    try:
        rack.wait(60)
    except subprocess.TimeoutExpired:
        rack.kill()
        rack.wait()


def run_fluxrig(issuer_port: int, seconds: float, p99_seconds: float, workers: int,
                tmp: Path, coatcheck: bool, idle_spin_us: int = 0, root: Path = ROOT,
                traces: dict | None = None) -> dict:
    path, data_dir, port = switch_rig_file(tmp, issuer_port, coatcheck, idle_spin_us, root,
                                           traces)
    rack = start_switch_rack(path, port, workers, root)
    try:
        result = _measure(rack.pid, port, seconds, p99_seconds)
        if traces is not None:
            result["tap"] = _tap_counts(data_dir)
    finally:
        stop_rack(rack)
    result["workers"] = workers
    result["coatcheck"] = coatcheck
    shutil.rmtree(data_dir, ignore_errors=True)
    return result


def _tap_counts(data_dir: Path) -> dict[str, int]:
    """Traces the switch processes kept and dropped (their counters, read live)."""
    from engine.counters import Counters

    state = json.loads((data_dir / "state.json").read_text())
    out = {"traces_kept": 0, "traces_dropped": 0}
    for p in state["processes"]:
        if p["role"] == "source" and p.get("counters"):
            c = Counters.attach(p["counters"])
            snap = c.snapshot()
            c.close()
            out["traces_kept"] += snap.traces_kept
            out["traces_dropped"] += snap.traces_dropped
    return out


def checkout(rev: str, tmp: Path) -> Path:
    """REV in a worktree under ``tmp`` with its C extensions built in place."""
    where = tmp / f"rev-{rev.replace('/', '_')}"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), rev], cwd=ROOT,
                   check=True, capture_output=True)
    # the extensions, built in place as setup.py would (-O2, C11) without needing its
    # setuptools (a checkout's pyproject may want a newer one than the venv has)
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for c_file in sorted((where / "engine").glob("_*.c")):
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-std=c11", "-shared", "-fPIC",
                        f"-I{include}", str(c_file), "-o",
                        str(c_file.with_name(c_file.stem + suffix))], check=True)
    return where


def median_run(runs: list[dict]) -> dict:
    """The run with the median TPS at max rate (its other figures come with it)."""
    return sorted(runs, key=lambda r: r["max"]["tps"])[len(runs) // 2]


def run_baseline(issuer_port: int, seconds: float, p99_seconds: float) -> dict:
    port = free_port()
    proc = subprocess.Popen([PY, str(ROOT / "perf" / "baselines" / "asyncio_switch.py"),
                             "--port", str(port), "--route", f"4=127.0.0.1:{issuer_port}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return _measure(proc.pid, port, seconds, p99_seconds)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--p99-seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-saf", action="store_true",
                    help="the coat check run without store-and-forward reversals")
    ap.add_argument("--coatcheck", action="store_true",
                    help="also run fluxrig with coat check + SAF on and report the cost")
    ap.add_argument("--idle-spin-us", type=int, default=0,
                    help="switch setting idle_spin_us for the fluxrig runs")
    ap.add_argument("--against", metavar="REV",
                    help="also run fluxrig at git revision REV and report this tree vs REV")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --against: alternate runs of each this many times (median)")
    ap.add_argument("--tracing", action="store_true",
                    help="only fluxrig, tracing off vs 1%% sampling + keep rules vs 100%%, "
                         "alternating --repeat times (issue 'Pipeline B' bars)")
    ap.add_argument("--declines", type=int, default=0, metavar="PCT",
                    help="with --tracing: this share of requests declined by the issuer "
                         "(kept by the keep rules); default 0: the switch bench's own load")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true",
                    help="at most 10 s at max rate and 5 s at 2,000 TPS (scripts/bench)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.p99_seconds = min(args.seconds, 10.0), min(args.p99_seconds, 5.0)
    global SAF
    SAF = not args.no_saf
    if args.tracing:
        return tracing_main(args)
    issuer_port = free_port()
    issuer = start_issuer_simulator(["--port", str(issuer_port), "--rule", "4=00"], 1)
    tmp = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    other = other_coat = None
    worktree = None
    try:
        base = run_baseline(issuer_port, args.seconds, args.p99_seconds)
        if args.against:
            worktree = checkout(args.against, tmp)
            mine, theirs, mine_c, theirs_c = [], [], [], []
            for _ in range(max(1, args.repeat)):
                for root, plain, coated in ((worktree, theirs, theirs_c), (ROOT, mine, mine_c)):
                    if args.coatcheck:
                        coated.append(run_fluxrig(issuer_port, args.seconds, args.p99_seconds,
                                                  args.workers, tmp, True, args.idle_spin_us,
                                                  root))
                    plain.append(run_fluxrig(issuer_port, args.seconds, args.p99_seconds,
                                             args.workers, tmp, False,
                                             idle_spin_us=args.idle_spin_us, root=root))
            flux, other = median_run(mine), median_run(theirs)
            coat = median_run(mine_c) if mine_c else None
            other_coat = median_run(theirs_c) if theirs_c else None
        else:
            # coat check first when asked: the run that goes last on this VM has measured up
            # to 25% slower whatever it was (a long-running issuer simulator, a warm page
            # cache of JetStream files...), and the cost must not be blamed on coat check
            coat = (run_fluxrig(issuer_port, args.seconds, args.p99_seconds, args.workers, tmp,
                                True, args.idle_spin_us) if args.coatcheck else None)
            flux = run_fluxrig(issuer_port, args.seconds, args.p99_seconds, args.workers, tmp,
                               False, idle_spin_us=args.idle_spin_us)
    finally:
        issuer.kill()
        issuer.wait()
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = flux["max"]["tps"] / base["max"]["tps"] if base["max"]["tps"] else 0.0
    print(f"switch benchmark: {args.seconds:.0f} s at max rate (50 terminals x 4 outstanding), "
          f"{args.p99_seconds:.0f} s at 2,000 TPS; issuer simulator and load generator on the "
          f"same {os.cpu_count()} CPUs; idle_spin_us={args.idle_spin_us}")
    print(f"{'system':<34} {'TPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'x-wired':>7} {'lost':>5} "
          f"{'p99@2k':>7} {'CPU us/txn':>10} {'ratio':>6}")
    rows = [("asyncio + pyiso8583 (baseline)", base),
            (f"fluxrig switch --workers {flux['workers']}", flux)]
    if coat is not None:
        rows.append(("fluxrig + coat check" + (" + SAF" if SAF else ""), coat))
    if other is not None:
        rows.append((f"fluxrig @{args.against[:12]}", other))
    if other_coat is not None:
        rows.append((f"fluxrig @{args.against[:12]} + coat check" + (" + SAF" if SAF else ""),
                     other_coat))
    for name, r in rows:
        m, s = r["max"], r["at_2000"]
        print(f"{name:<34} {m['tps']:8,.0f} {m['p50_ms']:7.2f} {m['p99_ms']:7.2f} "
              f"{m['cross_wired']:7} {m['lost']:5} {s['p99_ms']:7.2f} {r['cpu_us_per_txn']:10.1f} "
              f"{m['tps'] / base['max']['tps']:6.2f}")
    fm = flux["max"]
    bars = {
        "tps_sustained_8000": fm["tps"] >= 8000 and fm["cross_wired"] == 0 and fm["lost"] == 0,
        "ratio_2x": ratio >= 2.0,
        "p99_at_2000_le_5ms": flux["at_2000"]["p99_ms"] <= 5.0,
    }
    print(f"bar: >= 8,000 TPS for {args.seconds:.0f} s, 0 cross-wired, 0 lost: "
          f"{fm['tps']:,.0f} TPS — {'PASS' if bars['tps_sustained_8000'] else 'FAIL'}")
    print(f"bar: >= 2x baseline TPS: {ratio:.2f}x — {'PASS' if bars['ratio_2x'] else 'FAIL'}")
    print(f"bar: p99 <= 5 ms at 2,000 TPS: {flux['at_2000']['p99_ms']:.2f} ms — "
          f"{'PASS' if bars['p99_at_2000_le_5ms'] else 'FAIL'}")
    if coat is not None:
        cost = 1 - coat["max"]["tps"] / flux["max"]["tps"]
        bars["coatcheck_cost_le_15pct"] = cost <= 0.15
        bars["coatcheck_p99_at_2000_le_5ms"] = coat["at_2000"]["p99_ms"] <= 5.0
        print(f"bar: coat check TPS cost <= 15%: {cost:.1%} "
              f"({coat['max']['tps']:,.0f} vs {flux['max']['tps']:,.0f}) — "
              f"{'PASS' if bars['coatcheck_cost_le_15pct'] else 'FAIL'}")
        print(f"bar: coat check p99 <= 5 ms at 2,000 TPS: {coat['at_2000']['p99_ms']:.2f} ms — "
              f"{'PASS' if bars['coatcheck_p99_at_2000_le_5ms'] else 'FAIL'}")
    against = {}
    if other is not None:
        for label, mine_r, theirs_r in (("plain", flux, other), ("coatcheck", coat, other_coat)):
            if mine_r is None or theirs_r is None:
                continue
            tps = mine_r["max"]["tps"] / theirs_r["max"]["tps"]
            cpu = mine_r["cpu_us_per_txn"] / theirs_r["cpu_us_per_txn"]
            against[label] = {"tps_ratio": round(tps, 4), "cpu_ratio": round(cpu, 4)}
            bars[f"against_{label}_tps_within_5pct"] = tps >= 0.95
            bars[f"against_{label}_cpu_within_5pct"] = cpu <= 1.05
            print(f"vs {args.against} ({label}): TPS {mine_r['max']['tps']:,.0f} vs "
                  f"{theirs_r['max']['tps']:,.0f} = {tps:.3f}x; CPU/txn "
                  f"{mine_r['cpu_us_per_txn']:.1f} vs {theirs_r['cpu_us_per_txn']:.1f} us = "
                  f"{cpu:.3f}x (bar: within 5% -> TPS >= 0.95x, CPU <= 1.05x)")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "switch", "seconds": args.seconds, "p99_seconds": args.p99_seconds,
            "baseline": base, "fluxrig": flux, "fluxrig_coatcheck": coat, "ratio": ratio,
            "against": {"rev": args.against, "fluxrig": other, "fluxrig_coatcheck": other_coat,
                        "ratios": against} if args.against else None,
            "bars": bars,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return 0 if all(bars.values()) else 1


TRACING_VARIANTS = (("off", {"enabled": False}),
                    ("1% + keep rules", {"sample": 0.01}),
                    ("100%", {"sample": 1.0}))


def tracing_main(args: argparse.Namespace) -> int:
    """Tracing off vs 1% + keep rules vs 100%, same run, alternating; medians."""
    global MIX
    if args.declines:  # the issuer declines amounts >= 900000 (kept by the keep rules)
        MIX = [f"4761739001010119:0100:2500:{100 - args.declines}",
               f"4761739001010119:0100:950000:{args.declines}"]
    issuer_port = free_port()
    issuer = start_issuer_simulator(["--port", str(issuer_port), "--rule", "4:900000=05",
                                     "--rule", "4=00"], 1)
    tmp = Path(tempfile.mkdtemp(prefix="switch-bench-"))
    runs: dict[str, list[dict]] = {name: [] for name, _ in TRACING_VARIANTS}
    try:
        for _ in range(max(1, args.repeat)):
            for name, traces in TRACING_VARIANTS:
                r = run_fluxrig(issuer_port, args.seconds, args.p99_seconds, args.workers, tmp,
                                args.coatcheck, args.idle_spin_us, traces=traces)
                runs[name].append(r)
                print(f"  run: {name:<16} {r['max']['tps']:8,.0f} TPS "
                      f"{r['cpu_us_per_txn']:6.1f} us/txn  traces kept "
                      f"{r['tap']['traces_kept']:,} dropped {r['tap']['traces_dropped']:,}",
                      flush=True)
    finally:
        issuer.kill()
        issuer.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, key: str) -> float:
        vals = sorted(r["max"]["tps"] if key == "tps" else r["cpu_us_per_txn"]
                      for r in runs[name])
        return vals[len(vals) // 2]

    off_tps, off_cpu = med("off", "tps"), med("off", "cpu")
    print(f"switch tracing benchmark: {args.seconds:.0f} s at max rate x {args.repeat} "
          f"alternating runs per variant (medians), --workers {args.workers}, "
          f"{args.declines}% declines (kept by the keep rules), coat check "
          f"{'on' if args.coatcheck else 'off'}")
    print(f"{'tracing':<18} {'TPS':>8} {'CPU us/txn':>10} {'TPS ratio':>9} {'CPU ratio':>9} "
          f"{'p99 ms':>7} {'lost':>5}")
    table = {}
    for name, _ in TRACING_VARIANTS:
        tps, cpu = med(name, "tps"), med(name, "cpu")
        worst_lost = max(r["max"]["lost"] + r["max"]["cross_wired"] for r in runs[name])
        p99 = sorted(r["max"]["p99_ms"] for r in runs[name])[len(runs[name]) // 2]
        table[name] = {"tps": tps, "cpu_us_per_txn": cpu, "tps_ratio": round(tps / off_tps, 4),
                       "cpu_ratio": round(cpu / off_cpu, 4), "p99_ms": p99, "lost": worst_lost,
                       "runs": runs[name]}
        print(f"{name:<18} {tps:8,.0f} {cpu:10.1f} {tps / off_tps:9.3f} {cpu / off_cpu:9.3f} "
              f"{p99:7.2f} {worst_lost:5}")
    one = table["1% + keep rules"]
    bars = {"tps_within_3pct": one["tps_ratio"] >= 0.97,
            "cpu_within_5pct": one["cpu_ratio"] <= 1.05,
            "nothing_lost": all(t["lost"] == 0 for t in table.values())}
    print(f"bar: 1% + keep rules TPS within 3% of off: {one['tps_ratio']:.3f}x — "
          f"{'PASS' if bars['tps_within_3pct'] else 'FAIL'}")
    print(f"bar: 1% + keep rules CPU/txn within 5% of off: {one['cpu_ratio']:.3f}x — "
          f"{'PASS' if bars['cpu_within_5pct'] else 'FAIL'}")
    full = table["100%"]
    print(f"reported: 100% sampling costs {1 - full['tps_ratio']:.1%} TPS and "
          f"{full['cpu_ratio'] - 1:.1%} CPU per transaction")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "switch_tracing", "seconds": args.seconds, "repeat": args.repeat,
            "declines_pct": args.declines,
            "workers": args.workers, "variants": table, "bars": bars,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
