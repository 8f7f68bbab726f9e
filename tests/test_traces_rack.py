"""Transaction traces and shipped logs from a real switch rack (issue "Pipeline B").

A real rack (`engine start`) with a switch, a real issuer simulator in its own process,
a load generator; spans are read where users read them: OTLP protobuf on
``fluxrig.traces.<rack>`` (decoded with ``opentelemetry-proto``'s classes, not our code),
an OTLP/HTTP receiver written here (the standard library's ``http.server``), and JSON lines
on ``fluxrig.logs.<rack>``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading

import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from rackutil import RackProcess, stream_contents, switch_rig, uid, wait_switch_ready

from engine.bus import load_auth
from engine.frame import decode
from engine.natsd import free_port
from gears.iso8583.codec import spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

pytestmark = pytest.mark.slow

APPROVED = "4761739001010119"  # BIN 4: issuer a approves
DECLINED = "5500000000000004"  # BIN 5: issuer b answers 05
NO_ROUTE = "9000000000000001"  # no route: 92
PANS = (APPROVED, DECLINED, NO_ROUTE)
CHILDREN = ("acquirer receive", "validate", "route", "journal", "issuer send", "issuer answer",
            "audit write", "respond")


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.requests.append(req)
                outer.headers.append(dict(self.headers))
                outer.got.set()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spans(requests: list[ExportTraceServiceRequest]) -> list[tuple[dict, object]]:
    """Every span with its resource's attributes."""
    out = []
    for req in requests:
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    out.append((res, span))
    return out


def _attrs(span: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:  # type: ignore[attr-defined]
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def test_switch_traces_reach_nats_and_an_otlp_endpoint(tmp_path, monkeypatch):
    rack_id = uid("t-trace")
    port, issuer_port = free_port(), free_port()
    receiver = OtlpReceiver()
    issuer = subprocess.Popen([sys.executable, "-m", "engine.cli", "iso", "issuer", "--port",
                               str(issuer_port), "--rule", "4=00", "--rule", "5=05"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    telemetry = {"interval": 0.5,
                 "traces": {"sample": 1.0},
                 "otlp": {"endpoint": f"http://127.0.0.1:{receiver.port}",
                          "headers": {"authorization": "Bearer ${FX_TEST_OTLP}"}}}
    cfg = switch_rig(tmp_path, rack_id, port, issuer_port, telemetry=telemetry)
    monkeypatch.setenv("FX_TEST_OTLP", "s3cret")  # the rack reads ${FX_TEST_OTLP}
    rack = RackProcess(cfg, tmp_path / "data", workers=2)
    got: list[bytes] = []
    logs: list[bytes] = []
    try:
        wait_switch_ready(rack, port, replicas=2)

        async def run() -> tuple[dict, int]:
            auth = load_auth(rack.data_dir)
            nc = await nats.connect(rack.state["nats_url"], user=auth.user,
                                    password=auth.password)
            all_roots = asyncio.Event()
            drained = asyncio.Event()
            roots = 0

            async def on_trace(m: Msg) -> None:
                nonlocal roots
                got.append(m.data)
                roots += sum(not s.parent_span_id for _, s in _spans([_parse(m.data)]))
                if roots >= 300:
                    all_roots.set()

            async def on_log(m: Msg) -> None:
                logs.append(m.data)
                if b"draining" in m.data:
                    drained.set()

            await nc.subscribe(f"fluxrig.traces.{rack_id}", cb=on_trace)
            await nc.subscribe(f"fluxrig.logs.{rack_id}", cb=on_log)
            await nc.flush()
            gen = LoadGenerator(LoadConfig(
                host="127.0.0.1", port=port, spec=spec_by_name("default"),
                framing=FramingConfig(prefix="2B"), connections=6, rate=300, count=300,
                duration=30, grace=5, mix=tuple(MixEntry(pan=p) for p in PANS)))
            report = (await gen.run()).summary()
            await asyncio.wait_for(all_roots.wait(), 20)
            # stop the rack while still listening: the supervisor's "draining" record is
            # shipped by telemetry before it stops
            code = await asyncio.get_running_loop().run_in_executor(None, rack.stop)
            await asyncio.wait_for(drained.wait(), 5)
            await nc.close()
            return report, code

        report, code = asyncio.run(run())
        assert code == 0
        assert receiver.got.wait(20), "the OTLP endpoint got nothing"
    finally:
        rack.close()
        issuer.kill()
        issuer.wait()
        receiver.close()
    assert report["received"] == 300 and report["lost"] == 0
    spans = _spans([_parse(d) for d in got])
    roots = [s for _, s in spans if not s.parent_span_id]
    assert len(roots) == 300, len(roots)
    # one trace per transaction; the trace id is the audit event's id
    count, messages = stream_contents(tmp_path / "data", rack_id, "TXN",
                                      f"fluxrig.{rack_id}.txn")
    events = {decode(data).id: decode(data).body for _, data in messages}
    event_ids = set(events)
    assert {r.trace_id for r in roots} == event_ids
    by_trace: dict[bytes, list] = {}
    for res, s in spans:
        assert res["fluxrig.rack"] == rack_id and res["service.name"] == "fluxrig"
        assert res["fluxrig.process"].startswith("payments.switch.")
        by_trace.setdefault(s.trace_id, []).append(s)
    codes = {}
    for root in roots:
        kids = [s for s in by_trace[root.trace_id] if s.parent_span_id]
        attrs = _attrs(root)
        codes[attrs["iso8583.de39"]] = codes.get(attrs["iso8583.de39"], 0) + 1
        assert root.kind == root.SPAN_KIND_SERVER and root.name == "iso8583 0100"
        assert all(k.parent_span_id == root.span_id for k in kids)
        names = [k.name for k in sorted(kids, key=lambda k: k.start_time_unix_nano)]
        if attrs["iso8583.de39"] == "92":  # answered by the switch itself: no issuer leg
            assert names == ["acquirer receive", "validate", "route", "audit write", "respond"]
        else:
            assert names == list(CHILDREN), names
            issuer_leg = next(k for k in kids if k.name == "issuer answer")
            assert issuer_leg.kind == issuer_leg.SPAN_KIND_CLIENT
            assert _attrs(issuer_leg)["server.port"] == issuer_port
        # the steps follow each other inside the root and add up to it
        ordered = sorted(kids, key=lambda k: k.start_time_unix_nano)
        assert ordered[0].start_time_unix_nano == root.start_time_unix_nano
        assert ordered[-1].end_time_unix_nano == root.end_time_unix_nano
        for a, b in zip(ordered, ordered[1:]):
            assert a.end_time_unix_nano == b.start_time_unix_nano
        assert sum(k.end_time_unix_nano - k.start_time_unix_nano for k in kids) == \
            root.end_time_unix_nano - root.start_time_unix_nano
        assert attrs["fluxrig.keep"] == "sampled"
        assert attrs["iso8583.pan"].count("*") == 6
    assert codes == {c: sum(e["de39"] == c for e in events.values()) for c in ("00", "05", "92")}
    assert set(codes) == {"00", "05", "92"}
    # the OTLP endpoint got the same spans, with the configured header
    otlp = _spans(receiver.requests)
    assert {s.trace_id for _, s in otlp} == {r.trace_id for r in roots}
    assert receiver.headers[0]["authorization"] == "Bearer s3cret"
    # logs: JSON lines with the rack's own records (the issuer links coming up)
    records = [json.loads(line) for blob in logs for line in blob.splitlines()]
    assert all(r["rack"] == rack_id and r["level"] for r in records)
    # the supervisor's own records too (it forks the others, then takes its own tap)
    assert any(r["process"] == "supervisor" and "draining" in r["msg"] for r in records), \
        records
    # no clear card number in anything shipped
    for blob in got + logs + [r.SerializeToString() for r in receiver.requests]:
        for pan in PANS:
            assert pan.encode() not in blob


def _parse(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return req

