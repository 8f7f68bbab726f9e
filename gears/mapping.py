"""Mapping stage: set, copy, rename or drop fields of a frame, and filter frames.

Settings (each optional, applied in this order)::

    filter: {body.status: ok}          # pass only frames whose path equals the value
    copy:   {headers.device: body.device}   # dst: src
    set:    {headers.site: plant-7}    # dst: constant
    drop:   [body.debug]
    kind:   demo.mapped                # new frame kind

Paths start with ``headers.`` or ``body.`` (body must be a map for body paths). A mapped frame
keeps its id and timestamp: it is the same signal, transformed, so replays de-duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.frame import Frame, path_get
from engine.keytable import LIST, MAP, STRING, Key, Table
from engine.schema import At
from gears.base import Stage

SETTINGS = Table("mapping", "Set, copy, rename or drop fields of a frame, and filter frames "
                 "(applied in this order; paths start with ``headers.`` or ``body.``).", (
    Key("filter", MAP, "Pass only frames whose path (key) equals the value.",
        items="value"),
    Key("copy", MAP, "Destination path (key) <- source path (value).", items="path"),
    Key("set", MAP, "Path (key) <- constant (value).", items="value"),
    Key("drop", LIST, "Paths to remove.", items="path"),
    Key("kind", STRING, "New frame kind; absent: unchanged."),
))

_MISSING = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class MappingSettings:
    filter: tuple[tuple[str, Any], ...]
    copy: tuple[tuple[str, str], ...]
    set: tuple[tuple[str, Any], ...]
    drop: tuple[str, ...]
    kind: str | None


def check_path(path: Any, at: At) -> str:
    if not isinstance(path, str) or not path.startswith(("headers.", "body.")) or path.endswith("."):
        raise at.error(f"expected a path like 'headers.x' or 'body.a.b', got {path!r}")
    return path


def _put(root: dict[str, Any], parts: list[str], value: Any) -> None:
    # Values are copied in: a constant from the settings or a subtree of the input frame
    # must never be shared with the output, where a later set/drop would change it.
    node = root
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            if value is _MISSING:
                return  # dropping below a missing or scalar node: nothing to drop
            child = {}
            node[part] = child
        node = child
    if value is _MISSING:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = _copy_tree(value)


def _copy_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    return value


class MappingStage(Stage):
    """Field mapping and filtering."""

    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> MappingSettings:
        r = SETTINGS.read(raw, at)
        flt, cp, st = r.mapping("filter"), r.mapping("copy"), r.mapping("set")
        drop = r.sequence("drop")
        kind = r.optional_string("kind")
        return MappingSettings(
            filter=tuple((check_path(k, at.key("filter")), v) for k, v in flt.items()),
            copy=tuple((check_path(k, at.key("copy")), check_path(v, at.key("copy").key(k)))
                       for k, v in cp.items()),
            set=tuple((check_path(k, at.key("set")), v) for k, v in st.items()),
            drop=tuple(check_path(p, at.key("drop").index(i)) for i, p in enumerate(drop)),
            kind=kind,
        )

    def process(self, frames: list[Frame], emit: Callable[[Frame], None]) -> None:
        s: MappingSettings = self.settings
        for frame in frames:
            if any(path_get(frame, p, _MISSING) != v for p, v in s.filter):
                continue
            if not (s.copy or s.set or s.drop):
                emit(frame if s.kind is None else replace(frame, kind=s.kind))
                continue
            tree = {"headers": _copy_tree(frame.headers), "body": _copy_tree(frame.body)}
            for dst, src in s.copy:
                value = path_get(frame, src, _MISSING)
                if value is not _MISSING:
                    _put(tree, dst.split("."), value)
            for dst, value in s.set:
                _put(tree, dst.split("."), value)
            for path in s.drop:
                _put(tree, path.split("."), _MISSING)
            emit(replace(frame, headers=tree["headers"], body=tree["body"],
                         kind=s.kind or frame.kind))
