"""Unified Namespace names — sans I/O.

A tag's path is ISA-95's hierarchy, one name per level::

    <enterprise>.<site>.<area>.<line>.<cell>.<device>.<tag>

published on ``uns.v1.<path>`` (the history stream ``UNS``) and kept as the key ``<path>``
in the KV bucket ``uns`` (the last value). Names keep their case and may hold letters,
digits, ``_`` and ``-`` only: a NATS subject token may not hold a dot (the separator), a
space or the wildcards ``*`` and ``>``, and a KV key allows only letters, digits and
``-/_=.`` — one rule serves both.
"""

from __future__ import annotations

import re
from typing import Final

LEVELS: Final = ("enterprise", "site", "area", "line", "cell", "device", "tag")
SUBJECT_PREFIX: Final = "uns.v1"
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UnsNameError(ValueError):
    """A name that cannot be a UNS level (the message says which rule)."""


def check_name(name: object, level: str) -> str:
    """``name`` if it may be the ``level`` of a path.

    Raises:
        UnsNameError: empty, too long, or a character other than letters, digits, _ and -.
    """
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        why = ("a dot separates levels" if isinstance(name, str) and "." in name else
               "spaces are not allowed" if isinstance(name, str) and " " in name else
               "wildcards are not allowed" if isinstance(name, str)
               and ("*" in name or ">" in name) else
               "letters, digits, _ and - only, 1 to 64")
        raise UnsNameError(f"invalid UNS {level} name {shown}: {why}")
    return name


def path_of(levels: dict[str, str]) -> str:
    """The dotted path of a tag from its seven level names (each checked).

    Raises:
        UnsNameError: a level missing or a name invalid.
    """
    names = []
    for level in LEVELS:
        if level not in levels:
            raise UnsNameError(f"UNS {level} missing (every tag needs {', '.join(LEVELS)})")
        names.append(check_name(levels[level], level))
    return ".".join(names)


def subject_of(path: str) -> str:
    """The subject a tag's samples are published on."""
    return f"{SUBJECT_PREFIX}.{path}"


def path_from_subject(subject: str) -> str:
    """The path of a sample's subject (``uns.v1.`` removed)."""
    return subject.removeprefix(SUBJECT_PREFIX + ".")


__all__ = ["LEVELS", "NAME_RE", "SUBJECT_PREFIX", "UnsNameError", "check_name", "path_from_subject",
           "path_of", "subject_of"]
