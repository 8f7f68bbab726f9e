"""The baseline for ``perf/audit_bench.py``: a JetStream-to-Parquet archiver as a careful user
would write it with nats-py, pyarrow and hashlib — no raw protocol, no columnar tricks.

* a durable pull consumer (explicit acks), ``fetch(1000)`` in a loop;
* each message decoded (``engine.cbor.loads``: the fast C decoder, so the baseline is not
  slowed by a codec — cbor2 would be slower still) and flattened into one dict per row with
  the archive's columns (``mixer.auditrow.SCHEMA``); the rack's sequence from the
  ``Nats-Stream-Source`` header, the hub copy's from the message metadata;
* the chain ``h = sha256(h + data)`` per row;
* one ``pa.Table.from_pylist`` and one ``pq.write_table(..., compression="zstd")`` file per
  fetched batch, then ``await m.ack()`` for each message.

It keeps what makes an audit trail an audit trail (every event's bytes, the chain, ack only
after the file is written) and nothing else: no hour partitions, no fsync, no chain index.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.cbor import loads
from mixer.auditrow import SCHEMA

DURABLE = "baseline"
FETCH = 1000
_TEXT = ("mti", "pcode", "currency", "de39", "outcome", "issuer", "route", "token", "stan",
         "terminal", "reason")


def source_seq(headers: dict[str, str] | None, default: int) -> int:
    """The origin stream's sequence from ``Nats-Stream-Source`` (``<stream...> <seq> ...``),
    or ``default`` (a message that was not sourced)."""
    value = (headers or {}).get("Nats-Stream-Source")
    if not value:
        return default
    return int(value.split(" ")[1])


def flatten(data: bytes, rack: str, stream: str, seq: int, hub_seq: int,
            chain: bytes) -> dict[str, Any]:
    """One archive row (``SCHEMA``'s columns) of an event's bytes."""
    ev = loads(data)
    body = ev.get("body") if isinstance(ev.get("body"), dict) else {}
    row: dict[str, Any] = {
        "event_id": ev["id"].hex(), "rack": rack, "stream": stream, "seq": seq,
        "hub_seq": hub_seq, "ts": ev["ts"], "kind": ev["kind"], "src": ev["src"],
        "cbor": data, "chain": chain,
    }
    for key in _TEXT:
        v = body.get(key)
        row[key] = v if isinstance(v, str) else None
    pan = body.get("pan")
    row["pan"] = pan if isinstance(pan, str) else None
    amount = body.get("amount")
    row["amount"] = int(amount) if isinstance(amount, str) and amount.isdigit() else \
        amount if isinstance(amount, int) else None
    lat = body.get("latency_us")
    row["latency_us"] = lat if isinstance(lat, int) else None
    return row


async def run_baseline(url: str, user: str, password: str, stream: str, out_dir: str | Path,
                       total: int, rack: str = "a", name: str = "TXN") -> float:
    """Archive the first ``total`` messages of JetStream ``stream`` into Parquet files under
    ``out_dir`` (one per fetched batch).

    Returns:
        Seconds from connecting to the last batch written and acked.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    nc = await nats.connect(url, user=user, password=password, name="baseline-archiver")
    try:
        js = nc.jetstream()
        await js.add_consumer(stream, ConsumerConfig(
            durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, max_ack_pending=10_000))
        sub = await js.pull_subscribe_bind(durable=DURABLE, stream=stream)
        h = bytes(32)
        done = 0
        while done < total:
            try:
                msgs = await sub.fetch(FETCH, timeout=5)
            except nats.errors.TimeoutError:
                continue
            rows = []
            for m in msgs:
                meta = m.metadata
                hub_seq = meta.sequence.stream
                h = hashlib.sha256(h + m.data).digest()
                rows.append(flatten(m.data, rack, name, source_seq(m.headers, hub_seq),
                                    hub_seq, h))
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            first, last = rows[0]["seq"], rows[-1]["seq"]
            pq.write_table(table, out / f"part-{first}-{last}.parquet", compression="zstd")
            for m in msgs:
                await m.ack()
            done += len(msgs)
        await nc.flush()
        return time.perf_counter() - t0
    finally:
        await nc.close()


__all__ = ["run_baseline"]
