"""Fan-out: a pipeline with several sinks, the ``map`` stage's routes, durable settle.

Real racks (processes, rings, nats-server, JetStream files); the expected routes are
computed here in plain Python from the generator's sequence numbers, not with our code.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import yaml

from engine.fanout import RouteError, targets
from engine.ring import Ring
from engine.settle import Settle
from tests.rackutil import RackProcess, rig, stream_contents, uid

pytestmark = pytest.mark.slow

COUNT = 3000


def _rig(tmp_path: Path, rack_id: str, count: int = COUNT) -> Path:
    return rig(tmp_path, rack_id, count=count, rate=20000, pipelines=[{
        "name": "p",
        "key": "headers.device",
        "source": {"gear": "generator", "settings": {
            "rate": 20000, "count": count, "batch": 50, "keys": 8,
            "headers": {"device": "d{i}"}, "body": {"seq": "$seq"}}},
        "stages": [{"name": "route", "gear": "map", "settings": {
            "set": {"body.tenth": "double(body.seq) / 10.0"},
            "route": [
                {"when": "body.seq % 5 == 0", "to": "discard"},
                {"when": "body.seq % 3 == 0", "to": ["js", "file"]},
                {"when": "body.seq % 3 == 1", "to": "file"},
            ],
            "default_route": "js"}}],
        "sinks": [{"name": "js", "gear": "egress",
                   "settings": {"subject": f"fluxrig.{rack_id}.out"}},
                  {"name": "file", "gear": "file", "settings": {"path": "out.jsonl"}}],
    }])


def _expected(count: int) -> tuple[set[int], set[int]]:
    js, file = set(), set()
    for seq in range(count):
        if seq % 5 == 0:
            continue
        if seq % 3 == 0:
            js.add(seq)
            file.add(seq)
        elif seq % 3 == 1:
            file.add(seq)
        else:
            js.add(seq)
    return js, file


@pytest.mark.parametrize("workers", [1, 2])
def test_routes_send_each_frame_to_the_sinks_it_names(tmp_path, workers):
    rack_id = uid(f"fan{workers}")
    rack = RackProcess(_rig(tmp_path, rack_id), tmp_path / "data", workers=workers)
    want_js, want_file = _expected(COUNT)
    out = tmp_path / "data" / "out.jsonl"
    try:
        def file_seqs() -> list[int]:
            if not out.exists():
                return []
            return [json.loads(line)["body"]["seq"]
                    for line in out.read_text().splitlines() if line.endswith("}")]

        rack.wait_for(lambda: len(set(file_seqs())) >= len(want_file), 60, "the file sink")
        assert rack.stop() == 0
    finally:
        rack.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["body"]["seq"] for line in lines} == want_file
    assert all(line["headers"]["route"] in (["js", "file"], ["file"]) for line in lines)
    assert all(line["body"]["tenth"] == line["body"]["seq"] / 10 for line in lines)
    _, messages = stream_contents(tmp_path / "data", rack_id)
    import cbor2

    got = [cbor2.loads(data) for _, data in messages]
    assert {m["body"]["seq"] for m in got} == want_js
    assert len(got) == len(want_js)  # de-duplicated: each once
    # the same frame reached both sinks with the same id
    both = {m["body"]["seq"]: uuid.UUID(bytes=m["id"]) for m in got if m["body"]["seq"] % 3 == 0}
    assert all(uuid.UUID(line["id"]) == both[line["body"]["seq"]]
               for line in lines if line["body"]["seq"] in both)


def test_a_route_header_naming_no_sink_is_dead_lettered_and_the_rest_goes_on(tmp_path):
    rack_id = uid("fanbad")
    path = _rig(tmp_path, rack_id, count=200)
    cfg = yaml.safe_load(path.read_text())
    # a stage before the router puts a route nobody has on every 4th frame: the fan-out
    # must refuse those frames (dead letter), not drop or misroute them
    cfg["pipelines"][0]["stages"] = [{"name": "route", "gear": "map", "settings": {
        "set": {"headers.route": 'body.seq % 4 == 0 ? "nowhere" : "file"'}}}]
    path.write_text(yaml.safe_dump(cfg))
    rack = RackProcess(path, tmp_path / "data")
    out = tmp_path / "data" / "out.jsonl"
    dead = tmp_path / "data" / "deadletter" / "p.route.cbor"
    try:
        rack.wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 150, 60,
                      "the file sink")
        rack.wait_for(dead.exists, 30, "the dead letters")
        assert rack.stop() == 0
    finally:
        rack.close()
    seqs = sorted(json.loads(line)["body"]["seq"] for line in out.read_text().splitlines())
    assert seqs == [s for s in range(200) if s % 4]
    import cbor2

    with dead.open("rb") as fh:
        letters = []
        while fh.peek(1):
            letters.append(cbor2.load(fh))
    assert len(letters) == 50
    assert all("route names no sink of the pipeline: route='nowhere'" in x["error"]
               for x in letters)


def test_targets_follow_the_route_header():
    sinks = ["js", "file", "http"]
    assert targets({}, sinks) == (0, 1, 2)
    assert targets({"route": "file"}, sinks) == (1,)
    assert targets({"route": ["http", "js", "http"]}, sinks) == (2, 0)
    assert targets({"route": ["discard"]}, sinks) == ()
    assert targets({"route": []}, sinks) == ()
    for bad in ({"route": "nope"}, {"route": 3}, {"route": [1]}, {"route": {"a": 1}}):
        with pytest.raises(RouteError):
            targets(bad, sinks)
    # the route came with the frame and its error is logged: no card number in it
    with pytest.raises(RouteError, match=r"route='476173\*\*\*\*\*\*0119'"):
        targets({"route": "4761739001010119"}, sinks)


def test_settle_waits_for_every_level_in_order(shm_name):
    """engine.settle against real rings driven by hand: the waiter is released only once the
    lane ring, the stage ring and the egress ring have each been consumed past its frames."""
    lane, mid, end = (Ring.create(shm_name(), 1 << 16) for _ in range(3))
    try:
        settle = Settle([[[lane], [mid], [end]]])
        lane_p, mid_p, end_p = lane.producer(), mid.producer(), end.producer()
        lane_c, mid_c, end_c = lane.consumer(), mid.consumer(), end.consumer()

        async def scenario() -> list[str]:
            steps: list[str] = []
            lane_p.try_write([b"frame-1"])
            waiter = asyncio.ensure_future(settle.settle())
            await asyncio.sleep(0.01)  # the watcher's tick: nothing consumed, still waiting
            steps.append(f"start:{waiter.done()}")
            lane_c.poll(10)
            mid_p.try_write([b"frame-1'"])  # the stage published, then commits its input
            lane_c.commit()
            await asyncio.sleep(0.01)
            steps.append(f"stage:{waiter.done()}")
            mid_c.poll(10)
            end_p.try_write([b"frame-1''"])
            mid_c.commit()
            await asyncio.sleep(0.01)
            steps.append(f"last stage:{waiter.done()}")
            end_c.poll(10)
            end_c.commit()  # egress: JetStream acked
            await asyncio.wait_for(waiter, 2)
            steps.append("egress:True")
            return steps

        assert asyncio.run(scenario()) == ["start:False", "stage:False", "last stage:False",
                                           "egress:True"]
        assert settle.pending() == 0
    finally:
        for r in (lane, mid, end):
            r.close()
            r.unlink()
