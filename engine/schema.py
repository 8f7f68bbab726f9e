"""The validation toolkit for rig files and gear settings: where a value sits (``At``), one
error type (``ConfigError``) and typed getters that name the key path in every message.

Pure and dependency-free, so the engine's config loader and every gear's ``parse_settings``
use the same rules without importing each other. The declarative key tables that call these
getters (and document every key) are in ``engine.keytable``.

A value taken from the environment (``${VAR}`` in the rig file, ``engine.yamlfile``) may be
a secret: ``At.show`` prints the reference written in the file instead of the value, and
every getter prints values through it.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.units import (
    DURATION_FORMS,
    SIZE_FORMS,
    format_duration,
    parse_duration,
    parse_size,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # rack, pipeline and gear names
SUBJECT_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")  # a NATS subject without wildcards
SUBJECT_PATTERN_RE = re.compile(r"^([^\s.*>]+|\*)(\.([^\s.*>]+|\*))*(\.>)?$|^>$")


class ConfigError(ValueError):
    """A rig file that cannot run; the message says file, key path and what was expected.

    Attributes:
        file: the rig file ("" when not known).
        path: the key path (``pipelines[0].source``), "" for the file as a whole.
        problem: the message without file and path.
    """

    def __init__(self, message: str, *, file: str = "", path: str = "", problem: str = ""):
        super().__init__(message)
        self.file = file
        self.path = path
        self.problem = problem or message


@dataclass(frozen=True, slots=True)
class At:
    """Where a value sits in the rig file, for error messages: ``file`` + key ``path``.

    ``origins`` maps the key path of every value that ``${VAR}`` interpolation produced to
    the text written in the file; it travels with ``key``/``index`` so ``show`` can keep
    such values (perhaps secrets) out of messages.
    """

    file: str
    path: str = ""
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def key(self, name: str) -> At:
        """The location of ``name`` inside this mapping."""
        return At(self.file, f"{self.path}.{name}" if self.path else name, self.origins)

    def index(self, i: int) -> At:
        """The location of item ``i`` of this list."""
        return At(self.file, f"{self.path}[{i}]", self.origins)

    def error(self, message: str) -> ConfigError:
        """A ConfigError located here."""
        where = self.path or "(top level)"
        return ConfigError(f"{self.file}: {where}: {message}", file=self.file, path=self.path,
                           problem=message)

    def show(self, value: object) -> str:
        """``value`` (which sits here) for a message: its repr, or, when it came from the
        environment, the ``${VAR}`` text of the file."""
        template = self.origins.get(self.path)
        if template is not None:
            return f"{template!r} (from the environment, not shown)"
        return repr(value)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _got(value: Any, at: At) -> str:
    """What a value of the wrong type is, for a message: its type, or for text from the
    environment the reference that produced it (the type alone says little there)."""
    return at.show(value) if at.path in at.origins else _type_name(value)


_INT_TEXT = re.compile(r"^[+-]?\d+$")
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _value(m: Mapping[str, Any], key: str, at: At, default: Any, kind: type) -> Any:
    """``m[key]`` or ``default`` when absent or null. A value interpolated from the
    environment is text: for an ``int``, ``float`` or ``bool`` key it is read as one when it
    can be (so ``port: ${PORT}`` works), and an empty text counts as absent."""
    value = m.get(key)
    if isinstance(value, str) and at.key(key).path in at.origins:
        text = value.strip()
        if not text:
            value = None
        elif kind is bool and text.lower() in ("true", "false"):
            value = text.lower() == "true"
        elif kind in (int, float) and _INT_TEXT.match(text):
            value = int(text)
        elif kind is float and _FLOAT_TEXT.match(text):
            value = float(text)
    return default if value is None else value


def get_map(raw: Any, at: At, allowed: Collection[str] | None = None) -> Mapping[str, Any]:
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
        raise at.key(key).error(f"invalid value {at.key(key).show(value)} (expected {rule})")
    return value


def get_int(m: Mapping[str, Any], key: str, at: At, default: int | None,
            minimum: int | None = None, maximum: int | None = None) -> int:
    """Integer ``m[key]`` within [minimum, maximum] (required when ``default`` is None)."""
    value = _value(m, key, at, default, int)
    if value is None:
        raise at.key(key).error("required key missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.key(key).error(f"expected an integer, got {_got(value, at.key(key))}")
    if minimum is not None and value < minimum:
        raise at.key(key).error(f"must be >= {minimum}, got {at.key(key).show(value)}")
    if maximum is not None and value > maximum:
        raise at.key(key).error(f"must be <= {maximum}, got {at.key(key).show(value)}")
    return value


def get_float(m: Mapping[str, Any], key: str, at: At, default: float, minimum: float = 0.0,
              exclusive: bool = True, maximum: float = 1e9) -> float:
    """A finite number ``m[key]`` greater than (or equal to) ``minimum``, at most ``maximum``
    (NaN, infinities and absurd magnitudes such as 1e308 seconds are refused)."""
    value = _value(m, key, at, default, float)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.key(key).error(f"expected a number, got {_got(value, at.key(key))}")
    shown = at.key(key).show(value)
    if not math.isfinite(value) or value > maximum:
        raise at.key(key).error(f"expected a finite number <= {maximum:g}, got {shown}")
    if value < minimum or (exclusive and value == minimum):
        raise at.key(key).error(f"must be {'>' if exclusive else '>='} {minimum}, got {shown}")
    return float(value)


def get_duration(m: Mapping[str, Any], key: str, at: At, default: float,
                 minimum: float = 0.0, exclusive: bool = True, maximum: float = 1e9) -> float:
    """A duration in seconds: a number (checked as ``get_float`` checks it, with the same
    messages) or a string like ``250ms`` / ``1.5s`` / ``1m`` / ``2h`` (``engine.units``)."""
    value = _value(m, key, at, default, float)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return get_float(m, key, at, default, minimum, exclusive, maximum)
    kat = at.key(key)
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None:
        got = kat.show(value) if isinstance(value, str) else _type_name(value)
        raise kat.error(f"expected a duration: {DURATION_FORMS}; got {got}")
    if seconds > maximum:
        raise kat.error(f"must be <= {format_duration(maximum)}, got {kat.show(value)}")
    if seconds < minimum or (exclusive and seconds == minimum):
        raise kat.error(f"must be {'>' if exclusive else '>='} {format_duration(minimum)}, "
                        f"got {kat.show(value)}")
    return seconds


def get_bool(m: Mapping[str, Any], key: str, at: At, default: bool) -> bool:
    """Boolean ``m[key]``."""
    value = _value(m, key, at, default, bool)
    if not isinstance(value, bool):
        raise at.key(key).error(f"expected true or false, got {_got(value, at.key(key))}")
    return value


def get_size(m: Mapping[str, Any], key: str, at: At, default: int, minimum: int = 0,
             maximum: int | None = None) -> int:
    """A byte size within [minimum, maximum]: an integer, or a string like ``4MiB`` (powers
    of 1024) or ``4MB`` (powers of 1000; ``engine.units``)."""
    value = _value(m, key, at, default, str)
    kat = at.key(key)
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        size = parse_size(value)
    if size is None:
        got = kat.show(value) if isinstance(value, str) else _type_name(value)
        raise kat.error(f"expected a size: {SIZE_FORMS}; got {got}")
    if size < minimum:
        raise kat.error(f"must be >= {minimum} bytes, got {kat.show(value)}")
    if maximum is not None and size > maximum:
        raise kat.error(f"must be <= {maximum} bytes, got {kat.show(value)}")
    return size


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
OTLP_TRACES_PATH = "/v1/traces"
# RFC 9110 field-name: a token
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def get_otlp_endpoint(text: str, at: At) -> str:
    """An OTLP/HTTP collector URL checked (``telemetry.otlp.endpoint``, ``traces.forward.
    endpoint``): ``http(s)://HOST[:PORT][/PATH]``, the port in
    range, no query or fragment; a trailing ``/v1/traces`` (the full URL, as some
    collectors document it) is stripped, since it is added to every POST.

    Raises:
        ConfigError: anything else (the value shown, or its ``${VAR}`` when from the
            environment).
    """
    expected = ("expected http(s)://HOST[:PORT][/PATH]: the OTLP/HTTP receiver; "
                f"{OTLP_TRACES_PATH} is added")
    endpoint = text.strip().rstrip("/")
    parts = urllib.parse.urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # urllib's words for a port out of 0-65535 or not a number
        port = -1
    if port is not None and not 0 < port < 65536:
        raise at.error(f"invalid URL {at.show(text)}: port out of range (expected 1-65535)")
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or "?" in endpoint or "#" in endpoint):
        raise at.error(f"invalid URL {at.show(text)} ({expected})")
    if endpoint.endswith(OTLP_TRACES_PATH):
        endpoint = endpoint.removesuffix(OTLP_TRACES_PATH).rstrip("/")
    return endpoint


def get_http_header(headers: Mapping[str, object], key: str, at: At) -> str:
    """One HTTP header of a setting checked: the name a token, the value one line of
    text (a CR or LF would end the header and start another: header injection; aiohttp
    would refuse it only at the first request).

    Raises:
        ConfigError: a bad name or value (the value shown only when not from ``${VAR}``).
    """
    value = get_str(headers, key, at)
    where = at.key(key)
    if not isinstance(key, str) or not key or not set(key) <= _TCHAR:
        raise where.error(f"invalid header name {key!r} (expected a token: letters, digits, "
                          f"and !#$%&'*+-.^_`|~)")
    if any(ch != "\t" and (ord(ch) < 0x20 or ord(ch) == 0x7F) for ch in value):
        raise where.error(f"invalid header value {where.show(value)} (expected one line of "
                          f"text: no CR, LF or other control character)")
    return value



