"""The rack's Prometheus metrics: names, types, labels and the latency histogram.

Theory of operation
-------------------
This module turns one sample of a rack (every process's counters, ring fill, CPU, RSS and
gear stats, taken by ``engine.telemetry``) into Prometheus metric families. It is sans-I/O:
no sockets, no asyncio, no clock; the telemetry process hands it samples and serves what it
renders (``engine.metrics_http``). ``docs/metrics.md`` lists every metric.

Conventions (https://prometheus.io/docs/practices/naming/):

* every name starts with ``fluxrig_``, carries its unit once, as a suffix (``_seconds``,
  ``_bytes``, ``_ratio``), and counters end in ``_total`` (gauges never do);
* every series carries ``rack`` and the rack's configured labels (``rack.labels``), then
  ``process`` and ``role``, then the gear stat's own labels. A rack label whose name fluxrig
  uses itself (``role``, ``de39``...) is exported as ``rack_<name>``; characters Prometheus
  does not allow in a label name become ``_``; a gear stat label named like one of ours
  becomes ``gear_<name>``;
* latency is a real histogram (``_bucket{le}``, ``_sum``, ``_count``) built from the
  counters' log-linear buckets (``engine.counters``). The ``le`` bounds are exact bucket
  edges, so every cumulative count is exact; ``_sum`` is estimated from the buckets'
  midpoints (the counters keep no sum), within 6.25% of the true sum.

The same ``le`` bounds in every process and rack make ``sum by (le) (rate(..._bucket))``
meaningful across processes and racks, which the percentile gauges exported before were not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from engine.counters import (
    HIST_BUCKETS,
    CountersSnapshot,
    StatDef,
    bucket_bounds,
    bucket_index,
)

log = logging.getLogger("fluxrig.metrics")

PREFIX = "fluxrig_"

#: labels fluxrig puts on series itself; a rack label of the same name becomes rack_<name>
OWN_LABELS = frozenset({"rack", "process", "role", "le"})

#: latency targets (ns), 1-2-5 from 10 us to 10 s; each is snapped to its bucket's edge
_TARGETS_NS = tuple(m * 10 ** e for e in range(4, 10) for m in (1, 2, 5)) + (10 ** 10,)


def _edge(target_ns: int) -> int:
    # the inclusive upper bound of the bucket holding the target: at most 12.5% above it,
    # and "<= le" then counts exactly the buckets up to this one
    return bucket_bounds(bucket_index(target_ns))[1]


#: the histogram's ``le`` bounds in ns: exact bucket edges (inclusive upper bounds)
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(_edge(t) for t in _TARGETS_NS)
_BOUND_INDEX = tuple(bucket_index(b) for b in LATENCY_BOUNDS_NS)
_LE = tuple(floatToGoString(b / 1e9) for b in LATENCY_BOUNDS_NS)
# twice each bucket's midpoint, in ns, so the sum estimate stays in integers
_MID2 = tuple(sum(bucket_bounds(i)) for i in range(HIST_BUCKETS))

_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class ProcessFigures(Protocol):
    """What this module reads of one process (``engine.telemetry.ProcessSample``)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def counters(self) -> CountersSnapshot | None: ...
    @property
    def ring_fill(self) -> float: ...
    @property
    def inputs(self) -> int: ...
    @property
    def cpu_times(self) -> float: ...
    @property
    def rss(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def stat_defs(self) -> tuple[StatDef, ...]: ...


def label_name(raw: str) -> str:
    """``raw`` as a valid Prometheus label name (invalid characters -> ``_``)."""
    name = _LABEL_BAD.sub("_", raw) or "_"
    return "_" + name if name[0].isdigit() else name


def stat_metric_name(d: StatDef) -> str:
    """Exported name of a gear stat: counter ``iso8583.answers`` ->
    ``fluxrig_iso8583_answers_total``, gauge ``iso8583.links_up`` ->
    ``fluxrig_iso8583_links_up``."""
    base = PREFIX + label_name(d.name.replace(".", "_")).strip("_")
    if d.kind == "counter":
        return base.removesuffix("_total") + "_total"
    return base


def rack_labels(rack_id: str, labels: Mapping[str, str],
                taken: Iterable[str] = ()) -> dict[str, str]:
    """The labels every series of the rack starts with: ``rack``, then the configured ones.

    Args:
        rack_id: the rack's id.
        labels: ``rack.labels`` from the rig file.
        taken: label names gear stats use; a rack label of that name (or of one of
            ``OWN_LABELS``) is exported as ``rack_<name>`` so neither hides the other.
    """
    reserved = OWN_LABELS | {label_name(t) for t in taken}
    out = {"rack": rack_id}
    for key, value in labels.items():
        name = label_name(key)
        if name in reserved or name.startswith("__"):  # __*: reserved by Prometheus
            name = "rack_" + name.lstrip("_")
        out[name] = value
    return out


def latency_buckets(histogram: Sequence[int]) -> tuple[list[tuple[str, int]], int, float]:
    """Cumulative ``(le, count)`` pairs (ending with ``+Inf``), the count and the estimated
    sum in seconds, from one process's log-linear bucket counts."""
    cumulative = []
    running = 0
    start = 0
    for le, index in zip(_LE, _BOUND_INDEX, strict=True):
        running += sum(int(c) for c in histogram[start:index + 1])
        cumulative.append((le, running))
        start = index + 1
    total = running + sum(int(c) for c in histogram[start:])
    cumulative.append(("+Inf", total))
    twice_ns = sum(int(c) * m for c, m in zip(histogram, _MID2) if c)
    return cumulative, total, twice_ns / 2e9


class _Families:
    """Metric families by name, in first-seen order; a name keeps its first type."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}
        self.refused: set[str] = set()

    def get(self, name: str, typ: str, doc: str, unit: str = "") -> Metric | None:
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = Metric(name, doc, typ, unit)
        elif family.type != typ:
            self.refused.add(name)
            return None
        return family


def _process_families(out: _Families, p: ProcessFigures, base: dict[str, str]) -> None:
    labels = {**base, "process": p.name, "role": p.role}
    if p.pid is not None and p.rss > 0:  # 0: the process is gone (between restarts)
        _add(out, "fluxrig_process_cpu_seconds", "counter", "seconds",
             "CPU time (user + system) of the process", labels, p.cpu_times)
        _add(out, "fluxrig_process_resident_memory_bytes", "gauge", "bytes",
             "resident memory of the process", labels, p.rss)
    _add(out, "fluxrig_process_restarts", "counter", "",
         "times the supervisor re-forked the process", labels, p.restarts)
    if p.inputs:
        _add(out, "fluxrig_ring_fill_ratio", "gauge", "ratio",
             "fill of the process's fullest input ring, 0..1", labels, p.ring_fill)
    c = p.counters
    if c is None:
        return
    for name, unit, doc, value in (
        ("fluxrig_frames_in", "", "frames taken from the process's inputs", c.frames_in),
        ("fluxrig_frames_out", "", "frames the process emitted", c.frames_out),
        ("fluxrig_errors", "", "frames or events the process could not handle", c.errors),
        ("fluxrig_in_bytes", "bytes", "encoded frame bytes taken", c.bytes_in),
        ("fluxrig_out_bytes", "bytes", "encoded frame bytes emitted", c.bytes_out),
        ("fluxrig_ring_full_waits", "", "waits on a full output ring", c.ring_full_waits),
        ("fluxrig_traces_kept", "", "transaction traces written to the signal tap",
         c.traces_kept),
        ("fluxrig_traces_dropped", "", "transaction traces dropped: tap ring full or over "
         "the keep-rule rate", c.traces_dropped),
        ("fluxrig_logs_dropped", "", "log records dropped: tap ring full", c.logs_dropped),
    ):
        _add(out, name, "counter", unit, doc, labels, value)
    hist = out.get("fluxrig_latency_seconds", "histogram",
                   "frame age (now - frame ts) when the process handled the frame; at "
                   "egress, creation to JetStream ack", "seconds")
    assert hist is not None  # the first histogram name: nothing can have taken it
    buckets, count, total_s = latency_buckets(list(c.histogram))
    for le, n in buckets:
        hist.add_sample("fluxrig_latency_seconds_bucket", {**labels, "le": le}, n)
    hist.add_sample("fluxrig_latency_seconds_count", labels, count)
    hist.add_sample("fluxrig_latency_seconds_sum", labels, total_s)
    if p.stat_defs and len(c.stats) == len(p.stat_defs):
        for d, value in zip(p.stat_defs, c.stats):
            name = stat_metric_name(d)
            typ = d.kind
            family = out.get(name.removesuffix("_total") if typ == "counter" else name,
                             typ, d.help)
            if family is not None:
                family.add_sample(name, {**labels, **_stat_labels(d)}, int(value))


def _stat_labels(d: StatDef) -> dict[str, str]:
    # a gear may not relabel the series: its "role" would hide the process's
    out = {}
    for key, value in d.labels:
        name = label_name(key)
        out["gear_" + name if name in OWN_LABELS or name.startswith("__") else name] = value
    return out


def _add(out: _Families, name: str, typ: str, unit: str, doc: str,
         labels: dict[str, str], value: float) -> None:
    family = out.get(name, typ, doc, unit)
    if family is not None:
        family.add_sample(name + "_total" if typ == "counter" else name, labels, value)


def _build(rack_id: str, labels: Mapping[str, str],
           processes: Sequence[ProcessFigures]) -> _Families:
    taken = {k for p in processes for d in p.stat_defs for k in _stat_labels(d)}
    base = rack_labels(rack_id, labels, taken)
    out = _Families()
    for p in processes:
        _process_families(out, p, base)
    return out


def families(rack_id: str, labels: Mapping[str, str],
             processes: Sequence[ProcessFigures]) -> list[Metric]:
    """Every metric family of one rack sample.

    Args:
        rack_id: the rack's id (label ``rack``).
        labels: ``rack.labels`` from the rig file.
        processes: the sample's processes.

    Returns:
        Families in first-seen order: process metrics, frame counters, latency, gear stats.
        A gear stat whose name a metric of another type already holds is left out
        (``RackCollector`` logs it once).
    """
    return list(_build(rack_id, labels, processes).by_name.values())


class RackCollector:
    """A ``prometheus_client`` collector of the latest sample, rendered once per sample.

    ``update`` swaps in a new sample; ``render`` encodes it for a scrape (cached per sample
    and format, so the cost of a scrape does not grow with how often it is scraped).
    Everything runs in the telemetry process's event loop: no locks.
    """

    def __init__(self, rack_id: str, labels: Mapping[str, str]):
        self.rack_id = rack_id
        self.labels = dict(labels)
        self._processes: Sequence[ProcessFigures] = ()
        self._cache: dict[str, tuple[bytes, str]] = {}
        self._warned: set[str] = set()

    def update(self, processes: Sequence[ProcessFigures]) -> None:
        """Take a new sample (its processes); the next scrape renders it."""
        self._processes = processes
        self._cache.clear()

    def collect(self) -> Iterator[Metric]:
        """The families of the latest sample (``prometheus_client`` collector protocol)."""
        built = _build(self.rack_id, self.labels, self._processes)
        for name in sorted(built.refused - self._warned):
            self._warned.add(name)
            log.warning("gear stat not exported, a metric of another type has its name: "
                        "metric=%s", name)
        yield from built.by_name.values()

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for a request's ``Accept`` header: (body, content type);
        OpenMetrics when asked for, the Prometheus text format otherwise."""
        encoder, content_type = choose_encoder(accept)
        cached = self._cache.get(content_type)
        if cached is None:
            cached = self._cache[content_type] = (encoder(self), content_type)
        return cached
