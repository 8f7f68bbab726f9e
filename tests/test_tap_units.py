"""The signal tap's pieces without a rack: the log handler, the log shipper, bad records."""

from __future__ import annotations

import logging

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from engine.counters import Counters
from engine.ring import Ring
from engine.shm import KIND_TAP
from engine.tap import LogShipSettings, Tap, install_log_tap
from engine.traceexport import (
    LogShipper,
    OtlpEncoder,
    Resources,
    SpanFactory,
    TapReader,
    span_batch,
)

PAN = "4761739001010119"


def _tapped_logs(shm_name, level: str, log) -> list[tuple[str, dict]]:
    """What ``log(logger)`` ships through a real tap ring with the handler at ``level``."""
    ring = Ring.create(shm_name("tap"), 1 << 16, KIND_TAP, doorbells=False)
    counters = Counters.create(shm_name("c"))
    handler = install_log_tap(Tap(ring, counters), LogShipSettings(level=level))
    try:
        log(logging.getLogger("fluxrig.test.tap"))
        reader = TapReader([{"name": "p.g.0", "tap": ring.segment.name}])
        got = reader.poll()
        reader.close()
    finally:
        logging.getLogger().removeHandler(handler)
        ring.close()
        counters.close()
    return got.logs


def test_log_records_are_tapped_masked_and_filtered_by_level(shm_name):
    def log(logger: logging.Logger) -> None:
        logger.info("below the level: %s", PAN)
        logger.warning("a card %s in a message", PAN)
        try:
            raise ValueError(f"bad field {PAN}")
        except ValueError:
            logger.exception("with a traceback")

    logs = _tapped_logs(shm_name, "warning", log)
    msgs = [doc["msg"] for _, doc in logs]
    assert msgs == ["a card 476173******0119 in a message", "with a traceback"]
    assert PAN not in str(logs) and "476173******0119" in logs[1][1]["exc"]
    assert all(p == "p.g.0" for p, _ in logs)


def test_a_full_tap_counts_dropped_log_records(shm_name):
    ring = Ring.create(shm_name("tap"), 1 << 16, KIND_TAP, doorbells=False)
    counters = Counters.create(shm_name("c"))
    tap = Tap(ring, counters)
    try:
        written = sum(tap.log({"ts": 1, "level": "INFO", "logger": "x", "msg": "m" * 500})
                      for _ in range(500))
        snap = counters.snapshot()
    finally:
        ring.close()
        counters.close()
    assert 0 < written < 500 and snap.logs_dropped == 500 - written


def test_the_shipper_keeps_to_its_rate_and_says_what_it_dropped():
    ship = LogShipper("r1", LogShipSettings(rate=10, burst=5))
    recs = [("p", {"ts": i, "level": "INFO", "logger": "l", "msg": f"m{i} {PAN}"})
            for i in range(20)]
    first = [orjson.loads(x) for x in ship.lines(recs, 1000.0).splitlines()]
    assert [r["msg"] for r in first] == [f"m{i} 476173******0119" for i in range(5)]
    assert ship.dropped == 15
    # a second later: 10 tokens; the notice takes one of them
    later = [orjson.loads(x) for x in ship.lines(recs[:3], 1001.0).splitlines()]
    assert [r["msg"][:2] for r in later[:3]] == ["m0", "m1", "m2"]
    notice = later[3]
    assert notice["logger"] == "fluxrig.logship" and notice["dropped"] == 15
    assert all(r["rack"] == "r1" for r in first + later)
    assert ship.dropped == 0 and ship.dropped_total == 15


def test_malformed_trace_records_are_skipped_and_counted():
    good = [b"\x01" * 16, "sampled", [["root", -1, 1, 2, 1, "", {"k": "v"}]]]
    bad_parent = [b"\x02" * 16, "sampled", [["root", 5, 1, 2, 1, "", {}]]]
    short_id = [b"\x03", "sampled", [["root", -1, 1, 2, 1, "", {}]]]
    records = [("p", good), ("p", bad_parent), ("p", short_id)]
    spans, bad = span_batch(SpanFactory(Resources("r1")), records)
    assert bad == 2 and [s.name for s in spans] == ["root"]
    assert spans[0].resource.attributes["fluxrig.process"] == "p"
    data, n, bad = OtlpEncoder(Resources("r1")).request(records)
    assert (n, bad) == (1, 2)
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    assert [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans] == \
        ["root"]


_names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=20)
_values = st.one_of(_names, st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1),
                    st.floats(allow_nan=False), st.from_regex(r"\d{13,19}", fullmatch=True))


@st.composite
def _records(draw):
    n = draw(st.integers(1, 6))
    spans = []
    for i in range(n):
        start = draw(st.integers(0, 1 << 62))
        spans.append([draw(_names), -1 if i == 0 else draw(st.integers(0, i - 1)), start,
                      start + draw(st.integers(0, 10**12)), draw(st.integers(0, 4)),
                      draw(st.one_of(st.just(""), _names)),
                      draw(st.dictionaries(_names, _values, max_size=5))])
    return [draw(st.binary(min_size=16, max_size=16)), "sampled", spans]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p.a.0", "p.b.1"]), _records()), min_size=1,
                max_size=4))
def test_our_otlp_bytes_decode_to_what_the_sdk_encoder_writes(records):
    """engine.otlpwire writes protobuf by hand: opentelemetry-proto must read it as the
    same message the SDK's own encoder makes from the same records."""
    resources = Resources("r1", {"site": "lab"})
    ours, n, bad = OtlpEncoder(resources).request(records)
    spans, bad2 = span_batch(SpanFactory(resources), records)
    assert bad == bad2 == 0 and n == len(spans)
    mine, theirs = ExportTraceServiceRequest(), encode_spans(spans)
    mine.ParseFromString(ours)

    def flat(req):
        out = []
        for rs in req.resource_spans:
            res = sorted((a.key, a.value.SerializeToString()) for a in rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    s2 = type(s)()
                    s2.CopyFrom(s)
                    attrs = sorted((a.key, a.value.SerializeToString()) for a in s.attributes)
                    del s2.attributes[:]
                    out.append((res, ss.scope.name, ss.scope.version, attrs,
                                s2.SerializeToString(deterministic=True)))
        return sorted(out)

    assert flat(mine) == flat(theirs)


def test_card_numbers_are_masked_in_runs_and_in_groups_and_nothing_else():
    from engine.masking import mask_card_numbers as mask

    assert mask(f"pan={PAN},5500000000000004") == "pan=476173******0119,550000******0004"
    assert mask("4761 7390 0101 0119") == "4761 73** **** 0119"
    assert mask("card 4761-7390-0101-0119.") == "card 4761-73**-****-0119."
    assert mask("amex 3782-822463-10005") == "amex 3782-82****-*0005"
    # a number beside a card number is not merged into it (Luhn ignores leading zeros)
    assert mask(f"m0 {PAN}") == "m0 476173******0119"
    assert mask("0 4761 7390 0101 0119") == "0 4761 73** **** 0119"
    # not card numbers: Luhn fails (a token), dates, times, short groups
    for text in ("token 4761730000000118", "2026-11-28 14:50:29.837Z", "ids 12 34 56 78 90",
                 "port 8583 pid 12345"):
        assert mask(text) == text


def test_more_card_number_forms_are_masked():
    from engine.masking import mask_card_numbers as mask

    pan = "4111111111111111"
    assert mask("4111.1111.1111.1111") == "4111.11**.****.1111"
    assert mask("４１１１１１１１１１１１１１１１") == "４１１１１１******１１１１"  # full-width
    assert mask(f"de2 16{pan}") == "de2 16411111******1111"  # LLVAR as sent
    for text in (f"{pan}000123", f"000123{pan}"):  # inside a longer run
        assert pan not in mask(text) and mask(text).count("*") >= 6
    # a nanosecond time is not taken for a length + a 17-digit card number
    assert mask("ts 1795875521559609528") == "ts 1795875521559609528"
    # separators a hostile probe got through the bridge's mask(): _ / tab, two spaces
    for sep in ("_", "/", "\t", "  ", " - "[:2]):
        grouped = sep.join(("4761", "7390", "0101", "0119"))
        assert mask(grouped) == sep.join(("4761", "73**", "****", "0119")), repr(grouped)
    assert mask("built 2025/11/28 and 1.2.3") == "built 2025/11/28 and 1.2.3"


def test_a_log_call_never_raises_and_a_card_across_the_cut_is_masked(shm_name):
    from engine.tap import MAX_LOG_TEXT

    def log(logger: logging.Logger) -> None:
        logger.warning("file %s", "bad-\udcff-name")  # a lone surrogate: undecodable path
        logger.warning("x" * (MAX_LOG_TEXT - 8) + PAN)  # the card number across the cut

    msgs = [doc["msg"] for _, doc in _tapped_logs(shm_name, "info", log)]
    assert msgs[0] == "file bad-\\udcff-name"
    assert len(msgs[1]) == MAX_LOG_TEXT
    assert PAN[:13] not in msgs[1] and msgs[1].endswith("476173**")


def test_numbers_and_keys_that_are_card_numbers_are_masked_in_spans():
    from engine.traceexport import checked

    _, spans = checked([b"\x01" * 16, "sampled", [["s", -1, 1, 2, 0, "", {
        "a": int(PAN), "b": float(PAN), PAN: 1, "n": 12.5, "t": 1_700_000_000}]]])
    attrs = spans[0][6]
    assert attrs == {"a": "476173******0119", "b": "476173******0119",
                     "476173******0119": 1, "n": 12.5, "t": 1_700_000_000}


def test_a_hanging_collector_costs_dropped_spans_not_a_slow_stop():
    import socket
    import time as _time

    from engine.config import OtlpConfig
    from engine.traceexport import OtlpSender

    sock = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        sender = OtlpSender(OtlpConfig(endpoint=f"http://127.0.0.1:{sock.getsockname()[1]}",
                                       timeout=1.0), depth=2)
        spans, _ = span_batch(SpanFactory(Resources("r1")),
                              [("p", [b"\x01" * 16, "sampled", [["s", -1, 1, 2, 0, "", {}]]])])
        for _ in range(10):
            sender.submit(spans)
        t0 = _time.monotonic()
        sender.close(timeout=2.0)
        took = _time.monotonic() - t0
    finally:
        sock.close()
    assert took < 3.0
    assert sender.dropped >= 7 and sender.sent == 0
    assert "dropped=" in (sender.report() or "")


def test_the_otlp_endpoint_is_checked_and_its_path_suffix_taken_off(tmp_path):
    import pytest

    from engine.config import ConfigError, load_config

    def rig(endpoint: str) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(
            "rack: {id: r1}\n"
            f"telemetry: {{otlp: {{endpoint: '{endpoint}'}}}}\n"
            "pipelines: [{name: p, source: {name: g, gear: generator, settings: {}},\n"
            "             sinks: [{name: o, gear: stdout, settings: {}}]}]\n")
        return str(path)

    assert load_config(rig("http://c:4318/v1/traces")).telemetry.otlp.endpoint == \
        "http://c:4318"
    for bad in ("http://c:99999", "http://c:4318?x=1", "ftp://c"):
        with pytest.raises(ConfigError, match="telemetry.otlp.endpoint"):
            load_config(rig(bad))


def test_one_unencodable_record_costs_only_itself():
    ship = LogShipper("r1", LogShipSettings(rate=100, burst=100))
    recs = [("p", {"ts": 1, "level": "INFO", "logger": "l", "msg": "bad \udcff"}),
            ("p", {"ts": 2, "level": "INFO", "logger": "l", "msg": "good"})]
    lines = [orjson.loads(x) for x in ship.lines(recs, 1000.0).splitlines()]
    assert [r["msg"] for r in lines][:1] == ["good"] and ship.dropped_total == 1
