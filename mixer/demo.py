"""``scripts/demo --fleet``: a Mixer and two linked racks, the hub killed mid-run.

1. ``mixer init`` + ``mixer start`` in ``var/fleet/hub`` (free ports), two racks enrolled:
   ``switch`` (the ISO 8583 switch of ``configs/iso8583-switch.yaml``, label
   ``role=payments``) and ``plant`` (the generic rack of ``configs/demo.yaml``, a finite
   generator, label ``role=plant``), each rig given its passport;
2. the issuer simulator, both racks, and the load generator on the switch (300 TPS);
3. after 8 s the hub's nats-server and the Mixer are SIGKILLed (the registry goes too); the racks
   keep serving and storing alone; 6 s later the Mixer starts again and they catch up;
4. the counts: every event each rack stored is at the hub exactly once (its frame ids
   unique, the hub's count equal to the rack's), every answered transaction has its audit
   event, and ``mixer racks`` shows both racks;
5. the audit trail (the archiver was killed with the Mixer): every event archived once,
   ``mixer audit query`` and ``mixer audit verify`` over it;
6. traces: one card in fifty goes to a slow issuer (0.8 s); the switch keeps those traces
   (``telemetry.traces.slower_than``), the Mixer stores them, and the demo finds the slowest
   transaction of the audit trail and shows where its time went with ``mixer traces``; the
   switch also sends its spans straight to an OTLP/HTTP endpoint (``telemetry.otlp``: a
   small receiver in this process), which must have the same trace.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import yaml

from engine.bus import load_auth
from engine.frame import decode
from engine.harness import start_rack
from engine.natsd import free_port
from engine.rigs import shipped_rig
from mixer.consoleauth import Credentials

ROOT = Path("var/fleet")
TPS = 300.0
SECONDS = 24.0
KILL_AT, DOWN_FOR = 8.0, 6.0
SLOW_PAN = "6011000990139424"  # routed to issuer-slow, which answers after SLOW_DELAY
SLOW_DELAY = 0.8
SLOW_PORT = 9004


def _mixer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixer.cli", *args], capture_output=True,
                          text=True, timeout=60, check=True)


def _start_mixer(hub: Path, log: Path) -> subprocess.Popen[bytes]:
    read, write = os.pipe()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mixer.cli", "start", str(hub),
                                 "--ready-fd", str(write)], stdout=out, stderr=out,
                                pass_fds=(write,))
    os.close(write)
    r, _, _ = select.select([read], [], [], 60)
    ready = os.read(read, 64) if r else b""
    os.close(read)
    if b"ready" not in ready:
        proc.kill()
        raise RuntimeError(f"the Mixer did not start (see {log})")
    return proc


def _rig(shipped: str, rack: str, passport: Path, edit: dict[str, Any]) -> Path:
    doc = yaml.safe_load(shipped_rig(shipped).read_text())
    doc["rack"] = {**doc["rack"], "id": rack, "data_dir": str((ROOT / rack).resolve())}
    doc["mixer"] = {"passport": str(passport.resolve())}
    doc["telemetry"] = {"interval": 1.0}  # no Prometheus port: the other demos use theirs
    for s in doc["egress"]["streams"]:
        s["subjects"] = [x.replace(f"fluxrig.{doc['rack']['id']}.", f"fluxrig.{rack}.")
                         for x in s["subjects"]]
    doc.update(edit)
    path = ROOT / f"{rack}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def _count(url: str, user: str, password: str, stream: str) -> int:
    import nats

    try:
        nc = await nats.connect(url, user=user, password=password, connect_timeout=2,
                                allow_reconnect=False, error_cb=_quiet)
    except Exception:
        return -1  # the hub is down
    try:
        return (await nc.jetstream().stream_info(stream)).state.last_seq
    except Exception:
        return -1
    finally:
        await nc.close()


async def _quiet(exc: Exception) -> None:
    """nats-py prints every connection error; a hub that is down is expected here."""


async def _hub_ids(url: str, password: str, stream: str) -> tuple[int, int]:
    """(messages, distinct frame ids) of a hub stream."""
    import nats

    nc = await nats.connect(url, user="admin", password=password)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        ids = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            ids.add(decode((await js.get_msg(stream, seq)).data).id)
        return info.state.messages, len(ids)
    finally:
        await nc.close()


class _Side:
    """An event loop in a thread: the load generator's progress callback runs inside its own
    loop and cannot start another one there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coro: Coroutine[Any, Any, int]) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def run() -> int:
    """The fleet demo; 0 when every rack event is at the hub exactly once."""
    from engine.demo import start_issuer_simulator
    from gears.iso8583.codec import spec_by_name
    from gears.iso8583.framing import FramingConfig
    from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    hub = ROOT / "hub"
    port, leaf = free_port(), free_port()
    _mixer("init", str(hub), "--host", "127.0.0.1", "--port", str(port),
           "--leaf-port", str(leaf))
    console_port = free_port()
    with open(hub / "mixer.yaml", "a") as f:
        f.write(f"console: {{enabled: true, host: 127.0.0.1, port: {console_port}}}\n")
    console_password = secrets.token_urlsafe(12)
    Credentials(hub).set_user("demo", console_password, "admin")
    log = ROOT / "mixer.out"
    mixer = _start_mixer(hub, log)
    hub_url = f"nats://127.0.0.1:{port}"
    admin = json.loads((hub / "nats-users.json").read_text())["admin"]
    print(f"Mixer: hub {hub_url}, racks link over TLS to 127.0.0.1:{leaf} (data: {hub})")
    print(f"Mixer console: http://127.0.0.1:{console_port}/  user demo, password "
          f"{console_password} (admin)")
    for rack, role in (("switch", "payments"), ("plant", "plant")):
        _mixer("rack", "add", str(hub), rack, "--label", f"role={role}",
               "--out", str(ROOT / f"{rack}.passport"))
    switch_doc = yaml.safe_load(shipped_rig("iso8583-switch.yaml").read_text())
    sw = switch_doc["pipelines"][0]["source"]["settings"]
    sw["issuers"]["issuer-slow"] = {**sw["issuers"]["issuer-b"], "port": SLOW_PORT}
    sw["groups"]["discover"] = {"endpoints": ["issuer-slow"], "strategy": "failover"}
    sw["routes"].append({"name": "discover", "bins": ["6011"], "group": "discover"})
    otlp = _OtlpSink()
    switch_rig = _rig("iso8583-switch.yaml", "switch", ROOT / "switch.passport",
                      {"pipelines": switch_doc["pipelines"],
                       "telemetry": {"interval": 1.0, "otlp": {"endpoint": otlp.url}}})
    plant_doc = yaml.safe_load(shipped_rig("demo.yaml").read_text())
    source = plant_doc["pipelines"][0]["source"]
    source["settings"].update(rate=400, count=int(400 * (SECONDS - 4)))
    plant_rig = _rig("demo.yaml", "plant", ROOT / "plant.passport",
                     {"pipelines": plant_doc["pipelines"]})
    racks: dict[str, Any] = {}
    issuer = slow = None
    try:  # a child that cannot start must not leave the others running (and their ports)
        issuer = start_issuer_simulator(["--port", "9001", "--port", "9002", "--port",
                                         "9003", "--rule", "4=00", "--rule", "5=05"], 3)
        slow = start_issuer_simulator(["--port", str(SLOW_PORT), "--delay", str(SLOW_DELAY)],
                                      1)
        for name, rig in (("switch", switch_rig), ("plant", plant_rig)):
            racks[name] = start_rack(rig, workers=1)
    except BaseException:
        _stop_all(racks, (issuer, slow, mixer))
        raise
    print("racks 'switch' (ISO 8583, role=payments) and 'plant' (generator, role=plant) "
          "started and linked")
    streams = {"switch": "TXN", "plant": "DEMO"}
    try:
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=8583, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=20, rate=TPS, duration=SECONDS,
            grace=7.0, mix=(MixEntry(pan="4761739001010119", amount=2_500, weight=40),
                            MixEntry(pan="5500000000000004", amount=9_000, weight=9),
                            MixEntry(pan=SLOW_PAN, amount=7_500, weight=1))))
        t0 = time.monotonic()
        events: list[str] = []
        side = _Side()

        def local(rack: str) -> int:
            data = ROOT / rack
            auth = load_auth(data)
            url = json.loads((data / "state.json").read_text())["nats_url"]
            assert auth is not None
            return side.call(_count(url, auth.user, auth.password, streams[rack]))

        def at_hub(rack: str) -> int:
            return side.call(_count(hub_url, "admin", admin, f"{streams[rack]}_{rack}"))

        print(f"{'t(s)':>5} {'answered':>9} {'switch events':>14} {'at hub':>7} "
              f"{'plant events':>13} {'at hub':>7}  hub")
        down = killed = False

        def progress(g: LoadGenerator) -> None:
            nonlocal mixer, down, killed
            t = time.monotonic() - t0
            if not killed and t >= KILL_AT:
                killed = True
                hub_pid = json.loads((hub / "state.json").read_text())["hub_pid"]
                os.kill(hub_pid, signal.SIGKILL)  # the hub's nats-server first, then the
                mixer.send_signal(signal.SIGKILL)  # Mixer (its registry goes with it)
                mixer.wait()
                down = True
                events.append(f"{t:5.1f} hub killed (SIGKILL)")
            elif down and t >= KILL_AT + DOWN_FOR:
                mixer = _start_mixer(hub, log)
                down = False
                events.append(f"{time.monotonic() - t0:5.1f} hub started again")
            print(f"{t:5.1f} {g.report.received:9,} {local('switch'):14,} "
                  f"{at_hub('switch') if not down else '-':>7} {local('plant'):13,} "
                  f"{at_hub('plant') if not down else '-':>7}  "
                  f"{'DOWN' if down else 'up'}", flush=True)

        gen.progress = progress
        summary = asyncio.run(gen.run()).summary()
        for line in events:
            print(line)
        # an answer leaves once its audit event is in the rack's ring, not yet in its stream
        # (egress publishes it a moment later): read the rack's count once the last one got
        # there, or a run ending in that moment reports one event short (a CI clone did)
        t1 = time.monotonic()
        while local("switch") < summary["received"] and time.monotonic() - t1 < 30:
            time.sleep(0.1)  # another process's stream, no event to await
        wanted = {rack: local(rack) for rack in racks}
        t1 = time.monotonic()
        while any(at_hub(r) < wanted[r] for r in racks) and time.monotonic() - t1 < 60:
            time.sleep(0.2)  # catching up: another process's stream, no event to await
        print(f"all at the hub {time.monotonic() - t1:.1f} s after the load ended")
        print(_mixer("racks", str(hub)).stdout, end="")
        ok = True
        print()
        for rack in racks:
            count, distinct = asyncio.run(_hub_ids(hub_url, admin, f"{streams[rack]}_{rack}"))
            good = count == distinct == wanted[rack]
            ok &= good
            print(f"{rack:<7} events stored on the rack {wanted[rack]:>7,}   at the hub "
                  f"{count:>7,}   distinct {distinct:>7,}   {'exactly once' if good else 'MISMATCH'}")
        answered = summary["received"]
        ok &= wanted["switch"] == answered and summary["lost"] == 0
        print(f"switch transactions answered {answered:,} (lost {summary['lost']}), "
              f"audit events {wanted['switch']:,}")
        ok &= _audit(hub, {streams[r]: (r, wanted[r]) for r in racks})
        ok &= _slowest(hub, otlp)
        for rack, run_ in racks.items():
            run_.proc.send_signal(signal.SIGTERM)
            ok &= run_.proc.wait(60) == 0
        print("OK: every rack event is at the hub and in the audit trail exactly once, "
              "through a hub kill" if ok else "FAILED")
        print(f"try: mixer audit query {hub} \"select de39, count(*) from txn group by 1\"\n"
              f"     mixer audit report daily {hub}\n     mixer audit verify {hub}\n"
              f"     mixer logs {hub} --rack switch --since 10m --level warning")
        if ok and sys.stdin.isatty():
            input(f"the Mixer console is still up at http://127.0.0.1:{console_port}/ "
                  f"(user demo, password {console_password}); press Enter to stop it ")
        return 0 if ok else 1
    finally:
        _stop_all(racks, (issuer, slow, mixer))
        otlp.close()


def _stop_all(racks: dict[str, Any], procs: tuple[subprocess.Popen[bytes] | None, ...]) -> None:
    """Kill the racks still running; SIGTERM (then kill) the other children."""
    for run_ in racks.values():
        if run_.proc.poll() is None:
            run_.proc.kill()
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _audit(hub: Path, wanted: dict[str, tuple[str, int]]) -> bool:
    """Wait for the archiver to hold every event, then query and verify the trail."""
    from mixer.auditfiles import AUDIT_DIR, load_index

    t1 = time.monotonic()
    while time.monotonic() - t1 < 60 and any(
            load_index(hub / AUDIT_DIR, stream, rack).last < n
            for stream, (rack, n) in wanted.items()):
        time.sleep(0.2)  # another process's files: no event to await
    print(f"all in the audit trail {time.monotonic() - t1:.1f} s later")
    print(f"\n$ mixer audit query {hub} \"select rack, stream, count(*) as events, "
          f"count(distinct event_id) as ids from events group by all order by 1\"")
    query = subprocess.run([sys.executable, "-m", "mixer.cli", "audit", "query", str(hub),
                            "select rack, stream, count(*) as events, count(distinct "
                            "event_id) as ids from events group by all order by 1", "--json"],
                           capture_output=True, text=True, timeout=60)
    rows = json.loads(query.stdout or "[]")
    good = {(r["stream"], r["rack"]): r for r in rows}
    ok = query.returncode == 0 and all(
        good.get((s, r), {}).get("events") == good.get((s, r), {}).get("ids") == n
        for s, (r, n) in wanted.items())
    for r in rows:
        print(f"{r['rack']:<8} {r['stream']:<6} {r['events']:>8,} events {r['ids']:>8,} ids")
    print(f"\n$ mixer audit query {hub} \"select de39, count(*), sum(amount) from txn "
          f"group by 1 order by 1\"")
    print(subprocess.run([sys.executable, "-m", "mixer.cli", "audit", "query", str(hub),
                          "select de39, count(*), sum(amount) from txn group by 1 order by 1"],
                         capture_output=True, text=True, timeout=60).stdout, end="")
    print(f"\n$ mixer audit verify {hub}")
    verify = subprocess.run([sys.executable, "-m", "mixer.cli", "audit", "verify", str(hub)],
                            capture_output=True, text=True, timeout=300)
    print(verify.stdout + verify.stderr, end="")
    return ok and verify.returncode == 0


class _OtlpSink:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf): the trace ids it got."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.trace_ids: set[str] = set()
        self.requests = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = ExportTraceServiceRequest()
                try:
                    req.ParseFromString(body)
                except Exception:
                    self.send_response(400)
                    self.end_headers()
                    return
                sink.requests += 1
                sink.trace_ids.update(s.trace_id.hex() for rs in req.resource_spans
                                      for ss in rs.scope_spans for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _traces_json(hub: Path, key: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "mixer.cli", "traces", str(hub), key, "--limit",
                          "1", "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else []


def _slowest(hub: Path, otlp: _OtlpSink) -> bool:
    """Find the slowest transaction in the audit trail whose trace reached the hub, and show
    where its time went (``mixer traces``). Spans are telemetry, sent fire and forget: the
    ones sent while the hub was down are lost at the hub (the audit trail has every
    transaction, and the OTLP endpoint, which the rack reaches directly, has their spans).
    True when a slow trace is found, its issuer leg holds its time, and every slow
    transaction's trace reached the OTLP endpoint."""
    sql = ("select terminal, stan, event_id, latency_us, ts from txn where outcome = "
           f"'answered' and latency_us > {int(SLOW_DELAY * 0.9e6)} order by latency_us desc")
    print(f"\n$ mixer audit query {hub} \"{sql}\"")
    query = subprocess.run([sys.executable, "-m", "mixer.cli", "audit", "query", str(hub), sql,
                            "--json"], capture_output=True, text=True, timeout=60)
    rows = json.loads(query.stdout or "[]")
    if not rows:
        print("no slow transaction in the audit trail")
        return False
    print(f"{len(rows)} slow transactions, the slowest {rows[0]['latency_us'] / 1000:.1f} ms")
    newest = max(rows, key=lambda r: r["ts"])
    t1 = time.monotonic()
    while not _traces_json(hub, f"{newest['terminal']}:{newest['stan']}") \
            and time.monotonic() - t1 < 20:
        time.sleep(0.5)  # the trace store writes what it got every few seconds
    lost = 0
    for row in rows:
        key = f"{row['terminal']}:{row['stan']}"
        found = _traces_json(hub, key)
        if found:
            break
        lost += 1
    else:
        print("no slow transaction's trace reached the hub")
        return False
    if lost:
        print(f"(the {lost} slower ones ran while the hub was down: their spans, sent fire and "
              f"forget, did not reach it)")
    print(f"\n$ mixer traces {hub} {key}")
    shown = subprocess.run([sys.executable, "-m", "mixer.cli", "traces", str(hub), key,
                            "--limit", "1"], capture_output=True, text=True, timeout=60)
    print(shown.stdout + shown.stderr, end="")
    spans = found[0]["spans"]
    issuer = [s for s in spans if s.get("name") == "issuer answer"]
    ok = bool(issuer) and (issuer[0]["end_ns"] - issuer[0]["start_ns"]) >= SLOW_DELAY * 0.9e9
    print(f"the issuer leg took {(issuer[0]['end_ns'] - issuer[0]['start_ns']) / 1e6:.1f} ms "
          f"of it" if issuer else "no issuer leg in the trace")
    wanted = {str(r["event_id"]).replace("-", "").lower() for r in rows}
    got = wanted <= otlp.trace_ids
    print(f"the OTLP endpoint {otlp.url} got {len(otlp.trace_ids):,} traces in "
          f"{otlp.requests:,} requests: {'every' if got else 'NOT every'} slow transaction's "
          f"among them ({len(wanted & otlp.trace_ids)} of {len(wanted)})")
    return ok and got


if __name__ == "__main__":
    sys.exit(run())
