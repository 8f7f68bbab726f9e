"""The console's sans-I/O parts: users, tokens and session cookies (``consoleauth``), the
fleet board (``consolefleet``) and what every answer passes through (``present``)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from mixer.consoleauth import ConsoleAuthError, Credentials, Principal
from mixer.consoledata import mask_pans, present, uuid_text
from mixer.consolefleet import SPARK_POINTS, FleetBoard

PW = "a long enough password"


def test_users_are_kept_hashed_in_a_private_file_and_logins_check_them(tmp_path: Path) -> None:
    creds = Credentials(tmp_path)
    creds.set_user("ada", PW, "admin")
    creds.set_user("vic", PW + "!", "viewer")
    path = tmp_path / "console-users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PW not in path.read_text()
    assert creds.login("ada", PW) == Principal("ada", "admin")
    assert creds.login("ada", PW + "!") is None and creds.login("nobody", PW) is None
    # another process (the CLI) changes the file: seen at the next check
    Credentials(tmp_path).set_user("ada", PW, "viewer")
    assert creds.login("ada", PW) == Principal("ada", "viewer")


@pytest.mark.parametrize("name, password, role, why", [
    ("", PW, "viewer", "user name"), ("a b", PW, "viewer", "user name"),
    ("ada", "short", "viewer", "at least 12"), ("ada", PW, "root", "role: one of viewer, admin")])
def test_bad_users_are_refused_with_the_reason(tmp_path: Path, name: str, password: str,
                                               role: str, why: str) -> None:
    with pytest.raises(ConsoleAuthError, match=why):
        Credentials(tmp_path).set_user(name, password, role)


def test_tokens_are_shown_once_kept_hashed_and_go_with_their_user(tmp_path: Path) -> None:
    creds = Credentials(tmp_path)
    creds.set_user("ada", PW, "admin")
    token = creds.new_token("ada")
    assert token.startswith("fxc_") and token not in (tmp_path / "console-users.json").read_text()
    assert creds.token(token) == Principal("ada", "admin")
    assert creds.token(token[:-1] + "x") is None and creds.token("Bearer junk") is None
    with pytest.raises(ConsoleAuthError, match="no console user"):
        creds.new_token("nobody")
    assert creds.remove_user("ada")
    assert creds.token(token) is None  # the user's tokens went with it
    assert not creds.remove_user("ada")


def test_a_session_cookie_is_signed_expires_and_ends_when_the_user_changes(
        tmp_path: Path) -> None:
    creds = Credentials(tmp_path)
    creds.set_user("vic", PW, "viewer")
    vic = Principal("vic", "viewer")
    cookie = creds.issue(vic, ttl_s=60, now=1000.0)
    assert creds.session(cookie, now=1059.0) == vic
    assert creds.session(cookie, now=1061.0) is None  # expired
    payload, mac = cookie.split(".")
    forged = json.dumps({"u": "vic", "r": "admin", "exp": 10**10}).encode()
    import base64
    fake = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert creds.session(f"{fake}.{mac}", now=1000.0) is None  # another payload, same mac
    assert creds.session(f"{payload}.{mac[:-2]}AA", now=1000.0) is None
    assert creds.session("junk", now=1000.0) is None
    # another process checks with the same key file
    assert Credentials(tmp_path).session(cookie, now=1000.0) == vic
    creds.set_user("vic", PW, "admin")  # promoted: the viewer's session is over
    assert creds.session(cookie, now=1000.0) is None


def _top(rack: str, fps: float, errors: int, age: float = 0.5) -> dict:
    return {"rack": rack, "state": "online", "frames_per_s": fps, "p99_ms": 2.0,
            "errors": errors, "cpu_pct": 10.0, "rss_mib": 100.0, "backlog": 0, "age_s": age}


def _info(rack: str, state: str = "online", **labels: str) -> dict:
    return {"id": rack, "state": state, "labels": labels, "version": "1.0",
            "rig_hash": "0123456789abcdef" * 4}


def test_the_board_merges_answers_and_sends_only_what_changed() -> None:
    board = FleetBoard()
    changed = board.update([_top("a", 10, 0), _top("b", 5, 0)],
                           [_info("a", site="lyon"), _info("b", site="oslo")])
    assert [r["rack"] for r in changed] == ["a", "b"]
    assert changed[0]["rig"] == "0123456789ab" and changed[0]["labels"] == {"site": "lyon"}
    # only the age moved: nothing to send
    assert board.update([_top("a", 10, 0, age=1.5), _top("b", 5, 0, age=1.5)],
                        [_info("a", site="lyon"), _info("b", site="oslo")]) == []
    changed = board.update([_top("a", 12, 1), _top("b", 5, 0)],
                           [_info("a", site="lyon"), _info("b", "offline", site="oslo")])
    assert {r["rack"]: (r["state"], r["errors"]) for r in changed} == {
        "a": ("online", 1), "b": ("offline", 0)}
    assert changed[0]["spark_last"] == 12.0
    assert [r["rack"] for r in board.rows({"site": "oslo"})] == ["b"]
    assert board.rows()[0]["spark"] == [10.0, 10.0, 12.0]
    # a rack revoked leaves the board, and the page is told
    assert board.update([_top("a", 12, 1)], [_info("a", site="lyon")]) == [
        {"rack": "b", "state": "removed"}]
    for i in range(SPARK_POINTS + 5):
        board.update([_top("a", i, 1)], [_info("a", site="lyon")])
    assert len(board.rows()[0]["spark"]) == SPARK_POINTS


def test_recent_errors_are_the_increases_of_a_process_counter() -> None:
    board = FleetBoard()
    board.update([_top("a", 1, 0)], [_info("a")])
    board.observe_processes("a", [{"name": "p.src", "errors": 3}], 1)
    board.observe_processes("a", [{"name": "p.src", "errors": 3}], 2)
    board.observe_processes("a", [{"name": "p.src", "errors": 5}], 3)
    board.observe_processes("a", [{"name": "p.src", "errors": 0}], 4)  # restarted
    board.observe_processes("a", [{"name": "p.src", "errors": 1}], 5)
    row = board.row("a")
    assert row is not None
    assert row["recent_errors"] == [{"ts_ns": 5, "process": "p.src", "count": 1},
                                    {"ts_ns": 3, "process": "p.src", "count": 2}]


def test_answers_carry_no_card_number_times_as_text_ids_as_uuids() -> None:
    assert mask_pans({"r": ["pan 4111111111111111 here", "4111111111111112"]}) == {
        "r": ["pan 411111******1111 here", "4111111111111112"]}  # the second fails Luhn
    now = time.time_ns()
    got = present({"received_ns": now, "p99_ns": 4_000_000, "ts": now, "n": 7,
                   "id": bytes(range(16)), "event_id": "0" * 32, "x": b"\x01\x02"})
    assert got["received_at"].endswith("Z") and "received_ns" not in got
    assert got["p99_ns"] == 4_000_000 and got["n"] == 7  # a duration stays a number
    assert got["ts"].startswith(time.strftime("%Y-", time.gmtime()))
    assert got["id"] == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert got["event_id"] == uuid_text("0" * 32) == "00000000-0000-0000-0000-000000000000"
    assert got["x"] == "0102"
