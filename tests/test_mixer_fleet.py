"""The fleet core (``mixer/fleet.py``, ``fleetsnap``, ``fleetmetrics``, ``fleetrollup``): real
snapshots from ``engine.telemetry.snapshot_message`` in, a Prometheus scrape, Parquet rollups
read back by DuckDB and the ``mixer top`` table out."""

from __future__ import annotations

import re
import time
from collections import Counter

import duckdb
import numpy as np
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from engine.cbor import dumps, loads
from engine.counters import HIST_BUCKETS, CountersSnapshot, bucket_index
from engine.metrics import families
from engine.telemetry import ProcessSample, RackSample, rows, snapshot_message
from mixer.fleet import Fleet, write_parquet
from mixer.fleetmetrics import AGE, DROPPED, PROCESS_FAMILIES, RACKS
from mixer.fleetsnap import MAX_PROCESSES

T0 = 1_767_225_600 * 10**9  # 2026-01-01 00:00:00 UTC
S = 10**9
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
FLEET_WIDE = {RACKS.name, DROPPED.sample, DROPPED.name}  # series without a rack


def _counters(n: int, latency_ns: int) -> CountersSnapshot:
    hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
    hist[bucket_index(latency_ns)] = n
    return CountersSnapshot(frames_in=n, frames_out=n, errors=n // 100, bytes_in=100 * n,
                            bytes_out=90 * n, ring_full_waits=1, histogram=hist)


_LAYOUT = (("payments.switch", "source", 0), ("payments.switch.1", "source", 0),
           ("egress", "egress", 1), ("telemetry", "telemetry", 0))


def _sample(t: float, n: int, layout=_LAYOUT) -> RackSample:
    procs = []
    for i, (name, role, inputs) in enumerate(layout):
        procs.append(ProcessSample(
            name=name, role=role, pid=1000 + i, cpu=None,
            counters=None if role == "telemetry" else _counters(n * (i + 1), 2_000_000),
            ring_fill=0.25 if inputs else 0.0, cpu_times=t / 2, rss=(64 + i) << 20,
            inputs=inputs))
    return RackSample(t=t, processes=tuple(procs), host_cpu=37.5, host_mem_used=3 << 30)


def snapshot(rack: str, labels: dict[str, str] | None = None, n: int = 1000,
             layout=_LAYOUT, **extra) -> bytes:
    """A real snapshot of ``rack``: two samples 1 s apart, so rates and CPU % are there."""
    prev, cur = _sample(10.0, n, layout), _sample(11.0, 2 * n, layout)
    payload = snapshot_message(rack, labels or {}, cur, rows(prev, cur))
    if extra:  # figures the rack does not send yet (hub_backlog: build step 5)
        payload = dumps({**loads(payload), **extra})
    return payload


def _fleet(*racks: str) -> Fleet:
    fleet = Fleet()
    for rack in racks:
        fleet.set_labels(rack, {"site": "lab", "role": "payments"})
        assert fleet.observe(f"fluxrig.stats.{rack}", snapshot(rack), T0)
    return fleet


# --- observe ------------------------------------------------------------------------------

def test_observe_keeps_the_latest_snapshot_with_the_rows_figures():
    fleet = Fleet()
    assert fleet.observe("fluxrig.stats.r1", snapshot("r1", n=10, hub_backlog=7), T0)
    assert fleet.observe("fluxrig.stats.r1", snapshot("r1", n=1000, hub_backlog=3), T0 + S)
    snap = fleet.latest("r1")
    assert snap is not None and snap.received_ns == T0 + S and snap.hub_backlog == 3
    egress = {p.name: p for p in snap.processes}["egress"]
    # counters are the second sample's, rates are over the 1 s between the two samples
    assert (egress.frames_in, egress.errors, egress.bytes_out) == (6000, 60, 540_000)
    assert egress.in_per_s == 3000.0 and egress.cpu_pct == 50.0
    assert egress.ring_fill == 0.25 and egress.rss == 66 << 20
    assert 2_000_000 <= egress.p99_ns <= 2_250_000  # within the log-linear bucket
    assert {p.name: p.frames_in for p in snap.processes}["telemetry"] is None
    assert fleet.dropped == {}


def _good_row() -> dict:
    return {"name": "p", "role": "source"}


@pytest.mark.parametrize("subject, payload, reason", [
    ("fluxrig.stats.r1", snapshot("r2"), "rack_mismatch"),  # forged: another rack's name
    ("fluxrig.stats.r2.x", snapshot("r2"), "subject"),
    ("fluxrig.other.r1", snapshot("r1"), "subject"),
    ("fluxrig.stats.", snapshot("r1"), "subject"),
    ("fluxrig.stats.r1", b"\xff\x00garbage", "undecodable"),
    ("fluxrig.stats.r1", b"", "undecodable"),
    ("fluxrig.stats.r1", dumps([1, 2]), "not_a_map"),
    ("fluxrig.stats.r1", dumps({"rack": "r1"}), "incomplete"),
    ("fluxrig.stats.r1", dumps({"processes": []}), "incomplete"),
    ("fluxrig.stats.r1", dumps({"rack": 1, "processes": []}), "incomplete"),
    ("fluxrig.stats.r1", dumps({"rack": "r1", "processes": {}}), "incomplete"),
    ("fluxrig.stats.r1", dumps({"rack": "r1", "processes": [1]}), "malformed"),
    ("fluxrig.stats.r1", dumps({"rack": "r1", "processes": [{"name": "p"}]}), "malformed"),
    ("fluxrig.stats.r1", dumps({"rack": "r1", "processes": [_good_row(), _good_row()]}),
     "malformed"),
    ("fluxrig.stats.r1", dumps({"rack": "r1", "processes": [
        {"name": f"p{i}", "role": "stage"} for i in range(MAX_PROCESSES + 1)]}), "malformed"),
])
def test_a_refused_snapshot_is_counted_by_reason_and_keeps_the_previous(subject, payload,
                                                                        reason):
    fleet = _fleet("r1")
    before = fleet.latest("r1")
    assert fleet.observe(subject, payload, T0 + S) is False
    assert fleet.dropped == {reason: 1}
    assert fleet.latest("r1") is before and fleet.latest("r2") is None
    body, _ = fleet.render("", T0 + S)
    assert f'fluxrig_fleet_snapshots_dropped_total{{reason="{reason}"}} 1' in body.decode()


def test_junk_figures_are_left_out_and_the_scrape_still_parses():
    doc = loads(snapshot("r1"))
    doc["processes"][2].update(frames_in="many", cpu_pct=float("nan"), errors=-1,
                               rss=True, p99_ns=1.5)
    doc["host"] = "not a map"
    fleet = Fleet()
    assert fleet.observe("fluxrig.stats.r1", dumps(doc), T0)
    egress = fleet.latest("r1").processes[2]
    assert (egress.frames_in, egress.cpu_pct, egress.errors, egress.rss, egress.p99_ns) == \
        (None, None, None, None, None)
    body, _ = fleet.render("", T0)
    names = {s.name for f in parse_text(body.decode()) for s in f.samples
             if s.labels.get("process") == "egress"}
    assert "fluxrig_frames_in_total" not in names and "fluxrig_frames_out_total" in names


# --- Prometheus ---------------------------------------------------------------------------

def _headers(text: str) -> Counter:
    return Counter(tuple(line.split()[1:3]) for line in text.splitlines()
                   if line.startswith(("# HELP", "# TYPE", "# UNIT")))


@pytest.mark.parametrize("accept, parse", [("", parse_text), (OPENMETRICS, parse_openmetrics)])
def test_a_scrape_of_two_racks_labels_every_series_and_names_each_family_once(accept, parse):
    fleet = _fleet("r1", "r2")
    fleet.set_labels("r2", {"site": "edge", "zone": "b"})
    fleet.set_state("r1", "online")
    fleet.set_state("r2", "online")
    fleet.set_state("r3", "offline")
    fleet.observe("fluxrig.stats.r2", b"junk", T0)
    body, ctype = fleet.render(accept, T0 + 3 * S // 2)
    text = body.decode()
    assert ctype.startswith("application/openmetrics-text" if accept else "text/plain")
    parsed = list(parse(text))
    assert len(parsed) == len({f.name for f in parsed})  # each family in one group
    headers = _headers(text)
    assert headers and max(headers.values()) == 1, headers
    assert len({name for _, name in headers}) == len(parsed)
    enrolled = {"r1": {"site": "lab", "rack_role": "payments"},
                "r2": {"site": "edge", "zone": "b"}}
    values = {}
    for family in parsed:
        for s in family.samples:
            if family.name in FLEET_WIDE:
                assert "rack" not in s.labels
                continue
            rack = s.labels["rack"]
            assert {k: s.labels.get(k) for k in enrolled[rack]} == enrolled[rack], s
            assert "role" not in s.labels or s.labels["role"] != "payments", s
            values[(s.name, rack, s.labels.get("process"))] = s.value
    assert values[("fluxrig_frames_in_total", "r1", "egress")] == 6000
    assert values[("fluxrig_out_bytes_total", "r2", "payments.switch")] == 180_000
    assert values[("fluxrig_ring_fill_ratio", "r1", "egress")] == 0.25
    assert ("fluxrig_ring_fill_ratio", "r1", "payments.switch") not in values  # no input
    assert values[("fluxrig_process_cpu_ratio", "r1", "egress")] == 0.5
    assert 0.002 <= values[("fluxrig_latency_p99_seconds", "r2", "egress")] <= 0.00225
    assert values[("fluxrig_process_resident_memory_bytes", "r1", "telemetry")] == 67 << 20
    assert values[("fluxrig_host_cpu_ratio", "r2", None)] == 0.375
    assert values[(AGE.name, "r1", None)] == 1.5
    racks = {s.labels["state"]: s.value for f in parsed if f.name == RACKS.name
             for s in f.samples}
    assert racks == {"online": 2, "offline": 1}


def test_a_rack_cannot_relabel_itself_and_an_enrolment_change_rerenders():
    fleet = Fleet()
    fleet.set_labels("r1", {"site": "lab"})
    claims = {"site": "bank-hq", "tier": "gold", "rack": "r9"}
    assert fleet.observe("fluxrig.stats.r1", snapshot("r1", claims), T0)
    assert fleet.latest("r1").claimed_labels == claims  # kept for display only
    text = fleet.render("", T0)[0].decode()
    assert "bank-hq" not in text and "tier" not in text and 'rack="r9"' not in text
    assert text.count('site="lab"') > 10
    fleet.set_labels("r1", {"site": "moved"})  # the hub's record changes: so do the series
    text = fleet.render("", T0)[0].decode()
    assert 'site="lab"' not in text and text.count('site="moved"') > 10


def test_shared_families_are_named_typed_and_described_as_the_racks_own():
    sample = _sample(1.0, 10)
    own = {f.name: f for f in families("r1", {}, list(sample.processes))}
    shared = [f for f, _ in PROCESS_FAMILIES if f.name in own]
    assert len(shared) == 8
    for f in shared:
        assert (f.type, f.unit, f.help) == (own[f.name].type, own[f.name].unit,
                                            own[f.name].documentation), f.name


def test_label_values_are_escaped():
    layout = (('we"ird\\name\nx', "source", 0),)
    fleet = Fleet()
    fleet.set_labels("r1", {"site": 'a "quoted" site'})
    assert fleet.observe("fluxrig.stats.r1", snapshot("r1", layout=layout), T0)
    procs = {s.labels["process"] for f in parse_text(fleet.render("", T0)[0].decode())
             for s in f.samples if "process" in s.labels}
    assert procs == {'we"ird\\name\nx'}


# --- rollups ------------------------------------------------------------------------------

def test_rollup_parquet_is_read_back_by_duckdb_with_its_types(tmp_path):
    fleet = _fleet("r1", "r2")
    fleet.observe("fluxrig.stats.r2", snapshot("r2", hub_backlog=42), T0 + 5 * S)
    assert fleet.observe("fluxrig.stats.old", snapshot("old"), T0 - 60 * S)  # offline
    now = T0 + 10 * S + 123_456_000
    rows_ = fleet.rollup(now)
    assert len(rows_) == 2 * len(_LAYOUT) and {r["rack"] for r in rows_} == {"r1", "r2"}
    path = write_parquet(rows_, tmp_path, now)
    assert path == tmp_path / "rollups" / "2026-01-01" / "0000.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["0000.parquet"]  # no temp left
    rel = duckdb.sql(f"select * from read_parquet('{path}')")
    types = dict(zip(rel.columns, map(str, rel.types)))
    assert types["ts"] == "TIMESTAMP WITH TIME ZONE"
    assert types["snapshot_ts"] == "TIMESTAMP WITH TIME ZONE"
    assert {types[c] for c in ("rack", "process", "role")} == {"VARCHAR"}
    assert {types[c] for c in ("frames_in", "errors", "rss", "p99_ns", "hub_backlog")} == \
        {"BIGINT"}
    assert {types[c] for c in ("in_per_s", "cpu_pct", "ring_fill", "age_s")} == {"DOUBLE"}
    got = duckdb.sql(
        f"select epoch_us(ts), rack, frames_in, in_per_s, cpu_pct, hub_backlog, age_s "
        f"from read_parquet('{path}') where process = 'egress' order by rack").fetchall()
    assert got == [((T0 + 10 * S + 123_456_000) // 1000, "r1", 6000, 3000.0, 50.0, None,
                    10.123456),
                   ((T0 + 10 * S + 123_456_000) // 1000, "r2", 6000, 3000.0, 50.0, 42,
                    5.123456)]
    telemetry = duckdb.sql(f"select frames_in, p99_ns, rss from read_parquet('{path}') "
                           f"where process = 'telemetry' and rack = 'r1'").fetchall()
    assert telemetry == [(None, None, 67 << 20)]
    later = fleet.rollup(now + 20 * S)  # r1's snapshot is now 30.1 s old: offline
    assert {r["rack"] for r in later} == {"r2"}
    again = write_parquet(later, tmp_path, now + 20 * S)
    assert again.name == "0000-2.parquet" and path.exists()  # the minute's file is kept
    total = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/rollups/*/*.parquet')")
    assert total.fetchall() == [(3 * len(_LAYOUT),)]


def test_an_empty_rollup_still_writes_a_typed_file(tmp_path):
    path = write_parquet([], tmp_path, T0 + 61 * 60 * S)
    assert path.name == "0101.parquet"
    rel = duckdb.sql(f"select * from read_parquet('{path}')")
    assert rel.fetchall() == [] and str(rel.types[0]) == "TIMESTAMP WITH TIME ZONE"


# --- mixer top ----------------------------------------------------------------------------

def test_top_rows_and_table():
    fleet = _fleet("r1")
    fleet.observe("fluxrig.stats.r2", snapshot("r2", n=500, hub_backlog=12), T0 - 200 * S)
    rows_ = fleet.top_rows(T0 + 2 * S, {"r1": "online", "r3": "never-seen"})
    assert [r["rack"] for r in rows_] == ["r1", "r2", "r3"]
    r1, r2, r3 = rows_
    # sources emitted 2000+4000 frames in the 1 s between the samples
    assert r1["frames_per_s"] == 3000.0 and r2["frames_per_s"] == 1500.0
    assert 2.0 <= r1["p99_ms"] <= 2.25 and r1["errors"] == 20 + 40 + 60
    assert r1["cpu_pct"] == 200.0 and r1["rss_mib"] == 64 + 65 + 66 + 67
    assert (r1["state"], r1["backlog"], r1["age_s"]) == ("online", None, 2.0)
    assert (r2["state"], r2["backlog"], r2["age_s"]) == (None, 12, 202.0)
    assert r3 == dict.fromkeys(r3, None) | {"rack": "r3", "state": "never-seen"}
    table = fleet.top_table(T0 + 2 * S, {"r1": "online", "r3": "never-seen"})
    lines = table.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["RACK", "STATE", "FRAMES/S", "P99 MS", "ERRORS",
                                              "CPU %", "RSS MiB", "BACKLOG", "AGE"]
    assert lines[1].split()[:3] == ["r1", "online", "3000.0"]
    assert lines[1].split()[4:] == ["120", "200.0", "262.0", "-", "2.0s"]
    assert lines[2].split()[-2:] == ["12", "3m"]
    assert lines[3].split() == ["r3", "never-seen"] + ["-"] * 7
    assert len({len(line) for line in lines[:3]}) == 1  # aligned


# --- cost ---------------------------------------------------------------------------------

def test_observe_and_render_of_1000_racks_of_10_processes_is_cheap():
    layout = tuple((f"p.g{i}", "stage", 1) for i in range(9)) + (("egress", "egress", 1),)
    payloads = [(f"fluxrig.stats.rack-{i:04d}", snapshot(f"rack-{i:04d}", layout=layout))
                for i in range(1000)]
    fleet = Fleet()
    for i in range(1000):
        fleet.set_labels(f"rack-{i:04d}", {"site": f"s{i % 7}", "region": "eu"})
    best = float("inf")
    for second in range(3):  # one simulated second: every rack reports, one scrape
        cpu = time.process_time()
        for subject, payload in payloads:
            fleet.observe(subject, payload, T0 + second * S)
        body, _ = fleet.render("", T0 + second * S)
        best = min(best, time.process_time() - cpu)
    samples = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    print(f"\nfleet: observe x1000 + render = {best * 1000:.0f} ms CPU per second at 1 Hz "
          f"({samples} samples, {len(body) / 2**20:.1f} MiB)")
    assert samples > 1000 * 10 * 10
    assert best < 0.4  # generous: the bar is far below 0.5 s of CPU per second
