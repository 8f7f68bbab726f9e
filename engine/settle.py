"""Durable acknowledgement for a source: is what it wrote stored in JetStream yet?

Theory of operation
-------------------
Ring positions only grow, and every consumer on the way out commits late:

* a stage worker commits its input batch only after it has published every frame it made
  from it in its output ring(s);
* egress commits its input only after JetStream acked the frames (``engine.egress``).

So for a source that has written its lane ring R0 up to position ``p0``:

1. once R0's head reaches ``p0``, the stage consuming R0 has published every output of those
   frames, so they all lie below R1's tail *read after that moment*: take ``p1 = tail(R1)``;
2. once R1's head reaches ``p1`` ... and so on, level by level;
3. the last level is the rings egress reads (a fan-out stage writes one ring per sink; only
   the egress ones count): once their heads pass, JetStream holds the frames.

A frame a stage dropped has no output, which changes nothing above. A waiter whose
positions were taken later never needs less than one taken earlier, so the ones that arrive
while the last one still waits at level 0 share its entry (its mark raised to theirs): one
entry per tick of the watcher, however many requests wait. Each entry moves on by itself.
Nothing here writes shared memory: a source can watch, it cannot hurry anybody. The chains
are built by the supervisor (``ProcessSpec.settle``); positions survive restarts (they live
in the segments).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.ring import Ring

POLL = 0.001  # seconds between looks while someone waits: egress acks take milliseconds


@dataclass(slots=True)
class _Waiter:
    levels: list[int]  # per chain: the level the frames have reached
    marks: list[list[int]]  # per chain: the position each ring of that level must pass
    futures: list[asyncio.Future[None]] = field(default_factory=list)


class Settle:
    """``await settle()``: every frame written to the lanes before the call is in JetStream.

    Args:
        chains: one per lane this process writes: the rings level by level, from the lane
            ring (``[[lane]]``) to the rings egress reads (the last level, one or more).
    """

    def __init__(self, chains: Sequence[Sequence[Sequence[Ring]]]):
        if not chains or any(not chain or any(not level for level in chain) for chain in chains):
            raise ValueError("settle: every chain needs at least one ring per level")
        self.chains = [[list(level) for level in chain] for chain in chains]
        self._waiting: deque[_Waiter] = deque()
        self._task: asyncio.Task[None] | None = None

    async def settle(self) -> None:
        """Return once the frames written so far are stored; cancellable (the frames are
        not: they are on their way whatever happens to the waiter)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        marks = [chain[0][0].tail() for chain in self.chains]
        last = self._waiting[-1] if self._waiting else None
        if last is not None and all(level == 0 for level in last.levels):
            # still at the lane ring: raise its mark to ours and wait together
            last.marks = [[m] for m in marks]
            last.futures.append(fut)
        else:
            self._waiting.append(_Waiter([0] * len(marks), [[m] for m in marks], [fut]))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())
        await fut

    def pending(self) -> int:
        """How many waiters have not been released."""
        return sum(len(w.futures) for w in self._waiting)

    def _advance(self, w: _Waiter) -> bool:
        done = True
        for c, chain in enumerate(self.chains):
            while w.levels[c] < len(chain):
                rings = chain[w.levels[c]]
                if any(r.head() < m for r, m in zip(rings, w.marks[c])):
                    break
                w.levels[c] += 1
                if w.levels[c] < len(chain):
                    w.marks[c] = [r.tail() for r in chain[w.levels[c]]]
            if w.levels[c] < len(chain):
                done = False
        return done

    async def _watch(self) -> None:
        while self._waiting:
            # every waiter moves on its own (reading a later level's tail as soon as it can
            # keeps the marks low); each is proven by its own marks, so release order is free
            for w in [w for w in self._waiting if self._advance(w)]:
                self._waiting.remove(w)
                for fut in w.futures:
                    if not fut.done():
                        fut.set_result(None)
            if self._waiting:
                await asyncio.sleep(POLL)
