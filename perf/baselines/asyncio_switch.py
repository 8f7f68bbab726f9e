"""Baseline: a plain single-process asyncio ISO 8583 switch built directly on pyiso8583.

What a competent engineer writes first: asyncio streams, ``iso8583.decode``/``encode`` on both
legs, a BIN-prefix route table, a small pool of persistent issuer connections, responses
matched to requests by DE41 + DE11 through futures, a per-request timeout answered DE39 "91".
No fluxrig code is used, so ``perf/switch_bench.py`` compares like with like.

    python perf/baselines/asyncio_switch.py --port 8600 --route 4=127.0.0.1:9001 ...
"""

from __future__ import annotations

import argparse
import asyncio
import copy

import iso8583
from iso8583.specs import default as SPEC


async def read_msg(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(size)


def frame(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


class IssuerPool:
    def __init__(self, host: str, port: int, size: int):
        self.host, self.port, self.size = host, port, size
        self.writers: list[asyncio.StreamWriter] = []
        self.pending: dict[str, asyncio.Future] = {}
        self.next = 0

    async def connect(self) -> None:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.writers.append(writer)
            asyncio.get_running_loop().create_task(self._reader(reader))

    async def _reader(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await read_msg(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            doc, _ = iso8583.decode(raw, SPEC)
            fut = self.pending.pop(doc.get("41", "") + "|" + doc.get("11", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(doc)

    async def request(self, doc: dict, timeout: float) -> dict | None:
        key = doc.get("41", "") + "|" + doc.get("11", "")
        fut = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        raw, _ = iso8583.encode(copy.copy(doc), SPEC)
        self.next = (self.next + 1) % len(self.writers)
        self.writers[self.next].write(frame(bytes(raw)))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.pending.pop(key, None)
            return None


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8600)
    ap.add_argument("--route", action="append", default=[], help="BIN=host:port")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    routes = []
    for r in args.route:
        bin_, _, hp = r.partition("=")
        host, _, port = hp.partition(":")
        pool = IssuerPool(host, int(port), args.connections)
        await pool.connect()
        routes.append((bin_, pool))

    async def handle(doc: dict, writer: asyncio.StreamWriter) -> None:
        pool = next((p for b, p in routes if doc.get("2", "").startswith(b)), None)
        resp = await pool.request(doc, args.timeout) if pool else None
        if resp is None:
            resp = {k: v for k, v in doc.items() if k not in ("p", "1")}
            resp["t"] = doc["t"][:2] + str(int(doc["t"][2]) + 1) + doc["t"][3:]
            resp["39"] = "91" if pool else "92"
        out, _ = iso8583.encode({k: v for k, v in resp.items() if k not in ("p", "1")}, SPEC)
        writer.write(frame(bytes(out)))

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                raw = await read_msg(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            doc, _ = iso8583.decode(raw, SPEC)
            loop.create_task(handle(doc, writer))

    server = await asyncio.start_server(client, args.host, args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
