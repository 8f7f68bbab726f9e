"""The traces store's cores without a hub: OTLP/JSON lines -> rows, parts on disk,
compaction and retention with an injected clock, lookups and the waterfall, settings, the
forwarder's verdicts. Requests are built with opentelemetry-proto (``otlpkit``)."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
import yaml
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlpkit import kv, log_batch, request, switch_txn, uuid7

from mixer.settings import ConfigError, ForwardSettings, TracesSettings, parse_settings
from mixer.tracefiles import (
    HOUR_NS,
    LOGS_DIR,
    TRACES_DIR,
    PartNamer,
    compact_due,
    compact_hour,
    hour_dir,
    part_meta,
    recover,
    retain,
    write_part,
)
from mixer.traceforward import DONE, DROP, RETRY, backoff, verdict
from mixer.traceproc import TelemetryBuffer
from mixer.tracequery import (
    TraceLookupError,
    clusters,
    find_traces,
    parse_lookup,
    readonly,
    waterfall,
)
from mixer.tracerows import TelemetryDecodeError, log_rows, trace_rows, uuid7_ns

CLEAR_PAN = "4111111111111111"
T0 = int(datetime(2026, 3, 4, 10, 20, tzinfo=UTC).timestamp()) * 10**9


def _store(root: Path, rack: str, payload: bytes, name: str) -> None:
    rows = trace_rows(rack, payload)
    by_hour: dict[int, list] = {}
    for r in rows:
        by_hour.setdefault(r.hour_ns, []).append(r.as_dict())
    for h, rs in by_hour.items():
        write_part(root, TRACES_DIR, rack, h, rs, name)


# --- rows ------------------------------------------------------------------------------------


def test_one_row_per_trace_with_the_root_columns_and_every_span():
    a = switch_txn(T0, "4761739990010119", "T0000001", "000123")
    b = switch_txn(T0 + 10**6, "4761738880020228", "T0000002", "000124", de39="05",
                   outcome="answered", keep="decline")
    rows = trace_rows("rack-a", request(a.spans + b.spans, "forged-rack"))
    assert [r.trace_id for r in rows] == [a.trace_id.hex(), b.trace_id.hex()]
    r = rows[1].as_dict()
    assert (r["name"], r["token"], r["terminal"], r["stan"], r["mti"], r["de39"],
            r["keep"], r["span_count"]) == ("iso8583 0200", b.token, "T0000002", "000124",
                                            "0200", "05", "decline", 10)
    assert rows[0].rack == "rack-a"  # the subject's, not the resource's claim
    spans = orjson.loads(r["spans"])
    assert [s["name"] for s in spans][:2] == ["iso8583 0200", "acquirer receive"]
    issuer = next(s for s in spans if s["name"] == "issuer answer")
    assert issuer["kind"] == "CLIENT" and issuer["attributes"]["server.port"] == 9100
    assert r["duration_us"] == 10_000 and r["process"] == "pay.switch.0"


def test_the_partition_hour_is_the_uuid7_time_else_the_first_span():
    t = switch_txn(T0, "1", "T", "1")
    assert uuid7_ns(t.trace_id) == T0 - T0 % 10**6
    assert trace_rows("r", request(t.spans, "r"))[0].hour_ns == uuid7_ns(t.trace_id)
    random_id = bytes(16)
    s = Span(trace_id=random_id, span_id=b"12345678", name="x", start_time_unix_nano=T0 + 5,
             end_time_unix_nano=T0 + 9)
    assert trace_rows("r", request([s], "r"))[0].hour_ns == T0 + 5


def test_spans_of_a_trace_in_two_messages_are_two_rows_merged_at_query(tmp_path: Path):
    t = switch_txn(T0, "4761739990010119", "T0000001", "000123")
    _store(tmp_path, "rack-a", request(t.spans[:4], "rack-a"), "part-1-1.parquet")
    _store(tmp_path, "rack-a", request(t.spans[4:], "rack-a"), "part-1-2.parquet")
    # the second row has no root: its lookup columns are null
    found = find_traces(readonly(tmp_path), tmp_path, parse_lookup(t.token), 3600, 10,
                        now_ns=T0 + 60 * 10**9)
    assert len(found) == 1 and len(found[0].spans) == 10
    assert found[0].spans[0].depth == 0 and {s.depth for s in found[0].spans[1:]} == {1}


def test_a_clear_card_number_is_masked_in_names_attributes_and_logs():
    t = switch_txn(T0, "4761739990010119", "T1", "1",
                   extra={"note": f"card {CLEAR_PAN}", "raw": int(CLEAR_PAN)})
    t.spans[1].name = f"validate {CLEAR_PAN}"
    row = trace_rows("r", request(t.spans, "r"))[0].as_dict()
    text = orjson.dumps(row).decode()
    assert CLEAR_PAN not in text and "411111******1111" in text
    rows, bad = log_rows("r", log_batch("r", [{"msg": f"pan {CLEAR_PAN}",
                                                "exc": f"Trace {CLEAR_PAN}"}]))
    assert bad == 0 and CLEAR_PAN not in rows[0].msg + str(rows[0].exc)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05junk", b"not protobuf at all"])
def test_a_bad_protobuf_is_a_decode_error(payload: bytes):
    with pytest.raises(TelemetryDecodeError):
        trace_rows("r", payload)


def test_bad_log_lines_are_counted_and_their_neighbours_kept():
    good = log_batch("r", [{"msg": "one"}, {"msg": "two", "level": "WARNING"}]).decode()
    rows, bad = log_rows("r", (good + "{oops\n[1,2]\n{\"ts\": \"x\", \"msg\": 1}\n").encode())
    assert [r.msg for r in rows] == ["one", "two"] and rows[1].level == "WARNING" and bad == 3
    with pytest.raises(TelemetryDecodeError, match="UTF-8"):
        log_rows("r", b"\xff\xfe")


# --- parts, compaction, retention -------------------------------------------------------------


def test_parts_are_hive_partitioned_and_a_crash_tmp_is_deleted(tmp_path: Path):
    t = switch_txn(T0, "4761739990010119", "T1", "1")
    _store(tmp_path, "rack-a", request(t.spans, "rack-a"), PartNamer().next())
    d = tmp_path / "traces/rack=rack-a/date=2026-03-04/hour=10"
    parts = list(d.glob("part-*.parquet"))
    assert len(parts) == 1 and part_meta(parts[0])["rows"] == 1
    assert "rack" not in pq.read_schema(parts[0]).names  # in the path only
    (d / ".part-9-9.parquet.tmp").write_bytes(b"half")
    assert recover(tmp_path).tmp_deleted == 1 and not list(d.glob(".*"))


def test_closed_hours_are_compacted_into_one_part_and_a_crash_is_recovered(tmp_path: Path):
    namer = PartNamer(lambda: 7)
    txns = [switch_txn(T0 + i * 10**9, f"47617399900{i:05d}", "T1", str(i)) for i in range(6)]
    for t in txns:
        _store(tmp_path, "rack-a", request(t.spans, "rack-a"), namer.next())
    write_part(tmp_path, LOGS_DIR, "rack-a", T0, [{"ts": T0, "level": "INFO", "logger": "x",
                                                    "process": "p", "msg": "m", "exc": None}],
               "part-7-1.parquet")
    d = hour_dir(tmp_path, TRACES_DIR, "rack-a", T0)
    hour_end = T0 - T0 % HOUR_NS + HOUR_NS
    assert compact_due(tmp_path, hour_end + 599 * 10**9, 600) == []  # grace not over
    assert compact_due(tmp_path, hour_end + 600 * 10**9, 600) == [(TRACES_DIR, d)]
    olds = sorted(p.name for p in d.iterdir())
    merged = compact_hour(d, TRACES_DIR, lambda: 99)
    assert merged is not None and [p.name for p in d.iterdir()] == ["compact-99.parquet"]
    assert pq.read_table(merged).num_rows == 6 and part_meta(merged)["replaces"] == olds
    # a crash after the rename, before the deletes: the replaced parts come back
    for name in olds[:2]:
        write_part(tmp_path, TRACES_DIR, "rack-a", T0, [], name)
    assert recover(tmp_path).replaced_deleted == 2
    assert [p.name for p in d.iterdir()] == ["compact-99.parquet"]
    found = find_traces(readonly(tmp_path), tmp_path, parse_lookup("T1:3"), 3600, 10,
                        now_ns=T0 + 60 * 10**9)
    assert [t.trace_id for t in found] == [txns[3].trace_id.hex()]


def test_retention_deletes_whole_days_older_than_the_retention(tmp_path: Path):
    for kind in (TRACES_DIR, LOGS_DIR):
        for rack in ("a", "b"):
            for day in ("2026-02-17", "2026-02-18", "2026-02-19", "2026-03-04"):
                d = tmp_path / kind / f"rack={rack}" / f"date={day}" / "hour=03"
                d.mkdir(parents=True)
                (d / "part-1-1.parquet").write_bytes(b"x")
    now = int(datetime(2026, 3, 4, 12, tzinfo=UTC).timestamp()) * 10**9
    gone = retain(tmp_path, now, 14 * 86_400)  # keep from 2026-02-18 on
    assert sorted({p.name for p in gone}) == ["date=2026-02-17"] and len(gone) == 4
    left = sorted({p.name for p in tmp_path.glob("*/rack=*/date=*")})
    assert left == ["date=2026-02-18", "date=2026-02-19", "date=2026-03-04"]


def test_the_buffer_hands_over_per_rack_hour_when_due_or_full():
    b = TelemetryBuffer()
    b.add(TRACES_DIR, "a", T0, {"x": 1}, now=0.0)
    b.add(TRACES_DIR, "a", T0 + 1, {"x": 2}, now=1.0)
    b.add(TRACES_DIR, "a", T0 + HOUR_NS, {"x": 3}, now=4.0)
    b.add(LOGS_DIR, "b", T0, {"x": 4}, now=4.5)
    assert b.take(now=4.9, after=5.0, max_rows=100) == []
    due = b.take(now=5.0, after=5.0, max_rows=100)
    assert [(k[1], len(r)) for k, r in due] == [("a", 2)] and b.count == 2
    assert len(b.take(now=5.0, after=5.0, max_rows=2)) == 2 and b.count == 0


# --- lookups and the waterfall ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "field", "value"), [
    ("4761739990010119", "token", "4761739990010119"),
    ("T0000001:123", "terminal", "T0000001"),
    ("0190f3a2-7b1c-7def-8abc-0123456789ab", "trace_id", "0190f3a27b1c7def8abc0123456789ab"),
    ("0190F3A27B1C7DEF8ABC0123456789AB", "trace_id", "0190f3a27b1c7def8abc0123456789ab"),
])
def test_a_query_is_a_token_terminal_stan_or_trace_id(text: str, field: str, value: str):
    assert getattr(parse_lookup(text), field) == value


@pytest.mark.parametrize("text", ["abc", "T1:", ":12", "12345", "0190f3a2-zz"])
def test_other_queries_are_refused(text: str):
    with pytest.raises(TraceLookupError, match="invalid query"):
        parse_lookup(text)


def test_the_waterfall_nests_offsets_and_scales_its_bars(tmp_path: Path):
    t = switch_txn(T0, "4761739990010119", "T0000001", "000123", step_us=2000)
    _store(tmp_path, "rack-a", request(t.spans, "rack-a"), "part-1-1.parquet")
    found = find_traces(readonly(tmp_path), tmp_path, parse_lookup(t.trace_id.hex()), 60, 10,
                        now_ns=T0 + 86_400 * 10**9 * 3)  # a v7 id: its hour, whatever --since
    text = waterfall(found, 100)
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {t.trace_id.hex()}  rack=rack-a")
    n = next(i for i, line in enumerate(lines) if "|" in line)  # the header wraps
    header = " ".join(lines[:n])
    assert "token=4761739990010119" in header and "total=20.00 ms" in lines[0]
    assert "keep=sampled" in header and "de39=00" in header
    lines = lines[n:]
    assert lines[0].startswith("  iso8583 0200 ") and lines[1].startswith("    acquirer receive")
    assert "   1.00ms    2.00ms" in lines[1]  # offset, duration
    bars = [line[line.index("|") + 1:line.rindex("|")] for line in lines[0:10]]
    assert len({len(b) for b in bars}) == 1 and bars[0].strip() == "█" * len(bars[0])
    assert bars[2].index("█") > bars[1].index("█")  # validate after acquirer receive
    assert all(len(line) <= 100 for line in lines)


def test_overlapping_traces_of_two_racks_share_one_axis():
    rng = random.Random(1)
    a = switch_txn(T0, "1", "T1", "1", rng=rng)
    b = switch_txn(T0 + 2 * 10**6, "1", "T1", "1", rng=rng, step_us=500)
    c = switch_txn(T0 + 60 * 10**9, "1", "T1", "1", rng=rng)
    root = Path("/nonexistent")
    del root
    from mixer.tracequery import merge_rows
    rows = []
    for rack, t in (("rack-a", a), ("rack-b", b), ("rack-a", c)):
        d = trace_rows(rack, request(t.spans, rack))[0].as_dict()
        rows.append({"rack": rack, **d})
    traces = merge_rows(rows)
    groups = clusters(traces)
    assert [len(g) for g in groups] == [1, 2]  # newest group first
    text = waterfall(traces, 140)
    assert "2 traces on one time axis" in text and "rack-b/pay.switch.0" in text


# --- settings and forwarding ----------------------------------------------------------------


def test_traces_settings_defaults_and_every_key(monkeypatch: pytest.MonkeyPatch):
    assert parse_settings({}, "mixer.yaml").traces == TracesSettings()
    monkeypatch.setenv("FX_OTLP_TOKEN", "s3cret")
    import tempfile

    from engine.yamlfile import load_yaml
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mixer.yaml"
        p.write_text("traces: {enabled: false, flush: 250ms, flush_rows: 10, "
                     "compact_after: 1m, retention: 3d, forward: {endpoint: "
                     "'http://c:4318/', headers: {authorization: 'Bearer ${FX_OTLP_TOKEN}'}, "
                     "queue: 5, timeout: 2s}}\n")
        doc = load_yaml(p)
        s = parse_settings(doc.data, str(p), doc.origins).traces
    assert s == TracesSettings(enabled=False, flush=0.25, flush_rows=10, compact_after=60.0,
                               retention=3 * 86_400.0, forward=ForwardSettings(
                                   endpoint="http://c:4318",
                                   headers=(("authorization", "Bearer s3cret"),), queue=5,
                                   timeout=2.0))


@pytest.mark.parametrize(("traces", "message"), [
    ("{flush: soon}", "traces.flush"), ("{retention: 0d}", "traces.retention"),
    ("{retention: 10m}", "traces.retention"), ("{forward: {endpoint: 'ftp://x'}}", "endpoint"),
    ("{forward: {}}", "traces.forward.endpoint"), ("{keep: 1}", "keep"),
])
def test_wrong_traces_settings_name_the_key(traces: str, message: str):
    with pytest.raises(ConfigError) as err:
        parse_settings(yaml.safe_load(f"traces: {traces}"), "mixer.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize(("status", "want"), [
    (200, DONE), (204, DONE), (400, DROP), (404, DROP), (429, RETRY), (500, RETRY),
    (503, RETRY), (None, RETRY)])
def test_the_forward_retries_on_5xx_429_and_no_answer_only(status, want):
    assert verdict(status) == want


def test_the_forward_backs_off_exponentially_and_honours_retry_after():
    mid = lambda a, b: (a + b) / 2  # noqa: E731
    assert [backoff(n, rand=mid) for n in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, 30.0]
    assert backoff(1, "7") == 7.0 and backoff(1, "3600") == 30.0


def test_kv_helper_types_survive_the_round_trip():
    t = switch_txn(T0, "1", "T", "1", extra={"flag": True, "ratio": 0.5})
    spans = orjson.loads(trace_rows("r", request(t.spans, "r"))[0].spans)
    assert spans[0]["attributes"]["flag"] is True and spans[0]["attributes"]["ratio"] == 0.5
    assert kv("a", 1).value.int_value == 1 and uuid7(time.time_ns())[6] >> 4 == 7


def test_the_process_housekeeping_compacts_closed_hours_and_applies_retention(tmp_path: Path):
    from mixer.traceproc import TraceShell, TracesPlan

    old = T0 - 20 * 86_400 * 10**9
    for ts in (old, T0, T0 + 10**9):
        t = switch_txn(ts, "4761739990010119", "T1", str(ts % 1000))
        _store(tmp_path, "rack-a", request(t.spans, "rack-a"), PartNamer().next())
    shell = TraceShell(TracesPlan(data_dir=str(tmp_path), hub_url="nats://127.0.0.1:1",
                                  password="x", settings=TracesSettings()))
    try:
        shell.housekeep_sync(now_ns=T0 + 2 * HOUR_NS)
    finally:
        shell.writer.shutdown()
        shell.keeper.shutdown()
    assert [p.name.split("-")[0] for p in tmp_path.rglob("*.parquet")] == ["compact"]
    assert not list(tmp_path.glob("traces/rack=rack-a/date=2026-02-*"))
