"""The validation toolkit for rig files and gear settings: where a value sits (``At``), one
error type (``ConfigError``) and typed getters that name the key path in every message.

Pure and dependency-free, so the engine's config loader and every gear's ``parse_settings``
use the same rules without importing each other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # rack, pipeline and gear names
SUBJECT_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")  # a NATS subject without wildcards
SUBJECT_PATTERN_RE = re.compile(r"^([^\s.*>]+|\*)(\.([^\s.*>]+|\*))*(\.>)?$|^>$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class ConfigError(ValueError):
    """A rig file that cannot run; the message says file, key path and what was expected."""


@dataclass(frozen=True, slots=True)
class At:
    """Where a value sits in the rig file, for error messages: ``file`` + key ``path``."""

    file: str
    path: str = ""

    def key(self, name: str) -> At:
        """The location of ``name`` inside this mapping."""
        return At(self.file, f"{self.path}.{name}" if self.path else name)

    def index(self, i: int) -> At:
        """The location of item ``i`` of this list."""
        return At(self.file, f"{self.path}[{i}]")

    def error(self, message: str) -> ConfigError:
        """A ConfigError located here."""
        where = self.path or "(top level)"
        return ConfigError(f"{self.file}: {where}: {message}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def get_map(raw: Any, at: At, allowed: set[str] | None = None) -> Mapping[str, Any]:
    """``raw`` as a mapping with string keys (None counts as empty); unknown keys refused."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise at.error(f"expected a mapping, got {_type_name(raw)}")
    for k in raw:
        if not isinstance(k, str):
            raise at.error(f"keys must be strings, got {k!r}")
        if allowed is not None and k not in allowed:
            choices = ", ".join(sorted(allowed))
            raise at.key(k).error(f"unknown key (allowed: {choices})" if allowed
                                  else "unknown key (none allowed)")
    return raw


def get_str(m: Mapping[str, Any], key: str, at: At, default: str | None = None,
            pattern: re.Pattern[str] | None = None, rule: str = "") -> str:
    """String ``m[key]`` (required when ``default`` is None), optionally matching ``pattern``."""
    if key not in m or m[key] is None:
        if default is None:
            raise at.key(key).error("required key missing")
        return default
    value = m[key]
    if not isinstance(value, str):
        raise at.key(key).error(f"expected a string, got {_type_name(value)}")
    if pattern is not None and not pattern.match(value):
        raise at.key(key).error(f"invalid value {value!r} (expected {rule})")
    return value


def get_int(m: Mapping[str, Any], key: str, at: At, default: int, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """Integer ``m[key]`` within [minimum, maximum]."""
    value = m.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.key(key).error(f"expected an integer, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise at.key(key).error(f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise at.key(key).error(f"must be <= {maximum}, got {value}")
    return value


def get_float(m: Mapping[str, Any], key: str, at: At, default: float, minimum: float = 0.0,
              exclusive: bool = True, maximum: float = 1e9) -> float:
    """A finite number ``m[key]`` greater than (or equal to) ``minimum``, at most ``maximum``
    (NaN, infinities and absurd magnitudes such as 1e308 seconds are refused)."""
    value = m.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.key(key).error(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value > maximum:
        raise at.key(key).error(f"expected a finite number <= {maximum:g}, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise at.key(key).error(f"must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return float(value)


def get_bool(m: Mapping[str, Any], key: str, at: At, default: bool) -> bool:
    """Boolean ``m[key]``."""
    value = m.get(key, default)
    if not isinstance(value, bool):
        raise at.key(key).error(f"expected true or false, got {_type_name(value)}")
    return value


def get_size(m: Mapping[str, Any], key: str, at: At, default: int) -> int:
    """A byte size: an integer or a string like ``4MiB`` / ``512K``."""
    value = m.get(key, default)
    if value is None:
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = (match.group(2) or "")[:1].upper()
        return int(match.group(1)) * _SIZE_UNITS[unit]
    raise at.key(key).error(f"expected a size like 4194304 or '4MiB', got {value!r}")


def get_list(m: Mapping[str, Any], key: str, at: At, required: bool = False) -> list[Any]:
    """List ``m[key]`` (empty when absent and not required)."""
    value = m.get(key)
    if value is None:
        if required:
            raise at.key(key).error("required key missing")
        return []
    if not isinstance(value, list):
        raise at.key(key).error(f"expected a list, got {_type_name(value)}")
    return value
