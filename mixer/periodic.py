"""Periodic jobs in a Mixer process's event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("fluxrig.mixer")


async def every(period: float, fn: Callable[[], Awaitable[None] | None],
                stopping: asyncio.Event) -> None:
    """Run ``fn`` every ``period`` seconds until ``stopping`` is set; a failing turn is
    logged and the job goes on (a periodic job must outlive one bad turn)."""
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), period)
        except TimeoutError:
            try:
                result = fn()
                if result is not None:
                    await result
            except Exception as exc:
                log.error("periodic job failed: job=%s, error=%r",
                          getattr(fn, "__name__", fn), exc)


__all__ = ["every"]
