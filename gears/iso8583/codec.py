"""ISO 8583 codecs: pyiso8583 specs by name or from a YAML file, full decode/encode through
pyiso8583, and a compiled field *index* for the switch's hot path.

Specs (``spec_by_name``):

* ``default``: pyiso8583's ``default`` — binary bitmap, ASCII lengths and fields;
* ``default_ascii``: pyiso8583's ``default_ascii`` — hex (ASCII) bitmap;
* ``bcd``: binary bitmap, BCD lengths and packed-BCD numeric fields (``n`` fields of
  ``default`` become ``data_enc: b, len_count: nibbles``, with a left pad of ``0`` for odd
  lengths), ASCII for the rest;
* ``ebcdic``: ``default`` with every ASCII length and text field in EBCDIC (cp500);
* a path to a YAML file: ``{base: <name>, fields: {"<field>": {<pyiso8583 field spec>}}}``
  overriding or adding field definitions; ``sensitive: true`` on a field sends it to the
  coat check vault like DE2/35/45/52, and ``type: n|an|ans|z|b`` says what the switch's edge
  validation checks the field against (pyiso8583 ignores both keys).

The switch does not need a full decode to do its job: routing reads the MTI, DE2, DE3, DE4
and DE49; matching reads DE11/DE41/DE37; the message itself is forwarded as bytes. ``FieldIndex``
walks the bitmap once and slices only the fields asked for, using the same spec dicts with
the same rules as pyiso8583's decoder (the property tests compare the two on every spec).
Full ``decode``/``encode`` stay on pyiso8583 for everything else (declines, echo replies,
the CLI).

Errors: ``CodecError(field=, offset=)``; messages name the field and byte offset and never
contain field data (a PAN must never reach a log through an error message).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import iso8583
import yaml
from iso8583.specs import default as _DEFAULT
from iso8583.specs import default_ascii as _DEFAULT_ASCII

Spec = Mapping[str, Mapping[str, Any]]


class CodecError(ValueError):
    """A message that does not decode (or a document that does not encode) under its spec.

    Attributes:
        field: the field being processed ("t" MTI, "p" bitmap, "2".."128"), or "" if unknown.
        offset: byte offset in the message where it failed, or -1.
    """

    def __init__(self, message: str, field: str = "", offset: int = -1):
        super().__init__(message)
        self.field = field
        self.offset = offset


def _bcd_spec() -> dict[str, dict[str, Any]]:
    spec = copy.deepcopy(dict(_DEFAULT))
    for key, f in spec.items():
        if key in ("h", "t", "p", "1"):
            continue
        desc = f.get("desc", "")
        # numeric fields (by pyiso8583's own desc + ISO 8583:1987 usage) become packed BCD
        if key in _NUMERIC_FIELDS:
            f["data_enc"] = "b"
            f["len_count"] = "nibbles"
            f["left_pad"] = "0"
        if f["len_type"]:
            f["len_enc"] = "bcd"
            f["len_type"] = 1 if f["len_type"] == 2 else 2
        f["desc"] = desc
    spec["t"] = dict(spec["t"], data_enc="b", max_len=2)
    return spec


# ISO 8583:1987 fields of type n (numeric) that are commonly packed BCD on binary links
_NUMERIC_FIELDS = frozenset(
    "2 3 4 5 6 7 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 28 29 30 31 32 33 "
    "49 50 51 70".split()
)


def _ebcdic_spec() -> dict[str, dict[str, Any]]:
    spec = copy.deepcopy(dict(_DEFAULT))
    for f in spec.values():
        if f["data_enc"] == "ascii":
            f["data_enc"] = "cp500"
        if f["len_enc"] == "ascii":
            f["len_enc"] = "cp500"
    return spec


_BUILTIN: dict[str, Spec] = {
    "default": _DEFAULT,
    "default_ascii": _DEFAULT_ASCII,
    "bcd": _bcd_spec(),
    "ebcdic": _ebcdic_spec(),
}
BUILTIN_SPECS = tuple(_BUILTIN)


def spec_by_name(name: str, base_dir: str | Path | None = None) -> Spec:
    """A built-in spec by name, or one loaded from a YAML spec file.

    Raises:
        CodecError: unknown name, unreadable or invalid spec file.
    """
    if name in _BUILTIN:
        return _BUILTIN[name]
    path = Path(name)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if path.suffix not in (".yaml", ".yml"):
        raise CodecError(f"unknown spec {name!r} (built-in: {', '.join(_BUILTIN)}, "
                         f"or a .yaml spec file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CodecError(f"cannot read spec file: path={path}, error={exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CodecError(f"invalid YAML in spec file: path={path}") from exc
    return spec_from_mapping(raw, str(path))


_FIELD_KEYS = {"data_enc", "len_enc", "len_type", "max_len", "desc", "len_count",
               "left_pad", "right_pad", "sensitive", "type"}
_FIELD_TYPES = ("n", "an", "ans", "z", "b")


def spec_from_mapping(raw: Any, where: str = "<spec>") -> Spec:
    """Build a spec from ``{base: name, fields: {key: field spec}}``; validates each field."""
    if not isinstance(raw, Mapping):
        raise CodecError(f"{where}: expected a mapping with 'base' and 'fields'")
    base = raw.get("base", "default")
    if base not in _BUILTIN:
        raise CodecError(f"{where}: base: unknown spec {base!r} (built-in: {', '.join(_BUILTIN)})")
    spec = copy.deepcopy(dict(_BUILTIN[base]))
    fields = raw.get("fields") or {}
    if not isinstance(fields, Mapping):
        raise CodecError(f"{where}: fields: expected a mapping")
    for key, f in fields.items():
        key = str(key)
        if key not in ("h", "t", "p") and not (key.isdigit() and 1 <= int(key) <= 128):
            raise CodecError(f"{where}: fields.{key}: field must be h, t, p or 1..128")
        if not isinstance(f, Mapping) or not set(f) <= _FIELD_KEYS:
            raise CodecError(f"{where}: fields.{key}: expected keys among {sorted(_FIELD_KEYS)}")
        merged = dict(spec.get(key, {}), **f)
        for need in ("data_enc", "len_enc", "len_type", "max_len"):
            if need not in merged:
                raise CodecError(f"{where}: fields.{key}.{need}: required")
        if merged["len_type"] not in (0, 1, 2, 3, 4):
            raise CodecError(f"{where}: fields.{key}.len_type: expected 0..4")
        if merged.get("type", "n") not in _FIELD_TYPES:
            raise CodecError(f"{where}: fields.{key}.type: expected one of "
                             f"{', '.join(_FIELD_TYPES)}")
        if merged.get("len_count", "bytes") not in ("bytes", "nibbles"):
            raise CodecError(f"{where}: fields.{key}.len_count: expected bytes or nibbles")
        for enc in ("data_enc", "len_enc"):
            if merged[enc] not in ("b", "bcd"):
                try:
                    "0".encode(merged[enc])
                except LookupError:
                    raise CodecError(f"{where}: fields.{key}.{enc}: unknown encoding "
                                     f"{merged[enc]!r}") from None
        spec[key] = merged
    return spec


def decode(raw: bytes, spec: Spec) -> dict[str, str]:
    """Full decode through pyiso8583.

    Raises:
        CodecError: with the field and offset pyiso8583 reported (no field data).
    """
    try:
        doc, _ = iso8583.decode(raw, spec)
    except iso8583.DecodeError as exc:
        raise CodecError(f"cannot decode: {exc.msg}: field={exc.field}, offset={exc.pos}",
                         exc.field, exc.pos) from None
    return doc


def encode(doc: Mapping[str, str], spec: Spec) -> bytes:
    """Full encode through pyiso8583 (``doc`` is not modified).

    Raises:
        CodecError: with the field pyiso8583 reported.
    """
    try:
        raw, _ = iso8583.encode(dict(doc), spec)
    except iso8583.EncodeError as exc:
        raise CodecError(f"cannot encode: {exc.msg}: field={exc.field}", exc.field) from None
    return bytes(raw)


_KEYS = tuple(str(n) for n in range(129))  # field number -> its key, without str() per field

# byte value -> the 1-based bit positions set in it, most significant first (ISO bit order)
_BIT_POSITIONS: tuple[tuple[int, ...], ...] = tuple(
    tuple(i + 1 for i in range(8) if byte >> (7 - i) & 1) for byte in range(256))


def _length(lraw: bytes, len_enc: str) -> int:
    """The value of a length prefix, or -1 when it is not digits (``int`` alone would accept
    ``+9``, `` 9`` or non-ASCII digits)."""
    try:
        if len_enc == "b":
            return int.from_bytes(lraw, "big")
        if len_enc == "bcd":
            text = lraw.hex()
        else:
            text = lraw.decode(len_enc)
    except UnicodeDecodeError:
        return -1
    return int(text) if text.isascii() and text.isdigit() else -1


class FieldIndex:
    """Compiled reader of selected fields: MTI, bitmap walk, and slices of wanted fields.

    ``read(raw)`` returns ``(mti, {field: value})`` for the wanted fields present, decoded to
    the same strings pyiso8583 produces. Fields not wanted are skipped by length only.
    """

    def __init__(self, spec: Spec, wanted: Iterable[str]):
        self.spec = spec
        self.wanted = frozenset(wanted)
        t, p = spec["t"], spec["p"]
        if spec["h"]["max_len"] or t["len_type"] or p["len_type"]:
            raise CodecError("field index needs a spec without header and with fixed t/p")
        self._t_len = t["max_len"]
        self._t_enc = t["data_enc"]
        self._p_len = p["max_len"]
        self._p_hex = p["data_enc"] != "b"  # ascii/ebcdic bitmap: hex digits
        self._p_enc = p["data_enc"]
        # per field: (len_type, len_enc, max_len, nibbles, data_enc, left_pad, right_pad)
        self._compiled: dict[bytes, Any] = {}  # bitmap bytes -> unrolled walker (or False)
        self._plan: list[tuple[int, str, int, bool, str, str, str] | None] = [None] * 129
        for n in range(1, 129):
            f = spec.get(str(n))
            if f is not None:
                self._plan[n] = (f["len_type"], f["len_enc"], f["max_len"],
                                 f.get("len_count", "bytes") == "nibbles", f["data_enc"],
                                 f.get("left_pad", "")[:1], f.get("right_pad", "")[:1])

    def _bitmap(self, raw: bytes, idx: int) -> tuple[int, int, int]:
        """(bits as int, number of bits, index after the bitmap(s))."""
        n = self._p_len
        chunk = raw[idx:idx + n]
        if len(chunk) != n:
            raise CodecError(f"cannot decode: truncated bitmap: field=p, offset={idx}", "p", idx)
        try:
            bits = int(chunk.decode(self._p_enc), 16) if self._p_hex else int.from_bytes(chunk, "big")
        except (ValueError, UnicodeDecodeError):
            raise CodecError(f"cannot decode: invalid bitmap: field=p, offset={idx}",
                             "p", idx) from None
        width = n * 4 if self._p_hex else n * 8
        idx += n
        if bits >> (width - 1) & 1:  # field 1: secondary bitmap follows
            chunk = raw[idx:idx + n]
            if len(chunk) != n:
                raise CodecError(f"cannot decode: truncated secondary bitmap: field=1, "
                                 f"offset={idx}", "1", idx)
            try:
                second = (int(chunk.decode(self._p_enc), 16) if self._p_hex
                          else int.from_bytes(chunk, "big"))
            except (ValueError, UnicodeDecodeError):
                raise CodecError(f"cannot decode: invalid secondary bitmap: field=1, "
                                 f"offset={idx}", "1", idx) from None
            bits = bits << width | second
            width *= 2
            idx += n
        return bits, width, idx

    def spans(self, raw: bytes) -> tuple[str, int, list[tuple[int, int, int, int]]]:
        """Walk ``raw``: MTI, end of the bitmap(s), and per present field
        ``(field, start, data_start, end)`` (start includes the length prefix).

        Raises:
            CodecError: truncated or malformed message (field and offset named).
        """
        mti, bitmap_end, out, _ = self._walk(raw, None)
        return mti, bitmap_end, out

    def _head(self, raw: bytes) -> tuple[str, int, int, int]:
        """MTI, bitmap bits, bitmap width in bits and the index after the bitmap(s)."""
        tl = self._t_len
        mti_raw = raw[:tl]
        if len(mti_raw) != tl:
            raise CodecError("cannot decode: truncated MTI: field=t, offset=0", "t", 0)
        try:
            mti = mti_raw.hex().upper() if self._t_enc == "b" else mti_raw.decode(self._t_enc)
        except UnicodeDecodeError:
            raise CodecError("cannot decode: invalid MTI: field=t, offset=0", "t", 0) from None
        bits, width, idx = self._bitmap(raw, tl)
        return mti, bits, width, idx

    def _walk(self, raw: bytes, values: dict[str, str] | None
              ) -> tuple[str, int, list[tuple[int, int, int, int]], dict[str, str] | None]:
        # One pass over the message; with ``values`` it also decodes the wanted fields
        # (text ones inline, the hot case; binary/BCD through _value).
        mti, bits, width, idx = self._head(raw)
        bitmap_end = idx
        layout = raw[self._t_len:idx]
        fast = self._compiled.get(layout)
        if fast is None:
            fast = self._compile(bits, width, idx)
            if len(self._compiled) >= 1024:
                self._compiled.clear()
            self._compiled[layout] = fast
        if fast is not False:
            done = fast(raw, values)
            if done is not None:
                return mti, bitmap_end, done, values
        # the general walk: also the one that words every error precisely
        return mti, bitmap_end, self._general(raw, values, bits, width, idx), values

    def _general(self, raw: bytes, values: dict[str, str] | None, bits: int, width: int,
                 idx: int) -> list[tuple[int, int, int, int]]:
        plan = self._plan
        out: list[tuple[int, int, int, int]] = []
        # walk only the set bits: a byte-wise table gives each byte's field numbers
        present = [base + pos for base, byte in zip(range(0, width, 8),
                                                   bits.to_bytes(width // 8, "big")) if byte
                   for pos in _BIT_POSITIONS[byte]]
        for n in present:
            if n == 1:
                continue  # the secondary-bitmap flag, consumed by _bitmap
            p = plan[n]
            if p is None:
                raise CodecError(f"cannot decode: field not in spec: field={n}, offset={idx}",
                                 str(n), idx)
            len_type, len_enc, max_len, nibbles, _, _, _ = p
            start = idx
            if len_type == 0:
                length = max_len
            else:
                lraw = raw[idx:idx + len_type]
                if len(lraw) != len_type:
                    raise CodecError(f"cannot decode: truncated length: field={n}, "
                                     f"offset={idx}", str(n), idx)
                length = _length(lraw, len_enc)
                if length < 0:
                    raise CodecError(f"cannot decode: invalid length: field={n}, "
                                     f"offset={idx}", str(n), idx)
                if length > max_len:
                    raise CodecError(f"cannot decode: length over max: field={n}, "
                                     f"offset={idx}, max={max_len}", str(n), idx)
                idx += len_type
            end = idx + ((length + 1) // 2 if nibbles else length)
            if end > len(raw):
                raise CodecError(f"cannot decode: truncated data: field={n}, offset={idx}",
                                 str(n), idx)
            out.append((n, start, idx, end))
            if values is not None:
                key = _KEYS[n]
                if key in self.wanted:
                    enc = p[4]
                    if enc == "b" or enc == "bcd":
                        values[key] = self._value(n, raw, start, idx, end)
                    else:
                        try:
                            values[key] = raw[idx:end].decode(enc)
                        except UnicodeDecodeError:
                            raise CodecError(f"cannot decode: invalid text: field={n}, "
                                             f"offset={idx}", key, idx) from None
            idx = end
        if idx != len(raw):
            raise CodecError(f"cannot decode: extra data after last field: field=, "
                             f"offset={idx}", "", idx)
        return out

    def salvage(self, raw: bytes) -> tuple[str | None, dict[str, str]]:
        """What can be read of a message that does not decode: its MTI (None if even that
        is unreadable) and the wanted fields *before* the one that failed (after it the
        position in the message is unknown), so an error answer can still carry them."""
        values: dict[str, str] = {}
        try:
            mti, bits, width, idx = self._head(raw)
        except CodecError as exc:
            if exc.field == "t":
                return None, values
            try:
                return self._head_mti(raw), values
            except CodecError:
                return None, values
        try:
            self._general(raw, values, bits, width, idx)
        except CodecError as exc:
            values.pop(exc.field, None)  # half-decoded: not to be trusted
        return mti, values

    def _head_mti(self, raw: bytes) -> str:
        tl = self._t_len
        mti_raw = raw[:tl]
        if len(mti_raw) != tl:
            raise CodecError("cannot decode: truncated MTI: field=t, offset=0", "t", 0)
        try:
            return mti_raw.hex().upper() if self._t_enc == "b" else mti_raw.decode(self._t_enc)
        except UnicodeDecodeError:
            raise CodecError("cannot decode: invalid MTI: field=t, offset=0", "t", 0) from None

    def _compile(self, bits: int, width: int, start: int):
        """Straight-line walker for one bitmap (the fields present, in order), or False.

        Generated once per distinct bitmap and cached: a switch sees a handful of layouts,
        and an unrolled walk with the field rules as constants costs a fraction of the
        general loop. It returns None on *any* irregularity (bad length, overrun, bad text),
        and the general walk then raises the precise error.
        """
        present = [n for n in range(2, width + 1) if bits >> (width - n) & 1]
        lines = ["def walk(raw, values, _value=_value):",
                 "    try:",
                 f"        i = {start}",
                 "        out = []"]
        for n in present:
            p = self._plan[n]
            if p is None:
                return False
            len_type, len_enc, max_len, nibbles, data_enc, _, _ = p
            if len_type == 0:
                size = (max_len + 1) // 2 if nibbles else max_len
                lines.append(f"        d = i; e = i + {size}")
            else:
                lraw = f"raw[i:i + {len_type}]"
                if len_enc == "b":
                    lines.append(f"        L = int.from_bytes({lraw}, 'big')")
                elif len_enc == "bcd":
                    lines.append(f"        L = int({lraw}.hex(), 10)")
                elif len_enc == "ascii":
                    # int() alone would take b"+9" or b" 9": a length is digits only
                    lines += [f"        lr = {lraw}",
                              "        if not lr.isdigit(): return None",
                              "        L = int(lr)"]
                else:
                    lines += [f"        L = _length({lraw}, {len_enc!r})"]
                size = "(L + 1) // 2" if nibbles else "L"
                lines += [f"        if L > {max_len} or L < 0: return None",
                          f"        d = i + {len_type}; e = d + {size}"]
            lines.append(f"        out.append(({n}, i, d, e))")
            if str(n) in self.wanted:
                lines.append("        if values is not None:")
                if data_enc in ("b", "bcd"):
                    lines.append(f"            values[{str(n)!r}] = _value({n}, raw, i, d, e)")
                else:
                    lines.append(f"            values[{str(n)!r}] = raw[d:e].decode({data_enc!r})")
            lines.append("        i = e")
        lines += ["        if i != len(raw): return None",
                  "        return out",
                  "    except Exception:",
                  "        return None"]
        scope: dict[str, Any] = {"_value": self._value, "_length": _length}
        exec("\n".join(lines), scope)  # noqa: S102 - code built only from the spec's numbers
        return scope["walk"]

    def _value(self, n: int, raw: bytes, start: int, data_start: int, end: int) -> str:
        len_type, len_enc, max_len, nibbles, data_enc, lpad, rpad = self._plan[n]  # type: ignore[misc]
        data = raw[data_start:end]
        if not data:
            return ""
        if data_enc == "b":
            value = data.hex().upper()
            if nibbles:
                if len_type == 0:
                    length = max_len
                elif len_enc == "b":
                    length = int.from_bytes(raw[start:data_start], "big")
                elif len_enc == "bcd":
                    length = int(raw[start:data_start].hex(), 10)
                else:
                    length = int(raw[start:data_start].decode(len_enc))
                if length & 1:
                    if lpad and value[:1] == lpad:
                        return value[1:]
                    if rpad and value[-1:] == rpad:
                        return value[:-1]
                    raise CodecError(f"cannot decode: bad pad: field={n}, offset={data_start}",
                                     str(n), data_start)
            return value
        try:
            return data.decode(data_enc)
        except UnicodeDecodeError:
            raise CodecError(f"cannot decode: invalid text: field={n}, offset={data_start}",
                             str(n), data_start) from None

    def read(self, raw: bytes) -> tuple[str, dict[str, str]]:
        """MTI and the wanted fields of ``raw`` (as pyiso8583 would decode them).

        Raises:
            CodecError: truncated or malformed message (field and offset named).
        """
        mti, _, _, values = self._walk(raw, {})
        return mti, values  # type: ignore[return-value]

    def read_spans(self, raw: bytes) -> tuple[str, dict[str, str], list[tuple[int, int, int, int]]]:
        """``read`` plus the spans of every present field (for splicing)."""
        mti, _, spans, values = self._walk(raw, {})
        return mti, values, spans  # type: ignore[return-value]

    def field_bytes(self, key: str, value: str) -> bytes:
        """``value`` encoded as field ``key``'s data (no length prefix), as pyiso8583 would."""
        f = self.spec[key]
        if f["data_enc"] in ("b", "bcd"):
            if f.get("len_count") == "nibbles" and len(value) % 2:
                pad = f.get("left_pad", "")[:1]
                value = pad + value if pad else value + f.get("right_pad", "0")[:1]
            return bytes.fromhex(value)
        return value.encode(f["data_enc"])

    def respond(self, raw: bytes, de39: str) -> bytes:
        """The response to request ``raw``: same fields, MTI + 10 (0100 -> 0110), DE39 set
        (inserted or replaced) — built by splicing bytes, equal to what pyiso8583 would
        encode for the same document.

        Raises:
            CodecError: ``raw`` does not decode, or DE39 is not in the spec as fixed 2.
        """
        mti, bitmap_end, spans = self.spans(raw)
        f39 = self.spec["39"]
        if f39["len_type"] != 0 or f39["max_len"] != 2 or f39["data_enc"] == "b":
            raise CodecError("respond needs DE39 as a fixed 2-character text field")
        resp_mti = mti[:2] + str(int(mti[2]) + 1) + mti[3:]
        t = self.spec["t"]
        mti_raw = (bytes.fromhex(resp_mti) if t["data_enc"] == "b"
                   else resp_mti.encode(t["data_enc"]))
        tl, pl = self._t_len, self._p_len
        if self._p_hex:
            bits = int(raw[tl:tl + pl].decode(self._p_enc), 16)
            bits |= 1 << (pl * 4 - 39)
            primary = f"{bits:0{pl}X}".encode(self._p_enc)
        else:
            bits = int.from_bytes(raw[tl:tl + pl], "big") | 1 << (pl * 8 - 39)
            primary = bits.to_bytes(pl, "big")
        before = after = bitmap_end
        for n, _, _, end in spans:
            if n < 39:
                before = after = end
            elif n == 39:
                after = end
            else:
                break
        return b"".join((mti_raw, primary, raw[tl + pl:before], de39.encode(f39["data_enc"]),
                         raw[after:]))
