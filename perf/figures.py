"""The figures ``scripts/bench`` keeps from each bench's JSON, and which of them it gates.

Theory of operation
-------------------
Every ``perf/<name>_bench.py`` writes its own JSON shape. One extractor per bench turns that
into a flat list of ``Figure``\\ s. Two kinds:

* **gated** figures are ratios measured inside one run of one bench — ours against the rival
  or baseline that bench runs beside us (cbor2, mp.Queue, nats-py, the asyncio switch), on
  the same machine at the same time. They are oriented so that *higher is better* and
  ``perf/compare.py`` checks them against a baseline file, within a noise band;
* **info** figures are absolute (µs/op, records/s, TPS, % CPU): shown in the table, the
  charts and the HTML, never compared, because they move with the machine.

``floor`` is the smallest band a gated figure ever gets (a fraction: 0.05 = 5%): a baseline
whose repeats happened to agree closely must not turn every jitter into a failure. Floors
are set from what each bench's figure was seen to do across runs on the 2-core dev VM (see
perf/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

# A parsed bench JSON: json.loads output, walked only through Doc below.
Json = object


class BenchFormatError(ValueError):
    """A bench's JSON lacks a key its extractor needs (names the file and key path)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """One number kept from one bench run.

    Attributes:
        bench: the bench's name (``cbor`` for ``perf/cbor_bench.py``).
        name: unique within the bench, stable across versions (baselines refer to it).
        value: the figure; for gated figures a ratio where higher is better.
        unit: ``x`` for ratios, else the unit of an info figure.
        gated: compared against a baseline by ``perf/compare.py``.
        floor: smallest relative band for a gated figure (0 for info figures).
        what: one line for people: what was divided by what.
    """

    bench: str
    name: str
    value: float
    unit: str
    gated: bool
    floor: float
    what: str


class Doc:
    """Read-only walk through a bench's JSON that names the key path when a key is missing."""

    __slots__ = ("_data", "_path", "_source")

    def __init__(self, data: Json, source: str, path: str = "") -> None:
        self._data = data
        self._source = source
        self._path = path

    def has(self, key: str | int) -> bool:
        """Whether ``key`` exists here and is not null."""
        data = self._data
        if isinstance(data, dict):
            return data.get(key) is not None
        if isinstance(data, list) and isinstance(key, int):
            return -len(data) <= key < len(data)
        return False

    def __getitem__(self, key: str | int) -> Doc:
        path = f"{self._path}.{key}" if isinstance(key, str) else f"{self._path}[{key}]"
        if not self.has(key):
            raise BenchFormatError(f"{self._source}: key {path.lstrip('.')}: expected a value, "
                                   f"found none")
        return Doc(self._data[key], self._source, path)  # type: ignore[index]

    def num(self) -> float:
        """This value as a float.

        Raises:
            BenchFormatError: it is not a number.
        """
        if isinstance(self._data, bool) or not isinstance(self._data, (int, float)):
            raise BenchFormatError(f"{self._source}: key {self._path.lstrip('.')}: expected a "
                                   f"number, got {type(self._data).__name__}")
        return float(self._data)

    def error(self, expected: str) -> BenchFormatError:
        """An error naming this file and key path and what was ``expected`` there."""
        return BenchFormatError(f"{self._source}: key {self._path.lstrip('.') or '(top)'}: "
                                f"expected {expected}")

    def text(self) -> str:
        """This value as a string (for names and labels)."""
        return str(self._data)

    def items(self) -> list[Doc]:
        """The elements of a list.

        Raises:
            BenchFormatError: it is not a list.
        """
        if not isinstance(self._data, list):
            raise BenchFormatError(f"{self._source}: key {self._path.lstrip('.')}: expected a "
                                   f"list, got {type(self._data).__name__}")
        return [Doc(v, self._source, f"{self._path}[{i}]") for i, v in enumerate(self._data)]


class _Out:
    """Collects one bench's figures."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.figures: list[Figure] = []

    def gate(self, name: str, value: float, floor: float, what: str) -> None:
        self.figures.append(Figure(bench=self.bench, name=name, value=value, unit="x",
                                   gated=True, floor=floor, what=what))

    def info(self, name: str, value: float, unit: str, what: str) -> None:
        self.figures.append(Figure(bench=self.bench, name=name, value=value, unit=unit,
                                   gated=False, floor=0.0, what=what))


def _cbor(doc: Doc, out: _Out) -> None:
    us = {r["operation"].text(): r["us_per_op"].num() for r in doc["results"].items()}

    def op(name: str) -> float:
        if name not in us:
            raise doc["results"].error(f"an operation {name!r}, found {sorted(us)}")
        return us[name]

    out.gate("dumps_vs_cbor2_canonical", op("cbor2.dumps canonical=True") / op("engine.cbor.dumps"),
             0.05, "cbor2 canonical µs/op / engine.cbor.dumps µs/op")
    out.gate("loads_vs_cbor2", op("cbor2.loads") / op("engine.cbor.loads"),
             0.05, "cbor2.loads µs/op / engine.cbor.loads µs/op")
    out.gate("strict_loads_vs_cbor2", op("cbor2.loads") / op("engine.cbor.loads strict=True"),
             0.05, "cbor2.loads µs/op / engine.cbor.loads(strict=True) µs/op")
    for name, value in us.items():
        out.info(f"us_per_op {name}", value, "µs/op", f"{name}, best round")


def _ring(doc: Doc, out: _Out) -> None:
    rates: dict[tuple[str, int], float] = {}
    for row in doc["throughput"].items():
        if row.has("records_per_s"):
            rates[(row["scenario"].text(), int(row["size"].num()))] = row["records_per_s"].num()
    for size in (64, 200, 4096):
        queue = rates.get(("mp.Queue per message", size))
        batched = rates.get(("ring batched", size))
        pipe = rates.get(("os.pipe len-prefixed x64", size))
        per_record = rates.get(("ring per-record", size))
        if batched and queue:
            # mp.Queue per message moves ~60k records/s and wobbles by tens of %: wide floor
            out.gate(f"batched_{size}_vs_queue", batched / queue, 0.20,
                     f"ring batched / mp.Queue per message, {size} B records/s")
        if batched and pipe:
            out.gate(f"batched_{size}_vs_pipe", batched / pipe, 0.15,
                     f"ring batched / os.pipe length-prefixed x64, {size} B records/s")
        if per_record and queue:
            out.gate(f"per_record_{size}_vs_queue", per_record / queue, 0.20,
                     f"ring per-record / mp.Queue per message, {size} B records/s")
        if batched:
            out.info(f"batched_{size}_records_per_s", batched, "rec/s",
                     f"ring batched, {size} B records")
    if doc.has("latency") and doc["latency"].has("p99_us"):
        lat = doc["latency"]
        out.info("doorbell_p50_us", lat["p50_us"].num(), "µs", "ring doorbell latency p50")
        out.info("doorbell_p99_us", lat["p99_us"].num(), "µs",
                 "ring doorbell latency p99 (the VM's wake-up dominates: not gated)")
    if doc.has("idle") and doc["idle"].has("cpu_percent"):
        out.info("idle_consumer_cpu_pct", doc["idle"]["cpu_percent"].num(), "%",
                 "idle consumer CPU, psutil")


def _egress(doc: Doc, out: _Out) -> None:
    out.gate("egress_vs_publish_async", doc["ratio"].num(), 0.10,
             "fluxrig egress frames/s / nats-py publish_async frames/s")
    out.info("egress_frames_per_s", doc["fluxrig_egress"]["frames_per_s"].num(), "frames/s",
             "fluxrig egress, acked by JetStream")
    out.info("publish_async_frames_per_s",
             doc["baseline_publish_async"]["frames_per_s"].num(), "frames/s",
             "nats-py publish_async, acked")


def _pipeline(doc: Doc, out: _Out) -> None:
    by_workers = {int(r["workers"].num()): r for r in doc["results"].items()}
    for workers, r in sorted(by_workers.items()):
        out.info(f"w{workers}_frames_per_s", r["frames_per_s"].num(), "frames/s",
                 f"whole rack, --workers {workers}")
        out.info(f"w{workers}_cpu_us_per_frame", r["cpu_us_per_frame"].num(), "µs/frame",
                 f"CPU of every rack process per frame, --workers {workers}")
    if 1 in by_workers and 2 in by_workers:
        # the rack has no rival: a second worker against the first is the in-run comparison
        out.gate("w2_vs_w1_frames_per_s", by_workers[2]["frames_per_s"].num()
                 / by_workers[1]["frames_per_s"].num(), 0.15,
                 "frames/s with --workers 2 / with --workers 1")
    if doc.has("idle"):
        out.info("idle_cpu_pct", doc["idle"]["cpu_pct_of_one_core"].num(), "%",
                 "idle rack, % of one CPU")


def _switch(doc: Doc, out: _Out) -> None:
    base, flux = doc["baseline"], doc["fluxrig"]
    out.gate("tps_vs_asyncio", doc["ratio"].num(), 0.10,
             "fluxrig max-rate TPS / asyncio + pyiso8583 TPS")
    out.gate("cpu_per_txn_vs_asyncio", base["cpu_us_per_txn"].num()
             / flux["cpu_us_per_txn"].num(), 0.10,
             "asyncio CPU µs/txn / fluxrig CPU µs/txn (all processes)")
    out.info("fluxrig_tps", flux["max"]["tps"].num(), "TPS", "fluxrig, max rate")
    out.info("asyncio_tps", base["max"]["tps"].num(), "TPS", "asyncio baseline, max rate")
    out.info("fluxrig_p99_ms_at_2000", flux["at_2000"]["p99_ms"].num(), "ms",
             "fluxrig p99 at 2,000 TPS offered")
    if doc.has("fluxrig_coatcheck"):
        coat = doc["fluxrig_coatcheck"]
        out.gate("coatcheck_tps_vs_plain", coat["max"]["tps"].num() / flux["max"]["tps"].num(),
                 0.10, "fluxrig + coat check TPS / plain fluxrig TPS")
    if doc.has("against") and doc["against"].has("ratios"):
        ratios = doc["against"]["ratios"]
        rev = doc["against"]["rev"].text()
        for label in ("plain", "coatcheck"):
            if ratios.has(label):
                out.gate(f"against_{label}_tps", ratios[label]["tps_ratio"].num(), 0.05,
                         f"this tree TPS / @{rev} TPS ({label})")
                out.gate(f"against_{label}_cpu", 1 / ratios[label]["cpu_ratio"].num(), 0.05,
                         f"@{rev} CPU µs/txn / this tree's ({label})")


def _idle(doc: Doc, out: _Out) -> None:
    mine = doc["this_tree"]
    out.info("idle_cpu_pct", mine["total_pct"].num(), "%", "idle switch rack, % of one CPU")
    for key in ("pss_mb", "rss_mb"):
        if mine.has(key):
            out.info(key, mine[key].num(), "MB", f"idle switch rack, {key[:3].upper()} summed "
                     f"over its processes")
    if doc.has("ratio") and doc["ratio"].num() > 0:
        out.gate("idle_cpu_vs_rev", 1 / doc["ratio"].num(), 0.25,
                 f"idle CPU @{doc['against'].text()} / this tree's")


def _generic(doc: Doc, out: _Out) -> None:
    # a bench without an extractor yet: its top-level "ratio", if any, is ours vs its rival
    if doc.has("ratio"):
        out.gate("ratio", doc["ratio"].num(), 0.10, "the bench's own top-level ratio")


EXTRACTORS: Mapping[str, Callable[[Doc, _Out], None]] = {
    "cbor": _cbor, "ring": _ring, "egress": _egress, "pipeline": _pipeline,
    "switch": _switch, "idle": _idle,
}


def extract(bench: str, raw: Json, source: str) -> list[Figure]:
    """The figures of one run of ``bench`` from its parsed JSON.

    Args:
        bench: bench name (``perf/<bench>_bench.py``).
        raw: the bench's JSON, parsed.
        source: where ``raw`` came from, for error messages.

    Raises:
        BenchFormatError: a key the extractor needs is missing or of the wrong type.
    """
    out = _Out(bench)
    EXTRACTORS.get(bench, _generic)(Doc(raw, source), out)
    return out.figures
