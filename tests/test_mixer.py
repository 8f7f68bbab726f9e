"""The Mixer end to end: `mixer start` (hub nats-server + registry under the rack's process
machinery), racks enrolled with the real CLI linking as leaf nodes over TLS, their events
sourced into the hub exactly once through a hub SIGKILL and a cut link, registry states,
revocation, and the rack's own view of its link."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import yaml
from mixerutil import (
    LinkProxy,
    MixerProcess,
    engine_status,
    enrol,
    hub_count,
    hub_ports,
    hub_stream,
    init_hub,
    linked_rig,
    mixer,
    racks,
    wait_until,
    write_settings,
)
from rackutil import RackProcess, rig, uid


def test_mixer_start_status_restart_and_stop(tmp_path):
    hub = init_hub(tmp_path)
    assert (hub / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (hub / "nats-users.json").stat().st_mode & 0o777 == 0o600
    m = MixerProcess(hub)
    try:
        again = mixer("start", str(hub), "--log-file", "-")
        assert again.returncode == 3 and "mixer already running" in again.stderr
        status = json.loads(mixer("status", str(hub), "--json").stdout)
        assert status["ready"]
        assert [p["name"] for p in status["processes"]] == ["registry", "archiver", "traces"]
        registry = status["processes"][0]["pid"]
        os.kill(registry, signal.SIGKILL)  # the process set restarts it
        wait_until(lambda: m.state()["processes"][0]["restarts"] == 1
                   and m.state()["processes"][0]["pid"] not in (None, registry), 20,
                   "the registry restarted")
        hub_pid = m.state()["hub_pid"]
        os.kill(hub_pid, signal.SIGKILL)  # and the hub's nats-server on its port and store
        wait_until(lambda: m.state()["hub_pid"] not in (None, hub_pid), 20,
                   "the hub restarted")
        text = mixer("status", str(hub)).stdout
        assert "mixer: running (ready)" in text and "restarts=1" in text
        stopped = mixer("stop", str(hub))
        assert stopped.returncode == 0, stopped.stderr
        assert m.proc.wait(30) == 0
    finally:
        m.close()
    assert "mixer stopped cleanly" in m.output()
    assert mixer("status", str(hub)).returncode == 1


def test_a_linked_rack_goes_online_and_its_events_reach_the_hub_exactly_once_through_a_hub_kill(
        tmp_path):
    hub = init_hub(tmp_path, offline_after="2s", prometheus=True)
    m = MixerProcess(hub)
    rack_id = uid("src")
    passport = enrol(hub, rack_id, "site=lab", "line=7")
    quiet = uid("quiet")
    enrol(hub, quiet, "site=elsewhere")
    assert passport.stat().st_mode & 0o777 == 0o600
    total = 3000
    config, data = linked_rig(tmp_path, rack_id, passport, count=total, rate=300)
    rack = RackProcess(config, data)
    try:
        wait_until(lambda: any(r["id"] == rack_id and r["state"] == "online"
                               for r in racks(hub)), 30, "the rack online")
        assert [r["id"] for r in racks(hub, "site=lab")] == [rack_id]
        quiet_rows = racks(hub, "site=elsewhere")  # (a CI run once saw none: say more then)
        assert [r["state"] for r in quiet_rows] == ["never-seen"], (
            racks(hub), (hub / "racks.json").read_text(), m.output()[-4000:])
        online = next(r for r in racks(hub) if r["id"] == rack_id)
        assert online["labels"] == {"site": "lab", "line": "7"} and online["version"]
        assert len(online["rig_hash"]) == 64
        stream = f"EV_{rack_id}"
        wait_until(lambda: asyncio.run(hub_count(hub, stream)) >= 500, 30, "events at the hub")
        os.kill(m.state()["hub_pid"], signal.SIGKILL)
        killed = time.monotonic()
        old = m.state()["hub_pid"]
        wait_until(lambda: m.state()["hub_pid"] not in (None, old), 20, "the hub restarted")
        back = time.monotonic()
        rack.wait_for(lambda: rack.counters("source").snapshot().frames_out >= total, 60,
                      "the generator done")
        catch_up = wait_until(lambda: asyncio.run(hub_count(hub, stream)) >= total, 60,
                              "every event at the hub")
        count, seqs = asyncio.run(hub_stream(hub, stream))
        assert "hub link: up" in engine_status(data)
        port = m.state()["prometheus"]
        scrape = urllib.request.urlopen(f"http://{port}/metrics", timeout=5).read().decode()
        top = json.loads(mixer("top", str(hub), "--json").stdout)
        asked = mixer("rack", "status", str(hub), rack_id, "--json")  # over the link
        silent = mixer("rack", "status", str(hub), quiet)
        assert rack.stop() == 0
        wait_until(lambda: next(r for r in racks(hub) if r["id"] == rack_id)["state"]
                   == "offline", 20, "the rack offline")
        assert m.stop() == 0
    finally:
        rack.close()
        m.close()
    print(f"hub down {back - killed:.2f} s; all at the hub {catch_up:.2f} s after the rack's "
          f"last event")
    assert count == total and sorted(seqs) == list(range(total))  # none lost, none twice
    assert seqs == sorted(seqs)  # in order
    assert f'rack="{rack_id}"' in scrape and 'site="lab"' in scrape
    answer = json.loads(asked.stdout)
    assert answer["rack"] == rack_id and answer["hub_link"] == "up"
    assert {p["name"] for p in answer["processes"]} >= {"egress", "telemetry", "p.source"}
    assert silent.returncode == 1 and (f"rack {quiet!r}: no answer (the registry has it "
                                       f"never-seen)") in silent.stderr
    row = next(r for r in top if r["rack"] == rack_id)
    assert row["backlog"] is not None
    stopped = racks(hub)  # the Mixer is stopped: the CLI reads the registry's file
    assert next(r for r in stopped if r["id"] == rack_id)["state"] == "offline"


def test_a_cut_link_loses_nothing_and_catches_up(tmp_path, peers):
    hub = init_hub(tmp_path)
    port, leaf = hub_ports(hub)
    proxy = LinkProxy(peers, leaf)  # passports send racks through the proxy
    write_settings(hub, port, leaf, [f"tls://127.0.0.1:{proxy.port}"])
    m = MixerProcess(hub)
    rack_id = uid("cut")
    passport = enrol(hub, rack_id)
    total = 2000
    config, data = linked_rig(tmp_path, rack_id, passport, count=total, rate=500)
    rack = RackProcess(config, data)
    stream = f"EV_{rack_id}"
    try:
        wait_until(lambda: asyncio.run(hub_count(hub, stream)) >= 300, 30, "events at the hub")
        proxy.cut()
        wait_until(lambda: "hub link: down" in engine_status(data), 20, "the rack sees the cut")
        before = asyncio.run(hub_count(hub, stream))
        # the rack goes on alone: its generator finishes during the outage
        rack.wait_for(lambda: rack.counters("source").snapshot().frames_out >= total, 60,
                      "the generator done")
        assert asyncio.run(hub_count(hub, stream)) == before < total  # nothing crossed
        proxy.mend()
        catch_up = wait_until(lambda: asyncio.run(hub_count(hub, stream)) >= total, 60,
                              "every event at the hub")
        count, seqs = asyncio.run(hub_stream(hub, stream))
        assert rack.stop() == 0
        assert m.stop() == 0
    finally:
        rack.close()
        m.close()
        proxy.close()
    print(f"catch-up after the link came back {catch_up:.2f} s")
    assert count == total and seqs == list(range(total))


def test_revoked_unknown_and_untrusting_racks_are_refused_and_say_so(tmp_path):
    hub = init_hub(tmp_path)
    other = init_hub(tmp_path / "other")  # another hub's CA: the rack will not trust ours
    m = MixerProcess(hub)
    rack_id, stranger, wrong_ca = uid("rev"), uid("stranger"), uid("wrongca")
    passport = enrol(hub, rack_id)
    foreign = enrol(other, stranger)  # a passport this hub never issued
    untrusting = enrol(hub, wrong_ca)
    doc = json.loads(untrusting.read_text())
    doc["ca"] = (other / "pki" / "ca.pem").read_text()
    untrusting.chmod(0o600)
    untrusting.write_text(json.dumps(doc))
    # the stranger's passport points at the other hub: aim it at ours
    doc = json.loads(foreign.read_text())
    doc["hub"] = [f"tls://127.0.0.1:{hub_ports(hub)[1]}"]
    doc["ca"] = (hub / "pki" / "ca.pem").read_text()
    foreign.write_text(json.dumps(doc))
    rigs = {name: linked_rig(tmp_path, name, p, count=0, rate=20, name=name)
            for name, p in ((rack_id, passport), (stranger, foreign), (wrong_ca, untrusting))}
    running = {name: RackProcess(cfg, data) for name, (cfg, data) in rigs.items()}
    try:
        wait_until(lambda: "hub link: up" in engine_status(rigs[rack_id][1]), 30, "the link up")
        revoked = mixer("rack", "revoke", str(hub), rack_id)
        assert revoked.returncode == 0 and "1 live link(s) dropped" in revoked.stdout
        wait_until(lambda: "hub link: refused (authorization)" in engine_status(rigs[rack_id][1]),
                   20, "the revoked rack refused")
        wait_until(lambda: "hub link: refused (authorization)" in engine_status(rigs[stranger][1]),
                   20, "the stranger refused")
        wait_until(lambda: "hub link: refused (tls: " in engine_status(rigs[wrong_ca][1]), 20,
                   "the untrusting rack refused")
        assert all(r["id"] != rack_id for r in racks(hub))
        again = mixer("rack", "add", str(hub), rack_id, "--out", str(tmp_path / "again"))
        assert again.returncode == 1 and "enrolled already" in again.stderr
        assert m.stop() == 0
        wait_until(lambda: "hub link: down (connection refused)" in engine_status(rigs[rack_id][1]),
                   20, "the hub down")
    finally:
        for r in running.values():
            r.close()
        m.close()


def test_a_full_budget_holds_events_back_and_nothing_is_lost_when_the_hub_returns(tmp_path):
    """The hub is away: the rack's stream fills its 64 KiB budget, then refuses (discard
    new); egress keeps the rest in the rings and raises the alarm. When the hub comes, every
    event reaches it once, and the rack keeps none of them (interest retention)."""
    hub = init_hub(tmp_path)
    rack_id = uid("budget")
    passport = enrol(hub, rack_id)
    total = 2000
    d = tmp_path / "r"
    d.mkdir()
    config = rig(d, rack_id, count=total, rate=2000, mixer={"passport": str(passport)},
                 telemetry={"interval": 0.5},
                 egress={"streams": [{"name": "EV", "subjects": [f"fluxrig.{rack_id}.>"],
                                      "max_bytes": "64KiB"}],
                         "batch": 100, "max_inflight": 2, "ack_timeout": 1.0})
    rack = RackProcess(config, d / "data")
    m = None
    stream = f"EV_{rack_id}"
    try:
        rack.wait_for(lambda: rack.stats("egress")["egress.budget_full"] > 0, 30,
                      "the budget alarm")
        local = asyncio.run(_local_stream(rack, "EV"))
        assert 0 < local[0] < total and local[1] <= 64 * 1024  # held at its budget
        m = MixerProcess(hub)
        catch_up = wait_until(lambda: asyncio.run(hub_count(hub, stream)) >= total, 60,
                              "every event at the hub")
        count, seqs = asyncio.run(hub_stream(hub, stream))
        wait_until(lambda: asyncio.run(_local_stream(rack, "EV"))[0] == 0, 20,
                   "the rack's copy released")
        assert rack.stop() == 0
        assert m.stop() == 0
    finally:
        rack.close()
        if m is not None:
            m.close()
    print(f"all {total} at the hub {catch_up:.2f} s after the Mixer started")
    # once, each (a refused publish retried while later ones got in may reorder a few)
    assert count == total and sorted(seqs) == list(range(total))
    assert "stream budget full, events wait in the rings" in rack.output()


async def _local_stream(rack, name):
    import nats

    from engine.bus import load_auth

    auth = load_auth(rack.data_dir)
    nc = await nats.connect(rack.state["nats_url"],
                            user=auth.user, password=auth.password)
    try:
        info = await nc.jetstream().stream_info(name)
        return info.state.messages, info.state.bytes
    finally:
        await nc.close()


def _deployengine_status(hub, rack_id):
    done = mixer("deploy", str(hub), "--status", "--rack", rack_id)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith(rack_id))
    return line.split(None, 4)[1:]  # rev, applied, status[, error]


def _processes(data):
    return {p["name"] for p in json.loads((data / "state.json").read_text())["processes"]}


def test_config_as_code_deploy_refuse_fall_back_restart_offline_and_roll_back(tmp_path):
    hub = init_hub(tmp_path)
    m = MixerProcess(hub)
    rack_id = uid("cfg")
    passport = enrol(hub, rack_id, "site=lab")
    config, data = linked_rig(tmp_path, rack_id, passport, count=0, rate=50)
    rack = RackProcess(config, data)
    base = yaml.safe_load(config.read_text())
    for key in ("rack", "mixer"):
        base.pop(key)  # the rack keeps its own id, data dir and passport
    good = dict(base, pipelines=[dict(base["pipelines"][0], stages=[
        {"name": "deployed", "gear": "mapping", "settings": {"set": {"headers.rev": 1}}}])])
    files = {}
    for name, doc in {
        "good": good,
        "bad": dict(base, pipelines=[dict(base["pipelines"][0], source={"gear": "nosuch"})]),
        # fine at the Mixer, not on a linked rack: its leaf link is the embedded server's
        "external": dict(good, nats={"url": "nats://127.0.0.1:1"}),
        # fine everywhere, but its sink cannot open its file: it never becomes ready
        "broken": dict(good, pipelines=[dict(good["pipelines"][0], sinks=[
            {"name": "out", "gear": "file", "settings": {"path": "/proc/no/such/file"}}])]),
    }.items():
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(doc))
    try:
        bad = mixer("deploy", str(hub), str(files["bad"]), "--rack", rack_id)
        assert bad.returncode == 2
        assert (f"{files['bad']}: pipelines[0].source.gear: unknown gear 'nosuch'" in bad.stderr
                and "(nothing stored)" in bad.stderr)
        assert _deployengine_status(hub, rack_id)[1:] == ["-", "never", "deployed"]
        t0 = time.monotonic()
        ok = mixer("deploy", str(hub), str(files["good"]), "--label", "site=lab")
        assert ok.returncode == 0 and f"rack {rack_id}: stored as rev 1" in ok.stdout
        wait_until(lambda: _deployengine_status(hub, rack_id) == ["1", "1", "applied"], 30,
                   "rev 1 applied")
        took = time.monotonic() - t0  # from the deploy command to the rack's report
        assert "p.deployed.0" in _processes(data)
        pids = {p["name"]: p["pid"] for p in rack.refresh()["processes"]}
        assert mixer("deploy", str(hub), str(files["external"]), "--rack", rack_id
                     ).returncode == 0
        wait_until(lambda: _deployengine_status(hub, rack_id)[2] == "failed", 30, "rev 2 refused")
        rev, applied, status, error = _deployengine_status(hub, rack_id)
        assert (rev, applied) == ("2", "1") and "nats" in error
        assert {p["name"]: p["pid"] for p in rack.refresh()["processes"]} == pids  # untouched
        assert mixer("deploy", str(hub), str(files["broken"]), "--rack", rack_id
                     ).returncode == 0
        wait_until(lambda: _deployengine_status(hub, rack_id)[:3] == ["3", "1", "failed"], 60,
                   "rev 3 failed at start")
        assert "died 5 times in 60 s" in _deployengine_status(hub, rack_id)[3]
        wait_until(lambda: "p.deployed.0" in _processes(data)
                   and json.loads((data / "config" / "result.json").read_text())["rev"] == 3,
                   30, "back on rev 1")
        assert (data / "config" / "applied").read_text().strip() == "1"
        assert rack.proc.poll() is None  # the same rack process all along (exec in place)
        # the hub away, the rack restarted: it starts on its last applied config
        assert m.stop() == 0
        assert rack.stop() == 0
        rack.close()
        rack = RackProcess(config, data)
        assert "p.deployed.0" in _processes(data)
        assert rack.stop() == 0
        rack.close()
        m = MixerProcess(hub)
        rack = RackProcess(config, data)
        back = mixer("deploy", str(hub), "--rollback", "--rack", rack_id, "--to", "1")
        assert back.returncode == 0 and "rev 1 deployed again as rev 4" in back.stdout
        wait_until(lambda: _deployengine_status(hub, rack_id)[:3] == ["4", "4", "applied"], 30,
                   "the rollback applied")
        assert rack.stop() == 0
        assert m.stop() == 0
    finally:
        rack.close()
        m.close()
    print(f"deploy to applied: {took:.2f} s")
