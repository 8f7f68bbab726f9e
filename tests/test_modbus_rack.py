"""The modbus source in a real rack: simulated devices (pymodbus's server) polled by
``--workers 2`` replicas, each device by exactly one; every tag's samples on
``uns.v1.<path>`` in the stream UNS and its newest value in the KV bucket ``uns``, which a
rack restart keeps; a device that goes down turns bad and comes back."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import nats
import yaml
from modbusutil import SimThread
from rackutil import RackProcess, uid

from engine.bus import load_auth
from engine.cbor import loads
from engine.harness import read_store

TAGS = [{"name": "cycles", "register": "holding", "address": 0, "publish": "every_poll"},
        {"name": "temp", "register": "holding", "address": 3, "type": "float32",
         "unit": "degC"},
        {"name": "serial", "register": "holding", "address": 16, "type": "string(12)"},
        {"name": "running", "register": "coil", "address": 0, "writable": True},
        {"name": "setpoint", "register": "holding", "address": 15, "writable": True,
         "min": 0, "max": 3000, "scale": 0.5},
        {"name": "door", "register": "holding", "address": 14, "type": "bool", "bit": 1,
         "writable": True}]


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=60)


def _rig(tmp_path, rack_id, ports):
    cfg = {"rack": {"id": rack_id, "data_dir": str(tmp_path / "data")},
           "rings": {"capacity": "1MiB", "batch": 256}, "telemetry": {"interval": 0.5},
           "egress": {"streams": [{"name": "UNS", "subjects": ["uns.v1.>"],
                                   "last_values": "uns", "max_msgs_per_subject": 3}]},
           "pipelines": [{"name": "plant", "source": {"name": "plc", "gear": "modbus",
                                                      "settings": {
               "uns": {"enterprise": "acme", "site": "lyon", "area": "press", "line": "l7",
                       "cell": "c1"},
               "groups": {"default": {"interval": "200ms"}},
               "devices": [{"name": f"press-{i}", "host": "127.0.0.1", "port": port,
                            "timeout": "300ms", "reconnect_min": "100ms",
                            "reconnect_max": "300ms", "tags": TAGS}
                           for i, port in enumerate(ports)]}},
               "sinks": [{"name": "uns", "gear": "egress",
                          "settings": {"subject": "uns.v1.>"}}]}]}
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _kv(rack: RackProcess) -> dict[str, dict]:
    auth = load_auth(rack.data_dir)
    nc = await nats.connect(rack.state["nats_url"], user=auth.user, password=auth.password)
    try:
        kv = await nc.jetstream().key_value("uns")
        try:
            keys = await kv.keys()
        except Exception:  # no keys yet
            return {}
        return {k: loads((await kv.get(k)).value)["body"] for k in keys}
    finally:
        await nc.close()


def test_devices_are_sharded_their_samples_reach_the_uns_and_the_kv_survives_a_restart(
        tmp_path):
    paths = {f"acme.lyon.press.l7.c1.press-{i}.{t['name']}" for i in range(4) for t in TAGS}
    with SimThread(4) as sim:
        config = _rig(tmp_path, uid("plant"), sim.ports)
        rack = RackProcess(config, tmp_path / "data", workers=2)
        try:
            rack.wait_for(lambda: set(asyncio.run(_kv(rack))) == paths, 30,
                          "every tag in the KV")
            data = str(tmp_path / "data")
            browse = _engine("uns", "browse", "acme.lyon.press.l7.c1.press-1",
                             "--data-dir", data)
            got = _engine("uns", "get", "acme.lyon.press.l7.c1.press-0.serial", "--data-dir",
                          data, "--json")
            missing = _engine("uns", "get", "acme.nowhere", "--data-dir", data)
            watched = _engine("uns", "watch", "acme.lyon.press.l7.c1.press-3", "--data-dir",
                              data, "--json", "--count", "3")
            sp = "acme.lyon.press.l7.c1.press-1.setpoint"
            writes = [_engine("uns", "set", sp, "600", "--data-dir", data, "--as", "alice",
                              "--json"),
                      _engine("uns", "set", sp, "4000", "--data-dir", data, "--as", "bob"),
                      _engine("uns", "set", "acme.lyon.press.l7.c1.press-1.temp", "1",
                              "--data-dir", data),
                      _engine("uns", "set", "acme.lyon.press.l7.c1.press-1.door", "true",
                              "--data-dir", data),
                      _engine("uns", "set", "acme.lyon.press.l7.c1.press-1.running", "false",
                              "--data-dir", data),
                      _engine("uns", "set", "acme.nowhere.x", "1", "--data-dir", data)]
            device_words = sim.get_registers(1, 14, 2)
            sim.down(2)  # one device goes away
            down = "acme.lyon.press.l7.c1.press-2"
            rack.wait_for(lambda: all(v["quality"] == "bad: disconnected"
                                      for k, v in asyncio.run(_kv(rack)).items()
                                      if k.startswith(down)), 20, "press-2 bad")
            others = asyncio.run(_kv(rack))
            sim.up(2)
            rack.wait_for(lambda: all(v["quality"] == "good"
                                      for v in asyncio.run(_kv(rack)).values()), 20,
                          "everything good again")
            first = asyncio.run(_kv(rack))
            assert rack.stop() == 0
            output = rack.output()
        finally:
            rack.close()
        # the KV outlives the rack: read it from the stopped rack's store
        store = read_store(tmp_path / "data", rack.state["rack"], "KV_uns", "$KV.uns.>")
        history = read_store(tmp_path / "data", rack.state["rack"], "UNS", "uns.v1.>")
    kept = {}
    for _, data in store.messages:
        body = loads(data)["body"]
        kept[body["path"]] = body
    assert set(kept) == paths and store.count == len(paths)  # one message per key
    assert kept[f"{down}.serial"]["value"] == "FLUXSIM-0003"
    assert all(kept[p]["ts"] >= first[p]["ts"] for p in paths)
    # the CLI: the tree under a prefix, one value, live samples
    assert browse.returncode == 0, browse.stderr
    assert browse.stdout.splitlines()[:6] == ["acme", "  lyon", "    press", "      l7",
                                              "        c1", "          press-1"]
    assert re.search(r"^ {12}serial +FLUXSIM-0002 +good ", browse.stdout, re.M), browse.stdout
    assert "press-0" not in browse.stdout
    assert json.loads(got.stdout)["value"] == "FLUXSIM-0001"
    assert missing.returncode == 1 and "no value for acme.nowhere" in missing.stderr
    lines = [json.loads(x) for x in watched.stdout.splitlines()]
    assert len(lines) == 3 and all(x["path"].startswith("acme.lyon.press.l7.c1.press-3.")
                                   for x in lines)
    # writes: confirmed and read back, refused with the reason, every one audited
    ok = json.loads(writes[0].stdout)
    assert writes[0].returncode == 0 and ok["result"] == "confirmed"
    assert ok["read_back"] == 600 and ok["who"] == "alice"
    assert writes[1].returncode == 1 and "4000 is above the tag's max 3000" in writes[1].stderr
    assert writes[2].returncode == 1 and "is not writable" in writes[2].stderr
    assert writes[3].returncode == 0 and writes[4].returncode == 0, (writes[3].stderr,
                                                                    writes[4].stderr)
    assert "no tag at acme.nowhere.x on this rack" in writes[5].stderr
    assert device_words == [0xA5C3 | 0b10, 1200]  # bit 1 set, 600 / scale 0.5
    audit = read_store(tmp_path / "data", rack.state["rack"], "UNS_WRITES",
                       f"uns.writes.{rack.state['rack']}")
    events = [loads(d)["body"] for _, d in audit.messages]
    assert [(e["path"].rsplit(".", 1)[1], e["result"]) for e in events] == [
        ("setpoint", "confirmed"), ("setpoint", "refused"), ("temp", "refused"),
        ("door", "confirmed"), ("running", "confirmed")]
    assert events[0]["who"] == "alice" and events[0]["new"] == 600 and events[1]["who"] == "bob"
    # every sample on uns.v1.<its path>
    subjects = [loads(d)["headers"]["subject"] for _, d in history.messages]
    assert set(subjects) == paths
    # the history keeps 3 samples per tag (max_msgs_per_subject); cycles had many more
    per_subject = {p: subjects.count(p) for p in paths}
    assert max(per_subject.values()) == 3, per_subject
    assert per_subject["acme.lyon.press.l7.c1.press-0.cycles"] == 3
    # each device polled by exactly one of the two replicas
    polled = re.findall(r"plant\.plc\.(\d) fluxrig\.plant\.plc INFO modbus polling: "
                        r"devices=(\S+) \(replica", output)
    by_replica = {r: set(ds.split(",")) - {"-"} for r, ds in polled}
    assert set(by_replica) == {"0", "1"}
    assert by_replica["0"] | by_replica["1"] == {f"press-{i}" for i in range(4)}
    assert not by_replica["0"] & by_replica["1"]
    # both replicas have work (CRC-32 had sent all four names to replica 0)
    assert by_replica["0"] and by_replica["1"]
    # while press-2 was down, the others stayed good with fresh values
    assert all(v["quality"] == "good" for k, v in others.items() if not k.startswith(down))
    assert others[f"{down}.temp"]["value"] is not None  # the last good value is kept
