"""The Mixer's parts that run without a live Mixer, tested from what they promise.

* ``engine.hublink``: a rack's link state read from real nats-server 2.15 log lines (the
  lines below were copied from the logs of real hub/rack pairs: refused by the hub's port,
  linked, closed, an unknown nkey, a stranger's CA, two racks under one name), from a log
  file larger than the tail it reads, and from a real rack linking to a real hub.
* ``mixer.settings``: defaults, ``settings_text`` read back, and errors that name the file,
  the key path and the rule.
* ``mixer.enrol`` + ``mixer.hubfiles`` on a hub dir made by ``init_pki`` (no Mixer running):
  passports, ``racks.json``, refusals, the hub's nats-server config, the hub's own users,
  and concurrent enrolments under ``racks.lock``.
* The ``mixer`` command line as a subprocess: ``init``, and ``status``/``stop``/``racks``
  with no Mixer running.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from engine.hublink import NEVER, TAIL_BYTES, link_state, read_link_state
from engine.identity import decode_seed, public_key, read_passport
from engine.natsd import LeafRemote, NatsServer, free_port
from engine.schema import ConfigError
from mixer.enrol import EnrolError, add_rack, revoke_rack
from mixer.hubfiles import HubServer, local_users, read_racks
from mixer.pki import HubPki, certificate_hosts, init_pki
from mixer.settings import (
    SETTINGS_FILE,
    AuditSettings,
    ConsoleSettings,
    MixerSettings,
    load_settings,
    parse_settings,
    settings_text,
)

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# engine.hublink — lines as nats-server 2.15.1 writes them in a rack's log
# ---------------------------------------------------------------------------------------

HUB = "127.0.0.1:17422"


def _line(level: str, text: str, lid: int | None = 10) -> str:
    """One log line in nats-server's format (``logtime_utc``), connection-prefixed when
    ``lid`` is given."""
    conn = f"{HUB} - lid:{lid} - " if lid is not None else ""
    return f"[14742] 2026/11/28 05:50:09.192082 [{level}] {conn}{text}"


CREATED = _line("INF", "Leafnode connection created for account: $G ")
UP = _line("INF", 'JetStream using domains: local "r1", remote "hub"')
CLOSED = _line("INF", "Leafnode connection closed: Client Closed - Remote: hub")
CLOSED_TLS = _line("INF", "Leafnode connection closed: TLS Handshake Failure")
DIAL_REFUSED = _line("ERR", f'Error trying to connect as leafnode to remote server "{HUB}" '
                            f"(attempt 1): dial tcp {HUB}: connect: connection refused",
                     lid=None)
AUTH = _line("ERR", "Leafnode Error 'Authorization Violation'", lid=14)
TLS_WHY = ('failed to verify certificate: x509: certificate signed by unknown authority '
           '(possibly because of "x509: ECDSA verification failure" while trying to verify '
           'candidate authority certificate "fluxrig-hub CA") (CN=127.0.0.1,O=fluxrig '
           'SHA-256: f834f2f08e7255911e6715659d4719423b110326cc5c1dc1eddcaade1303844c)')
TLS = _line("ERR", f"TLS leafnode handshake error: tls: {TLS_WHY}", lid=3)
DUPLICATE = _line("ERR", "Leafnode Error 'Duplicate Remote LeafNode Connection'", lid=5)
UNRELATED = [
    _line("INF", "Starting nats-server", lid=None),
    _line("INF", "  Version:  2.15.1", lid=None),
    _line("INF", "Starting JetStream", lid=None),
    _line("INF", "  Domain:           r1", lid=None),
    _line("INF", "Listening for client connections on 127.0.0.1:4222", lid=None),
    _line("INF", "Server is ready", lid=None),
    _line("WRN", "Readloop processing time: 2.107s", lid=7),
    '[14742] 2026/11/28 05:50:10.000001 [ERR] 127.0.0.1:51234 - cid:9 - "v2.7.0:python3" - '
    'authentication error',
    '[14742] 2026/11/28 05:50:10.000002 [ERR] 127.0.0.1:51234 - cid:9 - "v2.7.0:python3" - '
    'Publish Violation - User "ingest", Subject "fluxrig.src.r2.x"',
    "",
    "garbage without any structure",
]
DOWN_CLOSED = "down (link closed)"
DOWN_REFUSED = "down (connection refused)"
REFUSED_AUTH = "refused (authorization)"
FLAPPING = "flapping (another leaf uses this rack's name)"


@pytest.mark.parametrize(("lines", "expected"), [
    pytest.param([], NEVER, id="empty-log"),
    pytest.param(UNRELATED, NEVER, id="never-linked-only-unrelated"),
    pytest.param([*UNRELATED, CREATED], NEVER, id="created-but-no-answer-yet"),
    pytest.param([CLOSED], NEVER, id="closed-without-up-is-no-verdict"),
    pytest.param([CREATED, UP], "up", id="up"),
    pytest.param([CREATED, UP, CLOSED], DOWN_CLOSED, id="up-closed"),
    pytest.param([CREATED, UP, CLOSED, DIAL_REFUSED], DOWN_REFUSED, id="up-closed-refused"),
    pytest.param([DIAL_REFUSED], DOWN_REFUSED, id="hub-port-refused"),
    pytest.param([DIAL_REFUSED, DIAL_REFUSED.replace("attempt 1", "attempt 2"), CREATED, UP],
                 "up", id="refused-then-up"),
    pytest.param([CREATED, AUTH, CLOSED], REFUSED_AUTH, id="auth-then-its-close"),
    pytest.param([CREATED, AUTH, CLOSED, CREATED, AUTH, CLOSED], REFUSED_AUTH,
                 id="auth-retries"),
    pytest.param([CREATED, AUTH, CLOSED, CREATED, UP], "up", id="auth-then-readmitted"),
    pytest.param([CREATED, UP, CLOSED, CREATED, AUTH, CLOSED], REFUSED_AUTH,
                 id="up-then-revoked"),
    pytest.param([CREATED, TLS, CLOSED_TLS], f"refused (tls: {TLS_WHY})", id="tls"),
    pytest.param([CREATED, UP, DUPLICATE, CLOSED], FLAPPING, id="duplicate-then-close"),
    pytest.param([CREATED, UP, *UNRELATED], "up", id="unrelated-after-up-ignored"),
    pytest.param([DIAL_REFUSED, *UNRELATED, CREATED], DOWN_REFUSED,
                 id="unrelated-after-refused-ignored"),
])
def test_link_state_keeps_the_last_verdict_of_real_log_lines(lines: list[str],
                                                             expected: str) -> None:
    assert link_state(lines) == expected


def test_link_state_accepts_any_iterable_lazily() -> None:
    assert link_state(iter([CREATED, UP, CLOSED, DIAL_REFUSED])) == DOWN_REFUSED


def test_tls_reason_is_not_prefixed_twice() -> None:
    state = link_state([TLS])
    assert state.startswith("refused (tls: failed to verify certificate: x509: certificate "
                            "signed by unknown authority")
    assert "tls: tls:" not in state


def _write_log(path: Path, head: list[str], filler_bytes: int, tail: list[str]) -> None:
    """A log of ``head`` lines, then unrelated lines of ``filler_bytes``, then ``tail``."""
    filler = _line("INF", "Readloop processing time: 2.107s - unrelated noise " + "x" * 60,
                   lid=7) + "\n"
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in head)
        f.write(filler * (filler_bytes // len(filler) + 1))
        f.writelines(line + "\n" for line in tail)


def test_read_link_state_of_a_large_log_finds_the_verdict_near_its_end(tmp_path: Path) -> None:
    # an old refusal at the top, then more than the tail, then the link came up
    _write_log(tmp_path / "nats-server.log", [CREATED, AUTH, CLOSED], TAIL_BYTES + 300_000,
               [DIAL_REFUSED, CREATED, UP, *UNRELATED[:3]])
    assert (tmp_path / "nats-server.log").stat().st_size > 1 << 20
    assert read_link_state(tmp_path) == "up"


def test_read_link_state_of_a_large_log_sees_a_late_close(tmp_path: Path) -> None:
    _write_log(tmp_path / "nats-server.log", [CREATED, UP], 2 * TAIL_BYTES,
               [CLOSED, DIAL_REFUSED])
    assert read_link_state(tmp_path) == DOWN_REFUSED


def test_read_link_state_keeps_a_verdict_older_than_the_tail(tmp_path: Path) -> None:
    """A rack that linked once and then logged more than a MiB of other lines is still
    linked: nothing after "up" said otherwise. (nats-server also rotates the log by size,
    after which the new file has no link line at all.)"""
    _write_log(tmp_path / "nats-server.log", [DIAL_REFUSED, CREATED, UP],
               TAIL_BYTES + 100_000, [])
    assert read_link_state(tmp_path) == "up"


def test_read_link_state_without_a_log_is_never(tmp_path: Path) -> None:
    assert read_link_state(tmp_path) == NEVER
    assert read_link_state(tmp_path / "no-such-dir") == NEVER


def _wait_state(data_dir: Path, done: Callable[[str], bool], timeout: float = 20.0) -> str:
    """Poll the rack's log (a log line is the only sign) until ``done(state)``."""
    deadline = time.monotonic() + timeout
    state = read_link_state(data_dir)
    while not done(state):
        if time.monotonic() > deadline:
            log = (data_dir / "nats-server.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"link state stuck at {state!r}; log tail:\n{log}")
        time.sleep(0.05)
        state = read_link_state(data_dir)
    return state


def test_read_link_state_follows_a_real_rack_and_hub(tmp_path: Path) -> None:
    """A real rack (its passport from ``add_rack``) and a real hub (``HubServer``): hub
    not there yet, linked, hub gone, rack revoked; a second rack pinning another CA."""
    hub_dir, other_dir = tmp_path / "hub", tmp_path / "other"
    hub_dir.mkdir()
    other_dir.mkdir()
    init_pki(hub_dir, ["127.0.0.1"])
    init_pki(other_dir, ["127.0.0.1"])
    leaf_port = free_port()
    settings = MixerSettings(hub_port=free_port(), leaf_host="127.0.0.1", leaf_port=leaf_port,
                             leaf_urls=(f"tls://127.0.0.1:{leaf_port}",))
    passport = read_passport(add_rack(hub_dir, settings, "r1", {}, tmp_path / "r1.passport"))
    rack = NatsServer(rack_id="r1", data_dir=tmp_path / "rack", host="127.0.0.1", port=0,
                      leaf=LeafRemote(urls=passport.hub, seed=passport.nkey_seed,
                                      ca_file=str(HubPki.in_dir(hub_dir).ca_cert)))
    stranger = NatsServer(rack_id="r1", data_dir=tmp_path / "stranger", host="127.0.0.1",
                          port=0, leaf=LeafRemote(urls=passport.hub, seed=passport.nkey_seed,
                                                  ca_file=str(HubPki.in_dir(other_dir).ca_cert)))
    hub = HubServer(hub_dir, settings)
    try:
        rack.start()
        assert _wait_state(rack.data_dir, lambda s: s != NEVER) == DOWN_REFUSED
        hub.start()
        _wait_state(rack.data_dir, lambda s: s == "up")
        stranger.start()
        tls_state = _wait_state(stranger.data_dir, lambda s: s != NEVER)
        assert tls_state.startswith("refused (tls: failed to verify certificate: x509: "
                                    "certificate signed by unknown authority"), tls_state
        stranger.stop()
        hub.stop()
        assert _wait_state(rack.data_dir, lambda s: s != "up") in (DOWN_CLOSED, DOWN_REFUSED)
        assert _wait_state(rack.data_dir, lambda s: s == DOWN_REFUSED) == DOWN_REFUSED
        assert revoke_rack(hub_dir, settings, "r1") == 0  # no Mixer: nothing to kick
        hub.start()
        assert _wait_state(rack.data_dir, lambda s: s != DOWN_REFUSED) == REFUSED_AUTH
    finally:
        stranger.stop()
        rack.stop()
        hub.stop()


# ---------------------------------------------------------------------------------------
# mixer.settings
# ---------------------------------------------------------------------------------------

DEFAULTS = {"hub_host": "127.0.0.1", "hub_port": 4222, "leaf_host": "0.0.0.0",
            "leaf_port": 7422, "leaf_urls": ("tls://127.0.0.1:7422",), "offline_after": 10.0,
            "prometheus_port": None, "rollup_interval": 10.0}


def _fields(s: MixerSettings) -> dict[str, object]:
    return {k: getattr(s, k) for k in DEFAULTS}


def test_no_settings_file_means_the_documented_defaults(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    assert _fields(s) == DEFAULTS
    assert s.hub_url == "nats://127.0.0.1:4222"
    assert _fields(parse_settings(None, "mixer.yaml")) == DEFAULTS
    assert _fields(parse_settings({}, "mixer.yaml")) == DEFAULTS


def test_an_empty_settings_file_means_the_defaults(tmp_path: Path) -> None:
    (tmp_path / SETTINGS_FILE).write_text("# nothing set\n")
    assert _fields(load_settings(tmp_path)) == DEFAULTS


@pytest.mark.parametrize(("hosts", "hub_port", "leaf_port"), [
    (["127.0.0.1"], 4222, 7422),
    (["127.0.0.1", "localhost", "hub.example.org", "10.1.2.3"], 14222, 17422),
    (["hub-1"], 1, 65535),
])
def test_settings_text_reads_back_as_asked(tmp_path: Path, hosts: list[str], hub_port: int,
                                           leaf_port: int) -> None:
    (tmp_path / SETTINGS_FILE).write_text(settings_text(hosts, hub_port, leaf_port))
    s = load_settings(tmp_path)
    assert s.hub_port == hub_port
    assert s.hub_url == f"nats://127.0.0.1:{hub_port}"
    assert s.leaf_port == leaf_port
    assert s.leaf_urls == tuple(f"tls://{h}:{leaf_port}" for h in hosts)
    assert (s.offline_after, s.rollup_interval, s.prometheus_port) == (10.0, 10.0, None)


def test_settings_text_brackets_an_ipv6_host(tmp_path: Path) -> None:
    """``mixer init --host ::1``: a URL with an IPv6 literal needs brackets (RFC 3986
    section 3.2.2); ``tls://::1:7422`` is not a host and port a rack can dial."""
    (tmp_path / SETTINGS_FILE).write_text(settings_text(["::1", "fd00::5"], 4222, 7422))
    assert load_settings(tmp_path).leaf_urls == ("tls://[::1]:7422", "tls://[fd00::5]:7422")


def test_every_key_parses(tmp_path: Path) -> None:
    (tmp_path / SETTINGS_FILE).write_text(
        "hub: {host: 10.0.0.1, port: 5222}\n"
        "leaf: {host: 10.0.0.2, port: 8422, urls: [tls://a.example:8422, tls://10.0.0.2:8422]}\n"
        "registry: {offline_after: 1m}\n"
        "prometheus: {host: 0.0.0.0, port: 9999}\n"
        "rollup_interval: 2500ms\n")
    s = load_settings(tmp_path)
    assert (s.hub_host, s.hub_port, s.leaf_host, s.leaf_port) == ("10.0.0.1", 5222,
                                                                   "10.0.0.2", 8422)
    assert s.leaf_urls == ("tls://a.example:8422", "tls://10.0.0.2:8422")
    assert (s.offline_after, s.rollup_interval) == (60.0, 2.5)
    assert (s.prometheus_host, s.prometheus_port) == ("0.0.0.0", 9999)


def test_an_environment_variable_gives_a_port(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The module says mixer.yaml is read with the rig loader (``${VAR}``); the loader's
    contract is that ``port: ${PORT}`` with PORT=8080 is 8080."""
    monkeypatch.setenv("FX_TEST_HUB_PORT", "4333")
    monkeypatch.setenv("FX_TEST_LEAF_PORT", "7433")
    (tmp_path / SETTINGS_FILE).write_text("hub: {port: \"${FX_TEST_HUB_PORT}\"}\n"
                                          "leaf:\n  port: ${FX_TEST_LEAF_PORT}\n")
    s = load_settings(tmp_path)
    assert (s.hub_port, s.leaf_port) == (4333, 7433)


def _config_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / SETTINGS_FILE
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    return info.value


@pytest.mark.parametrize(("text", "key_path", "words"), [
    ("hub: {port: 0}\n", "hub.port", [">= 1", "0"]),
    ("hub: {port: 70000}\n", "hub.port", ["<= 65535", "70000"]),
    ("leaf: {port: 0}\n", "leaf.port", [">= 1"]),
    ("leaf: {port: 70000}\n", "leaf.port", ["<= 65535"]),
    ("prometheus: {port: 70000}\n", "prometheus.port", ["<= 65535"]),
    ("hub: {port: four}\n", "hub.port", ["integer"]),
    ("leaf: {urls: ['nats://x:1']}\n", "leaf.urls[0]", ["nats://x:1", "tls://"]),
    ("leaf: {urls: ['tls://ok:1', 'nats://x:1']}\n", "leaf.urls[1]", ["nats://x:1"]),
    ("leaf: {urls: 'tls://x:1'}\n", "leaf.urls", ["list"]),
    ("leaf: {hots: 0.0.0.0}\n", "leaf.hots", ["unknown key"]),
    ("hubb: {port: 4222}\n", "hubb", ["unknown key"]),
    ("registry: {offline_after: 10s, grace: 1s}\n", "registry.grace", ["unknown key"]),
    ("registry: {offline_after: 0s}\n", "registry.offline_after", ["0s"]),
    ("registry: {offline_after: abc}\n", "registry.offline_after", ["abc", "duration"]),
    ("rollup_interval: abc\n", "rollup_interval", ["abc"]),
    ("hub: 4222\n", "hub", ["mapping"]),
])
def test_a_wrong_value_names_file_key_path_and_rule(tmp_path: Path, text: str, key_path: str,
                                                    words: list[str]) -> None:
    exc = _config_error(tmp_path, text)
    message = str(exc)
    assert str(tmp_path / SETTINGS_FILE) in message
    assert f": {key_path}: " in message
    assert exc.path == key_path
    for word in words:
        assert word in message, message
    assert "Traceback" not in message


def test_offline_after_below_a_second_is_refused(tmp_path: Path) -> None:
    message = str(_config_error(tmp_path, "registry: {offline_after: 500ms}\n"))
    assert "registry.offline_after" in message


@pytest.mark.parametrize("url", ["tls://", "tls://:7422", "tls://hub:port"])
def test_a_leaf_url_without_host_and_port_is_refused(tmp_path: Path, url: str) -> None:
    """The rule in the message is ``tls://HOST:PORT``; a URL without a host or with a port
    that is not a number cannot be dialled by any rack."""
    message = str(_config_error(tmp_path, f"leaf: {{urls: ['{url}']}}\n"))
    assert "leaf.urls[0]" in message


def test_a_duplicate_key_names_file_key_and_lines(tmp_path: Path) -> None:
    exc = _config_error(tmp_path, "hub:\n  port: 4222\nleaf:\n  port: 7422\n"
                                  "hub:\n  port: 5222\n")
    message = str(exc)
    assert str(tmp_path / SETTINGS_FILE) in message
    assert exc.path == "hub" and "duplicate" in message
    assert re.search(r"\b1\b.*\b5\b", exc.problem), message  # both lines named


def test_a_duplicate_nested_key_names_its_path(tmp_path: Path) -> None:
    message = str(_config_error(tmp_path, "leaf:\n  port: 7422\n  port: 7423\n"))
    assert str(tmp_path / SETTINGS_FILE) in message
    assert "leaf.port" in message and "duplicate" in message


# ---------------------------------------------------------------------------------------
# mixer.enrol + mixer.hubfiles (no Mixer running)
# ---------------------------------------------------------------------------------------

LEAF_URLS = ("tls://hub.example:7422", "tls://10.9.8.7:7422")
SETTINGS = MixerSettings(leaf_urls=LEAF_URLS)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    """A hub dir as ``mixer init`` leaves it (its PKI; no Mixer running)."""
    d = tmp_path / "hub"
    d.mkdir(mode=0o700)
    init_pki(d, ["127.0.0.1", "hub.example"])
    return d


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where passports go: outside the hub dir (the hub never keeps a seed)."""
    d = tmp_path / "passports"
    d.mkdir()
    return d


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _racks_doc(hub_dir: Path) -> list[dict[str, object]]:
    doc = json.loads((hub_dir / "racks.json").read_text())
    assert isinstance(doc, dict) and isinstance(doc["racks"], list)
    return doc["racks"]


def test_add_rack_writes_a_private_passport_the_rack_can_read(hub_dir: Path,
                                                              out_dir: Path) -> None:
    out = out_dir / "rack-a.passport"
    assert add_rack(hub_dir, SETTINGS, "rack-a", {"site": "lab", "role": "pay"}, out) == out
    assert _mode(out) == 0o600
    p = read_passport(out)
    assert p.rack == "rack-a"
    assert p.hub == LEAF_URLS
    assert p.ca == HubPki.in_dir(hub_dir).ca_cert.read_text()
    assert dict(p.labels) == {"site": "lab", "role": "pay"}
    assert p.issued.endswith("Z")
    assert p.nkey_seed.startswith("SU")


def test_racks_json_is_private_and_holds_only_the_public_key(hub_dir: Path,
                                                             out_dir: Path) -> None:
    seeds = []
    for rack in ("rack-a", "rack-b"):
        seeds.append(read_passport(add_rack(hub_dir, SETTINGS, rack, {"site": "lab"},
                                            out_dir / f"{rack}.passport")).nkey_seed)
    assert _mode(hub_dir / "racks.json") == 0o600
    entries = _racks_doc(hub_dir)
    assert [e["id"] for e in entries] == ["rack-a", "rack-b"]
    for entry, seed in zip(entries, seeds):
        assert set(entry) == {"id", "nkey", "labels", "enrolled", "revoked"}
        assert entry["nkey"] == public_key(seed)
        assert entry["labels"] == {"site": "lab"}
        assert entry["revoked"] == ""
    # no trace of a seed anywhere in the hub dir, in any encoding of it
    for seed in seeds:
        raw = decode_seed(seed)
        needles = [seed.encode(), raw, raw.hex().encode(), base64.b64encode(raw),
                   base64.b32encode(raw).rstrip(b"=")]
        for path in hub_dir.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for needle in needles:
                    assert needle not in data, f"{path} holds a rack's private key"


def test_adding_an_enrolled_rack_again_is_refused_and_nothing_is_overwritten(
        hub_dir: Path, out_dir: Path) -> None:
    first = out_dir / "r1.passport"
    add_rack(hub_dir, SETTINGS, "r1", {}, first)
    before, racks_before = first.read_bytes(), (hub_dir / "racks.json").read_bytes()
    for out in (out_dir / "r1-again.passport", first):
        with pytest.raises(EnrolError, match=r"'r1' is enrolled already"):
            add_rack(hub_dir, SETTINGS, "r1", {}, out)
    assert not (out_dir / "r1-again.passport").exists()
    assert first.read_bytes() == before
    assert (hub_dir / "racks.json").read_bytes() == racks_before


def test_a_new_rack_onto_an_existing_passport_file_is_refused_and_not_listed(
        hub_dir: Path, out_dir: Path) -> None:
    taken = out_dir / "taken.passport"
    add_rack(hub_dir, SETTINGS, "r1", {}, taken)
    before = taken.read_bytes()
    with pytest.raises(EnrolError, match="exists"):
        add_rack(hub_dir, SETTINGS, "r2", {}, taken)
    assert taken.read_bytes() == before
    assert [r.id for r in read_racks(hub_dir)] == ["r1"]


@pytest.mark.parametrize("rack", ["hub", "up", "down", "src", "stats", "mixer"])
def test_a_reserved_rack_id_is_refused(hub_dir: Path, out_dir: Path, rack: str) -> None:
    with pytest.raises(EnrolError) as info:
        add_rack(hub_dir, SETTINGS, rack, {}, out_dir / "p")
    assert f"{rack!r}" in str(info.value) and "reserved" in str(info.value)
    assert not (out_dir / "p").exists()
    assert read_racks(hub_dir) == []


@pytest.mark.parametrize("rack", ["Rack A", "a.b", "x" * 40, "", "-lead", "rack/a", "Rack"])
def test_a_malformed_rack_id_is_refused(hub_dir: Path, out_dir: Path, rack: str) -> None:
    with pytest.raises(EnrolError) as info:
        add_rack(hub_dir, SETTINGS, rack, {}, out_dir / "p")
    message = str(info.value)
    assert f"invalid rack id {rack!r}" in message
    assert "lowercase" in message and "32" in message
    assert not (out_dir / "p").exists()
    assert read_racks(hub_dir) == []


def test_add_without_mixer_init_names_the_missing_ca_file(tmp_path: Path,
                                                          out_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(EnrolError) as info:
        add_rack(bare, SETTINGS, "r1", {}, out_dir / "r1.passport")
    message = str(info.value)
    assert str(bare / "pki" / "ca.pem") in message
    assert "mixer init" in message
    assert not (out_dir / "r1.passport").exists()
    assert not (bare / "racks.json").exists()


def test_revoking_an_unknown_rack_is_refused(hub_dir: Path) -> None:
    with pytest.raises(EnrolError, match=r"rack 'ghost' is not enrolled"):
        revoke_rack(hub_dir, SETTINGS, "ghost")
    assert read_racks(hub_dir) == []


def test_revoking_twice_is_refused_and_a_revoked_id_is_never_reused(hub_dir: Path,
                                                                     out_dir: Path) -> None:
    add_rack(hub_dir, SETTINGS, "r1", {}, out_dir / "r1.passport")
    assert revoke_rack(hub_dir, SETTINGS, "r1") == 0  # no hub running: no link to drop
    (entry,) = _racks_doc(hub_dir)
    assert entry["id"] == "r1" and str(entry["revoked"]).endswith("Z")
    revoked_at = entry["revoked"]
    with pytest.raises(EnrolError, match=r"'r1' was revoked already"):
        revoke_rack(hub_dir, SETTINGS, "r1")
    with pytest.raises(EnrolError, match=r"'r1' is enrolled already"):
        add_rack(hub_dir, SETTINGS, "r1", {}, out_dir / "r1-new.passport")
    assert not (out_dir / "r1-new.passport").exists()
    (entry,) = _racks_doc(hub_dir)
    assert entry["revoked"] == revoked_at


def test_the_hub_config_lists_only_enrolled_racks_not_revoked(hub_dir: Path,
                                                              out_dir: Path) -> None:
    keys = {}
    for rack in ("r1", "r2", "r3"):
        p = read_passport(add_rack(hub_dir, SETTINGS, rack, {}, out_dir / f"{rack}.passport"))
        keys[rack] = p.public_key
    revoke_rack(hub_dir, SETTINGS, "r2")
    conf = json.loads(HubServer(hub_dir, SETTINGS).config_text())
    users = conf["authorization"]["users"]
    by_key = {u["nkey"]: u for u in users if "nkey" in u}
    assert set(by_key) == {keys["r1"], keys["r3"]}
    for rack in ("r1", "r3"):
        publish = by_key[keys[rack]]["permissions"]["publish"]["allow"]
        assert f"fluxrig.stats.{rack}" in publish
        assert not any(".r2." in s or s.endswith(".r2") for s in publish)
    # the hub's own users carry the passwords of nats-users.json; sys lives in SYS
    passwords = local_users(hub_dir)
    named = {u["user"]: u["password"] for u in users if "user" in u}
    assert named == {"registry": passwords["registry"], "admin": passwords["admin"],
                     "archiver": passwords["archiver"], "console": passwords["console"],
                     "traces": passwords["traces"]}
    assert conf["accounts"]["SYS"]["users"] == [{"user": "sys", "password": passwords["sys"],
                                                 "allowed_connection_types": ["STANDARD"]}]
    assert conf["leafnodes"]["port"] == SETTINGS.leaf_port
    assert conf["leafnodes"]["tls"]["cert_file"] == str(HubPki.in_dir(hub_dir.resolve()).hub_cert)
    # no seed in the config either
    text = json.dumps(conf)
    for rack in keys:
        assert read_passport(out_dir / f"{rack}.passport").nkey_seed not in text


def test_the_hub_config_with_no_racks_has_only_the_hubs_users(hub_dir: Path) -> None:
    conf = json.loads(HubServer(hub_dir, SETTINGS).config_text())
    assert not [u for u in conf["authorization"]["users"] if "nkey" in u]


def test_local_users_are_private_and_stable(hub_dir: Path) -> None:
    first = local_users(hub_dir)
    path = hub_dir / "nats-users.json"
    assert _mode(path) == 0o600
    assert set(first) >= {"registry", "admin", "sys"}
    assert all(len(pw) >= 16 for pw in first.values())
    assert len(set(first.values())) == len(first)
    assert json.loads(path.read_text()) == first
    before = path.read_bytes()
    assert local_users(hub_dir) == first
    assert path.read_bytes() == before


def test_local_users_fills_in_a_missing_user_and_keeps_the_others(hub_dir: Path) -> None:
    path = hub_dir / "nats-users.json"
    path.write_text(json.dumps({"registry": "kept-registry-password"}))
    users = local_users(hub_dir)
    assert users["registry"] == "kept-registry-password"
    assert users["admin"] and users["sys"]
    assert json.loads(path.read_text()) == users
    assert _mode(path) == 0o600


CHILD = r"""
import sys
from pathlib import Path
from mixer.enrol import add_rack
from mixer.settings import MixerSettings

hub_dir, out_dir, *racks = sys.argv[1:]
settings = MixerSettings(leaf_urls=("tls://hub.example:7422",))
print("ready", flush=True)
sys.stdin.readline()  # the go: every child is imported and waiting
for rack in racks:
    add_rack(Path(hub_dir), settings, rack, {"by": racks[0]}, Path(out_dir) / rack)
print("done", flush=True)
"""


def test_concurrent_enrolments_from_processes_are_all_kept(hub_dir: Path,
                                                           out_dir: Path) -> None:
    ids = [[f"p{i}-r{j}" for j in range(4)] for i in range(8)]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(hub_dir), str(out_dir),
                                  *racks], cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for racks in ids]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.close()
        for child in children:
            assert child.stdout is not None and child.stderr is not None
            out, err = child.stdout.read(), child.stderr.read()
            assert child.wait(60) == 0, err
            assert out == "done\n"
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    expected = sorted(r for racks in ids for r in racks)
    enrolled = read_racks(hub_dir)
    assert sorted(r.id for r in enrolled) == expected
    assert len({r.nkey for r in enrolled}) == len(expected)
    for r in enrolled:
        assert r.nkey == read_passport(out_dir / r.id).public_key
    assert _mode(hub_dir / "racks.json") == 0o600


def test_concurrent_enrolments_from_threads_are_all_kept(hub_dir: Path,
                                                         out_dir: Path) -> None:
    ids = [f"t{i}" for i in range(8)]
    barrier = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def enrol(rack: str) -> None:
        barrier.wait()
        try:
            add_rack(hub_dir, SETTINGS, rack, {}, out_dir / rack)
        except BaseException as exc:  # reported below, with the rack
            errors.append(exc)

    threads = [threading.Thread(target=enrol, args=(r,)) for r in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(r.id for r in read_racks(hub_dir)) == sorted(ids)


# ---------------------------------------------------------------------------------------
# the mixer command line, as a subprocess
# ---------------------------------------------------------------------------------------

def _mixer(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixer.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def test_mixer_init_makes_a_private_hub_dir(tmp_path: Path) -> None:
    d = tmp_path / "hub"
    port, leaf_port = 14999, 17999
    r = _mixer("init", d, "--host", "127.0.0.1", "--port", port, "--leaf-port", leaf_port)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    pki = HubPki.in_dir(d)
    assert _mode(d) == 0o700
    assert _mode(pki.ca_key) == 0o600 and _mode(pki.hub_key) == 0o600
    assert pki.ca_cert.exists() and pki.hub_cert.exists()
    assert certificate_hosts(pki.hub_cert) == ["127.0.0.1"]
    assert _mode(d / "nats-users.json") == 0o600
    assert set(json.loads((d / "nats-users.json").read_text())) >= {"registry", "admin", "sys"}
    s = load_settings(d)
    assert (s.hub_port, s.leaf_port) == (port, leaf_port)
    assert s.leaf_urls == (f"tls://127.0.0.1:{leaf_port}",)
    assert str(pki.ca_cert) in r.stdout


def test_a_second_mixer_init_refuses_to_overwrite_key_material(tmp_path: Path) -> None:
    d = tmp_path / "hub"
    assert _mixer("init", d, "--host", "127.0.0.1").returncode == 0
    pki = HubPki.in_dir(d)
    files = [pki.ca_cert, pki.ca_key, pki.hub_cert, pki.hub_key, d / "nats-users.json",
             d / SETTINGS_FILE]
    before = {f: f.read_bytes() for f in files}
    r = _mixer("init", d, "--host", "127.0.0.1", "--port", 5000, "--leaf-port", 5001)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "refusing to overwrite" in r.stderr
    assert any(str(f) in r.stderr for f in files[:4]), r.stderr
    assert {f: f.read_bytes() for f in files} == before


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_without_a_mixer_say_so(tmp_path: Path, command: str) -> None:
    d = tmp_path / "hub"
    assert _mixer("init", d, "--host", "127.0.0.1").returncode == 0
    for target in (d, tmp_path / "never-made"):
        r = _mixer(command, target)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "no mixer running" in r.stderr
        assert "Traceback" not in r.stderr


def test_racks_with_the_mixer_never_started_lists_the_enrolled_racks_never_seen(
        tmp_path: Path) -> None:
    d = tmp_path / "hub"
    assert _mixer("init", d, "--host", "127.0.0.1").returncode == 0
    assert _mixer("rack", "add", d, "r1", "--out", tmp_path / "r1.passport",
                  "--label", "site=x").returncode == 0
    r = _mixer("racks", d, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert [(x["id"], x["state"], x["labels"]) for x in json.loads(r.stdout)] == [
        ("r1", "never-seen", {"site": "x"})]
    assert not (d / "registry.duckdb").exists()  # a reader never creates the writer's file


def test_the_shipped_mixer_settings_parse_and_name_every_key() -> None:
    from engine.yamlfile import load_yaml

    path = Path(__file__).resolve().parent.parent / "configs" / "mixer.yaml"
    doc = load_yaml(path)
    s = parse_settings(doc.data, str(path))
    assert set(doc.data) == {"hub", "leaf", "registry", "prometheus", "rollup_interval",
                             "simulator", "audit", "console", "traces"}
    assert s.leaf_urls == ("tls://127.0.0.1:7422",) and s.prometheus_port == 9466
    assert set(doc.data["audit"]) == {f.name for f in fields(AuditSettings)}
    assert s.audit == AuditSettings()  # the file shows the defaults
    assert set(doc.data["console"]) == {f.name for f in fields(ConsoleSettings)}
    assert s.console == ConsoleSettings(enabled=True)  # on there, the rest the defaults
    from mixer.settings import TracesSettings

    assert set(doc.data["traces"]) == {f.name for f in fields(TracesSettings)} - {"forward"}
    assert s.traces == TracesSettings()


@pytest.mark.parametrize("audit, message", [
    ("{flush_rows: 0}", "audit.flush_rows"),
    ("{flush_after: soon}", "audit.flush_after"),
    ("{retention_days: -1}", "audit.retention_days"),
    ("{enabled: maybe}", "audit.enabled"),
    ("{keep: 3}", "keep"),
])
def test_wrong_audit_settings_name_the_key(tmp_path: Path, audit: str, message: str) -> None:
    import yaml

    with pytest.raises(ConfigError) as err:
        parse_settings(yaml.safe_load(f"audit: {audit}"), "mixer.yaml")
    assert message in str(err.value) and "mixer.yaml" in str(err.value)


def test_audit_settings_in_words() -> None:
    import yaml

    s = parse_settings(yaml.safe_load("audit: {enabled: false, flush_rows: 10, "
                                      "flush_after: 250ms, compact_after: 1h, "
                                      "retention_days: 30}"), "mixer.yaml")
    assert s.audit == AuditSettings(enabled=False, flush_rows=10, flush_after=0.25,
                                    compact_after=3600.0, retention_days=30)


def test_the_quick_path_takes_only_well_formed_json_questions_to_a_running_mixer(
        tmp_path: Path) -> None:
    """``mixer racks DIR --json`` skips the CLI framework; anything else (a table, help, an
    unknown flag, a stopped Mixer) must reach the full CLI, which says what is wrong."""
    from mixer.ask import quick_main

    d = tmp_path / "hub"
    d.mkdir()
    for argv in (["racks", str(d)], ["racks", str(d), "--bogus"], ["top", str(d)],
                 ["racks", "--help"], ["racks", str(d), "--label", "=x", "--json"],
                 ["top", str(d), "--label", "a=b", "--json"], ["status", str(d)],
                 ["racks", str(d), "--json"]):  # the last: well formed, but none running
        assert quick_main(argv) is False, argv


def test_the_link_watch_reads_only_what_the_log_gained_and_follows_a_rotation(
        tmp_path: Path) -> None:
    """Telemetry asks every second; re-reading a 16 MiB log each time cost it its CPU."""
    from engine.hublink import LinkWatch

    log = tmp_path / "nats-server.log"
    up = ('[1] 2026/11/28 05:50:09.192082 [INF] 127.0.0.1:17422 - lid:10 - JetStream using '
          'domains: local "r1", remote "hub"\n')
    closed = "[1] 2026/11/28 05:50:21.866882 [INF] 127.0.0.1:17422 - lid:10 - Leafnode connection closed: Client Closed - Remote: hub\n"
    refused = "[1] 2026/11/28 05:50:22.873477 [ERR] 127.0.0.1:17422 - lid:14 - Leafnode Error 'Authorization Violation'\n"
    watch = LinkWatch(tmp_path)
    assert watch.state() == "connecting (no answer from the hub yet)"
    log.write_text(up + "x" * 100 + "\n")
    assert watch.state() == "up"
    with open(log, "a") as f:
        f.write(("[1] unrelated line\n" * 200_000) + closed)  # 3.6 MiB past the verdict
    assert watch.state() == "down (link closed)"  # the "up" before it was remembered
    with open(log, "a") as f:
        f.write(refused)
    assert watch.state() == "refused (authorization)"
    log.rename(tmp_path / "nats-server.log.1")  # rotated: a new file, read whole
    log.write_text(up)
    assert watch.state() == "up"


@pytest.mark.parametrize("console, message", [
    ("{port: 70000}", "console.port"), ("{session_ttl: 5s}", "console.session_ttl"),
    ("{max_clients: 0}", "console.max_clients"), ("{tls: true}", "tls")])
def test_wrong_console_settings_name_the_key(console: str, message: str) -> None:
    import yaml

    with pytest.raises(ConfigError) as err:
        parse_settings(yaml.safe_load(f"console: {console}"), "mixer.yaml")
    assert message in str(err.value) and "mixer.yaml" in str(err.value)
