"""Prometheus metrics: names, labels and the latency histogram (``engine/metrics.py``), the
scrape endpoint and its limits (``engine/metrics_http.py``), and a real switch rack scraped
over HTTP against the Grafana dashboard (``deploy/grafana/fluxrig.json``) and
``docs/metrics.md``."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from peers import Issuer, PeerThread, pack, read_message, request_doc
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from rackutil import RackProcess, rig, switch_rig, uid, wait_switch_ready

from engine import metrics_http
from engine.counters import Counters, StatDef, bucket_index
from engine.listeners import bind
from engine.metrics import (
    LATENCY_BOUNDS_NS,
    RackCollector,
    families,
    latency_buckets,
    rack_labels,
    stat_metric_name,
)
from engine.metrics_http import MAX_CLIENTS, MetricsEndpoint
from engine.natsd import free_port
from engine.telemetry import ProcessSample

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "fluxrig.json"
DOC = ROOT / "docs" / "metrics.md"


# --- the histogram ------------------------------------------------------------------------

def test_latency_bounds_are_exact_bucket_edges_from_10us_to_10s():
    bounds = LATENCY_BOUNDS_NS
    assert 15 <= len(bounds) <= 25
    assert list(bounds) == sorted(set(bounds))
    assert 10_000 <= bounds[0] <= 11_250 and 10 ** 10 <= bounds[-1] <= 1.125 * 10 ** 10
    for b in bounds:  # the last value of its bucket: "<= le" takes whole buckets only
        assert bucket_index(b) != bucket_index(b + 1)


def test_latency_buckets_count_exactly_what_is_at_or_below_each_bound(shm_name):
    rnd = random.Random(7)
    values = [0, 1, 15, 16, *LATENCY_BOUNDS_NS, *(b + 1 for b in LATENCY_BOUNDS_NS),
              50 * 10 ** 9]
    values += [int(10 ** rnd.uniform(3, 10.5)) for _ in range(5000)]
    beyond = 10 ** 14  # past the histogram's range: counted in its last bucket, size unknown
    counters = Counters.create(shm_name("hist"))
    try:
        for v in values:
            counters.observe(v)
        _, _, total_s = latency_buckets(list(counters.snapshot().histogram))
        counters.observe(beyond)
        buckets, count, _ = latency_buckets(list(counters.snapshot().histogram))
    finally:
        counters.close()
        counters.unlink()
    assert [le for le, _ in buckets][-1] == "+Inf"
    for (le, n), bound in zip(buckets, LATENCY_BOUNDS_NS):
        assert float(le) == bound / 1e9
        assert n == sum(1 for v in values if v <= bound), le
    assert buckets[-1][1] == count == len(values) + 1
    true_sum = sum(values) / 1e9
    assert abs(total_s - true_sum) <= 0.0625 * true_sum


# --- names and labels ---------------------------------------------------------------------

@pytest.mark.parametrize("stat,expected", [
    (StatDef("iso8583.answers", "counter", ""), "fluxrig_iso8583_answers_total"),
    (StatDef("iso8583.links_up", "gauge", ""), "fluxrig_iso8583_links_up"),
    (StatDef("saf.dead", "counter", ""), "fluxrig_saf_dead_total"),
    (StatDef("egress.waiting", "gauge", ""), "fluxrig_egress_waiting"),
    (StatDef("x.sent_total", "counter", ""), "fluxrig_x_sent_total"),  # _total once
    (StatDef("modbus.read-errors", "counter", ""), "fluxrig_modbus_read_errors_total"),
])
def test_gear_stat_names(stat, expected):
    assert stat_metric_name(stat) == expected


@pytest.mark.parametrize("labels,taken,expected", [
    ({}, (), {"rack": "r1"}),
    ({"site": "lab"}, (), {"rack": "r1", "site": "lab"}),
    ({"role": "payments"}, (), {"rack": "r1", "rack_role": "payments"}),  # ours is role
    ({"issuer": "x"}, ("issuer",), {"rack": "r1", "rack_issuer": "x"}),  # a gear stat's
    ({"site-name": "a", "1st": "b"}, (), {"rack": "r1", "site_name": "a", "_1st": "b"}),
    ({"__name__": "x"}, (), {"rack": "r1", "rack_name__": "x"}),
])
def test_rack_labels_are_valid_and_never_hide_ours(labels, taken, expected):
    assert rack_labels("r1", labels, taken) == expected


def _sample(counters: Counters | None, **kw) -> ProcessSample:
    defaults = {"name": "p.s0.0", "role": "stage", "pid": os.getpid(), "cpu": None,
                "counters": counters.snapshot() if counters else None, "ring_fill": 0.25,
                "cpu_times": 1.5, "rss": 10 << 20, "inputs": 1, "restarts": 2}
    return ProcessSample(**{**defaults, **kw})


def test_families_label_every_series_and_type_every_name(shm_name):
    defs = (StatDef("iso8583.answers", "counter", "answers", (("de39", "00"),)),
            StatDef("iso8583.answers", "counter", "answers", (("de39", "05"),)),
            StatDef("iso8583.links_up", "gauge", "links", (("issuer", "a"),)),
            StatDef("frames_in", "gauge", "a gauge under a counter's name"),
            StatDef("odd", "gauge", "a stat labelled like the process", (("role", "r"),)))
    counters = Counters.create(shm_name("fam"), stats=len(defs))
    try:
        stats = counters.stats(defs)
        stats.add(stats.slot("iso8583.answers", de39="05"), 3)
        stats.set(stats.slot("iso8583.links_up", issuer="a"), 2)
        counters.count_batch(10, 9, 1000, 900)
        counters.observe(2_000_000)
        procs = [_sample(counters, stat_defs=defs),
                 _sample(None, name="telemetry", role="telemetry", inputs=0, restarts=0)]
        found = {f.name: f for f in families("r1", {"site": "lab", "role": "x"}, procs)}
    finally:
        stats.values.release()
        counters.close()
        counters.unlink()
    assert found["fluxrig_frames_in"].type == "counter"  # the gear's gauge did not take it
    values = {(s.name, s.labels.get("process"), s.labels.get("de39")): s.value
              for f in found.values() for s in f.samples}
    assert values[("fluxrig_frames_in_total", "p.s0.0", None)] == 10
    assert values[("fluxrig_out_bytes_total", "p.s0.0", None)] == 900
    assert values[("fluxrig_iso8583_answers_total", "p.s0.0", "05")] == 3
    assert values[("fluxrig_iso8583_answers_total", "p.s0.0", "00")] == 0
    assert values[("fluxrig_process_cpu_seconds_total", "telemetry", None)] == 1.5
    assert values[("fluxrig_process_restarts_total", "p.s0.0", None)] == 2
    assert values[("fluxrig_ring_fill_ratio", "p.s0.0", None)] == 0.25
    assert ("fluxrig_ring_fill_ratio", "telemetry", None) not in values  # no input ring
    odd = found["fluxrig_odd"].samples[0].labels
    assert (odd["role"], odd["gear_role"]) == ("stage", "r")
    assert values[("fluxrig_latency_seconds_count", "p.s0.0", None)] == 1
    for f in found.values():
        for s in f.samples:
            assert s.labels["rack"] == "r1" and s.labels["site"] == "lab", s
            assert s.labels["rack_role"] == "x" and s.labels["role"] in ("stage", "telemetry")


def test_render_is_cached_per_sample_and_negotiates_openmetrics(shm_name):
    counters = Counters.create(shm_name("render"))
    try:
        collector = RackCollector("r1", {})
        collector.update([_sample(counters)])
        text, ctype = collector.render("")
        assert ctype.startswith("text/plain") and b"fluxrig_frames_in_total" in text
        assert collector.render("")[0] is text  # rendered once per sample
        om, om_type = collector.render("application/openmetrics-text; version=1.0.0")
        assert om_type.startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")
        counters.count_batch(5, 5, 0, 0)
        collector.update([_sample(counters)])
        assert collector.render("")[0] is not text
    finally:
        counters.close()
        counters.unlink()


# --- the endpoint -------------------------------------------------------------------------

async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        data = b""  # closed without an answer
    writer.close()
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _endpoint_run(body, **limits):
    """Run ``body(endpoint)`` against a real endpoint on a real socket."""

    async def main():
        sock = bind("127.0.0.1", 0)
        endpoint = MetricsEndpoint(sock, lambda accept: (f"accept={accept}\n".encode(),
                                                         "text/plain"))
        await endpoint.start()
        try:
            return await body(endpoint)
        finally:
            await endpoint.close()
            sock.close()

    return asyncio.run(main())


@pytest.mark.parametrize("raw,status,body", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n", 200,
     b"accept=text/plain\n"),
    (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200, b"accept=\n"),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200, b""),
    (b"GET / HTTP/1.1\r\n\r\n", 404, b"metrics are at /metrics\n"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405, b"only GET and HEAD\n"),
    (b"GET /metrics\r\n\r\n", 400, b"bad request line\n"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", 431,
     b"request head too large\n"),
])
def test_endpoint_answers_only_get_of_metrics(raw, status, body):
    answer = _endpoint_run(lambda ep: _request(ep.port, raw))
    head, _, got = answer.partition(b"\r\n\r\n")
    assert _status(answer) == status
    assert got == body
    assert b"Connection: close" in head
    if raw.startswith(b"HEAD"):
        assert b"Content-Length: 8" in head  # what GET would send: "accept=\n"


def test_endpoint_caps_clients_and_times_out_a_silent_one(monkeypatch):
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 1.0)

    async def body(ep):
        silent = [await asyncio.open_connection("127.0.0.1", ep.port)
                  for _ in range(MAX_CLIENTS)]
        # the server accepts in its own time; no event tells a client it was accepted
        for _ in range(500):
            if ep.active == MAX_CLIENTS:
                break
            await asyncio.sleep(0.01)
        assert ep.active == MAX_CLIENTS
        # a scrape while every place is held by a silent client takes the oldest's place
        scraped = await _request(ep.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert _status(scraped) == 200 and ep.evicted == 1 and ep.refused == 0
        answers = [await asyncio.wait_for(r.read(), 10) for r, _ in silent]
        for _, w in silent:
            w.close()
        assert answers[0] == b""  # the oldest, closed to make room
        assert {_status(a) for a in answers[1:]} == {408}  # the others timed out
        assert ep.active == 0
        return await _request(ep.port, b"GET /metrics HTTP/1.1\r\n\r\n")

    assert _status(_endpoint_run(body)) == 200  # slots free again after the timeouts


def test_a_busy_metrics_port_stops_the_start_naming_the_key(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    config = rig(tmp_path, uid("t-prombusy"), count=1, rate=0,
                 telemetry={"prometheus": {"port": port}})
    try:
        out = subprocess.run([sys.executable, "-m", "engine.cli", "start", "--config",
                              str(config)], capture_output=True, text=True, timeout=60,
                             check=False)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert f"cannot listen: host=127.0.0.1, port={port}" in out.stderr
    assert f"prometheus endpoint: {config}: telemetry.prometheus" in out.stderr


# --- a real rack, its scrape, the dashboard and the docs ----------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or a Grafana ``label_values`` query) reads."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:([a-zA-Z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,)?"
                     r"\s*\w+\s*\)\s*", expr)
    if m:
        return {m.group(1)} if m.group(1) else set()
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for t in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        if t.group() in PROMQL_WORDS or expr[t.end():].lstrip().startswith("("):
            continue  # a keyword or a function
        names.add(t.group())
    return names


@pytest.mark.parametrize("expr,names", [
    ('sum by (rack, le) (rate(a_bucket{rack=~"$rack", x="y{z}"}[$__rate_interval]))',
     {"a_bucket"}),
    ("histogram_quantile(0.99, sum without (process) (rate(b[5m]))) > 0", {"b"}),
    ("rate(c_total[1m]) / on (rack) group_left (site) d_info", {"c_total", "d_info"}),
    ("1e-05 * e", {"e"}),
    ('label_values(f{rack=~"$rack"}, process)', {"f"}),
    ("label_values(rack)", set()),
])
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    panels = list(dash["panels"])
    while panels:
        p = panels.pop()
        panels += p.get("panels", [])
        out += [t["expr"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{.*\})? (\S+)$")


def check_conventions(text: str) -> dict[str, str]:
    """Check the text exposition by hand (prometheus_client's parser adds ``_total`` to
    counters that lack it) and return {family name: type}."""
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            types[name] = typ
        elif line and not line.startswith("#"):
            name = _SAMPLE.match(line).group(1)
            family = next(f for f in sorted(types, key=len, reverse=True)
                          if name == f or types[f] == "histogram"
                          and name in (f + "_bucket", f + "_sum", f + "_count"))
            typ = types[family]
            assert name.startswith("fluxrig_"), line
            assert name.endswith("_total") == (typ == "counter"), line
            for unit in ("seconds", "bytes", "ratio", "total"):
                assert f"_{unit}_{unit}" not in name and name.count(f"_{unit}") <= 1, line
    return types


def test_a_switch_rack_scrape_follows_the_conventions_and_feeds_the_dashboard(tmp_path):
    peers = PeerThread()
    port, prom = free_port(), free_port()
    rack_id = uid("t-metrics")
    issuer_port = peers.call(Issuer(codes={"5": "05"}).start())
    config = switch_rig(tmp_path, rack_id, port, issuer_port,
                        telemetry={"interval": 0.2, "prometheus": {"port": prom}})
    cfg = yaml.safe_load(config.read_text())
    cfg["rack"]["labels"] = {"site": "lab", "role": "payments"}
    config.write_text(yaml.safe_dump(cfg))
    rack = RackProcess(config, tmp_path / "data")

    def scrape(accept: str = "") -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{prom}/metrics",
                                     headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def value(text: str, name: str, **labels: str) -> float | None:
        for f in parse_text(text):
            for s in f.samples:
                if s.name == name and labels.items() <= s.labels.items():
                    return s.value
        return None

    async def ask() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        pans = ["4761739001010119"] * 6 + ["5500000000000004"] * 4
        for i, pan in enumerate(pans, 1):
            writer.write(pack(request_doc(pan, f11=f"{i:06d}")))
        answers = [await asyncio.wait_for(read_message(reader), 10) for _ in pans]
        writer.close()
        return len([a for a in answers if a is not None])

    try:
        wait_switch_ready(rack, port)
        assert asyncio.run(ask()) == 10
        # telemetry samples every 0.2 s; a scrape shows the last sample: wait for the one
        # that saw the 10 audit events acked at egress
        rack.wait_for(lambda: value(scrape(), "fluxrig_latency_seconds_count",
                                    process="egress") == 10, 30, "10 latencies at egress")
        text = scrape()
        openmetrics = scrape("application/openmetrics-text; version=1.0.0")
        assert rack.stop() == 0
    finally:
        rack.close()
        peers.stop()

    types = check_conventions(text)
    parsed = list(parse_text(text))
    samples = [s for f in parsed for s in f.samples]
    assert len(samples) > 100
    for s in samples:
        assert s.labels["rack"] == rack_id and s.labels["site"] == "lab", s
        assert s.labels["rack_role"] == "payments", s
        assert not any(k.startswith("otel") for k in s.labels), s
    assert not any(n.startswith(("target_info", "otel")) for n in types)

    # histograms: the same le bounds everywhere, cumulative, +Inf = _count
    series = defaultdict(dict)
    for s in samples:
        if s.name == "fluxrig_latency_seconds_bucket":
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series[key][float(s.labels["le"])] = s.value
    counts = {tuple(sorted(s.labels.items())): s.value for s in samples
              if s.name == "fluxrig_latency_seconds_count"}
    assert len(series) >= 2 and series.keys() == counts.keys()
    for key, buckets in series.items():
        les = sorted(buckets)
        assert les == [b / 1e9 for b in LATENCY_BOUNDS_NS] + [float("inf")]
        assert [buckets[le] for le in les] == sorted(buckets.values()), key
        assert buckets[float("inf")] == counts[key]
    assert list(parse_openmetrics(openmetrics))  # the strict parser accepts it

    # what the issue asked for
    assert value(text, "fluxrig_iso8583_answers_total", de39="05") == 4
    assert value(text, "fluxrig_iso8583_answers_total", de39="00") == 6
    assert value(text, "fluxrig_frames_out_total", process="egress") == 10
    assert value(text, "fluxrig_ring_fill_ratio", process="egress") is not None
    # every process has its CPU counter; a switch that answered 10 requests may still be
    # under one 10 ms clock tick (a CI run saw 0.0), telemetry never is
    assert value(text, "fluxrig_process_cpu_seconds_total", role="source") >= 0
    assert value(text, "fluxrig_process_cpu_seconds_total", process="telemetry") > 0
    assert value(text, "fluxrig_process_resident_memory_bytes", process="telemetry") > 0
    assert types["fluxrig_process_cpu_seconds_total"] == "counter"
    assert types["fluxrig_latency_seconds"] == "histogram"
    for gone in ("fluxrig_bytes_in_bytes_total", "fluxrig_latency_p99_seconds",
                 "fluxrig_ring_fill", "fluxrig_process_cpu"):
        assert gone not in types

    # every name a dashboard query reads is in the scrape; every family is documented
    scraped = {s.name for s in samples}
    queries = dashboard_queries()
    assert len(queries) >= 20
    for expr in queries:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= scraped, (expr, names - scraped)
    documented = set(re.findall(r"`(fluxrig_\w+)`", DOC.read_text()))
    assert set(types) <= documented, set(types) - documented
