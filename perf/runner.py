"""Run every ``perf/*_bench.py``, keep one JSON with a machine fingerprint, chart it, compare it.

    scripts/bench [--quick|--full] [--only NAME ...] [--repeat N] [--json OUT]
                  [--compare BASELINE.json] [--no-charts]

(``scripts/bench`` installs the bench extras, then runs this file with the project venv.)

Theory of operation
-------------------
Each bench is a separate process (``perf/<name>_bench.py [--quick] --json TMP``), so a bench
that crashes or hangs costs its own figures only; it is killed (its whole process group: the
benches start racks, issuers and load generators) after ``--timeout`` seconds. With
``--repeat N`` the set runs N times in rounds (every bench once, then again), so a burst of
noise on the machine lands on different benches' repeats rather than on all of one bench's.
A bench's exit status is recorded but not judged: several exit 1 when one of their own bars
is not met on this VM (the ring's latency bar, the switch's p99) — their figures still count.

The output file (``--json``, default ``perf/results/bench-<mode>-<UTC time>.json``) holds the
mode, the fingerprint (``perf/fingerprint.py``), each bench's command, exit codes, durations
and raw JSON per repeat, and every figure (``perf/figures.py``) with its values, median and
spread. Beside it: ``<stem>.html`` (summary), ``<stem>.<bench>.png`` (charts) and
``<stem>.logs/`` (each run's output). A run file made with ``--repeat 3`` is a baseline;
``--compare`` checks this run against one (``perf/compare.py``).

Exit status: 0 all ran (and passed the comparison); 1 a gated figure regressed or went
missing; 2 bad arguments or an unusable baseline (nothing was run); 3 a bench produced no
figures (crashed, timed out, or wrote JSON its extractor cannot read).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _inject import ENV as INJECT_ENV
from compare import (
    SCHEMA,
    Comparison,
    FigureSeries,
    K,
    RunFileError,
    compare,
    load_run,
    parse_run,
    table,
)
from figures import BenchFormatError, Figure, extract
from fingerprint import fingerprint
from report import ChartsUnavailable, chart_path, html_path, write_chart, write_html

PERF = Path(__file__).resolve().parent
ROOT = PERF.parent
TIMEOUT = {"quick": 300.0, "full": 3600.0}  # seconds one bench run may take


def discover() -> dict[str, Path]:
    """Bench name -> script, for every ``perf/<name>_bench.py``."""
    return {p.name.removesuffix("_bench.py"): p for p in sorted(PERF.glob("*_bench.py"))}


@dataclass(slots=True)
class BenchRun:
    """One run of one bench.

    Attributes:
        exit: the process's exit status (None: killed at the timeout).
        seconds: wall time.
        log: its stdout and stderr.
        raw: its JSON, or None when it wrote none.
        figures: what ``perf/figures.py`` took from ``raw``.
        error: why this run has no figures, or None.
    """

    exit: int | None
    seconds: float
    log: Path
    raw: object = None
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # the bench is a session leader (start_new_session): its group is ours to end
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_bench(name: str, script: Path, mode: str, log: Path, timeout: float) -> BenchRun:
    """Run ``script`` once in ``mode`` and extract its figures.

    Args:
        name: the bench's name (``cbor``).
        script: its file.
        mode: ``quick`` passes ``--quick``; ``full`` runs it as is.
        log: file for its stdout and stderr.
        timeout: seconds before its process group is killed.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(script), "--json", str(out)]
        if mode == "quick":
            cmd.append("--quick")
        t0 = time.monotonic()
        with log.open("wb") as sink:
            sink.write(f"$ {' '.join(cmd)}\n".encode())
            sink.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                code = None
            except BaseException:  # Ctrl-C: take the bench's racks and load generators too
                _kill_group(proc)
                raise
        run = BenchRun(exit=code, seconds=time.monotonic() - t0, log=log)
        if code is None:
            run.error = f"killed after timeout={timeout:.0f}s"
            return run
        try:
            run.raw = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            run.error = f"no JSON written (exit {code}): {exc}; see {log}"
            return run
    try:
        run.figures = extract(name, run.raw, f"{script.name} --json")
    except BenchFormatError as exc:
        run.error = str(exc)
    return run


def collect(runs: dict[str, list[BenchRun]]) -> dict[str, dict[str, dict[str, object]]]:
    """The ``figures`` object of a run file: per bench, per figure, values over repeats."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for bench, bench_runs in runs.items():
        first: dict[str, Figure] = {}
        values: dict[str, list[float]] = {}
        for run in bench_runs:
            for f in run.figures:
                first.setdefault(f.name, f)
                values.setdefault(f.name, []).append(f.value)
        out[bench] = {}
        for name, f in first.items():
            series = FigureSeries(values=tuple(values[name]), unit=f.unit, gated=f.gated,
                                  floor=f.floor, what=f.what)
            out[bench][name] = {"unit": f.unit, "gated": f.gated, "floor": f.floor,
                                "what": f.what, "values": values[name],
                                "median": series.median, "spread": series.spread}
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/bench",
                                 description="Run every perf/*_bench.py, keep one JSON with a "
                                             "machine fingerprint, chart it, compare it with a "
                                             "baseline (see perf/README.md).",
                                 epilog="Exit: 0 ok, 1 regression, 2 bad input, 3 a bench "
                                        "failed.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="each bench in its quick mode: the whole set in ~1.5 minutes "
                           "on a 2-core VM (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="each bench at its full size (the switch alone takes ~4 "
                           "minutes)")
    ap.set_defaults(mode="quick")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only these benches (names as in perf/NAME_bench.py)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the set N times (a baseline wants 3: bands come from the "
                         "spread)")
    ap.add_argument("--json", type=Path, metavar="OUT",
                    help="run file to write (default perf/results/bench-MODE-TIME.json); "
                         "the HTML, charts and logs go beside it")
    ap.add_argument("--compare", type=Path, metavar="BASELINE",
                    help="a run file of the same mode: exit 1 if a figure regressed beyond "
                         "its band")
    ap.add_argument("--timeout", type=float, metavar="S",
                    help="seconds one bench run may take (default 300 quick, 3600 full)")
    ap.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring for the exit statuses)."""
    args = _parser().parse_args(argv)
    benches = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(benches))
        if unknown:
            print(f"error: --only: unknown bench {', '.join(unknown)}; expected one of "
                  f"{', '.join(benches)}", file=sys.stderr)
            return 2
        benches = {n: p for n, p in benches.items() if n in args.only}
    if args.repeat < 1:
        print(f"error: --repeat: expected >= 1, got {args.repeat}", file=sys.stderr)
        return 2
    baseline = None
    if args.compare is not None:
        try:
            baseline = load_run(args.compare)
        except RunFileError as exc:
            print(f"error: --compare: {exc}", file=sys.stderr)
            return 2
        if baseline.get("mode") != args.mode:
            print(f"error: --compare: {args.compare}: key mode: expected {args.mode!r} like "
                  f"this run, got {baseline.get('mode')!r}", file=sys.stderr)
            return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.json or ROOT / "perf" / "results" / f"bench-{args.mode}-{stamp}.json"
    out = out.resolve()
    logs_dir = out.with_name(f"{out.stem}.logs")
    logs_dir.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or TIMEOUT[args.mode]
    injected = os.environ.get(INJECT_ENV) or None
    if injected:
        print(f"NOTE: {INJECT_ENV}={injected}: a slowdown is injected into this run")

    print(f"scripts/bench: {args.mode} mode, {len(benches)} bench(es) x {args.repeat}: "
          f"{', '.join(benches)}", flush=True)
    started = time.monotonic()
    runs: dict[str, list[BenchRun]] = {name: [] for name in benches}
    for i in range(args.repeat):
        for name, script in benches.items():
            log = logs_dir / f"{name}-{i + 1}.log"
            print(f"  {name:<9} run {i + 1}/{args.repeat} ... ", end="", flush=True)
            run = run_bench(name, script, args.mode, log, timeout)
            runs[name].append(run)
            gated = sum(f.gated for f in run.figures)
            print(f"{run.seconds:5.1f} s, exit {run.exit}, {len(run.figures)} figures "
                  f"({gated} gated)" + (f" — ERROR {run.error}" if run.error else ""),
                  flush=True)

    doc: dict[str, object] = {
        "schema": SCHEMA, "mode": args.mode, "repeat": args.repeat, "injected": injected,
        "seconds": round(time.monotonic() - started, 1), "fingerprint": fingerprint(),
        "benches": {name: {"script": f"perf/{script.name}",
                           "args": ["--quick"] if args.mode == "quick" else [],
                           "runs": [{"exit": r.exit, "seconds": round(r.seconds, 2),
                                     "log": os.path.relpath(r.log, out.parent),
                                     "error": r.error, "raw": r.raw} for r in runs[name]]}
                    for name, script in benches.items()},
        "figures": collect(runs),
    }
    figures = parse_run(doc, str(out))
    print()
    print(f"{'bench':<9} {'figure':<28} {'median':>10} {'spread':>7} {'runs':>4}  what")
    for bench, named in figures.items():
        for name, s in named.items():
            if s.gated:
                print(f"{bench:<9} {name:<28} {s.median:10.3f} {s.spread:7.1%} "
                      f"{len(s.values):>4}  {s.what}")
    comparison: Comparison | None = None
    if baseline is not None:
        comparison = compare(baseline, doc, str(args.compare), str(out))
        doc["baseline_file"] = str(args.compare)
        doc["compare"] = comparison.to_json()
        print()
        print(table(comparison))
    out.write_text(json.dumps(doc, indent=1) + "\n")

    charts: dict[str, Path] = {}
    if not args.no_charts:
        base_figs = parse_run(baseline, str(args.compare)) if baseline is not None else {}
        try:
            for bench, named in figures.items():
                path = chart_path(out, bench)
                write_chart(bench, named, path, base_figs.get(bench), K)
                if path.exists():
                    charts[bench] = path
        except ChartsUnavailable as exc:
            print(f"no charts: {exc}", file=sys.stderr)
    write_html(html_path(out), doc, figures, comparison, charts,
               {name: [r.log for r in rs] for name, rs in runs.items()})
    print(f"\nwrote {out}, {html_path(out).name}, {len(charts)} chart(s), logs in "
          f"{logs_dir.name}/ ({time.monotonic() - started:.0f} s)")
    if comparison is not None and comparison.failed:
        return 1
    return 3 if any(r.error for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
