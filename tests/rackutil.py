"""Helpers for tests that run a whole rack: write a rig file, start ``engine start``, read
counters and the JetStream stream."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from engine.counters import Counters
from engine.frame import decode
from engine.harness import RackNotReady, RackRun, read_store
from engine.telemetry import read_state


def uid(name: str) -> str:
    """A rack id unique to this test process: segments live in the host-wide /dev/shm, and
    another suite on the same machine (or a killed earlier one) must not meet ours."""
    return f"{name}-{os.getpid()}"


def rig(tmp_path: Path, rack_id: str, *, count: int, rate: float, stages: int = 1,
        subject: str | None = None, **extra: Any) -> Path:
    """Write a generator -> mapping x stages -> egress rig file and return its path."""
    subject = subject or f"fluxrig.{rack_id}.events"
    cfg = {
        "rack": {"id": rack_id, "data_dir": str(tmp_path / "data")},
        "rings": {"capacity": "1MiB", "batch": 256},
        "telemetry": {"interval": 0.2},
        "egress": {"streams": [{"name": "EV", "subjects": [f"fluxrig.{rack_id}.>"]}],
                   "batch": 500, "max_inflight": 4, "ack_timeout": 2.0},
        "pipelines": [{
            "name": "p",
            "key": "headers.device",
            "source": {"gear": "generator", "settings": {
                "rate": rate, "count": count, "batch": 50, "keys": 8,
                "headers": {"device": "d{i}"}, "body": {"seq": "$seq"}}},
            "stages": [{"name": f"s{i}", "gear": "mapping",
                        "settings": {"set": {f"headers.s{i}": True}}} for i in range(stages)],
            "sinks": [{"name": "js", "gear": "egress", "settings": {"subject": subject}}],
        }],
    }
    for key, value in extra.items():
        cfg[key] = value
    path = tmp_path / f"{rack_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class RackProcess:
    """``engine start`` as a child process, with access to its state and counters."""

    def __init__(self, config: Path, data_dir: Path, workers: int = 1,
                 nofile: int | None = None):
        self.config = config
        self.data_dir = data_dir
        self.log = open(data_dir.parent / f"engine-{os.getpid()}-{time.monotonic_ns()}.out", "wb")

        def limits() -> None:  # in the child, before exec: an operator's ulimit -n
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.run = RackRun(config, workers=workers, stdout=self.log, preexec_fn=limits)
        self.proc = self.run.proc
        try:
            self.run.wait_ready(60.0)  # the rack says so: every process serves
        except RackNotReady as exc:
            raise AssertionError(f"{exc}: output={self.output()}") from None
        self.state = read_state(self.data_dir)
        self._held: dict[str, Counters] = {}

    def refresh(self) -> dict[str, Any]:
        """Re-read the state file (pids change on restarts)."""
        self.state = read_state(self.data_dir)
        return self.state

    def output(self) -> str:
        """Everything the rack printed so far."""
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def counters(self, role: str) -> Counters:
        """Counters of the (first) process with ``role``; stays readable after the rack stops."""
        if role not in self._held:
            proc = next(p for p in self.state["processes"] if p["role"] == role)
            self._held[role] = Counters.attach(proc["counters"])
        return self._held[role]

    def stats(self, name: str) -> dict[str, int]:
        """The gear stats of process ``name`` now (``{key: value}``)."""
        from engine.counters import StatDef

        self.refresh()
        proc = next(p for p in self.state["processes"] if p["name"] == name)
        defs = [StatDef.from_json(d) for d in proc.get("stats") or ()]
        c = Counters.attach(proc["counters"])
        try:
            values = c.snapshot().stats.tolist()
        finally:
            c.close()
        return {d.key: v for d, v in zip(defs, values, strict=True)}

    def pid_of(self, name_prefix: str) -> int:
        """Current pid of the first process whose name starts with ``name_prefix``."""
        self.refresh()
        return next(p["pid"] for p in self.state["processes"] if p["name"].startswith(name_prefix))

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        """Poll ``predicate`` (shared-memory counters: no event exists) until true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"rack exited while waiting for {what}: {self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def close(self) -> None:
        """Kill if still running (a failed test), unmap held counters, and leave no process
        or segment of the killed rack behind for later tests."""
        killed = self.proc.poll() is None
        if killed:
            self.proc.kill()
            self.proc.wait()
        for c in self._held.values():
            c.close()
        if killed:
            from engine.shm import mapping_pids, segment_names, unlink

            rack_id = yaml.safe_load(self.config.read_text())["rack"]["id"]
            names = segment_names(f"fx-{rack_id}-")
            deadline = time.monotonic() + 10
            while mapping_pids(names) and time.monotonic() < deadline:
                time.sleep(0.1)  # its children got SIGTERM from the kernel; they are draining
            for pid in mapping_pids(names):
                os.kill(pid, signal.SIGKILL)
            for name in names:
                unlink(name)
        if not self.log.closed:
            self.log.close()


def stream_contents(data_dir: Path, rack_id: str, stream: str = "EV",
                    subject: str | None = None) -> tuple[int, list[tuple[str, bytes]]]:
    """Re-open a stopped rack's JetStream store and return (message count, [(msg id, data)])."""
    store = read_store(data_dir, rack_id, stream, subject)
    return store.count, store.messages


def switch_rig(tmp_path: Path, rack_id: str, port: int, issuer_port: int,
               **settings: Any) -> Path:
    """Write a one-pipeline switch rig (issuer ``a`` for BIN 4 and 6, ``b`` for BIN 5, both on
    ``issuer_port``; audit to stream TXN) and return its path; ``settings`` override the
    switch settings, ``rings``/``telemetry`` keys the rack's."""
    rings = settings.pop("rings", {"capacity": "1MiB"})
    telemetry = settings.pop("telemetry", {"interval": 0.5})
    sw = {
        "listen": {"host": "127.0.0.1", "port": port},
        "acquirer": {"framing": {"prefix": "2B"}, "spec": "default"},
        "timeout": 2.0,
        "issuers": {"a": {"port": issuer_port, "connections": 2},
                    "b": {"port": issuer_port, "connections": 1}},
        "groups": {"visa": {"endpoints": ["a"]}, "mc": {"endpoints": ["b"]}},
        "routes": [{"name": "visa", "bins": ["4", "6"], "group": "visa"},
                   {"name": "mc", "bins": ["5"], "group": "mc"}],
    }
    sw.update(settings)
    cfg = {
        "rack": {"id": rack_id, "data_dir": str(tmp_path / "data")},
        "rings": rings,
        "telemetry": telemetry,
        "egress": {"streams": [{"name": "TXN", "subjects": [f"fluxrig.{rack_id}.txn"]}]},
        "pipelines": [{
            "name": "payments",
            "source": {"name": "switch", "gear": "iso8583", "settings": sw},
            "sinks": [{"name": "audit", "gear": "egress",
                       "settings": {"subject": f"fluxrig.{rack_id}.txn"}}],
        }],
    }
    path = tmp_path / f"{rack_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_switch_ready(rack: RackProcess, port: int, replicas: int = 1) -> None:
    """Until the switch listens on ``port`` and each replica has an issuer link up."""
    import socket

    def up() -> bool:
        if rack.output().count("issuer link up: issuer=a") < replicas:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    rack.wait_for(up, 30, f"switch listening on {port} with issuer links")


def check_exactly_once(messages: list[tuple[str, bytes]], count: int) -> None:
    """Every seq 0..count-1 once, every message id once and equal to its frame's id."""
    seqs = []
    ids = set()
    for msg_id, data in messages:
        frame = decode(data, strict=True)
        assert msg_id == frame.id.hex()
        ids.add(msg_id)
        seqs.append(frame.body["seq"])
    assert len(ids) == len(messages), "duplicate message ids in the stream"
    assert sorted(seqs) == list(range(count)), "stream does not hold every frame exactly once"
