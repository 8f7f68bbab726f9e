"""gears.iso8583.router and matcher: table-driven, clock injected."""

from __future__ import annotations

import pytest

from gears.iso8583.matcher import Matcher, match_key
from gears.iso8583.router import BinRange, Group, NoRoute, Routed, Router, Rule, Unavailable


def _router(strategy="failover"):
    rules = [
        Rule(name="visa-big", group="B", bins=(BinRange.parse("4"),), amount_min=100_000),
        Rule(name="visa", group="A", bins=(BinRange.parse("4"),), mti=frozenset({"0100", "0200"})),
        Rule(name="mc", group="B", bins=(BinRange.parse("510000-559999"),),
             processing_code=("00", "01"), currency=frozenset({"840"})),
        Rule(name="reversals", group="A", mti=frozenset({"0400"})),
    ]
    groups = {"A": Group(name="A", endpoints=("a1", "a2"), strategy=strategy),
              "B": Group(name="B", endpoints=("b1",))}
    r = Router(rules, groups)
    for e in ("a1", "a2", "b1"):
        r.mark_up(e)
    return r


def _f(pan="4761739001010119", pc="000000", amount="000000010000", cur="840"):
    return {"2": pan, "3": pc, "4": amount, "49": cur}


@pytest.mark.parametrize(
    ("mti", "fields", "want"),
    [
        ("0100", _f(), Routed("visa", "A", "a1")),
        ("0100", _f(amount="000000100000"), Routed("visa-big", "B", "b1")),
        ("0800", _f(), NoRoute()),  # visa rule is for 0100/0200 only
        ("0100", _f(pan="5500000000000004"), Routed("mc", "B", "b1")),
        ("0100", _f(pan="5600000000000004"), NoRoute()),  # outside 510000-559999
        ("0100", _f(pan="5500000000000004", pc="200000"), NoRoute()),  # refund: not 00/01
        ("0100", _f(pan="5500000000000004", cur="978"), NoRoute()),
        ("0400", _f(pan="9000000000000000"), Routed("reversals", "A", "a1")),
        ("0100", _f(pan="9000000000000000"), NoRoute()),
        ("0100", _f(amount="garbage"), Routed("visa", "A", "a1")),  # amount rule cannot match
        ("0100", {"3": "000000"}, NoRoute()),  # no PAN: no BIN rule matches
    ],
)
def test_rules_in_order(mti, fields, want):
    assert _router().route(mti, fields) == want


def test_failover_skips_a_down_endpoint_and_unavailable_when_all_down():
    r = _router()
    r.mark_down("a1")
    assert r.route("0100", _f()) == Routed("visa", "A", "a2")
    r.mark_down("a2")
    assert r.route("0100", _f()) == Unavailable("visa", "A")
    r.mark_up("a1")
    assert r.route("0100", _f()) == Routed("visa", "A", "a1")


def test_round_robin_rotates_over_live_endpoints():
    r = _router("round_robin")
    picks = [r.route("0100", _f()).endpoint for _ in range(4)]
    assert sorted(picks) == ["a1", "a1", "a2", "a2"] and picks[0] != picks[1]


def test_least_loaded_picks_the_idlest():
    r = _router("least_loaded")
    r.begin("a1")
    r.begin("a1")
    r.begin("a2")
    assert r.route("0100", _f()).endpoint == "a2"
    r.end("a1")
    r.end("a1")
    assert r.route("0100", _f()).endpoint == "a1"


@pytest.mark.parametrize("text", ["4x", "51-5", "559999-510000", ""])
def test_bad_bin_ranges(text):
    with pytest.raises(ValueError) as exc:
        BinRange.parse(text)
    assert str(exc.value).startswith(f"invalid BIN range {text!r}")


def test_unknown_group_and_bad_strategy():
    with pytest.raises(ValueError, match="rule 'x' names unknown group 'Z'"):
        Router([Rule(name="x", group="Z")], {})
    with pytest.raises(ValueError, match="invalid strategy 'random'"):
        Group(name="g", endpoints=("e",), strategy="random")


# --- matcher -------------------------------------------------------------------------------


def test_match_key_default_and_custom():
    f = {"41": "TERM0001", "11": "000123", "37": "RRN"}
    assert match_key(f) == "TERM0001|000123"
    assert match_key(f, ("41", "11", "37")) == "TERM0001|000123|RRN"


def test_matched_duplicate_timeout_late_unknown():
    m = Matcher(timeout=5.0, late_window=60.0)
    assert m.add("k1", "ctx1", now=100.0)
    assert not m.add("k1", "again", now=100.5)  # duplicate in flight
    assert m.add("k2", "ctx2", now=101.0)
    assert m.match("k1", now=102.0) == ("matched", "ctx1")
    assert m.expire(now=105.9) == []
    assert m.expire(now=106.0) == ["ctx2"]  # k2's deadline 106.0
    assert m.match("k2", now=107.0) == ("late", None)
    assert m.match("k2", now=107.1) == ("unknown", None)  # late only once
    assert m.match("nope", now=107.2) == ("unknown", None)
    s = m.stats
    assert (s.matched, s.duplicates, s.timed_out, s.late, s.unknown) == (1, 1, 1, 1, 2)
    assert len(m) == 0


def test_late_window_ends():
    m = Matcher(timeout=1.0, late_window=10.0)
    m.add("k", None, now=0.0)
    assert m.expire(now=1.0) == [None]
    assert m.match("k", now=11.5) == ("unknown", None)


def test_a_key_reused_after_its_answer_keeps_its_own_deadline():
    m = Matcher(timeout=5.0)
    m.add("k", "first", now=0.0)
    m.match("k", now=1.0)
    m.add("k", "second", now=2.0)
    assert m.expire(now=5.0) == []  # the first request's stale heap entry is ignored
    assert m.expire(now=7.0) == ["second"]
    assert m.next_deadline() is None


def test_cancel_removes_without_counting():
    m = Matcher()
    m.add("k", "ctx", now=0.0)
    assert m.cancel("k") == "ctx"
    assert m.cancel("k") is None
    assert m.expire(now=100.0) == []
