"""The Mixer's ``traces`` process against a real ``mixer start``: OTLP requests and log
batches built with opentelemetry-proto (``otlpkit``, no code of the store) published as
racks publish them — by the ``sim`` user (``simulator: true``) and once by a real linked
rack over its leaf link — then the Parquet parts, ``mixer traces`` and ``mixer logs`` as a
user runs them, a collector receiving the forwarded payloads over real HTTP.

What must hold: parts appear under the hive layout; a transaction is found by token,
TERMINAL:STAN and trace id and drawn with its nesting and offsets; the same terminal:stan
through two racks is drawn on one time axis; ``mixer logs --since`` prints stored records
and ``--follow`` a record published after it started; bad payloads are counted and the
process lives; a clear card number planted in a log message and in a span attribute is
nowhere in the stored files; the collector gets the payload unchanged, after a 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import pyarrow.parquet as pq
import pytest
from mixerutil import MixerProcess, enrol, hub_ports, init_hub, mixer, wait_until
from otlpkit import log_batch, request, switch_txn

from engine.masking import luhn_valid
from mixer.hubfiles import local_users

CLEAR_PAN = "4111111111111111"
DIGITS = re.compile(rb"\d{13,19}")


@dataclass
class Collector:
    """An OTLP/HTTP receiver: the first POST gets 503, the rest 200."""

    bodies: list[bytes] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> int:
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if not me.statuses else 200
                me.statuses.append(status)
                if status == 200 and self.path == "/v1/traces":
                    me.bodies.append(body)
                    me.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]


@dataclass
class Hub:
    hub: Path
    mixer: MixerProcess
    collector: Collector

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{hub_ports(self.hub)[0]}"

    def publish(self, *msgs: tuple[str, bytes]) -> None:
        async def go() -> None:
            nc = await nats.connect(self.url, user="sim", password=local_users(self.hub)["sim"])
            try:
                for subject, data in msgs:
                    await nc.publish(subject, data)
                await nc.flush()
            finally:
                await nc.close()
        asyncio.run(go())

    def parts(self, kind: str, rack: str = "*") -> list[Path]:
        return sorted(self.hub.glob(f"{kind}/rack={rack}/date=*/hour=*/*.parquet"))

    def rows(self, kind: str) -> int:
        return sum(pq.read_metadata(p).num_rows for p in self.parts(kind))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("traces")
    collector = Collector()
    port = collector.start()
    h = init_hub(tmp, audit="{enabled: false}")
    os.environ["FX_TRACES_TEST_TOKEN"] = "tok-123"
    with open(h / "mixer.yaml", "a") as f:
        f.write("simulator: true\n"
                "traces: {flush: 0.2s, forward: {endpoint: "
                f"'http://127.0.0.1:{port}', headers: {{authorization: "
                "'Bearer ${FX_TRACES_TEST_TOKEN}'}, timeout: 2s}}\n")
    m = MixerProcess(h)
    try:
        yield Hub(h, m, collector)
        assert m.stop() == 0, m.output()  # the traces process writes what waits and exits
        assert "traces: messages=" in m.output()
    finally:
        m.close()
        del os.environ["FX_TRACES_TEST_TOKEN"]
        if collector.server is not None:
            collector.server.shutdown()


def _traces_cli(hub: Hub, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "mixer", "traces", str(hub.hub), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_spans_are_stored_hive_partitioned_and_mixer_traces_draws_them(hub: Hub):
    now = time.time_ns() - 5 * 10**9
    a = switch_txn(now, "4761739990010119", "T0000001", "000777", step_us=2000)
    # the same terminal:stan through rack-b, inside rack-a's transaction
    b = switch_txn(now + 3 * 10**6, "4761739990010119", "T0000001", "000777", step_us=500)
    other = switch_txn(now - 10**9, "5500001111222299", "T0000009", "000001", de39="05",
                       keep="decline")
    hub.publish(("fluxrig.traces.rack-a", request(a.spans + other.spans, "rack-a")),
                ("fluxrig.traces.rack-b", request(b.spans, "rack-b", "pay.switch.1")))
    wait_until(lambda: hub.rows("traces") >= 3, 15, "three trace rows in Parquet")
    for rack in ("rack-a", "rack-b"):
        (part,) = hub.parts("traces", rack)
        rel = part.relative_to(hub.hub).parts
        assert rel[:2] == ("traces", f"rack={rack}") and rel[2].startswith("date=")
        assert rel[3].startswith("hour=") and rel[4].startswith("part-")

    done = _traces_cli(hub, "T0000001:777")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 traces on one time axis" in out
    assert f"trace {a.trace_id.hex()}  rack=rack-a" in out
    assert f"trace {b.trace_id.hex()}  rack=rack-b" in out
    lines = out.splitlines()
    root = next(i for i, x in enumerate(lines) if x.startswith("  iso8583 0200"))
    assert lines[root + 1].startswith("    acquirer receive")  # nested under the root
    # offsets on the shared axis: rack-b's root starts 3 ms after rack-a's
    b_root = [x for x in lines if x.startswith("  iso8583 0200")][1]
    assert "   3.00ms    5.00ms" in b_root and "rack-b/pay.switch.1" in b_root

    done = _traces_cli(hub, a.token, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert {t["trace_id"] for t in got} == {a.trace_id.hex(), b.trace_id.hex()}
    ta = next(t for t in got if t["rack"] == "rack-a")
    spans = {s["name"]: s for s in ta["spans"]}
    assert spans["validate"]["depth"] == 1 and spans["validate"]["offset_ms"] == 2.0
    assert spans["issuer answer"]["kind"] == "CLIENT" and ta["de39"] == "00"

    for q in (other.trace_id.hex(), str(_uuid(other.trace_id))):
        done = _traces_cli(hub, q)
        assert done.returncode == 0 and "de39=05" in done.stdout and "keep=decline" in \
            done.stdout, done.stdout + done.stderr
    done = _traces_cli(hub, "T0000001:999")
    assert done.returncode == 1 and "no trace matches" in done.stderr


def _uuid(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes=raw))


def test_the_collector_gets_each_payload_unchanged_after_a_503(hub: Hub):
    t = switch_txn(time.time_ns(), "4761739990010119", "T5", "000005")
    payload = request(t.spans, "rack-a")
    hub.publish(("fluxrig.traces.rack-a", payload))
    wait_until(lambda: payload in hub.collector.bodies, 20, "the payload at the collector")
    assert hub.collector.statuses[0] == 503  # the first POST failed and was retried
    h = hub.collector.headers[hub.collector.bodies.index(payload)]
    assert h["content-type"] == "application/x-protobuf" and h["authorization"] == \
        "Bearer tok-123"


def test_mixer_logs_prints_stored_records_and_follows_new_ones(hub: Hub):
    hub.publish(("fluxrig.logs.rack-a", log_batch("rack-a", [
        {"msg": "switch started", "level": "INFO"},
        {"msg": "issuer slow", "level": "WARNING", "exc": "Traceback: boom"}])),
        ("fluxrig.logs.rack-b", log_batch("rack-b", [{"msg": "hello from b"}])))
    wait_until(lambda: hub.rows("logs") >= 3, 15, "three log rows in Parquet")
    done = mixer("logs", str(hub.hub), "--since", "10m")
    assert done.returncode == 0, done.stderr
    assert re.search(r"Z INFO +rack-a pay.switch.0 fluxrig.iso.switch: switch started",
                     done.stdout), done.stdout
    assert "    Traceback: boom" in done.stdout and "hello from b" in done.stdout
    done = mixer("logs", str(hub.hub), "--rack", "rack-a", "--level", "warning")
    assert done.stdout.count("\n") == 2 and "issuer slow" in done.stdout
    done = mixer("logs", str(hub.hub), "--grep", "FROM B")
    assert "hello from b" in done.stdout and "switch started" not in done.stdout

    follow = subprocess.Popen([sys.executable, "-u", "-m", "mixer", "logs", str(hub.hub),
                               "--rack", "rack-b", "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        seen = _read_until(follow, b"hello from b", 20)
        hub.publish(("fluxrig.logs.rack-b", log_batch("rack-b", [{"msg": "live one"}])))
        seen += _read_until(follow, b"live one", 20)
        assert seen.count(b"hello from b") == 1
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read a child's stdout until ``marker`` (its output is the event waited on)."""
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        left = deadline - time.monotonic()
        r, _, _ = select.select([proc.stdout], [], [], max(left, 0))
        if not r:
            raise AssertionError(f"no {marker!r} after {timeout} s: {got!r} "
                                 f"{proc.stderr.read1() if proc.poll() is not None else b''}")  # type: ignore[union-attr]
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"follow ended: {got!r}")
        got += chunk
    return got


def test_bad_payloads_are_counted_and_the_process_lives(hub: Hub):
    before = next(p for p in hub.mixer.state()["processes"] if p["name"] == "traces")
    t = switch_txn(time.time_ns(), "4761739990010120", "T6", "000006")
    junk, not_text = b"\xff\x00 not protobuf", b"\xff\xfe not utf-8"
    hub.publish(("fluxrig.traces.rack-c", junk), ("fluxrig.logs.rack-c", not_text),
                ("fluxrig.logs.rack-c", b"{broken json\n"),
                ("fluxrig.traces.rack-c", request(t.spans, "rack-c")))
    wait_until(lambda: hub.parts("traces", "rack-c"), 15, "the good payload stored")
    wait_until(lambda: f"bad trace payload: rack=rack-c, bytes={len(junk)}" in
               hub.mixer.output(), 10, "the bad trace payload logged")
    out = hub.mixer.output()
    assert "bad_traces=1" in out
    # a bad UTF-8 byte is replaced, not a lost batch: here it spoils the JSON, one bad line
    assert f"bad log lines skipped: rack=rack-c, bytes={len(not_text)}, lines=1" in out
    after = next(p for p in hub.mixer.state()["processes"] if p["name"] == "traces")
    assert after["pid"] == before["pid"] and after["restarts"] == 0


def test_a_planted_card_number_is_in_no_stored_byte(hub: Hub):
    t = switch_txn(time.time_ns(), "4761739990010121", "T7", "000007",
                   extra={"debug": f"pan={CLEAR_PAN}", "raw_pan": int(CLEAR_PAN)})
    hub.publish(("fluxrig.traces.rack-d", request(t.spans, "rack-d")),
                ("fluxrig.logs.rack-d", log_batch("rack-d", [
                    {"msg": f"declined card {CLEAR_PAN}", "exc": f"ValueError: {CLEAR_PAN}"}])))
    wait_until(lambda: hub.parts("traces", "rack-d") and hub.parts("logs", "rack-d"), 15,
               "rack-d's parts")
    for kind in ("traces", "logs"):
        for part in hub.parts(kind, "rack-d"):
            raw = part.read_bytes()
            assert CLEAR_PAN.encode() not in raw
            text = json.dumps(pq.read_table(part).to_pylist()).encode()  # every column, decoded
            assert CLEAR_PAN.encode() not in text and b"411111******1111" in text
            # (in the decoded text, 19-digit ns times may pass Luhn by chance: raw bytes only)
            assert not [m for m in DIGITS.findall(raw) if luhn_valid(m.decode())]


def test_a_linked_rack_may_send_its_own_traces_and_logs_only(hub: Hub, tmp_path: Path):
    """Over a real leaf link: the rack's admin on its embedded server publishes its own
    subjects (they cross: stored) and another rack's (refused by the hub's permissions)."""
    from rackutil import RackProcess, rig, uid

    from engine.bus import load_auth

    me, other = uid("trc"), uid("trcx")
    passport = enrol(hub.hub, me)
    enrol(hub.hub, other)
    d = tmp_path / "r"
    d.mkdir()
    rack = RackProcess(rig(d, me, count=1, rate=10, mixer={"passport": str(passport)}),
                       d / "data")
    try:
        auth = load_auth(rack.data_dir)
        assert auth is not None
        url = rack.state["nats_url"]
        t_own = switch_txn(time.time_ns(), "4761739990010122", "T8", "000008")
        t_forged = switch_txn(time.time_ns(), "4761739990010123", "T8", "000009")

        async def go() -> None:
            nc = await nats.connect(url, user=auth.user, password=auth.password)
            try:
                # the link may come up a little after the rack is ready: repeat until stored
                for _ in range(100):
                    await nc.publish(f"fluxrig.traces.{other}",
                                     request(t_forged.spans, other))
                    await nc.publish(f"fluxrig.traces.{me}", request(t_own.spans, me))
                    await nc.publish(f"fluxrig.logs.{me}", log_batch(me, [{"msg": "via leaf"}]))
                    await nc.flush()
                    if hub.parts("traces", me) and hub.parts("logs", me):
                        return
                    await asyncio.sleep(0.2)
            finally:
                await nc.close()

        asyncio.run(go())
        assert hub.parts("traces", me) and hub.parts("logs", me)
        time.sleep(0.5)  # a forged part would be flushed by now (flush 0.2 s)
        assert not hub.parts("traces", other)
    finally:
        rack.close()


def test_traces_enabled_false_runs_no_traces_process(tmp_path: Path):
    h = init_hub(tmp_path, audit="{enabled: false}")
    with open(h / "mixer.yaml", "a") as f:
        f.write("traces: {enabled: false}\n")
    m = MixerProcess(h)
    try:
        assert [p["name"] for p in m.state()["processes"]] == ["registry"]
        assert m.stop() == 0
    finally:
        m.close()
