"""The ``map`` stage: new fields computed by CEL expressions, copies, deletes and routing.

Settings (each optional; every expression reads the *input* frame, so their order does not
matter)::

    copy:  {body.merchant: body.merchant_id}        # dst <- src path, done natively
    set:                                            # dst <- CEL expression
      body.amount: double(body.amount_minor) / 100.0
      body.outcome: 'body.rc == "00" ? "approved" : "declined"'
      body.debug: 'body.env == "prod" ? deleted() : body.debug'
    drop: [body.merchant_id, body.device.fw]        # paths removed
    route:                                          # first rule whose condition holds
      - {when: 'body.channel == "test"', to: discard}
      - {when: 'body.rc != "00"', to: [jetstream, review]}
    default_route: [jetstream, http]                # absent: the route header is removed
    kind: payments.mapped

The output is built from a copy of the input: ``copy`` first, then ``set``, then ``drop``;
then the ``route`` header is set to the sinks the frame goes to (``engine.fanout``) and the
kind changed. ``discard`` drops the frame. A mapped frame keeps its id and timestamp: it is
the same signal, transformed, so replays de-duplicate. A frame an expression fails on (a
missing key, a wrong type, the iteration budget) makes the stage raise ``CelError`` naming
the key; the worker dead-letters that frame alone and goes on. ``gears/celexpr.py`` says
what an expression can use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.fanout import DISCARD, ROUTE
from engine.frame import Frame, transformed
from engine.keytable import CUSTOM, LIST, MAP, REQUIRED, SECTIONS, STRING, Key, Table
from engine.schema import At
from gears.base import Stage
from gears.celexpr import BATCH_SIZE, DELETED, CelError, Program, compile_expr
from gears.mapping import check_path

ROUTE_RULE = Table("route rule", "One routing rule: the first whose condition holds wins.", (
    Key("when", STRING, "CEL condition over the input frame (true or false).", REQUIRED),
    Key("to", CUSTOM, "Sink name, or a list of them; ``discard`` drops the frame.", REQUIRED,
        type_text="a sink name or a list of sink names"),
))

SETTINGS = Table("map", "Computes fields with CEL expressions, copies, deletes and routes "
                 "(paths start with ``headers.`` or ``body.``; expressions read the input "
                 "frame: ``body``, ``headers``, ``kind``, ``src``, ``ts``).", (
    Key("copy", MAP, "Destination path (key) <- source path (value), copied as is.",
        items="path"),
    Key("set", MAP, "Destination path (key) <- CEL expression (value); ``deleted()`` "
        "removes the field.", items="CEL expression"),
    Key("drop", LIST, "Paths to remove.", items="path"),
    Key("route", SECTIONS, "Routing rules in order: the sinks of the first rule whose "
        "``when`` holds go into the ``route`` header.", table=ROUTE_RULE),
    Key("default_route", CUSTOM, "Sinks of a frame no rule matched; absent: the ``route`` "
        "header is removed (every sink).", type_text="a sink name or a list of sink names"),
    Key("kind", STRING, "New frame kind; absent: unchanged."),
))


@dataclass(frozen=True, slots=True, kw_only=True)
class MapSettings:
    """The checked settings; expressions as text (compiled again in the worker)."""

    copy: tuple[tuple[str, str], ...]
    set: tuple[tuple[str, str], ...]
    drop: tuple[str, ...]
    route: tuple[tuple[str, tuple[str, ...]], ...]
    default_route: tuple[str, ...] | None
    kind: str | None


def _targets(raw: Any, at: At) -> tuple[str, ...]:
    names = [raw] if isinstance(raw, str) else raw
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names)):
        raise at.error(f"expected a sink name or a list of sink names, got {at.show(raw)}")
    return tuple(names)


def _expr(text: Any, at: At, want_bool: bool = False) -> str:
    try:
        compile_expr(text, want_bool)
    except CelError as exc:
        raise at.error(str(exc)) from None
    return text


class MapStage(Stage):
    """CEL mapping and routing."""

    settings_table = SETTINGS

    @classmethod
    def parse_settings(cls, raw: Any, at: At) -> MapSettings:
        r = SETTINGS.read(raw, at)
        cp, st = r.mapping("copy"), r.mapping("set")
        rules = []
        for rule in r.sections("route"):
            when = _expr(rule.raw("when"), rule.where("when"), want_bool=True)
            rules.append((when, _targets(rule.raw("to"), rule.where("to"))))
        default = r.raw("default_route")
        settings = MapSettings(
            copy=tuple((check_path(k, at.key("copy")), check_path(v, at.key("copy").key(k)))
                       for k, v in cp.items()),
            set=tuple((check_path(k, at.key("set")), _expr(v, at.key("set").key(k)))
                      for k, v in st.items()),
            drop=tuple(check_path(p, at.key("drop").index(i))
                       for i, p in enumerate(r.sequence("drop"))),
            route=tuple(rules),
            default_route=None if default is None else _targets(default,
                                                                r.where("default_route")),
            kind=r.optional_string("kind"),
        )
        _program(settings)  # the expressions also compile together (one evaluation a frame)
        return settings

    @classmethod
    def routes(cls, settings: MapSettings) -> tuple[str, ...]:
        names: list[str] = []
        for _, to in settings.route:
            names += [n for n in to if n not in names]
        names += [n for n in settings.default_route or () if n not in names]
        return tuple(names)

    def __init__(self, settings: MapSettings, ctx: Any):
        super().__init__(settings, ctx)
        self.program = _program(settings)
        self.nset = len(settings.set)
        # paths as (0 headers | 1 body, keys below it): most are one key deep, written and
        # read with one dict operation (this stage's budget is ~20 µs a frame, CEL included)
        self.copies = tuple((_split(dst), _split(src)) for dst, src in settings.copy)
        self.sets = tuple(_split(dst) for dst, _ in settings.set)
        # only a set whose expression calls deleted() can delete (a frame cannot hold the
        # per-process marker, and a set that cannot return it never compares)
        self.deletes = tuple("deleted(" in text for _, text in settings.set)
        self.drops = tuple(_split(p) for p in settings.drop)
        self.body_paths = any(root == 1 for root, _ in
                              (*(c[0] for c in self.copies), *self.sets, *self.drops))
        self.routed = bool(settings.route) or settings.default_route is not None

        def target(to: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
            # the route header's names, and whether the frame is dropped (discard alone)
            return tuple(n for n in to if n != DISCARD), to == (DISCARD,)
        self.rules = tuple((self.nset + i, target(to)) for i, (_, to) in
                           enumerate(settings.route))
        self.default_route = None if settings.default_route is None else \
            target(settings.default_route)
        self.kind = settings.kind

    def process(self, frames: list[Frame], emit: Callable[[Frame], None]) -> None:
        # expressions are evaluated BATCH_SIZE frames at a time (one cel-expr call); a chunk
        # that fails anywhere is done frame by frame, so the error names its frame
        for start in range(0, len(frames), BATCH_SIZE):
            chunk = frames[start:start + BATCH_SIZE]
            results = self.program.run_batch(chunk) if len(chunk) > 1 else None
            for i, frame in enumerate(chunk):
                out = self._build(frame, results[i]) if results is not None else \
                    self.map_one(frame)
                if out is not None:
                    emit(out)

    def map_one(self, frame: Frame) -> Frame | None:
        """The mapped frame, or None when it is routed to ``discard``; the input frame is
        never changed.

        Raises:
            CelError: an expression failed on this frame (the message names its key).
        """
        return self._build(frame, self.program.run(frame))

    def _build(self, frame: Frame, values: list[Any]) -> Frame | None:
        route = self.default_route  # (names without discard, discard alone) or None
        for i, (index, target) in enumerate(self.rules):  # first true wins
            hit = values[index]
            if hit is True:
                route = target
                break
            if hit is not False:
                raise CelError(f"route[{i}].when: must be true or false, got "
                               f"{type(hit).__name__}")
        if route is not None and route[1]:
            return None
        body_in = frame.body
        if type(body_in) is dict:
            body = dict(body_in)
        elif self.body_paths:
            raise CelError(f"body paths need a map body, got {type(body_in).__name__}")
        else:
            body = body_in
        headers_in = frame.headers
        headers = dict(headers_in)
        roots = (headers, body)
        inputs = (headers_in, body_in)
        fresh = {id(headers), id(body)}
        # copies read the input frame, which nothing here changes (maps on the way to a
        # nested write are copied first), so a swap is a swap; each gets its own subtree
        for (root, keys), (src_root, src_keys) in self.copies:
            value = _get(inputs[src_root], src_keys)
            if value is _MISSING:
                continue
            if type(value) is dict or type(value) is list:
                value = _deep(value)
            if len(keys) == 1:
                roots[root][keys[0]] = value
            else:
                _put(roots[root], keys, value, fresh)
        for (root, keys), value, deletes in zip(self.sets, values, self.deletes):
            if deletes and type(value) is str and value == DELETED:
                value = _MISSING
            if len(keys) == 1 and value is not _MISSING:
                roots[root][keys[0]] = value
            else:
                _put(roots[root], keys, value, fresh)
        for root, keys in self.drops:
            if len(keys) == 1:
                roots[root].pop(keys[0], None)
            else:
                _put(roots[root], keys, _MISSING, fresh)
        if self.routed:
            if route is None:
                headers.pop(ROUTE, None)
            else:
                headers[ROUTE] = list(route[0])
        return transformed(frame, self.kind or frame.kind, headers, body)


def _split(path: str) -> tuple[int, tuple[str, ...]]:
    head, *keys = path.split(".")
    return (0 if head == "headers" else 1), tuple(keys)


def _get(root: Any, keys: tuple[str, ...]) -> Any:
    if len(keys) == 1:
        return root.get(keys[0], _MISSING) if type(root) is dict else _MISSING
    value = root
    for key in keys:
        if type(value) is not dict:
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return value
    return value


_MISSING = object()
_CONTAINERS = (dict, list)


def _deep(value: Any) -> Any:
    """A copy of a container taken from the input frame (scalars are shared: immutable)."""
    t = type(value)
    if t is dict:
        return {k: _deep(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if t is list:
        return [_deep(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def _put(root: dict[str, Any], parts: tuple[str, ...], value: Any, fresh: set[int]) -> None:
    """Set (or with ``_MISSING`` remove) ``parts`` in ``root``, copying each map on the way
    that is still the input frame's (``fresh``: ids of the maps already copied), so the
    input frame is never changed: a batch the worker replays frame by frame after an error
    must see its frames as they came."""
    node = root
    for part in parts[:-1]:
        child = node.get(part)
        if type(child) is dict:
            if id(child) not in fresh:
                child = dict(child)
                node[part] = child
                fresh.add(id(child))
        elif value is _MISSING:
            return  # removing below a missing or scalar node: nothing to remove
        else:
            child = {}
            node[part] = child
            fresh.add(id(child))
        node = child
    if value is _MISSING:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _program(s: MapSettings) -> Program:
    return Program.build([(f"set.{dst}", text) for dst, text in s.set]
                         + [(f"route[{i}].when", when) for i, (when, _) in enumerate(s.route)])
