"""Compare a bench run with a baseline: which gated figures regressed beyond their noise band.

    python perf/compare.py BASELINE.json NOW.json     # exit 1 on a regression

Theory of operation
-------------------
Both files are written by ``perf/runner.py`` (``scripts/bench --json``). Only *gated*
figures are compared (see ``perf/figures.py``): ratios of ours against a rival measured in
the same bench run, oriented so that higher is better. Absolute figures are not compared:
they move with the machine, a ratio moves only when one side of it changed.

Each figure of a run holds the values of its repeats (``scripts/bench --repeat N``). From the
baseline's values come its median and its *spread*, the relative range
``(max - min) / median``. The band of a figure is

    band = max(K * spread, floor)

with ``K`` = 2 (the range of three repeats is ~1.7 standard deviations, so the band is
~3.4 sigma of one run's noise) and ``floor`` the figure's own minimum (a baseline of one run,
or of repeats that happened to agree, still gets a sane band). The figure's value *now* is
the median of the new run's repeats, and

* ``now < baseline * (1 - band)``: **REGRESSED** (exit 1);
* ``now > baseline * (1 + band)``: ``better`` (passes; consider a new baseline);
* otherwise ``ok``;
* a band wider than ``MAX_BAND`` (50%) is ``noisy``: the baseline's repeats disagreed so much
  that no verdict would mean anything (it passes, and the notes say which figures and why).

A gated figure the baseline has and a run of the same bench lacks is **MISSING** (exit 1: a
rival that stopped running must not hide a regression). Benches the new run did not run
(``--only``) are left out. The two runs must be of the same mode (quick or full): quick runs
move fewer records, and some ratios depend on that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from fingerprint import differences

from engine.benchkit import FAILING, MAX_BAND, K, spread, verdict
from engine.benchkit import band as noise_band

SCHEMA = "fluxrig-bench/1"


class RunFileError(ValueError):
    """A run or baseline file that cannot be compared (names the file and key path)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FigureSeries:
    """One figure over the repeats of a run.

    Attributes:
        values: one value per repeat that produced it.
        unit: ``x`` for gated ratios.
        gated: compared against a baseline.
        floor: smallest relative band.
        what: what was divided by what.
    """

    values: tuple[float, ...]
    unit: str
    gated: bool
    floor: float
    what: str

    @property
    def median(self) -> float:
        """Median of the repeats."""
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """Relative range of the repeats, ``(max - min) / median``; 0 for a single run."""
        return spread(self.values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One line of the comparison table.

    Attributes:
        bench, figure: which figure.
        baseline: the baseline's median (None: the figure is new).
        now: this run's median (None: missing now).
        band: the relative band used (None when there was nothing to compare).
        change: ``now / baseline - 1`` (None when either is missing).
        verdict: ``ok``, ``better``, ``REGRESSED``, ``MISSING``, ``new`` or ``noisy``.
        baseline_runs: how many repeats the band was derived from.
    """

    bench: str
    figure: str
    baseline: float | None
    now: float | None
    band: float | None
    change: float | None
    verdict: str
    baseline_runs: int

    @property
    def failed(self) -> bool:
        """Whether this row makes the comparison fail."""
        return self.verdict in FAILING


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """The result of ``compare``.

    Attributes:
        rows: one per gated figure of the benches both runs ran.
        notes: things a reader must know (other machine, benches not run, thin baseline).
    """

    rows: tuple[Row, ...]
    notes: tuple[str, ...]

    @property
    def failed(self) -> bool:
        """Whether any figure regressed or went missing."""
        return any(r.failed for r in self.rows)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (stored in the run file and shown in the HTML page)."""
        return {"k": K, "failed": self.failed, "notes": list(self.notes),
                "rows": [{"bench": r.bench, "figure": r.figure, "baseline": r.baseline,
                          "now": r.now, "band": r.band, "change": r.change,
                          "verdict": r.verdict, "baseline_runs": r.baseline_runs}
                         for r in self.rows]}


def _series(source: str, bench: str, name: str, raw: object) -> FigureSeries:
    where = f"{source}: key figures.{bench}.{name}"
    if not isinstance(raw, dict):
        raise RunFileError(f"{where}: expected an object")
    values = raw.get("values")
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise RunFileError(f"{where}.values: expected a non-empty list of numbers")
    floor = raw.get("floor", 0.0)
    if not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise RunFileError(f"{where}.floor: expected a number in [0, 1), got {floor!r}")
    if not isinstance(raw.get("gated"), bool):
        raise RunFileError(f"{where}.gated: expected true or false")
    return FigureSeries(values=tuple(float(v) for v in values), unit=str(raw.get("unit", "")),
                        gated=raw["gated"], floor=float(floor), what=str(raw.get("what", "")))


def parse_run(data: object, source: str) -> dict[str, dict[str, FigureSeries]]:
    """The figures of a parsed run file, by bench then figure name.

    Raises:
        RunFileError: not a ``scripts/bench`` run file, or a figure without values.
    """
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise RunFileError(f"{source}: key schema: expected {SCHEMA!r} (a file written by "
                           f"scripts/bench --json)")
    figures = data.get("figures")
    if not isinstance(figures, dict):
        raise RunFileError(f"{source}: key figures: expected an object of benches")
    out: dict[str, dict[str, FigureSeries]] = {}
    for bench, named in figures.items():
        if not isinstance(named, dict):
            raise RunFileError(f"{source}: key figures.{bench}: expected an object of figures")
        out[bench] = {name: _series(source, bench, name, raw) for name, raw in named.items()}
    return out


def load_run(path: Path) -> dict[str, object]:
    """A run file, parsed and checked (``parse_run``).

    Raises:
        RunFileError: unreadable, not JSON, or not a run file.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not JSON: line {exc.lineno}: {exc.msg}") from exc
    parse_run(data, str(path))
    return data  # type: ignore[no-any-return]


def band_of(base: FigureSeries) -> float:
    """``max(K * spread, floor)`` of a baseline figure."""
    return noise_band(base.values, base.floor)


def compare(baseline: dict[str, object], now: dict[str, object], baseline_source: str,
            now_source: str) -> Comparison:
    """Every gated figure of ``now`` against ``baseline`` (both parsed run files).

    Raises:
        RunFileError: either is not a run file, or their modes differ.
    """
    base_figs = parse_run(baseline, baseline_source)
    now_figs = parse_run(now, now_source)
    if baseline.get("mode") != now.get("mode"):
        raise RunFileError(f"{now_source}: key mode: expected {baseline.get('mode')!r} like "
                           f"the baseline {baseline_source}, got {now.get('mode')!r} "
                           f"(compare quick runs with quick, full with full)")
    notes: list[str] = []
    fp_base, fp_now = baseline.get("fingerprint"), now.get("fingerprint")
    if isinstance(fp_base, dict) and isinstance(fp_now, dict):
        diff = differences(fp_base, fp_now)
        if diff:
            notes.append("baseline from another machine or software (ratios still compare; "
                         "bands come from the baseline's machine): " + "; ".join(diff))
    ran = set(now_figs)
    skipped = sorted(set(base_figs) - ran)
    if skipped:
        notes.append(f"not run now, not compared: {', '.join(skipped)}")
    rows: list[Row] = []
    thin: list[str] = []
    noisy: list[str] = []
    for bench in sorted(ran):
        base_named, now_named = base_figs.get(bench, {}), now_figs[bench]
        for name in sorted(set(base_named) | set(now_named)):
            b, n = base_named.get(name), now_named.get(name)
            if (b is None or not b.gated) and (n is None or not n.gated):
                continue
            if b is None or not b.gated:
                rows.append(Row(bench=bench, figure=name, baseline=None, now=n.median if n else None,
                                band=None, change=None, verdict="new", baseline_runs=0))
                continue
            if len(b.values) < 2:
                thin.append(f"{bench}.{name}")
            if n is None:
                rows.append(Row(bench=bench, figure=name, baseline=b.median, now=None,
                                band=band_of(b), change=None, verdict="MISSING",
                                baseline_runs=len(b.values)))
                continue
            band = band_of(b)
            if band > MAX_BAND:
                noisy.append(f"{bench}.{name}")
            rows.append(Row(bench=bench, figure=name, baseline=b.median, now=n.median,
                            band=band, change=n.median / b.median - 1 if b.median else None,
                            verdict="noisy" if band > MAX_BAND
                            else verdict(b.median, n.median, band),
                            baseline_runs=len(b.values)))
    if thin:
        notes.append(f"{len(thin)} figure(s) have a one-run baseline, so their band is only "
                     f"the floor: make baselines with --repeat 3")
    if noisy:
        notes.append(f"not judged, the baseline's repeats spread too far (band > "
                     f"{MAX_BAND:.0%}): {', '.join(noisy)}; make the baseline on a quieter "
                     f"machine, with more repeats, or in --full mode")
    return Comparison(rows=tuple(rows), notes=tuple(notes))


def table(comparison: Comparison) -> str:
    """The comparison as a text table: bench, figure, baseline, now, band, verdict."""
    head = (f"{'bench':<9} {'figure':<28} {'baseline':>9} {'now':>9} {'change':>8} "
            f"{'band':>7} {'runs':>4}  verdict")
    lines = [head, "-" * len(head)]
    for r in comparison.rows:
        base = f"{r.baseline:9.3f}" if r.baseline is not None else f"{'-':>9}"
        now = f"{r.now:9.3f}" if r.now is not None else f"{'-':>9}"
        change = f"{r.change:+8.1%}" if r.change is not None else f"{'-':>8}"
        band = f"±{r.band:6.1%}" if r.band is not None else f"{'-':>7}"
        lines.append(f"{r.bench:<9} {r.figure:<28} {base} {now} {change} {band} "
                     f"{r.baseline_runs:>4}  {r.verdict}")
    lines += [f"note: {n}" for n in comparison.notes]
    bad = [r for r in comparison.rows if r.failed]
    lines.append(f"compare: {len(bad)} of {len(comparison.rows)} gated figures regressed or "
                 f"missing — {'FAIL' if bad else 'PASS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: compare two run files; 0 pass, 1 regression, 2 unusable input."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("now", type=Path)
    args = ap.parse_args(argv)
    try:
        result = compare(load_run(args.baseline), load_run(args.now), str(args.baseline),
                         str(args.now))
    except RunFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
