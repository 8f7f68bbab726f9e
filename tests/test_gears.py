"""gears: mapping, generator, file sink, derive_id and the registry, called directly (no rack)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from typing import Any

import pytest

from engine.schema import At
from engine.frame import Frame
from gears.base import Gear, GearContext, derive_id, known_gears, lookup_gear
from gears.generator import Generator
from gears.io.file import FileSink
from gears.io.stdout import StdoutSink
from gears.mapping import MappingStage

AT = At("rig.yaml", "settings")
FIXED_ID = bytes(range(16))
TS = 1_700_000_000_000_000_000


def _ctx(tmp_path: Any = "/nonexistent", name: str = "g") -> GearContext:
    return GearContext(rack_id="t", pipeline="p", name=name, replica=0, replicas=1,
                       data_dir=str(tmp_path), log=logging.getLogger("t"))


def _frame(headers: dict[str, Any] | None = None, body: Any = None, kind: str = "demo.reading",
           frame_id: bytes = FIXED_ID) -> Frame:
    return Frame(id=frame_id, ts=TS, src="gen:p.source", kind=kind,
                 headers={"device": "dev-1"} if headers is None else headers,
                 body={"seq": 7, "status": "ok"} if body is None else body)


def _mapping(settings: dict[str, Any]) -> MappingStage:
    return MappingStage(MappingStage.parse_settings(settings, AT), _ctx())


def _process(stage: MappingStage, frames: list[Frame]) -> list[Frame]:
    out: list[Frame] = []
    stage.process(frames, out.append)
    return out


# --- mapping ---------------------------------------------------------------------------------

H = {"device": "dev-1"}
B = {"seq": 7, "status": "ok"}

# (settings, input headers, input body, expected headers, body and kind; None = filtered out)
MAPPING = [
    ("no-settings-passes-through", {}, H, B, (H, B, "demo.reading")),
    ("filter-match", {"filter": {"body.status": "ok"}}, H, B, (H, B, "demo.reading")),
    ("filter-other-value", {"filter": {"body.status": "ok"}}, H, {"status": "bad"}, None),
    ("filter-missing-path", {"filter": {"body.status": "ok"}}, H, {"seq": 1}, None),
    ("filter-null-needs-the-key", {"filter": {"body.x": None}}, H, {"seq": 1}, None),
    ("filter-null-present", {"filter": {"body.x": None}}, H, {"x": None},
     (H, {"x": None}, "demo.reading")),
    ("filter-every-path-must-match", {"filter": {"body.status": "ok", "headers.device": "dev-2"}},
     H, B, None),
    ("filter-nested", {"filter": {"body.a.b": 1}}, H, {"a": {"b": 1}},
     (H, {"a": {"b": 1}}, "demo.reading")),
    ("copy", {"copy": {"headers.seq": "body.seq"}}, H, B,
     ({"device": "dev-1", "seq": 7}, B, "demo.reading")),
    ("copy-missing-source-leaves-dst-unset", {"copy": {"headers.seq": "body.nope"}}, H, B,
     (H, B, "demo.reading")),
    ("copy-missing-source-keeps-existing-dst", {"copy": {"headers.seq": "body.nope"}},
     {"seq": 1}, B, ({"seq": 1}, B, "demo.reading")),
    ("copy-into-new-nested-map", {"copy": {"body.meta.dev": "headers.device"}}, H, B,
     (H, {"seq": 7, "status": "ok", "meta": {"dev": "dev-1"}}, "demo.reading")),
    ("set", {"set": {"headers.site": "plant-7"}}, H, B,
     ({"device": "dev-1", "site": "plant-7"}, B, "demo.reading")),
    ("set-nested-creates-maps", {"set": {"body.a.b": 1}}, H, B,
     (H, {"seq": 7, "status": "ok", "a": {"b": 1}}, "demo.reading")),
    ("set-overrides-copy", {"copy": {"headers.seq": "body.seq"}, "set": {"headers.seq": 0}}, H, B,
     ({"device": "dev-1", "seq": 0}, B, "demo.reading")),
    ("drop", {"drop": ["body.status"]}, H, B, (H, {"seq": 7}, "demo.reading")),
    ("drop-missing-is-a-no-op", {"drop": ["body.nope"]}, H, B, (H, B, "demo.reading")),
    ("drop-missing-nested-is-a-no-op", {"drop": ["body.debug.level"]}, H, B,
     (H, B, "demo.reading")),
    ("drop-under-a-scalar-is-a-no-op", {"drop": ["headers.device.x"]}, H, B,
     (H, B, "demo.reading")),
    ("copy-then-drop-renames", {"copy": {"headers.seq": "body.seq"}, "drop": ["body.seq"]}, H, B,
     ({"device": "dev-1", "seq": 7}, {"status": "ok"}, "demo.reading")),
    ("kind-only", {"kind": "demo.mapped"}, H, B, (H, B, "demo.mapped")),
    ("everything",
     {"filter": {"body.status": "ok"}, "copy": {"headers.seq": "body.seq"},
      "set": {"headers.site": "plant-7"}, "drop": ["body.status"], "kind": "demo.enriched"},
     H, B, ({"device": "dev-1", "seq": 7, "site": "plant-7"}, {"seq": 7}, "demo.enriched")),
    ("everything-filtered",
     {"filter": {"body.status": "ok"}, "set": {"headers.site": "plant-7"}, "kind": "x"},
     H, {"status": "bad"}, None),
]


@pytest.mark.parametrize(("settings", "headers", "body", "expected"),
                         [row[1:] for row in MAPPING], ids=[row[0] for row in MAPPING])
def test_mapping_table(settings, headers, body, expected):
    frame = _frame(copy.deepcopy(headers), copy.deepcopy(body))
    out = _process(_mapping(settings), [frame])
    if expected is None:
        assert out == []
        return
    [mapped] = out
    assert (dict(mapped.headers), mapped.body, mapped.kind) == expected
    # same signal, transformed: replays de-duplicate on the id
    assert (mapped.id, mapped.ts, mapped.src) == (frame.id, frame.ts, frame.src)


def test_mapping_emits_only_matching_frames_in_order():
    frames = [_frame(body={"n": n, "status": "ok" if n % 2 == 0 else "bad"},
                     frame_id=bytes([n]) * 16) for n in range(6)]
    out = _process(_mapping({"filter": {"body.status": "ok"}, "kind": "even"}), frames)
    assert [f.body["n"] for f in out] == [0, 2, 4]
    assert [f.id for f in out] == [frames[n].id for n in (0, 2, 4)]
    assert {f.kind for f in out} == {"even"}


@pytest.mark.parametrize(
    "settings",
    [
        {"kind": "k"},
        {"copy": {"headers.seq": "body.seq"}},
        {"set": {"headers.device": "x", "body.meta.a": 1}},
        {"drop": ["headers.device", "body.meta.secret"]},
        {"copy": {"body.meta2": "body.meta"}, "set": {"body.meta2.extra": 1}},
        {"copy": {"body.meta2": "body.meta"}, "drop": ["body.meta2.secret"]},
    ],
    ids=["kind", "copy", "set", "drop", "copy-subtree-then-set-inside",
         "copy-subtree-then-drop-inside"],
)
def test_mapping_does_not_mutate_its_input(settings):
    headers = {"device": "dev-1", "trace": {"id": "abc"}}
    body = {"seq": 7, "meta": {"secret": 1, "keep": 2}}
    frame = _frame(headers, body)
    before = copy.deepcopy((frame.headers, frame.body))
    _process(_mapping(settings), [frame])
    assert (frame.headers, frame.body) == before


def test_mapping_does_not_mutate_its_settings():
    stage = _mapping({"set": {"body.x": {"a": 1}, "body.x.b": 2}})
    before = copy.deepcopy(stage.settings)
    out = _process(stage, [_frame(), _frame()])
    assert [f.body["x"] for f in out] == [{"a": 1, "b": 2}] * 2
    assert stage.settings == before


# --- generator -------------------------------------------------------------------------------


def _generator(tmp_path, **settings: Any) -> Generator:
    return Generator(Generator.parse_settings(settings, AT), _ctx(tmp_path, "gen"))


async def _run(gen: Generator, stop_after_batches: int = 0) -> list[list[Frame]]:
    """Run ``gen`` to its end; ``stop_after_batches`` sets ``stopping`` from inside emit."""
    batches: list[list[Frame]] = []
    stopping = asyncio.Event()

    async def emit(frames: list[Frame]) -> None:
        batches.append(frames)
        if len(batches) == stop_after_batches:
            stopping.set()

    await asyncio.wait_for(gen.run(emit, stopping), 5)
    return batches


def test_generator_emits_count_frames_in_batches_with_rendered_templates(tmp_path, caplog):
    gen = _generator(
        tmp_path, count=250, batch=100, rate=0, keys=16, kind="demo.reading",
        headers={"device": "dev-{i}", "fixed": "plain"},
        body={"seq": "$seq", "ts": "$ts", "device": "dev-{i}", "temp_c": 21.5,
              "tags": ["s{seq}", 1]},
    )
    with caplog.at_level(logging.INFO, logger="t"):
        batches = asyncio.run(_run(gen))

    assert [len(b) for b in batches] == [100, 100, 50]
    frames = [f for b in batches for f in b]
    assert [f.body["seq"] for f in frames] == list(range(250))
    for f in frames:
        seq = f.body["seq"]
        assert f.headers == {"device": f"dev-{seq % 16}", "fixed": "plain"}
        assert f.body == {"seq": seq, "ts": f.ts, "device": f"dev-{seq % 16}", "temp_c": 21.5,
                          "tags": [f"s{seq}", 1]}
        assert (f.src, f.kind) == ("gen:p.gen", "demo.reading")
    ids = [f.id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 250
    assert "generator done: frames=250" in caplog.messages


def test_generator_default_body_is_the_sequence_number(tmp_path):
    batches = asyncio.run(_run(_generator(tmp_path, count=3, rate=0)))
    assert [f.body for b in batches for f in b] == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    assert [f.headers for b in batches for f in b] == [{}, {}, {}]


def test_generator_rate_spaces_batches_out(tmp_path):
    gen = _generator(tmp_path, count=200, batch=100, rate=2000)
    start = time.monotonic()
    batches = asyncio.run(_run(gen))
    elapsed = time.monotonic() - start
    assert [len(b) for b in batches] == [100, 100]
    assert elapsed >= 0.09  # the second batch is due 100 ms after start


@pytest.mark.parametrize("rate", [0, 100_000])
def test_generator_stops_when_stopping_is_set_from_emit(tmp_path, rate):
    gen = _generator(tmp_path, count=0, batch=10, rate=rate)
    batches = asyncio.run(_run(gen, stop_after_batches=2))
    assert [len(b) for b in batches] == [10, 10]


def test_generator_stops_while_waiting_for_its_next_batch(tmp_path):
    gen = _generator(tmp_path, count=0, batch=1, rate=1)  # first batch due after 1 s

    async def main() -> list[list[Frame]]:
        batches: list[list[Frame]] = []
        stopping = asyncio.Event()

        async def emit(frames: list[Frame]) -> None:
            batches.append(frames)

        asyncio.get_running_loop().call_later(0.05, stopping.set)  # once it is waiting
        await asyncio.wait_for(gen.run(emit, stopping), 0.5)  # returns well before 1 s
        return batches

    assert asyncio.run(main()) == []


# --- derive_id -------------------------------------------------------------------------------

PARENT = bytes.fromhex("0190aabbccdd7123" "8123456789abcdef")


def test_derive_id_is_deterministic_and_keeps_the_time_prefix():
    a = derive_id(PARENT, 1)
    assert a == derive_id(PARENT, 1)
    assert type(a) is bytes and len(a) == 16
    assert a[:6] == PARENT[:6]
    assert a != PARENT


def test_derive_id_differs_by_n_and_by_parent():
    ids = {derive_id(PARENT, n) for n in range(100)}
    assert len(ids) == 100
    other = PARENT[:6] + bytes(10)
    assert derive_id(other, 1) != derive_id(PARENT, 1)


def test_derive_id_is_still_a_uuid7():
    # Frame.id is documented as a UUIDv7: version nibble 7, RFC 9562 variant 0b10.
    for n in range(16):
        u = uuid.UUID(bytes=derive_id(PARENT, n))
        assert (u.version, u.variant) == (7, uuid.RFC_4122)


# --- file and stdout sinks -------------------------------------------------------------------


def _lines_frames() -> list[Frame]:
    return [
        Frame(id=FIXED_ID, ts=TS, src="s", kind="k", headers={"device": "dev-1"},
              body={"raw": b"\x00\xff", "n": [1, 2.5, None, True], "nested": {"b": b"ab"}}),
        Frame(id=bytes([0xAA]) * 16, ts=TS + 1, src="s", kind="k2", headers={"h": b"\x01"},
              body=b"\x10\x20"),
        Frame(id=bytes([0xBB]) * 16, ts=TS + 2, src="s", kind="k3", body=None),
    ]


def _as_json(frame: Frame) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, bytes):
            return {"$hex": v.hex()}
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {"id": str(uuid.UUID(bytes=frame.id)), "ts": frame.ts, "src": frame.src,
            "kind": frame.kind, "headers": conv(dict(frame.headers)), "body": conv(frame.body)}


def test_file_sink_appends_json_lines(tmp_path):
    settings = FileSink.parse_settings({"path": "out/frames.jsonl"}, AT)
    assert settings.fsync is False
    frames = _lines_frames()
    sink = FileSink(settings, _ctx(tmp_path))
    asyncio.run(sink.write(frames[:2]))
    asyncio.run(sink.write(frames[2:]))
    sink.close()

    text = (tmp_path / "out" / "frames.jsonl").read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert [json.loads(line) for line in lines] == [_as_json(f) for f in frames]
    assert json.loads(lines[0])["id"] == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert json.loads(lines[0])["body"]["raw"] == {"$hex": "00ff"}


def test_file_sink_reopened_appends_rather_than_truncates(tmp_path):
    settings = FileSink.parse_settings({"path": "frames.jsonl", "fsync": True}, AT)
    assert settings.fsync is True
    frames = _lines_frames()
    for f in frames:  # one sink per "process start"
        sink = FileSink(settings, _ctx(tmp_path))
        asyncio.run(sink.write([f]))
        sink.close()
    lines = (tmp_path / "frames.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["k", "k2", "k3"]


def test_stdout_sink_writes_json_lines(capsysbinary):
    frames = _lines_frames()
    asyncio.run(StdoutSink(None, _ctx()).write(frames))
    out = capsysbinary.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == [_as_json(f) for f in frames]


# --- registry --------------------------------------------------------------------------------

ROLES = {"egress": "sink", "file": "sink", "generator": "source", "mapping": "stage",
         "map": "stage", "stdout": "sink", "iso8583": "source", "modbus": "source",
         "http_server": "source", "http_client": "sink"}


def test_known_gears_is_sorted_and_complete():
    assert known_gears() == sorted(ROLES)


@pytest.mark.parametrize(("name", "role"), sorted(ROLES.items()))
def test_lookup_gear_returns_the_registered_class(name, role):
    cls = lookup_gear(name)
    assert isinstance(cls, type) and issubclass(cls, Gear)
    assert cls.role == role


@pytest.mark.parametrize("name", ["nope", "", "Mapping", "gears.mapping:MappingStage"])
def test_lookup_gear_unknown_is_none(name):
    assert lookup_gear(name) is None


def test_a_gear_without_settings_accepts_none_and_empty():
    assert Gear.parse_settings(None, AT) is None
    assert Gear.parse_settings({}, AT) is None
