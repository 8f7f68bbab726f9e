"""Traces (Pipeline B, Mixer side): how fast ``mixer traces`` finds a transaction in an hour
of a fleet's traces, compacted as the ``traces`` process leaves it, against the same store
before compaction.

    python perf/traces_bench.py [--racks 10] [--rate 30] [--hours 1] [--lookups 20]
                                [--raw-lookups 5] [--json PATH] [--keep DIR]
    python perf/traces_bench.py --quick        # 10 racks at 3 traces/s, 10 lookups

1. The store. ``--racks`` racks, each ``--rate`` switch-like transactions a second over the
   last ``--hours`` hours (1 h x 10 racks x 30/s = 1.08 M traces), each a trace of 10 spans
   (``iso8583 0200`` and its nine children, the switch's attributes; a pool of cards, so a
   token recurs; terminals with rising STANs). Rows come from the traces process's own code:
   one transaction in 500 goes through the full path (an OTLP request built with
   opentelemetry-proto, ``mixer.tracerows.trace_rows``); the others are made from that
   template by substituting ids, times and fields — the same row, asserted equal for a
   sample — because building 10 M protobuf spans in Python would take the run's whole
   budget. Parts are written with ``mixer.tracefiles.write_part`` every 5 s of traces per
   rack (what ``traces.flush: 5s`` writes): the **uncompacted** store; a copy compacted with
   ``compact_hour`` per rack-hour is the **compacted** store.
2. Lookups, through ``mixer.tracequery.find_traces`` (the function ``mixer traces`` calls;
   a fresh read-only DuckDB connection each, ``--since 1h``, ``--limit 10``): by token, by
   TERMINAL:STAN and by trace id, ``--lookups`` random transactions each, on both stores:
   median and worst (``--raw-lookups``, 5, on the uncompacted one: each takes seconds).
   Then once per kind through the real CLI (``python -m mixer traces``),
   wall time of the whole process (interpreter start, imports, lookup, drawing).

Bar (issue "Pipeline B"): a lookup <= 500 ms on the compacted 1-hour, 10-rack store (worst
of the function's lookups, and the CLI's end to end). Ratio: uncompacted median / compacted
median (over the three kinds). Prints a table, writes JSON (``--json``, default
``perf/results/traces_bench.json``); exit 1 when the bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from otlpkit import request, switch_txn, uuid7  # noqa: E402

from mixer.tracefiles import (  # noqa: E402
    TRACES_DIR,
    PartNamer,
    compact_hour,
    hour_dirs,
    write_part,
)
from mixer.tracequery import find_traces, parse_lookup, readonly  # noqa: E402
from mixer.tracerows import trace_rows  # noqa: E402

BAR_MS = 500.0
FLUSH_S = 5.0
FULL_PATH_EVERY = 500
CARDS = 50_000     # card tokens in the pool (a token recurs ~ every CARDS / (racks*rate) s)
TERMINALS = 400    # terminals per rack


class Template:
    """A decoded switch trace whose row is re-made with other ids, times and fields."""

    def __init__(self) -> None:
        t = switch_txn(10**18, "4761730000000000", "T0000000", "000000", step_us=700)
        self.row = trace_rows("x", request(t.spans, "x"))[0].as_dict()
        self.spans = orjson.loads(self.row["spans"])  # type: ignore[arg-type]
        self.t0 = 10**18

    def make(self, rng: random.Random, trace_id: bytes, start: int, token: str,
             terminal: str, stan: str, de39: str, keep: str) -> dict[str, object]:
        """The row ``trace_rows`` makes for the same transaction."""
        shift = start - self.t0
        root_id = rng.randbytes(8).hex()
        spans = []
        pan = token[:6] + "******" + token[-4:]
        for i, s in enumerate(self.spans):
            d = dict(s)
            d["start_ns"] = s["start_ns"] + shift
            d["end_ns"] = s["end_ns"] + shift
            if i == 0:
                d["span_id"] = root_id
                a = dict(s["attributes"])
                a.update({"iso8583.de39": de39, "iso8583.stan": stan,
                          "iso8583.terminal": terminal, "fluxrig.token": token,
                          "iso8583.pan": pan, "fluxrig.keep": keep})
                d["attributes"] = a
            else:
                d["span_id"] = rng.randbytes(8).hex()
                d["parent_span_id"] = root_id
            spans.append(d)
        row = dict(self.row)
        row.update(trace_id=trace_id.hex(), start_ns=self.row["start_ns"] + shift,  # type: ignore[operator]
                   end_ns=self.row["end_ns"] + shift, de39=de39, stan=stan,  # type: ignore[operator]
                   terminal=terminal, token=token, keep=keep,
                   spans=orjson.dumps(spans).decode())
        return row


def _not_luhn(digits15: str) -> str:
    """16 digits that fail the Luhn check, as coat-check tokens do (a Luhn-valid one would be
    masked by the store's last guard)."""
    from engine.masking import luhn_valid

    for d in "0123456789":
        if not luhn_valid(digits15 + d):
            return digits15 + d
    raise AssertionError("unreachable")


def _txn_fields(rng: random.Random, rack_n: int, stans: dict[str, int]) -> tuple[str, ...]:
    card = rng.randrange(CARDS)
    token = _not_luhn(f"476173{card:06d}{card * 7919 % 1000:03d}")
    terminal = f"T{rack_n:02d}{rng.randrange(TERMINALS):05d}"
    stans[terminal] = stans.get(terminal, 0) % 999_999 + 1
    de39 = "00" if rng.random() < 0.93 else "05"
    keep = "sampled" if de39 == "00" else "decline"
    return token, terminal, f"{stans[terminal]:06d}", de39, keep


def build(root: Path, racks: int, rate: float, hours: float, seed: int = 7) -> dict[str, object]:
    """The uncompacted store under ``root``; what was made (targets for the lookups)."""
    rng = random.Random(seed)
    tpl = Template()
    namer = PartNamer()
    end = time.time_ns() - 30 * 10**9
    start = end - int(hours * 3600 * 10**9)
    per_rack = int(rate * hours * 3600)
    step = int(1e9 / rate)
    targets: list[dict[str, str]] = []
    full, checked = 0, 0
    t0 = time.monotonic()
    for r in range(racks):
        rack = f"rack-{r:02d}"
        stans: dict[str, int] = {}
        buf: dict[int, list[dict[str, object]]] = {}
        window_end = start + int(FLUSH_S * 1e9)
        for i in range(per_rack):
            ts = start + i * step + rng.randrange(step)
            if ts >= window_end:
                for h, rows in buf.items():
                    write_part(root, TRACES_DIR, rack, h, rows, namer.next())
                buf = {}
                window_end += int(FLUSH_S * 1e9)
            tid = uuid7(ts)
            token, terminal, stan, de39, keep = _txn_fields(rng, r, stans)
            row = tpl.make(rng, tid, ts, token, terminal, stan, de39, keep)
            if i % FULL_PATH_EVERY == 0:  # the real path: OTLP bytes -> trace_rows
                t = switch_txn(ts, token, terminal, stan, step_us=700, de39=de39, keep=keep)
                real = trace_rows(rack, request(t.spans, rack))[0]
                got = real.as_dict()
                want = tpl.make(random.Random(0), t.trace_id, ts, token, terminal, stan,
                                de39, keep)
                strip = {"spans", "trace_id"}
                assert {k: v for k, v in got.items() if k not in strip} == \
                    {k: v for k, v in want.items() if k not in strip}, (got, want)
                checked += 1
                row, tid = got, t.trace_id
                full += 1
            hour = ts - ts % (3600 * 10**9)
            buf.setdefault(hour, []).append(row)
            if rng.random() < 20 / per_rack and ts > start + 120 * 10**9:
                targets.append({"rack": rack, "token": token, "terminal": terminal,
                                "stan": stan, "trace_id": tid.hex()})
        for h, rows in buf.items():
            write_part(root, TRACES_DIR, rack, h, rows, namer.next())
    return {"traces": racks * per_rack, "full_path": full, "checked": checked,
            "targets": targets, "build_s": time.monotonic() - t0}


def du(path: Path) -> tuple[int, int]:
    """(files, bytes) of the parts under ``path``."""
    files = list(path.rglob("*.parquet"))
    return len(files), sum(f.stat().st_size for f in files)


def lookups(root: Path, targets: list[dict[str, str]], n: int,
            rng: random.Random) -> dict[str, dict[str, float]]:
    """Median and worst ms per kind through ``find_traces``."""
    out: dict[str, dict[str, float]] = {}
    picks = rng.sample(targets, min(n, len(targets)))
    for kind in ("token", "terminal_stan", "trace_id"):
        times = []
        for t in picks:
            q = {"token": t["token"], "terminal_stan": f"{t['terminal']}:{t['stan']}",
                 "trace_id": t["trace_id"]}[kind]
            t0 = time.perf_counter()
            found = find_traces(readonly(root), root, parse_lookup(q), 3600, 10)
            times.append((time.perf_counter() - t0) * 1000)
            assert any(f.trace_id == t["trace_id"] for f in found) or kind == "token", (kind, q)
            assert found, (kind, q)
        out[kind] = {"median_ms": statistics.median(times), "worst_ms": max(times),
                     "n": len(times)}
    return out


def cli(root: Path, t: dict[str, str]) -> dict[str, float]:
    """Wall ms of ``python -m mixer traces`` per kind (one run each after one warm-up)."""
    out = {}
    env = {**os.environ, "COLUMNS": "120"}
    subprocess.run([sys.executable, "-m", "mixer", "traces", str(root), t["token"]],
                   capture_output=True, cwd=ROOT, env=env)
    for kind, q in (("token", t["token"]), ("terminal_stan", f"{t['terminal']}:{t['stan']}"),
                    ("trace_id", t["trace_id"])):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mixer", "traces", str(root), q],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        out[kind] = (time.perf_counter() - t0) * 1000
        assert done.returncode == 0, done.stderr
        # (a token recurs: its 10 newest transactions need not include this one)
        assert kind == "token" or t["trace_id"] in done.stdout, done.stdout
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--racks", type=int, default=10)
    ap.add_argument("--rate", type=float, default=30.0, help="traces/s per rack")
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--lookups", type=int, default=20, help="lookups per kind, compacted store")
    ap.add_argument("--raw-lookups", type=int, default=5, help="lookups per kind, uncompacted "
                    "store (each reads ~7,200 files: seconds)")
    ap.add_argument("--quick", action="store_true", help="10 racks at 3 traces/s, 10 lookups")
    ap.add_argument("--keep", type=Path, default=None, help="build the stores here and keep "
                    "them (default: a temporary directory, deleted)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: time the lookups on "
                    "the store kept there (built minutes ago) instead of building one")
    ap.add_argument("--json", type=Path, default=ROOT / "perf" / "results" /
                    "traces_bench.json")
    args = ap.parse_args()
    if args.quick:
        args.rate, args.lookups, args.raw_lookups = 3.0, 10, 5
    base = args.keep or Path(tempfile.mkdtemp(prefix="traces-bench-"))
    raw_root, comp_root = base / "uncompacted", base / "compacted"
    manifest = base / "manifest.json"
    try:
        if args.reuse and manifest.exists():  # lookups again on a kept store (minutes old)
            made = json.loads(manifest.read_text())
            compact_s = made["compact_s"]
        else:
            for d in (raw_root, comp_root):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            print(f"building: {args.racks} racks x {args.rate:g} traces/s x {args.hours:g} h"
                  f" ...", flush=True)
            made = build(raw_root, args.racks, args.rate, args.hours)
            shutil.copytree(raw_root / TRACES_DIR, comp_root / TRACES_DIR)
            t0 = time.monotonic()
            for d in list(hour_dirs(comp_root, TRACES_DIR)):
                compact_hour(d, TRACES_DIR)
            compact_s = time.monotonic() - t0
            if args.keep is not None:
                manifest.write_text(json.dumps({**made, "compact_s": compact_s}))
        raw_files, raw_bytes = du(raw_root)
        comp_files, comp_bytes = du(comp_root)
        rng = random.Random(11)
        targets = made["targets"]  # type: ignore[assignment]
        res_c = lookups(comp_root, targets, args.lookups, random.Random(11))
        res_u = lookups(raw_root, targets, args.raw_lookups, random.Random(11))
        cli_ms = cli(comp_root, rng.choice(targets))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    med_c = statistics.median(v["median_ms"] for v in res_c.values())
    med_u = statistics.median(v["median_ms"] for v in res_u.values())
    worst = max(max(v["worst_ms"] for v in res_c.values()), max(cli_ms.values()))
    ok = worst <= BAR_MS
    traces = int(made["traces"])  # type: ignore[call-overload]
    print(f"\nstore: {traces:,} traces ({traces * 10:,} spans), built in "
          f"{made['build_s']:.0f} s ({made['full_path']} through OTLP + trace_rows, "
          f"{made['checked']} rows checked equal to the template's)")
    print(f"  uncompacted: {raw_files:,} parts, {raw_bytes / 1e6:,.1f} MB; compacted: "
          f"{comp_files} parts, {comp_bytes / 1e6:,.1f} MB (compaction {compact_s:.1f} s), "
          f"{comp_bytes / traces:.0f} B/trace")
    print(f"\n{'lookup':<16}{'compacted med':>15}{'worst':>9}{'uncompacted med':>18}"
          f"{'worst':>9}{'ratio':>8}{'CLI (compacted)':>18}")
    for kind in res_c:
        c, u = res_c[kind], res_u[kind]
        print(f"{kind:<16}{c['median_ms']:>12.1f} ms{c['worst_ms']:>6.1f} ms"
              f"{u['median_ms']:>15.1f} ms{u['worst_ms']:>6.1f} ms"
              f"{u['median_ms'] / c['median_ms']:>7.1f}x{cli_ms[kind]:>15.0f} ms")
    print(f"\nbar: worst lookup <= {BAR_MS:.0f} ms (function and CLI, compacted): "
          f"{worst:.0f} ms -> {'ok' if ok else 'MISSED'}; uncompacted/compacted median "
          f"ratio {med_u / med_c:.1f}x")
    doc = {"bench": "traces", "racks": args.racks, "rate": args.rate, "hours": args.hours,
           "traces": traces, "build_s": made["build_s"], "compact_s": compact_s,
           "uncompacted": {"files": raw_files, "bytes": raw_bytes, "lookups": res_u},
           "compacted": {"files": comp_files, "bytes": comp_bytes, "lookups": res_c},
           "cli_ms": cli_ms, "bar_ms": BAR_MS, "worst_ms": worst, "ok": ok,
           "ratio": med_u / med_c, "machine": {"python": platform.python_version(),
                                               "cpus": os.cpu_count()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
