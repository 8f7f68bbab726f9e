"""The signal tap's pieces without a rack: the log handler, the log shipper, bad records."""

from __future__ import annotations

import logging

import orjson

from engine.counters import Counters
from engine.ring import Ring
from engine.shm import KIND_TAP
from engine.tap import LogShipSettings, Tap, install_log_tap
from engine.traceexport import LogShipper, SpanFactory, TapReader, span_batch

PAN = "4761739001010119"


def test_log_records_are_tapped_masked_and_filtered_by_level(shm_name):
    ring = Ring.create(shm_name("tap"), 1 << 16, KIND_TAP, doorbells=False)
    counters = Counters.create(shm_name("c"))
    handler = install_log_tap(Tap(ring, counters), LogShipSettings(level="warning"))
    logger = logging.getLogger("fluxrig.test.tap")
    try:
        logger.info("below the level: %s", PAN)
        logger.warning("a card %s in a message", PAN)
        try:
            raise ValueError(f"bad field {PAN}")
        except ValueError:
            logger.exception("with a traceback")
        reader = TapReader([{"name": "p.g.0", "tap": ring.segment.name}])
        got = reader.poll()
        reader.close()
    finally:
        logging.getLogger().removeHandler(handler)
        ring.close()
        counters.close()
    msgs = [doc["msg"] for _, doc in got.logs]
    assert msgs == ["a card 476173******0119 in a message", "with a traceback"]
    assert PAN not in str(got.logs) and "476173******0119" in got.logs[1][1]["exc"]
    assert all(p == "p.g.0" for p, _ in got.logs)


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
    spans, bad = span_batch(SpanFactory("r1"), [("p", good), ("p", bad_parent),
                                                ("p", short_id)])
    assert bad == 2 and [s.name for s in spans] == ["root"]
    assert spans[0].resource.attributes["fluxrig.process"] == "p"
