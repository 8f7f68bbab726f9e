"""engine.config: rig files in, a typed RigConfig or one located error message out."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError, load_config, parse_config, subject_matches

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
FILE = "rig.yaml"
NCPU = os.cpu_count() or 1
USABLE = sorted(os.sched_getaffinity(0))

# The smallest rig that validates; every bad config below is this with one thing changed.
MINIMAL: dict[str, Any] = {
    "rack": {"id": "r1"},
    "egress": {"streams": [{"name": "EV", "subjects": ["fx.>"]}]},
    "pipelines": [
        {
            "name": "p",
            "source": {"gear": "generator"},
            "stages": [{"name": "m", "gear": "mapping"}],
            "sinks": [{"name": "out", "gear": "egress", "settings": {"subject": "fx.events"}}],
        }
    ],
}
PIPELINE = MINIMAL["pipelines"][0]
SINK = PIPELINE["sinks"][0]

DELETE = object()


def _changed(changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of MINIMAL with ``{"a.0.b": value}`` applied (DELETE removes the key)."""
    cfg = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = cfg
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        key: Any = int(last) if isinstance(node, list) else last
        if isinstance(node, list) and key == len(node):
            node.append(copy.deepcopy(value))
        elif value is DELETE:
            del node[key]
        else:
            node[key] = copy.deepcopy(value)
    return cfg


# --- valid rigs ------------------------------------------------------------------------------


def test_demo_config_loads_with_the_values_of_the_yaml():
    cfg = load_config(DEMO)

    assert cfg.file == str(DEMO)
    assert cfg.rack_id == "demo"
    assert cfg.labels == {"site": "lab", "owner": "quickstart"}
    assert cfg.data_dir == ROOT / "var" / "demo"  # ../var/demo from configs/
    assert cfg.nats.embedded and cfg.nats.url is None
    assert (cfg.nats.host, cfg.nats.port) == ("127.0.0.1", 0)
    assert cfg.ring_capacity == 4 * 1024 * 1024
    assert cfg.ring_batch == 256
    assert cfg.placement == "auto"
    assert cfg.telemetry.interval == 1.0
    assert (cfg.telemetry.prometheus_host, cfg.telemetry.prometheus_port) == ("127.0.0.1", 9465)
    assert cfg.telemetry.subject == "fluxrig.stats.demo"

    assert [s.name for s in cfg.egress.streams] == ["DEMO"]
    stream = cfg.egress.streams[0]
    assert stream.subjects == ("fluxrig.demo.>",)
    assert stream.storage == "file"
    assert (cfg.egress.batch, cfg.egress.max_inflight) == (1000, 8)

    assert [p.name for p in cfg.pipelines] == ["readings"]
    p = cfg.pipelines[0]
    assert p.key == "headers.device"
    assert (p.source.name, p.source.gear, p.source.role) == ("source", "generator", "source")
    assert p.source.settings.rate == 20000.0
    assert p.source.settings.batch == 100
    assert p.source.settings.keys == 32
    assert [(s.name, s.gear, s.role) for s in p.stages] == [("enrich", "mapping", "stage")]
    assert p.stages[0].settings.kind == "demo.enriched"
    assert p.stages[0].at == "pipelines[0].stages[0]"
    assert [(s.name, s.gear, s.role) for s in p.sinks] == [("jetstream", "egress", "sink")]
    assert p.sinks[0].settings.subject == "fluxrig.demo.readings"


def test_minimal_config_gets_the_documented_defaults():
    cfg = parse_config(copy.deepcopy(MINIMAL), FILE)

    assert cfg.file == FILE
    assert cfg.labels == {}
    assert cfg.data_dir == Path.cwd() / "var" / "r1"
    assert cfg.nats.embedded
    assert (cfg.ring_capacity, cfg.ring_batch) == (4 << 20, 256)
    assert cfg.placement == "auto"
    assert cfg.telemetry.interval == 1.0
    assert cfg.telemetry.prometheus_port is None
    assert cfg.telemetry.subject == "fluxrig.stats.r1"
    assert cfg.egress.streams[0].storage == "file"
    assert cfg.egress.streams[0].duplicate_window == 120.0
    assert cfg.pipelines[0].key is None


@pytest.mark.parametrize(
    ("value", "size"),
    [(4096, 4096), ("4MiB", 4 << 20), ("4Mi", 4 << 20), ("4 mib", 4 << 20),
     ("512Ki", 512 << 10), ("1GiB", 1 << 30), ("2048", 2048), ("0.5MiB", 1 << 19)],
)
def test_ring_capacity_sizes(value, size):
    cfg = parse_config(_changed({"rings.capacity": value}), FILE)
    assert cfg.ring_capacity == size


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"nats.url": "nats://10.0.0.1:4222"}, lambda c: not c.nats.embedded),
        ({"cpu.placement": "none"}, lambda c: c.placement == "none"),
        ({"cpu.placement": {"p.m.0": 0}}, lambda c: c.placement == {"p.m.0": 0}),
        ({"pipelines.0.key": "body.device"}, lambda c: c.pipelines[0].key == "body.device"),
        ({"pipelines.0.stages": DELETE}, lambda c: c.pipelines[0].stages == ()),
        ({"pipelines.0.sinks.0": {"gear": "stdout"}},
         lambda c: c.pipelines[0].sinks[0].name == "sink0"),
        ({"egress.streams.0.storage": "memory"}, lambda c: c.egress.streams[0].storage == "memory"),
    ],
    ids=["nats-url", "placement-none", "placement-map", "key-body", "no-stages",
         "sink-default-name", "memory-stream"],
)
def test_valid_variations(changes, check):
    assert check(parse_config(_changed(changes), FILE))


# --- invalid rigs: one change, one exact message ---------------------------------------------

RACK_RULE = "lowercase letters, digits, '-' or '_', at most 32 characters"

def _shm() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_blocks * st.f_frsize


BAD = [
    # top level and rack
    ("rack-not-map", {"rack": [1]}, "rack: expected a mapping, got list"),
    ("rack-id-missing", {"rack.id": DELETE}, "rack.id: required key missing"),
    ("rack-id-chars", {"rack.id": "Demo!"},
     f"rack.id: invalid value 'Demo!' (expected {RACK_RULE})"),
    ("rack-id-too-long", {"rack.id": "x" * 33},
     f"rack.id: invalid value '{'x' * 33}' (expected {RACK_RULE})"),
    ("rack-id-not-str", {"rack.id": 7}, "rack.id: expected a string, got int"),
    ("rack-unknown-key", {"rack.name": "r"},
     "rack.name: unknown key (allowed: data_dir, id, labels)"),
    ("label-not-str", {"rack.labels": {"site": 7}}, "rack.labels.site: expected a string, got int"),
    ("top-unknown-key", {"racks": {}},
     "racks: unknown key (allowed: cpu, egress, mixer, nats, pipelines, rack, rings, telemetry)"),
    # nats
    ("nats-url-scheme", {"nats.url": "http://10.0.0.1:4222"},
     "nats.url: expected a nats:// or tls:// URL, got 'http://10.0.0.1:4222'"),
    ("nats-port-range", {"nats.port": 70000}, "nats.port: must be <= 65535, got 70000"),
    # rings
    ("capacity-not-pow2", {"rings.capacity": 3000},
     "rings.capacity: must be a power of two >= 1024, got 3000"),
    ("capacity-too-small", {"rings.capacity": 512},
     "rings.capacity: must be a power of two >= 1024, got 512"),
    ("capacity-bad-size", {"rings.capacity": "4 parsecs"},
     "rings.capacity: expected a size: bytes, or a number with a unit: 4MiB, 512Ki (powers of "
     "1024) or 4MB, 4M (of 1000); got '4 parsecs'"),
    ("capacity-si-megabytes", {"rings.capacity": "4MB"},
     "rings.capacity: must be a power of two >= 1024, got 4000000 (KB, MB, GB are powers of "
     "1000: write KiB, MiB, GiB for powers of 1024)"),
    ("capacity-si-m", {"rings.capacity": "4M"},
     "rings.capacity: must be a power of two >= 1024, got 4000000 (KB, MB, GB are powers of "
     "1000: write KiB, MiB, GiB for powers of 1024)"),
    ("capacity-float", {"rings.capacity": 4096.0},
     "rings.capacity: expected a size: bytes, or a number with a unit: 4MiB, 512Ki (powers of "
     "1024) or 4MB, 4M (of 1000); got float"),
    ("capacity-absurd", {"rings.capacity": 2**80},
     f"rings.capacity: must be <= {min(1 << 30, _shm())} (1 GiB, and what /dev/shm holds: "
     f"{_shm()}), got {2**80}"),
    ("interval-nan", {"telemetry.interval": float("nan")},
     "telemetry.interval: expected a finite number <= 3600, got nan"),
    ("interval-inf", {"telemetry.interval": float("inf")},
     "telemetry.interval: expected a finite number <= 3600, got inf"),
    ("ack-timeout-absurd", {"egress.ack_timeout": 1e308},
     "egress.ack_timeout: expected a finite number <= 600, got 1e+308"),
    ("batch-str", {"rings.batch": "256"}, "rings.batch: expected an integer, got str"),
    ("batch-bool", {"rings.batch": True}, "rings.batch: expected an integer, got bool"),
    ("batch-zero", {"rings.batch": 0}, "rings.batch: must be >= 1, got 0"),
    # cpu
    ("cpu-too-high", {"cpu.placement": {"p.m.0": NCPU}},
     f"cpu.placement.p.m.0: expected one of this machine's usable CPUs {USABLE}, got {NCPU}"),
    ("cpu-negative", {"cpu.placement": {"p.m.0": -1}},
     f"cpu.placement.p.m.0: expected one of this machine's usable CPUs {USABLE}, got -1"),
    ("placement-word", {"cpu.placement": "all"},
     "cpu.placement: expected 'auto', 'none' or a mapping process -> cpu, got 'all'"),
    # telemetry
    ("interval-negative", {"telemetry.interval": -1}, "telemetry.interval: must be >= 0.05, got -1"),
    ("interval-zero", {"telemetry.interval": 0}, "telemetry.interval: must be >= 0.05, got 0"),
    ("interval-str", {"telemetry.interval": "fast"},
     "telemetry.interval: expected a duration: seconds, or a number with a unit: 250ms, 1.5s, "
     "1m, 2h (us, ms, s, m, h); got 'fast'"),
    ("telemetry-subject-wildcard", {"telemetry.subject": "fluxrig.stats.*"},
     "telemetry.subject: invalid value 'fluxrig.stats.*' "
     "(expected a NATS subject without wildcards)"),
    ("prometheus-port-str", {"telemetry.prometheus": {"port": "x"}},
     "telemetry.prometheus.port: expected an integer, got str"),
    # egress streams
    ("stream-storage", {"egress.streams.0.storage": "disk"},
     "egress.streams[0].storage: expected 'file' or 'memory', got 'disk'"),
    ("subject-pattern-gt-middle", {"egress.streams.0.subjects": ["fx.>.x"]},
     "egress.streams[0].subjects[0]: invalid subject pattern 'fx.>.x'"),
    ("subject-pattern-space", {"egress.streams.0.subjects": ["fx. events"]},
     "egress.streams[0].subjects[0]: invalid subject pattern 'fx. events'"),
    ("stream-subjects-missing", {"egress.streams.0.subjects": DELETE},
     "egress.streams[0].subjects: required key missing"),
    ("stream-name-chars", {"egress.streams.0.name": "a.b"},
     "egress.streams[0].name: invalid value 'a.b' (expected letters, digits, '-' or '_')"),
    ("stream-name-duplicate", {"egress.streams.1": {"name": "EV", "subjects": ["other.>"]}},
     "egress.streams: duplicate stream names: ['EV', 'EV']"),
    ("max-inflight-zero", {"egress.max_inflight": 0}, "egress.max_inflight: must be >= 1, got 0"),
    # pipelines: shape
    ("pipelines-missing", {"pipelines": DELETE}, "pipelines: required key missing"),
    ("pipelines-empty", {"pipelines": []}, "pipelines: at least one pipeline is required"),
    ("pipelines-not-list", {"pipelines": "p"}, "pipelines: expected a list, got str"),
    ("pipeline-name-chars", {"pipelines.0.name": "P 1"},
     f"pipelines[0].name: invalid value 'P 1' (expected {RACK_RULE})"),
    ("pipeline-key-path", {"pipelines.0.key": "device"},
     "pipelines[0].key: expected a frame path like 'headers.device', got 'device'"),
    ("pipeline-unknown-key", {"pipelines.0.stage": []},
     "pipelines[0].stage: unknown key (allowed: key, name, sinks, source, stages)"),
    ("source-missing", {"pipelines.0.source": DELETE}, "pipelines[0].source: required key missing"),
    ("sinks-missing", {"pipelines.0.sinks": DELETE}, "pipelines[0].sinks: required key missing"),
    ("sinks-empty", {"pipelines.0.sinks": []}, "pipelines[0].sinks: at least one sink is required"),
    ("two-sinks-without-stage", {"pipelines.0.stages": DELETE,
                                 "pipelines.0.sinks": [SINK, {**SINK, "name": "out2"}]},
     "pipelines[0].sinks: 2 sinks need a stage to fan out from (the last stage writes one ring "
     "per sink); add one, e.g. a 'map' stage"),
    ("sink-named-discard", {"pipelines.0.sinks": [SINK, {**SINK, "name": "discard"}]},
     "pipelines[0].sinks: the sink name 'discard' is reserved (a route that goes nowhere)"),
    ("route-to-unknown-sink", {"pipelines.0.stages.0": {
        "name": "m", "gear": "map", "settings": {"route": [{"when": "true", "to": "nowhere"}]}}},
     "pipelines[0].stages[0].settings: route 'nowhere' names no sink of the pipeline "
     "(sinks: out)"),
    ("map-syntax-error", {"pipelines.0.stages.0": {
        "name": "m", "gear": "map", "settings": {"set": {"body.x": "body.a +"}}}},
     "pipelines[0].stages[0].settings.set.body.x: column 9: syntax error: mismatched input "
     "'<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, "
     "NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}\n  | body.a +\n  | ........^"),
    ("gear-name-duplicate", {"pipelines.0.stages.0.name": "out"},
     "pipelines[0]: duplicate gear name 'out'"),
    ("gear-name-duplicates-default", {"pipelines.0.stages.0.name": "source"},
     "pipelines[0]: duplicate gear name 'source'"),
    ("pipeline-name-duplicate", {"pipelines": [PIPELINE, PIPELINE]},
     "pipelines: duplicate pipeline names: ['p', 'p']"),
    # pipelines: gears
    ("gear-unknown", {"pipelines.0.stages.0.gear": "iso8538"},
     "pipelines[0].stages[0].gear: unknown gear 'iso8538' "
     "(known: egress, file, generator, http_client, http_server, iso8583, map, mapping, modbus, "
     "stdout)"),
    ("sink-as-stage", {"pipelines.0.stages.0.gear": "file"},
     "pipelines[0].stages[0].gear: gear 'file' is a sink, expected a stage"),
    ("stage-as-source", {"pipelines.0.source.gear": "mapping"},
     "pipelines[0].source.gear: gear 'mapping' is a stage, expected a source"),
    ("source-as-sink", {"pipelines.0.sinks.0.gear": "generator"},
     "pipelines[0].sinks[0].gear: gear 'generator' is a source, expected a sink"),
    ("gear-missing", {"pipelines.0.stages.0.gear": DELETE},
     "pipelines[0].stages[0].gear: required key missing"),
    ("gear-name-too-long", {"pipelines.0.stages.0.name": "x" * 33},
     f"pipelines[0].stages[0].name: invalid value '{'x' * 33}' (expected {RACK_RULE})"),
    ("mapping-unknown-key", {"pipelines.0.stages.0.settings": {"colour": "red"}},
     "pipelines[0].stages[0].settings.colour: unknown key "
     "(allowed: copy, drop, filter, kind, set)"),
    # gear settings
    ("generator-template-field",
     {"pipelines.0.source.settings": {"body": {"device": "dev-{nope}"}}},
     "pipelines[0].source.settings.body: bad template: KeyError('nope') "
     "(fields available: seq, i)"),
    ("generator-rate-negative", {"pipelines.0.source.settings": {"rate": -5}},
     "pipelines[0].source.settings.rate: must be >= 0.0, got -5"),
    ("generator-batch-zero", {"pipelines.0.source.settings": {"batch": 0}},
     "pipelines[0].source.settings.batch: must be >= 1, got 0"),
    ("mapping-filter-path", {"pipelines.0.stages.0.settings": {"filter": {"status": "ok"}}},
     "pipelines[0].stages[0].settings.filter: expected a path like 'headers.x' or 'body.a.b', "
     "got 'status'"),
    ("mapping-copy-path", {"pipelines.0.stages.0.settings": {"copy": {"headers.seq": "seq"}}},
     "pipelines[0].stages[0].settings.copy.headers.seq: expected a path like 'headers.x' or "
     "'body.a.b', got 'seq'"),
    ("mapping-drop-path", {"pipelines.0.stages.0.settings": {"drop": ["body.debug", "body."]}},
     "pipelines[0].stages[0].settings.drop[1]: expected a path like 'headers.x' or 'body.a.b', "
     "got 'body.'"),
    ("mapping-kind-not-str", {"pipelines.0.stages.0.settings": {"kind": 5}},
     "pipelines[0].stages[0].settings.kind: expected a string, got int"),
    ("file-path-missing", {"pipelines.0.sinks.0": {"gear": "file"}},
     "pipelines[0].sinks[0].settings.path: required key missing"),
    ("file-fsync-str",
     {"pipelines.0.sinks.0": {"gear": "file", "settings": {"path": "f", "fsync": "yes"}}},
     "pipelines[0].sinks[0].settings.fsync: expected true or false, got str"),
    ("stdout-takes-no-settings", {"pipelines.0.sinks.0": {"gear": "stdout", "settings": {"x": 1}}},
     "pipelines[0].sinks[0].settings.x: unknown key (none allowed)"),
    # egress subjects against streams
    ("egress-subject-wildcard", {"pipelines.0.sinks.0.settings.subject": "fx.*"},
     "pipelines[0].sinks[0].settings.subject: invalid value 'fx.*' "
     "(expected a NATS subject without wildcards, or one ending in .>)"),
    ("egress-subject-uncaptured", {"pipelines.0.sinks.0.settings.subject": "other.events"},
     "pipelines[0].sinks[0].settings.subject: subject 'other.events' must be captured by exactly "
     "one egress stream, captured by none"),
    ("egress-subject-two-streams", {"egress.streams.1": {"name": "ALL", "subjects": [">"]}},
     "pipelines[0].sinks[0].settings.subject: subject 'fx.events' must be captured by exactly "
     "one egress stream, captured by ['EV', 'ALL']"),
    ("egress-no-streams", {"egress": DELETE},
     "pipelines[0].sinks[0].settings.subject: subject 'fx.events' must be captured by exactly "
     "one egress stream, captured by none"),
]


@pytest.mark.parametrize(("changes", "message"), [row[1:] for row in BAD],
                         ids=[row[0] for row in BAD])
def test_bad_config_is_refused_with_a_located_message(changes, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_changed(changes), FILE)
    assert str(info.value) == f"{FILE}: {message}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "(top level): empty rig file (expected at least rack and pipelines)"),
        ([MINIMAL], "(top level): expected a mapping, got list"),
        ({1: "x"}, "(top level): keys must be strings, got 1"),
    ],
    ids=["empty", "list", "int-key"],
)
def test_bad_top_level(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw, FILE)
    assert str(info.value) == f"{FILE}: {message}"


@pytest.mark.parametrize("template", ["dev-{seq.nope}", "dev-{seq[0]}"])
def test_generator_template_errors_of_any_kind_are_config_errors(template):
    # str.format raises AttributeError / TypeError for these, not only KeyError/ValueError.
    with pytest.raises(ConfigError) as info:
        parse_config(_changed({"pipelines.0.source.settings": {"body": {"d": template}}}), FILE)
    assert str(info.value).startswith(f"{FILE}: pipelines[0].source.settings.body: bad template")


# --- load_config: the file itself ------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rack:\n  id: demo\n  labels: {site: lab\npipelines: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: line 4, column 10: invalid YAML: expected ',' or '}}', but got ':'"
    )


def test_yaml_tab_indent_error_names_line_and_column(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("rack:\n\tid: demo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 2, column 1: invalid YAML: ")


def test_missing_file_cannot_be_read(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"rack: {id: caf\xe9}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_content_errors_from_a_file_carry_its_name(tmp_path):
    path = tmp_path / "rig.yaml"
    path.write_text("rack: {id: Bad}\npipelines: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: rack.id: invalid value 'Bad' (expected {RACK_RULE})"


# --- subject matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a", False),
        ("a", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.d", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.>", "a.b", True),
        ("*.>", "a", False),
    ],
)
def test_subject_matches_table(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches


# --- the check command -----------------------------------------------------------------------


def _engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_cli_check_accepts_the_demo_config():
    result = _engine("check", str(DEMO))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"ok: {DEMO}: rack=demo, pipelines=1, stages=1\n"
                             f"  data_dir: {ROOT / 'var' / 'demo'}\n"
                             f"  nats: embedded, nats://127.0.0.1:<free port chosen at start>\n"
                             f"  listens: telemetry.prometheus on 127.0.0.1:9465\n")


def test_cli_check_names_the_listeners():
    result = _engine("check", str(ROOT / "configs" / "iso8583-switch.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("  listens: payments.switch on 127.0.0.1:8583\n"
                                  "  listens: telemetry.prometheus on 127.0.0.1:9464\n")


def test_cli_check_refuses_a_bad_config_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "rack: {id: demo}\n"
        "pipelines:\n"
        "  - name: p\n"
        "    source: {gear: generator}\n"
        "    stages: [{gear: iso8538}]\n"
        "    sinks: [{gear: stdout}]\n"
    )
    result = _engine("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {path}: pipelines[0].stages[0].gear: unknown gear 'iso8538' "
        "(known: egress, file, generator, http_client, http_server, iso8583, map, mapping, "
        "modbus, stdout)\n"
    )


SWITCH_SOURCE = {"gear": "iso8583", "settings": {
    "issuers": {"a": {"port": 9001}}, "groups": {"A": {"endpoints": ["a"]}},
    "routes": [{"bins": ["4"], "group": "A"}], "saf": {"enabled": True}}}


def test_a_switch_needs_rings_that_hold_its_records():
    cfg = _changed({"pipelines.0.source": SWITCH_SOURCE, "pipelines.0.stages": [],
                    "rings": {"capacity": "4KiB"}})
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, FILE)
    assert str(exc.value) == ("rig.yaml: rings.capacity: must be >= 16384 for gear 'iso8583' "
                              "at pipelines[0].source, got 4096")


def test_a_gear_owned_stream_may_not_clash_with_a_configured_one():
    cfg = _changed({"pipelines.0.source": SWITCH_SOURCE, "pipelines.0.stages": [],
                    "egress.streams.1": {"name": "SAF", "subjects": ["other.>"]}})
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, FILE)
    assert str(exc.value) == (
        "rig.yaml: pipelines[0].source: egress stream 'SAF' clashes with the stream 'SAF' "
        "(fluxrig.r1.saf.q) this gear keeps for its 'saf' outlet")
    cfg = _changed({"pipelines.0.source": SWITCH_SOURCE, "pipelines.0.stages": [],
                    "egress.streams.1": {"name": "ALL", "subjects": ["fluxrig.>"]}})
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, FILE)
    assert "egress stream 'ALL' clashes" in str(exc.value)


def test_data_dir_is_relative_to_the_rig_file_not_the_working_directory(tmp_path):
    rig = tmp_path / "rigs" / "r.yaml"
    rig.parent.mkdir()
    rig.write_text(DEMO.read_text().replace("../var/demo", "state/here"))
    elsewhere = subprocess.run(
        [sys.executable, "-c", f"from engine.config import load_config; "
                               f"print(load_config({str(rig)!r}).data_dir)"],
        cwd="/", capture_output=True, text=True, check=True)
    assert elsewhere.stdout.strip() == str(tmp_path / "rigs" / "state" / "here")
    assert load_config(rig).data_dir == tmp_path / "rigs" / "state" / "here"
