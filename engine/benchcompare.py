"""``engine bench --compare``: this run's figures against a previous run of the same rig.

Theory of operation
-------------------
The baseline is a previous ``engine bench --json`` file. It is refused (``BenchError``,
exit 2, naming the file and key) when it is not such a file, when its run failed, when it
measured other rig content (the rig file's SHA-256 differs) or another load (source,
workers, rate, connections, window) — unless ``--force``, which turns each refusal into a
note. Throughput may not fall and CPU per message may not rise beyond the band (default
10%); ``engine.benchkit.verdict`` decides. p99 latency is shown, not judged: in a closed
loop it follows the load. Absolute figures only compare on the same machine: every
comparison says so and lists what differs in the two fingerprints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.bench import LOAD_OPTIONS, SCHEMA, BenchError, Figures, Json
from engine.benchkit import FAILING, differences, verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class Baseline:
    """The parts of a previous result file that a comparison needs."""

    source: str  # where it was read from, for messages
    rig: str
    rig_sha256: str
    options: Mapping[str, Json]
    fingerprint: Mapping[str, Json]
    throughput: float
    unit: str
    cpu_us_per_msg: float
    p99_ms: float | None
    ok: bool


def _positive(doc: Mapping[str, Json], key: str, where: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BenchError(f"{where}.{key}: expected a positive number, got {value!r}")
    return float(value)


def _section(doc: Mapping[str, Json], key: str, source: str) -> Mapping[str, Json]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise BenchError(f"{source}: key {key}: expected an object")
    return value


def parse_baseline(data: Json, source: str) -> Baseline:
    """A result file's content as a baseline.

    Raises:
        BenchError: not an ``engine bench --json`` file, or a figure missing.
    """
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BenchError(f"{source}: key schema: expected {SCHEMA!r} (a file written by "
                         f"engine bench --json)")
    rig, figures = _section(data, "rig", source), _section(data, "figures", source)
    options, fp = _section(data, "options", source), data.get("fingerprint")
    sha = rig.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise BenchError(f"{source}: key rig.sha256: expected a SHA-256 in hex, got {sha!r}")
    p99 = figures.get("p99_ms")
    return Baseline(
        source=source, rig=str(rig.get("file")), rig_sha256=sha, options=options,
        fingerprint=fp if isinstance(fp, dict) else {},
        throughput=_positive(figures, "throughput", f"{source}: key figures"),
        unit=str(figures.get("unit", "")),
        cpu_us_per_msg=_positive(figures, "cpu_us_per_msg", f"{source}: key figures"),
        p99_ms=float(p99) if isinstance(p99, (int, float)) and not isinstance(p99, bool)
        else None,
        ok=data.get("ok") is True)


def load_baseline(path: Path) -> Baseline:
    """Read and parse a baseline file.

    Raises:
        BenchError: unreadable, not JSON, or not a result file.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the baseline: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path}: not JSON: line {exc.lineno}: {exc.msg}") from exc
    return parse_baseline(data, str(path))


def check_comparable(base: Baseline, *, rig: str, rig_sha256: str,
                     options: Mapping[str, Json], force: bool) -> list[str]:
    """Refuse a baseline of another rig content, other load options or a failed run,
    unless ``force``.

    Returns:
        Notes on what differs (only with ``force``) or does not matter for the verdict.

    Raises:
        BenchError: the baseline run failed, or the rig file's content or a load option
            differs, and ``force`` is off.
    """
    notes: list[str] = []
    if not base.ok:
        text = "ok: expected true, got false (the baseline run failed: see its problems)"
        if not force:
            raise BenchError(f"{base.source}: key {text}; --force compares anyway")
        notes.append(f"forced: {text}")
    if base.rig_sha256 != rig_sha256:
        text = (f"rig.sha256: expected {rig_sha256[:12]}.. (the content of {rig} now), got "
                f"{base.rig_sha256[:12]}.. (the baseline measured other rig content)")
        if not force:
            raise BenchError(f"{base.source}: key {text}; --force compares anyway")
        notes.append(f"forced: {text}")
    for key in LOAD_OPTIONS:
        if base.options.get(key) != options.get(key):
            text = (f"options.{key}: expected {options.get(key)!r} like this run, got "
                    f"{base.options.get(key)!r}")
            if not force:
                raise BenchError(f"{base.source}: key {text} (the figures would measure "
                                 f"different loads); --force compares anyway")
            notes.append(f"forced: {text}")
    if base.options.get("duration_s") != options.get("duration_s"):
        notes.append(f"durations differ: baseline {base.options.get('duration_s')} s, now "
                     f"{options.get('duration_s')} s (shorter runs are noisier)")
    return notes


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareRow:
    """One figure against the baseline; ``verdict`` ``info`` is shown, not judged."""

    figure: str
    baseline: float | None
    now: float | None
    change: float | None
    band: float | None
    verdict: str

    @property
    def failed(self) -> bool:
        """Whether this row fails the comparison."""
        return self.verdict in FAILING


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchComparison:
    """Throughput and CPU per message against a baseline."""

    baseline: str
    band: float
    rows: tuple[CompareRow, ...]
    notes: tuple[str, ...]

    @property
    def failed(self) -> bool:
        """Throughput fell or CPU per message rose beyond the band (or was not measured)."""
        return any(r.failed for r in self.rows)

    def to_json(self) -> dict[str, Json]:
        """Stored under ``compare`` in the result file."""
        return {"baseline": self.baseline, "band": self.band, "failed": self.failed,
                "notes": list(self.notes),
                "rows": [{"figure": r.figure, "baseline": r.baseline, "now": r.now,
                          "change": r.change, "band": r.band, "verdict": r.verdict}
                         for r in self.rows]}


def _row(name: str, base: float | None, now: float | None, band: float | None,
         higher_is_better: bool) -> CompareRow:
    change = now / base - 1 if now is not None and base else None
    if band is None:
        verdict_ = "info"
    elif now is None or base is None:
        verdict_ = "MISSING"
    else:
        verdict_ = verdict(base, now, band, higher_is_better=higher_is_better)
    return CompareRow(figure=name, baseline=base, now=now, change=change, band=band,
                      verdict=verdict_)


def compare(base: Baseline, now: Figures, fingerprint: Mapping[str, Json], band: float,
            notes: Sequence[str] = ()) -> BenchComparison:
    """Judge ``now`` against ``base``: throughput may not fall, CPU per message may not rise,
    beyond ``band``; p99 latency is shown, not judged (closed-loop latency follows load).

    Args:
        notes: from ``check_comparable``, kept with the comparison's own.
    """
    rows = (
        _row(f"throughput ({now.unit})", base.throughput,
             now.throughput if now.messages else None, band, True),
        _row("CPU µs per message", base.cpu_us_per_msg, now.cpu_us_per_msg, band, False),
        _row("p99 latency ms", base.p99_ms, now.latency.p99_ms, None, False),
    )
    out = list(notes)
    out.append("absolute figures: the verdict means something only against a baseline made "
               "on this machine, under a similar background load")
    diff = differences(base.fingerprint, fingerprint)
    if diff:
        out.append("the baseline comes from another machine or software: " + "; ".join(diff))
    return BenchComparison(baseline=base.source, band=band, rows=rows, notes=tuple(out))


def comparison_table(c: BenchComparison) -> str:
    """The comparison as printed: figure, baseline, now, change, band, verdict."""
    head = f"{'figure':<22} {'baseline':>12} {'now':>12} {'change':>8} {'band':>7}  verdict"
    lines = [f"compared with {c.baseline}:", head, "-" * len(head)]
    for r in c.rows:
        base = f"{r.baseline:12,.2f}" if r.baseline is not None else f"{'-':>12}"
        now = f"{r.now:12,.2f}" if r.now is not None else f"{'-':>12}"
        change = f"{r.change:+8.1%}" if r.change is not None else f"{'-':>8}"
        band = f"{'±' + format(r.band, '.0%'):>7}" if r.band is not None else f"{'-':>7}"
        lines.append(f"{r.figure:<22} {base} {now} {change} {band}  {r.verdict}")
    lines += [f"note: {n}" for n in c.notes]
    bad = [r for r in c.rows if r.failed]
    lines.append(f"compare: {len(bad)} of {sum(r.band is not None for r in c.rows)} judged "
                 f"figures regressed — {'FAIL' if bad else 'PASS'}")
    return "\n".join(lines)
