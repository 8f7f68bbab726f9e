"""The Modbus device simulator over real sockets: our ``gears.modbus.mbap`` client on a plain
socket and pymodbus's own client as an independent second opinion."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from modbusutil import MbapClient, SimThread, simulated
from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient

from engine.natsd import free_port
from gears.modbus import mbap
from gears.modbus.simulator import (
    COUNTER,
    DEVICE_NUMBER,
    FLOAT_SINE,
    SETPOINT,
    SINE,
    WALK,
    WALK_LIMIT,
    Motion,
    SimSpec,
    initial_holding,
)

ROOT = Path(__file__).resolve().parents[1]
HOLDING, INPUT, COILS, DISCRETES = (mbap.READ_HOLDING, mbap.READ_INPUT, mbap.READ_COILS,
                                    mbap.READ_DISCRETE)
DT = ModbusTcpClient.DATATYPE


@pytest.fixture
def sim():
    with simulated(2, registers=40, period=4.0) as s:
        yield s


def words(fmt: str, value: float) -> list[int]:
    raw = struct.pack(fmt, value)
    return list(struct.unpack(f">{len(raw) // 2}H", raw))


def until_changed(read, deadline: float = 5.0):
    """Read until the value differs from the first read; (first, changed)."""
    first = read()
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        now = read()
        if now != first:
            return first, now
    raise AssertionError(f"value did not change in {deadline} s: {first}")


# -- reads of every table ---------------------------------------------------------------

def test_mbap_reads_the_fixed_holding_map(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[1]) as c:
        regs = c.registers(HOLDING, DEVICE_NUMBER, 40 - DEVICE_NUMBER)
    assert regs[0] == 2  # device number of the second device
    assert regs[1:3] == [0xF8A4, 0x32EB]  # int32 -123456789 ABCD
    assert regs[3:5] == [0xE979, 0x42F6]  # float32 123.456 CDAB
    assert regs[5:9] == [0xC0C3, 0x4A45, 0x87E7, 0xC06E]  # float64 -9876.54321 ABCD
    assert regs[9] == 0xA5C3 and regs[10] == 500
    assert struct.pack(">6H", *regs[11:17]) == b"FLUXSIM-0002"
    assert regs[17:] == list(range(22, 40))  # static: the address itself


def test_mbap_reads_input_coils_and_discretes(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        assert c.registers(INPUT, DEVICE_NUMBER, 5) == [1, 30006, 30007, 30008, 30009]
        assert c.bits(COILS, 0, 40) == [a % 3 == 0 for a in range(40)]
        assert c.bits(DISCRETES, 1, 39) == [a % 2 == 1 for a in range(1, 40)]
        # holding and input hold the same moving values at the same instant
        assert c.registers(INPUT, 0, 5)[WALK] == c.registers(HOLDING, 0, 5)[WALK]


def test_reads_outside_the_map_answer_exception_2(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        for function, address in ((HOLDING, 39), (INPUT, 40), (HOLDING, 1000)):
            r = c.read(function, address, 2)
            assert r is not None and (r.function, r.exception) == (function, 2)


def test_pymodbus_client_decodes_the_typed_registers(sim: SimThread) -> None:
    async def go() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.ports[0], timeout=3)
        assert await client.connect()
        try:
            h = (await client.read_holding_registers(0, count=22, device_id=1)).registers
            conv = client.convert_from_registers
            assert 25.0 <= conv(h[3:5], DT.FLOAT32) <= 75.0  # type: ignore[operator]
            assert conv(h[6:8], DT.INT32) == -123456789
            assert conv(h[8:10], DT.FLOAT32, word_order="little") == pytest.approx(123.456)
            assert conv(h[10:14], DT.FLOAT64) == -9876.54321
            assert conv(h[16:22], DT.STRING) == "FLUXSIM-0001"
            assert -1000 <= conv(h[1:2], DT.INT16) <= 1000  # type: ignore[operator]
            i = (await client.read_input_registers(5, count=3, device_id=1)).registers
            assert i == [1, 30006, 30007]
            coils = (await client.read_coils(0, count=6, device_id=1)).bits[:6]
            assert coils == [True, False, False, True, False, False]
            disc = (await client.read_discrete_inputs(1, count=4, device_id=1)).bits[:4]
            assert disc == [True, False, True, False]
        finally:
            client.close()

    asyncio.run(go())


# -- moving values ----------------------------------------------------------------------

def test_moving_registers_move(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        for address in (COUNTER, SINE, WALK):
            until_changed(lambda: c.registers(HOLDING, address, 1)[0])
        until_changed(lambda: c.registers(HOLDING, FLOAT_SINE, 2))
        until_changed(lambda: c.bits(DISCRETES, 0, 1)[0], deadline=3.0)
        a, b = until_changed(lambda: c.registers(INPUT, COUNTER, 1)[0])
    assert 0 < (b - a) & 0xFFFF < 100  # the counter goes up (10 per second)


def test_walk_is_seeded_and_bounded() -> None:
    one, two = Motion(7, 0, 60.0, 0.0), Motion(7, 0, 60.0, 0.0)
    seen = [one.walk(t * 0.25) for t in range(2000)]
    assert two.walk(1999 * 0.25) == seen[-1]  # read at once or step by step: same walk
    assert Motion(8, 0, 60.0, 0.0).walk(1999 * 0.25) != seen[-1]
    assert Motion(7, 1, 60.0, 0.0).walk(1999 * 0.25) != seen[-1]
    assert all(abs(v) <= WALK_LIMIT for v in seen) and len(set(seen)) > 100
    assert max(abs(b - a) for a, b in zip(seen, seen[1:])) <= 50


# -- faults -----------------------------------------------------------------------------

def test_exception_switch_answers_the_code_until_cleared(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        sim.exception(0, 4)
        for function in (HOLDING, INPUT, COILS, DISCRETES):
            r = c.read(function, 0, 4)
            assert r is not None and (r.function, r.exception) == (function, 4)
        w = c.write(SETPOINT, [1])
        assert w is not None and w.exception == 4
        with MbapClient("127.0.0.1", sim.ports[1]) as other:
            assert other.registers(HOLDING, DEVICE_NUMBER, 1) == [2]  # others unaffected
        sim.exception(0, None)
        assert c.registers(HOLDING, DEVICE_NUMBER, 1) == [1]
    with pytest.raises(ValueError, match="not a Modbus exception code: code=9"):
        sim.exception(0, 9)


def test_pymodbus_client_sees_the_exception(sim: SimThread) -> None:
    sim.exception(1, 6)
    client = ModbusTcpClient("127.0.0.1", port=sim.ports[1], timeout=3)
    assert client.connect()
    try:
        r = client.read_holding_registers(0, count=2, device_id=1)
        assert r.isError() and r.exception_code == 6
    finally:
        client.close()


def test_delay_answers_late(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        sim.delay(0, 0.4)
        t0 = time.monotonic()
        assert c.registers(HOLDING, DEVICE_NUMBER, 1) == [1]
        assert time.monotonic() - t0 >= 0.4
        sim.delay(0, 0)
        t0 = time.monotonic()
        c.registers(HOLDING, DEVICE_NUMBER, 1)
        assert time.monotonic() - t0 < 0.4
    with pytest.raises(ValueError, match="delay must be finite and >= 0: seconds=-1"):
        sim.delay(0, -1)


def test_drop_closes_live_connections_and_keeps_listening(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c, \
            MbapClient("127.0.0.1", sim.ports[1]) as other:
        c.registers(HOLDING, 0, 1)
        other.registers(HOLDING, 0, 1)
        sim.drop(0)
        assert c.sock.recv(16) == b""  # EOF
        assert other.registers(HOLDING, DEVICE_NUMBER, 1) == [2]
    with MbapClient("127.0.0.1", sim.ports[0]) as again:
        assert again.registers(HOLDING, DEVICE_NUMBER, 1) == [1]


def test_drop_under_delay_leaves_the_request_unanswered_quietly(
        sim: SimThread, caplog: pytest.LogCaptureFixture) -> None:
    sim.delay(0, 0.3)
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        c.sock.sendall(mbap.read_request(1, 1, HOLDING, 0, 1))
        end = time.monotonic() + 5
        while sim.requests(0) == 0:  # until the request is held back inside the device
            assert time.monotonic() < end
        sim.drop(0)
        assert c.sock.recv(16) == b""  # EOF, no answer
    sim.delay(0, 0)
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        assert c.registers(HOLDING, DEVICE_NUMBER, 1) == [1]
    time.sleep(0.4)  # not a sync: past the delay, an uncancelled request would answer now
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_down_refuses_and_up_listens_again_on_the_same_port(sim: SimThread) -> None:
    port = sim.ports[0]
    with MbapClient("127.0.0.1", port) as c:
        assert c.write(SETPOINT, [4242]) is not None
        sim.down(0)
        assert c.sock.recv(16) == b""  # the live connection is closed too
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    sim.down(0)  # twice is harmless
    sim.up(0)
    with MbapClient("127.0.0.1", port) as c:
        assert c.registers(HOLDING, SETPOINT, 1) == [4242]  # registers survive down/up
    sim.up(0)


# -- writes -----------------------------------------------------------------------------

def test_writes_are_read_back(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        w = c.write(SETPOINT, [1234])
        assert w is not None and not w.failed and w.function == 6
        w = c.write(30, [1, 2, 65535])
        assert w is not None and not w.failed and w.function == 16
        assert c.registers(HOLDING, SETPOINT, 1) == [1234]
        assert c.registers(HOLDING, 30, 3) == [1, 2, 65535]
        w = c.write_coil(1, True)
        assert w is not None and not w.failed
        assert c.bits(COILS, 0, 4) == [True, True, False, True]
    assert sim.get_registers(0, 30, 3) == [1, 2, 65535]
    client = ModbusTcpClient("127.0.0.1", port=sim.ports[0], timeout=3)
    assert client.connect()
    try:
        assert not client.write_registers(8, words(">f", 123.456), device_id=1).isError()
        assert not client.write_coils(16, [True, True, False], device_id=1).isError()
        assert client.read_coils(16, count=3, device_id=1).bits[:3] == [True, True, False]
    finally:
        client.close()
    assert sim.get_registers(0, 8, 2) == [0x42F6, 0xE979]


def test_readonly_registers_refuse_writes_with_exception_2(sim: SimThread) -> None:
    with MbapClient("127.0.0.1", sim.ports[0]) as c:
        for address, values in ((COUNTER, [1]), (DEVICE_NUMBER, [9]), (4, [1, 2, 3])):
            w = c.write(address, values)
            assert w is not None and w.exception == 2, (address, w)
        assert c.registers(HOLDING, DEVICE_NUMBER, 3) == [1, 0xF8A4, 0x32EB]  # unchanged
    with simulated(1, readonly=(SETPOINT,)) as s, MbapClient("127.0.0.1", s.ports[0]) as c:
        assert c.write(SETPOINT, [1]).exception == 2  # type: ignore[union-attr]
        assert not c.write(DEVICE_NUMBER, [9]).failed  # type: ignore[union-attr]
        assert c.registers(HOLDING, DEVICE_NUMBER, 1) == [9]


def test_set_and_get_registers_are_what_the_wire_sees(sim: SimThread) -> None:
    sim.set_registers(1, 24, [7, 8, 9])
    sim.set_registers(1, 10, [0xBEEF], table="input")
    with MbapClient("127.0.0.1", sim.ports[1]) as c:
        assert c.registers(HOLDING, 24, 3) == [7, 8, 9]
        assert c.registers(INPUT, 10, 1) == [0xBEEF]
    assert sim.get_registers(0, 24, 3) == [24, 25, 26]  # the other device untouched
    assert sim.get_registers(1, DEVICE_NUMBER, 1) == [2]
    assert 0 <= sim.get_registers(0, COUNTER, 1)[0] < 1000
    with pytest.raises(ValueError, match="registers outside the map: address=39, count=2"):
        sim.set_registers(0, 39, [1, 2])
    assert sim.requests(1) == 2


# -- several devices --------------------------------------------------------------------

def test_units_share_one_port() -> None:
    with simulated(3, units=True) as sim:
        assert sim.ports == [sim.ports[0]] * 3 and sim.units == [1, 2, 3]
        with MbapClient("127.0.0.1", sim.ports[0]) as c:
            for unit in (1, 2, 3):
                assert c.registers(HOLDING, DEVICE_NUMBER, 1, unit=unit) == [unit]
            r = c.read(HOLDING, 0, 1, unit=9)  # no such unit behind the gateway
            assert r is not None and r.exception == 11
            sim.down(1)
            r = c.read(HOLDING, DEVICE_NUMBER, 1, unit=2)
            assert r is not None and r.exception == 11
            assert c.registers(HOLDING, DEVICE_NUMBER, 1, unit=3) == [3]
            sim.exception(2, 3)
            assert c.read(HOLDING, 0, 1, unit=3).exception == 3  # type: ignore[union-attr]
            sim.up(1)
            assert c.registers(HOLDING, DEVICE_NUMBER, 1, unit=2) == [2]
            c.write(SETPOINT, [77], unit=1)
            assert c.registers(HOLDING, SETPOINT, 1, unit=1) == [77]
            assert c.registers(HOLDING, SETPOINT, 1, unit=2) == [500]


def test_twenty_devices_each_answer_on_their_own_port() -> None:
    with simulated(20) as sim:
        assert len(set(sim.ports)) == 20
        for i, port in enumerate(sim.ports):
            with MbapClient("127.0.0.1", port) as c:
                regs = c.registers(HOLDING, DEVICE_NUMBER, 17)
            assert regs == initial_holding(i + 1, 22)[DEVICE_NUMBER:], i
        sim.down(7)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sim.ports[7]), timeout=2).close()
        with MbapClient("127.0.0.1", sim.ports[8]) as c:
            assert c.registers(HOLDING, DEVICE_NUMBER, 1) == [9]


# -- spec and command -------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"devices": 0}, "devices out of range: devices=0, max=65535"),
    ({"devices": 248, "units": True}, "devices out of range: devices=248, max=247"),
    ({"registers": 21}, "registers out of range: registers=21, min=22, max=65535"),
    ({"period": 0.0}, "period must be positive: period=0.0"),
    ({"readonly": (100,)}, "readonly address outside the map: address=100, registers=100"),
    ({"devices": 2, "ports": (1000,)}, "wrong number of ports: ports=1, need=2"),
    ({"devices": 2, "port": 65535}, "port out of range: port=65536"),
])
def test_spec_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SimSpec(**kwargs)
    assert str(err.value) == message


def test_sim_command_prints_endpoints_and_stops_on_sigint() -> None:
    port = free_port()
    code = ("import sys; from gears.modbus.simulator import sim_command; "
            f"sys.exit(sim_command(devices=2, port={port}, units=True, host='127.0.0.1', "
            "registers=30, seed=1))")
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            lines = [proc.stdout.readline().strip() for _ in range(2)]
            assert lines == [f"device=1 127.0.0.1:{port} unit=1",
                             f"device=2 127.0.0.1:{port} unit=2"], proc.stderr.read()
            with MbapClient("127.0.0.1", port) as c:
                assert c.registers(HOLDING, DEVICE_NUMBER, 1, unit=2) == [2]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_sim_command_fails_on_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = ("import sys; from gears.modbus.simulator import sim_command; "
                f"sys.exit(sim_command(devices=1, port={port}))")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=20,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert f"error: cannot listen: host=127.0.0.1, port={port}" in done.stderr
