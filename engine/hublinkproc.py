"""A linked rack's ``hublink`` process: it pulls the rack's config from the hub and reports.

Loop (``docs/mixer-design.md`` section 11, variant B):

1. pull the rack's durable consumer ``cfg_<rack>`` on the hub's KV stream over the leaf link
   (JetStream domain ``hub``; the fetch's inbox is ``fluxrig.down.<rack>.inbox``, the only
   place the hub may answer the rack);
2. keep each value in the local stream ``CONFIG`` (``fxlocal.<rack>.config``, 16 values, one
   per revision by ``Nats-Msg-Id``), so the rack has it through hub outages, then ack it;
3. check it as this rack would run it (``engine.deployed.stage``); a rig it cannot run is
   reported ``failed`` and the rack keeps what it runs; otherwise it is the candidate and the
   supervisor is told (SIGHUP): it checks again, drains and starts on it;
4. report every outcome (``result.json``) on ``fluxrig.up.<rack>.applied`` as a request,
   until the registry answers (after a restart the link is not up at once).

A revision not newer than the applied one (a re-delivery) is acked and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import StreamConfig as JsStreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from engine.bus import close_quietly, connect
from engine.config import ConfigError
from engine.deployed import applied, candidate, report, request, result, stage
from engine.logutil import RateLimitedLog
from engine.plan import HublinkPlan, ProcessSpec, Runtime, signal_ready

log = logging.getLogger("fluxrig.hublink")
RATELOG = RateLimitedLog(log)

CONFIG_STREAM = "CONFIG"
BUCKET_STREAM = "KV_fluxrig_config"
FETCH_WAIT = 1.0  # a long poll: a deploy arrives at once; an outcome is reported within it


def config_subject(rack_id: str) -> str:
    """The local subject the rack keeps its config values on (never crosses the link:
    only ``fluxrig.up.<rack>.>``, ``stats`` and ``src`` may)."""
    return f"fxlocal.{rack_id}.config"


def run_hublink(spec: ProcessSpec, rt: Runtime) -> None:
    """Process body."""
    asyncio.run(_main(spec, rt))


async def _main(spec: ProcessSpec, rt: Runtime) -> None:
    plan = spec.extra
    assert isinstance(plan, HublinkPlan)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rack = rt.rack_id
    auth = spec.bus_auth
    nc = await connect(rt.nats_url, auth, f"fluxrig-hublink-{rack}",
                       max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                       inbox_prefix=f"fluxrig.down.{rack}.inbox")
    signal_ready(rt, spec.name)  # the rack serves without its hub: never wait for it
    try:
        local = nc.jetstream(timeout=5.0)
        try:
            await local.stream_info(CONFIG_STREAM)
        except NotFoundError:
            await local.add_stream(JsStreamConfig(
                name=CONFIG_STREAM, subjects=[config_subject(rack)], max_msgs_per_subject=16,
                duplicate_window=120.0))
        hub = nc.jetstream(domain="hub", timeout=5.0)
        reported = None
        sub = None
        while not stopping.is_set():
            outcome = result(rt.data_dir)
            if outcome is not None and outcome != reported and nc.is_connected:
                try:  # a request: the registry's answer says it has it (the link may not)
                    await nc.request(f"fluxrig.up.{rack}.applied",
                                     orjson.dumps({"rack": rack, **outcome}), timeout=2.0)
                    reported = outcome
                except Exception as exc:  # no responders while the link comes up
                    log.debug("applied report not taken yet: error=%r", exc)
                    await _pause(stopping, 0.5)
                    continue
            try:
                if sub is None:
                    sub = await hub.pull_subscribe_bind(
                        durable=f"cfg_{rack}", stream=BUCKET_STREAM,
                        inbox_prefix=f"fluxrig.down.{rack}.inbox.".encode())  # nats-py adds no dot
                msgs = await _until_stopped(sub.fetch(1, timeout=FETCH_WAIT), stopping)
            except (NatsTimeout, TimeoutError, asyncio.TimeoutError):
                continue  # nothing new (or the hub is away: the next pull tries again)
            except NotFoundError:  # never deployed to: no consumer yet
                sub = None
                await _pause(stopping, 2.0)
                continue
            except ServiceUnavailableError:  # no responders: the hub is away (the link
                sub = None                       # state says so; no need to say it here)
                await _pause(stopping, 2.0)
                reported = None
                continue
            except Exception as exc:
                RATELOG.warning("pull", "config pull failed, retrying: error=%r", exc)
                sub = None
                await _pause(stopping, 2.0)
                reported = None  # say it again once the hub is back
                continue
            for msg in msgs:
                await _take(msg, local, rack, rt, plan)
    finally:
        await close_quietly(nc)


async def _until_stopped(pull: Coroutine[Any, Any, list[Msg]],
                         stopping: asyncio.Event) -> list[Msg]:
    """``pull``'s messages, or none when the process is told to stop first (a long poll
    must not hold up the rack's drain)."""
    task = asyncio.ensure_future(pull)
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return []
    return task.result()


async def _pause(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass


async def _take(msg: Msg, local: JetStreamContext, rack: str, rt: Runtime,
                plan: HublinkPlan) -> None:
    rev = msg.metadata.sequence.stream
    op = (msg.headers or {}).get("KV-Operation", "")
    current = applied(rt.data_dir)
    if op in ("DEL", "PURGE") or (current is not None and rev <= current) \
            or candidate(rt.data_dir) == rev:
        await msg.ack()
        return
    await local.publish(config_subject(rack), msg.data, headers={
        "Nats-Msg-Id": f"cfg-{rev}", "Fluxrig-Rev": str(rev)})
    await msg.ack()  # stored here: the hub may forget it
    try:
        stage(rt.data_dir, rev, msg.data.decode(errors="replace"), Path(plan.bootstrap))
    except ConfigError as exc:
        log.error("config rev %d refused, the rack keeps its config: %s", rev, exc)
        report(rt.data_dir, rev, "failed", str(exc))
        return
    request(rt.data_dir, rev)
    log.info("config rev %d checked, asking the supervisor to apply it", rev)
    os.kill(os.getppid(), signal.SIGHUP)
