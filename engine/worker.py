"""Process bodies for gears: stage workers (tight loops) and asyncio io processes.

Theory of operation
-------------------
The supervisor forks one process per ``ProcessSpec`` and calls ``run_process`` in the child.
Rings and counters were created by the supervisor before the fork; the child takes its side
of each ring (``consumer()`` on inputs, ``producer()`` on outputs), which resumes at the
positions in shared memory. That is what makes a restart lossless:

* a stage worker commits its input batch only after every frame it emitted is published in
  its output ring; killed in between, its successor re-reads the batch (at-least-once; the
  frame ids are unchanged, so egress de-duplicates);
* a sink commits after ``write`` returned.

Lanes: a pipeline with ``--workers N`` has N lanes. The source picks a frame's lane from the
pipeline ``key`` (crc32 of the key's value, so a key always takes the same lane and keeps its
order), stage replica *i* serves lane *i* from end to end, and each sink reads all N lanes.

Stop: SIGTERM sets a flag; the loop finishes the batch in hand and returns. The supervisor
drains (stops the source, waits for empty rings) before it stops the others.

Bad input: a frame that does not decode, or that makes a gear raise, is written to the
dead-letter file ``<data_dir>/deadletter/<pipeline>.<gear>.cbor`` (a CBOR sequence of
``{"error", "gear", "frame"}``), counted as an error and logged with the frame id only, and the
worker goes on: one bad frame neither stops the lane nor loses its neighbours.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import zlib
from collections.abc import Sequence
from typing import Any

from engine.cbor import dumps
from engine.counters import ERRORS, Counters
from engine.fanout import RouteError, targets
from engine.frame import Frame, FrameError, decode, encode, path_get
from engine.masking import mask_card_numbers, mask_tree
from engine.outlet import MAIN, Outlet
from engine.plan import ProcessSpec, Runtime, signal_ready
from engine.ring import Producer, wait_any
from engine.settle import Settle
from engine.tap import OFF, LogShipSettings, Tap, Tracer, install_log_tap
from gears.base import GearContext, Sink, Source, Stage, gear_class

log = logging.getLogger("fluxrig.worker")

POLL_WAIT = 0.5  # seconds an idle loop sleeps on its doorbell before re-checking its flags


class _Stop:
    """SIGTERM/SIGINT -> a flag the loops check between batches."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C goes to it

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True


def lane_of(frame: Frame, key: str | None, lanes: int, fallback: int) -> int:
    """The lane of ``frame``: crc32 of its key value, or ``fallback`` without a key."""
    if lanes == 1:
        return 0
    if key is None:
        return fallback % lanes
    value = path_get(frame, key)
    data = value if isinstance(value, bytes) else str(value).encode()
    return zlib.crc32(data) % lanes


def make_context(spec: ProcessSpec, rt: Runtime, producers: Sequence[Producer] = (),
                 dead: DeadLetters | None = None) -> GearContext:
    """The GearContext for a spec's gear (``producers``: a source's lane producers, so the
    outlet ``"out"`` of a replicated source shares the one producer of its lane; ``dead``:
    the process's dead-letter file, made here when not given)."""
    assert spec.gear is not None
    letters = dead if dead is not None else DeadLetters(rt, spec)
    counters = spec.counters

    def dead_letter(frame: Frame, reason: str) -> None:
        if counters is not None:
            counters.add(ERRORS)
        letters.put(frame, reason)
    outlets = {name: Outlet(name, ring.producer(), None) for name, ring in spec.outlets.items()}
    if len(producers) == 1:  # one lane to write: the gear may write it synchronously
        outlets[MAIN] = Outlet(MAIN, producers[0], spec.counters)
    stats = None
    if spec.stat_defs and spec.counters is not None:
        stats = spec.counters.stats(spec.stat_defs)
    return GearContext(
        rack_id=rt.rack_id,
        pipeline=spec.pipeline,
        name=spec.gear.name,
        replica=spec.replica,
        replicas=spec.replicas,
        data_dir=rt.data_dir,
        log=logging.getLogger(f"fluxrig.{spec.pipeline}.{spec.gear.name}"),
        counters=spec.counters,
        nats_url=rt.nats_url,
        stats=stats,
        journal=spec.journal,
        outlets=outlets,
        listeners=tuple(spec.listeners),
        bus_auth=spec.bus_auth,
        ready=lambda: signal_ready(rt, spec.name),
        tracer=Tracer(rt.traces, _TAP) if _TAP is not None else OFF,
        dead_letter=dead_letter,
        durable=Settle(spec.settle) if spec.settle else None,
    )


class DeadLetters:
    """Append-only CBOR sequence of frames a gear could not handle."""

    def __init__(self, rt: Runtime, spec: ProcessSpec):
        gear = spec.gear.name if spec.gear else spec.role
        self.path = os.path.join(rt.data_dir, "deadletter", f"{spec.pipeline}.{gear}.cbor")
        self.gear = gear
        self._fd: int | None = None

    def put(self, data: bytes | memoryview | Frame, error: Exception | str) -> None:
        """Record one rejected frame (its bytes, or the decoded frame) with the reason (an
        exception or a text). Never raises: a dead letter that cannot be written whole is
        written as what can be (the reason and the frame id), and one that cannot be
        written at all is logged and counted by the caller; the lane goes on either way.

        Card numbers are masked in the frame's texts, bytes and numbers and in the reason:
        a frame dead-lettered before the stage that masks it (an HTTP event holding a PAN)
        must not put the card number on disk. The file is for diagnosis; what is replayed
        comes from the source."""
        try:
            reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            reason = mask_card_numbers(reason)
        except Exception:  # an exception whose str() fails
            reason = type(error).__name__
        try:
            record = {"error": reason, "gear": self.gear, "frame": _masked(data)}
            blob = dumps(record)
        except Exception as exc:  # a frame that cannot be walked or encoded again
            frame_id = data.id if isinstance(data, Frame) else b""
            blob = dumps({"error": f"{reason}; not kept: {type(exc).__name__}",
                          "gear": self.gear, "frame": None, "frame_id": frame_id})
        try:
            if self._fd is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            os.write(self._fd, blob)
        except OSError as exc:
            log.error("dead letter not written: path=%s, error=%s", self.path, exc)


def _masked(data: bytes | memoryview | Frame) -> bytes:
    if isinstance(data, Frame):
        frame = data
    else:
        try:
            frame = decode(data)
        except FrameError:  # not a frame: mask what reads as text
            return bytes(mask_tree(bytes(data)))  # type: ignore[arg-type]
    return encode(Frame(id=frame.id, ts=frame.ts, src=mask_card_numbers(frame.src),
                        kind=mask_card_numbers(frame.kind),
                        headers=mask_tree(dict(frame.headers)),  # type: ignore[arg-type]
                        body=mask_tree(frame.body)))


_TAP: Tap | None = None  # this process's signal tap (one writer per process: the tap's lock)


def run_process(spec: ProcessSpec, rt: Runtime) -> None:
    """Entry point of a forked rack process (never returns normally: exits the child)."""
    global _TAP
    _TAP = Tap(spec.tap, spec.counters) if spec.tap is not None else None
    if _TAP is not None:
        install_log_tap(_TAP, rt.logs)
    else:  # no tap of its own: never write into the supervisor's
        install_log_tap(None, LogShipSettings(enabled=False))
    if spec.cpu is not None:
        try:
            os.sched_setaffinity(0, {spec.cpu})
        except OSError as exc:
            log.warning("cannot pin: process=%s, cpu=%s, error=%s", spec.name, spec.cpu, exc)
    if spec.role == "telemetry":
        # Sampling every process with psutil is a burst of a few ms each interval; on a
        # small host the data path must win that CPU, so telemetry yields it.
        os.nice(10)
    # Everything imported so far lives as long as the process: keep it out of the cyclic
    # GC's full collections, whose pauses would otherwise land in the latency tail.
    import gc

    gc.freeze()
    if spec.role == "stage":
        run_stage(spec, rt)
    elif spec.role == "source":
        import asyncio

        asyncio.run(run_source(spec, rt))
    elif spec.role == "sink":
        import asyncio

        asyncio.run(run_sink(spec, rt))
    elif spec.role == "egress":
        from engine.egress import run_egress

        run_egress(spec, rt)
    elif spec.role == "hublink":
        from engine.hublinkproc import run_hublink

        run_hublink(spec, rt)
    elif spec.role == "telemetry":
        from engine.telemetry import run_telemetry

        run_telemetry(spec, rt)
    else:  # pragma: no cover - the supervisor only builds the roles above
        raise ValueError(f"unknown process role: role={spec.role}")


def _decode_batch(views: Sequence[memoryview], dead: DeadLetters, counters: Counters,
                  name: str) -> tuple[list[Frame], int]:
    frames: list[Frame] = []
    nbytes = 0
    for view in views:
        nbytes += len(view)
        try:
            frames.append(decode(view))
        except FrameError as exc:
            counters.add(ERRORS)
            dead.put(view, exc)
            log.error("undecodable frame dead-lettered: process=%s, error=%s", name, exc)
    return frames, nbytes


def run_stage(spec: ProcessSpec, rt: Runtime) -> None:
    """A stage worker: input ring -> gear.process -> output ring(s), one batch at a time.

    A fan-out stage (``spec.sinks``) writes one ring per sink and sends each frame to the
    sinks its ``route`` header names (``engine.fanout``); the input batch is committed only
    when every output ring holds its part.
    """
    stop = _Stop()
    assert spec.gear is not None and spec.counters is not None
    dead = DeadLetters(rt, spec)
    gear = gear_class(spec.gear.gear, Stage)(spec.gear.settings, make_context(spec, rt,
                                                                              dead=dead))
    signal_ready(rt, spec.name)
    consumer = spec.inputs[0].consumer()
    producers = [ring.producer() for ring in spec.outputs]
    counters = spec.counters
    batch = rt.batch
    while not stop.set:
        if not consumer.wait(POLL_WAIT):
            continue
        views = consumer.poll(batch)
        frames, nbytes_in = _decode_batch(views, dead, counters, spec.name)
        out: list[Frame] = []
        try:
            gear.process(frames, out.append)
        except Exception:
            out = _process_one_by_one(gear, frames, dead, counters, spec.name)
        del views
        try:
            encoded_out = [encode(f) for f in out]
        except Exception:  # a gear passed on a value CBOR cannot hold (a cycle, say)
            out, encoded_out = _encodable(out, dead, counters, spec.name)
        parts = _split(out, encoded_out, spec.sinks, dead, counters, spec.name) \
            if spec.sinks else [encoded_out]
        sent = 0
        for producer, encoded in zip(producers, parts):
            done = 0
            while done < len(encoded):
                done += producer.write(encoded[done:], timeout=POLL_WAIT)
                if stop.set and done < len(encoded):
                    return  # not committed: the successor replays this batch
            sent += len(encoded)
        consumer.commit()
        now = time.time_ns()
        for f in frames:
            counters.observe(now - f.ts)
        counters.count_batch(len(frames), sent, nbytes_in,
                             sum(len(e) for part in parts for e in part))
    gear.close()


def _encodable(out: list[Frame], dead: DeadLetters, counters: Counters, name: str
               ) -> tuple[list[Frame], list[bytes]]:
    """The frames of ``out`` that encode, with their bytes; the others dead-lettered."""
    frames, encoded = [], []
    for frame in out:
        try:
            data = encode(frame)
        except Exception as exc:
            counters.add(ERRORS)
            dead.put(frame, exc)
            log.error("unencodable frame dead-lettered: process=%s, frame_id=%s, error=%s",
                      name, frame.id.hex(), type(exc).__name__)
            continue
        frames.append(frame)
        encoded.append(data)
    return frames, encoded


def _split(out: list[Frame], encoded: list[bytes], sinks: Sequence[str], dead: DeadLetters,
           counters: Counters, name: str) -> list[list[bytes]]:
    """A fan-out stage's output, one list of encoded frames per sink (by route)."""
    parts: list[list[bytes]] = [[] for _ in sinks]
    for frame, data in zip(out, encoded):
        try:
            picked = targets(frame.headers, sinks)
        except RouteError as exc:
            counters.add(ERRORS)
            dead.put(data, exc)
            log.error("unroutable frame dead-lettered: process=%s, frame_id=%s, error=%s",
                      name, frame.id.hex(), exc)
            continue
        for i in picked:
            parts[i].append(data)
    return parts


def _process_one_by_one(gear: Stage, frames: list[Frame], dead: DeadLetters,
                        counters: Counters, name: str) -> list[Frame]:
    # The batch failed: find the frames that fail alone, dead-letter them, keep the rest.
    out: list[Frame] = []
    for frame in frames:
        mine: list[Frame] = []
        try:
            gear.process([frame], mine.append)
        except Exception as exc:
            counters.add(ERRORS)
            dead.put(frame, exc)  # not encode(frame): a frame may not encode again (a cycle)
            log.error("gear failed on frame, dead-lettered: process=%s, frame_id=%s, error=%s",
                      name, frame.id.hex(), type(exc).__name__)
            continue
        out.extend(mine)
    return out


async def run_source(spec: ProcessSpec, rt: Runtime) -> None:
    """An io process running a Source gear; frames go to lane rings by key."""
    import asyncio

    assert spec.gear is not None and spec.counters is not None
    cls = gear_class(spec.gear.gear, Source)
    producers = [ring.producer() for ring in spec.outputs]
    gear = cls(spec.gear.settings, make_context(spec, rt, producers))
    lanes = len(producers)
    counters = spec.counters
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    batch_no = 0

    async def emit(frames: list[Frame | bytes]) -> None:
        nonlocal batch_no
        per_lane: list[list[bytes]] = [[] for _ in range(lanes)]
        for frame in frames:
            if isinstance(frame, bytes):  # encoded by the gear (engine.frame.encode_parts)
                lane = 0 if lanes == 1 else lane_of(decode(frame), spec.key, lanes, batch_no)
                per_lane[lane].append(frame)
                continue
            per_lane[lane_of(frame, spec.key, lanes, batch_no)].append(encode(frame))
        batch_no += 1
        nbytes = 0
        for producer, encoded in zip(producers, per_lane):
            if encoded:
                await producer.write_async(encoded)
                nbytes += sum(map(len, encoded))
        counters.count_batch(0, len(frames), 0, nbytes)

    if not cls.signals_ready:
        signal_ready(rt, spec.name)
    try:
        await gear.run(emit, stopping)
        await stopping.wait()  # a finite source idles until the rack stops
    finally:
        gear.close()


async def _write_until_stopped(gear: Sink, frames: list[Frame], stopping: Any,
                               counters: Counters, name: str) -> bool:
    """``gear.write(frames)``, retried while it raises, until it returns (True) or the rack
    stops the process (False: the write is cancelled, the batch stays in the ring). A sink
    whose receiver is down would otherwise hold a drain until the supervisor kills it."""
    import asyncio

    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            write = asyncio.ensure_future(gear.write(frames))
            await asyncio.wait({write, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not write.done():
                write.cancel()
                await asyncio.gather(write, return_exceptions=True)
                return False
            exc = write.exception()
            if exc is None:
                return True
            counters.add(ERRORS)  # a sink failure is retried, never skipped
            log.error("sink write failed, retrying: process=%s, error=%s", name, exc)
            pause = asyncio.ensure_future(asyncio.sleep(1.0))
            await asyncio.wait({pause, stop}, return_when=asyncio.FIRST_COMPLETED)
            pause.cancel()
            if stop.done():
                return False
    finally:
        stop.cancel()


async def run_sink(spec: ProcessSpec, rt: Runtime) -> None:
    """An io process running a Sink gear over all lanes of its pipeline.

    ``write`` gets up to the gear's ``batching().count`` frames of one lane (default: one
    poll, at most ``rings.batch``); with a ``linger`` it waits that long for a short batch to
    fill. The lane is committed once ``write`` returned: a batch it raised on is retried, a
    batch in hand at a kill is read again by the successor.
    """
    import asyncio

    assert spec.gear is not None and spec.counters is not None
    cls = gear_class(spec.gear.gear, Sink)
    dead = DeadLetters(rt, spec)
    gear = cls(spec.gear.settings, make_context(spec, rt, dead=dead))
    batching = cls.batching(spec.gear.settings)
    count = batching.count if batching is not None else rt.batch
    linger = batching.linger if batching is not None else 0.0
    signal_ready(rt, spec.name)
    consumers = [ring.consumer() for ring in spec.inputs]
    counters = spec.counters
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not stopping.is_set():
        if not await wait_any(consumers, spec.inputs, POLL_WAIT):
            continue
        for consumer in consumers:
            views = consumer.poll(count)
            if not views:
                continue
            if linger and len(views) < count:
                ring = spec.inputs[consumers.index(consumer)]
                deadline = time.monotonic() + linger
                while len(views) < count and not stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0 or not await wait_any([consumer], [ring], left):
                        break
                    views += consumer.poll(count - len(views))
            frames, nbytes = _decode_batch(views, dead, counters, spec.name)
            del views
            if not await _write_until_stopped(gear, frames, stopping, counters, spec.name):
                await gear.aclose()
                return  # stopped mid-write: not committed, the next start sends it again
            consumer.commit()
            now = time.time_ns()
            for f in frames:
                counters.observe(now - f.ts)
            counters.count_batch(len(frames), len(frames), nbytes, nbytes)
    await gear.aclose()
