"""The ``engine`` command line as a user meets it: help, version, errors without tracebacks,
the README's examples, exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.main
import yaml
from rackutil import switch_rig, uid
from typer.testing import CliRunner

from engine.cli import app
from engine.natsd import free_port

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _engine(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_version_flag_and_command_agree():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == version("fluxrig")
    assert runner.invoke(app, ["version"]).stdout.splitlines()[0].endswith(version("fluxrig"))


def test_every_option_of_every_command_has_help_and_no_rst_markup():
    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        assert cmd.help and "``" not in cmd.help, path
        for param in cmd.params:
            if param.param_type_name == "option" and not param.help:
                missing.append(f"{' '.join(path)} {param.opts[0]}")
    assert missing == []


def test_short_w_means_workers_only():
    start = typer.main.get_command(app).commands["start"]  # type: ignore[attr-defined]
    status = typer.main.get_command(app).commands["status"]  # type: ignore[attr-defined]
    assert any("-w" in p.opts and "--workers" in p.opts for p in start.params)
    assert not any("-w" in p.opts for p in status.params)


def test_iso_encode_bad_json_is_an_error_not_a_traceback():
    cases = {
        "null": "expected a JSON object of fields, got NoneType",
        "[" * 50_000 + "]" * 50_000: "invalid JSON: nested too deeply",
        '{"t": "0800", "11": {"a": 1}}': "field 11: expected a string value, got dict",
        "{": "invalid JSON: Expecting property name",
    }
    for text, message in cases.items():
        out = runner.invoke(app, ["iso", "encode", text])
        assert out.exit_code == 2, (text[:20], out.output)
        assert message in out.stderr
        assert out.exception is None or isinstance(out.exception, SystemExit)


def test_readme_iso_examples_round_trip():
    readme = (ROOT / "README.md").read_text()
    encoded = re.search(r"^engine iso encode '(\{.*\})'", readme, re.M)
    decoded = re.search(r"^engine iso decode ([0-9a-f]+)", readme, re.M)
    assert encoded and decoded
    out = runner.invoke(app, ["iso", "encode", encoded.group(1)])
    assert out.exit_code == 0 and out.stdout.strip() == decoded.group(1)
    out = runner.invoke(app, ["iso", "decode", decoded.group(1)])
    assert out.exit_code == 0 and '"70": "301"' in out.stdout


def test_iso_load_against_a_closed_port_says_why():
    port = free_port()  # nobody listens there
    out = _engine("iso", "load", "--port", str(port), "--connections", "2", "--count", "5")
    assert out.returncode == 1
    assert f"last error: 127.0.0.1:{port}: Connection refused" in out.stderr
    assert "FAILED (nothing sent)" in out.stdout
    assert "Traceback" not in out.stderr


def test_keys_rotate_refuses_a_rig_without_coat_check(tmp_path):
    path = switch_rig(tmp_path, uid("t-keys"), free_port(), free_port())
    out = _engine("keys", "rotate", "--config", str(path))
    assert out.returncode == 1
    assert "no gear has coat check enabled" in out.stderr
    assert not (tmp_path / "data" / "vault.keys").exists()
    cfg = yaml.safe_load(path.read_text())
    cfg["pipelines"][0]["source"]["settings"]["coatcheck"] = {"enabled": True}
    path.write_text(yaml.safe_dump(cfg))
    out = _engine("keys", "rotate", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "vault.keys").exists()


def test_readme_documents_every_exit_code():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]
    for code in ("0", "1", "2", "3"):
        assert re.search(rf"^\| `{code}` \|", section, re.M), code


def test_a_bad_pure_python_switch_is_refused_by_every_command(tmp_path):
    import os

    env = dict(os.environ, FLUXRIG_PURE_PYTHON="maybe")
    for args in (["check", str(ROOT / "configs" / "demo.yaml")], ["iso", "encode", "{}"]):
        out = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode == 2, args
        assert "invalid environment variable: FLUXRIG_PURE_PYTHON='maybe'" in out.stderr
        assert "Traceback" not in out.stderr


def test_check_lists_the_metrics_endpoint_among_the_listeners():
    out = runner.invoke(app, ["check", str(ROOT / "configs" / "iso8583-switch.yaml")])
    assert out.exit_code == 0
    assert "  listens: telemetry.prometheus on 127.0.0.1:9464" in out.stdout


def test_start_refuses_unusable_options_before_anything_runs(tmp_path):
    """Found by a hostile review: NaN drain timeouts crashed the drain, a bad --ready-fd
    crash-looped every process, an unusable log file lost every line behind tracebacks."""
    from rackutil import rig

    config = rig(tmp_path, uid("t-opts"), count=1, rate=0)
    (tmp_path / "adir").mkdir()
    cases = [
        (["--drain-timeout", "nan"], "--drain-timeout: expected a finite number of seconds"),
        (["--drain-timeout", "-5"], "--drain-timeout: expected a finite number of seconds"),
        (["--ready-fd", "99"], "--ready-fd: 99 is not an open file descriptor"),
        (["--ready-fd", "2"], "--ready-fd: 2 must be a pipe, socket or file"),
        (["--log-file", str(tmp_path / "adir")], "not a regular file"),
        (["--log-file", "/dev/full"], "not a regular file"),
    ]
    for args, message in cases:
        out = _engine("start", "--config", str(config), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "data" / "state.json").exists()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["iso", "load", "--port", "70000"], 2, "65535"),
    (["iso", "load", "--header", "zz"], 2, "--header: expected hex, got 'zz'"),
    (["iso", "issuer", "--port", "70000"], 2, "65535"),
    (["iso", "issuer", "--host", "192.0.2.1"], 1, "cannot listen: host=192.0.2.1, port=9001"),
    (["iso", "decode", "zz"], 2, "expected the message as hex digits, got 'zz'"),
    (["status", "--interval", "-1", "--data-dir", "/nonexistent"], 2, "0.05"),
    (["iso", "load", "--host", "no-such-host.invalid", "--connections", "1", "--count", "1"],
     1, "no-such-host.invalid:8583: Name or service not known"),
])
def test_bad_arguments_get_a_reason_and_no_traceback(args, code, message):
    """Found by a hostile review: each of these printed a Python traceback."""
    out = _engine(*args)
    assert out.returncode == code, (args, out.stderr)
    assert message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
