"""The baseline for ``perf/modbus_bench.py``: a Modbus TCP -> JetStream poller as a careful
user would write it with pymodbus and nats-py — no request planner, no raw protocol.

    python perf/baselines/pymodbus_poller.py --config DEVICES.json --nats URL
                                             [--seconds 60] [--warmup 3]

* one ``AsyncModbusTcpClient`` per device, one asyncio task per device;
* every second (a fixed schedule: a cycle that overran makes the next start at once and is
  counted late, missed slots skipped — the rack's gear does the same), each tag is read with
  a request of its own (``read_holding_registers(address, count=n, device_id=unit)``,
  ``read_input_registers``, ``read_coils``, ``read_discrete_inputs``) and decoded with
  ``client.convert_from_registers`` (word order ``little`` for CDAB; a bit of a register by
  a shift);
* each value is published with ``js.publish`` on ``uns.v1.<path>`` as JSON ``{path, value,
  unit, quality, ts_source, ts}`` — the fields of the rack's ``uns.sample`` body; the
  publishes of a cycle are awaited together (``asyncio.gather``), so one slow ack does not
  hold the next publish back.

``DEVICES.json``: ``{"interval": s, "devices": [{"name", "host", "port", "unit", "prefix"}],
"tags": [{"name", "register", "address", "type", "order", "bit", "unit"}]}`` (every device
has the same tags; ``prefix`` is its UNS path without the tag).

Protocol with the bench on stdout: after ``--warmup`` seconds it prints ``start`` (the bench
samples CPU then), after ``--seconds`` more ``end`` (and again) and one JSON line of what
happened in that window (then it stops its pollers, which may take a while under load):
``requests`` sent, ``values`` acknowledged by JetStream, ``cycles`` started, ``late`` cycles,
``errors`` (error responses and exceptions), ``last`` (the last value of every tag of the
first device, for the bench's cross-check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from pymodbus.client import AsyncModbusTcpClient

DT = AsyncModbusTcpClient.DATATYPE
TYPES = {"uint16": DT.UINT16, "int16": DT.INT16, "uint32": DT.UINT32, "int32": DT.INT32,
         "float32": DT.FLOAT32, "float64": DT.FLOAT64, "uint64": DT.UINT64,
         "int64": DT.INT64}


@dataclass
class Tally:
    """What the pollers did; ``counting`` is off during the warm-up."""

    counting: bool = False
    running: bool = True
    requests: int = 0
    values: int = 0
    cycles: int = 0
    late: int = 0
    errors: int = 0
    last: dict[str, Any] = field(default_factory=dict)


def registers_of(tag: dict[str, Any]) -> int:
    """How many registers the tag spans."""
    t = tag["type"]
    if t.startswith("string("):
        return (int(t[7:-1]) + 1) // 2
    if t == "bool":
        return 1
    return TYPES[t].value[1]


async def read_tag(client: AsyncModbusTcpClient, tag: dict[str, Any], unit: int) -> Any:
    """One request for one tag; its decoded value (None on an error response)."""
    reg, addr = tag["register"], tag["address"]
    if reg == "coil":
        rr = await client.read_coils(addr, count=1, device_id=unit)
        return None if rr.isError() else rr.bits[0]
    if reg == "discrete":
        rr = await client.read_discrete_inputs(addr, count=1, device_id=unit)
        return None if rr.isError() else rr.bits[0]
    read = client.read_holding_registers if reg == "holding" else client.read_input_registers
    rr = await read(addr, count=registers_of(tag), device_id=unit)
    if rr.isError():
        return None
    t = tag["type"]
    if t == "bool":  # a bit of a register, bit 0 the least significant
        return bool((rr.registers[0] >> tag["bit"]) & 1)
    if t.startswith("string("):
        return client.convert_from_registers(rr.registers, DT.STRING)
    if tag.get("order", "ABCD") == "CDAB":
        return client.convert_from_registers(rr.registers, TYPES[t], word_order="little")
    return client.convert_from_registers(rr.registers, TYPES[t])


async def poll_device(dev: dict[str, Any], tags: list[dict[str, Any]], interval: float,
                      js: Any, tally: Tally, first: bool) -> None:
    """Poll one device forever (until cancelled)."""
    client = AsyncModbusTcpClient(dev["host"], port=dev["port"], timeout=1.0)
    await client.connect()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while tally.running:
            counting = tally.counting
            if counting:
                tally.cycles += 1
            found = []
            for tag in tags:
                if counting:
                    tally.requests += 1
                try:
                    value = await read_tag(client, tag, dev["unit"])
                except Exception:  # noqa: BLE001 - a poller keeps polling
                    value = None
                if value is None:
                    tally.errors += counting
                    continue
                now = time.time_ns()
                path = f"{dev['prefix']}.{tag['name']}"
                found.append((path, json.dumps(
                    {"path": path, "value": value, "unit": tag.get("unit", ""),
                     "quality": "good", "ts_source": now, "ts": now}).encode()))
                if first:
                    tally.last[tag["name"]] = value
            acks = await asyncio.gather(*(js.publish(f"uns.v1.{p}", data) for p, data in found),
                                        return_exceptions=True)
            if counting:
                tally.values += sum(1 for a in acks if not isinstance(a, BaseException))
                tally.errors += sum(1 for a in acks if isinstance(a, BaseException))
            start += interval
            if loop.time() > start:  # overran: start the next now, skip the missed slots
                tally.late += counting
                start = loop.time()
            await asyncio.sleep(start - loop.time())
    finally:
        client.close()


async def main_async(config: dict[str, Any], url: str, seconds: float, warmup: float) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    tally = Tally()
    devices = config["devices"]
    tasks = [asyncio.create_task(poll_device(d, config["tags"], config["interval"], js, tally,
                                             i == 0)) for i, d in enumerate(devices)]
    try:
        await asyncio.sleep(warmup)
        tally.counting = True
        print("start", flush=True)
        await asyncio.sleep(seconds)
        tally.counting = False
        print("end", flush=True)
        # the figures before the shutdown, which may be slow under load
        print(json.dumps({"requests": tally.requests, "values": tally.values,
                          "cycles": tally.cycles, "late": tally.late, "errors": tally.errors,
                          "last": tally.last}), flush=True)
    finally:
        tally.running = False
        _, late = await asyncio.wait(tasks, timeout=10)
        for t in late:
            t.cancel()
        await asyncio.wait(tasks, timeout=5) if late else None
        await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nats", required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args()
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    with open(args.config) as f:
        config = json.load(f)
    asyncio.run(main_async(config, args.nats, args.seconds, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
