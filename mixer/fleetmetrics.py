"""The fleet's Prometheus exposition: every rack's latest snapshot as text, joined per scrape.

Theory of operation
-------------------
A rack's snapshot (``engine.telemetry.snapshot_message``) carries per-process *rows*, not
the samples ``engine.metrics.families`` reads: no latency histogram (only the interval's
p50/p99), no CPU seconds (only the interval's CPU %), no restart count, and gear stats
without their kind. An adapter feeding rows to ``families()`` would have to invent those,
so this module exports what the rows hold, under the rack's own names where the figure is
the same one (``fluxrig_frames_in_total``...: ``tests/test_mixer_fleet.py`` pins name, type,
unit and help against ``engine.metrics``) and with ``engine.metrics``' label rules
(``rack_labels``: ``rack``, then the *enrolled* labels, ``rack_<name>`` for a clash).

Cost: a family's samples must be contiguous and its ``# HELP``/``# TYPE`` must appear once
in a scrape, so a rack is rendered into one chunk per family (``RackPart``), once per new
snapshot or label change; a scrape only writes each family's header and joins the racks'
chunks. The sample lines are the same in the text format 0.0.4 and in OpenMetrics 1.0; only
the headers and the final ``# EOF`` differ. Sans-I/O: no clock (ages are computed from the
``now_ns`` passed in), no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter

from prometheus_client.exposition import choose_encoder

from engine.metrics import rack_labels
from mixer.fleetsnap import ProcessRow, Snapshot


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family.

    Attributes:
        name: the family name (a counter's without ``_total``), ending in its unit if any.
        type: ``counter`` or ``gauge``.
        unit: OpenMetrics unit (``bytes``, ``seconds``, ``ratio``) or "".
        help: one line, no backslash or newline.
    """

    name: str
    type: str
    unit: str
    help: str

    @property
    def sample(self) -> str:
        """The name its samples carry."""
        return self.name + "_total" if self.type == "counter" else self.name

    def header(self, openmetrics: bool) -> str:
        """``# HELP``/``# TYPE`` (and ``# UNIT`` in OpenMetrics) lines of the family."""
        name = self.name if openmetrics else self.sample
        unit = f"# UNIT {name} {self.unit}\n" if openmetrics and self.unit else ""
        return f"# HELP {name} {self.help}\n# TYPE {name} {self.type}\n{unit}"


# roles that read input rings: ring_fill means nothing for the others (the snapshot row does
# not say how many inputs a process has, engine.metrics exports the fill only with one)
_INPUT_ROLES = frozenset({"stage", "sink", "egress"})


def _rss(p: ProcessRow) -> int | None:
    return p.rss if p.pid is not None and p.rss else None  # 0: gone, between restarts


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


def _ratio(pct: float | None) -> float | None:
    return None if pct is None else pct / 100.0


#: per-process families and how each reads a row; the first eight are the rack's own
PROCESS_FAMILIES: tuple[tuple[Family, Callable[[ProcessRow], float | int | None]], ...] = (
    (Family("fluxrig_frames_in", "counter", "", "frames taken from the process's inputs"),
     attrgetter("frames_in")),
    (Family("fluxrig_frames_out", "counter", "", "frames the process emitted"),
     attrgetter("frames_out")),
    (Family("fluxrig_errors", "counter", "",
            "frames or events the process could not handle"), attrgetter("errors")),
    (Family("fluxrig_in_bytes", "counter", "bytes", "encoded frame bytes taken"),
     attrgetter("bytes_in")),
    (Family("fluxrig_out_bytes", "counter", "bytes", "encoded frame bytes emitted"),
     attrgetter("bytes_out")),
    (Family("fluxrig_ring_full_waits", "counter", "", "waits on a full output ring"),
     attrgetter("ring_full_waits")),
    (Family("fluxrig_process_resident_memory_bytes", "gauge", "bytes",
            "resident memory of the process"), _rss),
    (Family("fluxrig_ring_fill_ratio", "gauge", "ratio",
            "fill of the process's fullest input ring, 0..1"),
     lambda p: p.ring_fill if p.role in _INPUT_ROLES else None),
    (Family("fluxrig_process_cpu_ratio", "gauge", "ratio",
            "CPU used by the process over the rack's last telemetry interval (1 = one core)"),
     lambda p: _ratio(p.cpu_pct)),
    (Family("fluxrig_latency_p50_seconds", "gauge", "seconds",
            "median frame age over the rack's last telemetry interval"),
     lambda p: _seconds(p.p50_ns)),
    (Family("fluxrig_latency_p99_seconds", "gauge", "seconds",
            "99th percentile of frame age over the rack's last telemetry interval"),
     lambda p: _seconds(p.p99_ns)),
)

#: per-rack families (labels: the rack's only)
RACK_FAMILIES: tuple[tuple[Family, Callable[[Snapshot], float | int | None]], ...] = (
    (Family("fluxrig_host_cpu_ratio", "gauge", "ratio",
            "CPU used on the rack's host, all cores, 0..1"), lambda s: _ratio(s.host_cpu_pct)),
    (Family("fluxrig_host_memory_used_bytes", "gauge", "bytes",
            "memory used on the rack's host"), attrgetter("host_mem_used")),
    (Family("fluxrig_hub_backlog", "gauge", "",
            "frames stored on the rack and not yet at the hub"), attrgetter("hub_backlog")),
)

_PART_FAMILIES = tuple(f for f, _ in PROCESS_FAMILIES) + tuple(f for f, _ in RACK_FAMILIES)
_PROCESS_READS = tuple((f.sample, read) for f, read in PROCESS_FAMILIES)

AGE = Family("fluxrig_fleet_snapshot_age_seconds", "gauge", "seconds",
             "time since the hub received the rack's latest snapshot")
RACKS = Family("fluxrig_fleet_racks", "gauge", "", "racks by registry state")
DROPPED = Family("fluxrig_fleet_snapshots_dropped", "counter", "",
                 "stats snapshots the fleet refused, by reason")

#: every family a scrape can hold, in output order
FAMILIES: tuple[Family, ...] = _PART_FAMILIES + (AGE, RACKS, DROPPED)


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


@dataclass(frozen=True, slots=True)
class RackPart:
    """One rack's share of a scrape.

    Attributes:
        labels: the rack's label text (``rack="a",site="x"``), for series added per scrape.
        chunks: one text per family of ``_PART_FAMILIES`` (same order), "" when none.
    """

    labels: str
    chunks: tuple[bytes, ...]


def render_rack(snap: Snapshot, enrolled: Mapping[str, str]) -> RackPart:
    """Render one rack's snapshot; every series carries ``rack`` and the enrolled labels
    (never the labels the snapshot claims)."""
    base = _labels(rack_labels(snap.rack, enrolled).items())
    lines: list[list[str]] = [[] for _ in _PART_FAMILIES]
    # values are ints or finite floats (fleetsnap): str() of either is what Prometheus reads
    for p in snap.processes:
        labels = f'{{{base},process="{_escape(p.name)}",role="{_escape(p.role)}"}} '
        for out, (sample, read) in zip(lines, _PROCESS_READS):
            value = read(p)
            if value is not None:
                out.append(f"{sample}{labels}{value}\n")
    offset = len(PROCESS_FAMILIES)
    for i, (family, read_rack) in enumerate(RACK_FAMILIES):
        value = read_rack(snap)
        if value is not None:
            lines[offset + i].append(f"{family.sample}{{{base}}} {value}\n")
    return RackPart(base, tuple("".join(out).encode() for out in lines))


def content_type(accept: str) -> tuple[bool, str]:
    """(OpenMetrics?, content type) for a request's ``Accept`` header, negotiated as
    ``prometheus_client`` (and so ``engine.metrics``) does."""
    _, ctype = choose_encoder(accept)
    return ctype.startswith("application/openmetrics-text"), ctype


def expose(parts: Iterable[RackPart], ages: Iterable[tuple[str, float]],
           states: Mapping[str, int], dropped: Mapping[str, int],
           openmetrics: bool) -> bytes:
    """Join racks' parts into one exposition, each family's header once.

    Args:
        parts: every rack's rendered part.
        ages: (rack label text, seconds) per rack.
        states: racks per registry state (no family when empty).
        dropped: refused snapshots per reason (no family when empty).
        openmetrics: OpenMetrics 1.0 (else the text format 0.0.4).
    """
    parts = list(parts)
    out: list[bytes] = []
    for i, family in enumerate(_PART_FAMILIES):
        chunks = [p.chunks[i] for p in parts if p.chunks[i]]
        if chunks:
            out.append(family.header(openmetrics).encode())
            out += chunks
    fleet = (
        (AGE, [f"{AGE.sample}{{{labels}}} {age!r}\n" for labels, age in ages]),
        (RACKS, [f'{RACKS.sample}{{state="{_escape(s)}"}} {n}\n'
                 for s, n in sorted(states.items())]),
        (DROPPED, [f'{DROPPED.sample}{{reason="{_escape(r)}"}} {n}\n'
                   for r, n in sorted(dropped.items())]),
    )
    for family, lines in fleet:
        if lines:
            out.append(family.header(openmetrics).encode())
            out.append("".join(lines).encode())
    if openmetrics:
        out.append(b"# EOF\n")
    return b"".join(out)
