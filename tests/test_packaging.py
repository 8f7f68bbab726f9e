"""fluxrig installs without a compiler: a wheel built with ``CC=/bin/false`` holds no
extension, and what it installs runs the pure-Python path and finds its shipped rigs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from engine import cbor

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "configs",
           "engine", "gears", "mixer")
SAMPLE = {"id": b"\x01" * 16, "ts": 1, "body": {"amount": 2.5, "pan": None, "tags": [1, -2]}}

# Run by the interpreter of this venv with only the unpacked wheel (and the dependencies in
# site-packages) to import fluxrig from.
PROBE = """
import ast, json, sys
import engine
from engine import _native, cbor, ring
from engine.config import load_config
from engine.demo import SWITCH_CONFIG
r = ring.Ring.create(sys.argv[1], 1024)
try:
    p, c = r.producer(), r.consumer()
    sent, got = [bytes([i % 256]) * (i % 100) for i in range(300)], []
    done = 0
    while done < len(sent):  # ~30 KB through 1 KiB: wraps, padding, full ring
        done += p.try_write(sent[done:])
        views = c.poll()
        got += [bytes(v) for v in views]
        del views
        c.commit()
finally:
    r.close()
    r.unlink()
print(json.dumps({
    "engine": engine.__file__,
    "paths": _native.code_paths(),
    "ring_loops": ring.read_records.__module__,
    "ring_ok": got == sent,
    "cbor": cbor.dumps(ast.literal_eval(sys.argv[2])).hex(),
    "switch_config": str(SWITCH_CONFIG),
    "data_dir": str(load_config(SWITCH_CONFIG).data_dir),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """A wheel built from a copy of this checkout with ``CC=/bin/false``, offline; and the
    build's output. The copy keeps any ``.so`` the checkout has, so a stale extension that
    leaked into the wheel would be caught."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k != "FLUXRIG_PURE_PYTHON"}
    env.update(CC="/bin/false", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "--wheel-dir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (built,) = (tmp / "dist").glob("fluxrig-*.whl")
    return built, out.stdout + out.stderr


def test_a_compiler_that_fails_is_reported_and_the_wheel_is_still_built(wheel):
    _, log = wheel
    for ext in ("engine._ringcore", "engine._cborcore"):
        assert f"fluxrig: not building {ext} (CompileError: " in log
    assert "the pure-Python path will be used" in log


def test_the_wheel_holds_no_extension_but_the_python_twins_rigs_and_license(wheel):
    path, _ = wheel
    names = zipfile.ZipFile(path).namelist()
    assert [n for n in names if n.endswith((".so", ".pyd", ".c"))] == []
    for name in ("engine/_ringpy.py", "engine/_native.py", "engine/rigs.py",
                 "engine/configs/demo.yaml", "engine/configs/iso8583-switch.yaml"):
        assert name in names
    for rig in ("demo.yaml", "iso8583-switch.yaml"):
        packed = zipfile.ZipFile(path).read(f"engine/configs/{rig}")
        assert packed == (ROOT / "configs" / rig).read_bytes()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert zipfile.ZipFile(path).read(f"{dist_info}/licenses/LICENSE") == \
        (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0" in \
        zipfile.ZipFile(path).read(f"{dist_info}/METADATA").decode()


def test_installed_from_the_wheel_fluxrig_runs_the_python_path_and_finds_its_rigs(
        wheel, tmp_path, shm_name):
    path, _ = wheel
    site = tmp_path / "site"
    zipfile.ZipFile(path).extractall(site)  # what pip does with a pure-library wheel
    env = {k: v for k, v in os.environ.items() if k != "FLUXRIG_PURE_PYTHON"}
    # -S: no site module, so not this venv's editable install of the checkout, whose finder
    # would resolve engine._ringcore (absent from the wheel) into the checkout; the
    # dependencies come from site-packages through PYTHONPATH, which runs no .pth file.
    env.update(PYTHONPATH=f"{site}:{sysconfig.get_paths()['purelib']}",
               XDG_STATE_HOME=str(tmp_path / "state"))
    out = subprocess.run([sys.executable, "-S", "-c", PROBE, shm_name("wheel"), repr(SAMPLE)],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
                         check=False)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert Path(seen["engine"]).parent == site / "engine"  # not this checkout
    assert seen["paths"] == {"ring": "python (missing)", "cbor": "python (missing)"}
    assert seen["ring_loops"] == "engine._ringpy"
    assert seen["ring_ok"] is True
    assert bytes.fromhex(seen["cbor"]) == cbor.dumps(SAMPLE)  # the C path's bytes, here
    state = tmp_path / "state" / "fluxrig"
    assert seen["switch_config"] == str(state / "configs" / "iso8583-switch.yaml")
    assert seen["data_dir"] == str(state / "var" / "switch")  # not inside site-packages
