"""``engine test RIG TESTS.yaml`` and ``engine check --tests``: the real CLI on real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

RIG = {
    "rack": {"id": "t"},
    "egress": {"streams": [{"name": "EV", "subjects": ["fx.>"]}]},
    "pipelines": [{
        "name": "pay",
        "source": {"gear": "generator", "settings": {"count": 1}},
        "stages": [
            {"name": "norm", "gear": "map", "settings": {
                "set": {"body.amount": "double(body.amount_minor) / 100.0",
                        "body.outcome": 'body.rc == "00" ? "approved" : "declined"',
                        "headers.token": "mask(body.pan)"},
                "drop": ["body.pan"],
                "route": [{"when": 'body.channel == "test"', "to": "discard"},
                          {"when": 'body.rc != "00"', "to": ["js", "review"]}],
                "default_route": "js"}},
            {"name": "tag", "gear": "map", "settings": {"set": {"headers.site": "'${SITE}'"}}},
        ],
        "sinks": [{"name": "js", "gear": "egress", "settings": {"subject": "fx.pay"}},
                  {"name": "review", "gear": "file", "settings": {"path": "review.jsonl"}}],
    }],
}

PASSING = {
    "env": {"SITE": "plant-7"},
    "tests": [
        {"name": "an approval goes to JetStream only",
         "input": [{"body": {"amount_minor": 1250, "rc": "00", "channel": "pos",
                             "pan": "4761739001010119"}}],
         "output": [{"body": {"amount": 12.5, "rc": "00", "channel": "pos",
                              "amount_minor": 1250, "outcome": "approved"},
                     "headers_has": {"site": "plant-7", "route": ["js"]},
                     "sinks": ["js"], "check": ['headers.token.endsWith("0119")',
                                                '!headers.token.contains("47617390")']}]},
        {"name": "a decline also goes to review, test traffic is dropped",
         "input": [{"body": {"amount_minor": 99, "rc": "05", "channel": "pos", "pan": "x"}},
                   {"body": {"amount_minor": 1, "rc": "00", "channel": "test", "pan": "x"}}],
         "output": [{"body_has": {"outcome": "declined"}, "sinks": ["js", "review"]}]},
        {"name": "a frame the expressions cannot map is a dead letter",
         "stages": ["norm"],
         "input": [{"body": {"rc": "00", "channel": "pos", "pan": "x"}}],
         "output": [], "dead_letters": 1},
    ],
}


def _files(tmp_path: Path, tests: dict, rig: dict = RIG) -> tuple[Path, Path]:
    rig_path, tests_path = tmp_path / "rig.yaml", tmp_path / "rig.tests.yaml"
    rig_path.write_text(yaml.safe_dump(rig))
    tests_path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return rig_path, tests_path


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_passing_tests_print_pass_lines_and_exit_0(tmp_path):
    rig, tests = _files(tmp_path, PASSING)
    result = _engine("test", str(rig), str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"PASS {tests}: tests[0] an approval goes to JetStream only",
                     f"PASS {tests}: tests[1] a decline also goes to review, test traffic "
                     "is dropped",
                     f"PASS {tests}: tests[2] a frame the expressions cannot map is a dead "
                     "letter",
                     "3 passed, 0 failed"]


def test_a_wrong_expectation_fails_with_the_first_difference_and_its_place(tmp_path):
    tests = yaml.safe_load(yaml.safe_dump(PASSING))
    tests["tests"][0]["output"][0]["body"]["amount"] = 12.25
    tests["tests"][1]["output"][0]["sinks"] = ["js"]
    tests["tests"][2]["dead_letters"] = 0
    rig, path = _files(tmp_path, tests)
    result = _engine("test", str(rig), str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == (f"FAIL {path}: tests[0] an approval goes to JetStream only: "
                        "output[0].body.amount: expected 12.25, got 12.5")
    assert lines[1] == (f"FAIL {path}: tests[1] a decline also goes to review, test traffic "
                        "is dropped: output[0].sinks: expected ['js'], got ['js', 'review']")
    assert lines[2].startswith(f"FAIL {path}: tests[2] a frame the expressions cannot map is "
                               "a dead letter: dead_letters: expected 0, got 1 (CelError: "
                               "set.body.amount: ")
    assert lines[3] == "0 passed, 3 failed"


def test_a_false_check_and_a_missing_field_are_named(tmp_path):
    tests = {"env": {"SITE": "x"}, "tests": [
        {"name": "check", "input": [{"body": {"amount_minor": 1, "rc": "00", "channel": "c",
                                              "pan": "p"}}],
         "output": [{"check": "body.amount > 1.0"}]},
        {"name": "missing", "input": [{"body": {"amount_minor": 1, "rc": "00",
                                                "channel": "c", "pan": "p"}}],
         "output": [{"body_has": {"nope.deeper": 1}}]},
        {"name": "count", "input": [{"body": {"amount_minor": 1, "rc": "00",
                                              "channel": "c", "pan": "p"}}],
         "output": []},
    ]}
    rig, path = _files(tmp_path, tests)
    out = _engine("test", str(rig), str(path)).stdout.splitlines()
    assert out[0].endswith("output[0].check 'body.amount > 1.0': is False")
    assert out[1].endswith("output[0].body.nope.deeper: expected 1, missing")
    assert out[2].endswith("output: expected 0 frames, got 1")


def test_errors_in_the_tests_file_name_file_and_key_path_and_exit_2(tmp_path):
    cases = [
        ({"tests": [{"name": "x", "pipeline": "nope", "input": []}]},
         "tests[0].pipeline: no pipeline 'nope' in the rig (pipelines: pay)"),
        ({"tests": [{"name": "x", "stages": ["norm", "zz"], "input": []}]},
         "tests[0].stages[1]: no stage 'zz' in pipeline 'pay' (stages: norm, tag)"),
        ({"tests": [{"name": "x", "input": [], "output": [{"check": "body.a +"}]}]},
         "tests[0].output[0].check: column 9: syntax error: mismatched input '<EOF>'"),
        ({"tests": [{"name": "x", "input": [], "outputs": []}]},
         "tests[0].outputs: unknown key"),
        ({"tests": [{"name": "x", "input": [{"body": 1, "ts": -1}]}]},
         "tests[0].input[0].ts: "),
    ]
    for tests, message in cases:
        tests.setdefault("env", {"SITE": "x"})
        rig, path = _files(tmp_path, tests)
        result = _engine("test", str(rig), str(path))
        assert result.returncode == 2, (message, result.stdout, result.stderr)
        assert result.stderr.startswith(f"error: {path}: {message}"), (message, result.stderr)


def test_a_rig_variable_the_tests_file_does_not_set_is_an_error_in_the_rig(tmp_path):
    rig, path = _files(tmp_path, {"tests": [{"name": "x", "input": []}]})
    result = _engine("test", str(rig), str(path))
    assert result.returncode == 2
    assert "SITE" in result.stderr and str(rig) in result.stderr


def test_engine_check_runs_the_tests_after_the_rig_checks_out(tmp_path):
    rig, path = _files(tmp_path, PASSING)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(rig), "--tests",
                             str(path)], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "SITE": "plant-7"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {rig}: rack=t")
    assert result.stdout.rstrip().endswith("3 passed, 0 failed")
    bad = yaml.safe_load(yaml.safe_dump(PASSING))
    bad["tests"][0]["output"][0]["sinks"] = ["review"]
    rig, path = _files(tmp_path, bad)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(rig), "--tests",
                             str(path)], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "SITE": "plant-7"})
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_the_bridge_rig_ships_with_passing_tests():
    root = Path(__file__).resolve().parent.parent
    result = _engine("test", str(root / "configs" / "http-bridge.yaml"),
                     str(root / "configs" / "http-bridge.tests.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
