"""gears.modbus.sample: when a tag publishes — deadband, heartbeat, every poll, bad once per
reason with the last good value, stale, recovery (times injected)."""

from __future__ import annotations

import math

import pytest

from gears.modbus.sample import GOOD, STALE, Publishing, TagState

S = 1_000_000_000


def _run(p: Publishing, steps: list[tuple[str, object, int]]) -> list[tuple[object, str] | None]:
    st = TagState(p)
    out = []
    for what, arg, t in steps:
        s = st.good(arg, t * S) if what == "good" else st.bad(str(arg), t * S) \
            if what == "bad" else st.tick(t * S)
        out.append(None if s is None else (s.value, s.quality))
    return out


def test_on_change_publishes_moves_beyond_the_deadband_only() -> None:
    p = Publishing(deadband=0.5, heartbeat_ns=0)
    got = _run(p, [("good", 10.0, 0), ("good", 10.4, 1), ("good", 10.6, 2),
                   ("good", 10.2, 3), ("good", 10.0, 4)])
    # 10.4 is within 0.5 of the published 10.0; 10.6 is not; 10.2 within 0.5 of 10.6? no:
    # 0.4 -> held; 10.0 is 0.6 from 10.6 -> published
    assert got == [(10.0, GOOD), None, (10.6, GOOD), None, (10.0, GOOD)]


def test_percent_deadband_is_relative_to_the_last_published_value() -> None:
    p = Publishing(deadband=5, deadband_percent=True, heartbeat_ns=0)
    got = _run(p, [("good", 200, 0), ("good", 209, 1), ("good", 211, 2)])
    assert got == [(200, GOOD), None, (211, GOOD)]


def test_zero_deadband_publishes_any_change_and_text_and_bools_on_change() -> None:
    p = Publishing(heartbeat_ns=0)
    assert _run(p, [("good", 1, 0), ("good", 1, 1), ("good", 2, 2)]) == \
        [(1, GOOD), None, (2, GOOD)]
    assert _run(p, [("good", "RUN", 0), ("good", "RUN", 1), ("good", "STOP", 2)]) == \
        [("RUN", GOOD), None, ("STOP", GOOD)]
    assert _run(Publishing(deadband=5, heartbeat_ns=0),
                [("good", True, 0), ("good", False, 1)]) == [(True, GOOD), (False, GOOD)]


def test_heartbeat_republishes_an_unchanged_value() -> None:
    p = Publishing(heartbeat_ns=10 * S)
    got = _run(p, [("good", 5, 0), ("good", 5, 5), ("good", 5, 10), ("good", 5, 15),
                   ("good", 5, 20)])
    assert got == [(5, GOOD), None, (5, GOOD), None, (5, GOOD)]


def test_every_poll_publishes_every_good_read() -> None:
    got = _run(Publishing(mode="every_poll"), [("good", 5, 0), ("good", 5, 1)])
    assert got == [(5, GOOD), (5, GOOD)]


def test_a_failing_device_says_bad_once_per_reason_keeping_the_last_good_value() -> None:
    p = Publishing(heartbeat_ns=0)
    got = _run(p, [("good", 7, 0), ("bad", "timeout", 1), ("bad", "timeout", 2),
                   ("bad", "exception 2 (illegal data address)", 3),
                   ("bad", "exception 2 (illegal data address)", 4), ("good", 7, 5),
                   ("good", 7, 6)])
    assert got == [(7, GOOD), (7, "bad: timeout"), None,
                   (7, "bad: exception 2 (illegal data address)"), None,
                   (7, GOOD), None]  # recovery publishes good even though unchanged


def test_bad_before_any_good_read_has_no_value() -> None:
    st = TagState(Publishing())
    s = st.bad("disconnected", 3 * S)
    assert s is not None and s.value is None and s.ts_source == 0 and s.ts == 3 * S


def test_stale_once_when_good_reads_stop_and_good_again_after() -> None:
    p = Publishing(heartbeat_ns=0, stale_after_ns=3 * S)
    got = _run(p, [("good", 1, 0), ("tick", None, 1), ("tick", None, 3), ("tick", None, 4),
                   ("good", 1, 5)])
    assert got == [(1, GOOD), None, (1, STALE), None, (1, GOOD)]


def test_a_bad_tag_does_not_flap_to_stale() -> None:
    p = Publishing(heartbeat_ns=0, stale_after_ns=2 * S)
    got = _run(p, [("good", 1, 0), ("bad", "timeout", 1), ("tick", None, 5),
                   ("bad", "timeout", 6), ("tick", None, 9)])
    assert got == [(1, GOOD), (1, "bad: timeout"), None, None, None]


def test_sample_times_are_read_time_and_publish_time() -> None:
    st = TagState(Publishing(heartbeat_ns=0, stale_after_ns=2 * S))
    st.good(4, 10 * S)
    s = st.tick(13 * S)
    assert s is not None and s.ts_source == 10 * S and s.ts == 13 * S


@pytest.mark.parametrize("a, b, published", [
    (math.nan, math.nan, False), (1.0, math.nan, True), (math.nan, 1.0, True),
    (1, 1.0, True),  # a type change is a change
])
def test_nan_and_type_changes(a: object, b: object, published: bool) -> None:
    st = TagState(Publishing(heartbeat_ns=0))
    st.good(a, 0)  # type: ignore[arg-type]
    assert (st.good(b, S) is not None) is published  # type: ignore[arg-type]
