"""The rack as users run it: `engine start` with real processes, real nats-server, real shm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from rackutil import RackProcess, check_exactly_once, rig, stream_contents, uid

from engine.cbor import loads

pytestmark = pytest.mark.slow


def _segments(rack_id: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"fx-{rack_id}-"))


def test_multi_stage_rig_moves_every_frame_and_drains_clean(tmp_path):
    rack = RackProcess(rig(tmp_path, uid("t-run"), count=5000, rate=0, stages=2),
                       tmp_path / "data", workers=2)
    try:
        names = [p["name"] for p in rack.state["processes"]]
        assert names == ["telemetry", "egress", "p.s0.0", "p.s0.1", "p.s1.0", "p.s1.1", "p.source"]
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out == 5000, 60, "5000 frames acked")
        assert _segments(uid("t-run"))
        assert rack.stop() == 0
        assert _segments(uid("t-run")) == []
        assert not (tmp_path / "data" / "state.json").exists()
    finally:
        rack.close()
    count, messages = stream_contents(tmp_path / "data", uid("t-run"))
    assert count == 5000
    check_exactly_once(messages, 5000)
    # every frame went through both stages of its lane
    from engine.frame import decode
    assert all(decode(d).headers.get("s0") and decode(d).headers.get("s1") for _, d in messages)


def test_killed_stage_worker_restarts_and_the_stream_holds_every_frame_once(tmp_path):
    total = 20_000
    rack = RackProcess(rig(tmp_path, uid("t-kill"), count=total, rate=8000, stages=1),
                       tmp_path / "data", workers=2)
    try:
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out > 2000, 60, "traffic")
        victim = rack.pid_of("p.s0.1")
        os.kill(victim, signal.SIGKILL)
        rack.wait_for(lambda: egress.snapshot().frames_out >= total, 90, "all frames acked")
        state = rack.refresh()
        worker = next(p for p in state["processes"] if p["name"] == "p.s0.1")
        assert worker["restarts"] >= 1 and worker["pid"] != victim
        assert "process died, restarting: process=p.s0.1" in rack.output()
        assert rack.stop() == 0
    finally:
        rack.close()
    count, messages = stream_contents(tmp_path / "data", uid("t-kill"))
    assert count == total
    check_exactly_once(messages, total)


def test_nats_server_killed_under_load_loses_and_duplicates_nothing(tmp_path):
    total = 20_000
    rack = RackProcess(rig(tmp_path, uid("t-nats"), count=total, rate=6000), tmp_path / "data")
    try:
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out > 3000, 60, "traffic")
        os.kill(rack.state["nats_pid"], signal.SIGKILL)
        rack.wait_for(lambda: egress.snapshot().frames_out >= total, 120, "all frames acked")
        assert "nats-server died, restarting" in rack.output()
        assert rack.stop() == 0
    finally:
        rack.close()
    count, messages = stream_contents(tmp_path / "data", uid("t-nats"))
    assert count == total
    check_exactly_once(messages, total)


def test_sigterm_drain_of_an_endless_source_loses_nothing(tmp_path):
    rack = RackProcess(rig(tmp_path, uid("t-drain"), count=0, rate=5000), tmp_path / "data",
                       workers=2)
    try:
        source = rack.counters("source")
        rack.wait_for(lambda: source.snapshot().frames_out > 3000, 60, "traffic")
        assert rack.stop() == 0
        produced = source.snapshot().frames_out
    finally:
        rack.close()
    count, messages = stream_contents(tmp_path / "data", uid("t-drain"))
    assert count == produced
    check_exactly_once(messages, produced)


def test_second_start_on_the_same_data_dir_is_refused(tmp_path):
    config = rig(tmp_path, uid("t-twice"), count=10, rate=0)
    rack = RackProcess(config, tmp_path / "data")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "engine.cli", "start", "--config", str(config)],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert (f"error: rack already running: rack={uid('t-twice')}, pid={rack.state['pid']}, "
                f"data_dir={tmp_path / 'data'}") in second.stderr
        assert rack.proc.poll() is None  # the first one is untouched
    finally:
        rack.stop()
        rack.close()


def test_status_json_reports_what_the_counters_say(tmp_path):
    config = rig(tmp_path, uid("t-status"), count=3000, rate=0)
    rack = RackProcess(config, tmp_path / "data", workers=2)
    try:
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out == 3000, 60, "3000 frames acked")
        out = subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", "--config", str(config), "--json",
             "--interval", "0.2"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        by_name = {p["name"]: p for p in status["processes"]}
        assert by_name["egress"]["frames_out"] == 3000
        assert by_name["p.source"]["frames_out"] == 3000
        assert by_name["p.s0.0"]["frames_in"] + by_name["p.s0.1"]["frames_in"] == 3000
        assert by_name["egress"]["pid"] == rack.pid_of("egress")
        assert by_name["p.s0.1"]["cpu"] == 1 % os.cpu_count()
        assert by_name["egress"]["p99_ns"] > 0 and by_name["egress"]["rss"] > 0
        table = subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", "--config", str(config),
             "--interval", "0.2"], capture_output=True, text=True, timeout=60)
        assert "p.s0.1" in table.stdout and "p99 ms" in table.stdout
        watched = subprocess.run(
            [sys.executable, "-m", "engine.cli", "status", "--config", str(config), "--watch",
             "--count", "3", "--interval", "0.1"], capture_output=True, text=True, timeout=60)
        assert watched.returncode == 0 and watched.stdout.count("p99 ms") == 3
    finally:
        rack.stop()
        rack.close()


async def _one_stats_message(url: str, subject: str, data_dir) -> bytes:
    from engine.bus import connect, load_auth

    nc = await connect(url, load_auth(data_dir), "test")
    try:
        sub = await nc.subscribe(subject)
        msg = await sub.next_msg(timeout=10)
        return msg.data
    finally:
        await nc.close()


def test_stats_subject_carries_decodable_snapshots(tmp_path):
    rack = RackProcess(rig(tmp_path, uid("t-stats"), count=1000, rate=0), tmp_path / "data")
    try:
        subject = f"fluxrig.stats.{uid('t-stats')}"
        data = asyncio.run(_one_stats_message(rack.state["nats_url"], subject, tmp_path / "data"))
        snap = loads(data, strict=True)  # deterministic CBOR, bit for bit
        assert snap["rack"] == uid("t-stats")
        names = {p["name"] for p in snap["processes"]}
        assert {"egress", "p.source", "p.s0.0", "telemetry"} <= names
        assert snap["host"]["mem_used"] > 0
    finally:
        rack.stop()
        rack.close()


def test_segments_left_by_a_killed_supervisor_are_cleaned_at_next_start(tmp_path):
    config = rig(tmp_path, uid("t-stale"), count=100, rate=0)
    rack = RackProcess(config, tmp_path / "data")
    try:
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out == 100, 60, "frames acked")
        left = _segments(uid("t-stale"))
        os.kill(rack.proc.pid, signal.SIGKILL)
        rack.proc.wait()
    finally:
        rack.close()
    assert left and _segments(uid("t-stale")) == left  # nobody cleaned up after the kill
    again = RackProcess(config, tmp_path / "data")
    try:
        assert f"segments of the previous run adopted: rack={uid('t-stale')}, count=" in again.output()
        assert again.stop() == 0
    finally:
        again.close()
    assert _segments(uid("t-stale")) == []


def test_stop_and_status_without_a_running_rack_say_so(tmp_path):
    config = rig(tmp_path, uid("t-none"), count=10, rate=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_text(json.dumps({"pid": os.getpid(), "processes": []}))
    for cmd in ("stop", "status"):
        out = subprocess.run([sys.executable, "-m", "engine.cli", cmd, "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr.strip() == f"error: no rack running: data_dir={data}"


def test_engine_stop_drains_a_running_rack(tmp_path):
    config = rig(tmp_path, uid("t-stop"), count=0, rate=2000)
    rack = RackProcess(config, tmp_path / "data")
    try:
        source = rack.counters("source")
        rack.wait_for(lambda: source.snapshot().frames_out > 500, 60, "traffic")
        out = subprocess.run([sys.executable, "-m", "engine.cli", "stop", "--config", str(config)],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0 and out.stdout.strip() == f"stopped: pid={rack.proc.pid}"
        assert rack.proc.wait(10) == 0
        produced = source.snapshot().frames_out
    finally:
        rack.close()
    count, _ = stream_contents(tmp_path / "data", uid("t-stop"))
    assert count == produced


def test_prometheus_endpoint_exports_the_counters(tmp_path):
    import urllib.request

    from engine.natsd import free_port

    port = free_port()
    config = rig(tmp_path, uid("t-prom"), count=2000, rate=0,
                 telemetry={"interval": 0.2, "prometheus": {"host": "127.0.0.1", "port": port}})
    rack = RackProcess(config, tmp_path / "data")
    try:
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out == 2000, 60, "frames acked")

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""

        import re

        def value(text: str, metric: str, process: str) -> float | None:
            m = re.search(rf'^{metric}{{[^}}]*process="{re.escape(process)}"[^}}]*}} (\S+)$',
                          text, re.M)
            return float(m.group(1)) if m else None

        # telemetry samples on its own interval: wait until a sample saw the final count
        rack.wait_for(lambda: value(scrape(), "fluxrig_frames_out_total", "egress") == 2000,
                      30, "egress frames_out = 2000 on /metrics")
        text = scrape()
        assert value(text, "fluxrig_frames_out_total", "p.source") == 2000
        assert value(text, "fluxrig_latency_seconds_count", "egress") == 2000
        assert value(text, "fluxrig_ring_fill_ratio", "p.s0.0") is not None
    finally:
        rack.stop()
        rack.close()


def test_file_sink_rig_writes_every_frame_as_a_json_line(tmp_path):
    config = rig(tmp_path, uid("t-file"), count=3000, rate=0)
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["pipelines"][0]["sinks"] = [{"name": "out", "gear": "file",
                                     "settings": {"path": "out/events.jsonl"}}]
    config.write_text(yaml.safe_dump(cfg))
    rack = RackProcess(config, tmp_path / "data", workers=2)
    try:
        sink = rack.counters("sink")
        rack.wait_for(lambda: sink.snapshot().frames_out == 3000, 60, "3000 lines written")
        assert rack.stop() == 0
    finally:
        rack.close()
    lines = (tmp_path / "data" / "out" / "events.jsonl").read_text().splitlines()
    seqs = sorted(json.loads(line)["body"]["seq"] for line in lines)
    assert seqs == list(range(3000))


def test_a_rack_that_dies_before_it_is_ready_is_reported_not_waited_for(tmp_path):
    from engine.harness import RackNotReady, RackRun

    config = rig(tmp_path, uid("t-dead"), count=10, rate=0)
    (tmp_path / "data").mkdir()
    lock = os.open(tmp_path / "data" / "rack.lock", os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_EX)  # "another supervisor" holds the data dir
    try:
        run = RackRun(config)
        with pytest.raises(RackNotReady) as exc:
            run.wait_ready(60)
        assert str(exc.value) == "rack exited before it was ready: code=3"
    finally:
        os.close(lock)


def test_the_same_rack_id_from_another_data_dir_is_refused_without_a_traceback(tmp_path):
    config = rig(tmp_path, uid("t-twin"), count=10, rate=0)
    rack = RackProcess(config, tmp_path / "data")
    try:
        twin = tmp_path / "twin.yaml"
        twin.write_text(config.read_text().replace(str(tmp_path / "data"),
                                                   str(tmp_path / "other")))
        second = subprocess.run(
            [sys.executable, "-m", "engine.cli", "start", "--config", str(twin)],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert f"rack '{uid('t-twin')}' is running already" in second.stderr
        assert "Traceback" not in second.stderr
        assert rack.proc.poll() is None
    finally:
        rack.stop()
        rack.close()


def test_planted_segments_an_empty_one_is_replaced_a_foreign_one_stops_the_start(tmp_path):
    """/dev/shm is world-writable: an empty file under a ring's name (a creator killed before
    it sized it, or a stranger) once blocked every start; a foreign one must be named, not
    mapped."""
    config = rig(tmp_path, uid("t-plant"), count=10, rate=0)
    segment = f"fx-{uid('t-plant')}-p-source-0"
    empty = f"/dev/shm/{segment}"
    os.close(os.open(empty, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    rack = RackProcess(config, tmp_path / "data")
    try:
        assert rack.stop() == 0
    finally:
        rack.close()
    assert not os.path.exists(empty)

    foreign = empty
    fd = os.open(foreign, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"\x00" * 4096)
    os.close(fd)
    os.chmod(foreign, 0o644)
    try:
        out = subprocess.run([sys.executable, "-m", "engine.cli", "start", "--config",
                              str(config)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert (f"segment open to other users: name={segment}, mode=0o644"
                in out.stderr), out.stderr
        assert "Traceback" not in out.stderr
        assert os.path.getsize(foreign) == 4096  # left for its owner to explain
    finally:
        os.unlink(foreign)
    assert _segments(uid("t-plant")) == []
