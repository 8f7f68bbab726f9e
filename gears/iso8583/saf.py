"""Store-and-forward reversals: building them (pure) and delivering them (a JetStream worker).

Theory of operation
-------------------
When the switch cannot prove an issuer's decision reached the acquirer — a timeout, an
acquirer gone before the answer, a process killed with requests in flight — it owes the
issuer a reversal (0400). The reversal is prepared when the request is forwarded: the
request's MTI and the fields a reversal copies (``reversal.REVERSAL_FIELDS``), the card
number sealed with the key ring (shared memory and JetStream never see it in clear; track
data and PIN blocks are not kept at all), and ``reversal_doc`` turns them into the 0400
(DE90 = original data elements) when it is sent. The sealed *item* waits in the in-flight journal and, once owed, becomes a
frame on the switch's ``saf`` outlet ring; the rack's egress publishes it to the SAF work
queue stream with ``Nats-Msg-Id`` = the transaction id — acked, de-duplicated, retried for as
long as NATS is away. Nothing here publishes a reversal itself.

Every switch process runs a ``SafSender`` on one durable pull consumer of that stream: items
are spread over the replicas and survive rack restarts. The sender takes up to ``WINDOW``
items at a time; for each it asks the switch for a live link of the item's issuer (none:
``nak`` with the retry interval) and sends the reversal (0401 from the second attempt on, as
ISO 8583 asks for repeats); then it waits ``retry_interval`` for their 0410s together: each
answered item is ``ack``ed (the work queue deletes it), the others ``nak``ed. An item
delivered more than ``retry_limit`` times, or older than ``expire_after`` seconds, is copied to
``fluxrig.<rack>.saf.dead`` (stream ``<stream>_DEAD``) and only then acked: the dead-letter
copy is stored before the original goes. Items go out one at a time with ``inter_delay``
between them, not to flood an issuer that just came back. The stream itself belongs to
egress (it creates it, and recreates it if it disappears); the sender re-creates its
consumer when the stream comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from engine.counters import Stats
from engine.frame import FrameError, decode
from engine.logutil import RateLimitedLog, escape
from engine.streams import StreamConfig, ensure_stream
from gears.coatcheck import KeyRing, VaultError
from gears.iso8583.codec import CodecError
from gears.iso8583.matcher import DEFAULT_KEY, match_key
from gears.iso8583.reversal import reversal_doc

log = logging.getLogger("fluxrig.iso.saf")

CONSUMER_CHECK = 5.0  # seconds of an empty queue between checks that the consumer exists
WINDOW = 32  # reversals out at once per sender

def dead_letter_stream(name: str, rack_id: str) -> StreamConfig:
    """The dead-letter stream next to work queue ``name`` (its sender creates it)."""
    return StreamConfig(name=f"{name}_DEAD", subjects=(f"fluxrig.{rack_id}.saf.dead",))


def queue_subject(rack_id: str) -> str:
    """The subject of the SAF work queue of ``rack_id``."""
    return f"fluxrig.{rack_id}.saf.q"


class ReversalLinks(Protocol):
    """What the sender needs from its switch: send a reversal on a live link."""

    def send_reversal(self, issuer: str, doc: Mapping[str, str]) -> bool:
        """Send ``doc`` to ``issuer``; False when no link of the issuer is up.

        Raises:
            gears.iso8583.codec.CodecError: the document does not encode for the issuer.
        """


class SafSender:
    """Delivers queued reversals to issuers until cancelled (one per switch process)."""

    def __init__(self, js: JetStreamContext, *, stream: str, rack_id: str,
                 retry_interval: float, retry_limit: int, expire_after: float,
                 inter_delay: float, keyring: Callable[[], KeyRing], links: ReversalLinks,
                 stats: Stats, key_fields: tuple[str, ...] = DEFAULT_KEY):
        self.js = js
        self.stream = stream
        self.rack_id = rack_id
        self.retry_interval = retry_interval
        self.retry_limit = retry_limit
        self.expire_after = expire_after
        self.inter_delay = inter_delay
        self.keyring = keyring
        self.links = links
        self.stats = stats
        self.key_fields = key_fields
        self.dead_subject = f"fluxrig.{rack_id}.saf.dead"
        self.pending: dict[str, asyncio.Future[str]] = {}
        self.ratelog = RateLimitedLog(log)
        self._st_sent = stats.slot("saf.sent")
        self._st_dead = stats.slot("saf.dead")
        self._st_errors = stats.slot("iso8583.errors")
        self._sub: JetStreamContext.PullSubscription | None = None

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """The durable pull consumer, created once the stream exists (egress creates it)."""
        while True:
            try:
                await ensure_stream(self.js, dead_letter_stream(self.stream, self.rack_id))
                return await self.js.pull_subscribe(
                    queue_subject(self.rack_id), durable="saf", stream=self.stream,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                          ack_wait=self.retry_interval * 4 + 5))
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, OSError) as exc:
                self.ratelog.warning("subscribe", "saf consumer not ready, retrying: "
                                     "stream=%s, error=%r", self.stream, exc)
                await asyncio.sleep(1.0)

    def on_response(self, key: str, de39: str) -> bool:
        """A 04x0 from an issuer: True if it answers a reversal this sender waits for."""
        fut = self.pending.pop(key, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(de39)
        return True

    async def run(self) -> None:
        """Deliver queued reversals until cancelled; never gives up on an item."""
        checked = time.monotonic()
        while True:
            if self._sub is None:
                self._sub = await self._subscribe()
                checked = time.monotonic()
            try:
                msgs = await self._sub.fetch(WINDOW, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, OSError) as exc:
                if not isinstance(exc, nats.errors.TimeoutError):
                    await asyncio.sleep(0.5)  # NATS reconnecting
                # nothing queued - or our consumer went with its stream (a fetch from a
                # consumer that no longer exists only times out): look now and then
                if time.monotonic() - checked > CONSUMER_CHECK:
                    checked = time.monotonic()
                    if not await self._consumer_exists():
                        self.ratelog.error("gone", "saf consumer gone (stream deleted?), "
                                           "re-creating: stream=%s", self.stream)
                        self._sub = None
                continue
            checked = time.monotonic()
            await self._deliver(msgs)

    async def _consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(self.stream, "saf")
            return True
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, OSError):
            return True  # cannot tell now (NATS away): keep the subscription

    async def _deliver(self, msgs: list[Msg]) -> None:
        """Send a window of reversals (``inter_delay`` apart), then wait ``retry_interval``
        for their answers together: one hung issuer costs each item one interval per round,
        and no item waits behind another's retries."""
        waiting: list[tuple[Msg, str, asyncio.Future[str]]] = []
        for msg in msgs:
            try:
                sent = await self._send(msg)
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, OSError, CodecError, VaultError, FrameError, KeyError,
                    TypeError, ValueError) as exc:
                self.stats.add(self._st_errors)
                self.ratelog.error("deliver", "saf delivery error, will retry: error=%r", exc)
                await self._nak(msg)
                continue
            if sent is not None:
                waiting.append((msg, *sent))
            if self.inter_delay:
                await asyncio.sleep(self.inter_delay)
        if not waiting:
            return
        await asyncio.wait([f for _, _, f in waiting], timeout=self.retry_interval)
        for msg, key, fut in waiting:
            if fut.done():
                await msg.ack()
                self.stats.add(self._st_sent)
            else:
                if self.pending.get(key) is fut:
                    del self.pending[key]
                await self._nak(msg)

    async def _nak(self, msg: Msg) -> None:
        try:
            await msg.nak(delay=self.retry_interval)
        except nats.errors.Error:
            pass  # redelivered after ack_wait anyway

    async def _send(self, msg: Msg) -> tuple[str, asyncio.Future[str]] | None:
        """Dead-letter, put back (no live link) or send one item; (key, answer) if sent."""
        item = decode(msg.data).body
        attempt = msg.metadata.num_delivered
        if attempt > self.retry_limit or time.time() - item["created"] > self.expire_after:
            why = "retries exhausted" if attempt > self.retry_limit else "expired"
            await self.js.publish(self.dead_subject, msg.data,
                                  headers={"Nats-Msg-Id": item["id"]})
            await msg.ack()
            self.stats.add(self._st_dead)
            log.error("reversal dead-lettered: item=%s, issuer=%s, key=%s, reason=%s",
                      item["id"], item["issuer"], escape(item["key"]), why)
            return None
        original = {**item["doc"], **self.keyring().open(item["id"], item["sealed"])}
        doc = reversal_doc(original, original["t"])
        if attempt > 1:
            doc["t"] = doc["t"][:3] + "1"  # 0401: a repeat
        key = match_key(doc, self.key_fields)
        if key in self.pending:  # another reversal with the same key is out: next round
            await self._nak(msg)
            return None
        if not self.links.send_reversal(item["issuer"], doc):
            await self._nak(msg)  # no live link to that issuer
            return None
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        return key, fut
