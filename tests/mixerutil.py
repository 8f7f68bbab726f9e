"""Helpers for tests that run a Mixer: a hub data dir on free ports, ``mixer start`` as a
child, enrolment through the real CLI, the hub's copy of a rack stream, a TCP proxy that
cuts the leaf link."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

from engine.frame import decode
from engine.natsd import free_port
from engine.plan import STATE_FILE

AUDIT = "{flush_after: 0.5s}"  # tests wait for the archive: parts every half second


def mixer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``mixer ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mixer", *args], capture_output=True,
                          text=True, timeout=timeout)


def init_hub(tmp_path: Path, *, offline_after: str = "2s", leaf_urls: list[str] | None = None,
             prometheus: bool = False, audit: str = AUDIT) -> Path:
    """``mixer init`` on free ports, then the settings a test wants."""
    hub = tmp_path / "hub"
    port, leaf = free_port(), free_port()
    done = mixer("init", str(hub), "--host", "127.0.0.1", "--port", str(port),
                 "--leaf-port", str(leaf))
    assert done.returncode == 0, done.stderr
    write_settings(hub, port, leaf, leaf_urls or [f"tls://127.0.0.1:{leaf}"], offline_after,
                   prometheus, audit)
    return hub


def write_settings(hub: Path, port: int, leaf: int, urls: list[str], offline_after: str = "2s",
                   prometheus: bool = False, audit: str = AUDIT) -> None:
    """The hub's mixer.yaml: its ports, what passports tell racks to dial, ..."""
    (hub / "mixer.yaml").write_text(
        f"hub: {{host: 127.0.0.1, port: {port}}}\n"
        f"leaf: {{host: 127.0.0.1, port: {leaf}, urls: [{', '.join(urls)}]}}\n"
        f"registry: {{offline_after: {offline_after}}}\n"
        f"prometheus: {'{host: 127.0.0.1, port: 0}' if prometheus else 'null'}\n"
        f"audit: {audit}\n")


def hub_ports(hub: Path) -> tuple[int, int]:
    """(client port, leaf port) from a hub's mixer.yaml."""
    from mixer.settings import load_settings

    s = load_settings(hub)
    return s.hub_port, s.leaf_port


class MixerProcess:
    """``mixer start`` as a child process, ready when it says so."""

    def __init__(self, hub: Path, timeout: float = 60.0):
        self.hub = hub
        self.out = open(hub.parent / f"mixer-{os.getpid()}-{time.monotonic_ns()}.out", "wb")
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mixer.cli", "start", str(hub), "--log-file", "-",
                 "--ready-fd", str(write)],
                stdout=self.out, stderr=subprocess.STDOUT, pass_fds=(write,))
        finally:
            os.close(write)
        try:
            r, _, _ = select.select([read], [], [], timeout)
            got = os.read(read, 64) if r else b""
        finally:
            os.close(read)
        if b"ready" not in got:
            self.close()
            raise AssertionError(f"mixer not ready: {self.output()}")

    def state(self) -> dict[str, Any]:
        """The Mixer's state.json."""
        return json.loads((self.hub / STATE_FILE).read_text())

    def output(self) -> str:
        """What the Mixer logged so far."""
        if not self.out.closed:
            self.out.flush()
        return Path(self.out.name).read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill if still running (a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


def enrol(hub: Path, rack: str, *labels: str) -> Path:
    """``mixer rack add`` through the CLI; the passport's path."""
    out = hub.parent / f"{rack}.passport"
    args = [a for kv in labels for a in ("--label", kv)]
    done = mixer("rack", "add", str(hub), rack, "--out", str(out), *args)
    assert done.returncode == 0, done.stderr
    return out


def racks(hub: Path, *labels: str) -> list[dict[str, Any]]:
    """``mixer racks --json`` through the CLI."""
    done = mixer("racks", str(hub), "--json", *[a for kv in labels for a in ("--label", kv)])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.1) -> float:
    """Poll ``predicate`` (state in other processes: no event to wait on) until it holds;
    the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def admin_password(hub: Path) -> str:
    """The hub's admin user's password."""
    return json.loads((hub / "nats-users.json").read_text())["admin"]


async def hub_stream(hub: Path, stream: str) -> tuple[int, list[int]]:
    """(messages, the generator's ``seq`` of every message in order) of a hub stream."""
    port, _ = hub_ports(hub)
    nc = await nats.connect(f"nats://127.0.0.1:{port}", user="admin",
                            password=admin_password(hub))
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        seqs = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            seqs.append(decode(msg.data).body["seq"])
        return info.state.messages, seqs
    finally:
        await nc.close()


async def hub_count(hub: Path, stream: str) -> int:
    """Messages in a hub stream (0 while it does not exist)."""
    port, _ = hub_ports(hub)
    nc = await nats.connect(f"nats://127.0.0.1:{port}", user="admin",
                            password=admin_password(hub))
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    except Exception:
        return 0
    finally:
        await nc.close()


class LinkProxy:
    """A TCP proxy between a rack and the hub's leaf port; ``cut()`` drops every connection
    and refuses new ones until ``mend()`` (a backhaul outage, without touching either side)."""

    def __init__(self, loop_thread: Any, target_port: int):
        self.peers = loop_thread
        self.target = target_port
        self.port = free_port()
        self.open = True
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server = self.peers.call(asyncio.start_server(self._serve, "127.0.0.1",
                                                           self.port))

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.open:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.transport.abort()
            return
        self.pairs.append((w, uw))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def cut(self) -> None:
        """Drop the link now; refuse reconnects."""
        async def go() -> None:
            self.open = False
            for a, b in self.pairs:
                a.transport.abort()
                b.transport.abort()
            self.pairs.clear()
        self.peers.call(go())

    def mend(self) -> None:
        """Accept connections again."""
        self.open = True

    def close(self) -> None:
        self.cut()
        self.server.close()


def engine_status(data_dir: Path) -> str:
    """``engine status`` of a rack, as a user reads it."""
    done = subprocess.run([sys.executable, "-m", "engine.cli", "status", "--data-dir",
                           str(data_dir), "--interval", "0.1"], capture_output=True, text=True,
                          timeout=30)
    return done.stdout + done.stderr


def linked_rig(tmp_path: Path, rack_id: str, passport: Path, count: int, rate: float,
               name: str = "r") -> tuple[Path, Path]:
    """A generator rack's rig naming ``passport`` (its own folder ``name``): (rig, data dir)."""
    from rackutil import rig

    d = tmp_path / name
    d.mkdir()
    return rig(d, rack_id, count=count, rate=rate, mixer={"passport": str(passport)},
               telemetry={"interval": 0.5}), d / "data"

