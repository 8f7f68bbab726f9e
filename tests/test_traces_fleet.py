"""A slow transaction found with `mixer traces`, end to end (issue "Pipeline B").

A real switch rack linked to a real Mixer; a real issuer simulator answers card 5 after
0.7 s. The rack keeps those traces by its `slower_than` rule, its telemetry ships them over
the leaf link, the Mixer's trace store writes Parquet, and `mixer traces` — run as a user
runs it — shows where the time went. Its logs come out of `mixer logs`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import yaml
from mixerutil import MixerProcess, enrol, init_hub, mixer, wait_until
from rackutil import RackProcess, switch_rig, uid, wait_switch_ready

from engine.natsd import free_port
from gears.iso8583.codec import spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

pytestmark = pytest.mark.slow

FAST, SLOW = "4761739001010119", "5500000000000004"
DELAY = 0.7


def test_a_slow_transaction_is_found_with_mixer_traces_and_its_logs_with_mixer_logs(tmp_path):
    hub = init_hub(tmp_path)
    m = MixerProcess(hub)
    rack_id = uid("t-fleet")
    passport = enrol(hub, rack_id, "role=payments")
    port, issuer_port, slow_port = free_port(), free_port(), free_port()
    issuers = [subprocess.Popen([sys.executable, "-m", "engine.cli", "iso", "issuer", "--port",
                                 str(p), *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for p, extra in ((issuer_port, []), (slow_port, ["--delay", str(DELAY)]))]
    cfg_path = switch_rig(tmp_path, rack_id, port, issuer_port)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["mixer"] = {"passport": str(passport)}
    cfg["telemetry"] = {"interval": 0.5, "traces": {"sample": 0.0, "slower_than": "500ms"}}
    sw = cfg["pipelines"][0]["source"]["settings"]
    sw["issuers"]["b"]["port"] = slow_port  # card 5 goes to the slow issuer
    cfg_path.write_text(yaml.safe_dump(cfg))
    rack = RackProcess(cfg_path, tmp_path / "data")
    try:
        wait_switch_ready(rack, port)
        rack.wait_for(lambda: "issuer link up: issuer=b" in rack.output(), 30, "issuer b")
        wait_until(lambda: "hub link: up" in subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", "--data-dir",
             str(tmp_path / "data")], capture_output=True, text=True).stdout, 30,
            "the hub link")
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=4, rate=100, count=200,
            duration=30, grace=5, mix=(MixEntry(pan=FAST, weight=19),
                                       MixEntry(pan=SLOW, weight=1))))
        report = asyncio.run(gen.run()).summary()
        n = report["received"]
        assert n >= 200 and n == report["sent"] and report["lost"] == 0
        # the slowest transaction, as a user finds it: in the audit trail
        sql = ("select terminal, stan, event_id, latency_us from txn "
               "order by latency_us desc limit 1")
        rows: list[dict] = []

        def audited() -> bool:
            out = mixer("audit", "query", str(hub), "select count(*) as n from txn", "--json")
            if out.returncode != 0 or json.loads(out.stdout)[0]["n"] < n:
                return False
            rows[:] = json.loads(mixer("audit", "query", str(hub), sql, "--json").stdout)
            return True

        wait_until(audited, 60, "every transaction in the audit trail")
        slowest = rows[0]
        assert slowest["latency_us"] >= DELAY * 1e6
        key = f"{slowest['terminal']}:{slowest['stan']}"
        found: list[dict] = []

        def traced() -> bool:
            out = mixer("traces", str(hub), key, "--json", "--limit", "1")
            found[:] = json.loads(out.stdout) if out.returncode == 0 else []
            return bool(found)

        wait_until(traced, 30, "the slow transaction's trace at the Mixer")
        shown = mixer("traces", str(hub), key)
        by_id = mixer("traces", str(hub), str(slowest["event_id"]), "--json")
        logs = mixer("logs", str(hub), "--rack", rack_id, "--since", "10m")
        assert rack.stop() == 0
    finally:
        rack.close()
        for p in issuers:
            p.kill()
            p.wait()
        m.close()
    trace = found[0]
    assert trace["rack"] == rack_id and trace["keep"] == "slow" and trace["de39"] == "00"
    assert trace["duration_ms"] >= DELAY * 1000
    spans = {sp["name"]: sp for sp in trace["spans"]}
    assert spans["issuer answer"]["duration_ms"] >= DELAY * 1000 * 0.95  # where it went
    assert sum(sp["duration_ms"] for sp in trace["spans"] if sp["depth"] == 1) == \
        pytest.approx(trace["duration_ms"], abs=0.01)
    assert shown.returncode == 0 and "issuer answer" in shown.stdout, shown.stderr
    assert slowest["terminal"] in shown.stdout
    # the audit event's id is the trace id
    assert by_id.returncode == 0, by_id.stderr
    assert [t["trace_id"] for t in json.loads(by_id.stdout)] == [trace["trace_id"]]
    assert logs.returncode == 0 and "issuer link up" in logs.stdout, logs.stdout + logs.stderr
    for blob in (shown.stdout, by_id.stdout, logs.stdout):
        assert FAST not in blob and SLOW not in blob
    # every byte the Mixer stored of the rack's traces and logs: no card number in clear
    stored = [p for d in ("traces", "logs") for p in (hub / d).rglob("*.parquet")]
    assert any("traces" in str(p) for p in stored) and any("logs" in str(p) for p in stored)
    for path in stored:
        data = path.read_bytes()
        assert FAST.encode() not in data and SLOW.encode() not in data, path
