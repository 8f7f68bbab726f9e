"""The switch as users run it: `engine start` + `engine iso issuer` + load, audit in JetStream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from rackutil import RackProcess, stream_contents, switch_rig, uid, wait_switch_ready

from engine.frame import decode
from engine.natsd import free_port
from gears.iso8583.codec import spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

pytestmark = pytest.mark.slow

PANS = ("4761739001010119", "5500000000000004", "9000000000000001")


def _rig(tmp_path, port: int, issuer_port: int, **settings):
    return switch_rig(tmp_path, uid("t-switch"), port, issuer_port, rings={"capacity": "4MiB"},
                      **settings)


def test_switch_rack_answers_every_terminal_and_audits_every_transaction(tmp_path):
    port, issuer_port = free_port(), free_port()
    issuer = subprocess.Popen([sys.executable, "-m", "engine.cli", "iso", "issuer", "--port",
                               str(issuer_port), "--rule", "4=00", "--rule", "5=05"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rack = RackProcess(_rig(tmp_path, port, issuer_port), tmp_path / "data", workers=2)
    try:
        names = [p["name"] for p in rack.state["processes"]]
        assert "payments.switch.0" in names and "payments.switch.1" in names
        wait_switch_ready(rack, port, replicas=2)
        rack.wait_for(lambda: "issuer link up: issuer=b" in rack.output(), 30, "issuer links")
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=20, rate=1500, count=3000,
            duration=60, grace=5, mix=tuple(MixEntry(pan=p) for p in PANS)))
        report = asyncio.run(gen.run()).summary()
        status = subprocess.run([sys.executable, "-m", "engine.cli", "status", "--data-dir",
                                 str(tmp_path / "data"), "--json", "--interval", "0.2"],
                                capture_output=True, text=True, timeout=60)
        assert rack.stop() == 0
    finally:
        rack.close()
        issuer.kill()
        issuer.wait()
    assert report["sent"] == report["received"] == 3000
    assert report["cross_wired"] == 0 and report["lost"] == 0
    assert report["codes"] == {"00": 1000, "05": 1000, "92": 1000}
    by_name = {p["name"]: p for p in json.loads(status.stdout)["processes"]}
    assert by_name["payments.switch.0"]["frames_out"] + \
        by_name["payments.switch.1"]["frames_out"] == 3000  # one audit frame per transaction
    count, messages = stream_contents(tmp_path / "data", uid("t-switch"), "TXN",
                                      f"fluxrig.{uid('t-switch')}.txn")
    assert count == 3000
    events = [decode(data, strict=True).body for _, data in messages]
    assert sorted(e["de39"] for e in events) == ["00"] * 1000 + ["05"] * 1000 + ["92"] * 1000
    assert {e["pan"] for e in events} == {"476173******0119", "550000******0004",
                                          "900000******0001"}
    assert all(e["latency_us"] >= 0 and e["t_resp"] >= e["t_req"] for e in events)
    # no clear PAN in any file the rack wrote (JetStream store, logs, state, config copies)
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for pan in PANS:
                assert pan.encode() not in blob, path


def _rack_segments(rack_id: str) -> list[tuple[str, bytes]]:
    """Every shared-memory segment of ``rack_id``, read now."""
    import os

    out = []
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"fx-{rack_id}-"):
            with open(f"/dev/shm/{name}", "rb") as f:
                out.append((f"/dev/shm/{name}", f.read()))
    return out


async def _collect_stats(url: str, subject: str, stop: asyncio.Event, out: list,
                         data_dir) -> None:
    from engine.bus import connect, load_auth

    nc = await connect(url, load_auth(data_dir), "test")
    sub = await nc.subscribe(subject)
    while not stop.is_set():
        try:
            out.append((await sub.next_msg(timeout=0.2)).data)
        except Exception:
            pass
    await nc.close()


def test_leak_scan_ten_thousand_transactions_leave_no_card_number_anywhere(tmp_path):
    """Coat check + SAF on; 10,000 transactions over 10 known PANs (with track 2), some
    timing out (reversals); then every file the rack wrote, every JetStream stream, the logs,
    the telemetry snapshots and — taken while it ran — every shared-memory segment of the
    rack (journals, rings, counters) are searched for each PAN as ASCII, BCD and EBCDIC."""
    pans = [f"4{i}61739001010{i}19"[:16] for i in range(6)] + \
        [f"5{i}00000000000{i}04"[:16] for i in range(2)] + \
        [f"6011000990139{i}24"[:16] for i in range(2)]
    port, issuer_port = free_port(), free_port()
    path = _rig(tmp_path, port, issuer_port, coatcheck={"enabled": True},
                saf={"enabled": True, "retry_interval": 0.5}, timeout=0.5,
                telemetry={"interval": 0.2})
    issuer = subprocess.Popen([sys.executable, "-m", "engine.cli", "iso", "issuer", "--port",
                               str(issuer_port), "--rule", "6=drop", "--rule", "5=05",
                               "--rule", "4=00"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rack = RackProcess(path, tmp_path / "data", workers=2)
    snapshots: list[bytes] = []
    segments: list[tuple[str, bytes]] = []
    try:
        wait_switch_ready(rack, port, replicas=2)
        rack.wait_for(lambda: "issuer link up: issuer=b" in rack.output(), 30, "issuer links")

        async def run():
            stop = asyncio.Event()
            stats = asyncio.create_task(_collect_stats(
                rack.state["nats_url"], f"fluxrig.stats.{uid('t-switch')}", stop, snapshots,
                tmp_path / "data"))
            gen = LoadGenerator(LoadConfig(
                host="127.0.0.1", port=port, spec=spec_by_name("default"),
                framing=FramingConfig(prefix="2B"), connections=20, rate=2500, count=10_000,
                duration=60, grace=5,
                mix=tuple(MixEntry(pan=p, track2=True) for p in pans)))
            run = asyncio.create_task(gen.run())
            while gen.report.sent < 5_000:
                await asyncio.sleep(0.05)
            segments.extend(_rack_segments(uid("t-switch")))  # mid-run: journals full of requests
            report = (await run).summary()
            stop.set()
            await stats
            return report

        report = asyncio.run(run())
        assert rack.stop() == 0
    finally:
        rack.close()
        issuer.kill()
        issuer.wait()
    assert report["received"] == 10_000 and report["lost"] == 0 and report["cross_wired"] == 0
    assert report["codes"].get("91", 0) == 2000  # BIN 6 timed out: reversals were queued
    assert snapshots, "no telemetry snapshot seen"
    needles = {}
    for pan in pans:
        needles[f"{pan} ascii"] = pan.encode()
        needles[f"{pan} bcd"] = bytes.fromhex(pan)
        needles[f"{pan} ebcdic"] = pan.encode("cp500")
    hits = []
    blobs = [(f"stats snapshot {i}", s) for i, s in enumerate(snapshots)]
    blobs.append(("rack output", rack.output().encode()))
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert not any("KV_" in str(p) for p in files)  # no vault copy is written at all
    assert any("/SAF/" in str(p) for p in files)  # the SAF queue is on disk
    assert any("-j." in name for name, _ in segments)  # the journals were scanned
    blobs += [(str(p), p.read_bytes()) for p in files]
    blobs += segments
    for where, blob in blobs:
        for what, needle in needles.items():
            if needle in blob:
                hits.append((where, what))
    assert hits == []


def test_replicas_sharing_the_port_split_a_burst_of_connections_evenly(tmp_path):
    """Without SO_REUSEPORT the replicas share the supervisor's socket; in a burst the first
    to wake took more than its share (17/33 of 50 measured), and one replica's connections
    queued behind each other while the other idled."""
    import socket

    port = free_port()
    rack = RackProcess(_rig(tmp_path, port, free_port()), tmp_path / "data", workers=2)
    conns: list[socket.socket] = []
    try:
        for _ in range(60):  # a terminal concentrator reconnecting everything at once
            conns.append(socket.create_connection(("127.0.0.1", port)))

        def held() -> list[int]:
            return [rack.stats(f"payments.switch.{i}").get("iso8583.connections", 0)
                    for i in range(2)]

        rack.wait_for(lambda: sum(held()) == 60, 30, "60 connections accepted")
        a, b = held()
        assert abs(a - b) <= 6, (a, b)
    finally:
        for c in conns:
            c.close()
        rack.stop()
        rack.close()
