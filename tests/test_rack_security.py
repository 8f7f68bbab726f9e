"""The rack's bus is its own: anonymous clients refused, every role limited to its job."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import nats
import pytest

from engine.bus import USERS_FILE, BusAuth, BusUser, connect
from engine.natsd import free_port
from peers import pack, request_doc
from rackutil import RackProcess, switch_rig

pytestmark = pytest.mark.slow


async def _try(url: str, auth: BusAuth | None, action):
    """Run ``action(nc)``; what happened: "ok", or the permission error the server sent."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    try:
        nc = await connect(url, auth, "probe", error_cb=on_error, allow_reconnect=False,
                           connect_timeout=2)
    except Exception as exc:  # noqa: BLE001 - the refusal is the outcome under test
        return f"refused: {exc!r}"
    try:
        await action(nc)
        await nc.flush(timeout=2)
        await asyncio.sleep(0.2)  # a violation arrives as an async -ERR after the flush
        return "denied: " + errors[0] if errors else "ok"
    except Exception as exc:  # noqa: BLE001
        return "denied: " + (errors[0] if errors else repr(exc))
    finally:
        await nc.close()


def _user(data_dir, name: str) -> BusAuth:
    import json

    pw = json.loads((data_dir / USERS_FILE).read_text())[name]
    return BusUser(name=name, password=pw).auth()


async def _read_txn(nc) -> None:
    js = nc.jetstream(timeout=1.5)
    sub = await js.pull_subscribe(f"fluxrig.{_RACK}.txn", stream="TXN")
    (msg,) = await sub.fetch(1, timeout=2)  # the audit event of the request sent first
    assert b"iso8583.txn" in msg.data


async def _publish_txn(nc) -> None:
    await nc.jetstream(timeout=1.5).publish(f"fluxrig.{_RACK}.txn", b"forged")


async def _delete_saf(nc) -> None:
    await nc.jetstream(timeout=1.5).delete_stream("SAF")


async def _stats(nc) -> None:
    await nc.publish(f"fluxrig.stats.{_RACK}", b"x")


async def _snoop(nc) -> None:
    await nc.subscribe(">")


async def _saf_work(nc) -> None:
    js = nc.jetstream(timeout=1.5)
    sub = await js.pull_subscribe(f"fluxrig.{_RACK}.saf.q", durable="saf", stream="SAF")
    try:
        await sub.fetch(1, timeout=0.5)
    except nats.errors.TimeoutError:
        pass  # empty queue: the right answer


_RACK = f"sec-{os.getpid()}"


def test_anonymous_refused_and_each_role_limited_to_its_job(tmp_path, monkeypatch):
    """Before: an anonymous client read the TXN stream, forged an event, deleted a vault page
    and the SAF stream."""
    monkeypatch.setenv("TXN_READER_PW", "reader-secret-1")
    port = free_port()
    rig = switch_rig(tmp_path, _RACK, port, free_port(), saf={"enabled": True})
    import yaml

    cfg = yaml.safe_load(rig.read_text())
    cfg["nats"] = {"users": [{"name": "auditor", "password_env": "TXN_READER_PW",
                              "streams": ["TXN"]}]}
    rig.write_text(yaml.safe_dump(cfg))
    rack = RackProcess(rig, tmp_path / "data", workers=1)
    try:
        rack.wait_for(lambda: "switch listening" in rack.output(), 30, "the switch")
        # one transaction (no route: BIN 9) so the audit stream has an event to read
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(pack(request_doc("9000000000000001")))
            assert s.recv(2)  # the 92 answer's length: recorded before it was sent
        url = rack.state["nats_url"]
        data = tmp_path / "data"
        auditor = BusUser(name="auditor", password="reader-secret-1").auth()
        switch = _user(data, "payments.switch")
        probes = {
            "anonymous": asyncio.run(_try(url, None, _stats)),
            "wrong password": asyncio.run(_try(url, BusAuth(user="admin", password="x"),
                                               _stats)),
            "switch reads TXN": asyncio.run(_try(url, switch, _read_txn)),
            "switch forges TXN": asyncio.run(_try(url, switch, _publish_txn)),
            "switch deletes SAF": asyncio.run(_try(url, switch, _delete_saf)),
            "switch works SAF": asyncio.run(_try(url, switch, _saf_work)),
            "telemetry stats": asyncio.run(_try(url, _user(data, "telemetry"), _stats)),
            "telemetry snoops": asyncio.run(_try(url, _user(data, "telemetry"), _snoop)),
            "telemetry reads TXN": asyncio.run(_try(url, _user(data, "telemetry"), _read_txn)),
            "egress reads TXN": asyncio.run(_try(url, _user(data, "egress"), _read_txn)),
            "egress deletes SAF": asyncio.run(_try(url, _user(data, "egress"), _delete_saf)),
            "auditor reads TXN": asyncio.run(_try(url, auditor, _read_txn)),
            "auditor forges TXN": asyncio.run(_try(url, auditor, _publish_txn)),
            "admin reads TXN": asyncio.run(_try(url, _user(data, "admin"), _read_txn)),
        }
        conf_mode = stat.S_IMODE(os.stat(data / "nats-server.conf").st_mode)
        users_mode = stat.S_IMODE(os.stat(data / USERS_FILE).st_mode)
        assert rack.stop() == 0
    finally:
        rack.close()
    assert probes["anonymous"].startswith("refused")
    assert probes["wrong password"].startswith("refused")
    for denied in ("switch reads TXN", "switch forges TXN", "switch deletes SAF",
                   "telemetry snoops", "telemetry reads TXN", "egress reads TXN",
                   "egress deletes SAF", "auditor forges TXN"):
        assert probes[denied].startswith("denied") and "ermission" in probes[denied], \
            (denied, probes[denied])
    for allowed in ("switch works SAF", "telemetry stats", "auditor reads TXN",
                    "admin reads TXN"):
        assert probes[allowed] == "ok", (allowed, probes[allowed])
    assert conf_mode == 0o600 and users_mode == 0o600
