"""Telemetry: sample every process's counters, derive rates and percentiles, export them.

Theory of operation
-------------------
The sampling core is sans-I/O and shared with ``engine status``: ``RackProbe`` maps the
segments named in the supervisor's state file and ``probe.sample()`` returns a ``RackSample``
(frozen copies); ``rows(prev, cur)`` turns two samples into per-process figures (rates over the
interval, latency percentiles of the frames seen *in* the interval, ring fill, CPU, RSS).

The telemetry process (``run_telemetry``) wraps that core in an asyncio loop that, every
``telemetry.interval``:

* publishes a deterministic-CBOR snapshot on ``fluxrig.stats.<rack>`` (core NATS, fire and
  forget: telemetry must never wait on, or slow, the data path);
* hands the sample to the Prometheus collector (``engine.metrics``) that the scrape endpoint
  (``engine.metrics_http``, on the socket the supervisor bound) renders.

Prometheus export goes through a ``prometheus_client`` custom collector, not the
OpenTelemetry SDK: the SDK's Prometheus exporter cannot export our cumulative bucket counts
as a histogram (it would need every observation replayed), adds ``otel_scope_*`` labels to
every series and a unit suffix to names that already hold one.

The signal tap (``tap_loop``): every ``TAP_POLL`` the process's tap rings are read
(``engine.traceexport``); spans go out as OTLP on ``fluxrig.traces.<rack>`` and, with
``telemetry.otlp``, to a collector; log records as JSON lines on ``fluxrig.logs.<rack>``. The
OpenTelemetry SDK is imported here, in this process only, after the fork: its threads and
locks do not survive ``fork`` (opentelemetry-python #2767, #3885).

Readers never write to the counters; the data path never waits for telemetry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg

from engine.bus import close_quietly, connect
from engine.cbor import dumps
from engine.counters import Counters, CountersSnapshot, StatDef, percentiles
from engine.hublink import LinkWatch
from engine.logutil import RateLimitedLog
from engine.metrics import RackCollector
from engine.metrics_http import MetricsEndpoint
from engine.plan import STATE_FILE, ProcessSpec, Runtime, TelemetryPlan, signal_ready
from engine.ring import Ring
from engine.streams import HUB_CONSUMER
from engine.tap import logs_subject, traces_subject

log = logging.getLogger("fluxrig.telemetry")
RATELOG = RateLimitedLog(log)


def read_state(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The supervisor's state file (``<data_dir>/state.json``).

    Raises:
        FileNotFoundError: no rack is running on that data dir.
    """
    with open(Path(data_dir) / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessSample:
    """One process at one instant."""

    name: str
    role: str
    pid: int | None
    cpu: int | None
    counters: CountersSnapshot | None
    ring_fill: float  # highest fill of its input rings
    cpu_times: float  # user + system seconds
    rss: int
    stat_defs: tuple[StatDef, ...] = ()  # the gear's named stats, values in counters.stats
    inputs: int = 0  # input rings (ring_fill means nothing without one)
    restarts: int = 0  # times the supervisor re-forked it


@dataclass(frozen=True, slots=True, kw_only=True)
class RackSample:
    """Every process of a rack at one instant (monotonic ``t`` in seconds)."""

    t: float
    processes: tuple[ProcessSample, ...]
    host_cpu: float
    host_mem_used: int


class RackProbe:
    """Maps a running rack's segments (from its state) and samples them."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self._counters: dict[str, Counters] = {}
        self._rings: dict[str, Ring] = {}
        self._defs: dict[str, tuple[StatDef, ...]] = {}
        for p in state["processes"]:
            self._defs[p["name"]] = tuple(StatDef.from_json(d) for d in p.get("stats") or ())
            if p.get("counters"):
                try:
                    self._counters[p["name"]] = Counters.attach(p["counters"])
                except (FileNotFoundError, ValueError):
                    pass
            for ring in p.get("inputs", []):
                if ring not in self._rings:
                    try:
                        self._rings[ring] = Ring.attach(ring)
                    except (FileNotFoundError, ValueError):
                        pass
        self._ps: dict[int, psutil.Process] = {}

    def _proc(self, pid: int | None) -> psutil.Process | None:
        if pid is None:
            return None
        ps = self._ps.get(pid)
        if ps is None:
            try:
                ps = self._ps[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return ps

    def sample(self) -> RackSample:
        """Snapshot every process now."""
        out = []
        for p in self.state["processes"]:
            fills = [self._rings[r].statistics().fill for r in p.get("inputs", [])
                     if r in self._rings]
            ps = self._proc(p.get("pid"))
            cpu_t, rss = 0.0, 0
            if ps is not None:
                try:
                    with ps.oneshot():
                        t = ps.cpu_times()
                        cpu_t, rss = t.user + t.system, ps.memory_info().rss
                except psutil.Error:
                    pass
            c = self._counters.get(p["name"])
            out.append(ProcessSample(
                name=p["name"], role=p["role"], pid=p.get("pid"), cpu=p.get("cpu"),
                counters=c.snapshot() if c else None,
                ring_fill=max(fills, default=0.0), cpu_times=cpu_t, rss=rss,
                stat_defs=self._defs.get(p["name"], ()),
                inputs=len(p.get("inputs") or ()), restarts=int(p.get("restarts") or 0),
            ))
        return RackSample(t=time.monotonic(), processes=tuple(out),
                          host_cpu=psutil.cpu_percent(None),
                          host_mem_used=psutil.virtual_memory().used)

    def close(self) -> None:
        """Unmap everything."""
        for c in self._counters.values():
            c.close()
        for r in self._rings.values():
            r.close()


def rows(prev: RackSample | None, cur: RackSample) -> list[dict[str, Any]]:
    """Per-process figures between two samples (totals only when ``prev`` is None).

    Latency percentiles cover the frames recorded in the interval; with no new frames they
    fall back to everything since start.
    """
    before = {p.name: p for p in prev.processes} if prev else {}
    dt = (cur.t - prev.t) if prev else 0.0
    out = []
    for p in cur.processes:
        b = before.get(p.name)
        row: dict[str, Any] = {
            "name": p.name, "role": p.role, "pid": p.pid, "cpu": p.cpu, "rss": p.rss,
            "ring_fill": round(p.ring_fill, 4),
        }
        c = p.counters
        if c is not None:
            row.update(frames_in=c.frames_in, frames_out=c.frames_out, errors=c.errors,
                       bytes_in=c.bytes_in, bytes_out=c.bytes_out,
                       ring_full_waits=c.ring_full_waits)
            if c.traces_kept or c.traces_dropped or c.logs_dropped:
                row.update(traces_kept=c.traces_kept, traces_dropped=c.traces_dropped,
                           logs_dropped=c.logs_dropped)
            hist = c.histogram
            if b is not None and b.counters is not None and b.pid == p.pid:
                delta = hist - b.counters.histogram
                if delta.sum() > 0:
                    hist = delta
            p50, p99 = percentiles(hist, (0.5, 0.99))
            row.update(p50_ns=p50, p99_ns=p99)
            if p.stat_defs and len(c.stats) == len(p.stat_defs):
                # gauges always (0 links up matters), counters once they moved
                row["stats"] = {d.key: int(v) for d, v in zip(p.stat_defs, c.stats)
                                if v or d.kind == "gauge"}
        if b is not None and dt > 0:
            row["cpu_pct"] = round(100.0 * max(0.0, p.cpu_times - b.cpu_times) / dt, 2)
            if c is not None and b.counters is not None:
                row["in_per_s"] = round(max(0, c.frames_in - b.counters.frames_in) / dt, 1)
                row["out_per_s"] = round(max(0, c.frames_out - b.counters.frames_out) / dt, 1)
        out.append(row)
    return out


def snapshot_message(rack_id: str, labels: dict[str, str], sample: RackSample,
                     table: list[dict[str, Any]], hub: dict[str, Any] | None = None) -> bytes:
    """The CBOR snapshot published on ``fluxrig.stats.<rack>``; a rack linked to a Mixer
    adds ``hub``: ``hub_backlog`` (events stored here, not yet at the hub) and ``link``."""
    return dumps({
        "rack": rack_id,
        "ts": time.time_ns(),
        "labels": labels,
        "host": {"cpu_pct": sample.host_cpu, "mem_used": sample.host_mem_used},
        "processes": [{k: v for k, v in r.items() if v is not None} for r in table],
        **(hub or {}),
    })


async def hub_figures(nc: Client, link: LinkWatch,
                      streams: list[str]) -> dict[str, Any]:
    """A linked rack's ``hub_backlog`` (the ``hub`` consumers' pending and unacked
    events: their ack floor is what the hub stored), ``hub_budget_ratio`` (the fullest hub
    stream's bytes over its ``max_bytes``; None without a budget) and ``link`` state."""
    backlog: int | None = 0
    ratio: float | None = None
    js = nc.jetstream(timeout=1.0)
    for stream in streams:
        try:
            info = await js.consumer_info(stream, HUB_CONSUMER)
            sinfo = await js.stream_info(stream)
        except Exception:  # not made yet (egress starting): unknown, not zero
            backlog = None
            break
        assert backlog is not None
        backlog += (info.num_pending or 0) + (info.num_ack_pending or 0)
        if sinfo.config.max_bytes and sinfo.config.max_bytes > 0:
            ratio = max(ratio or 0.0, sinfo.state.bytes / sinfo.config.max_bytes)
    state = link.state()
    if ratio is not None and ratio >= BUDGET_WARN:
        RATELOG.warning("budget", "hub streams at %.0f%% of their budget: the hub has not "
                        "taken them (link: %s)", ratio * 100, state)
    return {"hub_backlog": backlog, "hub_budget_ratio": ratio, "link": state}


HELLO_EVERY = 10.0  # seconds between hellos to the hub of a linked rack
TAP_POLL = 0.25  # seconds between polls of the processes' tap rings
BUDGET_WARN = 0.8  # a hub stream this full of events the hub has not taken: warn


async def tap_loop(rt: Runtime, cfg: TelemetryPlan, nc: Client | None,
                   stopping: asyncio.Event) -> None:
    """Poll every tap ring; spans go out as OTLP on ``fluxrig.traces.<rack>`` (and to the
    configured collector), log records as JSON lines on ``fluxrig.logs.<rack>``."""
    from engine.traceexport import (  # the OTel SDK: in this process only, after the fork
        MAX_TRACES_PER_MESSAGE,
        LogShipper,
        OtlpEncoder,
        OtlpSender,
        Resources,
        SpanFactory,
        TapReader,
        span_batch,
    )

    resources = Resources(rt.rack_id, cfg.labels)
    encoder, factory = OtlpEncoder(resources), SpanFactory(resources)
    shipper = LogShipper(rt.rack_id, rt.logs)
    sender = OtlpSender(cfg.otlp) if cfg.otlp is not None else None
    traces_subj, logs_subj = traces_subject(rt.rack_id), logs_subject(rt.rack_id)
    reader = None
    state_mtime = 0.0
    report_at = time.monotonic() + 60.0
    last = False
    try:
        while not last:
            last = stopping.is_set()  # one more poll after the stop: what the drain logged
            try:
                mtime = os.stat(Path(rt.data_dir) / STATE_FILE).st_mtime
                if reader is None or mtime != state_mtime:
                    if reader is not None:
                        reader.close()
                    state = read_state(rt.data_dir)
                    reader = TapReader([*state["processes"],
                                        {"name": "supervisor", "tap": state.get("tap")}])
                    state_mtime = mtime
                got = reader.poll()
                if got.bad:
                    RATELOG.warning("tapbad", "undecodable tap records skipped: count=%d",
                                    got.bad)
                connected = nc is not None and nc.is_connected
                for i in range(0, len(got.traces), MAX_TRACES_PER_MESSAGE):
                    chunk = got.traces[i:i + MAX_TRACES_PER_MESSAGE]
                    data, n, bad = encoder.request(chunk)
                    if bad:
                        RATELOG.warning("spanbad", "malformed trace records skipped: count=%d",
                                        bad)
                    if n and connected:
                        await nc.publish(traces_subj, data)  # type: ignore[union-attr]
                    if n and sender is not None:
                        sender.submit(span_batch(factory, chunk)[0])
                if got.logs or shipper.dropped:
                    data = shipper.lines(got.logs, time.time())
                    if data and connected:
                        await nc.publish(logs_subj, data)  # type: ignore[union-attr]
                if sender is not None and time.monotonic() >= report_at:
                    report_at = time.monotonic() + 60.0
                    line = sender.report()
                    if line:
                        log.warning("%s", line)
            except Exception as exc:  # the tap is best effort; the loop must live
                RATELOG.warning("tap", "tap export failed: error=%r", exc)
            if not last:
                try:
                    await asyncio.wait_for(stopping.wait(), TAP_POLL)
                except TimeoutError:
                    pass
        if nc is not None and nc.is_connected:
            await nc.flush(timeout=2)
    finally:
        if reader is not None:
            reader.close()
        if sender is not None:
            await asyncio.to_thread(sender.close)
            line = sender.report()
            if line:
                log.warning("%s", line)


def run_telemetry(spec: ProcessSpec, rt: Runtime) -> None:
    """Process body of the telemetry process."""
    asyncio.run(_telemetry_main(spec, rt))


async def _telemetry_main(spec: ProcessSpec, rt: Runtime) -> None:
    cfg = spec.extra
    assert isinstance(cfg, TelemetryPlan)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    collector = RackCollector(rt.rack_id, cfg.labels)
    endpoint = None
    if spec.listeners:  # the supervisor bound telemetry.prometheus for us
        endpoint = MetricsEndpoint(spec.listeners[0], collector.render)
        await endpoint.start()
    nc = None
    try:
        nc = await connect(rt.nats_url, spec.bus_auth, f"fluxrig-telemetry-{rt.rack_id}",
                           max_reconnect_attempts=-1, reconnect_time_wait=1)
    except Exception as exc:  # stats are best effort; the rack runs without them
        log.warning("telemetry cannot reach nats: error=%r", exc)
    latest: list[dict[str, Any]] = []  # the last sample's table, for ``mixer rack status``
    watch = LinkWatch(Path(rt.data_dir))
    if cfg.hello is not None and nc is not None:
        async def answer_status(msg: Msg) -> None:
            state = read_state(rt.data_dir)
            state["hub_link"] = watch.state()
            streams = {}  # what each hub stream holds still (`mixer audit verify`'s gaps)
            js = nc.jetstream(timeout=1.0)
            for name in cfg.hub_streams:
                try:
                    st = (await js.stream_info(name)).state
                    streams[name] = [st.first_seq, st.last_seq]
                except Exception:
                    pass
            await msg.respond(orjson.dumps({"state": state, "processes": latest,
                                            "streams": streams}))

        # asked by the hub over the leaf link; the answer goes to fluxrig.up.<r>.reply.*
        await nc.subscribe(f"fluxrig.down.{rt.rack_id}.req.status", cb=answer_status)
    tap_task = None
    if rt.traces.enabled or rt.logs.enabled:
        tap_task = asyncio.create_task(tap_loop(rt, cfg, nc, stopping))
    signal_ready(rt, spec.name)
    prev = None
    probe = None
    state_mtime = 0.0
    hello_at = 0.0
    link = ""
    while not stopping.is_set():
        if cfg.hello is not None and nc is not None and nc.is_connected \
                and time.monotonic() >= hello_at:
            # again every HELLO_EVERY: a hello sent while the leaf link was down is lost
            try:
                await nc.publish(f"fluxrig.up.{rt.rack_id}.hello", dumps(cfg.hello))
                hello_at = time.monotonic() + HELLO_EVERY
            except Exception as exc:
                log.warning("telemetry hello failed: error=%r", exc)
        try:
            mtime = os.stat(Path(rt.data_dir) / STATE_FILE).st_mtime
            if probe is None or mtime != state_mtime:
                if probe is not None:
                    probe.close()
                probe, state_mtime, prev = RackProbe(read_state(rt.data_dir)), mtime, None
            cur = probe.sample()
            table = rows(prev, cur)
            latest[:] = table
            prev = cur
            collector.update(cur.processes)
            if nc is not None and nc.is_connected:
                hub = None
                if cfg.hello is not None:
                    hub = await hub_figures(nc, watch, list(cfg.hub_streams))
                    if hub["link"] == "up" and link != "up":
                        hello_at = 0.0  # the link came (back) up: say hello at once
                    link = hub["link"]
                await nc.publish(cfg.subject,
                                 snapshot_message(rt.rack_id, cfg.labels, cur, table, hub))
        except Exception as exc:
            log.warning("telemetry sample failed: error=%r", exc)
        try:
            await asyncio.wait_for(stopping.wait(), cfg.interval)
        except TimeoutError:
            pass
    if tap_task is not None:
        try:
            await asyncio.wait_for(tap_task, 10)
        except Exception as exc:
            log.warning("tap export did not finish: error=%r", exc)
    if endpoint is not None:
        await endpoint.close()
    await close_quietly(nc)
    if probe is not None:
        probe.close()
