"""Store-and-forward reversals over a durable JetStream work queue.

Theory of operation
-------------------
When a request times out the switch answers the acquirer "91", but the issuer may have
approved it: the switch owes the issuer a reversal (0400). ``enqueue`` turns the original
request into a reversal document (MTI 0400, the original's fields, DE90 = original data
elements), seals it with the vault's key ring (the reversal carries the PAN; JetStream never
sees it in clear) and publishes it to the work-queue stream
``<stream>`` on ``fluxrig.<rack>.saf.q.<issuer>`` with ``Nats-Msg-Id`` = the item id, so a
re-publish is stored once.

Every switch process runs a sender (``run``) on one durable pull consumer: items are
spread over the replicas and survive rack restarts. For each item the sender picks a live
link of the item's issuer (none: ``nak`` with the retry interval), sends the reversal
(0401 from the second attempt on, as ISO 8583 asks for repeats) and waits for the 0410 for
``retry_interval``: then ``ack`` (the work queue deletes it) or ``nak`` (redelivered later).
An item delivered more than ``retry_limit`` times, or older than ``expire_after`` seconds,
is moved to ``fluxrig.<rack>.saf.dead`` (a stream of its own) and counted. Items go out one
at a time with ``inter_delay`` between them, not to flood an issuer that just came back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from engine.cbor import dumps, loads
from gears.iso8583.codec import CodecError, decode, encode
from gears.iso8583.matcher import match_key

log = logging.getLogger("fluxrig.iso.saf")

REVERSAL_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "14", "22", "32", "37", "41", "42",
                   "49")


def reversal_doc(original: dict[str, str]) -> dict[str, str]:
    """The 0400 for an original request document (DE90 = original data elements)."""
    doc = {k: v for k, v in original.items() if k in REVERSAL_FIELDS}
    doc["t"] = "0400"
    doc["90"] = (original.get("t", "0000") + original.get("11", "0" * 6).rjust(6, "0")
                 + original.get("7", "0" * 10).rjust(10, "0") + "0" * 22)[:42]
    return doc


class SafQueue:
    """The SAF side of one switch process."""

    def __init__(self, switch: Any, js: Any, rack_id: str):
        self.switch = switch
        self.s = switch.s.saf
        self.js = js
        self.ring = switch.keyring
        self.prefix = f"fluxrig.{rack_id}.saf"
        self.dead_subject = f"{self.prefix}.dead"
        self.pending: dict[str, asyncio.Future] = {}
        self._publishes: set[asyncio.Task] = set()
        self.psub: Any = None

    async def setup(self) -> None:
        """Create (or check) the work-queue stream, the dead-letter stream and the consumer."""
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )

        for cfg in (
            StreamConfig(name=self.s.stream, subjects=[f"{self.prefix}.q.>"],
                         retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE),
            StreamConfig(name=f"{self.s.stream}_DEAD", subjects=[self.dead_subject],
                         storage=StorageType.FILE),
        ):
            try:
                await self.js.add_stream(cfg)
            except Exception as exc:
                if "already in use" not in str(exc):
                    raise
        self.psub = await self.js.pull_subscribe(
            f"{self.prefix}.q.>", durable="saf", stream=self.s.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                  ack_wait=self.s.retry_interval * 4 + 5))

    def enqueue(self, txn: Any, clear_raw: bytes) -> None:
        """Queue the reversal of ``txn`` (its request as the acquirer sent it)."""
        try:
            original = decode(clear_raw, self.switch.acq_spec)
        except CodecError as exc:
            log.error("cannot build reversal: key=%s, error=%s", txn.key, exc)
            return
        item_id = uuid.uuid4().hex
        item = dumps({"id": item_id, "issuer": txn.issuer, "created": time.time(),
                      "key": txn.key, "sealed": self.ring.seal(item_id, reversal_doc(original))})
        task = asyncio.get_running_loop().create_task(self._publish(item_id, txn.issuer, item))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)
        self.switch.stats.reversals_queued += 1

    async def _publish(self, item_id: str, issuer: str, item: bytes) -> None:
        for attempt in range(60):
            try:
                await self.js.publish(f"{self.prefix}.q.{issuer}", item,
                                      headers={"Nats-Msg-Id": item_id})
                return
            except Exception as exc:  # NATS restarting: the item must not be lost
                log.warning("saf enqueue retry: item=%s, attempt=%d, error=%r", item_id,
                            attempt, exc)
                await asyncio.sleep(0.5)
        log.error("saf enqueue failed for good: item=%s", item_id)

    def on_reversal_response(self, issuer: str, key: str, fields: dict[str, str]) -> bool:
        """A 04x0 from an issuer: True if it answers a reversal this process sent."""
        fut = self.pending.pop(key, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(fields)
        return True

    async def run(self) -> None:
        """Deliver queued reversals until cancelled."""
        while True:
            try:
                msgs = await self.psub.fetch(1, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # nothing queued (timeout) or NATS reconnecting
            for msg in msgs:
                try:
                    await self._deliver(msg)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("saf delivery error, will retry: error=%r", exc)
                    await msg.nak(delay=self.s.retry_interval)
            await asyncio.sleep(self.s.inter_delay)

    async def _deliver(self, msg: Any) -> None:
        item = loads(msg.data)
        attempt = msg.metadata.num_delivered
        if attempt > self.s.retry_limit or time.time() - item["created"] > self.s.expire_after:
            why = "retries exhausted" if attempt > self.s.retry_limit else "expired"
            await self.js.publish(self.dead_subject, msg.data,
                                  headers={"Nats-Msg-Id": item["id"]})
            await msg.ack()
            self.switch.stats.reversals_dead += 1
            if self.switch.counters is not None:
                from engine.counters import ERRORS

                self.switch.counters.add(ERRORS)  # visible in engine status and telemetry
            log.error("reversal dead-lettered: item=%s, issuer=%s, key=%s, reason=%s",
                      item["id"], item["issuer"], item["key"], why)
            return
        link = self.switch._pick_link(item["issuer"])
        if link is None:
            await msg.nak(delay=self.s.retry_interval)
            return
        doc = self.ring.open(item["id"], item["sealed"])
        doc["t"] = "0400" if attempt == 1 else "0401"
        raw = encode(doc, link.spec)
        key = match_key(doc, self.switch.s.match_key)
        fut = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        link.send_raw(raw)
        try:
            await asyncio.wait_for(fut, self.s.retry_interval)
        except TimeoutError:
            self.pending.pop(key, None)
            await msg.nak(delay=self.s.retry_interval)
            return
        await msg.ack()
        self.switch.stats.reversals_done += 1
