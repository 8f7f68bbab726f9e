"""Declarative key tables: every key of a rig-file mapping or of a gear's settings — its type,
default, bounds and meaning — in one place that both the parser and the reference read.

A parser reads a mapping through its table (``TABLE.read(raw, at)`` -> ``Reader``): a key
that is not in the table is refused, and each typed read (``reader.seconds("timeout")``)
takes its default and bounds from the key's entry. ``docs/reference.md`` is generated from
the same tables (``python -m engine.reference``), so the reference says what the parser does;
``tests/test_config_values.py`` also feeds a wrong value to every documented key and checks
that the parser refuses it at that key's path. Reading a key with a method that does not
match its declared kind is a programming error (``TypeError``), met by any test that parses
the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from engine.schema import (
    At,
    get_bool,
    get_duration,
    get_float,
    get_int,
    get_list,
    get_map,
    get_size,
    get_str,
)

# Kinds of keys. Scalars first, then the containers.
STRING = "string"
INTEGER = "integer"
NUMBER = "number"
DURATION = "duration"  # seconds, or 250ms / 1.5s / 1m / 2h (engine.units)
SIZE = "size"  # bytes, or 4MiB / 4MB (engine.units)
BOOLEAN = "boolean"
SECTION = "section"  # a mapping with the keys of ``Key.table``
SECTIONS = "sections"  # a list of such mappings
NAMED = "named"  # a mapping of names the user chooses to mappings with ``Key.table``'s keys
LIST = "list"  # a list of scalars (``Key.items`` says of what)
MAP = "map"  # a mapping of free keys to values (``Key.items`` says what)
CUSTOM = "custom"  # checked by the parser's own code (``Key.type_text`` says what it takes)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a key's default when the key must be given
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Computed:
    """A default that depends on other values (``var/<rack.id>``); ``text`` documents it and
    the parser passes the value (``reader.string("data_dir", default=...)``)."""

    text: str


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a table.

    Attributes:
        name: the key as written in YAML.
        kind: one of the kinds above.
        doc: what it means, one sentence or two (the reference's "meaning" column).
        default: the value when absent or null; ``REQUIRED``; a ``Computed``; None: absent
            means "not set" (an optional section or value).
        minimum, maximum, exclusive: bounds of integers, numbers, durations (seconds) and
            sizes (bytes); ``exclusive``: the minimum itself is refused.
        pattern, rule: a string must match ``pattern``; ``rule`` says how in words.
        choices: the only strings accepted.
        table: the keys of a ``SECTION``, ``SECTIONS`` or ``NAMED`` value.
        items: what a ``LIST`` or ``MAP`` holds, in words.
        type_text: what a ``CUSTOM`` key takes, in words.
        deprecated: accepted so older rigs load, without effect.
    """

    name: str
    kind: str
    doc: str
    default: object = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False
    pattern: re.Pattern[str] | None = None
    rule: str = ""
    choices: tuple[str, ...] = ()
    table: Table | None = None
    items: str = ""
    type_text: str = ""
    deprecated: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    """The keys of one mapping: ``title`` and ``doc`` head its part of the reference."""

    title: str
    doc: str
    keys: tuple[Key, ...]

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate keys in table {self.title!r}: {names}")
        for k in self.keys:
            if (k.table is None) != (k.kind not in (SECTION, SECTIONS, NAMED)):
                raise ValueError(f"key {k.name!r} of table {self.title!r}: a table belongs "
                                 f"to sections and named mappings only")

    @property
    def names(self) -> frozenset[str]:
        """Every key name of the table."""
        return frozenset(k.name for k in self.keys)

    def key(self, name: str) -> Key:
        """The entry of ``name`` (KeyError: the parser reads a key the table lacks)."""
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(f"table {self.title!r} has no key {name!r}")

    def read(self, raw: object, at: At) -> Reader:
        """``raw`` (a mapping, or None for empty) checked against the table: unknown keys
        refused with the allowed ones listed."""
        return Reader(self, raw, at)


def _sub(key: Key) -> Table:
    if key.table is None:  # Table.__post_init__ makes this unreachable for these kinds
        raise TypeError(f"key {key.name!r} has no table")
    return key.table


class Reader:
    """One mapping of the rig file read through its ``Table``; every read names the key."""

    __slots__ = ("at", "table", "values")

    def __init__(self, table: Table, raw: object, at: At):
        self.table = table
        self.at = at
        self.values = get_map(raw, at, table.names)

    def _key(self, name: str, *kinds: str) -> Key:
        key = self.table.key(name)
        if key.kind not in kinds:
            raise TypeError(f"key {name!r} of table {self.table.title!r} is a {key.kind}, "
                            f"read as {'/'.join(kinds)}")
        return key

    @staticmethod
    def _default(key: Key, given: object) -> object:
        if isinstance(key.default, Computed):
            if given is None:
                raise TypeError(f"key {key.name!r}: its computed default must be passed")
            return given
        if given is not None:
            raise TypeError(f"key {key.name!r}: the default is the table's")
        return None if key.default is REQUIRED else key.default

    def given(self, name: str) -> bool:
        """True when ``name`` is present and not null."""
        self.table.key(name)
        return self.values.get(name) is not None

    def raw(self, name: str) -> object:
        """The unchecked value of ``name`` (None when absent), for ``CUSTOM`` checks."""
        self.table.key(name)
        return self.values.get(name)

    def where(self, name: str) -> At:
        """The location of ``name``."""
        return self.at.key(name)

    def string(self, name: str, default: str | None = None) -> str:
        """String ``name``: its pattern and choices checked (``default``: computed ones)."""
        key = self._key(name, STRING)
        value = get_str(self.values, name, self.at, _as(key, self._default(key, default), str),
                        key.pattern, key.rule)
        if key.choices and value not in key.choices:
            choices = " or ".join(map(repr, key.choices)) if len(key.choices) < 3 else \
                "one of " + ", ".join(map(repr, key.choices))
            raise self.where(name).error(f"expected {choices}, got {self.where(name).show(value)}")
        return value

    def optional_string(self, name: str) -> str | None:
        """String ``name``, or None when absent (a key without default)."""
        return self.string(name) if self.given(name) else None

    def integer(self, name: str) -> int:
        """Integer ``name`` within the key's bounds."""
        key = self._key(name, INTEGER)
        return get_int(self.values, name, self.at, _as(key, self._default(key, None), int),
                       _int(key.minimum), _int(key.maximum))

    def number(self, name: str) -> float:
        """A finite number ``name`` within the key's bounds."""
        key = self._key(name, NUMBER)
        default = self._default(key, None)  # None: an optional key, read when given
        return get_float(self.values, name, self.at,
                         None if default is None else _seconds(key, default),  # type: ignore[arg-type]
                         key.minimum or 0.0, key.exclusive,
                         1e9 if key.maximum is None else key.maximum)

    def seconds(self, name: str) -> float:
        """A duration ``name`` in seconds within the key's bounds."""
        key = self._key(name, DURATION)
        return get_duration(self.values, name, self.at, _seconds(key, self._default(key, None)),
                            key.minimum or 0.0, key.exclusive,
                            1e9 if key.maximum is None else key.maximum)

    def size(self, name: str) -> int:
        """A size ``name`` in bytes within the key's bounds."""
        key = self._key(name, SIZE)
        return get_size(self.values, name, self.at, _required(key, _as(key, self._default(
                            key, None), int)),
                        _int(key.minimum) or 0, _int(key.maximum))

    def boolean(self, name: str) -> bool:
        """Boolean ``name``."""
        key = self._key(name, BOOLEAN)
        return get_bool(self.values, name, self.at,
                        _required(key, _as(key, self._default(key, None), bool)))

    def sequence(self, name: str) -> list[object]:
        """List ``name``; when absent: the key's default (a tuple), else empty, or an error
        for a required key."""
        key = self._key(name, LIST, SECTIONS)
        if not self.given(name) and isinstance(key.default, tuple):
            return list(key.default)
        return get_list(self.values, name, self.at, required=key.default is REQUIRED)

    def mapping(self, name: str) -> Mapping[str, object]:
        """Free mapping ``name`` (empty when absent)."""
        self._key(name, MAP)
        return get_map(self.values.get(name), self.where(name))

    def section(self, name: str) -> Reader:
        """Mapping ``name`` read through its table (empty when absent)."""
        key = self._key(name, SECTION)
        return Reader(_sub(key), self.values.get(name), self.where(name))

    def sections(self, name: str) -> list[Reader]:
        """Every item of list ``name``, each read through the key's table."""
        key = self._key(name, SECTIONS)
        at = self.where(name)
        return [Reader(_sub(key), item, at.index(i)) for i, item in enumerate(self.sequence(name))]

    def named(self, name: str) -> list[tuple[str, Reader]]:
        """Every ``(name, mapping)`` of named mapping ``name``, mappings read through its
        table."""
        key = self._key(name, NAMED)
        at = self.where(name)
        return [(k, Reader(_sub(key), v, at.key(k)))
                for k, v in get_map(self.values.get(name), at).items()]


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def _as(key: Key, value: object, cls: type[T]) -> T | None:
    """A table's default as the type its reader needs (TypeError: a mistake in the table)."""
    if value is None or isinstance(value, cls):
        return value
    raise TypeError(f"key {key.name!r}: default {value!r} is not a {cls.__name__}")


def _required(key: Key, value: T | None) -> T:
    if value is None:
        raise TypeError(f"key {key.name!r} of kind {key.kind} needs a default")
    return value


def _seconds(key: Key, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"key {key.name!r}: default {value!r} is not a number")
    return float(value)
