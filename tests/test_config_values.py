"""How values are written in rig files: durations, sizes, ``${VAR}`` interpolation, duplicate
keys; ``engine check`` on several files with ``--json``; the settings reference that cannot
drift from the parser (engine.units, engine.yamlfile, engine.keytable, engine.reference)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError, load_config, parse_config
from engine.keytable import (
    CUSTOM,
    LIST,
    NAMED,
    REQUIRED,
    SECTION,
    SECTIONS,
    Computed,
    Key,
    Table,
)
from engine.reference import render, walk
from engine.rigcheck import check_file, masked_url
from tests.test_http_source import _self_signed
from engine.rigkeys import RIG
from engine.schema import At
from engine.units import format_duration, format_size, parse_duration, parse_size
from engine.yamlfile import parse_yaml
from gears.base import known_gears, lookup_gear

ROOT = Path(__file__).resolve().parent.parent
FILE = "rig.yaml"
DURATIONS = "seconds, or a number with a unit: 250ms, 1.5s, 1m, 2h (us, ms, s, m, h)"
SIZES = "bytes, or a number with a unit: 4MiB, 512Ki (powers of 1024) or 4MB, 4M (of 1000)"

RIG_YAML = """\
rack: {id: r1}
egress:
  streams: [{name: EV, subjects: ["fx.>"]}]
pipelines:
  - name: p
    source: {gear: generator}
    sinks: [{name: out, gear: egress, settings: {subject: fx.events}}]
"""


def _rig(tmp_path: Path, text: str, name: str = "rig.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = _rig(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return str(info.value).removeprefix(f"{path}: ")


# --- units -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("1m", 60.0), ("2h", 7200.0),
    ("100us", 0.0001), ("0s", 0.0), ("0.5m", 30.0),
])
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5 s", "5S", "1h30m", "fast", "-1s", "1e3s", "s",
                                  "1.s", "nan", "inf", "5sec", "1d", ""])
def test_anything_else_is_not_a_duration(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("4MiB", 4 << 20), ("4Mi", 4 << 20), ("4 MiB", 4 << 20), ("4mib", 4 << 20),
    ("4MB", 4_000_000), ("4M", 4_000_000), ("4mb", 4_000_000), ("512Ki", 512 << 10),
    ("8KB", 8000), ("1GiB", 1 << 30), ("1G", 10**9), ("1TiB", 1 << 40), ("1.5KiB", 1536),
    ("12B", 12),
])
def test_sizes_are_binary_with_i_and_decimal_without(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4 parsecs", "0.3KiB", "-4MiB", "4MiBs", "MiB", "4Mib B",
                                  "4  MiB", "1e6"])
def test_anything_else_is_not_a_size(text):
    assert parse_size(text) is None


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.05, "50ms"), (1.0, "1s"), (120.0, "2m"), (300, "5m"), (86400, "24h"),
    (1.5, "1500ms"), (0.0001, "100us"),
])
def test_durations_are_formatted_in_their_largest_exact_unit(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("size", "text"), [(4 << 20, "4MiB"), (8192, "8KiB"), (1000, "1000"),
                                            (1 << 30, "1GiB"), (0, "0")])
def test_sizes_are_formatted_in_binary_units(size, text):
    assert format_size(size) == text


# --- durations and sizes in a rig ------------------------------------------------------------


def _switch(**changes: Any) -> dict[str, Any]:
    return {"issuers": {"a": {"port": 9001}}, "groups": {"A": {"endpoints": ["a"]}},
            "routes": [{"bins": ["4"], "group": "A"}], **changes}


def _with(**sections: Any) -> dict[str, Any]:
    cfg = parse_yaml(RIG_YAML, FILE).data
    assert isinstance(cfg, dict)
    cfg.update(copy.deepcopy(sections))
    return cfg


def test_duration_strings_are_accepted_wherever_a_duration_is_read():
    from gears.iso8583.settings import parse_switch_settings

    cfg = parse_config(_with(telemetry={"interval": "250ms"}, egress={
        "streams": [{"name": "EV", "subjects": ["fx.>"], "max_age": "2h",
                     "duplicate_window": "1m"}], "ack_timeout": "1.5s"}), FILE)
    assert cfg.telemetry.interval == 0.25
    assert (cfg.egress.streams[0].max_age, cfg.egress.streams[0].duplicate_window) == (7200, 60)
    assert cfg.egress.ack_timeout == 1.5
    s = parse_switch_settings(_switch(
        timeout="750ms", listen={"idle_timeout": "5m", "frame_timeout": "2s"},
        issuers={"a": {"port": 9001, "echo_interval": "30s"}},
        saf={"retry_interval": "5s", "expire_after": "24h", "inter_delay": "50ms"}),
        At(FILE, "s"))
    assert (s.timeout, s.listen.idle_timeout, s.listen.frame_timeout) == (0.75, 300, 2)
    assert s.issuers[0].echo_interval == 30
    assert s.saf is not None
    assert (s.saf.retry_interval, s.saf.expire_after, s.saf.inter_delay) == (5, 86400, 0.05)


@pytest.mark.parametrize(("section", "message"), [
    ({"telemetry": {"interval": "fast"}},
     f"telemetry.interval: expected a duration: {DURATIONS}; got 'fast'"),
    ({"telemetry": {"interval": "5 s"}},
     f"telemetry.interval: expected a duration: {DURATIONS}; got '5 s'"),
    ({"telemetry": {"interval": "1h30m"}},
     f"telemetry.interval: expected a duration: {DURATIONS}; got '1h30m'"),
    ({"telemetry": {"interval": [1]}},
     f"telemetry.interval: expected a duration: {DURATIONS}; got list"),
    ({"telemetry": {"interval": True}},
     f"telemetry.interval: expected a duration: {DURATIONS}; got bool"),
    ({"telemetry": {"interval": "2h"}}, "telemetry.interval: must be <= 1h, got '2h'"),
    ({"telemetry": {"interval": "0ms"}}, "telemetry.interval: must be >= 50ms, got '0ms'"),
    ({"telemetry": {"interval": float("nan")}},
     "telemetry.interval: expected a finite number <= 3600, got nan"),
    ({"telemetry": {"interval": 1e308}},
     "telemetry.interval: expected a finite number <= 3600, got 1e+308"),
    ({"egress": {"ack_timeout": "11m"}}, "egress.ack_timeout: must be <= 10m, got '11m'"),
], ids=["word", "space", "compound", "list", "bool", "over", "zero", "nan", "absurd", "ack"])
def test_bad_durations_are_refused_with_the_accepted_forms(section, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_with(**section), FILE)
    assert str(info.value) == f"{FILE}: {message}"


def test_switch_max_frame_takes_a_size():
    from gears.iso8583.settings import parse_switch_settings

    s = parse_switch_settings(_switch(acquirer={"framing": {"max_frame": "4KiB"}}),
                              At(FILE, "s"))
    assert s.acquirer.framing.max_frame == 4096
    with pytest.raises(ConfigError) as info:
        parse_switch_settings(_switch(acquirer={"framing": {"max_frame": "128KB"}}),
                              At(FILE, "s"))
    assert str(info.value) == ("rig.yaml: s.acquirer.framing: invalid max_frame: "
                               "max_frame=128000, rule=0 < max_frame <= 65535")


@pytest.mark.parametrize(("value", "message"), [
    ("4MB", "must be a power of two >= 1024, got 4000000 (KB, MB, GB are powers of 1000: "
            "write KiB, MiB, GiB for powers of 1024)"),
    ("1KB", "must be a power of two >= 1024, got 1000 (KB, MB, GB are powers of 1000: write "
            "KiB, MiB, GiB for powers of 1024)"),
    ("512", "must be a power of two >= 1024, got 512"),
    ("4 parsecs", f"expected a size: {SIZES}; got '4 parsecs'"),
    ("0.3KiB", f"expected a size: {SIZES}; got '0.3KiB'"),
    (True, f"expected a size: {SIZES}; got bool"),
])
def test_ring_capacity_units(value, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_with(rings={"capacity": value}), FILE)
    assert str(info.value) == f"{FILE}: rings.capacity: {message}"


# --- ${VAR} interpolation --------------------------------------------------------------------


def test_variables_and_defaults_are_taken_from_the_environment(tmp_path):
    path = _rig(tmp_path, RIG_YAML.replace("{id: r1}", "{id: '${RACK}', labels: "
                                           "{site: '${SITE:-lab}', cost: 'a$${b}c', "
                                           "money: $seq}}"))
    cfg = load_config(path, {"RACK": "plant7"})
    assert cfg.rack_id == "plant7"
    assert cfg.labels == {"site": "lab", "cost": "a${b}c", "money": "$seq"}
    assert load_config(path, {"RACK": "plant7", "SITE": "north"}).labels["site"] == "north"
    assert load_config(path, {"RACK": "plant7", "SITE": ""}).labels["site"] == "lab"


def test_partial_values_interpolate_inside_text(tmp_path):
    text = RIG_YAML + "nats: {url: 'nats://${NATS_HOST}:4222'}\n"
    assert load_config(_rig(tmp_path, text), {"NATS_HOST": "10.0.0.9"}).nats.url == \
        "nats://10.0.0.9:4222"


@pytest.mark.parametrize(("written", "env", "port"), [
    ("port: ${PORT}", {"PORT": "4333"}, 4333),
    ('port: "${PORT}"', {"PORT": "4333"}, 4333),
    ("port: ${PORT:-4222}", {}, 4222),
    ("port: ${PORT:-}", {}, 0),  # empty: the key's default
    ("port: ' ${PORT} '", {"PORT": "4333"}, 4333),
], ids=["plain", "quoted", "default", "empty-is-default", "spaces"])
def test_a_typed_key_reads_its_value_from_the_variables_text(tmp_path, written, env, port):
    path = _rig(tmp_path, RIG_YAML + f"nats:\n  {written}\n")
    assert load_config(path, env).nats.port == port


def test_typed_values_in_flow_mappings_and_booleans(tmp_path):
    text = RIG_YAML + "rings: {capacity: '${CAP}', batch: '${BATCH}'}\n" \
        "telemetry: {interval: '${EVERY}'}\n"
    cfg = load_config(_rig(tmp_path, text), {"CAP": "1MiB", "BATCH": "64", "EVERY": "500ms"})
    assert (cfg.ring_capacity, cfg.ring_batch, cfg.telemetry.interval) == (1 << 20, 64, 0.5)
    sink = "sinks: [{name: out, gear: file, settings: {path: f, fsync: '${SYNC}'}}]"
    text = RIG_YAML.replace(
        "sinks: [{name: out, gear: egress, settings: {subject: fx.events}}]", sink)
    assert load_config(_rig(tmp_path, text), {"SYNC": "TRUE"}).pipelines[0].sinks[
        0].settings.fsync is True


def test_environment_text_stays_text_where_a_string_is_expected(tmp_path):
    # YAML would read 007 as 7 and `no` as false; a value from the environment is never
    # re-read as YAML
    path = _rig(tmp_path, RIG_YAML.replace("{id: r1}", "{id: r1, labels: {a: '${A}', b: '${B}'}}"))
    assert load_config(path, {"A": "007", "B": "no"}).labels == {"a": "007", "b": "no"}


def test_an_unset_variable_names_file_key_path_and_variable(tmp_path):
    text = RIG_YAML + "nats:\n  users: [{name: audit, password_env: X, streams: ['${STREAM}']}]\n"
    assert _refused(tmp_path, text) == (
        "nats.users[0].streams[0]: environment variable STREAM is not set (write "
        "${STREAM:-default} to give a default)")


@pytest.mark.parametrize("written", ["'${1PORT}'", "'${PORT'", "'${PORT:=1}'", "'${}'"])
def test_a_malformed_reference_is_refused(tmp_path, written):
    text = RIG_YAML.replace("{id: r1}", f"{{id: r1, data_dir: {written}}}")
    assert _refused(tmp_path, text) == (
        f"rack.data_dir: invalid reference at character 1 of {written}: expected ${{NAME}} "
        "or ${NAME:-default}, and $${ for a literal ${")


SECRET = "Hunter2-S3cr3t!"


@pytest.mark.parametrize(("text", "message"), [
    (RIG_YAML + "nats: {url: 'http://u:${PW}@h:4222'}\n",
     "nats.url: expected a nats:// or tls:// URL, got 'http://u:${PW}@h:4222' (from the "
     "environment, not shown)"),
    (RIG_YAML.replace("{id: r1}", "{id: '${PW}'}"),
     "rack.id: invalid value '${PW}' (from the environment, not shown) (expected lowercase "
     "letters, digits, '-' or '_', at most 32 characters)"),
    (RIG_YAML + "nats: {port: '${PW}'}\n",
     "nats.port: expected an integer, got '${PW}' (from the environment, not shown)"),
    (RIG_YAML + "telemetry: {interval: '${PW}'}\n",
     f"telemetry.interval: expected a duration: {DURATIONS}; got '${{PW}}' (from the "
     "environment, not shown)"),
    (RIG_YAML + "rings: {capacity: '${PW}'}\n",
     f"rings.capacity: expected a size: {SIZES}; got '${{PW}}' (from the environment, "
     "not shown)"),
    (RIG_YAML.replace('"fx.>"', "'${PW} x'"),
     "egress.streams[0].subjects[0]: invalid subject pattern '${PW} x' (from the "
     "environment, not shown)"),
], ids=["url", "pattern", "integer", "duration", "size", "list-item"])
def test_errors_never_show_a_value_from_the_environment(tmp_path, text, message):
    refused = _refused(tmp_path, text, {"PW": SECRET})
    assert refused == message
    assert SECRET not in refused


def test_keys_are_not_interpolated(tmp_path):
    # K is unset: were keys interpolated, this would say so; the key is seen as written
    text = RIG_YAML.replace("{id: r1}", "{id: r1, labels: {'${K}': v}}")
    assert _refused(tmp_path, text).startswith("rack.labels: invalid label name '${K}'")


# --- duplicate keys --------------------------------------------------------------------------


def test_a_duplicate_key_names_its_path_and_both_lines(tmp_path):
    text = RIG_YAML.replace("rack: {id: r1}\n", "rack:\n  id: r1\n  labels: {a: x}\n  id: r2\n")
    assert _refused(tmp_path, text) == "rack.id: duplicate key at lines 2 and 4"


def test_a_duplicate_top_level_section_is_refused(tmp_path):
    assert _refused(tmp_path, RIG_YAML + "rack: {id: r2}\n") == \
        "rack: duplicate key at lines 1 and 8"


def test_a_duplicate_key_deep_in_a_flow_mapping(tmp_path):
    text = RIG_YAML.replace("settings: {subject: fx.events}",
                            "settings: {subject: fx.events, subject: fx.other}")
    assert _refused(tmp_path, text) == \
        "pipelines[0].sinks[0].settings.subject: duplicate key at lines 7 and 7"


def test_merge_keys_may_be_overridden(tmp_path):
    text = RIG_YAML.replace("rack: {id: r1}\n",
                            "x-base: &base {id: r1, data_dir: a}\n"
                            "rack: {<<: *base, data_dir: b}\n")
    data = parse_yaml(text, FILE).data
    assert isinstance(data, dict)
    assert data["rack"] == {"id": "r1", "data_dir": "b"}


def test_a_bad_scalar_of_yaml_itself_is_a_located_error(tmp_path):
    assert _refused(tmp_path, RIG_YAML + "x: 2024-13-45\n") == (
        "line 8, column 4: invalid YAML: cannot read timestamp value: month must be in 1..12")


# --- engine check on several files -----------------------------------------------------------


def _engine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_check_takes_several_files_and_fails_if_any_does(tmp_path):
    good = ROOT / "configs" / "demo.yaml"
    bad = _rig(tmp_path, RIG_YAML.replace("{id: r1}", "{id: r1, id: r2}"), "bad.yaml")
    unset = _rig(tmp_path, RIG_YAML.replace("{id: r1}", "{id: '${RACK}'}"), "unset.yaml")
    result = _engine("check", str(good), str(bad), str(unset))
    assert result.returncode == 2
    assert result.stdout.startswith(f"ok: {good}: rack=demo, pipelines=1, stages=1\n")
    assert result.stderr == (
        f"error: {bad}: rack.id: duplicate key at lines 1 and 1\n"
        f"error: {unset}: rack.id: environment variable RACK is not set (write "
        "${RACK:-default} to give a default)\n")
    assert _engine("check", str(unset), env={"RACK": "r9"}).returncode == 0


def test_check_json_lists_every_file(tmp_path):
    good = ROOT / "configs" / "iso8583-switch.yaml"
    bad = _rig(tmp_path, RIG_YAML.replace("{id: r1}", "{id: r1, colour: red}"), "bad.yaml")
    result = _engine("check", "--json", str(good), str(bad))
    assert result.returncode == 2
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert [r["ok"] for r in report] == [True, False]
    assert report[0]["file"] == str(good)
    assert (report[0]["rack"], report[0]["pipelines"], report[0]["stages"]) == ("switch", 1, 0)
    assert report[0]["listeners"] == [
        {"gear": "payments.switch", "host": "127.0.0.1", "port": 8583},
        {"gear": "telemetry.prometheus", "host": "127.0.0.1", "port": 9464}]
    assert report[1] == {"file": str(bad), "ok": False, "error": {
        "path": "rack.colour", "message": "unknown key (allowed: data_dir, id, labels)",
        "text": f"{bad}: rack.colour: unknown key (allowed: data_dir, id, labels)"}}


def test_check_json_of_good_files_exits_0():
    files = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")
                   # the Mixer's settings and rig tests files are not rigs
                   if p.name != "mixer.yaml" and not p.name.endswith(".tests.yaml"))
    # the bridge's secrets: the rig refuses to start without them (no anonymous clients)
    result = _engine("check", "--json", *files,
                     env={"BRIDGE_TOKEN": "t", "REVIEW_TOKEN": "t"})
    assert result.returncode == 0, result.stdout
    assert [r["file"] for r in json.loads(result.stdout)] == files


def test_check_masks_the_password_of_a_nats_url(tmp_path):
    path = _rig(tmp_path, RIG_YAML + "nats: {url: 'nats://app:${PW}@10.0.0.1:4222'}\n")
    result = check_file(path, {"PW": SECRET})
    assert result.ok and result.nats == "nats://app:***@10.0.0.1:4222"
    assert SECRET not in json.dumps(result.as_json())
    assert masked_url("tls://h:4222") == "tls://h:4222"


@pytest.mark.parametrize(("url", "shown"), [
    # a token alone, a password with / # ? @ (base64 secrets), a garbage port, two servers
    ("nats://s3cr3tT0ken@nats.example:4222", "nats://***@nats.example:4222"),
    ("nats://app:S3cr/t#x?y@h:4222", "nats://app:***@h:4222"),
    ("nats://app:p@ss@h:4222", "nats://app:***@h:4222"),
    ("nats://app:pw@h:99999", "nats://app:***@h:99999"),
    ("nats://a:pw@h1:4222,nats://b:pw2@h2:4222", "nats://a:***@h1:4222,nats://b:***@h2:4222"),
    ("nats://[::1]:4222", "nats://[::1]:4222"),
])
def test_masked_url_never_shows_a_secret_and_never_raises(url, shown):
    """Found by a hostile review: tokens, passwords with '/', and bad ports got through
    (or raised ValueError in engine check)."""
    assert masked_url(url) == shown


# --- the reference cannot drift from the parser ----------------------------------------------


def test_the_reference_is_current():
    assert (ROOT / "docs" / "reference.md").read_text() == render(), \
        "regenerate: python -m engine.reference > docs/reference.md"


def _bad_value(key: Key) -> Any:
    """A value no parser of ``key`` can accept."""
    return {"zz": 1} if key.kind in (LIST, SECTIONS) else [[]]


def _concrete(base: Any, template: str) -> list[str | int]:
    """The steps to the place ``template`` (``a.b[].<name>.c``) names in ``base``: the first
    item of a list, the first name of a named mapping."""
    steps: list[str | int] = []
    node = base
    for part in template.split("."):
        if part == "<name>":
            part = next(iter(node))
        is_list = part.endswith("[]")
        name = part.removesuffix("[]")
        steps.append(name)
        node = node.get(name) if isinstance(node, dict) else None
        if is_list:
            steps.append(0)
            node = node[0] if node else None
    return steps


def _at_path(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def _put(base: Any, steps: list[str | int], value: Any) -> Any:
    cfg = copy.deepcopy(base)
    node = cfg
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = value
    return cfg


def _full_rig(tmp_path: Path) -> dict[str, Any]:
    """A rig that sets every rig-file key (so each has a place to be wrong)."""
    f = str(Path(__file__))
    return {
        "rack": {"id": "r1", "labels": {"site": "lab"}, "data_dir": str(tmp_path / "d")},
        "nats": {"url": "nats://127.0.0.1:4222", "host": "127.0.0.1", "port": 0,
                 "auth": {"user": "u", "password_env": "FX_TEST_PW", "token_env": "FX_TEST_PW",
                          "creds_file": f, "nkey_seed_file": f,
                          "tls": {"ca": f, "cert": f, "key": f}},
                 "users": [{"name": "audit", "password_env": "FX_TEST_PW", "streams": ["EV"]}]},
        "rings": {"capacity": "4MiB", "batch": 256},
        "cpu": {"placement": "auto"},
        "telemetry": {"interval": "1s", "prometheus": {"host": "127.0.0.1", "port": 0},
                      "subject": "fx.stats",
                      "traces": {"enabled": True, "sample": 0.5, "keep_errors": True,
                                 "keep_declines": False, "keep_timeouts": True,
                                 "slower_than": "250ms", "max_kept": 10, "tap": "64KiB"},
                      "logs": {"enabled": True, "level": "warning", "rate": 50, "burst": 10},
                      "otlp": {"endpoint": "http://127.0.0.1:4318",
                               "headers": {"authorization": "Bearer x"}, "timeout": "5s"}},
        "egress": {"streams": [{"name": "EV", "subjects": ["fx.>"], "storage": "file",
                                "max_age": 0, "duplicate_window": "2m", "hub": True,
                                "max_bytes": "1GiB", "last_values": "last",
                                "max_msgs_per_subject": 10}],
                   "batch": 1000, "max_inflight": 8, "ack_timeout": "5s"},
        "pipelines": [{"name": "p", "key": "headers.device",
                       "source": {"name": "src", "gear": "generator", "settings": {}},
                       "stages": [{"name": "m", "gear": "mapping", "settings": {}}],
                       "sinks": [{"name": "out", "gear": "egress",
                                  "settings": {"subject": "fx.events"}}]}],
    }


# the http_server's TLS files are loaded at check time: a real key pair
_TLS = [str(p) for p in _self_signed(Path(tempfile.mkdtemp(prefix="fx-tls-")))]

GEAR_SETTINGS: dict[str, dict[str, Any]] = {
    "generator": {"rate": 10, "count": 0, "batch": 8, "kind": "k", "keys": 4,
                  "headers": {"d": "dev-{i}"}, "body": {"seq": "$seq"}},
    "mapping": {"filter": {"body.a": 1}, "copy": {"headers.b": "body.b"},
                "set": {"headers.c": 1}, "drop": ["body.d"], "kind": "k"},
    "map": {"copy": {"body.a": "body.b"}, "set": {"body.c": "body.d + 1"},
            "drop": ["body.e"], "route": [{"when": "body.f > 1", "to": "x"}],
            "default_route": "y", "kind": "k"},
    "file": {"path": "f", "fsync": False},
    "http_server": {
        "host": "127.0.0.1", "port": 0, "paths": ["/", "/in"], "kind": "http",
        "headers": ["x-device"], "idempotency_header": "idempotency-key",
        "raw_types": ["application/octet-stream"],
        "auth": {"bearer": "t0ken", "basic": {"user": "u", "password": "p"}, "none": False},
        "tls": {"cert": _TLS[0], "key": _TLS[1]}, "ack": "ring", "durable_timeout": "5s",
        "queue_wait": "200ms", "max_body": "1MiB", "max_connections": 10,
        "max_per_address": 10, "concurrency": 10, "rate": 100, "burst": 10,
        "max_header_size": "16KiB", "max_headers": 100, "idle_timeout": "60s",
        "request_timeout": "10s"},
    "http_client": {"url": "https://127.0.0.1:8443/in", "method": "POST",
                    "headers": {"Authorization": "Bearer x"}, "format": "jsonl",
                    "batch": {"count": 100, "bytes": "1MiB", "time": "100ms"}, "timeout": "10s",
                    "retry": {"initial": "100ms", "max": "30s", "multiplier": 2,
                              "jitter": "full"},
                    "idempotency_header": "Idempotency-Key",
                    "tls": {"ca": __file__, "verify": True, "cert": __file__, "key": __file__}},
    "egress": {"subject": "fx.events"},
    "stdout": {},
    "iso8583": {
        "listen": {"host": "127.0.0.1", "port": 0, "max_connections": 10,
                   "max_per_address": 10, "idle_timeout": "5m", "frame_timeout": "10s"},
        "acquirer": {"framing": {"prefix": "2B", "header_len": 0, "max_frame": "8KiB"},
                     "spec": "default"},
        "on_malformed": "close",
        "issuers": {"a": {"host": "127.0.0.1", "port": 9001, "connections": 1,
                          "echo_interval": "30s",
                          "framing": {"prefix": "2B", "header_len": 0, "max_frame": 8192},
                          "spec": "default", "header": ""}},
        "groups": {"A": {"endpoints": ["a"], "strategy": "failover"}},
        "routes": [{"name": "r", "bins": ["4"], "mti": ["0100"], "processing_code": ["00"],
                    "amount_min": 0, "amount_max": 100, "currency": ["840"], "group": "A"}],
        "match_key": ["41", "11"], "timeout": "5s", "no_route_code": "92", "event_batch": 200,
        "coatcheck": {"enabled": True, "fields": ["2"], "key_file": "k", "bucket": "b",
                      "ttl_margin": 1, "storage": "file"},
        "saf": {"enabled": True, "stream": "SAF", "retry_interval": "5s", "retry_limit": 3,
                "expire_after": "24h", "inter_delay": "50ms"},
        "idle_spin_us": 0, "pan_luhn": False, "max_inflight": 64},
    "modbus": {
        "uns": {"enterprise": "E", "site": "S", "area": "A", "line": "L", "cell": "C"},
        "groups": {"g": {"interval": "1s"}},
        "devices": [{
            "name": "d", "host": "127.0.0.1", "port": 502, "unit": 1, "timeout": "1s",
            "max_outstanding": 1, "reconnect_min": "500ms", "reconnect_max": "30s",
            "pause_after_connect": "0s", "one_request_per_tag": False, "max_gap": 10,
            "max_registers": 125, "max_bits": 2000, "address_base": 0, "stale_after": 3,
            "uns": {"enterprise": "E", "site": "S", "area": "A", "line": "L", "cell": "C",
                    "device": "D"},
            "tags": [{"name": "t", "register": "holding", "address": 0, "type": "bool",
                      "order": "ABCD", "bit": 3, "scale": 1, "offset": 0, "unit": "",
                      "group": "g", "deadband": 0.5, "publish": "on_change",
                      "heartbeat": "60s", "isolate": False, "writable": True, "min": 0,
                      "max": 1, "uns": {"enterprise": "E", "site": "S", "area": "A",
                                        "line": "L", "cell": "C", "device": "D",
                                        "tag": "T"}}]}]},
}


def _documented() -> list[tuple[str, Table, str, Key]]:
    """(where, table, path, key) of every key in the reference."""
    # a linked rig's keys need an embedded NATS and the stats subject the hub accepts, which
    # the full rig (external nats.url) cannot give: they get a base of their own
    out = [("linked" if path.startswith("mixer") else "rig", RIG, path, key)
           for path, key in walk(RIG)]
    for name in known_gears():
        cls = lookup_gear(name)
        assert cls is not None
        out += [(name, cls.settings_table, path, key) for path, key in
                walk(cls.settings_table)]
    return out


DOCUMENTED = _documented()


def _linked_rig(tmp_path: Path) -> dict[str, Any]:
    """A small rig with a passport for rack r1 (the ``mixer`` keys)."""
    from engine.identity import Passport, new_seed, write_passport

    passport = tmp_path / "r1.passport"
    if not passport.exists():
        write_passport(passport, Passport(rack="r1", hub=("tls://127.0.0.1:7422",),
                                          nkey_seed=new_seed(), ca="-----BEGIN CERT...",
                                          issued="2026-11-28T00:00:00Z"))
    return {"rack": {"id": "r1", "data_dir": str(tmp_path / "d")},
            "mixer": {"passport": str(passport)},
            "pipelines": [{"name": "p", "source": {"gear": "generator", "settings": {}},
                           "sinks": [{"name": "out", "gear": "stdout"}]}]}


def _parse(where: str, cfg: Any, tmp_path: Path) -> None:
    if where in ("rig", "linked"):
        parse_config(cfg, FILE)
        return
    cls = lookup_gear(where)
    assert cls is not None
    cls.parse_settings(cfg, At(FILE, "s"))


def _base(where: str, tmp_path: Path) -> Any:
    if where == "linked":
        return _linked_rig(tmp_path)
    return _full_rig(tmp_path) if where == "rig" else copy.deepcopy(GEAR_SETTINGS[where])


def test_every_gear_has_a_base_here():
    assert set(GEAR_SETTINGS) == set(known_gears())


@pytest.mark.parametrize("where", ["rig", "linked", *known_gears()])
def test_the_bases_set_every_documented_key_and_parse(where, tmp_path, monkeypatch):
    monkeypatch.setenv("FX_TEST_PW", "pw")
    base = _base(where, tmp_path)
    _parse(where, base, tmp_path)
    for w, _table, path, _key in DOCUMENTED:
        if w == where:
            steps = _concrete(base, path)
            node = base
            for step in steps[:-1]:
                node = node[step]
            assert steps[-1] in node, f"the base of {where} does not set {path}"


@pytest.mark.parametrize(("where", "path"), [
    (w, p) for w, _t, p, k in DOCUMENTED
    if not (k.kind == CUSTOM and k.type_text.startswith("any"))])
def test_every_documented_key_is_read_and_checked_by_the_parser(where, path, tmp_path,
                                                                 monkeypatch):
    """A wrong value at each documented key is refused at that key's path: the parser reads
    it there (a documented key the parser ignored, or read elsewhere, would pass)."""
    monkeypatch.setenv("FX_TEST_PW", "pw")
    key = next(k for w, _t, p, k in DOCUMENTED if (w, p) == (where, path))
    base = _base(where, tmp_path)
    steps = _concrete(base, path)
    with pytest.raises(ConfigError) as info:
        _parse(where, _put(base, steps, _bad_value(key)), tmp_path)
    prefix = "" if where in ("rig", "linked") else "s."
    assert str(info.value).startswith(f"{FILE}: {prefix}{_at_path(steps)}: ")


@pytest.mark.parametrize(("where", "path"), [("rig", "")] + [(g, "") for g in known_gears()] + [
    (w, p) for w, _t, p, k in DOCUMENTED if k.kind in (SECTION, SECTIONS, NAMED)])
def test_an_undocumented_key_is_refused_in_every_mapping(where, path, tmp_path, monkeypatch):
    monkeypatch.setenv("FX_TEST_PW", "pw")
    base = _base(where, tmp_path)
    steps: list[str | int] = []
    if path:
        steps = _concrete(base, path)
        key = next(k for w, _t, p, k in DOCUMENTED if (w, p) == (where, path))
        if key.kind == SECTIONS:
            steps.append(0)
        elif key.kind == NAMED:
            node = base
            for step in steps:
                node = node[step]
            steps.append(next(iter(node)))
    cfg = _put(base, [*steps, "zz_undocumented"], 1)
    with pytest.raises(ConfigError) as info:
        _parse(where, cfg, tmp_path)
    prefix = "s" if where not in ("rig", "linked") else ""
    located = ".".join(filter(None, [prefix, _at_path([*steps, "zz_undocumented"])]))
    assert str(info.value).startswith(f"{FILE}: {located}: unknown key (")


@pytest.mark.parametrize(("where", "path"), [
    (w, p) for w, _t, p, k in DOCUMENTED
    if k.default is not None and k.default is not REQUIRED
    and not isinstance(k.default, Computed) and k.kind not in (SECTION, SECTIONS, NAMED)])
def test_every_documented_default_is_accepted_when_written(where, path, tmp_path, monkeypatch):
    monkeypatch.setenv("FX_TEST_PW", "pw")
    key = next(k for w, _t, p, k in DOCUMENTED if (w, p) == (where, path))
    base = _base(where, tmp_path)
    value = list(key.default) if isinstance(key.default, tuple) else key.default
    _parse(where, _put(base, _concrete(base, path), value), tmp_path)


def test_a_key_read_with_the_wrong_method_is_a_programming_error():
    from engine.keytable import DURATION, INTEGER

    table = Table("t", "", (Key("every", DURATION, "", 1.0), Key("n", INTEGER, "", 1)))
    reader = table.read({"every": "1s"}, At(FILE))
    assert reader.seconds("every") == 1.0
    with pytest.raises(TypeError, match="key 'every' of table 't' is a duration, read as "
                                        "integer"):
        reader.integer("every")
    with pytest.raises(KeyError, match="table 't' has no key 'other'"):
        reader.raw("other")
    with pytest.raises(ValueError, match="duplicate keys in table 'u'"):
        Table("u", "", (Key("n", INTEGER, ""), Key("n", INTEGER, "")))


def test_rack_label_names_must_be_prometheus_label_names():
    """Labels go on every metric series: a name Prometheus cannot take is refused at check
    time (it used to be rewritten with underscores on export, silently)."""
    from engine.config import ConfigError, parse_config

    for name in ("site-name", "__reserved", "1st", "ünï", ""):
        raw = {"rack": {"id": "r", "labels": {name: "x"}}, "pipelines": []}
        with pytest.raises(ConfigError, match=r"rack\.labels: invalid label name"):
            parse_config(raw, "x.yaml")


@pytest.mark.parametrize(("stream", "message"), [
    ({"max_age": "1ms"}, "max_age: must be 0 (kept) or at least 0.1 s (JetStream's minimum)"),
    ({"max_age": "1m"}, "duplicate_window: must not be longer than max_age (60 s), got 120 s"),
    ({"duplicate_window": "10ms"}, "duplicate_window: must be at least 0.1 s, got 0.01 s"),
])
def test_stream_limits_jetstream_would_refuse_are_refused_at_check_time(stream, message):
    """Found by a hostile review: these passed engine check, then egress retried the stream
    creation for ever and the rack never became ready."""
    raw = {"rack": {"id": "r"}, "egress": {"streams": [
        {"name": "EV", "subjects": ["fluxrig.r.>"], **stream}]},
        "pipelines": [{"name": "p", "source": {"gear": "generator", "settings": {}},
                       "sinks": [{"name": "js", "gear": "egress",
                                  "settings": {"subject": "fluxrig.r.ev"}}]}]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw, "x.yaml")


def test_hostile_rig_files_are_refused_quickly(tmp_path):
    """Found by a hostile review: /dev/zero read until MemoryError, a 'billion laughs' alias
    tree took 57 s and 3.8 GB, ${A:-${B}} silently gave the text '${B}'."""
    import time

    from engine.yamlfile import MAX_RIG_BYTES

    with pytest.raises(ConfigError, match="/dev/zero: not a regular file"):
        load_config("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_RIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than 4 MiB: not a rig file"):
        load_config(big)
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="too many values once aliases are expanded"):
        load_config(bomb)
    assert time.monotonic() - t0 < 5
    nested = tmp_path / "nested.yaml"
    nested.write_text("rack: {id: '${A:-${B}}'}\npipelines: []\n")
    with pytest.raises(ConfigError, match=r"nested reference in the default of \$\{A\}"):
        load_config(nested, {})


def test_check_refuses_two_listeners_of_one_rig_on_one_port(tmp_path):
    """Found by a hostile review: switch, metrics and NATS on one port passed engine check;
    the start then failed."""
    path = tmp_path / "clash.yaml"
    raw = {"rack": {"id": "r"}, "nats": {"port": 28590},
           "telemetry": {"prometheus": {"port": 28590}},
           "pipelines": [{"name": "p", "source": {"gear": "generator", "settings": {}},
                          "sinks": [{"name": "s", "gear": "stdout"}]}]}
    path.write_text(json.dumps(raw))
    result = check_file(path, {})
    assert not result.ok
    assert result.text == (f"{path}: nats: port 28590 is also used by telemetry.prometheus "
                           f"(127.0.0.1:28590)")
