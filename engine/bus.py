"""Client-side helpers for the rack's NATS connections (egress, telemetry, gears)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client


async def close_quietly(nc: Client | None, timeout: float = 2.0) -> None:
    """Close ``nc`` without waiting on a server that is gone: nats-py's ``close`` flushes
    first and, with the server dead and reconnecting forever, can wait for ever — which once
    left a telemetry process alive after its rack was killed."""
    if nc is None:
        return
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except (TimeoutError, asyncio.CancelledError, OSError, Exception):  # noqa: BLE001
        pass  # closing on the way out: nothing left to report to
