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
    assert log_rows("r", b"\xff\xfe") == ([], 1)  # not UTF-8, not JSON: one bad line


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


# --- hostile racks (issue "Pipeline B") ---------------------------------------------------------

# ESC sequences (retitle, clear, colour), BEL, NUL, DEL, a C1 CSI, CR/LF and a forged record
# line after it, a bidi override
EVIL = ("\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x00\x7f\x9b31m\r\n"
        "2026-01-01T00:00:00.000Z CRITICAL rack-z supervisor fluxrig: forged\u202e")


def _raw_controls(text: str) -> list[str]:
    """The control/format characters of ``text`` other than the newlines between lines."""
    import unicodedata

    return [c for c in text if c != "\n" and unicodedata.category(c).startswith("C")]


def test_stored_texts_reach_the_terminal_printable_one_line_per_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from mixer.tracecli import run_traces
    from mixer.tracequery import LogRecord, log_line

    recs = [LogRecord(ts=T0, level="INFO", rack="rack-a", process=EVIL, logger=EVIL, msg=EVIL,
                      exc=f"Traceback\n  {EVIL}\nValueError: x"),
            LogRecord(ts=T0, level=EVIL, rack=EVIL, process="p", logger="l", msg="ok", exc=None)]
    text = "\n".join(log_line(r) for r in recs)
    assert not _raw_controls(text)
    lines = text.split("\n")
    assert [x for x in lines if not x.startswith("    ")] == [x for x in lines if "Z " in x[:25]]
    assert len([x for x in lines if not x.startswith("    ")]) == 2  # one line per record
    assert "    Traceback" in lines and "\\x1b]0;PWNED\\x07" in lines[0]
    assert "\\x0d\\x0a2026-01-01" in lines[0] and "\\u202e" in lines[0]

    t = switch_txn(T0, "4761739990010119", "T1", "000123")
    t.spans[1].name = EVIL
    t.spans[0].attributes.extend([kv("iso8583.de39", EVIL)])
    _store(tmp_path, "rack-a", request(t.spans, "rack-a", process=EVIL), "part-1-1.parquet")
    other = switch_txn(T0 + 10**6, "4761739990010119", "T1", "000123")  # two whos: shown
    _store(tmp_path, "rack-b", request(other.spans, "rack-b"), "part-1-2.parquet")
    assert run_traces(tmp_path, t.trace_id.hex(), "1h", 10, False) == 0
    out = capsys.readouterr().out
    assert not _raw_controls(out) and "\\x1b[2J" in out
    assert sum(x.startswith("trace ") for x in out.split("\n")) == 1
    assert not any(x.startswith("2026-01-01") for x in out.split("\n"))


def test_a_card_number_across_the_cut_in_a_float_or_in_bytes_is_masked():
    from mixer.tracerows import MAX_TEXT

    for cut in range(1, 16):
        line = orjson.dumps({"ts": 1, "msg": "x" * (MAX_TEXT - cut) + CLEAR_PAN,
                             "logger": "y" * (256 - cut) + CLEAR_PAN})
        row = log_rows("r", line)[0][0]
        kept = "411111******1111"[:cut]  # masked whole, then cut
        assert len(row.msg) == MAX_TEXT and row.msg.endswith(kept)
        assert len(row.logger) == 256 and row.logger.endswith(kept)
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    t = switch_txn(T0, "1", "T", "1")
    t.spans[0].attributes.extend([
        kv("f", float(CLEAR_PAN)), kv("f19", 4000000000000000006.0), kv("ratio", 0.5),
        KeyValue(key="ascii", value=AnyValue(bytes_value=CLEAR_PAN.encode())),
        KeyValue(key="bcd", value=AnyValue(bytes_value=bytes.fromhex(CLEAR_PAN))),
        KeyValue(key="plain", value=AnyValue(bytes_value=b"\x01\x02"))])
    attrs = orjson.loads(trace_rows("r", request(t.spans, "r"))[0].spans)[0]["attributes"]
    assert attrs["f"] == "411111******1111" and attrs["ratio"] == 0.5
    assert isinstance(attrs["f19"], str) and "*" in attrs["f19"]
    assert attrs["bcd"] == "411111******1111" and attrs["plain"] == "0102"
    assert bytes.fromhex(attrs["ascii"]) == b"411111******1111"


def test_a_bad_utf8_byte_costs_no_neighbour():
    batch = log_batch("r", [{"msg": "before"}, {"msg": "after"}])
    bad = b'{"ts": 1, "msg": "file \xff\xfe.txt"}\n{"ts": 1, "msg": "x"\xff}\n'
    rows, skipped = log_rows("r", bad + batch)
    assert [r.msg for r in rows] == ["file \ufffd\ufffd.txt", "before", "after"]
    assert skipped == 1  # the byte inside the JSON syntax: that line only


def test_misdated_rows_go_to_the_hour_received_and_times_are_clamped(tmp_path: Path):
    import asyncio
    from types import SimpleNamespace

    from mixer.traceproc import TraceShell, TracesPlan, partition_ns

    day = 86_400 * 10**9
    assert partition_ns(T0 - day, T0, 86_400.0) == T0 - day
    assert partition_ns(T0 - day - 1, T0, 86_400.0) == T0
    assert partition_ns(T0 + HOUR_NS, T0, 86_400.0) == T0 + HOUR_NS
    assert partition_ns(T0 + HOUR_NS + 1, T0, 86_400.0) == T0
    recs = [{"ts": T0 - h * HOUR_NS, "msg": f"h{h}"} for h in range(200)]
    recs += [{"ts": t, "msg": "edge"} for t in (2**63 - 1, -2**63, 2**64 - 1, -1, T0 + day)]
    t = switch_txn(T0 - 30 * day, "4761739990010119", "T1", "1")  # a v7 id 30 days old
    shell = TraceShell(TracesPlan(data_dir=str(tmp_path), hub_url="nats://127.0.0.1:1",
                                  password="x", settings=TracesSettings(retention=86_400.0)),
                       clock=lambda: 0.0, wall_ns=lambda: T0)

    async def feed() -> None:
        logs = SimpleNamespace(subject="fluxrig.logs.rack-o", data=log_batch("rack-o", recs))
        spans = SimpleNamespace(subject="fluxrig.traces.rack-o", data=request(t.spans, "rack-o"))
        await shell.on_logs(logs)  # type: ignore[arg-type]
        await shell.on_traces(spans)  # type: ignore[arg-type]
        keys = set(shell.buffer.rows)
        assert len(keys) == 25 + 1  # a day of hours, and the trace in the hour received
        assert all(T0 - day - HOUR_NS < h <= T0 for _, _, h in keys)
        await shell.drain()

    try:
        asyncio.run(feed())
    finally:
        shell.writer.shutdown()
        shell.keeper.shutdown()
    assert shell.stats.misdated == 200 - 25 + 5 + 1 and shell.stats.lost_rows == 0
    assert "misdated=181" in shell.stats.line()
    ts = sorted(pq.read_table(tmp_path / "logs").column("ts").to_pylist())
    assert ts[0] == -2**63 and ts[-2:] == [2**63 - 1, 2**63 - 1]  # clamped, not lost
    assert {p.name for p in tmp_path.glob("*/rack=*/date=*")} == {"date=2026-03-03",
                                                                  "date=2026-03-04"}


@pytest.mark.parametrize(("forward", "message"), [
    ("{endpoint: 'http://c:4318', headers: {a: \"x\\r\\nB: 1\"}}",
     "mixer.yaml: traces.forward.headers.a: invalid header value 'x\\r\\nB: 1' (expected one "
     "line of text: no CR, LF or other control character)"),
    ("{endpoint: 'http://c:4318', headers: {'a b': x}}", "traces.forward.headers.a b: "
     "invalid header name"),
    ("{endpoint: 'http://c:99999'}", "mixer.yaml: traces.forward.endpoint: invalid URL "
     "'http://c:99999': port out of range (expected 1-65535)"),
    ("{endpoint: 'http://c:0'}", "port out of range"),
    ("{endpoint: 'http://c:4318/x?y=1'}", "traces.forward.endpoint: invalid URL"),
])
def test_a_bad_forward_header_or_endpoint_is_refused_with_its_key(forward: str, message: str):
    with pytest.raises(ConfigError) as err:
        parse_settings(yaml.safe_load(f"traces: {{forward: {forward}}}"), "mixer.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize("endpoint", ["http://c:4318/v1/traces", "http://c:4318/v1/traces/",
                                      "http://c:4318"])
def test_a_trailing_v1_traces_is_stripped_from_the_endpoint(endpoint: str):
    s = parse_settings({"traces": {"forward": {"endpoint": endpoint}}}, "mixer.yaml")
    assert s.traces.forward is not None and s.traces.forward.endpoint == "http://c:4318"


def test_the_forward_sender_outlives_an_unexpected_error_and_close_never_raises():
    import asyncio

    from mixer.traceforward import Forwarder

    async def go() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # a header aiohttp refuses at each POST (ValueError), as settings once let through
        f = Forwarder(ForwardSettings(endpoint=f"http://127.0.0.1:{port}",
                                      headers=(("a", "x\r\nB: 1"),), queue=5, timeout=2.0))
        f.start()
        for _ in range(3):
            f.offer("r", b"x")
        await asyncio.wait_for(f.queue.join(), 10)
        assert f._task is not None and not f._task.done()
        assert (f.stats.errors, f.stats.dropped_failed, f.stats.sent) == (3, 3, 0)
        await f.close()

        async def boom() -> None:
            raise RuntimeError("sender bug")

        f._task = asyncio.create_task(boom())
        await asyncio.sleep(0)
        await f.close()  # logged, not raised
        server.close()

    asyncio.run(go())


def test_follow_says_at_once_that_the_mixer_is_not_running(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    import asyncio
    import socket

    import mixer.hubfiles
    from mixer.logfollow import FIRST_CONNECT_S, FollowError, connect_hub
    from mixer.settings import MixerSettings

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(mixer.hubfiles, "local_users", lambda d: {"admin": "pw"})
    t = time.monotonic()
    with pytest.raises(FollowError) as err:
        asyncio.run(connect_hub(tmp_path, MixerSettings(hub_port=port)))
    assert time.monotonic() - t < FIRST_CONNECT_S + 1
    assert str(err.value) == (f"cannot reach the hub at nats://127.0.0.1:{port}: is the Mixer "
                              f"running? (mixer status {tmp_path})")


@pytest.mark.parametrize(("since", "message"), [
    ("99999999d", "error: invalid --since '99999999d' (at most 3650d)"),
    ("3651d", "(at most 3650d)"), ("99999999h", "(at most 3650d)"),
    ("soon", "error: invalid --since 'soon' (expected a duration"),
])
def test_an_unbounded_since_is_refused_with_exit_2(tmp_path: Path, since: str, message: str,
                                                   capsys: pytest.CaptureFixture[str]):
    from mixer.tracecli import run_traces, since_seconds

    assert run_traces(tmp_path, "4761739990010119", since, 10, False) == 2
    assert message in capsys.readouterr().err
    assert since_seconds("3650d") == 3650 * 86_400.0
