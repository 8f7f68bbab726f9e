"""The ``iso8583`` gear: the switch as a replicated source of the rack.

It declares what the rack must prepare before forking (its stats, its in-flight journal,
its ``saf`` outlet to the SAF work queue), then runs one ``SwitchShell`` per lane: settle
the journal, serve until the rack stops, drain. With SAF on it also connects to the rack's
NATS (retrying; serving never waits for it) and runs the reversal sender.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import Error as NatsError

from engine.bus import Permissions, close_quietly, connect, pull_consumer, stream_admin
from engine.counters import StatDef
from engine.frame import Frame
from engine.journal import JournalSpec
from engine.outlet import OutletSpec
from engine.schema import At
from engine.streams import StreamConfig
from gears.base import Source
from gears.coatcheck import KeyRing
from gears.iso8583.core import SAF, stat_defs
from gears.iso8583.saf import SafSender, dead_letter_stream, queue_subject
from gears.iso8583.settings import SETTINGS, SwitchSettings, parse_switch_settings
from gears.iso8583.switch import SwitchShell

__all__ = ["SwitchGear", "saf_outlet", "spin_before_sleep"]

READY_GRACE = 2.0  # s: an issuer still unreachable then does not hold the rack's readiness
JOURNAL_SLOT = 1024  # bytes: a journaled request with its sealed reversal fits in ~600


def spin_before_sleep(loop: asyncio.AbstractEventLoop, spin: float) -> None:
    """Make ``loop`` poll its sockets for ``spin`` seconds before it blocks in epoll.

    A process woken by the kernel pays the host's wake-up latency (p99 150-750 us on the dev
    VM); polling a little first catches the next message while still running. It trades CPU
    for tail latency: every time the loop would sleep it burns up to ``spin`` first, which
    also shows on an idle rack. Uses the loop's selector (a CPython asyncio detail).
    """
    sel = loop._selector  # type: ignore[attr-defined]
    blocking_select = sel.select
    clock = time.perf_counter

    def select(timeout: float | None = None):
        if timeout is None or timeout > 0:
            end = clock() + spin
            while clock() < end:
                ready = blocking_select(0)
                if ready:
                    return ready
        return blocking_select(timeout)

    sel.select = select


def saf_outlet(s: SwitchSettings, rack_id: str) -> OutletSpec | None:
    """The ``saf`` outlet (reversals -> the SAF work queue), when SAF is on."""
    if s.saf is None:
        return None
    subject = queue_subject(rack_id)
    return OutletSpec(name=SAF, subject=subject, stream=StreamConfig(
        name=s.saf.stream, subjects=(subject,), storage="file", retention="work_queue",
        duplicate_window=600.0))


class SwitchGear(Source):
    """``gear: iso8583`` — a replicated source: one switch per lane, events to its ring."""

    replicated = True
    signals_ready = True  # once listening, and its issuers reached (or a moment passed)
    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> SwitchSettings:
        return parse_switch_settings(raw, at)

    @classmethod
    def stat_defs(cls, settings: SwitchSettings) -> tuple[StatDef, ...]:
        return stat_defs(settings)

    @classmethod
    def bus_permissions(cls, settings: SwitchSettings, rack_id: str) -> Permissions | None:
        """With SAF on: work the SAF consumer and write dead letters; nothing else (it cannot
        read the audit stream, nor publish into it: egress does that)."""
        if settings.saf is None:
            return None
        dead = dead_letter_stream(settings.saf.stream, rack_id)
        return Permissions(publish=(*stream_admin([dead.name]), *dead.subjects,
                                    *pull_consumer(settings.saf.stream, "saf")))

    @classmethod
    def listeners(cls, settings: SwitchSettings) -> tuple[tuple[str, int], ...]:
        return ((settings.listen.host, settings.listen.port),)

    @classmethod
    def min_ring_capacity(cls, settings: SwitchSettings) -> int:
        return 16 << 10  # records up to 2 KiB: an audit event or a reversal is well under

    @classmethod
    def journal_spec(cls, settings: SwitchSettings) -> JournalSpec:
        return JournalSpec(slots=settings.max_inflight, slot_size=JOURNAL_SLOT)

    @classmethod
    def outlets(cls, settings: SwitchSettings, rack_id: str) -> tuple[OutletSpec, ...]:
        spec = saf_outlet(settings, rack_id)
        return (spec,) if spec is not None else ()

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        s: SwitchSettings = self.settings
        ctx = self.ctx
        assert ctx.journal is not None and ctx.stats is not None
        if s.idle_spin_us:
            spin_before_sleep(asyncio.get_running_loop(), s.idle_spin_us / 1e6)
        keyring = None
        if s.coatcheck is not None or s.saf is not None:
            key_file = s.coatcheck.key_file if s.coatcheck else "vault.keys"
            keyring = KeyRing.load_or_create(f"{ctx.data_dir}/{key_file}")
        shell = SwitchShell(s, outlets=ctx.outlets, journal=ctx.journal, stats=ctx.stats,
                            keyring=keyring, src=f"iso8583:{ctx.pipeline}.{ctx.replica}",
                            replica=ctx.replica, tracer=ctx.tracer)
        port = await shell.start(ctx.listeners[0] if ctx.listeners else None,
                                 siblings=ctx.replicas if ctx.listeners else 1)
        ctx.log.info("switch listening: port=%d, replica=%d", port, ctx.replica)
        await shell.links_up(READY_GRACE)  # ready = serving as configured, when it can
        ctx.ready()
        nc_task = None
        if s.saf is not None:
            nc_task = asyncio.get_running_loop().create_task(self._saf(shell, s))
        try:
            await stopping.wait()
        finally:
            drained = await shell.drain(s.timeout + 1.0)
            if not drained:
                ctx.log.error("switch drain incomplete: inflight=%d, queued=%d",
                              len(shell.core.matcher), len(shell._queue))
            await shell.stop()
            if nc_task is not None:
                nc_task.cancel()
                await asyncio.gather(nc_task, return_exceptions=True)

    async def _saf(self, shell: SwitchShell, s: SwitchSettings) -> None:
        """Connect to the rack's NATS (retrying) and run the SAF sender on it."""
        assert s.saf is not None and shell.stats is not None
        ctx = self.ctx
        nc = None
        try:
            while nc is None:
                try:
                    nc = await connect(ctx.nats_url, ctx.bus_auth,
                                       f"fluxrig-switch-{ctx.rack_id}-{ctx.replica}",
                                       max_reconnect_attempts=-1, reconnect_time_wait=0.5)
                except (OSError, NatsError) as exc:
                    shell.ratelog.warning("nats", "switch cannot reach nats yet: error=%r", exc)
                    await asyncio.sleep(1.0)
            sender = SafSender(nc.jetstream(), stream=s.saf.stream, rack_id=ctx.rack_id,
                               retry_interval=s.saf.retry_interval,
                               retry_limit=s.saf.retry_limit, expire_after=s.saf.expire_after,
                               inter_delay=s.saf.inter_delay, keyring=shell.current_keyring,
                               links=shell, stats=shell.stats, key_fields=s.match_key)
            shell.saf = sender
            await sender.run()
        finally:
            await close_quietly(nc)
