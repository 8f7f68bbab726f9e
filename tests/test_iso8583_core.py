"""The switch's decisions without sockets, sleeps or event loops: events in, actions out."""

from __future__ import annotations

import pytest
from peers import request_doc

from engine.schema import At
from engine.counters import Stats
from engine.frame import decode as decode_frame
from engine.frame import derive_id
from engine.journal import Journal
from gears.coatcheck import KeyRing, luhn_valid
from gears.iso8583.codec import FieldIndex, decode, encode, spec_by_name
from gears.iso8583.core import (
    EVENTS,
    SAF,
    Answer,
    Close,
    Forward,
    Record,
    Release,
    ReversalResponse,
    SwitchCore,
    stat_defs,
)
from gears.iso8583.settings import parse_switch_settings

SPEC = spec_by_name("default")
PAN4, PAN5, PAN6, PAN9 = ("4761739001010119", "5500000000000004", "6011000990139424",
                          "9000000000000001")
CONN = 7


def settings(**over):
    raw = {
        "listen": {"port": 0},
        "issuers": {n: {"port": 1, "connections": 2} for n in ("a1", "a2", "b")},
        "groups": {"A": {"endpoints": ["a1", "a2"], "strategy": over.pop("strategy",
                                                                         "failover")},
                   "B": {"endpoints": ["b"]}},
        "routes": [{"name": "visa", "bins": ["4"], "group": "A"},
                   {"name": "mc", "bins": ["5"], "mti": ["0100"], "group": "B"}],
        "timeout": 5.0,
    }
    raw.update(over)
    return parse_switch_settings(raw, At("t.yaml", "settings"))


class Clock:
    def __init__(self):
        self.ns = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.ns += 1000
        return self.ns


@pytest.fixture
def make(shm_name, tmp_path):
    made = []

    def build(s=None, links=("a1", "a2", "b"), keyring=False):
        s = s or settings()
        journal = Journal.create(shm_name("j"), 64, 1024)
        ring = KeyRing.load_or_create(tmp_path / "keys") if (
            keyring or s.saf or s.coatcheck) else None
        core = SwitchCore(s, stats=Stats.local(stat_defs(s)), journal=journal, keyring=ring,
                          src="test", wall_ns=Clock())
        journal.take_over()
        core.opened(CONN)
        for name in links:
            core.link_up(name, 0)
        made.append(journal)
        return core

    return build


def req(mti="0100", **fields) -> bytes:
    return encode(request_doc(PAN4, t=mti, **fields), SPEC)


def answered(actions) -> dict:
    (a,) = [x for x in actions if isinstance(x, Answer)]
    return decode(a.data, SPEC)


def events(actions, outlet=EVENTS):
    return [decode_frame(r.frame) for r in actions if isinstance(r, Record) and r.outlet == outlet]


def respond(core, fwd: Forward, code="00"):
    return core.response(fwd.issuer, fwd.link, FieldIndex(SPEC, ()).respond(fwd.data, code), 1.2)


# -- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "up", "pan", "expect"), [
    ("failover", ("a1", "a2", "b"), PAN4, "a1"),
    ("failover", ("a2", "b"), PAN4, "a2"),
    ("failover", ("b",), PAN4, "91"),
    ("round_robin", ("a1", "a2"), PAN4, "a2"),  # rotates from the first
    ("least_loaded", ("a1", "a2"), PAN4, "a1"),
    ("failover", ("a1", "b"), PAN5, "b"),
    ("failover", ("a1",), PAN5, "91"),
    ("failover", ("a1", "a2", "b"), PAN9, "92"),
])
def test_routing_by_strategy_and_link_state(make, strategy, up, pan, expect):
    core = make(settings(strategy=strategy), links=up)
    actions = core.request(CONN, b"", req(f2=pan), 1.0)
    if expect.isdigit():
        assert answered(actions)["39"] == expect
        (ev,) = events(actions)
        assert ev.body["outcome"] == ("no_route" if expect == "92" else "unavailable")
        assert not any(isinstance(a, Forward) for a in actions)
    else:
        (fwd,) = actions
        assert isinstance(fwd, Forward) and fwd.issuer == expect
        assert fwd.data == req(f2=pan)  # forwarded as the bytes it came in


def test_least_loaded_spreads_and_round_robin_rotates(make):
    core = make(settings(strategy="least_loaded"))
    picks = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0].issuer for i in range(4)]
    assert picks == ["a1", "a2", "a1", "a2"]
    core = make(settings(strategy="round_robin"))
    picks = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0].issuer for i in range(4)]
    assert picks == ["a2", "a1", "a2", "a1"]


def test_links_of_an_issuer_take_turns_and_down_links_are_skipped(make):
    core = make(links=())
    core.link_up("a1", 0)
    core.link_up("a1", 1)
    links = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0].link for i in range(4)]
    assert links == [0, 1, 0, 1]
    core.link_down("a1", 0)
    assert {core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0].link
            for i in range(10, 14)} == {1}


def test_mti_filter_on_a_route(make):
    core = make()
    assert answered(core.request(CONN, b"", req("0200", f2=PAN5), 1.0))["39"] == "92"


# -- matching ---------------------------------------------------------------------------------


def test_answer_goes_back_with_its_event_recorded_first(make):
    core = make()
    (fwd,) = core.request(CONN, b"\x60\x00\x03\x00\x00", req(), 1.0)
    actions = respond(core, fwd, "05")
    assert [type(a) for a in actions] == [Record, Answer]
    (ev,) = events(actions)
    ans = actions[1]
    assert ans.conn == CONN and ans.header == b"\x60\x00\x03\x00\x00" and ans.slot >= 0
    assert decode(ans.data, SPEC)["39"] == "05"
    assert ev.kind == "iso8583.txn" and ev.headers == {"route": "visa", "de39": "05"}
    body = ev.body
    assert body["pan"] == "476173******0119" and body["stan"] == "000001"
    assert body["terminal"] == "TERM0001" and body["issuer"] == "a1"
    assert body["outcome"] == "answered" and body["latency_us"] == 200_000
    assert PAN4 not in str(body)


def test_duplicate_in_flight_is_answered_94_and_late_responses_are_dropped(make):
    core = make()
    (fwd,) = core.request(CONN, b"", req(), 1.0)
    dup = core.request(CONN, b"", req(), 1.1)
    assert answered(dup)["39"] == "94" and events(dup)[0].body["outcome"] == "duplicate"
    expired = core.tick(6.5)
    assert answered(expired)["39"] == "91"
    assert core.response(fwd.issuer, fwd.link, FieldIndex(SPEC, ()).respond(fwd.data, "00"),
                         7.0) == []
    st = core.stats.as_dict()
    assert st["iso8583.late"] == 1 and st["iso8583.outcomes{outcome=timeout}"] == 1
    assert st["iso8583.answers{de39=94}"] == 1 and st["iso8583.answers{de39=91}"] == 1
    assert core.response("a1", 0, req("0110", f11="999999"), 7.0) == []
    assert core.stats.as_dict()["iso8583.unknown"] == 1


def test_timeout_without_saf_records_then_answers_91(make):
    core = make()
    core.request(CONN, b"", req(), 1.0)
    assert core.tick(5.9) == [] and core.next_deadline() == 6.0
    actions = core.tick(6.0)
    assert [type(a) for a in actions] == [Record, Answer]
    assert events(actions)[0].body["outcome"] == "timeout"
    assert answered(actions)["39"] == "91" and answered(actions)["2"] == PAN4


def test_timeout_with_saf_queues_the_reversal_before_anything_else(make):
    core = make(settings(saf={"enabled": True}))
    (fwd,) = core.request(CONN, b"", req(f32="12345"), 1.0)
    actions = core.tick(6.0)
    assert [(type(a), getattr(a, "outlet", None)) for a in actions] == [
        (Record, SAF), (Record, EVENTS), (Answer, None)]
    (rev,) = events(actions, SAF)
    (ev,) = events(actions)
    assert rev.id == ev.id  # the transaction id: each stored once in its stream
    item = rev.body
    assert rev.kind == "iso8583.reversal" and item["issuer"] == "a1" and item["id"] == ev.id.hex()
    assert PAN4.encode() not in rev.body["sealed"]
    assert core.keyring.open(item["id"], item["sealed"]) == {"2": PAN4}
    assert item["doc"]["t"] == "0100" and item["doc"]["32"] == "12345"
    assert "2" not in item["doc"] and "35" not in item["doc"]
    assert ev.body["reversal"] is True
    assert actions[2].reverse is False  # the reversal is recorded: nothing left to undo


def test_an_answer_for_a_closed_connection_is_reversed_not_sent(make):
    core = make(settings(saf={"enabled": True}))
    (fwd,) = core.request(CONN, b"", req(), 1.0)
    core.closed(CONN)
    actions = respond(core, fwd)
    assert [type(a) for a in actions] == [Record, Record, Release]
    assert events(actions, SAF) and events(actions)[0].body["outcome"] == "undeliverable"


def test_an_approval_whose_answer_is_pending_is_flagged_for_reversal(make):
    core = make(settings(saf={"enabled": True}))
    (fwd,) = core.request(CONN, b"", req(), 1.0)
    ans = respond(core, fwd)[1]
    assert ans.reverse is True and ans.txn is not None
    undo = core.undeliverable(ans, 1.3)
    assert [type(a) for a in undo] == [Record, Record, Release]
    (rev,) = events(undo, SAF)
    (ev,) = events(undo)
    assert ev.id == derive_id(rev.id, 2) and ev.body["outcome"] == "undeliverable"


# -- validation at the edge ------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "code", "field", "reason"), [
    ({"f2": "47617390010101X9"}, "14", "2", "pan"),
    ({"f2": "476173900101"}, "14", "2", "pan"),
    ({"f2": ""}, "14", "2", "pan"),
    ({"f3": "00A000"}, "30", "3", "format"),
    ({"f4": "00000000100X"}, "30", "4", "format"),
    ({"f11": "00000X"}, "30", "11", "format"),
    ({"f49": "US$"}, "30", "49", "format"),
    ({"f11": None}, "30", "11", "missing"),
    ({"f41": None}, "30", "41", "missing"),
])
def test_bad_fields_are_answered_with_the_code_and_recorded(make, fields, code, field, reason):
    core = make()
    actions = core.request(CONN, b"", req(**fields), 1.0)
    assert [type(a) for a in actions] == [Record, Answer]
    reply = answered(actions)
    assert reply["t"] == "0110" and reply["39"] == code
    for echoed in ("11", "41"):  # the terminal can match the answer
        if fields.get(f"f{echoed}", "") is not None:
            assert reply[echoed] == decode(req(**fields), SPEC)[echoed]
    (ev,) = events(actions)
    assert ev.kind == "iso8583.rejected"
    assert ev.body["field"] == field and ev.body["de39"] == code
    assert ev.headers["reason"] == reason
    assert core.stats.as_dict()[f"iso8583.rejected{{reason={reason}}}"] == 1


def _splice_length(raw: bytes, field: int, prefix: bytes) -> bytes:
    _, _, spans = FieldIndex(SPEC, ()).spans(raw)
    start, data_start = next((s[1], s[2]) for s in spans if s[0] == field)
    assert data_start - start == len(prefix)
    return raw[:start] + prefix + raw[data_start:]


@pytest.mark.parametrize("prefix", [b"+9", b" 9", b"\x00\x39"])
def test_length_prefixes_must_be_digits(make, prefix):
    core = make()
    raw = _splice_length(req(f32="123456789"), 32, prefix)  # DE32 lies between DE11 and DE41
    actions = core.request(CONN, b"", raw, 1.0)
    reply = answered(actions)
    assert reply["39"] == "30" and reply["11"] == "000001"  # readable before the break
    assert "41" not in reply  # after it: unknowable
    (ev,) = events(actions)
    assert ev.headers["reason"] == "undecodable" and ev.body["field"] == "32"
    assert ev.body["stan"] == "000001" and ev.body["terminal"] == ""


@pytest.mark.parametrize(("raw", "field"), [
    (b"ABCD" + bytes(8), "t"),
    (req("ABCD"), "t"),
    (req("0199"), "t"),
    (req("0110"), "t"),
    (b"\xff\xfe", "t"),
])
def test_requests_that_cannot_be_answered_are_recorded_and_closed(make, raw, field):
    core = make()
    actions = core.request(CONN, b"", raw, 1.0)
    assert [type(a) for a in actions] == [Record, Close]
    (ev,) = events(actions)
    assert ev.kind == "iso8583.rejected" and ev.body["de39"] == "" and ev.body["mti"] == ""


def test_on_malformed_keep_leaves_the_connection_open(make):
    core = make(settings(on_malformed="keep"))
    actions = core.request(CONN, b"", req("0199"), 1.0)
    assert [type(a) for a in actions] == [Record]


def test_coat_check_never_tokenises_an_invalid_pan(make):
    core = make(settings(coatcheck={"enabled": True}))
    for i, pan in enumerate(("47617390010X0119", "476173900101", "")):
        actions = core.request(CONN, b"", req(f2=pan, f11=f"{i:06d}"), 1.0)
        assert answered(actions)["39"] == "14"
        assert answered(actions)["2"] == pan  # the acquirer's own data, echoed
    assert core.vault.local == {}  # nothing was checked in, nothing routed
    assert core.stats.as_dict()["iso8583.rejected{reason=pan}"] == 3
    (fwd,) = core.request(CONN, b"", req(f2="4761739001010119000"), 1.0)  # 19 digits: valid
    assert len(core.vault.local) == 1


def test_coat_check_forwards_the_clear_pan_and_records_only_the_token(make):
    core = make(settings(coatcheck={"enabled": True}, saf={"enabled": True}))
    raw = req(f35=PAN4 + "=2712101")
    (fwd,) = core.request(CONN, b"", raw, 1.0)
    assert fwd.data == raw
    actions = respond(core, fwd)
    body = events(actions)[0].body
    token = body["token"]
    assert token[:6] == PAN4[:6] and token[-4:] == PAN4[-4:] and token != PAN4
    assert not luhn_valid(token) and core.vault.local == {}
    assert answered(actions)["2"] == PAN4  # the issuer's answer, as it came


def test_network_management_is_answered_locally(make):
    core = make()
    actions = core.request(CONN, b"", encode({"t": "0800", "7": "1127120000", "11": "000042",
                                              "70": "301"}, SPEC), 1.0)
    assert [type(a) for a in actions] == [Answer]
    reply = answered(actions)
    assert reply["t"] == "0810" and reply["39"] == "00" and reply["70"] == "301"


def test_issuer_echo_answers_and_reversal_answers_are_told_apart(make):
    core = make()
    assert core.response("a1", 0, encode({"t": "0810", "11": "000001", "39": "00", "70": "301"},
                                         SPEC), 1.0) == []
    (r,) = core.response("a1", 0, req("0410", f39="00"), 1.0)
    assert isinstance(r, ReversalResponse) and r.key == "TERM0001|000001" and r.de39 == "00"
    assert core.response("a1", 0, b"junk", 1.0) == []
    assert core.stats.as_dict()["iso8583.issuer_errors"] == 1


# -- journal and recovery --------------------------------------------------------------------


def test_forwarded_requests_are_journaled_and_a_successor_reverses_them(make, shm_name):
    core = make(settings(saf={"enabled": True}))
    fwds = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0] for i in range(3)]
    ans = respond(core, fwds[0])[1]  # answered, flagged; its slot is still open
    core.journal.decide(ans.slot, True)
    # the process dies here; its successor takes the journal over
    successor = SwitchCore(core.s, stats=Stats.local(stat_defs(core.s)),
                           journal=Journal.attach(core.journal.segment.name),
                           keyring=core.keyring, src="test", wall_ns=Clock())
    actions = successor.recover(successor.journal.take_over())
    reversals = events(actions, SAF)
    assert len(reversals) == 3 and len({r.id for r in reversals}) == 3
    evs = events(actions)
    assert sorted(e.body["outcome"] for e in evs) == ["interrupted", "interrupted",
                                                      "reversed_after_restart"]
    assert sum(isinstance(a, Release) for a in actions) == 3
    for r in reversals:
        assert successor.keyring.open(r.body["id"], r.body["sealed"])["2"] == PAN4
    st = successor.stats.as_dict()
    assert st["saf.recovered"] == 3 and st["iso8583.outcomes{outcome=interrupted}"] == 2


def test_without_saf_a_successor_records_the_interrupted_requests(make):
    core = make()
    fwds = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0)[0] for i in range(2)]
    assert fwds
    actions = core.recover(Journal.attach(core.journal.segment.name).take_over())
    assert events(actions, SAF) == []
    assert [e.body["outcome"] for e in events(actions)] == ["interrupted", "interrupted"]


def test_a_full_journal_answers_91_and_forwards_nothing(make, shm_name):
    s = settings()
    journal = Journal.create(shm_name("j"), 2, 1024)
    core = SwitchCore(s, stats=Stats.local(stat_defs(s)), journal=journal)
    journal.take_over()
    core.opened(CONN)
    core.link_up("a1", 0)
    outs = [core.request(CONN, b"", req(f11=f"{i:06d}"), 1.0) for i in range(3)]
    assert [type(o[0]) for o in outs] == [Forward, Forward, Record]
    assert answered(outs[2])["39"] == "91"
    assert events(outs[2])[0].body["outcome"] == "saturated"
