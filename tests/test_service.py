"""The rack as a service: systemd's notify protocol against a real socket, the shipped unit
file, process titles, log lines (UTC, JSON, once, rotated across processes)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from rackutil import rig, uid

from engine.harness import RackRun
from engine.natsd import render_config
from engine.service import Notifier, NotifyError, process_title

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "fluxrig@.service"
UTC_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \d+ \S+ \S+ [A-Z]+ ")


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    return sock


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


# --- the notifier, sans rack ------------------------------------------------------------


def test_notifier_sends_one_datagram_of_lines_and_paces_the_watchdog(tmp_path):
    sock = _listener(tmp_path / "n.sock")
    now = [100.0]
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "4000000"},
                 clock=lambda: now[0])
    try:
        assert n.enabled and n.watchdog_interval == 2.0
        n.send("READY=1", "STATUS=serving")
        assert _fields(sock.recv(256)) == {"READY": "1", "STATUS": "serving"}
        assert n.ping() == 2.0
        assert sock.recv(64) == b"WATCHDOG=1"
        now[0] += 1.5
        assert n.ping() == pytest.approx(0.5)  # not due: nothing sent
        now[0] += 0.5
        assert n.ping() == 2.0
        assert sock.recv(64) == b"WATCHDOG=1"
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(64)
    finally:
        sock.close()


def test_notifier_abstract_socket_and_watchdog_for_another_pid(tmp_path):
    name = f"fluxrig-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
        assert n.watchdog_interval is None and n.ping() is None  # meant for another process
        n.send("STOPPING=1")
        assert sock.recv(64) == b"STOPPING=1"
    finally:
        sock.close()


def test_notify_required_without_a_socket_is_an_error_and_optional_is_a_no_op():
    with pytest.raises(NotifyError, match="NOTIFY_SOCKET is not set"):
        Notifier({}, required=True)
    n = Notifier({})
    assert not n.enabled
    n.send("READY=1")  # nowhere to go, no error


def test_engine_start_notify_without_socket_exits_2(tmp_path):
    config = rig(tmp_path, uid("t-nonotify"), count=1, rate=0)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "start", "--config", str(config),
                          "--notify"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "--notify: NOTIFY_SOCKET is not set" in out.stderr
    assert not (tmp_path / "data" / "state.json").exists()


# --- a whole rack under the notify protocol ---------------------------------------------


def test_rack_speaks_the_notify_protocol_ready_watchdog_stopping(tmp_path):
    sock = _listener(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
               WATCHDOG_USEC="300000")  # a ping every 150 ms
    run = RackRun(rig(tmp_path, uid("t-notify"), count=10, rate=0), env=env,
                  args=["--notify"])
    try:
        run.wait_ready(60)
        got = [_fields(sock.recv(512))]
        while "READY" not in got[-1]:
            got.append(_fields(sock.recv(512)))
        ready = got[-1]
        assert ready["STATUS"] == "serving" and ready["MAINPID"] == str(run.proc.pid)
        state = json.loads((tmp_path / "data" / "state.json").read_text())
        assert state["ready"] is True
        pings = 0
        while pings < 3:  # the supervisor's loop keeps feeding the watchdog
            assert _fields(sock.recv(512)) == {"WATCHDOG": "1"}
            pings += 1
        run.proc.terminate()
        stopping = _fields(sock.recv(512))
        while "STOPPING" not in stopping:
            stopping = _fields(sock.recv(512))
        assert stopping["STATUS"] == "draining"
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 30_000_000  # the drain's budget
        assert run.proc.wait(60) == 0
    finally:
        run.kill()
        sock.close()


# --- the shipped unit file --------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    return unit


def test_unit_file_is_a_notify_service_that_lets_the_supervisor_drain():
    svc = _unit()["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    # only the supervisor gets SIGTERM: it stops its children in order after the drain
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    # segments must outlive a crash or a stop that left work in them
    assert svc["RemoveIPC"] == "no" and svc["PrivateDevices"] == "no"
    assert "DynamicUser" not in svc  # implies RemoveIPC=yes
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["User"] == "fluxrig" and svc["CapabilityBoundingSet"] == ""
    assert int(svc["WatchdogSec"]) >= 10
    argv = shlex.split(svc["ExecStart"])
    drain = float(argv[argv.index("--drain-timeout") + 1])
    # what the supervisor may take after SIGTERM: the drain, then its own stop timeouts
    # (sources 20 s, stages and egress 15 s, telemetry 5 s, nats-server 10 s)
    assert int(svc["TimeoutStopSec"]) >= drain + 20 + 15 + 5 + 10
    assert "2" in svc["RestartPreventExitStatus"].split()  # a bad rig file stays bad


def test_unit_exec_start_parses_with_the_cli_it_runs():
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[0].endswith("/engine") and argv[1] == "start"
    from engine.cli import app

    start = typer.main.get_command(app).commands["start"]  # type: ignore[attr-defined]
    ctx = start.make_context("start", argv[2:])  # unknown flags or bad values raise here
    assert ctx.params["notify"] is True and ctx.params["log_file"] == "-"
    assert str(ctx.params["config"]) == "/etc/fluxrig/%i.yaml"


# --- process titles and logs ------------------------------------------------------------


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_every_process_has_a_title_and_every_log_line_is_utc_once(tmp_path):
    rack_id = uid("t-title")
    run = RackRun(rig(tmp_path, rack_id, count=0, rate=50), stdout=subprocess.PIPE,
                  args=["--log-file", ""])  # the default: rack.log in the data dir
    try:
        run.wait_ready(60)
        state = json.loads((tmp_path / "data" / "state.json").read_text())
        titles = {p["name"]: _cmdline(p["pid"]) for p in state["processes"]}
        assert titles == {
            "p.source": process_title(rack_id, "p.source"),
            "p.s0.0": process_title(rack_id, "p.s0", 0),
            "egress": process_title(rack_id, "egress"),
            "telemetry": process_title(rack_id, "telemetry"),
        }
        assert _cmdline(run.proc.pid) == f"fluxrig {rack_id} supervisor"
        assert run.stop() == 0
        printed = run.proc.stdout.read().decode()  # type: ignore[union-attr]
    finally:
        run.kill()
    log = (tmp_path / "data" / "rack.log").read_text()
    lines = log.splitlines()
    assert lines and all(UTC_LINE.match(line) for line in lines), lines[:3]
    named = {line.split()[2] for line in lines}
    assert {"supervisor", "egress"} <= named
    # the terminal gets where the log is, not the log a second time
    assert printed.splitlines() == [f"rack {rack_id!r}: logging to {tmp_path / 'data' / 'rack.log'}"]


def test_json_logs_rotate_across_processes_without_torn_lines(tmp_path):
    rack_id = uid("t-jsonlog")
    run = RackRun(rig(tmp_path, rack_id, count=0, rate=50), args=[
        "--log-file", str(tmp_path / "logs" / "rack.log"), "--log-format", "json",
        "--log-max-bytes", "1500", "--log-backups", "3", "--verbose"])
    try:
        run.wait_ready(60)
        assert run.stop() == 0
    finally:
        run.kill()
    files = sorted((tmp_path / "logs").glob("rack.log*"))
    names = {f.name for f in files}
    assert "rack.log" in names and "rack.log.1" in names and "rack.log.4" not in names
    docs = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert all(set(d) >= {"ts", "level", "logger", "pid", "process", "msg"} for d in docs)
    assert all(d["ts"].endswith("Z") for d in docs)
    assert len({d["process"] for d in docs}) >= 3  # several processes shared the file
    assert all(f.stat().st_size <= 1500 + 600 for f in files)  # one line past the limit at most


def test_nats_server_rotates_its_own_log_in_utc():
    conf = json.loads(render_config(rack_id="r", host="127.0.0.1", port=4222, store_dir="/x",
                                    log_file="/d/nats-server.log"))
    assert conf["log_file"] == "/d/nats-server.log" and conf["logtime_utc"] is True
    assert conf["logfile_size_limit"] > 0 and conf["logfile_max_num"] > 0


def test_a_tiny_watchdog_timeout_does_not_become_a_datagram_storm():
    """Found by a hostile review: WATCHDOG_USEC=1 sent 74,452 datagrams in 9 s."""
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1"})
    assert n.watchdog_interval == 0.01


def test_a_past_runs_crash_files_are_not_this_runs_last_error(tmp_path):
    """Found by a hostile review: a process's 'last error' came from a run 20 minutes old."""
    config = rig(tmp_path, uid("t-crashfiles"), count=10, rate=0)
    old = tmp_path / "data" / "crash" / "p.source.last"
    old.parent.mkdir(parents=True)
    old.write_text("OSError: [Errno 9] Bad file descriptor (from an old run)")
    run = RackRun(config)
    try:
        run.wait_ready(60)
        assert not old.exists()
        assert run.stop() == 0
    finally:
        run.kill()
