"""``scripts/demo --industrial``: two simulated presses polled into the Unified Namespace.

1. two Modbus TCP devices (``engine modbus sim``, one process each, free ports) and a rack
   on ``configs/modbus-uns.yaml`` pointed at them (data dir ``var/industrial``);
2. the UNS tree fills (``engine uns browse``);
3. press-2 is killed: its tags turn ``bad: disconnected`` (once each), press-1 carries on;
   press-2 comes back: ``good`` again;
4. a write: ``engine uns set ...press-1.setpoint 1200`` (checked, written, read back,
   audited), and one the rig refuses (above the tag's max);
5. the rack drains; the stream ``UNS`` (history), the KV bucket ``uns`` (one value per tag)
   and ``UNS_WRITES`` (the two writes) are read back and checked.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from engine.bus import load_auth
from engine.cbor import loads
from engine.harness import read_store, start_rack
from engine.natsd import free_port
from engine.rigs import shipped_rig

ROOT = Path("var/industrial")
PREFIX = "acme.lyon.press-shop.line-7"


def _sim(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "modbus", "sim", "--devices",
                             "1", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "device=1 127.0.0.1:PORT unit=1" once it listens
    if b"device=1" not in line:
        raise RuntimeError(f"simulator did not start: {line!r}")
    return proc


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=60)


async def _kv(url: str, data: Path) -> dict[str, dict]:
    import nats

    auth = load_auth(data)
    assert auth is not None
    nc = await nats.connect(url, user=auth.user, password=auth.password)
    try:
        kv = await nc.jetstream().key_value("uns")
        try:
            keys = await kv.keys()
        except Exception:
            return {}
        return {k: loads((await kv.get(k)).value)["body"] for k in keys}
    finally:
        await nc.close()


def _wait(what: str, check, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.2)  # another process's state: no event to await
    raise RuntimeError(f"timed out waiting for {what}")


def run() -> int:
    """The demo; 0 when every check holds."""
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    data = (ROOT / "data").resolve()
    doc = yaml.safe_load(shipped_rig("modbus-uns.yaml").read_text())
    doc["rack"]["data_dir"] = str(data)
    ports = [free_port(), free_port()]
    devices = doc["pipelines"][0]["source"]["settings"]["devices"]
    for dev, port in zip(devices, ports, strict=True):
        dev["port"] = port
        dev["reconnect_max"] = "1s"
    rig = ROOT / "modbus-uns.yaml"
    rig.write_text(yaml.safe_dump(doc, sort_keys=False))
    sims = [_sim(p) for p in ports]
    print(f"devices: press-1 on 127.0.0.1:{ports[0]}, press-2 on 127.0.0.1:{ports[1]} "
          f"(engine modbus sim)")
    rack = start_rack(rig)
    url = json.loads((data / "state.json").read_text())["nats_url"]
    tags = 2 * len(devices[0]["tags"])
    ok = True
    try:
        took = _wait("every tag in the UNS",
                     lambda: len(asyncio.run(_kv(url, data))) == tags)
        print(f"\n$ engine uns browse (every tag in {took:.1f} s)")
        print(_engine("uns", "browse", "--data-dir", str(data)).stdout, end="")
        sims[1].send_signal(signal.SIGTERM)  # press-2 loses power
        sims[1].wait(10)
        down = f"{PREFIX}.cell-2.press-2"
        took = _wait("press-2 bad", lambda: all(
            v["quality"] == "bad: disconnected" for k, v in asyncio.run(_kv(url, data)).items()
            if k.startswith(down)))
        print(f"\npress-2 stopped: its tags bad after {took:.1f} s")
        print(_engine("uns", "browse", down, "--data-dir", str(data)).stdout, end="")
        sims[1] = _sim(ports[1])
        took = _wait("press-2 good again", lambda: all(
            v["quality"] == "good" for v in asyncio.run(_kv(url, data)).values()))
        print(f"\npress-2 back: good again after {took:.1f} s")
        setpoint = f"{PREFIX}.cell-1.press-1.setpoint"
        done = _engine("uns", "set", setpoint, "1200", "--data-dir", str(data), "--as", "demo")
        refused = _engine("uns", "set", setpoint, "9999", "--data-dir", str(data), "--as",
                          "demo")
        print(f"\n$ engine uns set {setpoint} 1200\n{done.stdout}{done.stderr}", end="")
        print(f"$ engine uns set {setpoint} 9999\n{refused.stdout}{refused.stderr}", end="")
        ok &= done.returncode == 0 and refused.returncode == 1
    finally:
        code = rack.stop()
        for s in sims:
            if s.poll() is None:
                s.send_signal(signal.SIGTERM)
                s.wait(10)
    rack_id = doc["rack"]["id"]
    history = read_store(data, rack_id, "UNS", "uns.v1.>", messages=False)
    last = read_store(data, rack_id, "KV_uns", "$KV.uns.>", messages=False)
    writes = read_store(data, rack_id, "UNS_WRITES", f"uns.writes.{rack_id}")
    results = [loads(d)["body"]["result"] for _, d in writes.messages]
    print(f"\nUNS history: {history.count:,} samples; KV uns: {last.count} tags "
          f"(expected {tags}); UNS_WRITES: {results}; rack exit code {code}")
    ok &= code == 0 and last.count == tags and results == ["confirmed", "refused"]
    print("OK: the UNS filled, a device failed and recovered, a write was confirmed and "
          "audited" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
