"""``engine bench RIG``: what to drive, what was measured, and how it compares — no processes.

Theory of operation
-------------------
``engine bench`` runs a user's own rig as a rack, drives it with the load that matches its
source gear for a duration, drains it, and reports throughput, latency percentiles, CPU per
message and peak memory. This module holds every decision that needs no process or socket;
``engine/benchrun.py`` is the shell that starts the rack, the issuer simulator and the load
generator and samples the processes.

* **What load** (``plan_for``): an ``iso8583`` source gets the ISO load generator against
  its listener, with one request kind per route it can match (``mix_for``: a Luhn-valid test
  PAN from the route's first BIN, an MTI, amount and currency the route accepts), so the
  issuers are exercised, not the no-route answer; a ``generator`` source generates by
  itself and is measured from the counters. Any other source is refused by name (there is
  no load for it yet: Modbus comes later).
* **CPU per message** (``CpuLedger``): CPU seconds of every rack process (supervisor, its
  workers, egress, telemetry, nats-server) between the start and the end of the measured
  interval, divided by the messages of that interval. Processes are keyed by (pid, start
  time): one that is restarted mid-run counts from zero, one that dies keeps what it was
  last seen using.
* **Comparison** with a previous run of the same rig: ``engine/benchcompare.py``.

Errors for bad input are ``BenchError`` (exit 2) and name the file, key path and what was
expected. Nothing here writes a PAN: routes are reported by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import RigConfig
from engine.counters import percentiles
from engine.units import parse_duration
from gears.generator import GeneratorSettings
from gears.iso8583.framing import FramingConfig
from gears.iso8583.loadgen import MixEntry
from gears.iso8583.router import Rule
from gears.iso8583.settings import SwitchSettings

SCHEMA = "fluxrig-engine-bench/1"
DEFAULT_BAND = 0.10
LOADS = {"iso8583": "the ISO 8583 load generator", "generator": "none: it generates by itself"}
# load options that change what a figure measures: runs that differ in one do not compare
LOAD_OPTIONS = ("source", "workers", "rate", "connections", "window")
MAX_DURATION = 24 * 3600.0
_DEFAULT_PREFIX = "476173"  # a Visa test range, for routes without BINs
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}

# JSON as read back from a baseline file: walked with isinstance checks, never trusted
Json = object


class BenchError(ValueError):
    """Bad arguments, a rig ``engine bench`` cannot drive, or an unusable baseline (exit 2);
    the message names the file, key path and what was expected."""


# --- what to drive ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuerTarget:
    """An issuer endpoint of the switch: where its links go, in what wire format."""

    name: str
    host: str
    port: int
    spec_name: str
    framing: FramingConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class IsoPlan:
    """Drive an ``iso8583`` source with the load generator.

    Attributes:
        pipeline: the switch's pipeline.
        host, port: where the load generator connects (a wildcard listen host as loopback).
        spec_name, framing, header: the acquirer side's wire format.
        grace: seconds to wait for the last answers (the switch's timeout and a margin).
        mix: one request kind per route driven.
        routes: names of the routes the mix reaches (first match, as the switch decides).
        left_out: routes no generated request can reach, each with why.
        issuers: the switch's issuer endpoints.
    """

    pipeline: str
    host: str
    port: int
    spec_name: str
    framing: FramingConfig
    header: bytes
    grace: float
    mix: tuple[MixEntry, ...]
    routes: tuple[str, ...]
    left_out: tuple[str, ...]
    issuers: tuple[IssuerTarget, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratorPlan:
    """Measure a ``generator`` rig from its counters.

    Attributes:
        pipelines: the pipelines measured.
        counted: process names (or their prefix before ``.<replica>``) whose
            ``frames_out`` are the messages: each pipeline's last stage, or its source when
            it has none.
        finite: every generator stops after a count, so the run may end before the
            duration (once frames stopped for ``stall`` seconds).
        stall: seconds without a new frame after which a finite run is over (two seconds
            plus the slowest generator's batch period).
    """

    pipelines: tuple[str, ...]
    counted: tuple[str, ...]
    finite: bool
    stall: float

    def counts(self, process: str) -> bool:
        """Whether ``process``'s frames out are messages."""
        return any(process == c or process.startswith(c + ".") for c in self.counted)


BenchPlan = IsoPlan | GeneratorPlan


def plan_for(cfg: RigConfig) -> BenchPlan:
    """The load for a validated rig.

    Raises:
        BenchError: no pipelines, a source gear without a load, sources of several kinds,
            or more than one switch.
    """
    if not cfg.pipelines:
        raise BenchError(f"{cfg.file}: pipelines: expected at least one pipeline to drive")
    for i, p in enumerate(cfg.pipelines):
        if p.source.gear not in LOADS:
            known = ", ".join(f"{g} ({what})" for g, what in LOADS.items())
            raise BenchError(f"{cfg.file}: pipelines[{i}].source.gear: engine bench has no "
                             f"load for source gear {p.source.gear!r} (expected one of: "
                             f"{known}; Modbus comes later)")
    kinds = sorted({p.source.gear for p in cfg.pipelines})
    if len(kinds) > 1:
        raise BenchError(f"{cfg.file}: pipelines: expected sources of one kind to drive, got "
                         f"{', '.join(kinds)}")
    if kinds == ["generator"]:
        counted = tuple(f"{p.name}.{(p.stages[-1] if p.stages else p.source).name}"
                        for p in cfg.pipelines)
        gens: list[GeneratorSettings] = []
        for p in cfg.pipelines:
            if not isinstance(p.source.settings, GeneratorSettings):
                raise TypeError(f"generator settings of {type(p.source.settings).__name__}")
            gens.append(p.source.settings)
        return GeneratorPlan(
            pipelines=tuple(p.name for p in cfg.pipelines), counted=counted,
            finite=all(g.count > 0 for g in gens),
            stall=2.0 + max((g.batch / g.rate for g in gens if g.rate > 0), default=0.0))
    if len(cfg.pipelines) > 1:
        raise BenchError(f"{cfg.file}: pipelines: expected one iso8583 switch to drive, got "
                         f"{len(cfg.pipelines)} pipelines")
    p = cfg.pipelines[0]
    s = p.source.settings
    if not isinstance(s, SwitchSettings):
        raise TypeError(f"iso8583 settings of {type(s).__name__}")
    mix, routes, left_out = mix_for(s.rules)
    acq = s.acquirer
    header = acq.header if len(acq.header) == acq.framing.header_len \
        else bytes(acq.framing.header_len)
    return IsoPlan(
        pipeline=p.name, host=_LOOPBACK.get(s.listen.host, s.listen.host), port=s.listen.port,
        spec_name=acq.spec_name, framing=acq.framing, header=header, grace=s.timeout + 2.0,
        mix=mix, routes=routes, left_out=left_out,
        issuers=tuple(IssuerTarget(name=i.name, host=i.host, port=i.port,
                                   spec_name=i.link.spec_name, framing=i.link.framing)
                      for i in s.issuers))


def luhn_digit(body: str) -> str:
    """The Luhn check digit that makes ``body`` + digit a valid card number."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # the body's last digit sits left of the check digit: doubled
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def sample_pan(prefix: str) -> str:
    """A Luhn-valid test card number starting with ``prefix``: 16 digits, or one more than
    a longer prefix (at most 19)."""
    body = prefix.ljust(15, "0") if len(prefix) < 15 else prefix[:18]
    return body + luhn_digit(body)


def _entry_for(rule: Rule) -> MixEntry | str:
    """A request the rule matches, or why there is none the load generator can send."""
    if rule.mti is None or "0100" in rule.mti:
        mti = "0100"
    elif "0200" in rule.mti:
        mti = "0200"
    else:
        return f"{rule.name}: MTIs {sorted(rule.mti)} (the load generator sends 0100 or 0200)"
    if rule.processing_code and not "000000".startswith(rule.processing_code):
        return (f"{rule.name}: processing codes {list(rule.processing_code)} (the load "
                f"generator sends DE3 000000)")
    amount = 10_000
    if rule.amount_max is not None:
        amount = min(amount, rule.amount_max)
    if rule.amount_min is not None:
        amount = max(amount, rule.amount_min)
    currency = "840" if rule.currency is None or "840" in rule.currency \
        else min(rule.currency)
    prefix = rule.bins[0].lo if rule.bins else _DEFAULT_PREFIX
    return MixEntry(pan=sample_pan(prefix), mti=mti, amount=amount, currency=currency)


def _first_match(rules: Sequence[Rule], entry: MixEntry) -> str | None:
    fields = {"2": entry.pan, "3": "000000", "4": f"{entry.amount:012d}", "49": entry.currency}
    return next((r.name for r in rules if r.matches(entry.mti, fields)), None)


def mix_for(rules: Sequence[Rule]) -> tuple[tuple[MixEntry, ...], tuple[str, ...],
                                              tuple[str, ...]]:
    """One request kind per route the load generator can reach.

    Returns:
        (mix, routes reached, routes left out with why). A rig without a reachable route
        gets one request no route matches (the switch answers it ``no_route_code``) and a
        left-out line saying so.
    """
    mix: list[MixEntry] = []
    reached: list[str] = []
    left_out: list[str] = []
    for rule in rules:
        entry = _entry_for(rule)
        if isinstance(entry, str):
            left_out.append(entry)
            continue
        route = _first_match(rules, entry)
        if route is None:
            left_out.append(f"{rule.name}: no request the load generator sends matches it")
            continue
        if route != rule.name:
            left_out.append(f"{rule.name}: its requests are taken by route {route!r} first")
            continue
        reached.append(route)
        mix.append(entry)
    if not mix:
        mix.append(MixEntry(pan=sample_pan(_DEFAULT_PREFIX)))
        left_out.append("no route reachable: every request is answered no-route")
    return tuple(mix), tuple(reached), tuple(left_out)


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    """How hard and how long to drive the rig.

    Attributes:
        duration: seconds of load (generator rigs: at most, a finite source may end first).
        workers: replicas of every stage (``engine start --workers``).
        rate: ISO requests/s in total, 0 for closed loop at max rate (None: not ISO).
        connections: ISO acquirer connections (None: not ISO).
        window: ISO requests outstanding per connection in closed loop.
        issuer_sim: serve loopback issuers nobody listens on with the issuer simulator.
    """

    duration: float
    workers: int
    rate: float | None = None
    connections: int | None = None
    window: int = 4
    issuer_sim: bool = False

    def to_json(self, source: str) -> dict[str, Json]:
        """The options as stored in the result (``source``: the rig's source gear)."""
        return {"source": source, "duration_s": self.duration, "workers": self.workers,
                "rate": self.rate, "connections": self.connections,
                "window": self.window if source == "iso8583" else None,
                "issuer_sim": self.issuer_sim}


def options_for(plan: BenchPlan, *, duration: float, workers: int, rate: float | None,
                connections: int | None, issuer_sim: bool, rig: str) -> BenchOptions:
    """The options, checked against the load (``rate`` and ``connections`` None: not given).

    Raises:
        BenchError: an ISO option for a generator rig, a bad value.
    """
    if workers < 1:
        raise BenchError(f"--workers: expected at least 1, got {workers}")
    if isinstance(plan, GeneratorPlan):
        given = [name for name, v in (("--rate", rate), ("--connections", connections),
                                      ("--issuer-sim", issuer_sim or None)) if v is not None]
        if given:
            raise BenchError(f"{', '.join(given)}: options of the ISO load generator; {rig}'s "
                             f"source is a generator, which sets its own pace "
                             f"(its settings.rate and settings.count)")
        return BenchOptions(duration=duration, workers=workers)
    rate = 0.0 if rate is None else rate
    connections = 50 if connections is None else connections
    if not 0 <= rate < float("inf"):  # NaN fails too
        raise BenchError(f"--rate: expected requests/s, a finite number >= 0 (0: max rate), "
                         f"got {rate}")
    if connections < 1:
        raise BenchError(f"--connections: expected at least 1, got {connections}")
    return BenchOptions(duration=duration, workers=workers, rate=rate, connections=connections,
                        issuer_sim=issuer_sim)


def parse_duration_option(text: str) -> float:
    """``--duration``: seconds, or a duration like ``20s``, ``500ms``, ``2m``.

    Raises:
        BenchError: not a duration, or not in (0, 24 h].
    """
    seconds = parse_duration(text)
    if seconds is None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = None
    if seconds is None or not 0 < seconds <= MAX_DURATION:
        raise BenchError(f"--duration: expected seconds or a duration like 20s, 500ms, 2m, "
                         f"more than 0 and at most 24h, got {text!r}")
    return seconds


def parse_band(text: str) -> float:
    """``--band``: a fraction (``0.1``) or a percentage (``10%``) in (0, 1).

    Raises:
        BenchError: neither, or out of range.
    """
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise BenchError(f"--band: expected a fraction like 0.1 or a percentage like 10%, "
                         f"between 0 and 1 (100%) exclusive, got {text!r}")
    return value


def rig_digest(path: Path) -> str:
    """SHA-256 of the rig file's bytes (a baseline of another rig content is refused).

    Raises:
        BenchError: unreadable.
    """
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the rig file: {exc.strerror}") from exc


# --- what was measured ------------------------------------------------------------------------

ProcKey = tuple[int, float]  # (pid, start time): a recycled pid is another process


class CpuLedger:
    """CPU seconds used by a changing set of processes since ``mark``.

    ``mark`` takes the readings at the start of the interval; each ``observe`` takes later
    readings (cumulative CPU seconds per process). A process first seen after the mark was
    born in the interval and counts from zero; one no longer seen keeps its last reading.
    """

    def __init__(self) -> None:
        self._first: dict[ProcKey, float] = {}
        self._last: dict[ProcKey, float] = {}

    def mark(self, readings: Mapping[ProcKey, float]) -> None:
        """Start the interval at these readings."""
        self._first = dict(readings)
        self._last = dict(readings)

    def observe(self, readings: Mapping[ProcKey, float]) -> None:
        """Later readings of (some of) the processes."""
        for key, seconds in readings.items():
            self._first.setdefault(key, 0.0)
            self._last[key] = max(seconds, self._last.get(key, 0.0))

    def used(self) -> dict[ProcKey, float]:
        """CPU seconds per process since the mark."""
        return {k: self._last[k] - self._first[k] for k in self._last}

    def total(self) -> float:
        """CPU seconds of every process since the mark."""
        return sum(self.used().values())


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Latency percentiles in milliseconds (None: nothing was measured)."""

    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def from_histogram(cls, histogram: np.ndarray) -> Latency:
        """From counter histogram buckets (each value the upper bound of its bucket)."""
        ns = percentiles(histogram, (0.5, 0.9, 0.99, 1.0))
        ms = [None if v is None else round(v / 1e6, 3) for v in ns]
        return cls(p50_ms=ms[0], p90_ms=ms[1], p99_ms=ms[2], max_ms=ms[3])


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """The numbers of one bench run.

    Attributes:
        throughput: messages per second over the measured interval.
        unit: ``TPS`` (ISO transactions answered) or ``frames/s``.
        messages: messages in the interval.
        seconds: the interval.
        latency: percentiles; ``latency_what`` says from where to where.
        latency_what: one line for people.
        cpu_seconds: CPU of every rack process over the interval.
        cpu_us_per_msg: ``cpu_seconds / messages`` in µs (None without messages).
        peak_rss_mb, peak_pss_mb: highest sum over the rack's processes seen in the run.
        processes: rack processes seen (nats-server and the supervisor included).
    """

    throughput: float
    unit: str
    messages: int
    seconds: float
    latency: Latency
    latency_what: str
    cpu_seconds: float
    cpu_us_per_msg: float | None
    peak_rss_mb: float
    peak_pss_mb: float | None
    processes: int

    def to_json(self) -> dict[str, Json]:
        """JSON-ready form (``figures`` of the result file)."""
        return {"throughput": round(self.throughput, 1), "unit": self.unit,
                "messages": self.messages, "seconds": round(self.seconds, 3),
                "p50_ms": self.latency.p50_ms, "p90_ms": self.latency.p90_ms,
                "p99_ms": self.latency.p99_ms, "max_ms": self.latency.max_ms,
                "latency_what": self.latency_what,
                "cpu_seconds": round(self.cpu_seconds, 3),
                "cpu_us_per_msg": None if self.cpu_us_per_msg is None
                else round(self.cpu_us_per_msg, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "peak_pss_mb": None if self.peak_pss_mb is None else round(self.peak_pss_mb, 1),
                "processes": self.processes}


def figures_of(*, messages: int, seconds: float, unit: str, latency: Latency,
               latency_what: str, cpu_seconds: float, peak_rss_mb: float,
               peak_pss_mb: float | None, processes: int) -> Figures:
    """``Figures`` with throughput and CPU per message derived."""
    return Figures(throughput=messages / seconds if seconds > 0 else 0.0, unit=unit,
                   messages=messages, seconds=seconds, latency=latency,
                   latency_what=latency_what, cpu_seconds=cpu_seconds,
                   cpu_us_per_msg=cpu_seconds / messages * 1e6 if messages else None,
                   peak_rss_mb=peak_rss_mb, peak_pss_mb=peak_pss_mb, processes=processes)


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchResult:
    """One ``engine bench`` run, as printed and as stored with ``--json``.

    Attributes:
        rig: the rig file as given.
        rig_sha256: its content hash.
        rack: its rack id.
        options: ``BenchOptions.to_json``.
        figures: the measured figures.
        details: the load's own figures (ISO outcomes by DE39, frames acked ...).
        cpu_by_process: CPU seconds over the interval by process name.
        rack_exit: the rack's exit code after the drain (None: it had to be killed).
        problems: why the run failed (empty: it did not).
        notes: what a reader must know.
    """

    rig: str
    rig_sha256: str
    rack: str
    options: Mapping[str, Json]
    figures: Figures
    details: Mapping[str, Json]
    cpu_by_process: Mapping[str, float]
    rack_exit: int | None
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Messages flowed, the rack drained cleanly and the load saw nothing wrong."""
        return not self.problems

    def to_json(self, fingerprint: Mapping[str, Json]) -> dict[str, Json]:
        """The result file's content."""
        return {"schema": SCHEMA, "rig": {"file": self.rig, "sha256": self.rig_sha256,
                                          "rack": self.rack, "source": self.options["source"]},
                "options": dict(self.options), "fingerprint": dict(fingerprint),
                "figures": self.figures.to_json(), "details": dict(self.details),
                "cpu_by_process": {k: round(v, 3) for k, v in sorted(self.cpu_by_process.items())},
                "rack_exit": self.rack_exit, "ok": self.ok, "problems": list(self.problems),
                "notes": list(self.notes)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _show(value: Json) -> str:
    """A detail for the table: counts with separators, lists and maps on one line."""
    if isinstance(value, bool) or not isinstance(value, (int, dict, list)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) or "-"
    return "; ".join(_show(v) for v in value) or "-"


def result_table(result: BenchResult) -> str:
    """The result as the lines ``engine bench`` prints."""
    f = result.figures
    lat = f.latency
    lines = [
        f"{'throughput':<26} {f.throughput:,.1f} {f.unit}",
        f"{'messages':<26} {f.messages:,} in {f.seconds:.2f} s",
        (f"{'latency p50/p90/p99/max':<26} {_ms(lat.p50_ms)} / {_ms(lat.p90_ms)} / "
         f"{_ms(lat.p99_ms)} / {_ms(lat.max_ms)} ms ({f.latency_what})"),
        (f"{'CPU per message':<26} "
         + ("-" if f.cpu_us_per_msg is None else f"{f.cpu_us_per_msg:,.1f} µs")
         + f" ({f.cpu_seconds:.2f} CPU s of {f.processes} rack processes, nats-server "
           f"included)"),
        (f"{'peak RSS / PSS':<26} {f.peak_rss_mb:,.0f} / "
         + ("-" if f.peak_pss_mb is None else f"{f.peak_pss_mb:,.0f}")
         + " MB (summed over the rack's processes)"),
    ]
    for key, value in result.details.items():
        lines.append(f"{key.replace('_', ' '):<26} {_show(value)}")
    code = result.rack_exit
    lines.append(f"{'rack exit':<26} {code} "
                 + ("(drained cleanly)" if code == 0 else "(killed)" if code is None
                    else "(not clean)"))
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"problem: {p}" for p in result.problems]
    lines.append("OK" if result.ok else "FAILED")
    return "\n".join(lines)
