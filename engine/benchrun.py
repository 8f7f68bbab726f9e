"""The shell of ``engine bench``: start the rig's rack, drive it, sample it, drain it.

Everything decided without processes is in ``engine/bench.py``; this module does the I/O:

1. ``prepare`` reads the rig, picks the load, checks the options and the baseline — before
   anything starts, so a bad argument costs nothing (``BenchError``, exit 2);
2. ``run`` starts what the load needs: for a switch whose loopback issuers nobody serves, the
   issuer simulator (only with ``--issuer-sim``; without it the run is refused, naming them);
   then the rack (``engine.harness.RackRun``: returns once every process serves), with its
   output in ``<data_dir>/bench-rack.log``;
3. drives it for the duration — the ISO load generator in this process, or, for a generator
   source, nothing but sampling the counters (``engine.telemetry.RackProbe``) — while
   ``ProcessTree`` samples CPU seconds, RSS and PSS of every rack process with psutil;
4. drains the rack (SIGTERM, as ``engine stop``), prints the figures, writes ``--json`` and
   compares with ``--compare``.

The load generator shares the machine (and, on a small one, the cores) with the rack: the
output says so. Exit status: 0 the run was clean (and passed the comparison); 1 it was not
(lost or cross-wired replies, no messages, a rack that did not drain cleanly or could not
start) or a figure regressed; 2 bad arguments (``BenchError``); 3 the rack runs already.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from engine.bench import (
    DEFAULT_BAND,
    BenchError,
    BenchOptions,
    BenchPlan,
    BenchResult,
    CpuLedger,
    Figures,
    GeneratorPlan,
    IsoPlan,
    IssuerTarget,
    Json,
    Latency,
    ProcKey,
    figures_of,
    options_for,
    plan_for,
    result_table,
    rig_digest,
)
from engine.benchcompare import (
    Baseline,
    check_comparable,
    compare,
    comparison_table,
    load_baseline,
)
from engine.benchkit import fingerprint
from engine.config import ConfigError, RigConfig, load_config
from engine.counters import HIST_BUCKETS
from engine.demo import start_issuer_simulator
from engine.harness import RackNotReady, RackRun
from engine.telemetry import RackProbe, RackSample, read_state

Echo = Callable[[str], None]
TICK = 0.5  # s between samples of a generator rig (its counters have no event to wait on)
READY_TIMEOUT = 90.0  # s for the rack to serve (nats-server, streams, forks on a slow box)
STOP_TIMEOUT = 120.0  # s for the drain (the rack's own --drain-timeout is 30 s) and stop
RACK_LOG = "bench-rack.log"


class BenchFailed(RuntimeError):
    """The bench could not run: the rack did not start (``code`` 1, or 3 when it runs
    already), the issuer simulator did not start."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """Everything ``engine bench`` was asked, resolved and checked before anything starts."""

    config: Path
    cfg: RigConfig
    plan: BenchPlan
    options: BenchOptions
    rig_sha256: str
    baseline: Baseline | None = None
    band: float = DEFAULT_BAND
    compare_notes: tuple[str, ...] = field(default=())


def prepare(config: Path, *, duration: float, workers: int, rate: float | None,
            connections: int | None, issuer_sim: bool, baseline: Path | None, band: float,
            force: bool) -> RunSpec:
    """Read the rig and the baseline and check everything a run needs; start nothing.

    Raises:
        BenchError: a bad rig file, option or baseline (exit 2).
    """
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise BenchError(str(exc)) from exc
    plan = plan_for(cfg)
    options = options_for(plan, duration=duration, workers=workers, rate=rate,
                          connections=connections, issuer_sim=issuer_sim, rig=str(config))
    sha = rig_digest(config)
    base: Baseline | None = None
    notes: tuple[str, ...] = ()
    if baseline is not None:
        base = load_baseline(baseline)
        notes = tuple(check_comparable(base, rig=str(config), rig_sha256=sha,
                                       options=options.to_json(_source(plan)), force=force))
    return RunSpec(config=config, cfg=cfg, plan=plan, options=options, rig_sha256=sha,
                   baseline=base, band=band, compare_notes=notes)


def _source(plan: IsoPlan | GeneratorPlan) -> str:
    return "iso8583" if isinstance(plan, IsoPlan) else "generator"


# --- processes --------------------------------------------------------------------------------


class ProcessTree:
    """The rack's processes — the supervisor, its descendants (workers, egress, telemetry,
    nats-server) and the state file's nats-server pid — sampled with psutil."""

    def __init__(self, root_pid: int, data_dir: Path) -> None:
        self.root_pid = root_pid
        self.data_dir = data_dir
        self.names: dict[ProcKey, str] = {}
        self.peak_rss = 0
        self.peak_pss: int | None = None

    def _named_pids(self) -> dict[int, str]:
        names = {self.root_pid: "supervisor"}
        try:
            state = read_state(self.data_dir)  # re-read: a restarted worker has a new pid
        except (OSError, ValueError):
            return names
        names.update({int(p["pid"]): str(p["name"]) for p in state.get("processes", [])
                      if p.get("pid")})
        if state.get("nats_pid"):
            names[int(state["nats_pid"])] = "nats-server"
        return names

    def sample(self) -> dict[ProcKey, float]:
        """CPU seconds (user + system) of every rack process now; keeps peak RSS and PSS."""
        names = self._named_pids()
        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.root_pid)
            procs = {p.pid: p for p in (root, *root.children(recursive=True))}
        except psutil.Error:
            pass
        for pid in names:
            if pid not in procs:
                try:
                    procs[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
        cpu: dict[ProcKey, float] = {}
        rss, pss = 0, 0
        pss_known = True
        for pid, p in procs.items():
            try:
                with p.oneshot():
                    key = (pid, p.create_time())
                    t = p.cpu_times()
                    cpu[key] = t.user + t.system
                    # not in the state file: e.g. multiprocessing's resource tracker
                    self.names.setdefault(key, names.get(pid) or f"other: {p.name()}")
                    try:
                        mem = p.memory_full_info()
                        rss += mem.rss
                        pss += mem.pss
                    except psutil.AccessDenied:
                        rss += p.memory_info().rss
                        pss_known = False
            except psutil.Error:
                continue  # gone between the listing and the reading
        self.peak_rss = max(self.peak_rss, rss)
        if pss_known:
            self.peak_pss = max(self.peak_pss or 0, pss)
        return cpu

    def by_name(self, used: dict[ProcKey, float]) -> dict[str, float]:
        """CPU seconds by process name (a restarted process's lives summed)."""
        out: dict[str, float] = {}
        for key, seconds in used.items():
            name = self.names.get(key, str(key[0]))
            out[name] = out.get(name, 0.0) + seconds
        return out


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def silent_issuers(issuers: Sequence[IssuerTarget]) -> list[IssuerTarget]:
    """The loopback issuers nobody listens for (a remote issuer is the user's business)."""
    out, probed = [], {}
    for i in issuers:
        if i.host != "localhost" and i.host != "::1" and not i.host.startswith("127."):
            continue
        addr = (i.host, i.port)
        if addr not in probed:
            probed[addr] = _listening(*addr)
        if not probed[addr]:
            out.append(i)
    return out


def _start_simulators(silent: Sequence[IssuerTarget]) -> list[subprocess.Popen[bytes]]:
    """One ``engine iso issuer`` per wire format, on the ports of ``silent``."""
    groups: dict[tuple[str, str, str, int, int], list[int]] = {}
    for i in silent:
        key = (i.host, i.spec_name, i.framing.prefix, i.framing.header_len,
               i.framing.max_frame)
        if i.port not in groups.setdefault(key, []):
            groups[key].append(i.port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for (host, spec, prefix, header_len, max_frame), ports in groups.items():
            args = ["--host", host, "--spec", spec, "--prefix", prefix, "--header-len",
                    str(header_len), "--max-frame", str(max_frame)]
            for port in ports:
                args += ["--port", str(port)]
            procs.append(start_issuer_simulator(args, len(ports)))
    except (RuntimeError, OSError) as exc:
        _stop_all(procs)
        raise BenchFailed(f"issuer simulator: {exc}") from exc
    return procs


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the loads --------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Measured:
    """What driving the rack measured, before its drain.

    Attributes:
        figures: the figures of the measured interval.
        details: the load's own figures, JSON-ready.
        used: CPU seconds per rack process over the interval.
        problems: why the run failed, if it did.
        notes: what a reader must know.
    """

    figures: Figures
    details: dict[str, Json]
    used: dict[ProcKey, float]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _drive_iso(plan: IsoPlan, opts: BenchOptions, tree: ProcessTree, echo: Echo) -> Measured:
    from gears.iso8583.codec import spec_by_name
    from gears.iso8583.loadgen import LoadConfig, LoadGenerator

    assert opts.connections is not None and opts.rate is not None
    gen = LoadGenerator(LoadConfig(
        host=plan.host, port=plan.port, spec=spec_by_name(plan.spec_name),
        framing=plan.framing, header=plan.header, connections=opts.connections,
        rate=opts.rate, window=opts.window, duration=opts.duration, grace=plan.grace,
        mix=plan.mix))
    ledger = CpuLedger()
    echo(f"{'t(s)':>5} {'sent':>10} {'answered':>10} {'TPS':>8} {'cross-wired':>11} "
         f"{'rack CPU%':>9}")
    t0 = time.monotonic()
    last = [0.0, t0, 0.0]  # answered, time, CPU seconds at the previous line

    def progress(g: LoadGenerator) -> None:
        ledger.observe(tree.sample())
        now, cpu, r = time.monotonic(), ledger.total(), g.report
        dt = max(1e-9, now - last[1])
        echo(f"{now - t0:5.1f} {r.sent:10,} {r.received:10,} "
             f"{(r.received - last[0]) / dt:8,.0f} {r.cross_wired:11} "
             f"{100 * (cpu - last[2]) / dt:9.0f}")
        last[:] = [r.received, now, cpu]

    gen.progress = progress
    ledger.mark(tree.sample())
    report = asyncio.run(gen.run())
    ledger.observe(tree.sample())
    s = report.summary()
    used = ledger.used()
    figures = figures_of(
        messages=report.received, seconds=report.seconds, unit="TPS",
        latency=Latency(p50_ms=s["p50_ms"], p90_ms=s["p90_ms"], p99_ms=s["p99_ms"],
                        max_ms=s["max_ms"]),
        latency_what="request sent -> answer read, at the load generator",
        cpu_seconds=sum(used.values()), peak_rss_mb=tree.peak_rss / 1e6,
        peak_pss_mb=None if tree.peak_pss is None else tree.peak_pss / 1e6,
        processes=len(used))
    details: dict[str, Json] = {
        "sent": report.sent, "answered": report.received, "de39": s["codes"],
        "cross_wired": report.cross_wired, "lost": report.lost,
        "routes": list(plan.routes)}
    if plan.left_out:
        details["routes_left_out"] = list(plan.left_out)
    out = Measured(figures=figures, details=details, used=used)
    if report.connect_errors:
        details["connect_errors"] = report.connect_errors
        out.problems.append(f"{report.connect_errors} of {opts.connections} connections "
                            f"failed; last error: {report.connect_error}")
    if report.sent == 0:
        out.problems.append("nothing was sent")
    if s["codes"].get("91"):
        out.notes.append(f"{s['codes']['91']:,} answered 91: an issuer was unavailable or did "
                         f"not answer within the switch's timeout")
    if report.cross_wired or report.lost:
        out.problems.append(f"replies cross-wired: {report.cross_wired}, lost: {report.lost}")
    elif report.received != report.sent:
        out.problems.append(f"answered {report.received:,} of {report.sent:,} sent")
    return out


def _sum(sample: RackSample, names: set[str]) -> tuple[int, np.ndarray]:
    """Frames out and the latency histogram summed over the processes ``names``."""
    frames, hist = 0, np.zeros(HIST_BUCKETS, dtype=np.int64)
    for p in sample.processes:
        if p.name in names and p.counters is not None:
            frames += p.counters.frames_out
            hist += p.counters.histogram
    return frames, hist


def _drive_generator(plan: GeneratorPlan, opts: BenchOptions, rack: RackRun,
                     probe: RackProbe, tree: ProcessTree, echo: Echo) -> Measured:
    procs = probe.state["processes"]
    counted = {p["name"] for p in procs if plan.counts(p["name"])}
    roles = {p["role"] for p in procs}
    timed_role = "egress" if "egress" in roles else "sink" if "sink" in roles else ""
    timed = {p["name"] for p in procs if p["role"] == timed_role} if timed_role else counted
    what = {"egress": "frame created -> JetStream ack, from the egress counters",
            "sink": "frame created -> written by the sink, from its counters"}.get(
        timed_role, "frame created -> out of the last stage, from its counters")
    egress = {p["name"] for p in procs if p["role"] == "egress"}
    ledger = CpuLedger()
    first = probe.sample()
    ledger.mark(tree.sample())
    end, used_at_end, prev = first, ledger.used(), first
    ended_early = False
    prev_cpu = 0.0
    echo(f"{'t(s)':>5} {'frames':>12} {'frames/s':>10} {'rack CPU%':>9}")
    while True:
        time.sleep(TICK)
        cur = probe.sample()
        ledger.observe(tree.sample())
        moved = _sum(cur, counted)[0] > _sum(end, counted)[0]
        if moved or not plan.finite:
            end, used_at_end = cur, ledger.used()
        if cur.t - prev.t >= 1.0 - TICK / 2:  # a line a second
            frames, dt, cpu = _sum(cur, counted)[0], cur.t - prev.t, ledger.total()
            echo(f"{cur.t - first.t:5.1f} {frames - _sum(first, counted)[0]:12,} "
                 f"{(frames - _sum(prev, counted)[0]) / dt:10,.0f} "
                 f"{100 * (cpu - prev_cpu) / dt:9.0f}")
            prev, prev_cpu = cur, cpu
        if cur.t - first.t >= opts.duration or rack.proc.poll() is not None:
            break
        if plan.finite and cur.t - end.t >= plan.stall:
            ended_early = True
            break
    frames0, frames1 = _sum(first, counted)[0], _sum(end, counted)[0]
    timed_hist = _sum(end, timed)[1] - _sum(first, timed)[1]
    figures = figures_of(
        messages=frames1 - frames0, seconds=end.t - first.t, unit="frames/s",
        latency=Latency.from_histogram(timed_hist), latency_what=what,
        cpu_seconds=sum(used_at_end.values()), peak_rss_mb=tree.peak_rss / 1e6,
        peak_pss_mb=None if tree.peak_pss is None else tree.peak_pss / 1e6,
        processes=len(used_at_end))
    details: dict[str, Json] = {"counted": sorted(counted)}
    if egress:
        details["acked_by_jetstream"] = _sum(end, egress)[0] - _sum(first, egress)[0]
    if ended_early:
        details["ended_early"] = (f"the generators reached their count; measured up to the "
                                  f"last frame, {end.t - first.t:.1f} s")
    out = Measured(figures=figures, details=details, used=used_at_end)
    if rack.proc.poll() is not None:
        out.problems.append(f"the rack exited during the run: code={rack.proc.returncode}")
    if frames1 == frames0:
        out.problems.append("no frames came out of " + ", ".join(sorted(counted)) + " in the "
                        "measured interval" + (" (a generator with a count may have "
                                               "finished before it began)" if plan.finite
                                               else ""))
    return out


# --- the run ----------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(spec: RunSpec, log: Path) -> RackRun:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        run = RackRun(spec.config, workers=spec.options.workers, stdout=out)
    try:
        run.wait_ready(READY_TIMEOUT)
    except RackNotReady as exc:
        run.kill()
        code = 3 if run.proc.returncode == 3 else 1
        raise BenchFailed(f"{exc}; rack output ({log}):\n{_tail(log)}", code) from None
    return run


def _header(spec: RunSpec, echo: Echo) -> None:
    opts, plan = spec.options, spec.plan
    echo(f"engine bench: rig {spec.config} (sha256 {spec.rig_sha256[:12]}), rack "
         f"'{spec.cfg.rack_id}', --workers {opts.workers}, {opts.duration:g} s")
    if isinstance(plan, IsoPlan):
        pace = (f"{opts.rate:,.0f} TPS offered" if opts.rate else
                f"closed loop at max rate, {opts.window} outstanding per connection")
        echo(f"load: ISO 8583 load generator -> {plan.host}:{plan.port}, {opts.connections} "
             f"connections, {pace}; routes driven: {', '.join(plan.routes) or 'none'}")
        echo("note: the load generator runs in this process, on the rack's machine: it takes "
             "CPU from it (not counted in CPU per message)")
    else:
        echo(f"load: none, the generator source generates by itself; counted: frames out of "
             f"{', '.join(plan.counted)}")


def run(spec: RunSpec, *, json_out: Path | None, echo: Echo) -> int:
    """Run the bench ``spec`` describes; print as it goes; the exit status.

    Raises:
        BenchError: loopback issuers nobody serves, without ``--issuer-sim`` (exit 2).
        BenchFailed: the rack or the issuer simulator could not start (exit 1 or 3).
    """
    plan, opts = spec.plan, spec.options
    silent = silent_issuers(plan.issuers) if isinstance(plan, IsoPlan) else []
    where = ", ".join(f"{i.name} ({i.host}:{i.port})" for i in silent)
    if silent and not opts.issuer_sim:
        raise BenchError(f"{spec.config}: issuers: nobody listens for {where}: start them, "
                         f"or add --issuer-sim to serve them with the issuer simulator (it "
                         f"approves every request)")
    fp = fingerprint()
    data_dir = Path(spec.cfg.data_dir).resolve()
    log = data_dir / RACK_LOG
    sims: list[subprocess.Popen[bytes]] = []
    rack: RackRun | None = None
    probe: RackProbe | None = None
    try:
        if silent:
            sims = _start_simulators(silent)
            echo(f"issuer simulator started (--issuer-sim; approves every request) for "
                 f"{where}")
        elif opts.issuer_sim:
            echo("--issuer-sim: every issuer is served already; no simulator started")
        _header(spec, echo)
        data_dir.mkdir(parents=True, exist_ok=True)
        rack = _start(spec, log)
        tree = ProcessTree(rack.proc.pid, data_dir)
        if isinstance(plan, IsoPlan):
            m = _drive_iso(plan, opts, tree, echo)
        else:
            probe = RackProbe(read_state(data_dir))
            m = _drive_generator(plan, opts, rack, probe, tree, echo)
        echo("draining the rack ...")
        try:
            code: int | None = rack.stop(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            rack.kill()
            code = None
    finally:
        if probe is not None:
            probe.close()
        if rack is not None and rack.proc.poll() is None:
            try:  # interrupted (Ctrl-C, an error here): drain as engine stop would
                rack.stop(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                rack.kill()  # the next start adopts what it left
        _stop_all(sims)  # after the rack: its drain still needs the issuers
    if code != 0:
        m.problems.append(f"the rack did not drain cleanly: exit={code} (its output: {log})")
    notes = m.notes
    if sims:
        notes.append("issuers served by the issuer simulator (--issuer-sim): the switch's "
                     "own cost, not a real issuer's")
    notes.append(f"the rack's output: {log}; its data (audit stream too) stays in {data_dir}")
    result = BenchResult(rig=str(spec.config), rig_sha256=spec.rig_sha256,
                         rack=spec.cfg.rack_id, options=opts.to_json(_source(plan)),
                         figures=m.figures, details=m.details,
                         cpu_by_process=tree.by_name(m.used), rack_exit=code,
                         problems=tuple(m.problems), notes=tuple(notes))
    echo("")
    echo(result_table(result))
    comparison = None
    if spec.baseline is not None:
        comparison = compare(spec.baseline, m.figures, fp, spec.band, spec.compare_notes)
        echo("")
        echo(comparison_table(comparison))
    if json_out is not None:
        doc = result.to_json(fp)
        if comparison is not None:
            doc["compare"] = comparison.to_json()
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
        echo(f"wrote {json_out}")
    return 0 if result.ok and not (comparison is not None and comparison.failed) else 1
