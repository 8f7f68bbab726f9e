"""Outlets: a gear's synchronous, counted way to put frames into a ring.

A source normally hands frames to ``emit`` (asyncio; the rack picks the lane and waits on a
full ring). A gear that must *know* a frame is recorded before it acts — the switch writes a
transaction's audit event before the answer leaves the process — writes through an
``Outlet`` instead: ``try_write`` either puts the records in shared memory now or returns
how many it could (a full ring is a return value; the gear applies backpressure), and
``wait_space`` waits on the ring's space doorbell without blocking the event loop.

A gear may also declare extra outlets (``OutletSpec``): the supervisor creates one ring per
lane for each and the egress process publishes what arrives in it to the outlet's subject in
the outlet's stream (the switch's reversals go to the SAF work queue this way: one way out
to JetStream, acked and de-duplicated by frame id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.counters import Counters
from engine.ring import Producer, record_size
from engine.streams import StreamConfig

MAIN = "out"  # the outlet name of a replicated source's own lane
WAKE_INTERVAL = 0.02  # seconds: the longest a published record waits for its consumer


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletSpec:
    """An extra output declared by a gear: a ring per lane, published by egress.

    Attributes:
        name: the outlet's name in the gear (``saf``).
        subject: the subject egress publishes its frames on.
        stream: the stream that captures ``subject`` (egress creates it, recreates it if it
            disappears, and owns its configuration).
    """

    name: str
    subject: str
    stream: StreamConfig


class Outlet:
    """The writing side of one ring, counting frames and bytes out in the owner's counters.

    Records are published (in shared memory, durable against a crash of the writer) as soon
    as ``try_write`` returns; the consumer is *woken* lazily: when ``wake_every`` records
    are waiting, or when the owner calls ``wake_pending`` (a timer, ``WAKE_INTERVAL``). A
    gear writing one decision at a time thus does not cost its consumer (egress) a wake-up
    and a small batch per decision.
    """

    __slots__ = ("name", "producer", "pending", "wake_every", "_counters")

    def __init__(self, name: str, producer: Producer, counters: Counters | None,
                 wake_every: int = 256):
        self.name = name
        self.producer = producer
        self.pending = 0  # records published since the consumer was last woken
        self.wake_every = wake_every
        self._counters = counters

    def try_write(self, payloads: Sequence[bytes]) -> int:
        """Publish as many of ``payloads`` (encoded frames) as fit now; returns how many.

        Raises:
            engine.ring.RecordTooLargeError: a payload can never fit (none after it written).
        """
        n = self.producer.try_write(payloads, wake=False)
        if n:
            if self._counters is not None:
                self._counters.count_batch(0, n, 0, sum(map(len, payloads[:n])))
            self.pending += n
        if n < len(payloads):  # full: the consumer must drain us now
            self.pending = 0
            self.producer.wake()
        elif self.pending >= self.wake_every:  # a batch is worth a wake-up
            self.wake_pending()
        return n

    def wake_pending(self) -> None:
        """Wake the consumer if records wait since the last wake-up."""
        if self.pending:
            self.pending = 0
            self.producer.wake()

    async def wait_space(self, payload_len: int, timeout: float) -> bool:
        """Wait until a record of ``payload_len`` bytes fits; True if it does."""
        return await self.producer.wait_free_async(2 * record_size(payload_len), timeout)
