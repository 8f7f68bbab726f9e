"""The hub's nats-server config: per-rack permission tables (docs/mixer-design.md section 6)
and a real nats-server that starts from the rendered config, TLS leaf listener included."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import pytest

from engine.identity import new_seed, public_key
from engine.natsd import free_port, nats_server_binary
from mixer.hubconf import (
    HubConfigError,
    HubPlan,
    RackUser,
    check_rack_id,
    rack_permissions,
    render_hub_config,
)
from mixer.pki import init_pki


def test_a_rack_may_only_speak_and_hear_its_own_subjects():
    perms = rack_permissions("rack-a")
    pub, sub = perms["publish"]["allow"], perms["subscribe"]["allow"]
    assert "fluxrig.stats.rack-a" in pub and "fluxrig.up.rack-a.>" in pub
    assert "fluxrig.traces.rack-a" in pub and "fluxrig.logs.rack-a" in pub
    assert "fluxrig.down.rack-a.>" in sub and "$JS.FC.rack-a.>" in sub
    for subject in pub + sub:  # nothing of another rack, nothing fleet-wide
        assert "rack-b" not in subject
        assert subject not in ("fluxrig.>", ">", "$JS.FC.>", "$JS.hub.API.>", "_INBOX.>")
    hub_api = [s for s in pub if s.startswith("$JS.hub.API.")]
    assert hub_api and all(s.endswith("KV_fluxrig_config.cfg_rack-a") for s in hub_api)


@pytest.mark.parametrize(("rack", "message"), [
    ("hub", "reserved"), ("stats", "reserved"), ("traces", "reserved"), ("logs", "reserved"), ("Rack", "invalid rack id"),
    ("a.b", "invalid rack id"), ("x" * 33, "invalid rack id"),
])
def test_bad_or_reserved_rack_ids_are_refused(rack, message):
    with pytest.raises(HubConfigError, match=message):
        check_rack_id(rack)


def _plan(tmp_path, pki) -> HubPlan:
    return HubPlan(host="127.0.0.1", port=free_port(), leaf_host="127.0.0.1",
                   leaf_port=free_port(), store_dir=str(tmp_path / "js"),
                   cert_file=str(pki.hub_cert), key_file=str(pki.hub_key),
                   log_file=str(tmp_path / "nats-server.log"), sys_password="sys-pw-1")


def test_the_same_rack_or_key_twice_is_refused(tmp_path):
    pki = init_pki(tmp_path, ["127.0.0.1"])
    key = public_key(new_seed())
    with pytest.raises(HubConfigError, match="enrolled twice"):
        render_hub_config(_plan(tmp_path, pki), [RackUser(rack="a", nkey=key),
                                                 RackUser(rack="a", nkey=public_key(new_seed()))])
    with pytest.raises(HubConfigError, match="nkey already used"):
        render_hub_config(_plan(tmp_path, pki), [RackUser(rack="a", nkey=key),
                                                 RackUser(rack="b", nkey=key)])


def test_a_real_hub_starts_from_the_rendered_config_with_a_tls_leaf_listener(tmp_path):
    pki = init_pki(tmp_path, ["127.0.0.1"])
    plan = _plan(tmp_path, pki)
    racks = [RackUser(rack=f"rack-{c}", nkey=public_key(new_seed())) for c in "ab"]
    conf = tmp_path / "hub.conf"
    conf.write_text(render_hub_config(plan, racks))
    assert json.loads(conf.read_text())["jetstream"]["domain"] == "hub"
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        info = b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", plan.port), timeout=0.5) as s:
                    info = s.recv(4096)
                break
            except OSError:
                time.sleep(0.05)  # a starting server has no readiness event to wait on
        assert proc.poll() is None, (tmp_path / "nats-server.log").read_text()[-500:]
        assert b'"auth_required":true' in info and b'"jetstream":true' in info
        # the leaf port speaks TLS with the hub certificate, verified by the CA racks hold
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        with socket.create_connection(("127.0.0.1", plan.leaf_port), timeout=5) as raw:
            raw.recv(4096)  # nats-server sends INFO in clear first, then expects TLS
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() is not None
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_leaf_link_lets_a_racks_traces_and_logs_cross():
    """A rack's link denies exports of its business subjects ``fluxrig.<rack>.>`` only:
    ``fluxrig.traces.<rack>`` and ``fluxrig.logs.<rack>`` are not under them (the ids
    ``traces`` and ``logs`` are reserved so they never are)."""
    from engine.natsd import leaf_deny_exports, leaf_deny_imports
    from engine.streams import subject_matches

    for rack in ("rack-a", "t", "logs-1"):
        for subject in (f"fluxrig.traces.{rack}", f"fluxrig.logs.{rack}"):
            assert not any(subject_matches(p, subject) for p in leaf_deny_exports(rack))
            assert not any(subject_matches(p, subject) for p in leaf_deny_imports(rack))


def test_the_traces_user_hears_traces_and_logs_and_publishes_nothing():
    from mixer.hubfiles import user_entries

    users = {u: "pw" for u in ("registry", "admin", "sys", "sim", "archiver", "console",
                               "traces")}
    entries = {e["user"]: e["permissions"] for e in user_entries(users, simulator=True)}
    assert entries["traces"] == {"publish": {"deny": [">"]}, "subscribe": {"allow": [
        "fluxrig.traces.*", "fluxrig.logs.*", "_INBOX.>"]}}
    assert "fluxrig.logs.*" in entries["admin"]["subscribe"]["allow"]  # mixer logs --follow
    assert "fluxrig.traces.*" not in entries["admin"]["subscribe"]["allow"]
