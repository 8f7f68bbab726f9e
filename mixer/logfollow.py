"""``mixer logs --follow``: the stored records, then the live ones, nothing falling between.

The CLI subscribes to ``fluxrig.logs.<rack or *>`` on the hub (user ``admin``) *before* it
reads the Parquet parts, and holds what arrives meanwhile; it prints the stored records,
then the held and new ones, skipping any it already printed (a record flushed to a part
after the subscription is both stored and live). Records a rack sent just before the
subscription that were still in the traces process's memory (at most ``traces.flush``
seconds of them) are neither stored yet nor live: once that flush is surely done, the
parts are read again for the moments before the subscription and those are printed then
(late, marked by their own times), so nothing falls between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nats
from nats.aio.msg import Msg

from mixer.settings import MixerSettings
from mixer.tracequery import LogRecord, record_matches
from mixer.tracerows import TelemetryDecodeError, log_rows


class FollowError(RuntimeError):
    """The hub cannot be reached (the message says why)."""


def follow_logs(data_dir: Path, settings: MixerSettings, rack: str | None,
                levels: Sequence[str], grep: str | None,
                stored: Callable[[int], list[LogRecord]],
                show: Callable[[LogRecord], None]) -> None:
    """Print stored records then live ones until interrupted (KeyboardInterrupt).

    Args:
        stored: the stored records from a time (ns) on, filtered as asked, oldest first;
            called with None for the whole ``--since`` window.

    Raises:
        FollowError: no hub to subscribe to.
    """
    asyncio.run(_follow(data_dir, settings, rack, levels, grep, stored, show))


async def _follow(data_dir: Path, settings: MixerSettings, rack: str | None,
                  levels: Sequence[str], grep: str | None,
                  stored: Callable[[int], list[LogRecord]],
                  show: Callable[[LogRecord], None]) -> None:
    from mixer.hubfiles import local_users

    try:
        nc = await nats.connect(settings.hub_url, user="admin",
                                password=local_users(data_dir)["admin"], connect_timeout=3,
                                allow_reconnect=True, max_reconnect_attempts=-1)
    except Exception as exc:
        raise FollowError(f"cannot reach the hub at {settings.hub_url} to follow: "
                          f"{exc!r} (is the Mixer running?)") from None
    live: asyncio.Queue[LogRecord] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        who = msg.subject.split(".")[-1]
        try:
            rows, _ = log_rows(who, msg.data)
        except TelemetryDecodeError:
            return
        for r in rows:
            live.put_nowait(LogRecord(ts=r.ts, level=r.level, rack=who, process=r.process,
                                      logger=r.logger, msg=r.msg, exc=r.exc))

    loop = asyncio.get_running_loop()
    try:
        await nc.subscribe(f"fluxrig.logs.{rack or '*'}", cb=on_msg)
        await nc.flush()  # the server has the subscription: what comes next is held
        t_sub = time.time_ns()
        printed: set[tuple[object, ...]] = set()
        for r in await loop.run_in_executor(None, stored, 0):
            printed.add(r.key())
            show(r)
        # the traces process's buffer at the subscription is on disk after one flush
        flush = settings.traces.flush
        catch_up: float | None = loop.time() + flush + 1.5
        live_seen: set[tuple[object, ...]] = set()
        while True:
            try:
                timeout = None if catch_up is None else max(catch_up - loop.time(), 0.0)
                r = await asyncio.wait_for(live.get(), timeout)
            except TimeoutError:
                since = t_sub - int((2 * flush + 5) * 1e9)
                for r in await loop.run_in_executor(None, stored, since):
                    if r.key() not in printed and r.key() not in live_seen:
                        show(r)
                catch_up = None
                printed.clear()
                live_seen.clear()
                continue
            if r.key() in printed:
                continue
            if catch_up is not None:
                live_seen.add(r.key())
            if record_matches(r, levels, grep):
                show(r)
    finally:
        await nc.close()


__all__ = ["FollowError", "follow_logs"]
