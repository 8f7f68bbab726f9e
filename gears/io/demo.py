"""``scripts/demo --bridge``: HTTP in -> CEL map -> JetStream + a review webhook.

1. the rig tests of ``configs/http-bridge.yaml`` run (``engine test``);
2. a review webhook (plain ``http.server`` in this process, not our code) that checks the
   bearer token, answers 503 to its first two requests (so the sink's retries show) and
   records every frame id it is given;
3. the rack starts on a copy of the rig with free ports (data dir ``var/bridge``);
4. 40 keep-alive clients POST 3,000 events: one in three a decline, one in fifty test
   traffic, one in five hundred without an amount (the map cannot compute it: a dead
   letter), each with a card number; plus a request without the token (401) and one with
   broken JSON (400 with the byte offset);
5. once the webhook has every decline and large amount, the rack drains; then the stream is
   read back: every accepted event that is not test traffic nor a dead letter is in
   JetStream exactly once, no card number is in JetStream, the webhook or the dead letters.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cbor2
import yaml

from engine.harness import read_store, start_rack
from engine.natsd import free_port
from engine.rigs import shipped_rig
from engine.rigtest import run_file

ROOT = Path("var/bridge")
EVENTS = 3000
CLIENTS = 40
PANS = ("4761739001010119", "5500005555555559", "4111111111111111")


class Webhook:
    """The review endpoint: a bearer token, two 503s first, every frame id recorded."""

    def __init__(self, token: str):
        self.token = token
        self.ids: dict[str, int] = {}
        self.bodies: list[bytes] = []
        self.refused = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Authorization") != f"Bearer {hook.token}":
                    self._answer(401)
                    return
                with hook.lock:
                    if hook.refused < 2:
                        hook.refused += 1
                        self._answer(503)
                        return
                    hook.bodies.append(body)
                    for frame in json.loads(body):
                        hook.ids[frame["id"]] = hook.ids.get(frame["id"], 0) + 1
                    hook.changed.notify_all()
                self._answer(200)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, ids: set[str], timeout: float) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: ids <= self.ids.keys(), timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _event(i: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "merchant_id": f"M-{i % 17}", "amount_minor": 1000 + (i * 7919) % 1_500_000,
        "rc": "05" if i % 3 == 1 else "00", "card_brand": ("visa", "mc")[i % 2],
        "country": ("de", "fr", "it")[i % 3], "ts_ns": time.time_ns(), "fees": [i % 7, 3],
        "pan": PANS[i % len(PANS)],
    }
    if i % 50 == 0:
        event["test"] = True
    if i % 500 == 7:
        del event["amount_minor"]
    return event


def _to_review(event: dict[str, Any]) -> bool:
    return "amount_minor" in event and not event.get("test") and (
        event["rc"] != "00" or event["amount_minor"] > 1_000_000)


async def _post_all(port: int, token: str) -> tuple[dict[int, str], list[str]]:
    """Every event POSTed; returns {event: frame id} of the 200s and the odd answers."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/events"
    ids: dict[int, str] = {}
    notes: list[str] = []
    todo = list(range(EVENTS))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as s:
        async def client() -> None:
            while todo:
                i = todo.pop()
                for _ in range(50):  # 429/503 say when to come back
                    async with s.post(url, json=_event(i), headers={
                            **auth, "X-Request-Id": f"r-{i}"}) as r:
                        text = await r.text()
                        if r.status == 200:
                            ids[i] = json.loads(text)["ids"][0]
                            break
                        if r.status in (429, 503):
                            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                            continue
                        notes.append(f"event {i}: {r.status} {text}")
                        break

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        async with s.post(url, json=_event(0)) as r:
            notes.append(f"without the token: {r.status} "
                         f"(WWW-Authenticate: {r.headers.get('WWW-Authenticate')})")
        async with s.post(url, data=b'{"amount_minor": 12, "rc": "0', headers={
                **auth, "Content-Type": "application/json"}) as r:
            notes.append(f"broken JSON: {r.status} {await r.text()}")
    return ids, notes


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    rig_src = shipped_rig("http-bridge.yaml")
    tests = shipped_rig("http-bridge.tests.yaml")
    print(f"1. rig tests: engine test {rig_src} {tests}")
    if run_file(tests, rig_src, lambda line: print(f"   {line}")) != 0:
        return 1

    token, review_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    hook = Webhook(review_token)
    cfg = yaml.safe_load(rig_src.read_text())
    cfg["rack"]["data_dir"] = str((ROOT / "data").resolve())
    cfg["telemetry"]["prometheus"]["port"] = 0
    source = cfg["pipelines"][0]["source"]["settings"]
    source["port"] = free_port()
    review = cfg["pipelines"][0]["sinks"][1]["settings"]
    review["url"] = f"http://127.0.0.1:{hook.port}/review"
    rig = ROOT / "rig.yaml"
    rig.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.environ.update(BRIDGE_TOKEN=token, REVIEW_TOKEN=review_token)
    print(f"2. review webhook on 127.0.0.1:{hook.port} (answers 503 twice first)")
    rack = start_rack(rig, workers=2)
    print(f"3. rack 'bridge' ready: POST http://127.0.0.1:{source['port']}/events")
    ok = True
    try:
        t0 = time.monotonic()
        ids, notes = asyncio.run(_post_all(source["port"], token))
        took = time.monotonic() - t0
        print(f"4. {len(ids)} of {EVENTS} events answered 200 in {took:.1f} s "
              f"({len(ids) / took:,.0f}/s; ack: durable, each in JetStream before its 200)")
        for note in notes:
            print(f"   {note}")
        events = {i: _event(i) for i in range(EVENTS)}
        want_review = {ids[i] for i, e in events.items() if i in ids and _to_review(e)}
        got_all = hook.wait_for(want_review, 60)
        print(f"   review webhook: {len(hook.ids)} events ({len(want_review)} expected), "
              f"{'all' if got_all else 'NOT all'} there")
        ok &= got_all and len(ids) == EVENTS
    finally:
        code = rack.stop()
        hook.close()
    print(f"5. rack drained (exit {code})")
    ok &= code == 0
    data = ROOT / "data"
    store = read_store(data, "bridge", "EVENTS", "fluxrig.bridge.>")
    stored = [cbor2.loads(m) for _, m in store.messages]
    stored_ids = [str(uuid.UUID(bytes=f["id"])) for f in stored]
    want_js = {ids[i] for i, e in events.items()
               if i in ids and not e.get("test") and "amount_minor" in e}
    dead = data / "deadletter" / "events.normalise.cbor"
    letters = dead.read_bytes() if dead.exists() else b""
    n_dead = _count(letters)
    want_dead = sum(1 for e in events.values() if "amount_minor" not in e and not e.get("test"))
    leaks = [p for p in PANS if any(p.encode() in m for _, m in store.messages)
             or any(p.encode() in b for b in hook.bodies) or p.encode() in letters]
    checks = [
        ("JetStream holds every accepted event but test traffic and dead letters, once",
         set(stored_ids) == want_js and len(stored_ids) == len(want_js)),
        ("declines and large amounts reached the webhook", want_review <= hook.ids.keys()),
        (f"dead letters: {n_dead} (events without an amount: {want_dead})", n_dead == want_dead),
        ("no card number in JetStream, the webhook or the dead letters", not leaks),
        ("a request without the token was refused (401)",
         any(n.startswith("without the token: 401") for n in notes)),
        ("broken JSON was refused with its byte offset (400)",
         any(n.startswith("broken JSON: 400") and "offset" in n for n in notes)),
    ]
    print(f"   stream EVENTS: {store.count} messages; sample: "
          f"{json.dumps(_printable(stored[0]) if stored else None)[:300]}")
    for what, passed in checks:
        print(f"   [{'ok' if passed else 'FAIL'}] {what}")
        ok &= passed
    print("bridge demo: OK" if ok else "bridge demo: FAILED")
    return 0 if ok else 1


def _count(letters: bytes) -> int:
    fh, n = io.BytesIO(letters), 0
    while fh.tell() < len(letters):
        cbor2.load(fh)
        n += 1
    return n


def _printable(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in frame.items()}


if __name__ == "__main__":
    raise SystemExit(main())
