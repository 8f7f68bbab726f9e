"""The ``modbus`` source's settings: devices, their tags, poll groups, the UNS hierarchy —
checked whole at ``engine check`` (every error names the file and key path), with each
device's request plan (``gears.modbus.planner``) made here, so the check prints it.

```yaml
settings:
  uns: {enterprise: Acme, site: Lyon, area: Press, line: L7, cell: C1}  # defaults
  groups: {fast: {interval: 1s}, slow: {interval: 10s}}   # and "default" (1 s) unless set
  devices:
    - name: plc1                    # the UNS device name unless uns.device says otherwise
      host: 10.0.0.7
      port: 502
      unit: 1
      timeout: 1s
      address_base: 0               # 1: addresses as printed in manuals (Telegraf style)
      uns: {cell: C2}               # overrides the defaults for this device's tags
      tags:
        - {name: MotorTemp, register: holding, address: 0, type: float32, order: CDAB,
           scale: 0.1, unit: degC, deadband: 0.5, group: fast}
        - {name: Running, register: coil, address: 3}
        - {name: Alarm, register: holding, address: 9, type: bool, bit: 4}
```

Addresses are 0-based on the wire (the register number in the request); ``address_base:
1`` takes them 1-based as printed in many device manuals and Telegraf configs, and
subtracts one. ``deadband`` is a number (absolute, in the tag's scaled unit) or a
percentage string (``"2%"``, of the last published value).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.keytable import (
    BOOLEAN,
    CUSTOM,
    DURATION,
    INTEGER,
    NAMED,
    NUMBER,
    REQUIRED,
    SECTION,
    SECTIONS,
    STRING,
    Key,
    Table,
)
from engine.schema import At, ConfigError
from gears.modbus.codec import ORDERS, Codec, CodecError, parse_type
from gears.modbus.planner import (
    MAX_BITS,
    MAX_REGISTERS,
    Plan,
    PlanError,
    PlanOptions,
    PlanTag,
    plan,
)
from gears.modbus.sample import Publishing
from gears.modbus.uns import LEVELS, NAME_RE, UnsNameError, path_of

REGISTERS: Final = ("holding", "input", "coil", "discrete")
DEFAULT_GROUP: Final = "default"
_DEADBAND_PCT: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


def _uns_table(title: str, levels: tuple[str, ...]) -> Table:
    return Table(title, "UNS level names (letters, digits, _ and -; case kept).", tuple(
        Key(level, STRING, f"The {level} level.", None, pattern=NAME_RE,
            rule="letters, digits, _ and -, 1 to 64") for level in levels))


UNS_DEFAULTS = _uns_table("uns", LEVELS[:5])
UNS_DEVICE = _uns_table("devices[].uns", LEVELS[:6])
UNS_TAG = _uns_table("devices[].tags[].uns", LEVELS)

GROUP = Table("groups.<name>", "A poll group: its tags are read together, this often.", (
    Key("interval", DURATION, "Time between the starts of two polls.", 1.0, minimum=0.01,
        exclusive=False, maximum=86400.0),
))

TAG = Table("devices[].tags[]", "One value of the device.", (
    Key("name", STRING, "The tag (its UNS name unless ``uns.tag`` says otherwise).",
        REQUIRED, pattern=NAME_RE, rule="letters, digits, _ and -, 1 to 64"),
    Key("register", STRING, "Register type.", "holding", choices=REGISTERS),
    Key("address", INTEGER, "First register (or bit): 0-based on the wire unless the "
        "device's ``address_base`` is 1.", REQUIRED, minimum=0, maximum=65535),
    Key("type", STRING, "``bool``, ``int16``, ``uint16``, ``int32``, ``uint32``, ``int64``, "
        "``uint64``, ``float32``, ``float64``, ``string(n)``; coils and discretes are "
        "``bool``.", None),
    Key("order", STRING, "Byte order of multi-register values.", "ABCD",
        choices=ORDERS + tuple(o.lower() for o in ORDERS)),
    Key("bit", INTEGER, "With ``type: bool`` on a holding/input register: which bit (0 = "
        "least significant).", None, minimum=0, maximum=15),
    Key("scale", NUMBER, "Value = raw * scale + offset (numeric types).", 1.0,
        minimum=-1e12, maximum=1e12),
    Key("offset", NUMBER, "Value = raw * scale + offset (numeric types).", 0.0,
        minimum=-1e12, maximum=1e12),
    Key("unit", STRING, "Engineering unit, carried in every sample.", ""),
    Key("group", STRING, "Poll group (a key of ``groups``).", DEFAULT_GROUP),
    Key("deadband", CUSTOM, "Change needed to publish on change: a number (absolute) or "
        "``\"N%\"`` (of the last published value).", 0, type_text="number or \"N%\""),
    Key("publish", STRING, "When a good value is published.", "on_change",
        choices=("on_change", "every_poll")),
    Key("heartbeat", DURATION, "An unchanged value is published again at least this often "
        "(0: never).", 60.0, minimum=0.0, exclusive=False),
    Key("isolate", BOOLEAN, "Read by a request of its own, never merged with others.", False),
    Key("writable", BOOLEAN, "``engine uns set`` may write it.", False),
    Key("min", NUMBER, "Smallest value a write may set (scaled; writes only).", None,
        minimum=-1e18,
        maximum=1e18),
    Key("max", NUMBER, "Largest value a write may set (scaled; writes only).", None,
        minimum=-1e18,
        maximum=1e18),
    Key("uns", SECTION, "UNS level overrides for this tag.", None, table=UNS_TAG),
))

DEVICE = Table("devices[]", "A Modbus TCP device and its tags.", (
    Key("name", STRING, "Device name (unique in the rig; its UNS device name unless "
        "``uns.device`` says otherwise).", REQUIRED, pattern=NAME_RE,
        rule="letters, digits, _ and -, 1 to 64"),
    Key("host", STRING, "Device address.", REQUIRED),
    Key("port", INTEGER, "Device port.", 502, minimum=1, maximum=65535),
    Key("unit", INTEGER, "Unit id (slave id) of requests.", 1, minimum=0, maximum=255),
    Key("timeout", DURATION, "Time a request may take before the device is counted as not "
        "answering (its tags go bad: timeout).", 1.0, minimum=0.01, exclusive=False,
        maximum=600.0),
    Key("max_outstanding", INTEGER, "Requests in flight at once (pipelined by transaction "
        "id); 1 for devices that answer one at a time.", 1, minimum=1, maximum=16),
    Key("reconnect_min", DURATION, "First wait before reconnecting; doubled up to "
        "``reconnect_max``, with jitter.", 0.5, minimum=0.01, exclusive=False),
    Key("reconnect_max", DURATION, "Longest wait between reconnects.", 30.0, minimum=0.01,
        exclusive=False),
    Key("pause_after_connect", DURATION, "Wait after connecting before the first request "
        "(devices that drop early requests).", 0.0, minimum=0.0, exclusive=False),
    Key("one_request_per_tag", BOOLEAN, "Workaround: every tag read by its own request.",
        False),
    Key("max_gap", INTEGER, "Unused registers (or bits) a merged read may span.", 10,
        minimum=0, maximum=MAX_BITS),
    Key("max_registers", INTEGER, "Most registers per read.", MAX_REGISTERS, minimum=1,
        maximum=MAX_REGISTERS),
    Key("max_bits", INTEGER, "Most bits per read.", MAX_BITS, minimum=1, maximum=MAX_BITS),
    Key("address_base", INTEGER, "0: addresses are the wire's; 1: as printed in manuals "
        "(one is subtracted).", 0, minimum=0, maximum=1),
    Key("stale_after", INTEGER, "Poll intervals without a good read before a good value "
        "turns ``stale``.", 3, minimum=1, maximum=1000),
    Key("uns", SECTION, "UNS level overrides for this device's tags.", None,
        table=UNS_DEVICE),
    Key("tags", SECTIONS, "The device's tags.", REQUIRED, table=TAG),
))

MODBUS = Table("modbus", "Polls Modbus TCP devices; every tag value becomes a ``uns.sample`` "
               "frame.", (
    Key("uns", SECTION, "UNS level defaults for every device.", None, table=UNS_DEFAULTS),
    Key("groups", NAMED, "Poll groups by name; a group ``default`` at 1 s exists unless "
        "defined here.", None, table=GROUP),
    Key("devices", SECTIONS, "The devices.", REQUIRED, table=DEVICE),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class TagSettings:
    """One tag, checked."""

    name: str
    path: str            # the UNS path (enterprise ... tag)
    register: str
    address: int         # 0-based, on the wire
    codec: Codec
    scale: float
    offset: float
    unit: str
    group: str
    publishing: Publishing
    writable: bool
    minimum: float | None
    maximum: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSettings:
    """One device, checked, with its request plan."""

    name: str
    host: str
    port: int
    unit: int
    timeout: float
    max_outstanding: int
    reconnect_min: float
    reconnect_max: float
    pause_after_connect: float
    tags: tuple[TagSettings, ...]
    plan: Plan


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusSettings:
    """The source's settings."""

    groups: Mapping[str, float]  # name -> interval (s)
    devices: tuple[DeviceSettings, ...]


def parse_modbus(raw: Any, at: At) -> ModbusSettings:
    """Check the ``modbus`` source's settings (module doc).

    Raises:
        ConfigError: file, key path and rule of the first wrong value.
    """
    r = MODBUS.read(raw, at)
    # "default" (1 s) always exists: a tag that names no group polls every second
    groups = {DEFAULT_GROUP: 1.0, **({name: g.seconds("interval") for name, g in
                                      r.named("groups")} if r.given("groups") else {})}
    defaults = _uns_levels(r, "uns", LEVELS[:5])
    devices: list[DeviceSettings] = []
    names: set[str] = set()
    paths: dict[str, str] = {}
    for i, d in enumerate(r.sections("devices")):
        dat = at.key("devices").index(i)
        dev = _device(d, dat, groups, defaults)
        if dev.name in names:
            raise d.where("name").error(f"device {dev.name!r} named twice")
        names.add(dev.name)
        for j, t in enumerate(dev.tags):
            if t.path in paths:
                raise dat.key("tags").index(j).error(
                    f"UNS path {t.path} is also {paths[t.path]}'s")
            paths[t.path] = f"{dev.name}.{t.name}"
        devices.append(dev)
    if not devices:
        raise at.key("devices").error("at least one device")
    return ModbusSettings(groups=groups, devices=tuple(devices))


def _uns_levels(r: Any, key: str, levels: tuple[str, ...]) -> dict[str, str]:
    if not r.given(key):
        return {}
    u = r.section(key)
    return {lv: v for lv in levels if (v := u.optional_string(lv)) is not None}


def _device(d: Any, at: At, groups: Mapping[str, float],
            defaults: dict[str, str]) -> DeviceSettings:
    name = d.string("name")
    base = d.integer("address_base")
    levels = {**defaults, "device": name, **_uns_levels(d, "uns", LEVELS[:6])}
    tags: list[TagSettings] = []
    plan_tags: list[PlanTag] = []
    reconnect_min, reconnect_max = d.seconds("reconnect_min"), d.seconds("reconnect_max")
    if reconnect_max < reconnect_min:
        raise d.where("reconnect_max").error(
            f"below reconnect_min ({reconnect_min:g} s)")
    stale_after = d.integer("stale_after")
    seen: set[str] = set()
    for j, t in enumerate(d.sections("tags")):
        tat = at.key("tags").index(j)
        tag = _tag(t, tat, base, groups, levels, stale_after)
        if tag.name in seen:
            raise t.where("name").error(f"tag {tag.name!r} named twice in device {name!r}")
        seen.add(tag.name)
        tags.append(tag)
        plan_tags.append(PlanTag(name=tag.name, register=tag.register, address=tag.address,
                                 count=tag.codec.registers, group=tag.group,
                                 isolate=t.boolean("isolate")))
    try:
        device_plan = plan(plan_tags, PlanOptions(
            max_gap=d.integer("max_gap"), max_registers=d.integer("max_registers"),
            max_bits=d.integer("max_bits"),
            one_request_per_tag=d.boolean("one_request_per_tag")))
    except PlanError as exc:
        raise at.key("tags").error(str(exc)) from None
    return DeviceSettings(
        name=name, host=d.string("host"), port=d.integer("port"), unit=d.integer("unit"),
        timeout=d.seconds("timeout"), max_outstanding=d.integer("max_outstanding"),
        reconnect_min=reconnect_min, reconnect_max=reconnect_max,
        pause_after_connect=d.seconds("pause_after_connect"), tags=tuple(tags),
        plan=device_plan)


def _tag(t: Any, at: At, base: int, groups: Mapping[str, float], levels: dict[str, str],
         stale_after: int) -> TagSettings:
    name = t.string("name")
    register = t.string("register")
    address = t.integer("address") - base
    if address < 0:
        raise t.where("address").error("0 with address_base 1 (addresses start at 1 there)")
    bits = register in ("coil", "discrete")
    type_text = t.optional_string("type") or ("bool" if bits else "uint16")
    bit = t.integer("bit") if t.given("bit") else None
    try:
        codec = parse_type(type_text, t.string("order").upper(), bit)
    except CodecError as exc:
        raise t.where("type").error(str(exc)) from None
    if bits and not codec.bit_space:
        raise t.where("type").error(f"a {register} is one bit: type bool without bit, "
                                    f"got {codec.type_text}")
    if not bits and codec.bit_space:
        raise t.where("type").error(f"a bool on a {register} register needs bit: 0-15 (or "
                                    f"register: coil/discrete)")
    scale, offset = t.number("scale"), t.number("offset")
    if not codec.numeric and (scale != 1.0 or offset != 0.0):
        raise t.where("scale" if scale != 1.0 else "offset").error(
            f"scale and offset apply to numbers, not to {codec.type_text}")
    if scale == 0:
        raise t.where("scale").error("0 would make every value the offset")
    group = t.string("group")
    if group not in groups:
        raise t.where("group").error(f"unknown poll group {group!r} (groups: "
                                     f"{', '.join(sorted(groups))})")
    deadband, percent = _deadband(t.raw("deadband"), t.where("deadband"))
    lo, hi = t.raw("min"), t.raw("max")
    writable = t.boolean("writable")
    if writable and register in ("input", "discrete"):
        raise t.where("writable").error(f"an {register} register is read-only in Modbus")
    try:
        path = path_of({**levels, "tag": name, **_uns_levels(t, "uns", LEVELS)})
    except UnsNameError as exc:
        raise t.where("uns").error(str(exc)) if t.given("uns") else at.error(str(exc)) \
            from None
    interval_ns = int(groups[group] * 1e9)
    return TagSettings(
        name=name, path=path, register=register, address=address, codec=codec, scale=scale,
        offset=offset, unit=t.string("unit"), group=group,
        publishing=Publishing(mode=t.string("publish"),  # type: ignore[arg-type]
                              deadband=deadband, deadband_percent=percent,
                              heartbeat_ns=int(t.seconds("heartbeat") * 1e9),
                              stale_after_ns=stale_after * interval_ns),
        writable=writable, minimum=t.number("min") if lo is not None else None,
        maximum=t.number("max") if hi is not None else None)


def _deadband(raw: object, at: At) -> tuple[float, bool]:
    if raw is None:
        return 0.0, False
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw >= 0 \
            and raw == raw and raw != float("inf"):
        return float(raw), False
    if isinstance(raw, str) and (m := _DEADBAND_PCT.match(raw)):
        return float(m.group(1)), True
    raise at.error(f"expected a number >= 0 or \"N%\", got {raw!r}")


__all__ = ["ConfigError", "DEVICE", "DeviceSettings", "MODBUS", "ModbusSettings", "TAG",
           "TagSettings", "parse_modbus"]
