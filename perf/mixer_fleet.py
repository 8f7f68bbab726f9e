"""Mixer at fleet scale: one Mixer, ``--racks`` simulated racks reporting every second.

    python perf/mixer_fleet.py [--racks 1000] [--seconds 300] [--json PATH] [--no-enrol]
                               [--sample-every 5] [--cli-runs 10] [--offline-after 5]
                               [--warmup-max 120] [--keep]

Not a ``*_bench.py``: ``scripts/bench`` does not run it (a full run takes ~7 minutes).

What runs (all on this machine, the simulator sharing the CPUs with the Mixer):

1. ``mixer init`` in a temporary dir; ``mixer.yaml`` on free ports with ``simulator: true``
   (the hub user ``sim`` may publish ``fluxrig.stats.*`` and ``fluxrig.up.*.hello``),
   ``offline_after: 5s`` (``--offline-after``), ``rollup_interval: 10s``, Prometheus off
   (as ``mixer init`` writes it). Unless ``--no-enrol``, every rack is enrolled first with
   ``mixer.enrol.add_rack`` (labels ``site``, ``region``, ``role``; ~7 s for 1,000 with the
   Mixer stopped), so the hub's config holds 1,000 rack users and the registry 1,000
   enrolled rows, as in a real fleet.
2. ``mixer start DIR --ready-fd`` (``tests/mixerutil.MixerProcess``).
3. The simulator: one asyncio loop, one NATS connection as ``sim``. At start a hello per
   rack (``engine.supervisor``'s ``_hello``: version, rig hash, labels, ``started_ns``,
   ``workers``; ``streams`` empty — no rack JetStream exists behind the simulator for the hub
   to source from), and again every 10 s per rack (``engine.telemetry.HELLO_EVERY``: real
   racks repeat theirs), spread over the 10 s. Every second, one snapshot per rack, spread
   evenly over the second (rack ``i`` at ``i / racks`` s into each second), built by
   ``engine.telemetry.snapshot_message`` from rows of the shape ``engine.telemetry.rows``
   makes: a switch rack with 2 workers (``payments.switch.0/.1`` with their ``iso8583.*``
   stats) plus a side pipeline, egress and telemetry — 10 processes — with counters that
   grow by each rack's own rate (20-400 transactions/s) every second.
4. Every ``--sample-every`` s: ``fluxrig.mixer.racks`` then ``fluxrig.mixer.top`` (as
   ``admin``) for the lag, and psutil CPU times of the registry process, the hub's
   nats-server and the Mixer's supervisor (pids from ``DIR/state.json``), and of the
   simulator itself.
5. After the window, the fleet still publishing: ``mixer racks DIR --json``, ``mixer top
   DIR --json`` and ``mixer version`` (the CLI's start-up floor) as a user runs them
   (the ``mixer`` command, wall time, median of ``--cli-runs``), and the same two
   requests in process (request/reply on the open connection).

Lag, exactly: each snapshot carries the simulator's sequence number in ``hub_backlog`` (a
top-level figure ``mixer top`` echoes as ``backlog``; its value costs the registry the same
as any other), and the simulator keeps the wall time it published each (rack, seq). The
racks reply gives each rack's ``last_seen_ns`` (the registry's clock when it took the
snapshot); the top reply, asked right after, each rack's ``backlog`` (= seq) and ``age_s``
(its answer time minus that same receive time). A rack whose snapshot did not change
between the two answers has ``last_seen_ns + age_s`` = the top answer's time, to the
nanosecond; a changed rack gives less. The value most racks agree on is the top answer's
time, and each rack's lag = (answer time - ``age_s``) - send time of seq: send ->
nats-server -> registry callback, to the microsecond, however far behind the registry is.
``behind`` counts snapshots published before the answer and not yet taken.

Bars (docs/mixer-design.md, sections 9 and 10, "unverified until build step 9"): the Mixer
keeps up with 1,000 racks at 1 Hz — no growing lag over 5 minutes — at <= 50% of one CPU
(registry + hub nats-server + supervisor, mean over the window); ``mixer racks --json``
<= 200 ms. "No growing lag" is judged as the rise of a straight line fitted to each
sample's median lag over the window: <= 100 ms (a registry that keeps up holds a flat lag
of milliseconds; one short of its load by only 0.1% rises 300 ms in 300 s); it fails too
when a sample goes unanswered, a rack turns offline during the window (``rack_events`` in
``registry.duckdb``, read after the stop) or the hub drops the registry as a slow consumer.
Start-up (the hello burst until every rack is online, then 10 s) is outside the window;
its rack events are reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import nats
import numpy as np
import orjson
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mixerutil import (  # type: ignore[import-not-found]  # noqa: E402 - tests/ harness
    MixerProcess,
    mixer,
)

from engine.cbor import dumps  # noqa: E402
from engine.natsd import free_port  # noqa: E402
from engine.telemetry import HELLO_EVERY, RackSample, snapshot_message  # noqa: E402

PY = sys.executable
CPU_BAR = 50.0  # % of one CPU, the Mixer's processes, mean over the window
RACKS_CLI_BAR = 200.0  # ms, `mixer racks --json` wall time as a user runs it
LAG_RISE_BAR = 100.0  # ms, rise of the fitted median lag over the window
SETTLE = 10.0  # s after every rack is online before the window opens (start-up is not steady)
TICK = 0.005  # s, the simulator's scheduling granularity (5 sends per wake-up at 1,000/s)
ASK_TIMEOUT = 10.0  # s, a request the registry is too busy to answer counts as failed

# --- the racks' snapshots -----------------------------------------------------------------

# A switch rack with 2 workers (configs/iso8583-switch.yaml) and a side pipeline: name,
# role, has input rings, kind of stats (gears/iso8583/core.py stat_defs, engine/egress.py)
LAYOUT = (("payments.switch.0", "source", False, "switch"),
          ("payments.switch.1", "source", False, "switch"),
          ("fraud.tap", "source", False, ""),
          ("fraud.score.0", "stage", True, ""),
          ("fraud.score.1", "stage", True, ""),
          ("fraud.enrich", "stage", True, ""),
          ("fraud.filter", "stage", True, ""),
          ("fraud.alerts", "sink", True, ""),
          ("egress", "egress", True, "egress"),
          ("telemetry", "telemetry", False, ""))
ISSUERS = ("issuer-a", "issuer-a2", "issuer-b")
SITES = tuple(f"site-{i:02d}" for i in range(40))
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")


def rack_id(i: int) -> str:
    """The id of simulated rack ``i``."""
    return f"rack-{i:04d}"


def rack_labels(i: int) -> dict[str, str]:
    """Simulated rack ``i``'s labels (enrolled and claimed alike)."""
    return {"site": SITES[i % len(SITES)], "region": REGIONS[i % len(REGIONS)],
            "role": "payments"}


@dataclass(slots=True)
class SimRack:
    """One simulated rack's cumulative counters (what its telemetry would read)."""

    index: int
    rate: float  # transactions per second
    counters: list[dict[str, int]] = field(default_factory=list)
    switch_stats: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counters = [dict.fromkeys(("frames_in", "frames_out", "errors", "bytes_in",
                                        "bytes_out", "ring_full_waits"), 0) for _ in LAYOUT]
        self.switch_stats = [{} for _ in range(2)]


def _switch_stats(stats: dict[str, int], n: int, rng: random.Random) -> dict[str, int]:
    """A switch worker's named stats after ``n`` more transactions, as ``rows`` sends them:
    gauges always, counters once they moved."""
    declined = n // 20
    timeouts = 1 if rng.random() < 0.02 else 0
    for key, add in (("iso8583.requests", n), ("iso8583.echoes", rng.randint(0, 1)),
                     ("iso8583.answers{de39=00}", n - declined - timeouts),
                     ("iso8583.answers{de39=05}", declined),
                     ("iso8583.answers{de39=91}", timeouts),
                     ("iso8583.outcomes{outcome=answered}", n - timeouts),
                     ("iso8583.outcomes{outcome=timeout}", timeouts),
                     ("saf.queued", timeouts), ("saf.sent", timeouts)):
        if add or key in stats:
            stats[key] = stats.get(key, 0) + add
    out = {k: v for k, v in stats.items() if v}
    inflight = rng.randint(0, max(1, n // 50))
    out.update({"iso8583.inflight": inflight, "iso8583.journal": inflight,
                "iso8583.connections": 25, "iso8583.blocked": 0})
    for issuer in ISSUERS:
        out[f"iso8583.links_up{{issuer={issuer}}}"] = 2
        out[f"iso8583.issuer_inflight{{issuer={issuer}}}"] = inflight // 3
    return out


def snapshot_rows(rack: SimRack, rng: random.Random) -> list[dict[str, Any]]:
    """One second more of ``rack``: its processes' rows, shaped as ``engine.telemetry.rows``
    makes them between two samples one second apart."""
    tps = rack.rate * rng.uniform(0.9, 1.1)
    rows = []
    for p, (name, role, inputs, kind) in enumerate(LAYOUT):
        n = round(tps / 2) if kind == "switch" else round(tps)
        cpu_pct = round(min(95.0, n * (0.04 if kind == "switch" else 0.01) + 0.1), 2)
        row: dict[str, Any] = {"name": name, "role": role, "pid": 20000 + 16 * rack.index + p,
                               "rss": (70 + 3 * p) << 20,
                               "ring_fill": round(rng.uniform(0.0, 0.02), 4) if inputs else 0.0}
        if kind == "switch":
            row["cpu"] = p  # the CPU the replica is pinned to (placement)
        if role != "telemetry":
            c = rack.counters[p]
            frames_in = 0 if role == "source" and kind != "switch" else n
            frames_out = 0 if role == "sink" else n
            c["frames_in"] += frames_in
            c["frames_out"] += frames_out
            c["bytes_in"] += 180 * frames_in
            c["bytes_out"] += 200 * frames_out
            if rng.random() < 0.01:
                c["errors"] += 1
            row.update(c)
            row["p50_ns"] = int(rng.uniform(0.8e6, 1.5e6))
            row["p99_ns"] = int(rng.uniform(3e6, 8e6))
            if kind == "switch":
                row["stats"] = _switch_stats(rack.switch_stats[p], n, rng)
            elif kind == "egress":
                row["stats"] = {"egress.waiting": 0}
            row["in_per_s"] = float(frames_in)
            row["out_per_s"] = float(frames_out)
        row["cpu_pct"] = cpu_pct
        rows.append(row)
    return rows


_HOST = RackSample(t=0.0, processes=(), host_cpu=23.5, host_mem_used=5 << 30)


class FleetSim:
    """The simulated fleet: hellos and snapshots on one NATS connection, and when each was
    published.

    Attributes:
        sends: ``sends[seq][i]`` = wall time (ns) snapshot ``seq`` of rack ``i`` was
            published (0: not yet).
        late: how late each publish was against its slot (s), for the simulator's own health.
    """

    def __init__(self, racks: int, seed: int = 8583):
        self.n = racks
        self.rng = random.Random(seed)
        self.racks = [SimRack(i, self.rng.uniform(20.0, 400.0)) for i in range(racks)]
        self.sends: list[np.ndarray] = []
        self.late: list[float] = []
        self.hellos = 0
        self.started_ns = time.time_ns()
        self.version = dist_version("fluxrig")

    def hello(self, i: int) -> bytes:
        """Rack ``i``'s hello, as ``engine.supervisor`` makes it."""
        return dumps({"rack": rack_id(i), "version": self.version,
                      "rig_hash": f"{i:064x}", "labels": rack_labels(i), "streams": [],
                      "started_ns": self.started_ns, "workers": 2})

    def snapshot(self, i: int, seq: int) -> bytes:
        """Rack ``i``'s snapshot number ``seq`` (carried in ``hub_backlog``)."""
        rows = snapshot_rows(self.racks[i], self.rng)
        return snapshot_message(rack_id(i), rack_labels(i), _HOST, rows,
                                {"hub_backlog": seq, "link": "up"})

    async def run(self, nc: Any, stop: asyncio.Event) -> None:
        """Hellos for every rack now, then every second one snapshot per rack, spread
        evenly, until ``stop``; each rack's hello again every ``HELLO_EVERY`` s."""
        for i in range(self.n):
            await nc.publish(f"fluxrig.up.{rack_id(i)}.hello", self.hello(i))
        self.hellos += self.n
        t0 = time.monotonic()
        slot = 0  # seq * n + i
        hello_every = round(HELLO_EVERY)
        while not stop.is_set():
            due = int((time.monotonic() - t0) * self.n)
            while slot <= due:
                seq, i = divmod(slot, self.n)
                if i == 0:
                    self.sends.append(np.zeros(self.n, dtype=np.int64))
                if seq and seq % hello_every == i % hello_every:
                    await nc.publish(f"fluxrig.up.{rack_id(i)}.hello", self.hello(i))
                    self.hellos += 1
                payload = self.snapshot(i, seq)
                self.late.append(time.monotonic() - t0 - slot / self.n)
                self.sends[seq][i] = time.time_ns()
                await nc.publish(f"fluxrig.stats.{rack_id(i)}", payload)
                slot += 1
            await asyncio.sleep(max(TICK, t0 + slot / self.n - time.monotonic()))

    def last_sent(self, i: int, at_ns: int) -> int:
        """The last seq of rack ``i`` published at or before ``at_ns`` (-1: none)."""
        seq = len(self.sends) - 1
        while seq >= 0 and not 0 < self.sends[seq][i] <= at_ns:
            seq -= 1
        return seq


# --- the lag, from the registry's two answers (sans I/O) ----------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class LagSample:
    """The registry's view of the fleet at one moment.

    Attributes:
        t: seconds since the window opened.
        answered_ns: when the registry built the top answer (its clock).
        lags_ms: per rack with a snapshot: receive time - send time of that snapshot.
        behind: per rack, snapshots published before the answer and not yet taken.
        states: racks by state in the racks answer.
        answer_to_reply_ms: the top answer's time to the simulator's receipt of it.
    """

    t: float
    answered_ns: int
    lags_ms: np.ndarray
    behind: np.ndarray
    states: dict[str, int]
    answer_to_reply_ms: float

    def summary(self) -> dict[str, Any]:
        """The sample's figures for the JSON."""
        lags = self.lags_ms
        return {"t": round(self.t, 3), "racks": int(lags.size),
                "lag_median_ms": round(float(np.median(lags)), 3) if lags.size else None,
                "lag_p99_ms": round(float(np.percentile(lags, 99)), 3) if lags.size else None,
                "lag_max_ms": round(float(lags.max()), 3) if lags.size else None,
                "behind_max": int(self.behind.max()) if self.behind.size else None,
                "states": self.states,
                "answer_to_reply_ms": round(self.answer_to_reply_ms, 3)}


def lag_sample(t: float, racks: Sequence[dict[str, Any]], top: Sequence[dict[str, Any]],
               sim: FleetSim, replied_ns: int) -> LagSample:
    """The lags of one (racks answer, top answer asked right after) pair.

    Raises:
        ValueError: no rack is in both answers with a snapshot (nothing to anchor on).
    """
    seen = {r["id"]: r["last_seen_ns"] for r in racks if r.get("last_seen_ns")}
    states: dict[str, int] = {}
    for r in racks:
        states[r["state"]] = states.get(r["state"], 0) + 1
    rows = [(row["rack"], row["backlog"], round(row["age_s"] * 1e9)) for row in top
            if isinstance(row.get("backlog"), int) and row.get("age_s") is not None]
    # a rack unchanged between the answers gives last_seen + age == the top answer's time
    # (to the ns: both come from one time.time_ns() in the registry); one changed since gives
    # less, one whose last_seen came from a hello taken after its snapshot more: the value
    # most racks agree on (to the microsecond) is the answer's time
    anchors = Counter((seen[rack] + age) // 1000 for rack, _, age in rows if rack in seen)
    if not anchors:
        raise ValueError("no rack in both answers: racks and top do not overlap")
    answered = max(anchors.items(), key=lambda kv: (kv[1], kv[0]))[0] * 1000 + 500
    lags, behind = [], []
    for rack, seq, age in rows:
        i = int(rack.rsplit("-", 1)[1])
        if seq >= len(sim.sends) or not sim.sends[seq][i]:
            continue  # not a snapshot of this run (cannot happen; never counted)
        lags.append((answered - age - int(sim.sends[seq][i])) / 1e6)
        behind.append(sim.last_sent(i, answered) - seq)
    return LagSample(t=t, answered_ns=answered, lags_ms=np.array(lags), behind=np.array(behind),
                     states=states, answer_to_reply_ms=(replied_ns - answered) / 1e6)


def fit(ts: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope per second, rise over the span of ``ts``) of the least-squares line."""
    if len(ts) < 2:
        return 0.0, 0.0
    slope = float(np.polyfit(np.asarray(ts), np.asarray(ys), 1)[0])
    return slope, slope * (max(ts) - min(ts))


# --- the Mixer's processes ----------------------------------------------------------------

class CpuSampler:
    """CPU times of named pids, sampled at instants; % of one CPU between samples."""

    def __init__(self, pids: dict[str, int]):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: list[tuple[float, dict[str, float], dict[str, int]]] = []

    def sample(self, t: float) -> None:
        """Record CPU seconds and RSS of every process at ``t`` (monotonic seconds)."""
        cpu, rss = {}, {}
        for name, p in self.procs.items():
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    cpu[name] = times.user + times.system
                    rss[name] = p.memory_info().rss
            except psutil.Error:
                cpu[name], rss[name] = float("nan"), 0
        self.samples.append((t, cpu, rss))

    def summary(self) -> dict[str, Any]:
        """Per process: mean % over all samples, max % of an interval, RSS first/last."""
        out: dict[str, Any] = {}
        if len(self.samples) < 2:
            return out
        (t0, c0, r0), (t1, c1, r1) = self.samples[0], self.samples[-1]
        for name in self.procs:
            steps = [(b[1][name] - a[1][name]) / (b[0] - a[0]) * 100
                     for a, b in zip(self.samples, self.samples[1:])]
            out[name] = {"mean_pct": round((c1[name] - c0[name]) / (t1 - t0) * 100, 2),
                         "max_pct": round(max(steps), 2),
                         "intervals_pct": [round(s, 2) for s in steps],
                         "rss_mb_start": round(r0[name] / 1e6, 1),
                         "rss_mb_end": round(r1[name] / 1e6, 1)}
        return out


def write_settings(hub: Path, port: int, leaf: int, offline_after: float) -> None:
    """``mixer.yaml`` for the bench: free ports, ``sim`` allowed, the offline limit."""
    (hub / "mixer.yaml").write_text(
        f"hub: {{host: 127.0.0.1, port: {port}}}\n"
        f"leaf: {{host: 127.0.0.1, port: {leaf}, urls: [tls://127.0.0.1:{leaf}]}}\n"
        f"registry: {{offline_after: {offline_after:g}s}}\n"
        "prometheus: null\n"
        "rollup_interval: 10s\n"
        "simulator: true\n")


def make_hub(tmp: Path, racks: int, enrol: bool, offline_after: float) -> tuple[Path, float]:
    """An initialised hub dir (racks enrolled unless not ``enrol``); (dir, enrol seconds)."""
    from mixer.enrol import add_rack
    from mixer.settings import load_settings

    hub = tmp / "hub"
    port, leaf = free_port(), free_port()
    done = mixer("init", str(hub), "--host", "127.0.0.1", "--port", str(port),
                 "--leaf-port", str(leaf))
    if done.returncode:
        raise RuntimeError(f"mixer init failed: {done.stderr}")
    write_settings(hub, port, leaf, offline_after)
    t = time.perf_counter()
    if enrol:
        settings = load_settings(hub)
        passports = tmp / "passports"
        passports.mkdir()
        for i in range(racks):
            add_rack(hub, settings, rack_id(i), rack_labels(i), passports / f"{rack_id(i)}")
    return hub, time.perf_counter() - t


# --- the run ------------------------------------------------------------------------------

class NoAnswer(RuntimeError):
    """The registry did not answer (too busy within ``ASK_TIMEOUT``, or not subscribed:
    disconnected by the hub as a slow consumer, or restarting)."""


async def ask(nc: Any, subject: str, query: dict[str, Any]) -> tuple[Any, float, int]:
    """(decoded answer, seconds, bytes) of one request.

    Raises:
        NoAnswer: no answer within ``ASK_TIMEOUT``, or nobody subscribed.
    """
    t = time.perf_counter()
    try:
        reply = await nc.request(subject, orjson.dumps(query), timeout=ASK_TIMEOUT)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise NoAnswer(f"{subject}: {type(exc).__name__} after "
                       f"{time.perf_counter() - t:.1f} s") from None
    return orjson.loads(reply.data), time.perf_counter() - t, len(reply.data)


def cli_wall(args: list[str], check: Any = None) -> tuple[float, str]:
    """(seconds, error or "") of the ``mixer`` command with ARGS as a user runs it, start to
    exit; an error when it exits non-zero or ``check(stdout)`` is false."""
    t = time.perf_counter()
    done = subprocess.run([str(Path(PY).parent / "mixer"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    wall = time.perf_counter() - t
    if done.returncode:
        return wall, f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    if check is not None and not check(done.stdout):
        return wall, "unexpected output"
    return wall, ""


def _median_ms(values: Sequence[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


async def measure(hub: Path, mp: MixerProcess, racks: int, seconds: float,
                  sample_every: float, cli_runs: int, warmup_max: float) -> dict[str, Any]:
    """Run the fleet against the started Mixer; every figure of the JSON but the setup."""
    from mixer.hubfiles import local_users
    from mixer.settings import load_settings

    settings = load_settings(hub)
    users = local_users(hub)
    state = mp.state()
    registry_pid = next(p["pid"] for p in state["processes"] if p["name"] == "registry")
    cpu = CpuSampler({"registry": registry_pid, "nats-server": state["hub_pid"],
                      "supervisor": state["pid"], "simulator": os.getpid()})
    sim = FleetSim(racks)
    pub = await nats.connect(settings.hub_url, user="sim", password=users["sim"],
                             name="fleet-sim", max_reconnect_attempts=0,
                             pending_size=64 * 1024 * 1024)
    admin = await nats.connect(settings.hub_url, user="admin", password=users["admin"],
                               name="fleet-bench", max_reconnect_attempts=0)
    stop_sim = asyncio.Event()
    t_load = time.monotonic()
    load = asyncio.create_task(sim.run(pub, stop_sim))
    out: dict[str, Any] = {}
    try:
        # warm-up: every rack online (its hello taken), then SETTLE s
        online, out["all_online_s"], out["warmup_no_answer"] = 0, None, 0
        while time.monotonic() - t_load < warmup_max:
            try:
                answer, _, _ = await ask(admin, "fluxrig.mixer.racks", {"labels": {}})
                online = sum(1 for r in answer if r["state"] == "online")
            except NoAnswer:
                out["warmup_no_answer"] += 1  # busy taking the hellos: ask again
            if online >= racks:
                out["all_online_s"] = round(time.monotonic() - t_load, 2)
                break
            await asyncio.sleep(0.25)  # the registry's state: no event to wait on
        if out["all_online_s"] is None:
            print(f"only {online} of {racks} racks online after {warmup_max:.0f} s "
                  f"({out['warmup_no_answer']} unanswered); measuring anyway", flush=True)
        else:
            print(f"all {racks} racks online after {out['all_online_s']:.1f} s; settling "
                  f"{SETTLE:.0f} s", flush=True)
            await asyncio.sleep(SETTLE)  # start-up work (hellos, first snapshots) is not steady
        print(f"measuring {seconds:.0f} s", flush=True)

        # the window: lag and CPU every sample_every s
        lags: list[LagSample] = []
        failed = 0
        late_from = len(sim.late)
        t_win = time.monotonic()
        out["window_ns"] = [time.time_ns(), 0]
        cpu.sample(t_win)
        next_at = t_win
        while (now := time.monotonic()) - t_win < seconds:
            next_at += sample_every
            await asyncio.sleep(max(0.0, next_at - now))  # the sampling period itself
            cpu.sample(time.monotonic())
            try:
                racks_ans, _, _ = await ask(admin, "fluxrig.mixer.racks", {"labels": {}})
                top_ans, _, _ = await ask(admin, "fluxrig.mixer.top", {})
                s = lag_sample(time.monotonic() - t_win, racks_ans, top_ans, sim,
                               time.time_ns())
            except (NoAnswer, ValueError) as exc:
                failed += 1
                print(f"  sample failed: {exc!r}", flush=True)
                continue
            lags.append(s)
            if len(lags) % max(1, round(30 / sample_every)) == 0:
                d = s.summary()
                print(f"  t={d['t']:5.0f} s  lag median {d['lag_median_ms']:8.2f} ms  "
                      f"max {d['lag_max_ms']:8.2f} ms  behind {d['behind_max']}  "
                      f"states {d['states']}  registry "
                      f"{_last_pct(cpu, 'registry'):5.1f}%  nats "
                      f"{_last_pct(cpu, 'nats-server'):5.1f}%", flush=True)
        out["window_s"] = round(time.monotonic() - t_win, 2)
        out["window_ns"][1] = time.time_ns()
        out["lag"] = summarise_lags(lags, failed)
        out["cpu"] = cpu.summary()
        late = np.array(sim.late[late_from:])
        out["simulator"] = {"snapshots": sum(int((a > 0).sum()) for a in sim.sends),
                            "hellos": sim.hellos,
                            "late_p99_ms": round(float(np.percentile(late, 99)) * 1000, 2),
                            "late_max_ms": round(float(late.max()) * 1000, 2)}

        # the CLI as a user runs it, fleet still publishing
        print("timing the CLI (fleet still publishing)...", flush=True)
        out["cli"] = await cli_figures(admin, hub, racks, cli_runs)
    finally:
        stop_sim.set()
        await asyncio.gather(load, return_exceptions=True)
        await pub.close()
        await admin.close()
    if load.done() and not load.cancelled() and load.exception() is not None:
        raise RuntimeError(f"simulator failed: {load.exception()!r}")
    return out


def _last_pct(cpu: CpuSampler, name: str) -> float:
    (ta, ca, _), (tb, cb, _) = cpu.samples[-2], cpu.samples[-1]
    return (cb[name] - ca[name]) / (tb - ta) * 100


def summarise_lags(lags: list[LagSample], failed: int) -> dict[str, Any]:
    """Lag figures over the window: per sample, over all, and the fitted rise."""
    if not lags:
        return {"samples": 0, "failed": failed}
    ts = [s.t for s in lags]
    med = [float(np.median(s.lags_ms)) for s in lags]
    mx = [float(s.lags_ms.max()) for s in lags]
    every = np.concatenate([s.lags_ms for s in lags])
    med_slope, med_rise = fit(ts, med)
    max_slope, max_rise = fit(ts, mx)
    return {
        "samples": len(lags), "failed": failed,
        "median_ms": round(float(np.median(every)), 3),
        "p99_ms": round(float(np.percentile(every, 99)), 3),
        "max_ms": round(float(every.max()), 3),
        "sample_median_ms": {"min": round(min(med), 3), "max": round(max(med), 3)},
        "median_slope_ms_per_min": round(med_slope * 60, 3),
        "median_rise_ms": round(med_rise, 3),
        "max_slope_ms_per_min": round(max_slope * 60, 3),
        "max_rise_ms": round(max_rise, 3),
        "behind_max": int(max(int(s.behind.max()) for s in lags)),
        "offline_seen": int(max(s.states.get("offline", 0) for s in lags)),
        "answer_to_reply_ms_median": round(statistics.median(
            s.answer_to_reply_ms for s in lags), 3),
        "per_sample": [s.summary() for s in lags],
    }


async def cli_figures(admin: Any, hub: Path, racks: int, runs: int) -> dict[str, Any]:
    """In-process request/reply and ``python -m mixer.cli`` wall times: medians over
    ``runs`` (a run that failed counts with its time, and is listed)."""
    out: dict[str, Any] = {}
    asks: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("racks", "fluxrig.mixer.racks", {"labels": {}}), ("top", "fluxrig.mixer.top", {}))
    for name, subject, query in asks:
        times, size, errors = [], 0, []
        for _ in range(runs):
            t = time.perf_counter()
            try:
                _, took, size = await ask(admin, subject, query)
            except NoAnswer as exc:
                took = time.perf_counter() - t
                errors.append(str(exc))
            times.append(took)
        out[f"{name}_request_ms"] = _median_ms(times)
        out[f"{name}_request_bytes"] = size
        out[f"{name}_request_errors"] = errors

    def all_racks(stdout: str) -> bool:
        return len(json.loads(stdout)) == racks

    def rows(stdout: str) -> bool:
        return len(json.loads(stdout)) >= racks

    for name, args, check in (("version", ["version"], None),
                              ("racks", ["racks", str(hub), "--json"], all_racks),
                              ("top", ["top", str(hub), "--json"], rows)):
        done = [await asyncio.to_thread(cli_wall, args, check) for _ in range(runs)]
        out[f"{name}_cli_ms"] = _median_ms([t for t, _ in done])
        out[f"{name}_cli_ms_all"] = [round(t * 1000, 1) for t, _ in done]
        out[f"{name}_cli_errors"] = [e for _, e in done if e]
    return out


def after_stop(hub: Path, window_ns: Sequence[int]) -> dict[str, Any]:
    """What the stopped Mixer left: rollup files, the rack events in ``registry.duckdb``
    before, during and after the window, and the hub's slow-consumer disconnects of the
    registry."""
    import duckdb
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    files = sorted((hub / "rollups").rglob("*.parquet"))  # rollups/rollups/<day>/: see README
    db = duckdb.connect(str(hub / "registry.duckdb"), read_only=True)
    try:
        events: dict[str, dict[str, int]] = {}
        for phase, event, n in db.execute(
                "SELECT CASE WHEN epoch_ns(ts) < $start THEN 'before' WHEN epoch_ns(ts) <= $end"
                " THEN 'window' ELSE 'after' END, kind || ' -> ' || to_state, count(*)"
                " FROM rack_events GROUP BY ALL ORDER BY ALL",
                {"start": window_ns[0], "end": window_ns[1]}).fetchall():
            events.setdefault(phase, {})[event] = n
    finally:
        db.close()
    log = (hub / "nats-server.log").read_text(errors="replace")
    slow = sum(1 for line in log.splitlines()
               if "Slow Consumer" in line and "fluxrig-mixer-registry" in line)
    return {"rollup_files": len(files),
            "rollup_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
            "rack_events": events, "registry_slow_consumer": slow}


# --- report -------------------------------------------------------------------------------

def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bar: figure, bar, ratio figure/bar, met (None: no figure, not met)."""
    cpu, lag = res["cpu"], res["lag"]
    mixer_pct = sum(cpu[p]["mean_pct"] for p in ("registry", "nats-server", "supervisor"))
    out = [
        {"bar": "Mixer CPU, mean, % of one CPU (registry + nats-server + supervisor)",
         "figure": round(mixer_pct, 2), "limit": CPU_BAR},
        {"bar": "`mixer racks --json` wall ms, median (as a user runs it)",
         "figure": res["cli"]["racks_cli_ms"], "limit": RACKS_CLI_BAR},
        {"bar": "lag rise over the window, ms (fitted median lag)",
         "figure": lag.get("median_rise_ms"), "limit": LAG_RISE_BAR},
    ]
    for v in out:
        ok = v["figure"] is not None
        v["ratio"] = round(v["figure"] / v["limit"], 3) if ok else None
        v["met"] = ok and v["figure"] <= v["limit"]
    if res["cli"]["racks_cli_errors"]:
        out[1]["met"] = False  # a user's `mixer racks` got no answer
    offline = res["after"]["rack_events"].get("window", {}).get("state -> offline", 0)
    if lag["failed"] or lag.get("offline_seen") or offline \
            or res["after"]["registry_slow_consumer"]:
        out[2]["met"] = False  # unanswered, racks gone offline, snapshots lost: not keeping up
    return out


def _f(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(res: dict[str, Any]) -> None:
    """The tables."""
    cpu, lag, cli = res["cpu"], res["lag"], res["cli"]
    print(f"\nMixer fleet: {res['racks']} racks x {len(LAYOUT)} processes, 1 snapshot/s "
          f"each, hello every {HELLO_EVERY:.0f} s; window {res['window_s']:.0f} s "
          f"({lag['samples']} samples, {lag['failed']} failed); enrolled: {res['enrolled']} "
          f"({res['enrol_s']:.1f} s); all online {_f(res['all_online_s'], '.1f')} s after "
          f"start ({res['warmup_no_answer']} unanswered while waiting)")
    print(f"{'process':<14} {'CPU mean %':>10} {'CPU max %':>10} {'RSS MB start':>13} "
          f"{'RSS MB end':>11}")
    for name, c in cpu.items():
        print(f"{name:<14} {c['mean_pct']:10.2f} {c['max_pct']:10.2f} "
              f"{c['rss_mb_start']:13.1f} {c['rss_mb_end']:11.1f}")
    if lag["samples"]:
        print(f"lag send -> registry: median {lag['median_ms']:.2f} ms, p99 "
              f"{lag['p99_ms']:.2f} ms, max {lag['max_ms']:.2f} ms; per-sample median "
              f"{lag['sample_median_ms']['min']:.2f}-{lag['sample_median_ms']['max']:.2f} ms; "
              f"fitted slope: median {lag['median_slope_ms_per_min']:+.3f} ms/min, max "
              f"{lag['max_slope_ms_per_min']:+.3f} ms/min; behind at most "
              f"{lag['behind_max']} snapshot(s); offline seen {lag['offline_seen']}")
    else:
        print("lag: no sample answered")
    sim = res["simulator"]
    print(f"simulator: {sim['snapshots']} snapshots, {sim['hellos']} hellos, publish late "
          f"p99 {sim['late_p99_ms']:.1f} ms, max {sim['late_max_ms']:.1f} ms")
    print(f"{'request (median of ' + str(res['cli_runs']) + ')':<34} {'ms':>8} {'bytes':>9}")
    print(f"{'fluxrig.mixer.racks in process':<34} {cli['racks_request_ms']:8.2f} "
          f"{cli['racks_request_bytes']:9d}")
    print(f"{'fluxrig.mixer.top in process':<34} {cli['top_request_ms']:8.2f} "
          f"{cli['top_request_bytes']:9d}")
    print(f"{'mixer racks --json':<34} {cli['racks_cli_ms']:8.1f}")
    print(f"{'mixer top --json':<34} {cli['top_cli_ms']:8.1f}")
    print(f"{'mixer version (CLI start floor)':<34} {cli['version_cli_ms']:8.1f}")
    after = res["after"]
    print(f"stop: {res['stop_s']:.2f} s (exit {res['stop_exit']}); rollups written: "
          f"{after['rollup_files']} file(s), {after['rollup_rows']} rows; registry restarts "
          f"{res['registry_restarts']}, disconnected as a slow consumer "
          f"{after['registry_slow_consumer']} time(s)")
    phases = {"before": "before the window", "window": "in the window",
              "after": "after the window"}
    print("rack events in registry.duckdb: " + "; ".join(
        f"{phases[phase]}: {events}" for phase, events in after["rack_events"].items()))
    for key in ("racks_request_errors", "top_request_errors", "racks_cli_errors",
                "top_cli_errors", "version_cli_errors"):
        if cli[key]:
            print(f"{key}: {len(cli[key])}, first: {cli[key][0]}")
    print(f"\n{'bar':<70} {'figure':>9} {'bar':>7} {'ratio':>7}  verdict")
    for v in res["bars"]:
        print(f"{v['bar']:<70} {_f(v['figure']):>9} {v['limit']:7g} "
              f"{_f(v['ratio'], '.3f'):>7}  {'PASS' if v['met'] else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--racks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=300.0, help="the measured window")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--cli-runs", type=int, default=10)
    ap.add_argument("--warmup-max", type=float, default=120.0,
                    help="s to wait for every rack online; then the window opens anyway")
    ap.add_argument("--offline-after", type=float, default=5.0,
                    help="registry.offline_after, s (the bar's runs: 5)")
    ap.add_argument("--no-enrol", dest="enrol", action="store_false",
                    help="enrol nothing: racks are registered when first heard")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true",
                    help="keep the hub dir (logs, registry.duckdb, rollups) and print its path")
    args = ap.parse_args()
    if args.racks > 10_000:
        ap.error("--racks: at most 10000 (rack ids are rack-NNNN)")
    tmp = Path(tempfile.mkdtemp(prefix="mixer-fleet-"))
    mp = None
    try:
        hub, enrol_s = make_hub(tmp, args.racks, args.enrol, args.offline_after)
        print(f"hub {hub}: {args.racks if args.enrol else 0} racks enrolled in "
              f"{enrol_s:.1f} s; starting the Mixer", flush=True)
        t = time.perf_counter()
        mp = MixerProcess(hub, timeout=120)
        start_s = time.perf_counter() - t
        res = asyncio.run(measure(hub, mp, args.racks, args.seconds, args.sample_every,
                                  args.cli_runs, args.warmup_max))
        res["registry_restarts"] = sum(p["restarts"] for p in mp.state()["processes"])
        t = time.perf_counter()
        code = mp.stop(timeout=300)
        res.update(stop_s=round(time.perf_counter() - t, 2), stop_exit=code)
        res["after"] = after_stop(hub, res["window_ns"])
    except BaseException:
        if mp is not None:
            print(mp.output()[-3000:], file=sys.stderr)
        raise
    finally:
        if mp is not None:
            mp.close()
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res.update(bench="mixer_fleet", racks=args.racks, processes_per_rack=len(LAYOUT),
               enrolled=args.enrol, enrol_s=round(enrol_s, 2),
               offline_after=args.offline_after, start_s=round(start_s, 2),
               cli_runs=args.cli_runs, sample_every=args.sample_every,
               machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    res["bars"] = verdicts(res)
    print_report(res)
    ok = all(v["met"] for v in res["bars"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
