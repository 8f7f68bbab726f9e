"""Forwarding the racks' OTLP payloads, unchanged, to an OTLP/HTTP collector
(``traces.forward``).

Theory of operation: the traces process ``offer``s every trace payload it receives; a
bounded queue (``forward.queue`` payloads) decouples the hub from the collector. One sender
task POSTs each payload to ``<endpoint>/v1/traces`` (``application/x-protobuf``, the
configured headers) with a timeout. The verdict on an answer is ``verdict`` (sans I/O):

* 2xx: delivered;
* 429, 5xx, a connection error or a timeout: tried again after ``backoff(attempt)``
  (exponential from 0.5 s to 30 s, jittered; a ``Retry-After`` in seconds is honoured up to
  30 s), at most ``MAX_ATTEMPTS`` times, then dropped;
* any other status (400: the collector will never take it): dropped at once;
* any other exception from a POST (aiohttp raises ``ValueError`` for a header it refuses):
  that payload dropped at once, counted as ``errors``, logged rate-limited — a bug or a
  setting no retry heals, which must not stop the sender.

The sender task never dies of a payload: what ``_send`` does not decide is contained in
``_run`` (counted, logged) and the loop goes on; should the HTTP session itself fail, a new
one is made after ``MAX_DELAY``. ``close`` never raises, so the process's final report and
writer shutdown always run.

While it retries, new payloads wait in the queue; a full queue drops the newest (counted,
logged rate-limited). Forwarding is best effort, like the traces themselves: the queue is
memory only, lost on a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from engine.logutil import RateLimitedLog
from mixer.settings import ForwardSettings

log = logging.getLogger("fluxrig.mixer.traces")
RATELOG = RateLimitedLog(log, 10.0)

MAX_ATTEMPTS: Final = 8
FIRST_DELAY: Final = 0.5
MAX_DELAY: Final = 30.0
RETRY: Final = "retry"
DONE: Final = "done"
DROP: Final = "drop"


def verdict(status: int | None) -> str:
    """What to do after an answer (``None``: no answer — connection error or timeout)."""
    if status is None or status == 429 or status >= 500:
        return RETRY
    return DONE if 200 <= status < 300 else DROP


def backoff(attempt: int, retry_after: str | None = None,
            rand: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1)."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), MAX_DELAY)
    return min(FIRST_DELAY * 2 ** (attempt - 1), MAX_DELAY) * rand(0.8, 1.2)


@dataclass(slots=True)
class ForwardStats:
    """Counters of the forwarder (owned by the event loop)."""

    sent: int = 0
    retried: int = 0
    dropped_full: int = 0
    dropped_failed: int = 0
    errors: int = 0  # unexpected exceptions contained (their payloads dropped)


class Forwarder:
    """The bounded queue and its sender task (module doc)."""

    def __init__(self, settings: ForwardSettings):
        self.settings = settings
        self.url = settings.endpoint + "/v1/traces"
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(settings.queue)
        self.stats = ForwardStats()
        self._task: asyncio.Task[None] | None = None

    def offer(self, rack: str, payload: bytes) -> bool:
        """Queue ``payload`` for the collector; False (counted, logged) when the queue is
        full."""
        try:
            self.queue.put_nowait((rack, payload))
            return True
        except asyncio.QueueFull:
            self.stats.dropped_full += 1
            RATELOG.warning("forward-full", "trace forward queue full, payload dropped: "
                            "rack=%s, bytes=%d, queue=%d, dropped=%d", rack, len(payload),
                            self.settings.queue, self.stats.dropped_full)
            return False

    def start(self) -> None:
        """Start the sender task."""
        self._task = asyncio.create_task(self._run(), name="trace-forward")

    async def close(self) -> None:
        """Stop the sender (what waits is dropped: best effort). Never raises: a sender
        that failed is logged, so the caller's shutdown goes on."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the caller's final report and shutdown must still run
            log.error("trace forward sender failed: url=%s, error=%r", self.url, exc)

    def _unexpected(self, what: str, exc: Exception) -> None:
        """An exception nothing decided: counted and logged (rate-limited)."""
        self.stats.errors += 1
        RATELOG.error("forward-error", "trace forward error: url=%s, %s, error=%r, "
                      "errors=%d", self.url, what, exc, self.stats.errors)

    async def _run(self) -> None:
        headers = {"Content-Type": "application/x-protobuf", **dict(self.settings.headers)}
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        while True:
            try:
                async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
                    while True:
                        rack, payload = await self.queue.get()
                        try:
                            await self._send(session, rack, payload)
                        except Exception as exc:  # one payload must not stop the sender
                            self._unexpected(f"rack={rack}, bytes={len(payload)}", exc)
                        finally:
                            self.queue.task_done()
            except Exception as exc:  # the session itself: a new one after a pause
                self._unexpected("session failed", exc)
                await asyncio.sleep(MAX_DELAY)

    async def _send(self, session: aiohttp.ClientSession, rack: str, payload: bytes) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            status: int | None = None
            retry_after = None
            why = ""
            try:
                async with session.post(self.url, data=payload) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    await resp.read()
                    why = f"status {status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                why = repr(exc)
            except Exception as exc:  # no retry heals it (a refused header): drop, go on
                self.stats.dropped_failed += 1
                self._unexpected(f"rack={rack}, bytes={len(payload)}, dropped", exc)
                return
            v = verdict(status)
            if v == DONE:
                self.stats.sent += 1
                return
            if v == DROP or attempt == MAX_ATTEMPTS:
                self.stats.dropped_failed += 1
                RATELOG.error("forward-drop", "trace forward gave up: rack=%s, bytes=%d, "
                              "url=%s, attempts=%d, last=%s, dropped=%d", rack, len(payload),
                              self.url, attempt, why, self.stats.dropped_failed)
                return
            self.stats.retried += 1
            RATELOG.warning("forward-retry", "trace forward failed, retrying: url=%s, "
                            "attempt=%d, error=%s", self.url, attempt, why)
            await asyncio.sleep(backoff(attempt, retry_after))


__all__ = ["DONE", "DROP", "ForwardStats", "Forwarder", "MAX_ATTEMPTS", "RETRY", "backoff",
           "verdict"]
