"""Modbus TCP device simulator: N devices with moving values and fault switches, on pymodbus.

Theory of operation
-------------------
Each simulated device is a pymodbus ``SimDevice`` (four separate tables: coils, discrete
inputs, holding and input registers, all 0-based on the wire) served by a pymodbus
``ModbusTcpServer``. Either every device listens on a port of its own (``port + i``, or
``ports[i]``) and answers whatever unit id a request carries (Modbus TCP devices that are
not gateways ignore it: Messaging Implementation Guide v1.0b section 4.4.2; we print unit
1), or, with ``units``, all devices share one port as unit ids ``1..N`` behind a simulated
gateway, which answers any other unit id with exception 11 (gateway target device failed
to respond).

Nothing ticks: the moving registers are functions of the clock (``time.monotonic``),
computed by ``Motion`` when a request reads them, inside the ``SimDevice(action=...)``
hook, and written into pymodbus's register list just before pymodbus answers. An idle
device costs nothing; a read costs a few float operations more than pymodbus's own work.

Everything here lives on one event loop thread; the fault switches of ``DeviceSim`` are
plain methods to be called on that thread (``tests/modbusutil.py`` hops threads for tests).

Register map (every device; ``R`` = ``SimSpec.registers``, at least ``MIN_REGISTERS``)
----------------------------------------------------------------------------------
Holding registers (function 3; written by 6/16)::

    address  type                  value
    0        uint16                counter: +COUNTER_RATE per second, wraps at 65536
    1        int16                 sine: round(1000 * sin(2*pi*(t/period + phase)))
    2        int16                 random walk: every 0.25 s a step of -50..+50, within
                                   +-30000, seeded by (seed, device)
    3-4      float32 ABCD          50.0 + 25.0 * sin(2*pi*(t/period + phase))
    5        uint16                device number, 1-based (= unit id in ``units`` mode)
    6-7      int32 ABCD            -123456789          (F8A4 32EB)
    8-9      float32 CDAB          123.456             (E979 42F6)
    10-13    float64 ABCD          -9876.54321         (C0C3 4A45 87E7 C06E)
    14       uint16 bits           0xA5C3              (bit-in-register tags)
    15       uint16                setpoint, 500 at start (meant to be written)
    16-21    string(12) ABCD       "FLUXSIM-0001" (the device number, 4 digits)
    22..R-1  uint16                the address itself (static)

``phase`` is ``(device index * 0.618034) mod 1`` so devices do not move in lockstep;
``period`` is ``SimSpec.period`` (60 s by default).

Input registers (function 4), 0..R-1: addresses 0-5 as the holding table (the same values
at the same instant), every other address ``a`` holds ``(30000 + a) mod 65536`` — a read
of the wrong table is visible at once.

Coils (function 1; written by 5/15), 0..R-1: coil ``a`` is on at start when ``a % 3 == 0``.

Discrete inputs (function 2), 0..R-1: input 0 is a square wave (on during the first second
of every two), input ``a > 0`` is on when ``a`` is odd.

Writes and read-only registers
------------------------------
Writes (functions 5, 6, 15, 16) are stored and read back. Holding addresses in
``SimSpec.readonly`` (default ``DEFAULT_READONLY``: the moving registers and the device
number) refuse writes with exception 2 (illegal data address: pymodbus's answer for a
read-only ``SimData``); a write of several registers that touches one of them is refused
whole. A moving register made writable keeps a written value only until the next read
recomputes it. Reads or writes outside the map answer exception 2.

Fault switches (``DeviceSim``)
------------------------------
* ``exception(code)``: every request inside the map answers exception ``code``
  (reads and writes alike); ``None`` clears it.
* ``delay(seconds)``: every request is answered ``seconds`` late; 0 clears it.
* ``drop()``: closes the device's live connections now (clients see EOF); it keeps
  listening. In ``units`` mode that is every connection of the shared port.
* ``down()`` / ``up()``: stop listening and close live connections / listen again on the
  same port, with the registers as they were. In ``units`` mode the port stays up and the
  unit answers exception 11 while down, as a gateway does for a dead target.

Requests held back by ``delay`` when their connections close (``drop``, ``down``,
``close``) are cancelled: they are never answered (pymodbus would log an error for each).

Limits inherited from pymodbus 3.16's server: one request at a time per connection. It
parses one frame per ``data_received`` and clears its receive buffer when it answers, so a
client that pipelines requests (several outstanding transaction ids) loses some of them;
under ``delay`` a second request on the same connection is answered with the wrong
transaction id. Use one connection per outstanding request against this simulator.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

# -- the register map (see the module doc) ------------------------------------------------
COUNTER: Final = 0
SINE: Final = 1
WALK: Final = 2
FLOAT_SINE: Final = 3  # and 4
MOVING_END: Final = 5  # addresses 0..4 are recomputed at every read
DEVICE_NUMBER: Final = 5
INT32: Final = 6
FLOAT32_CDAB: Final = 8
FLOAT64: Final = 10
BITS: Final = 14
SETPOINT: Final = 15
NAME: Final = 16  # 6 registers
STATIC: Final = 22
MIN_REGISTERS: Final = STATIC

INT32_VALUE: Final = -123456789
FLOAT32_VALUE: Final = 123.456
FLOAT64_VALUE: Final = -9876.54321
BITS_VALUE: Final = 0xA5C3
SETPOINT_VALUE: Final = 500
INPUT_STATIC_BASE: Final = 30000
SQUARE: Final = 0  # the discrete input that blinks

COUNTER_RATE: Final = 10  # counts per second: a poller at 1 s sees it change every poll
SINE_AMPLITUDE: Final = 1000
FLOAT_MEAN: Final = 50.0
FLOAT_AMPLITUDE: Final = 25.0
WALK_STEP: Final = 0.25  # seconds per random-walk step
WALK_MAX_STEP: Final = 50
WALK_LIMIT: Final = 30000
WALK_CATCH_UP: Final = 10_000  # steps replayed at most after a long unread gap
GOLDEN: Final = 0.618034  # phase spacing of devices: no two devices in step

DEFAULT_READONLY: Final = (COUNTER, SINE, WALK, FLOAT_SINE, FLOAT_SINE + 1, DEVICE_NUMBER)
MAX_UNITS: Final = 247  # highest individual unit id (Modbus Application Protocol 4.2)

_READS: Final = frozenset((1, 2, 3, 4))
_TABLES: Final = {"coil": "c", "discrete": "d", "holding": "h", "input": "i"}

Table = Literal["coil", "discrete", "holding", "input"]


class SimulatorError(RuntimeError):
    """The simulator could not listen where it was told to (the message says where)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSpec:
    """What to simulate.

    Attributes:
        devices: how many devices (1..247 in ``units`` mode).
        port: the first port; device ``i`` listens on ``port + i`` (``units``: all on it).
        units: all devices on one port as unit ids ``1..devices``.
        registers: size ``R`` of every table (at least ``MIN_REGISTERS``).
        seed: seeds the random walks (device ``i`` walks with ``(seed, i)``).
        period: seconds per turn of the sines.
        readonly: holding addresses that refuse writes (exception 2).
        ports: explicit ports instead of ``port + i`` (one per device, or one for
            ``units``); tests pass free ports here.
    """

    devices: int = 1
    port: int = 5020
    units: bool = False
    registers: int = 100
    seed: int = 0
    period: float = 60.0
    readonly: tuple[int, ...] = DEFAULT_READONLY
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        top = MAX_UNITS if self.units else 65535
        if not 1 <= self.devices <= top:
            raise ValueError(f"devices out of range: devices={self.devices}, max={top}")
        if not MIN_REGISTERS <= self.registers <= 65535:
            raise ValueError(f"registers out of range: registers={self.registers}, "
                             f"min={MIN_REGISTERS}, max=65535")
        if not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"period must be positive: period={self.period}")
        bad = [a for a in self.readonly if not 0 <= a < self.registers]
        if bad:
            raise ValueError(f"readonly address outside the map: address={bad[0]}, "
                             f"registers={self.registers}")
        need = 1 if self.units else self.devices
        if self.ports and len(self.ports) != need:
            raise ValueError(f"wrong number of ports: ports={len(self.ports)}, need={need}")
        for p in self.listen_ports():
            if not 1 <= p <= 65535:
                raise ValueError(f"port out of range: port={p}")

    def listen_ports(self) -> list[int]:
        """The ports listened on: one per device, or the one port of ``units`` mode."""
        if self.ports:
            return list(self.ports)
        return [self.port] if self.units else [self.port + i for i in range(self.devices)]


class Motion:
    """The moving registers (0..4) of one device as functions of time — sans-I/O.

    The random walk is the only state: its value after step ``n`` depends on the seed and
    ``n`` alone, as long as no read leaves a gap longer than ``WALK_CATCH_UP`` steps (then
    it resumes from where it was). Time going backwards leaves the walk where it is.
    """

    __slots__ = ("origin", "period", "phase", "_rng", "_step", "_walk")

    def __init__(self, seed: int, index: int, period: float, origin: float) -> None:
        self.origin = origin
        self.period = period
        self.phase = (index * GOLDEN) % 1.0
        # a str seed is hashed with SHA-512 by random: the same walk on every run and host
        self._rng = random.Random(f"{seed}/{index}")
        self._step = 0
        self._walk = 0

    def walk(self, t: float) -> int:
        """The random walk at time ``t`` (int16)."""
        n = int((t - self.origin) / WALK_STEP)
        if n - self._step > WALK_CATCH_UP:
            self._step = n - WALK_CATCH_UP
        rnd, v = self._rng.randint, self._walk
        for _ in range(n - self._step):
            v = max(-WALK_LIMIT, min(WALK_LIMIT, v + rnd(-WALK_MAX_STEP, WALK_MAX_STEP)))
        self._step, self._walk = max(n, self._step), v
        return v

    def words(self, t: float) -> tuple[int, int, int, int, int]:
        """Registers 0..4 at time ``t``: counter, sine, walk, float32 sine (2 words)."""
        elapsed = t - self.origin
        s = math.sin(2 * math.pi * (elapsed / self.period + self.phase))
        hi, lo = struct.unpack(">HH", struct.pack(">f", FLOAT_MEAN + FLOAT_AMPLITUDE * s))
        return (int(elapsed * COUNTER_RATE) & 0xFFFF, round(SINE_AMPLITUDE * s) & 0xFFFF,
                self.walk(t) & 0xFFFF, hi, lo)

    def square(self, t: float) -> bool:
        """Discrete input 0 at time ``t``: on in the first second of every two."""
        return int(t - self.origin) % 2 == 0


def _words(fmt: str, value: float | int) -> list[int]:
    raw = struct.pack(fmt, value)
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


def initial_holding(number: int, registers: int) -> list[int]:
    """The holding table of device ``number`` (1-based) at start, moving registers at 0."""
    words = list(range(registers))
    words[:MOVING_END] = [0] * MOVING_END
    words[DEVICE_NUMBER] = number & 0xFFFF
    words[INT32:INT32 + 2] = _words(">i", INT32_VALUE)
    hi, lo = _words(">f", FLOAT32_VALUE)
    words[FLOAT32_CDAB:FLOAT32_CDAB + 2] = [lo, hi]  # CDAB: the words swapped
    words[FLOAT64:FLOAT64 + 4] = _words(">d", FLOAT64_VALUE)
    words[BITS] = BITS_VALUE
    words[SETPOINT] = SETPOINT_VALUE
    name = f"FLUXSIM-{number % 10000:04d}".encode("ascii")
    words[NAME:NAME + 6] = list(struct.unpack(">6H", name))
    return words


def initial_input(number: int, registers: int) -> list[int]:
    """The input table of device ``number`` at start."""
    words = [(INPUT_STATIC_BASE + a) & 0xFFFF for a in range(registers)]
    words[:MOVING_END] = [0] * MOVING_END
    words[DEVICE_NUMBER] = number & 0xFFFF
    return words


def _holding_blocks(words: list[int], readonly: Sequence[int]) -> list[SimData]:
    """``words`` as runs of SimData, each run all read-only or all writable."""
    ro = set(readonly)
    blocks: list[SimData] = []
    start = 0
    for a in range(1, len(words) + 1):
        if a == len(words) or (a in ro) != (start in ro):
            blocks.append(SimData(start, values=words[start:a], datatype=DataType.REGISTERS,
                                  readonly=start in ro))
            start = a
    return blocks


def _simdevice(unit: int, spec: SimSpec, number: int, action: SimAction) -> SimDevice:
    r = spec.registers
    return SimDevice(id=unit, action=action,
                     simdata=([SimData(0, values=[a % 3 == 0 for a in range(r)],
                                       datatype=DataType.BITS)],
                              [SimData(0, values=[a % 2 == 1 for a in range(r)],
                                       datatype=DataType.BITS)],
                              _holding_blocks(initial_holding(number, r), spec.readonly),
                              [SimData(0, values=initial_input(number, r),
                                       datatype=DataType.REGISTERS)]))


class _Listener:
    """One port: its pymodbus server (built on first listen, kept across down/up so the
    registers survive), the devices behind it and the requests they hold back (``delay``)."""

    __slots__ = ("host", "port", "devices", "server", "held")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.devices: list[DeviceSim] = []
        self.server: ModbusTcpServer | None = None
        self.held: set[asyncio.Task[object]] = set()

    async def hold(self, seconds: float) -> None:
        """Sleep in the request's task, cancelled if its connection goes first."""
        task = asyncio.current_task()
        assert task is not None
        self.held.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.held.discard(task)

    def release(self) -> list[asyncio.Task[object]]:
        """Cancel the held requests, whose connections are closing: pymodbus would log an
        error for every answer it cannot send, a cancelled request sends nothing. Returns
        them for whoever must see them finished."""
        held = list(self.held)
        self.held.clear()
        for task in held:
            task.cancel()
        return held

    @property
    def listening(self) -> bool:
        return self.server is not None and self.server.transport is not None

    async def listen(self, spec: SimSpec) -> None:
        if self.server is None:
            sims = [d.simdevice() for d in self.devices]
            if spec.units:
                sims.append(_simdevice(0, spec, 0, _absent_unit))
            self.server = ModbusTcpServer(sims, address=(self.host, self.port))
        if not self.listening and not await self.server.listen():
            raise SimulatorError(f"cannot listen: host={self.host}, port={self.port}")

    def drop(self) -> list[asyncio.Task[object]]:
        held = self.release()
        if self.server is not None:
            for conn in list(self.server.active_connections.values()):
                conn.close()
        return held

    def close(self) -> list[asyncio.Task[object]]:
        held = self.release()
        # ModbusProtocol.close closes the asyncio.Server (its sockets synchronously) and
        # every live connection; listen() may open it again
        if self.server is not None and self.listening:
            self.server.close()
        return held


async def _absent_unit(function: int, start: int, address: int, count: int,
                       registers: list[int], values: object) -> ExcCodes | None:
    return ExcCodes.GATEWAY_NO_RESPONSE


class DeviceSim:
    """One simulated device: its tables, its motion and its fault switches.

    Attributes:
        index: 0-based position in the simulator.
        number: ``index + 1``; holding/input register 5 and the name hold it.
        host, port, unit: where it answers (``unit`` 1 when it has a port of its own).
        requests: requests inside the map answered (or faulted) so far.
    """

    def __init__(self, index: int, listener: _Listener, spec: SimSpec, origin: float,
                 clock: Callable[[], float]) -> None:
        self.index = index
        self.number = index + 1
        self.host = listener.host
        self.port = listener.port
        self.unit = self.number if spec.units else 1
        self.requests = 0
        self._id = self.number if spec.units else 0  # pymodbus id 0: every unit id
        self._spec = spec
        self._listener = listener
        self._clock = clock
        self._motion = Motion(spec.seed, index, spec.period, origin)
        self._fault: ExcCodes | None = None
        self._delay = 0.0
        self._down = False

    def simdevice(self) -> SimDevice:
        """The pymodbus device (built when its server is)."""
        return _simdevice(self._id, self._spec, self.number, self._action)

    async def _action(self, function: int, start: int, address: int, count: int,
                      registers: list[int], values: object) -> ExcCodes | None:
        # pymodbus calls this after its own address and read-only checks, before it stores
        # a write; 5 and 6 call it again to read the written value back (values None)
        if function in _READS or values is not None:
            self.requests += 1
            if self._down:
                return ExcCodes.GATEWAY_NO_RESPONSE
            if self._delay:
                await self._listener.hold(self._delay)
            if self._fault is not None:
                return self._fault
        if (function == 3 or function == 4) and address < MOVING_END:
            self._move_words(registers, address - start, count)
        elif function == 2 and address < 16:
            # bit tables come as words of 16 bits, bit 0 first; our tables start at word 0
            registers[0] = (registers[0] & ~1) | self._motion.square(self._clock())
        return None

    def _move_words(self, registers: list[int], offset: int, count: int) -> None:
        words = self._motion.words(self._clock())
        for a in range(max(offset, 0), min(offset + count, MOVING_END)):
            registers[a] = words[a]

    # -- fault switches --------------------------------------------------------------------
    def exception(self, code: int | None) -> None:
        """Answer every request with exception ``code`` (1-8, 10, 11); ``None`` clears it.

        Raises:
            ValueError: not a Modbus exception code.
        """
        if code is None:
            self._fault = None
            return
        try:
            self._fault = ExcCodes(code)
        except ValueError:
            raise ValueError(f"not a Modbus exception code: code={code}, "
                             f"allowed={sorted(int(c) for c in ExcCodes)}") from None

    def delay(self, seconds: float) -> None:
        """Answer every request ``seconds`` late; 0 answers at once again."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be finite and >= 0: seconds={seconds}")
        self._delay = seconds

    def drop(self) -> None:
        """Close the live connections now (in ``units`` mode: all of the shared port);
        requests held back by ``delay`` go unanswered."""
        self._listener.drop()

    def down(self) -> None:
        """Stop answering: close the port and its connections (``units``: exception 11)."""
        if self._spec.units:
            self._down = True
        else:
            self._listener.close()

    async def up(self) -> None:
        """Answer again, on the same port, with the registers as they were.

        Raises:
            SimulatorError: the port cannot be listened on again (taken meanwhile).
        """
        if self._spec.units:
            self._down = False
        else:
            await self._listener.listen(self._spec)

    @property
    def listening(self) -> bool:
        """Whether its port accepts connections."""
        return self._listener.listening

    # -- direct access (tests, demos) ------------------------------------------------------
    def _table(self, table: Table, address: int, count: int) -> list[int]:
        server = self._listener.server
        if server is None:
            raise RuntimeError(f"simulator not started: device={self.number}")
        if table not in ("holding", "input"):
            raise ValueError(f"not a register table: table={table}")
        if address < 0 or count < 0 or address + count > self._spec.registers:
            raise ValueError(f"registers outside the map: address={address}, count={count}, "
                             f"registers={self._spec.registers}")
        # pymodbus 3.16 has no public accessor for a device's tables; this is the list the
        # action hook is handed as current_registers (start address 0)
        return server.context.devices[self._id].block[_TABLES[table]][2]  # type: ignore[union-attr]

    def set_registers(self, address: int, words: Sequence[int],
                      table: Table = "holding") -> None:
        """Store ``words`` from ``address``, read-only or not (moving ones are recomputed).

        Raises:
            ValueError: outside the map, or a word outside 0..65535.
        """
        regs = self._table(table, address, len(words))
        if any(not 0 <= w <= 0xFFFF for w in words):
            raise ValueError(f"word out of range: words={list(words)}")
        regs[address:address + len(words)] = words

    def get_registers(self, address: int, count: int, table: Table = "holding") -> list[int]:
        """The words a read of ``count`` registers from ``address`` would answer now."""
        regs = self._table(table, address, count)
        if address < MOVING_END:
            self._move_words(regs, address, count)
        return regs[address:address + count]


class Simulator:
    """The devices of a ``SimSpec`` on ``host``; ``start()`` listens, ``close()`` stops.

    Build and use it on the event loop that serves it (pymodbus binds its servers to the
    running loop).
    """

    def __init__(self, spec: SimSpec, host: str = "127.0.0.1", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.host = host
        self.listeners = [_Listener(host, p) for p in spec.listen_ports()]
        origin = clock()
        self.devices: list[DeviceSim] = []
        for i in range(spec.devices):
            listener = self.listeners[0 if spec.units else i]
            device = DeviceSim(i, listener, spec, origin, clock)
            listener.devices.append(device)
            self.devices.append(device)

    async def start(self) -> None:
        """Listen on every port; on failure nothing stays open.

        Raises:
            SimulatorError: a port cannot be listened on.
        """
        # pymodbus logs every packet at debug and a line per connection at info
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
        try:
            for listener in self.listeners:
                await listener.listen(self.spec)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        for listener in self.listeners:
            # the cancelled requests end before the loop may stop (no "task destroyed")
            await asyncio.gather(*listener.close(), return_exceptions=True)

    def endpoints(self) -> list[tuple[str, int, int]]:
        """``(host, port, unit)`` of every device, in device order."""
        return [(d.host, d.port, d.unit) for d in self.devices]


async def run_simulator(spec: SimSpec, host: str = "127.0.0.1",
                        ready: asyncio.Event | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Serve ``spec`` on ``host`` until ``stop`` is set (or the task is cancelled).

    ``ready`` is set once every device is listening.

    Raises:
        SimulatorError: a port cannot be listened on (``ready`` is then never set).
    """
    sim = Simulator(spec, host)
    await sim.start()
    try:
        if ready is not None:
            ready.set()
        await (stop if stop is not None else asyncio.Event()).wait()
    finally:
        await sim.close()


async def _serve_until_signal(spec: SimSpec, host: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = Simulator(spec, host)
    try:
        await sim.start()
    except SimulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for d in sim.devices:
            print(f"device={d.number} {d.host}:{d.port} unit={d.unit}", flush=True)
        await stop.wait()
    finally:
        await sim.close()
    return 0


def sim_command(devices: int = 1, port: int = 5020, units: bool = False,
                host: str = "127.0.0.1", registers: int = 100, seed: int = 0) -> int:
    """``engine modbus sim``: serve until SIGINT/SIGTERM; one line per device when listening.

    Each line reads ``device=N HOST:PORT unit=U``.

    Returns:
        0 after a signal, 1 if a port cannot be listened on, 2 for bad arguments.
    """
    try:
        spec = SimSpec(devices=devices, port=port, units=units, registers=registers, seed=seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve_until_signal(spec, host))


__all__ = ["COUNTER", "DEFAULT_READONLY", "DEVICE_NUMBER", "DeviceSim", "FLOAT_SINE",
           "MIN_REGISTERS", "Motion", "SETPOINT", "SimSpec", "Simulator", "SimulatorError",
           "WALK", "SINE", "initial_holding", "initial_input", "run_simulator", "sim_command"]
