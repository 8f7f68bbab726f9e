"""A rack with a passport links to a real hub (nats-server rendered by mixer.hubconf) as a
leaf node over TLS with its nkey: its stats reach the hub; what it may not say does not
(another rack's stats subject, its own business subjects)."""

from __future__ import annotations

import asyncio
import subprocess

import nats
from rackutil import RackProcess, rig, uid

from engine.bus import load_auth
from engine.identity import Passport, new_seed, public_key, write_passport
from engine.natsd import free_port, nats_server_binary
from mixer.hubconf import HubPlan, RackUser, render_hub_config
from mixer.pki import init_pki

HUB_ADMIN = {"user": "admin", "password": "hub-admin-pw"}


def _hub(tmp_path, racks):
    pki = init_pki(tmp_path / "hub", ["127.0.0.1"])
    plan = HubPlan(host="127.0.0.1", port=free_port(), leaf_host="127.0.0.1",
                   leaf_port=free_port(), store_dir=str(tmp_path / "hub" / "js"),
                   cert_file=str(pki.hub_cert), key_file=str(pki.hub_key),
                   log_file=str(tmp_path / "hub" / "nats-server.log"), sys_password="s")
    conf = tmp_path / "hub" / "hub.conf"
    conf.write_text(render_hub_config(plan, racks, [HUB_ADMIN]))
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return proc, plan, pki


async def _watch_hub(plan, rack_id, rack_state, data_dir):
    hub = await nats.connect(f"nats://127.0.0.1:{plan.port}", user=HUB_ADMIN["user"],
                             password=HUB_ADMIN["password"], max_reconnect_attempts=50,
                             reconnect_time_wait=0.1)
    try:
        own = await hub.subscribe(f"fluxrig.stats.{rack_id}")
        forged = await hub.subscribe("fluxrig.stats.someone-else")
        business = await hub.subscribe(f"fluxrig.{rack_id}.>")
        msg = await own.next_msg(timeout=30)  # the link is up and the subject allowed
        # on the rack's own bus, its admin says what the rack may not say to the hub
        auth = load_auth(data_dir)
        local = await nats.connect(rack_state["nats_url"], user=auth.user,
                                   password=auth.password)
        try:
            for _ in range(3):
                await local.publish("fluxrig.stats.someone-else", b"forged")
                await local.publish(f"fluxrig.{rack_id}.secret", b"business")
            await local.flush()
            await own.next_msg(timeout=10)  # later than the forgeries: they had their chance
        finally:
            await local.close()
        return msg.data, forged.pending_msgs, business.pending_msgs
    finally:
        await hub.close()


def test_a_linked_rack_reaches_its_hub_and_only_with_its_own_subjects(tmp_path):
    rack_id = uid("hl")
    seed = new_seed()
    proc, plan, pki = _hub(tmp_path, [RackUser(rack=rack_id, nkey=public_key(seed))])
    passport = tmp_path / "rack.passport"
    write_passport(passport, Passport(rack=rack_id, hub=(f"tls://127.0.0.1:{plan.leaf_port}",),
                                      nkey_seed=seed, ca=pki.ca_cert.read_text(),
                                      issued="2026-11-28T00:00:00Z"))
    config = rig(tmp_path, rack_id, count=0, rate=20, mixer={"passport": str(passport)},
                 telemetry={"interval": 0.2})
    rack = RackProcess(config, tmp_path / "data")
    try:
        snapshot, forged, business = asyncio.run(
            _watch_hub(plan, rack_id, rack.state, tmp_path / "data"))
        assert rack.stop() == 0
    finally:
        rack.close()
        proc.terminate()
        proc.wait(10)
    from engine.cbor import loads

    assert loads(snapshot)["rack"] == rack_id
    assert forged == 0  # the hub's permissions: only fluxrig.stats.<own id>
    assert business == 0  # the rack's deny_exports: business subjects stay home
    conf = (tmp_path / "data" / "nats-server.conf").read_text()
    assert (tmp_path / "data" / "nats-server.conf").stat().st_mode & 0o077 == 0  # holds the seed
    assert seed in conf


def test_a_rig_whose_passport_is_for_another_rack_is_refused(tmp_path):
    from engine.config import ConfigError, load_config

    passport = tmp_path / "p"
    write_passport(passport, Passport(rack="other", hub=("tls://127.0.0.1:1",),
                                      nkey_seed=new_seed(), ca="x", issued="z"))
    config = rig(tmp_path, "mine", count=1, rate=0, mixer={"passport": str(passport)})
    try:
        load_config(config)
    except ConfigError as exc:
        assert "mixer.passport: the passport is for rack 'other', this rig is rack 'mine'" \
            in str(exc)
    else:
        raise AssertionError("accepted a passport for another rack")
