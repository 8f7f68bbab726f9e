"""``mixer logs --follow``: the stored records, then the live ones, nothing falling between.

The CLI subscribes to ``fluxrig.logs.<rack or *>`` on the hub (user ``admin``) *before* it
reads the Parquet parts, and holds what arrives meanwhile; it prints the stored records,
then the held and new ones, skipping any it already printed (a record flushed to a part
after the subscription is both stored and live). Records a rack sent just before the
subscription that were still in the traces process's memory (at most ``traces.flush``
seconds of them) are neither stored yet nor live: once that flush is surely done, the
parts are read again for the moments before the subscription and those are printed then
(late, marked by their own times), so nothing falls between.

Connecting: the first connect gives up within ``FIRST_CONNECT_S`` (a Mixer that is not
running is said at once, exit 1, not waited for forever); once connected, a lost hub is
retried for as long as the user follows (a Mixer restart is bridged).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from nats.aio.client import Client
from nats.aio.msg import Msg

from mixer.settings import MixerSettings
from mixer.tracequery import LogRecord, record_matches
from mixer.tracerows import log_rows

FIRST_CONNECT_S: Final = 5.0   # the whole first connect, tries and waits included
FIRST_TRIES: Final = 3         # tries of the first connect (each at most CONNECT_TIMEOUT_S)
CONNECT_TIMEOUT_S: Final = 2.0
RECONNECT_WAIT_S: Final = 0.5


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
        FollowError: no hub to subscribe to (said within ``FIRST_CONNECT_S``).
    """
    asyncio.run(_follow(data_dir, settings, rack, levels, grep, stored, show))


async def _follow(data_dir: Path, settings: MixerSettings, rack: str | None,
                  levels: Sequence[str], grep: str | None,
                  stored: Callable[[int], list[LogRecord]],
                  show: Callable[[LogRecord], None]) -> None:
    nc = await connect_hub(data_dir, settings)
    live: asyncio.Queue[LogRecord] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        who = msg.subject.split(".")[-1]
        rows, _ = log_rows(who, msg.data)
        for r in rows:
            live.put_nowait(LogRecord(ts=r.ts, level=r.level, rack=who, process=r.process,
                                      logger=r.logger, msg=r.msg, exc=r.exc))

    loop = asyncio.get_running_loop()
    # Ctrl-C / SIGTERM end the follow through an event, not by cancelling whatever runs:
    # an interrupt landing in the nats client's tasks or a Parquet read must not leave the
    # process waiting on them (once seen in CI: 10 s and no exit)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reader = ThreadPoolExecutor(1, thread_name_prefix="logs-read")
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await nc.subscribe(f"fluxrig.logs.{rack or '*'}", cb=on_msg)
        await nc.flush()  # the server has the subscription: what comes next is held
        t_sub = time.time_ns()
        printed: set[tuple[object, ...]] = set()
        for r in await loop.run_in_executor(reader, stored, 0):
            printed.add(r.key())
            show(r)
        # the traces process's buffer at the subscription is on disk after one flush
        flush = settings.traces.flush
        catch_up: float | None = loop.time() + flush + 1.5
        live_seen: set[tuple[object, ...]] = set()
        while not stop.is_set():
            timeout = None if catch_up is None else max(catch_up - loop.time(), 0.0)
            got = asyncio.ensure_future(live.get())
            await asyncio.wait((got, stopped), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                got.cancel()
                break
            if not got.done():  # the catch-up moment
                got.cancel()
                since = t_sub - int((2 * flush + 5) * 1e9)
                for r in await loop.run_in_executor(reader, stored, since):
                    if r.key() not in printed and r.key() not in live_seen:
                        show(r)
                catch_up = None
                printed.clear()
                live_seen.clear()
                continue
            r = got.result()
            if r.key() in printed:
                continue
            if catch_up is not None:
                live_seen.add(r.key())
            if record_matches(r, levels, grep):
                show(r)
    finally:
        stopped.cancel()
        reader.shutdown(wait=False, cancel_futures=True)
        try:
            await asyncio.wait_for(nc.close(), 2.0)
        except Exception:  # leaving anyway: the hub forgets a dead subscriber by itself
            pass


async def connect_hub(data_dir: Path, settings: MixerSettings) -> Client:
    """A connection to the hub as ``admin``: the first connect bounded (``FIRST_TRIES``
    within ``FIRST_CONNECT_S``), reconnects after it unbounded.

    Raises:
        FollowError: the hub cannot be reached, or the hub's users file cannot be read.
    """
    from mixer.hubfiles import local_users

    url = settings.hub_url
    unreachable = (f"cannot reach the hub at {url}: is the Mixer running? "
                   f"(mixer status {data_dir})")
    try:
        password = local_users(data_dir)["admin"]
    except (OSError, ValueError, KeyError) as exc:
        raise FollowError(f"cannot read the hub's admin password in {data_dir}: "
                          f"{exc!r}") from None

    async def quiet(exc: Exception) -> None:
        """nats' default error callback logs a traceback per failed try; the outcome is
        said once, by FollowError or by the records that follow."""

    nc = Client()
    try:
        # max_reconnect_attempts is also the first connect's budget in nats-py (-1 would
        # try forever): a small one here, unbounded once connected (below)
        await asyncio.wait_for(
            nc.connect(url, user="admin", password=password, connect_timeout=CONNECT_TIMEOUT_S,
                       allow_reconnect=True, max_reconnect_attempts=FIRST_TRIES - 1,
                       reconnect_time_wait=RECONNECT_WAIT_S, error_cb=quiet),
            FIRST_CONNECT_S)
    except Exception:  # refused, timed out, no servers left: all mean the same to a user
        try:
            await nc.close()
        except Exception:  # a half-made connection may have nothing to close
            pass
        raise FollowError(unreachable) from None
    # nats-py reads the option at each reconnect: from now on a lost hub is retried forever
    nc.options["max_reconnect_attempts"] = -1
    return nc


__all__ = ["CONNECT_TIMEOUT_S", "FIRST_CONNECT_S", "FIRST_TRIES", "FollowError",
           "RECONNECT_WAIT_S", "connect_hub", "follow_logs"]
