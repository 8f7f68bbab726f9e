"""gears.modbus.write.check (what may be written, and its words) and gears.modbus.unsview
(how the UNS prints)."""

from __future__ import annotations

import pytest

from engine.schema import At
from gears.modbus.settings import parse_modbus
from gears.modbus.unsview import line, tree
from gears.modbus.write import WriteRefused, check

RAW = {"uns": {"enterprise": "e", "site": "s", "area": "a", "line": "l", "cell": "c"},
       "devices": [{"name": "d", "host": "h", "tags": [
           {"name": "sp", "address": 0, "writable": True, "min": 0, "max": 3000,
            "scale": 0.5},
           {"name": "f", "address": 2, "type": "float32", "order": "CDAB", "writable": True},
           {"name": "ro", "address": 4},
           {"name": "bit", "address": 5, "type": "bool", "bit": 2, "writable": True},
           {"name": "coil", "register": "coil", "address": 0, "writable": True},
           {"name": "txt", "address": 6, "type": "string(4)", "writable": True},
           {"name": "i16", "address": 9, "type": "int16", "writable": True}]}]}
TAGS = {t.name: t for t in parse_modbus(RAW, At("rig.yaml")).devices[0].tags}


@pytest.mark.parametrize("tag, value, raw, words", [
    ("sp", 600, 1200, [1200]),               # unscaled: 600 / 0.5
    ("f", 123.456, 123.456, [0xE979, 0x42F6]),  # CDAB, the vector
    ("bit", True, True, [0b100]),
    ("coil", False, False, []),
    ("txt", "AB", "AB", [0x4142, 0]),
    ("i16", -2, -2, [0xFFFE]),
])
def test_a_write_is_unscaled_and_encoded_with_the_tags_type_and_order(
        tag: str, value: object, raw: object, words: list[int]) -> None:
    planned = check(TAGS[tag], value)
    assert planned.raw == raw and planned.words == words


@pytest.mark.parametrize("tag, value, why", [
    ("ro", 1, "is not writable"),
    ("sp", 3001, "3001 is above the tag's max 3000"),
    ("sp", -1, "-1 is below the tag's min 0"),
    ("sp", "x", r"takes a number \(uint16\), got str"),
    ("sp", True, r"takes a number \(uint16\), got bool"),
    ("i16", 40000, "int16"),
    ("coil", 1, "takes true or false"),
    ("txt", 5, "takes text"),
    ("txt", "TOO LONG", "string"),
])
def test_refused_writes_say_why(tag: str, value: object, why: str) -> None:
    with pytest.raises(WriteRefused, match=why):
        check(TAGS[tag], value)


def test_writable_input_registers_are_refused_at_check_time() -> None:
    from engine.schema import ConfigError

    raw = {"devices": [{"name": "d", "host": "h", "tags": [
        {"name": "x", "register": "input", "address": 0, "writable": True}]}]}
    with pytest.raises(ConfigError, match=r"devices\[0\]\.tags\[0\]\.writable: an input "
                       "register is read-only in Modbus"):
        parse_modbus(raw, At("rig.yaml"))


def test_the_tree_prints_levels_once_and_tags_with_value_quality_age() -> None:
    now = 10_000_000_000
    samples = {
        "e.s.a.l.c.d1.temp": {"value": 21.53, "unit": "degC", "quality": "good", "ts": now},
        "e.s.a.l.c.d1.run": {"value": True, "unit": "", "quality": "good", "ts": now - 2e9},
        "e.s.a.l.c.d2.temp": {"value": None, "unit": "degC", "quality": "bad: timeout",
                              "ts": now},
    }
    out = tree(samples, now).splitlines()
    assert out[:6] == ["e", "  s", "    a", "      l", "        c", "          d1"]
    assert out[6].split() == ["run", "True", "good", "2.0s"]
    assert out[7].split() == ["temp", "21.53", "degC", "good", "0.0s"]
    assert out[8] == "          d2"
    assert out[9].split() == ["temp", "-", "bad:", "timeout", "0.0s"]
    sample = {**samples["e.s.a.l.c.d1.temp"], "path": "e.s.a.l.c.d1.temp"}
    assert line(sample, now) == "e.s.a.l.c.d1.temp  21.53 degC  good  0.0s"
