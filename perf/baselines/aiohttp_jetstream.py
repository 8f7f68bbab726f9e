"""Baseline for ``perf/http_source_bench.py``: the HTTP-to-JetStream ingest one would write
without fluxrig — an aiohttp app with one handler that publishes each request body to
JetStream with nats-py and answers 200 once the PubAck is back.

    python perf/baselines/aiohttp_jetstream.py --port 8080 --nats nats://127.0.0.1:4222 \
        --subject ingest.http --stream INGEST

The stream is created if missing (file storage, like the rack's egress streams). The answer
carries the stream sequence, so the client gets a handle as it does from fluxrig (frame ids).
"""

from __future__ import annotations

import argparse
import asyncio

import nats
from aiohttp import web
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--nats", required=True)
    ap.add_argument("--subject", default="ingest.http")
    ap.add_argument("--stream", default="INGEST")
    args = ap.parse_args()

    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    try:
        await js.stream_info(args.stream)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=args.stream, subjects=[args.subject],
                                         storage="file"))
    subject = args.subject

    async def ingest(request: web.Request) -> web.Response:
        body = await request.read()
        ack = await js.publish(subject, body)
        return web.json_response({"seq": ack.seq})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/", ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
