"""The audit trail end to end: `mixer start` runs the archiver; two real racks linked over
TLS; every event each rack stored reaches the hash-chained Parquet archive exactly once;
`mixer audit query/verify` over it; a gap made on a rack (events purged while the link was
cut) is reported with whether the rack still holds them; the archiver's hub user can read
and nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
from pathlib import Path

import nats
import psutil
import pyarrow.parquet as pq
from mixerutil import (
    LinkProxy,
    MixerProcess,
    engine_status,
    enrol,
    hub_count,
    hub_ports,
    init_hub,
    linked_rig,
    mixer,
    wait_until,
    write_settings,
)
from rackutil import RackProcess, uid

from engine.cbor import loads
from mixer.auditfiles import load_index


def _archived(hub: Path, rack: str, stream: str = "EV") -> int:
    return load_index(hub / "audit", stream, rack).last


def _rows(hub: Path, rack: str, stream: str = "EV") -> list[dict]:
    """Every archived row of a rack's stream, read with pyarrow (not the views)."""
    files = sorted((hub / "audit" / stream / f"rack={rack}").rglob("part-*.parquet"))
    rows = []
    for f in files:
        rows += pq.read_table(f, columns=["event_id", "seq", "cbor", "chain"]).to_pylist()
    return sorted(rows, key=lambda r: r["seq"])


def test_two_racks_events_are_archived_exactly_once_and_verify(tmp_path):
    hub = init_hub(tmp_path)
    m = MixerProcess(hub)
    ids = [uid("aud-a"), uid("aud-b")]
    total = 1500
    racks = []
    try:
        for i, rack_id in enumerate(ids):
            config, data = linked_rig(tmp_path, rack_id, enrol(hub, rack_id), total, 500,
                                       f"r{i}")
            racks.append(RackProcess(config, data))
        status = json.loads(mixer("status", str(hub), "--json").stdout)
        assert [p["name"] for p in status["processes"]] == ["registry", "archiver", "traces"]
        archiver = status["processes"][1]["pid"]
        wait_until(lambda: all(_archived(hub, r) >= 500 for r in ids), 60, "some archived")
        os.kill(archiver, signal.SIGKILL)  # mid-stream: restarted, nothing lost or doubled
        wait_until(lambda: m.state()["processes"][1]["pid"] not in (None, archiver), 20,
                   "the archiver restarted")
        again = psutil.Process(m.state()["processes"][1]["pid"])
        wait_until(lambda: again.children(), 20, "its writer process")
        # the writer dies under it: the archiver says so, exits 1, and starts again
        again.children()[0].kill()
        wait_until(lambda: m.state()["processes"][1]["restarts"] >= 2, 30,
                   "the archiver restarted after its writer died")
        for r in ids:
            wait_until(lambda r=r: _archived(hub, r) >= total, 60, f"{r} all archived")
        hub_counts = [asyncio.run(hub_count(hub, f"EV_{r}")) for r in ids]
        verified = mixer("audit", "verify", str(hub))
        query = mixer("audit", "query", str(hub),
                      "select rack, count(*) as n, count(distinct event_id) as ids, "
                      "min(seq) as lo, max(seq) as hi from events group by 1 order by 1",
                      "--json")
        for rack in racks:
            assert rack.stop() == 0
        assert m.stop() == 0
    finally:
        for rack in racks:
            rack.close()
        m.close()
    assert "restarts=1" not in verified.stdout  # (verify prints chains, not processes)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for r in ids:
        assert f"EV rack={r}: {total} events" in verified.stdout
    assert hub_counts == [total, total]
    got = json.loads(query.stdout)
    assert got == [{"rack": r, "n": total, "ids": total, "lo": 1, "hi": total}
                   for r in sorted(ids)]
    for r in ids:
        rows = _rows(hub, r)
        # 1:1 by id with what the generator made: every seq once, the bytes the rack stored
        assert sorted(loads(x["cbor"])["body"]["seq"] for x in rows) == list(range(total))
        assert len({x["event_id"] for x in rows}) == total
        assert [x["seq"] for x in rows] == list(range(1, total + 1))
        h = bytes(32)
        for x in rows:  # the chain, recomputed here
            h = hashlib.sha256(h + x["cbor"]).digest()
            assert x["chain"] == h
    # the dead writer is noticed (its next write, or the probe of an idle archiver)
    assert re.search(r"archiver stopped: (the writer process is gone|the writer cannot take"
                     r" rack=|writing the archive of rack=)", m.output()), m.output()[-3000:]
    assert "mixer stopped cleanly" in m.output()


async def _purge(rack: RackProcess, stream: str, keep_from: int) -> tuple[int, int]:
    from engine.bus import load_auth

    auth = load_auth(rack.data_dir)
    nc = await nats.connect(rack.state["nats_url"], user=auth.user, password=auth.password)
    try:
        js = nc.jetstream()
        await js.purge_stream(stream, seq=keep_from)
        st = (await js.stream_info(stream)).state
        return st.first_seq, st.last_seq
    finally:
        await nc.close()


def test_events_purged_on_a_rack_before_the_hub_had_them_are_reported_as_a_gap(
        tmp_path, peers):
    hub = init_hub(tmp_path)
    port, leaf = hub_ports(hub)
    proxy = LinkProxy(peers, leaf)
    write_settings(hub, port, leaf, [f"tls://127.0.0.1:{proxy.port}"])
    m = MixerProcess(hub)
    rack_id = uid("gap")
    total = 2400
    config, data = linked_rig(tmp_path, rack_id, enrol(hub, rack_id), total, 300, "r")
    rack = RackProcess(config, data)
    try:
        wait_until(lambda: _archived(hub, rack_id) >= 200, 40, "the first events archived")
        proxy.cut()
        wait_until(lambda: "hub link: down" in engine_status(data), 20, "the rack sees the cut")
        rack.wait_for(lambda: rack.counters("source").snapshot().frames_out >= total, 60,
                      "the generator done")
        before = asyncio.run(hub_count(hub, f"EV_{rack_id}"))
        assert before < total - 200  # the rack went on alone
        held = asyncio.run(_purge(rack, "EV", before + 101))  # 100 events the hub never had
        proxy.mend()
        wait_until(lambda: _archived(hub, rack_id) >= total, 60, "the rest archived")
        verified = mixer("audit", "verify", str(hub), "--json")
        assert rack.stop() == 0
        assert m.stop() == 0
    finally:
        rack.close()
        m.close()
        proxy.close()
    assert held[0] == before + 101
    assert verified.returncode == 1
    (report,) = json.loads(verified.stdout)
    gaps = [f for f in report["findings"] if f["kind"] == "gap"]
    assert [f["kind"] for f in report["findings"]] == ["gap"], report
    detail = gaps[0]["detail"]
    assert f"missing seq {before + 1}-{before + 100} (100 events)" in detail
    assert "the archiver saw it" in detail
    assert "the rack no longer holds it" in detail
    assert report["rows"] == total - 100
    assert f"gap in the archive: rack={rack_id}, stream=EV, missing={before + 1}-" \
           f"{before + 100}" in m.output()


def test_the_archivers_hub_user_reads_and_nothing_else(tmp_path):
    from mixer.hubfiles import local_users

    hub = init_hub(tmp_path)
    m = MixerProcess(hub)
    port, _ = hub_ports(hub)

    async def probe() -> dict[str, str]:
        admin = await nats.connect(f"nats://127.0.0.1:{port}", user="admin",
                                   password=local_users(hub)["admin"])
        await admin.jetstream().add_stream(name="EV_x", subjects=["fluxrig.down.zz-probe.>"])
        await admin.publish("fluxrig.down.zz-probe.a", b"one")
        await admin.flush()
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if "violation for subscription" in str(exc).lower():
                refused.set()

        nc = await nats.connect(f"nats://127.0.0.1:{port}", user="archiver",
                                password=local_users(hub)["archiver"], error_cb=on_error)
        js = nc.jetstream(timeout=2)
        out = {}
        out["info"] = str((await js.stream_info("EV_x")).state.messages)
        for what, call in (("delete", js.delete_stream("EV_x")),
                           ("purge", js.purge_stream("EV_x")),
                           ("other consumer", js.add_consumer("EV_x", durable_name="mine")),
                           ("publish", js.publish("fluxrig.down.zz-probe.a", b"forged"))):
            try:
                await call
                out[what] = "allowed"
            except Exception as exc:
                out[what] = type(exc).__name__
        await nc.subscribe("fluxrig.>")
        try:  # the server's -ERR comes back on the connection
            await asyncio.wait_for(refused.wait(), 5)
            out["subscribe"] = "refused"
        except TimeoutError:
            out["subscribe"] = "allowed"
        out["messages"] = str((await admin.jetstream().stream_info("EV_x")).state.messages)
        await nc.close()
        await admin.close()
        return out

    try:
        out = asyncio.run(probe())
        assert m.stop() == 0
    finally:
        m.close()
    assert out["info"] == "1"
    for what in ("delete", "purge", "other consumer", "publish", "subscribe"):
        assert out[what] != "allowed", (what, out)
    assert out["messages"] == "1"
