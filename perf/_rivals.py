"""Rival transports for perf/ring_bench.py, behind the same small interface as the ring.

Theory of operation
-------------------
A transport object is built and ``open``-ed in the parent, then both children are forked and
inherit it (``multiprocessing.get_context("fork")``): the producer child calls
``producer_setup`` and ``produce``, the consumer child ``consumer_setup`` and ``consume``. The
consumer is set up first (the harness waits for it), so a transport that connects by name
(iceoryx2) finds its peer. A transport may define ``finish``, which each child calls once the consumer has everything
(after timing). The parent calls ``close`` once both children are gone.

Every consumer hands each record to Python as an object and touches it the same way
(``total += len(record)``); the harness checks the count and the byte total.

Batches are lists of *distinct* bytes objects with equal content: pickle memoises repeated
objects, so ``[payload] * 64`` would let ``multiprocessing.Queue`` send one payload and 63
back-references.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import queue
import struct
import time
from typing import Any

BATCH = 64  # records per producer call in every batched scenario
CONSUMER_LIMIT = 1024  # most records a batched consumer takes per call (ring poll(1024))
BUFFER_BYTES = 4 << 20  # bytes a bounded transport may hold: the ring's capacity
LARGE_FIFO_BYTES = 16 << 20  # faster-fifo's max_size_bytes: "large", 4x the ring
PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ request; /proc/sys/fs/pipe-max-size defaults to 1 MiB
IDLE_SLICE = 0.1  # seconds a consumer blocks at most before re-checking its deadline

_LEN = struct.Struct("<I")  # the pipe's length prefix


class TransportTimeout(Exception):
    """A consumer did not receive every record before its deadline."""


def make_batch(payload: bytes, count: int = BATCH) -> list[bytes]:
    """``count`` distinct bytes objects equal to ``payload`` (see the module docstring)."""
    return [bytes(bytearray(payload)) for _ in range(count)]


def _check_deadline(deadline: float, received: int, expected: int) -> None:
    if time.monotonic() > deadline:
        raise TransportTimeout(
            f"consumer timed out: received={received}, expected={expected}"
        )


class MpQueuePerMessage:
    """``multiprocessing.Queue``, one payload per ``put``; bounded to ~BUFFER_BYTES."""

    name = "mp.Queue per message"

    def open(self, ctx: Any, size: int) -> None:
        self.q = ctx.Queue(maxsize=max(BATCH, BUFFER_BYTES // size))

    def producer_setup(self) -> None:
        pass

    def consumer_setup(self) -> None:
        pass

    def produce(self, payload: bytes, n: int) -> None:
        put = self.q.put
        for _ in range(n):
            put(payload)

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        get = self.q.get
        count = total = 0
        while count < n:
            try:
                record = get(timeout=IDLE_SLICE)
            except queue.Empty:
                _check_deadline(deadline, count, n)
                continue
            total += len(record)
            count += 1
        return count, total

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class MpQueueBatched(MpQueuePerMessage):
    """``multiprocessing.Queue``, a list of BATCH payloads per ``put``."""

    name = "mp.Queue list of 64"

    def open(self, ctx: Any, size: int) -> None:
        self.q = ctx.Queue(maxsize=max(4, BUFFER_BYTES // (size * BATCH)))

    def produce(self, payload: bytes, n: int) -> None:
        batch = make_batch(payload)
        put = self.q.put
        for _ in range(n // BATCH):
            put(batch)

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        get = self.q.get
        count = total = 0
        while count < n:
            try:
                batch = get(timeout=IDLE_SLICE)
            except queue.Empty:
                _check_deadline(deadline, count, n)
                continue
            for record in batch:
                total += len(record)
            count += len(batch)
        return count, total


class OsPipe:
    """``os.pipe`` carrying 4-byte little-endian length prefixes, BATCH records per write.

    The producer joins a batch into one ``os.write``; the consumer takes whatever a buffered
    reader has (``read1``, up to 1 MiB), parses every complete record, copies each out as
    bytes (what a queue would hand over) and carries a partial tail into the next chunk.
    """

    name = "os.pipe len-prefixed x64"

    def open(self, ctx: Any, size: int) -> None:
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # keep the default 64 KiB
        self.pipe_bytes = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def producer_setup(self) -> None:
        os.close(self.r)

    def consumer_setup(self) -> None:
        os.close(self.w)

    def produce(self, payload: bytes, n: int) -> None:
        batch = make_batch(payload)
        pack = _LEN.pack
        write = os.write
        w = self.w
        for _ in range(n // BATCH):
            parts = []
            for record in batch:
                parts.append(pack(len(record)))
                parts.append(record)
            blob = memoryview(b"".join(parts))
            while blob:
                blob = blob[write(w, blob):]

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        reader = os.fdopen(self.r, "rb", buffering=PIPE_BYTES, closefd=False)
        unpack_from = _LEN.unpack_from
        count = total = 0
        rest = b""
        while count < n:
            chunk = reader.read1(PIPE_BYTES)
            if not chunk:
                raise TransportTimeout(f"pipe closed early: received={count}, expected={n}")
            data = rest + chunk if rest else chunk
            pos = 0
            end = len(data)
            while end - pos >= 4:
                (length,) = unpack_from(data, pos)
                stop = pos + 4 + length
                if stop > end:
                    break
                record = data[pos + 4:stop]
                total += len(record)
                count += 1
                pos = stop
            rest = data[pos:]
        return count, total

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class FasterFifo:
    """``faster_fifo.Queue`` with ``put_many``/``get_many`` of BATCH records (pickled)."""

    name = "faster-fifo many x64"

    def open(self, ctx: Any, size: int) -> None:
        import faster_fifo

        self.q = faster_fifo.Queue(max_size_bytes=LARGE_FIFO_BYTES)

    def producer_setup(self) -> None:
        pass

    def consumer_setup(self) -> None:
        pass

    def produce(self, payload: bytes, n: int) -> None:
        batch = make_batch(payload)
        put_many = self.q.put_many
        for _ in range(n // BATCH):
            put_many(batch, block=True, timeout=60.0)

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        get_many = self.q.get_many
        count = total = 0
        while count < n:
            try:
                records = get_many(
                    block=True, timeout=IDLE_SLICE, max_messages_to_get=CONSUMER_LIMIT
                )
            except queue.Empty:
                _check_deadline(deadline, count, n)
                continue
            for record in records:
                total += len(record)
            count += len(records)
        return count, total

    def close(self) -> None:
        self.q.close()


class FasterFifoRaw(FasterFifo):
    """``faster_fifo.Queue`` as above, but bytes go in and out without pickling.

    faster-fifo's default serializer is ``ForkingPickler.dumps``, which builds a pickler and
    copies its dispatch table per message (~5 us); bytes need no serializer at all.
    """

    name = "faster-fifo raw x64"

    def open(self, ctx: Any, size: int) -> None:
        import faster_fifo

        self.q = faster_fifo.Queue(max_size_bytes=LARGE_FIFO_BYTES, loads=bytes, dumps=_same)


def _same(obj: bytes) -> bytes:
    return obj


def iceoryx2_problem() -> str | None:
    """Why iceoryx2 cannot run here, or None if its binding imports."""
    try:
        import iceoryx2  # noqa: F401
    except Exception as exc:  # any import failure is a reason to skip, reported verbatim
        return f"import failed: {type(exc).__name__}: {exc}"
    return None


class Iceoryx2:
    """iceoryx2 publish/subscribe of ``Slice[c_uint8]``, one loaned sample per record.

    Lossless configuration: no safe overflow, a 1024-sample subscriber buffer and a publisher
    that retries until delivered, so a slow subscriber throttles the publisher the way a full
    ring does. The binding has no batch send; each record is loan, memmove, send.
    """

    name = "iceoryx2 pub/sub"

    def open(self, ctx: Any, size: int) -> None:
        self.size = size
        self.service_name = f"fx-bench-iox-{os.getpid()}-{time.monotonic_ns()}"

    def _service(self) -> Any:
        import iceoryx2 as iox2

        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        return (
            self.node.service_builder(iox2.ServiceName.new(self.service_name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(CONSUMER_LIMIT)
            .history_size(0)
            .max_publishers(1)
            .max_subscribers(1)
            .open_or_create()
        )

    def consumer_setup(self) -> None:
        self.service = self._service()
        self.subscriber = self.service.subscriber_builder().buffer_size(CONSUMER_LIMIT).create()

    def producer_setup(self) -> None:
        import iceoryx2 as iox2

        self.service = self._service()
        self.publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(self.size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.publisher.update_connections()

    def produce(self, payload: bytes, n: int) -> None:
        loan = self.publisher.loan_slice_uninit
        memmove = ctypes.memmove
        size = len(payload)
        for _ in range(n):
            sample = loan(size)
            memmove(sample.payload_ptr, payload, size)
            sample.assume_init().send()

    def consume(self, n: int, deadline: float) -> tuple[int, int]:
        receive = self.subscriber.receive
        count = total = 0
        idle = 0
        while count < n:
            sample = receive()
            if sample is None:
                idle += 1
                if idle & 0xFFFF == 0:
                    _check_deadline(deadline, count, n)
                continue
            total += sample.header.number_of_elements
            count += 1
            sample.delete()
        return count, total

    def finish(self) -> None:
        """Drop ports, service and node in the child: ``multiprocessing`` children leave by
        ``os._exit``, so without this the Rust destructors never run and the node's files
        stay in /tmp/iceoryx2 until a later node cleans up after it."""
        for port in ("publisher", "subscriber"):
            if hasattr(self, port):
                getattr(self, port).delete()
                delattr(self, port)
        for attr in ("service", "node"):
            if hasattr(self, attr):
                delattr(self, attr)
        gc.collect()

    def close(self) -> None:
        pass


RIVALS = (MpQueuePerMessage, MpQueueBatched, OsPipe, FasterFifo, FasterFifoRaw, Iceoryx2)
