"""CEL expressions over frames, for the ``map`` stage and ``engine test`` checks.

Why CEL, and why cel-expr-python (Google's cel-cpp): ``docs/mapping-eval.md`` measured the
candidates. CEL cannot loop or recurse, its comprehensions run under an iteration budget
and its regular expressions are RE2 (linear), so an expression written in a rig file has a
bounded cost on any frame; it reports syntax and type errors with line and column.

What an expression sees (the *input* frame, whatever else the stage does):

* ``body`` (dyn), ``headers`` (map of text to dyn), ``kind`` and ``src`` (text), ``ts``
  (int, ns since the epoch);
* CEL's standard library, the ``strings`` extension (``upperAscii``, ``replace``, ``split``,
  ``format``, ...), the ``math`` extension (``math.greatest``, ``math.round``, ...), and ours:
  ``sum(list)``, ``format_time(ns, layout)`` (strftime, UTC; ``%L`` ms, ``%N`` ns),
  ``time_ns(ns)`` (a CEL timestamp), ``mask(text)`` (card numbers masked), ``deleted()``
  (a ``set`` whose value is this removes the field).

Faults and limits of cel-expr-python 0.1.3 this module works around or refuses, found by
testing (a helper's adversarial tests, tests/test_map.py):

* a Python ``bytes`` or ``str`` value holding a NUL character is cut at it when it enters
  CEL. Bytes are handed over as ``bytearray`` (which it copies whole); a text with a NUL is
  refused (``CelError``), never evaluated cut;
* an exception raised in a host function comes back as "no matching overloads"; ``_short``
  turns that into the function's rule (``sum: numbers only, ...``);
* an integer in [2^63, 2^64) becomes a CEL uint without a word: refused, like any integer
  beyond int64;
* cel-cpp has an iteration budget but no memory budget: ``s.replace("a", s)`` grows with
  the square of ``s``. What an expression reads is capped (``MAX_READ``, 64 KiB a text or
  bytes); within that, a rig's expressions are trusted not to multiply their inputs.

Expressions are compiled at ``engine check`` time (errors carry the line and column) and
again in the worker after the fork, from their text: no cel-cpp object crosses a fork.
"""

from __future__ import annotations

import datetime
import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.frame import Frame
from engine.masking import mask_card_numbers

try:  # a wheel for the machine may be missing: the map stage then says so at check time
    from cel_expr_python import cel
    from cel_expr_python.ext import ext_bindings, ext_math, ext_strings
except ImportError:  # pragma: no cover - the wheel is a dependency
    cel = None

#: the value ``deleted()`` returns: a set whose result is this removes the field. A
#: noncharacter, so no text from outside can equal it by accident.
# what ``deleted()`` returns: random per process, so no frame can hold it and delete a field
DELETED = f"\ufdd0fluxrig:deleted:{secrets.token_hex(16)}\ufdd0"
MAX_READ = 64 << 10  # longest text or bytes an expression may read (see to_cel)
INT64 = (-(1 << 63), (1 << 63) - 1)
BATCH = "fx_batch__"  # the variable holding a batch of frames (``Program.run_batch``)
BATCH_SIZE = 32  # frames per batched evaluation (µs a frame here: 1: 19, 16: 11.0, 32: 10.7, 256: 17.6)
MAX_LAYOUT = 64  # format_time layouts: a strftime pattern, not a document
_POS = re.compile(r"<input>:(\d+):(\d+): ")


class CelError(ValueError):
    """An expression that does not compile, or that failed on a frame."""


def _sum(values: list[Any]) -> Any:
    for v in values:
        if type(v) is not int and type(v) is not float:
            raise TypeError("sum: numbers only")  # CEL reports it as an error value
    total = sum(values)
    if type(total) is int and not INT64[0] <= total <= INT64[1]:
        raise OverflowError("sum: beyond int64")
    return total


_SUBSECOND = re.compile(r"%[LN]")


@functools.lru_cache(maxsize=4096)
def _second(secs: int, layout: str) -> tuple[str, ...]:
    """``layout`` formatted for one whole second, cut where %L/%N go (a stream formats the
    same second many times: strftime costs ~2 µs, this lookup ~0.1)."""
    when = datetime.datetime.fromtimestamp(secs, datetime.UTC)
    return tuple(when.strftime(part) for part in _SUBSECOND.split(layout))


@functools.lru_cache(maxsize=64)
def _subsecond_marks(layout: str) -> tuple[str, ...]:
    return tuple(_SUBSECOND.findall(layout))


def _format_time(ns: int, layout: str) -> str:
    # strftime, UTC, exact to the ns (no float on the way); %L: milliseconds (3 digits),
    # %N: nanoseconds (9 digits), as Ruby and GNU date spell them; %f: microseconds
    if len(layout) > MAX_LAYOUT:
        return ""
    if "%%" in layout:  # a literal percent sign must not start %L, %N or %f
        return _format_time(ns, layout.replace("%%", "\ue000")).replace("\ue000", "%")
    try:
        secs, sub = divmod(ns, 1_000_000_000)
        if "%f" in layout:
            layout = layout.replace("%f", f"{sub // 1000:06d}")
        parts = _second(secs, layout)
    except (OverflowError, ValueError, OSError):
        return ""
    if len(parts) == 1:
        return parts[0]
    out = [parts[0]]
    for mark, part in zip(_subsecond_marks(layout), parts[1:]):
        out.append(f"{sub // 1_000_000:03d}" if mark == "%L" else f"{sub:09d}")
        out.append(part)
    return "".join(out)


def _time_ns(ns: int) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(ns // 1000 / 1e6, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _functions() -> list[Any]:
    t = cel.Type
    return [
        cel.FunctionDecl("sum", [cel.Overload("fx_sum", t.DYN, [t.List(t.DYN)], impl=_sum)]),
        cel.FunctionDecl("format_time", [cel.Overload(
            "fx_format_time", t.STRING, [t.INT, t.STRING], impl=_format_time)]),
        cel.FunctionDecl("time_ns", [cel.Overload(
            "fx_time_ns", t.TIMESTAMP, [t.INT], impl=_time_ns)]),
        cel.FunctionDecl("mask", [cel.Overload(
            "fx_mask", t.STRING, [t.STRING], impl=mask_card_numbers)]),
        cel.FunctionDecl("deleted", [cel.Overload(
            "fx_deleted", t.STRING, [], impl=lambda: DELETED)]),
    ]


_ENVS: dict[bool, Any] = {}


def environment(batch: bool = False) -> Any:
    """The CEL environment of this process (built on first use, after the fork); ``batch``:
    the one that also declares the batch variable, for ``Program``'s own wrapper only, so
    an expression from a rig file cannot read it."""
    if cel is None:
        raise CelError("the CEL runtime (cel-expr-python) is not installed for this machine")
    env = _ENVS.get(batch)
    if env is None:
        t = cel.Type
        variables = {"body": t.DYN, "headers": t.Map(t.STRING, t.DYN), "kind": t.STRING,
                     "src": t.STRING, "ts": t.INT}
        if batch:
            variables[BATCH] = t.List(t.DYN)
        env = _ENVS[batch] = cel.NewEnv(
            variables=variables,
            extensions=[ext_strings.ExtStrings(), ext_math.ExtMath(), ext_bindings.ExtBindings()],
            functions=_functions())
    return env


def compile_expr(text: str, want_bool: bool = False) -> Any:
    """Compile one expression.

    Raises:
        CelError: it does not compile; the message starts with ``line L, column C:`` (or
            ``column C:`` for a one-line expression) and ends with the line and a caret.
    """
    if not isinstance(text, str) or not text.strip():
        raise CelError("expected a CEL expression (text), got "
                       f"{type(text).__name__ if not isinstance(text, str) else 'empty text'}")
    try:
        expr = environment().compile(text)
    except RuntimeError as exc:
        raise CelError(describe_compile_error(text, str(exc))) from None
    if want_bool and expr.return_type() not in (cel.Type.BOOL, cel.Type.DYN):
        raise CelError(f"must be true or false, is {expr.return_type().name().lower()}")
    return expr


def describe_compile_error(text: str, message: str) -> str:
    """cel-cpp's ``INVALID_ARGUMENT: ERROR: <input>:1:9: Syntax error: ...`` plus its caret
    lines, as ``column 9: syntax error: ...`` (``line L, column C`` when the expression has
    several lines) followed by the expression's line and a caret."""
    if "recursion limit" in message or "max recursion depth" in message:
        return ("nested deeper than 32 levels (cel-expr-python's limit; no column is given): "
                "split the expression, or use && / || / ?: with fewer parentheses")
    m = _POS.search(message)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        return message.split("\n")[0].removeprefix("INVALID_ARGUMENT: ")
    line, col = int(m.group(1)), int(m.group(2))
    what = message[m.end():].split("\n")[0].strip()
    what = what[:1].lower() + what[1:]
    where = f"column {col}" if "\n" not in text.strip("\n") else f"line {line}, column {col}"
    src = text.split("\n")[line - 1] if line - 1 < len(text.split("\n")) else ""
    return f"{where}: {what}\n  | {src}\n  | {'.' * (col - 1)}^"


def to_cel(value: Any) -> Any:
    """``value`` as CEL may take it: bytes as bytearray (cel-expr cuts ``bytes`` at a NUL).

    Raises:
        CelError: a text holds a NUL character (the binding would cut it); a text or bytes
            is longer than ``MAX_READ`` (an expression like ``s.replace("a", s)`` grows
            with the square of its input, and cel-cpp has no memory budget); an integer is
            beyond int64 (the binding would make it a uint without a word); a map key is
            not a text, an integer or a boolean.
    """
    t = type(value)
    if t is str:
        if "\x00" in value:
            raise CelError("a text with a NUL character cannot enter a CEL expression "
                           "(cel-expr-python would cut it)")
        if len(value) > MAX_READ:
            raise CelError(f"a text of {len(value)} characters is longer than an expression "
                           f"may read: max={MAX_READ}")
        return value
    if t is int:
        if not INT64[0] <= value <= INT64[1]:
            raise CelError("an integer beyond int64 cannot enter a CEL expression")
        return value
    if t is float or t is bool or value is None:
        return value
    if t is dict:
        out = {}
        for k, v in value.items():
            if type(k) not in (str, int, bool):
                raise CelError(f"a map key of type {type(k).__name__} cannot enter a CEL "
                               "expression (text, integer or boolean keys only)")
            out[to_cel(k)] = to_cel(v)
        return out
    if t is list:
        return [to_cel(v) for v in value]
    if t is bytes:
        if len(value) > MAX_READ:
            raise CelError(f"bytes of length {len(value)} are longer than an expression may "
                           f"read: max={MAX_READ}")
        return bytearray(value)
    return value


_PLAIN = frozenset((str, int, float, bool, type(None)))
_ABSENT = object()


def from_cel(value: Any) -> Any:
    """A CEL result as a frame value: bytearray -> bytes, a timestamp -> RFC 3339 text, a
    duration -> int ns, maps and lists converted through."""
    t = type(value)
    if t in _PLAIN:
        return value
    if t is dict:
        return {from_cel(k): from_cel(v) for k, v in value.items()}
    if t is list:
        return [from_cel(v) for v in value]
    if t is bytearray:
        return bytes(value)
    if t is datetime.datetime:
        return value.isoformat().replace("+00:00", "Z")
    if t is datetime.timedelta:
        return (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1000
    return value


# CEL string and bytes literals and line comments, blanked before looking for uses of body
# and headers. Raw literals (r"...") take backslashes as they are; the others escape
# the next character, in triple-quoted ones too. Blanking too much would hide a read and
# hand CEL too little (wrong); blanking too little only hands it more (slower).
_RAW = r"""(?:[rR][bB]?|[bB][rR])(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'[^'\n]*'|"[^"\n]*")"""
_COOKED = (r"""[bB]?(?:'''(?:\\[\s\S]|[^\\])*?'''|\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\""""
           r"""|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")""")
_LITERAL = re.compile(f"{_RAW}|{_COOKED}|//[^\n]*")
# body / headers, then optionally .name (and whether a call follows) or [ ... ]
_VAR = re.compile(r"(?<![\w.])(kind|src|ts)\b")
_USE = re.compile(r"(?<![\w.])(body|headers)\b(?:\s*\.\s*([A-Za-z_]\w*)\s*(\()?|\s*(\[[^\]]*\]))?")
_QUOTED = re.compile(r"""\[\s*(?:"([^"\\\n]*)"|'([^'\\\n]*)')\s*\]""")


def references(texts: Sequence[str]) -> dict[str, frozenset[str] | None]:
    """The variables the expressions read, each with the top-level keys of ``body`` and
    ``headers`` they read; None: the whole value (``kind``, ``src``, ``ts``; a bare use of
    a map, a method or macro on it, an index that is not a plain text).

    Only what is read is handed to CEL, which converts every value it is given (a 20-field
    body costs ~6 µs more than the few fields a mapping reads). Erring means None: slower,
    never wrong. Literals and comments are blanked first, so ``"body.x"`` in a text counts
    for nothing (the span positions stay, so an index's text is read back from the source).
    """
    found: dict[str, set[str] | None] = {}
    for text in texts:
        plain = _LITERAL.sub(lambda m: " " * len(m.group(0)), text)
        for m in _VAR.finditer(plain):
            found[m.group(1)] = None
        for m in _USE.finditer(plain):
            found.setdefault(m.group(1), set())
            keys = found[m.group(1)]
            if keys is None:
                continue
            if m.group(2) and not m.group(3):  # body.name, not body.name(...)
                keys.add(m.group(2))
                continue
            if m.group(4):  # body["x"]: the literal was blanked, read it from the source
                q = _QUOTED.fullmatch(text[m.start(4):m.end(4)])
                if q is not None:
                    keys.add(q.group(1) if q.group(1) is not None else q.group(2))
                    continue
            found[m.group(1)] = None
    return {k: None if v is None else frozenset(v) for k, v in found.items()}


@dataclass(frozen=True, slots=True)
class Program:
    """Several named expressions evaluated together over one frame.

    Joined into one CEL list literal so a frame costs one activation and one evaluation (and
    a batch of frames one evaluation of that list mapped over them); if that fails, each
    expression is evaluated alone to name the one that failed.
    """

    names: tuple[str, ...]
    texts: tuple[str, ...]
    joined: Any
    each: tuple[Any, ...]
    reads: Mapping[str, frozenset[str] | None]  # ``references``: what to hand over
    batched: Any  # the joined map for every frame of a list, or None (it did not compile)

    @classmethod
    def build(cls, named: Sequence[tuple[str, str]]) -> Program:
        names = tuple(n for n, _ in named)
        texts = tuple(t for _, t in named)
        each = tuple(compile_expr(t) for t in texts)
        joined = batched = None
        reads = references(texts)
        if named:
            # a newline before the closing paren: a // comment must not swallow it
            literal = "[" + ", ".join(f"({t}\n)" for t in texts) + "]"
            joined = environment().compile(literal)
            # the same map over a list: the per-call cost of cel-expr (~7 µs) shared by a
            # batch; cel.bind gives each frame's values the names the expressions use
            inner = literal
            for var in reads:
                inner = f"cel.bind({var}, x__.{var}, {inner})"
            try:
                batched = environment(batch=True).compile(f"{BATCH}.map(x__, {inner})")
            except RuntimeError:
                batched = None  # e.g. 32 levels of nesting: evaluate frame by frame
        return cls(names, texts, joined, each, reads, batched)

    def _data(self, frame: Frame) -> dict[str, Any]:
        # only what is read: CEL converts every value it is given (a frame costs ~1 µs here)
        try:
            return self._slim(frame)
        except CelError as exc:
            raise CelError(f"reading {exc}") from None

    def _slim(self, frame: Frame) -> dict[str, Any]:
        data = {}
        for var, keys in self.reads.items():
            value = getattr(frame, var)
            if keys is None or type(value) is not dict:
                try:
                    data[var] = to_cel(value)
                except CelError as exc:
                    raise CelError(f"{var}: {exc}") from None
                continue
            slim = {}
            for name in keys:
                v = value.get(name, _ABSENT)
                if v is _ABSENT:
                    continue
                t = type(v)
                try:
                    if t is str:
                        if "\x00" in v or len(v) > MAX_READ:
                            to_cel(v)  # raises, with the message
                    elif t is int:
                        if not INT64[0] <= v <= INT64[1]:
                            to_cel(v)
                    elif not (t is float or t is bool or v is None):
                        v = to_cel(v)
                except CelError as exc:
                    raise CelError(f"{var}.{name}: {exc}") from None
                slim[name] = v
            data[var] = slim
        return data

    def run_batch(self, frames: Sequence[Frame]) -> list[list[Any]] | None:
        """``run`` for several frames at once, or None when any of them fails (or cannot
        enter CEL): then ``run`` each to find which. Same values as ``run``."""
        if self.batched is None or not frames:
            return None
        try:
            items = [self._data(f) for f in frames]
            result = self.batched.eval(data={BATCH: items})
        except (CelError, RuntimeError):
            return None
        if result.type() == cel.Type.ERROR:
            return None
        return [[v if type(v) in _PLAIN else from_cel(v) for v in values]
                for values in result.plain_value()]

    def run(self, frame: Frame) -> list[Any]:
        """The value of every expression over ``frame`` (``body``, ``headers``, ``kind``,
        ``src``, ``ts``; only what the expressions read is handed to CEL), in order.

        Raises:
            CelError: an expression failed (``<name>: <CEL's message>``) or a value could
                not enter CEL.
        """
        if self.joined is None:
            return []
        data = self._data(frame)
        try:
            result = self.joined.eval(data=data)
            if result.type() != cel.Type.ERROR:
                return [from_cel(v) for v in result.plain_value()]
        except RuntimeError:
            pass  # the iteration budget, an out-of-range integer: find which one below
        for name, expr in zip(self.names, self.each):
            try:
                one = expr.eval(data=data)
            except RuntimeError as exc:
                raise CelError(f"{name}: {_short(str(exc))}") from None
            if one.type() == cel.Type.ERROR:
                raise CelError(f"{name}: {_short(str(one.value()))}")
        raise CelError("the expressions failed together but not alone")


_HOST_FAILED = re.compile(r"No matching overloads found : (sum|format_time|time_ns|mask)\(")
_HOST_RULES = {"sum": "sum: numbers only, and a total within int64",
               "format_time": "format_time: an int of ns and a text layout",
               "time_ns": "time_ns: an int of ns", "mask": "mask: a text"}


def _short(message: str) -> str:
    first = message.split("\n")[0]
    host = _HOST_FAILED.search(first)
    if host is not None:  # a host function raised: cel-expr says only "no overload"
        return _HOST_RULES[host.group(1)]
    for prefix in ("INTERNAL: ", "UNKNOWN: ", "INVALID_ARGUMENT: ", "NOT_FOUND: "):
        first = first.removeprefix(prefix)
    # values from the frame may be quoted: no card number in a dead-letter reason or a log
    return mask_card_numbers(first.replace(" [INTERNAL]", "")[:300])
