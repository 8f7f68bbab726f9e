"""The ``modbus`` source: polls Modbus TCP devices and emits a ``uns.sample`` frame for every
tag value worth publishing — the asyncio shell around ``codec``, ``planner``, ``sample``
and ``mbap``.

Theory of operation
-------------------
``--workers N`` runs N replicas; a device is polled by exactly one of them (a stable hash of
its name modulo N). Each device has one ``DevicePoller``: one TCP connection (reconnected
with exponential back-off and jitter, ``pause_after_connect`` after each connect), one
task per poll group. A group's cycles start on a fixed schedule (``interval`` apart from
the first; a cycle that overran makes the next start at once and is counted late, the
missed slots skipped, never queued). A cycle sends the group's reads (the plan), at most
``max_outstanding`` in flight (matched to responses by transaction id), slices each
response by the plan's tag offsets, decodes and scales each tag and hands it to its
``TagState``, which says whether to publish. What a cycle publishes is emitted together
(``await emit``: a full ring holds the poller back, and its next cycles start late).

Failures: a request that times out makes its tags ``bad: timeout``; an exception response
``bad: exception N (...)``; a lost connection makes every tag of the device ``bad:
disconnected`` until it is back. A bad state is published once per change (``TagState``),
so a dead device costs one sample per tag, not one per poll. Counted per device:
requests, exceptions, timeouts, reconnects, late cycles.

Frame: kind ``uns.sample``, ``src`` ``modbus:<device>``, header ``subject`` = the tag's UNS
path (the egress sink ``uns.v1.>`` completes its subject with it), body ``{path, value,
unit, quality, ts_source, ts}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from nats.aio.msg import Msg

from engine.bus import Permissions, close_quietly, connect
from engine.counters import StatDef, Stats
from engine.frame import Frame, encode, encode_parts, uuid7
from engine.outlet import OutletSpec
from engine.schema import At
from engine.streams import StreamConfig
from gears.base import GearContext, Source
from gears.modbus import mbap
from gears.modbus.codec import CodecError, scaled
from gears.modbus.planner import Read, plan_text
from gears.modbus.sample import Sample, TagState
from gears.modbus.settings import (
    MODBUS,
    DeviceSettings,
    ModbusSettings,
    TagSettings,
    parse_modbus,
)
from gears.modbus.write import (
    WRITE_KIND,
    WRITES_OUTLET,
    WRITES_STREAM,
    PlannedWrite,
    WriteRefused,
    check,
    reply_prefix,
    set_subject,
    writes_subject,
)

KIND = "uns.sample"
STATS = (("requests", "counter", "Modbus requests sent"),
         ("exceptions", "counter", "exception responses"),
         ("timeouts", "counter", "requests not answered within the device's timeout"),
         ("reconnects", "counter", "connections made again after a loss"),
         ("late", "counter", "poll cycles that started late (the previous one overran)"),
         ("connected", "gauge", "1 while the device's connection is up"),
         ("values", "counter", "tag values read (in answered reads)"),
         ("published", "counter", "samples published: values that changed (or every poll, "
          "heartbeats) and quality changes"))


def shard(device: str, replicas: int) -> int:
    """The replica that polls ``device`` (stable across restarts and processes; BLAKE2b,
    not CRC-32: CRC's low bits barely change between ``press-1`` and ``press-2``)."""
    return int.from_bytes(hashlib.blake2b(device.encode(), digest_size=8).digest(),
                          "big") % replicas


class DeviceDown(ConnectionError):
    """The device's connection is gone (or was never made)."""


class Link(asyncio.Protocol):
    """One connection to a device: requests out, responses matched by transaction id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = mbap.Reader()
        self.waiting: dict[int, asyncio.Future[mbap.Response]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self.tid = random.randrange(65536)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.reader.feed(data)
        except mbap.ModbusProtocolError as exc:
            self._fail(exc)
            return
        for r in responses:
            fut = self.waiting.pop(r.tid, None)
            if fut is not None and not fut.done():
                fut.set_result(r)  # (a late answer to a request that timed out: dropped)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or DeviceDown("connection closed by the device"))

    def _fail(self, exc: Exception) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(DeviceDown(str(exc)))
        self.waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    async def request(self, build: Callable[[int], bytes], timeout: float) -> mbap.Response:
        """Send the request ``build(tid)``; its response.

        Raises:
            TimeoutError: no answer within ``timeout``.
            DeviceDown: the connection is gone.
        """
        if self.transport is None or self.closed.done():
            raise DeviceDown("not connected")
        self.tid = (self.tid + 1) & 0xFFFF
        tid = self.tid
        fut = asyncio.get_running_loop().create_future()
        self.waiting[tid] = fut
        self.transport.write(build(tid))
        try:
            # asyncio.timeout, not wait_for: no wrapping task per request (an idle rack's
            # cost is mostly the event loop's work per request, perf/modbus_bench.py)
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.waiting.pop(tid, None)

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()


class DevicePoller:
    """One device: its connection, its groups' cycles, its tags' states (module doc)."""

    def __init__(self, dev: DeviceSettings, groups: dict[str, float], stats: Stats | None,
                 stat_base: int, publish: Callable[[list[Frame]], Awaitable[None]],
                 phases: int = 1):
        self.dev = dev
        self.phases = phases  # the replica's cycle start slots per interval (``phases``)
        self.groups = groups
        self.stats = stats
        self.base = stat_base
        self.publish = publish
        self.states = {t.name: TagState(t.publishing) for t in dev.tags}
        self.tags = {t.name: t for t in dev.tags}
        self.link: Link | None = None
        self.up = asyncio.Event()
        self.slots = asyncio.Semaphore(dev.max_outstanding)
        self.writing = asyncio.Lock()  # one device's writes one at a time, in order
        self.src = f"modbus:{dev.name}"

    def _count(self, i: int, n: int = 1) -> None:
        if self.stats is not None:
            self.stats.add(self.base + i, n)

    async def run(self, stopping: asyncio.Event) -> None:
        """Connect, poll every group, until ``stopping``."""
        tasks = [asyncio.create_task(self._connection(stopping))]
        tasks += [asyncio.create_task(self._group(g, stopping)) for g in self.dev.plan.groups]
        try:
            await stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.link is not None:
                self.link.close()

    async def _connection(self, stopping: asyncio.Event) -> None:
        d = self.dev
        wait = d.reconnect_min
        first = True
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(Link, d.host, d.port), d.timeout)
            except (OSError, TimeoutError):
                await self._all_bad("disconnected")
                await _sleep(stopping, wait * random.uniform(0.8, 1.2))
                wait = min(wait * 2, d.reconnect_max)
                continue
            if d.pause_after_connect:
                await _sleep(stopping, d.pause_after_connect)
            if not first:
                self._count(3)
            first = False
            wait = d.reconnect_min
            self.link = link
            if self.stats is not None:
                self.stats.set(self.base + 5, 1)
            self.up.set()
            await link.closed
            self.up.clear()
            self.link = None
            if self.stats is not None:
                self.stats.set(self.base + 5, 0)
            await self._all_bad("disconnected")

    async def _all_bad(self, reason: str) -> None:
        now = time.time_ns()
        await self._emit([(t, s) for t in self.dev.tags
                          if (s := self.states[t.name].bad(reason, now)) is not None])

    async def _group(self, group: str, stopping: asyncio.Event) -> None:
        interval = self.groups[group]
        reads = self.dev.plan.group_reads(group)
        loop = asyncio.get_running_loop()
        # after the first cycle, devices' cycles start in one of ``phases`` slots over the
        # interval (a stable fraction of the names): all starting together made every
        # second's values queue through the rack at once (p99 604 ms at 200 devices x 100
        # tags, perf/modbus_bench.py), while a slot of its own per device costs a wake-up
        # of its own (~0.1-0.25 ms of CPU each on a VM: most of an idle rack's CPU)
        k = self.phases
        spread = interval * int(_fraction(f"{self.dev.name}/{group}") * k) / k
        start = loop.time()
        while not stopping.is_set():
            if not self.up.is_set():
                # not connected: poll as soon as the link is up (not a whole interval
                # later), the schedule anchored there
                waits = [asyncio.ensure_future(self.up.wait()),
                         asyncio.ensure_future(stopping.wait())]
                await asyncio.wait(waits, timeout=interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                start = loop.time()
                if not self.up.is_set():
                    continue
            if self.up.is_set():
                if self.dev.max_outstanding > 1:  # pipelined: every read in flight at once
                    found = await asyncio.gather(*(self._read(r) for r in reads))
                    out = [x for batch in found for x in batch]
                else:  # one at a time anyway: no task per read
                    out = []
                    for r in reads:
                        out += await self._read(r)
                now = time.time_ns()
                for r in reads:
                    for slot in r.tags:
                        if (s := self.states[slot.tag.name].tick(now)) is not None:
                            out.append((self.tags[slot.tag.name], s))
                await self._emit(out)
            start += interval + spread
            spread = 0.0
            if loop.time() > start:  # overran: the next starts now, missed slots skipped
                self._count(4)
                start = loop.time()
            await _sleep(stopping, start - loop.time())

    async def _read(self, read: Read) -> list[tuple[TagSettings, Sample]]:
        d = self.dev
        fn = read.function
        link = self.link
        async with self.slots:
            self._count(0)
            try:
                if link is None:
                    raise DeviceDown("not connected")
                resp = await link.request(
                    lambda tid: mbap.read_request(tid, d.unit, fn, read.address, read.count),
                    d.timeout)
            except TimeoutError:
                self._count(2)
                return self._bad(read, "timeout")
            except DeviceDown:
                return self._bad(read, "disconnected")
        now = time.time_ns()
        if resp.function != fn or resp.unit != d.unit:
            # an answer to another request under this transaction id (a device or gateway
            # that reuses ids after a timeout): never taken as this read's values
            return self._bad(read, f"bad response (function {resp.function}, unit "
                             f"{resp.unit} to a function {fn} read of unit {d.unit})")
        if resp.failed:
            self._count(1)
            return self._bad(read, resp.reason())
        try:
            values: list[Any] = (resp.bits(read.count) if read.register in ("coil", "discrete")
                                 else resp.registers(read.count))
        except mbap.ModbusProtocolError as exc:
            return self._bad(read, f"bad response ({exc})")
        out = []
        self._count(6, len(read.tags))
        for slot in read.tags:
            tag = self.tags[slot.tag.name]
            try:
                raw = tag.codec.decode(values[slot.offset:slot.stop])
            except CodecError as exc:
                s = self.states[tag.name].bad(f"undecodable ({exc})", now)
            else:
                value = scaled(raw, tag.scale, tag.offset) if tag.codec.numeric else raw
                s = self.states[tag.name].good(value, now)
            if s is not None:
                out.append((tag, s))
        return out

    async def write(self, tag: TagSettings, planned: PlannedWrite) -> dict[str, Any]:
        """Apply one checked write to ``tag`` and read it back (``gears.modbus.write``):
        ``{result, reason, read_back}`` — ``confirmed``, ``mismatch``, ``refused`` (by the
        device) or ``failed`` (no answer, not connected)."""
        d = self.dev
        async with self.writing:
            link = self.link
            if link is None:
                return {"result": "failed", "reason": "device disconnected"}
            unit, addr, codec = d.unit, tag.address, tag.codec
            coil = codec.bit_space
            try:
                words = planned.words
                if codec.bit is not None:  # read, change the bit, write back (under the lock)
                    cur = await link.request(lambda tid: mbap.read_request(
                        tid, unit, mbap.READ_HOLDING, addr, 1), d.timeout)
                    if cur.failed:
                        return {"result": "refused", "reason": cur.reason()}
                    words = codec.encode(planned.raw, current=cur.registers(1))
                if coil:
                    resp = await link.request(lambda tid: mbap.write_coil_request(
                        tid, unit, addr, bool(planned.raw)), d.timeout)
                else:
                    resp = await link.request(lambda tid: mbap.write_registers_request(
                        tid, unit, addr, words), d.timeout)
                if resp.failed:
                    return {"result": "refused", "reason": resp.reason()}
                fn = mbap.READ_COILS if coil else mbap.READ_HOLDING
                n = 1 if coil else len(words)
                back = await link.request(lambda tid: mbap.read_request(
                    tid, unit, fn, addr, n), d.timeout)
                if back.failed:
                    return {"result": "failed", "reason": f"read-back: {back.reason()}"}
                got = back.bits(1) if coil else back.registers(n)
                value = codec.decode(got)
            except TimeoutError:
                return {"result": "failed", "reason": "timeout"}
            except (DeviceDown, mbap.ModbusProtocolError, CodecError) as exc:
                return {"result": "failed", "reason": str(exc)}
            same = got == [bool(planned.raw)] if coil else got == words
            shown = scaled(value, tag.scale, tag.offset) if codec.numeric else value
            return {"result": "confirmed" if same else "mismatch", "read_back": shown,
                    **({} if same else {"reason": "the device holds another value"})}

    def _bad(self, read: Read, reason: str) -> list[tuple[TagSettings, Sample]]:
        now = time.time_ns()
        return [(self.tags[slot.tag.name], s) for slot in read.tags
                if (s := self.states[slot.tag.name].bad(reason, now)) is not None]

    async def _emit(self, samples: list[tuple[TagSettings, Sample]]) -> None:
        if samples:
            self._count(7, len(samples))
            src = self.src
            # encoded here (encode_parts): a Frame object per sample was a third of the cost
            # of a value at 20,000 values/s (perf/modbus_bench.py)
            await self.publish([encode_parts(
                uuid7(s.ts), s.ts, src, KIND, {"subject": t.path},
                {"path": t.path, "value": s.value, "unit": t.unit, "quality": s.quality,
                 "ts_source": s.ts_source, "ts": s.ts}) for t, s in samples])


PHASE_VALUES: Final = 500  # tag values per cycle start slot (``phases``)


def phases(tags: int, devices: int) -> int:
    """How many start slots a replica spreads its devices' cycles over: one per
    ``PHASE_VALUES`` tags read per interval, at most one per device, at least one — a
    small replica polls its devices together (fewer wake-ups), a big one in slices that
    each pass through the rack in a few milliseconds."""
    return max(1, min(devices, -(-tags // PHASE_VALUES)))


def _fraction(name: str) -> float:
    """A stable number in [0, 1) for ``name``."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(),
                          "big") / 2.0**64


def _writable(settings: ModbusSettings) -> bool:
    return any(t.writable for d in settings.devices for t in d.tags)


async def _sleep(stopping: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await stopping.wait()
    except TimeoutError:
        pass


class ModbusSource(Source):
    """Polls Modbus TCP devices into UNS samples (module doc)."""

    replicated = True
    settings_table = MODBUS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> ModbusSettings:
        return parse_modbus(raw, at)

    @classmethod
    def describe(cls, settings: ModbusSettings) -> tuple[str, ...]:
        """Each device's request plan (``engine check`` prints it)."""
        lines: list[str] = []
        for d in settings.devices:
            lines.append(f"device {d.name} ({d.host}:{d.port} unit {d.unit}): "
                         f"{len(d.tags)} tags")
            lines += ["  " + line for line in plan_text(d.plan).splitlines() if line]
        return tuple(lines)

    @classmethod
    def outlets(cls, settings: ModbusSettings, rack_id: str) -> tuple[OutletSpec, ...]:
        """With writable tags: the ``writes`` outlet (audit events -> ``UNS_WRITES``)."""
        if not _writable(settings):
            return ()
        subject = writes_subject(rack_id)
        return (OutletSpec(name=WRITES_OUTLET, subject=subject, stream=StreamConfig(
            name=WRITES_STREAM, subjects=(subject,), storage="file")),)

    @classmethod
    def bus_permissions(cls, settings: ModbusSettings, rack_id: str) -> Permissions | None:
        """With writable tags: hear write requests, answer them; nothing else."""
        if not _writable(settings):
            return None
        return Permissions(publish=(f"{reply_prefix(rack_id)}.>",),
                           subscribe=(set_subject(rack_id),))

    @classmethod
    def stat_defs(cls, settings: ModbusSettings) -> tuple[StatDef, ...]:
        return tuple(StatDef(f"modbus.{name}", kind, doc, (("device", d.name),))
                     for d in settings.devices for name, kind, doc in STATS)

    def __init__(self, settings: ModbusSettings, ctx: GearContext):
        super().__init__(settings, ctx)
        self.mine = [(i, d) for i, d in enumerate(settings.devices)
                     if shard(d.name, ctx.replicas) == ctx.replica]

    async def run(self, emit: Callable[[list[Frame]], Awaitable[None]],
                  stopping: asyncio.Event) -> None:
        s: ModbusSettings = self.settings
        lock = asyncio.Lock()  # one emit at a time: frames of a cycle stay together

        async def publish(frames: list[Frame]) -> None:
            async with lock:
                await emit(frames)

        k = phases(sum(len(d.tags) for _, d in self.mine), len(self.mine))
        pollers = [DevicePoller(d, dict(s.groups), self.ctx.stats, i * len(STATS), publish,
                                phases=k) for i, d in self.mine]
        self.ctx.log.info("modbus polling: devices=%s (replica %d of %d)",
                          ",".join(p.dev.name for p in pollers) or "-", self.ctx.replica,
                          self.ctx.replicas)
        jobs = [p.run(stopping) for p in pollers]
        if _writable(s) and self.ctx.nats_url:
            jobs.append(self._commands(pollers, stopping))
        await asyncio.gather(*jobs)

    async def _commands(self, pollers: list[DevicePoller], stopping: asyncio.Event) -> None:
        """Answer write requests for the tags of this replica's devices (module
        ``gears.modbus.write``); replica 0 also answers for paths no device has."""
        ctx = self.ctx
        owned = {t.path: (p, t) for p in pollers for t in p.dev.tags}
        known = {t.path for d in self.settings.devices for t in d.tags}
        prefix = set_subject(ctx.rack_id, "")
        replies = reply_prefix(ctx.rack_id) + "."
        nc = await connect(ctx.nats_url, ctx.bus_auth, f"fluxrig-modbus-{ctx.replica}",
                           max_reconnect_attempts=-1, reconnect_time_wait=0.5)

        async def on_request(msg: Msg) -> None:
            path = msg.subject[len(prefix):]
            if path not in owned and (path in known or ctx.replica != 0):
                return  # another replica's device
            try:
                req = orjson.loads(msg.data)
                value, who = req["value"], str(req.get("who") or "unknown")[:128]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                answer: dict[str, Any] = {"result": "refused",
                                          "reason": "expected JSON {value, who}"}
                value, who = None, "unknown"
            else:
                answer = await self._write(owned.get(path), path, value, who)
            if msg.reply.startswith(replies):
                await nc.publish(msg.reply, orjson.dumps(answer))

        try:
            await nc.subscribe(set_subject(ctx.rack_id), cb=on_request)
            await stopping.wait()
        finally:
            await close_quietly(nc)

    async def _write(self, owner: tuple[DevicePoller, TagSettings] | None, path: str,
                     value: object, who: str) -> dict[str, Any]:
        now = time.time_ns()
        old = None
        if owner is None:
            answer: dict[str, Any] = {"result": "refused",
                                      "reason": f"no tag at {path} on this rack"}
        else:
            poller, tag = owner
            old = poller.states[tag.name].value
            try:
                planned = check(tag, value)
            except WriteRefused as exc:
                answer = {"result": "refused", "reason": str(exc)}
            else:
                answer = await poller.write(tag, planned)
        answer = {"path": path, "who": who, "old": old, "new": value, **answer}
        self.ctx.log.info("uns write: path=%s, who=%s, result=%s%s", path, who,
                          answer["result"], f", reason={answer['reason']}"
                          if "reason" in answer else "")
        outlet = self.ctx.outlets.get(WRITES_OUTLET)
        if outlet is not None and owner is not None:
            frame = encode(Frame(id=uuid7(now), ts=now, src=f"modbus:{owner[0].dev.name}",
                                 kind=WRITE_KIND, headers={"subject": path},
                                 body={**answer, "ts": now}))
            for _ in range(500):  # a full ring: wait for egress, up to ~5 s
                if outlet.try_write([frame]):
                    break
                await asyncio.sleep(0.01)
            else:
                self.ctx.log.error("uns write audit event not stored (writes ring full): "
                                   "path=%s, who=%s", path, who)
        return answer


__all__ = ["DevicePoller", "KIND", "ModbusSource", "shard"]
