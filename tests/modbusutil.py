"""Helpers for tests that talk to simulated Modbus devices.

``SimThread`` runs ``gears.modbus.simulator`` on an event loop of its own in a daemon thread,
on free ports, and hands every fault switch and register access over to that loop (the
simulator is single-threaded); each call returns once the loop has done it, so a test that
calls ``down(0)`` can connect at once and be refused. ``MbapClient`` is a blocking client on
a plain socket built on ``gears.modbus.mbap`` (our own wire core).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from engine.natsd import free_port
from gears.modbus import mbap
from gears.modbus.simulator import DEFAULT_READONLY, SimSpec, Simulator, Table

T = TypeVar("T")


class SimThread:
    """A started simulator on ``host`` (see module doc); ``stop()`` or use it in ``with``.

    Attributes:
        spec: what it simulates (with the free ports it got).
        ports: the port of every device, in device order (all equal in ``units`` mode).
        units: the unit id of every device.
    """

    def __init__(self, devices: int = 1, *, units: bool = False, registers: int = 100,
                 seed: int = 0, period: float = 60.0,
                 readonly: tuple[int, ...] = DEFAULT_READONLY, host: str = "127.0.0.1") -> None:
        ports = tuple(free_port(host) for _ in range(1 if units else devices))
        self.spec = SimSpec(devices=devices, units=units, registers=registers, seed=seed,
                            period=period, readonly=readonly, ports=ports)
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modbus-sim",
                                       daemon=True)
        self.thread.start()
        try:
            self.sim: Simulator = self._await(self._build())
        except BaseException:
            self._stop_loop()
            raise
        self.ports = [d.port for d in self.sim.devices]
        self.units = [d.unit for d in self.sim.devices]

    async def _build(self) -> Simulator:
        sim = Simulator(self.spec, self.host)
        await sim.start()  # returns once every port listens
        return sim

    def _await(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """``fn(*args)`` on the simulator's loop; its result or exception here."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout)

    # -- fault switches (DeviceSim's, by device index) -----------------------------------
    def exception(self, device: int, code: int | None) -> None:
        """Device ``device`` answers every request with exception ``code`` (None clears)."""
        self._call(self.sim.devices[device].exception, code)

    def delay(self, device: int, seconds: float) -> None:
        """Device ``device`` answers ``seconds`` late (0 clears)."""
        self._call(self.sim.devices[device].delay, seconds)

    def drop(self, device: int) -> None:
        """Close the device's live connections now."""
        self._call(self.sim.devices[device].drop)

    def down(self, device: int) -> None:
        """Stop the device listening (``units`` mode: the unit answers exception 11)."""
        self._call(self.sim.devices[device].down)

    def up(self, device: int) -> None:
        """Listen again on the same port (``units`` mode: the unit answers again)."""
        self._await(self.sim.devices[device].up())

    def requests(self, device: int) -> int:
        """Requests the device has answered so far."""
        return self._call(lambda: self.sim.devices[device].requests)

    # -- registers -----------------------------------------------------------------------
    def set_registers(self, device: int, address: int, words: Sequence[int],
                      table: Table = "holding") -> None:
        """Store ``words`` in the device's table from ``address`` (read-only or not)."""
        self._call(self.sim.devices[device].set_registers, address, list(words), table)

    def get_registers(self, device: int, address: int, count: int,
                      table: Table = "holding") -> list[int]:
        """What a read of the device's table would answer now."""
        return self._call(self.sim.devices[device].get_registers, address, count, table)

    # -- lifetime ------------------------------------------------------------------------
    def stop(self) -> None:
        """Close every port and connection, then end the thread (idempotent)."""
        if self.loop.is_closed():
            return
        try:
            self._await(self.sim.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    def __enter__(self) -> SimThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def simulated(devices: int = 1, **kwargs: Any) -> Iterator[SimThread]:
    """``SimThread(devices, **kwargs)`` for a ``with`` block or a yield fixture."""
    sim = SimThread(devices, **kwargs)
    try:
        yield sim
    finally:
        sim.stop()


class MbapClient:
    """A blocking Modbus TCP client on a plain socket: one request at a time.

    ``request`` returns the response, or ``None`` when the device closed the connection
    (EOF) before answering.
    """

    def __init__(self, host: str, port: int, *, unit: int = 1, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.unit = unit
        self.tid = 0
        self.reader = mbap.Reader()

    def request(self, frame: bytes) -> mbap.Response | None:
        self.sock.sendall(frame)
        while True:
            data = self.sock.recv(4096)
            if not data:
                return None
            got = self.reader.feed(data)
            if got:
                assert len(got) == 1 and got[0].tid == self.tid, got
                return got[0]

    def _next(self) -> int:
        self.tid = (self.tid + 1) & 0xFFFF
        return self.tid

    def read(self, function: int, address: int, count: int,
             unit: int | None = None) -> mbap.Response | None:
        """A read (function 1-4) of ``count`` from ``address``."""
        return self.request(mbap.read_request(self._next(), self.unit if unit is None else unit,
                                              function, address, count))

    def registers(self, function: int, address: int, count: int,
                  unit: int | None = None) -> list[int]:
        """The words of a read that must succeed."""
        r = self.read(function, address, count, unit)
        assert r is not None and not r.failed, r
        return r.registers(count)

    def bits(self, function: int, address: int, count: int) -> list[bool]:
        """The bits of a read that must succeed."""
        r = self.read(function, address, count)
        assert r is not None and not r.failed, r
        return r.bits(count)

    def write(self, address: int, words: Sequence[int],
              unit: int | None = None) -> mbap.Response | None:
        """Write registers (function 6 for one word, 16 for more)."""
        return self.request(mbap.write_registers_request(
            self._next(), self.unit if unit is None else unit, address, words))

    def write_coil(self, address: int, value: bool) -> mbap.Response | None:
        """Write one coil (function 5)."""
        return self.request(mbap.write_coil_request(self._next(), self.unit, address, value))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MbapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
