"""Validation of acquirer requests at the edge (sans-I/O): MTI, field types and lengths, PAN.

Everything the switch decides on — routing, matching, coat check, the audit trail — comes
from a handful of fields; each is checked here against its ISO 8583 type before anything
else happens, and a request that fails gets the protocol's own answer:

* ``30`` (format error) for a field of the wrong type, an empty variable-length field, a
  field the message class requires but lacks;
* ``14`` (invalid card number) for an unusable PAN: empty, not digits, shorter than 13 or
  longer than 19 digits, or failing the Luhn check when ``pan_luhn`` is on.

MTI rules: four digits; a known message class (1 authorisation, 2 financial, 3 file action,
4 reversal, 5 reconciliation, 6 administrative, 7 fee collection, 8 network management);
a function an acquirer sends (0 request, 2 advice, 4 notification), so that the response
MTI (function + 1) exists. Anything else cannot be answered at all.

Types (ISO 8583:1987 notation): ``n`` digits, ``an`` letters and digits (space allowed as
padding), ``ans`` printable ASCII, ``z`` track data (digits and the ``=``/``D`` separator),
``b`` binary (always valid once framed). A field's type comes from its spec entry's ``type``
key when a spec file gives one, else from the ISO 8583:1987 table below, else ``b`` for
binary encodings and ``ans`` for text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gears.coatcheck import luhn_valid
from gears.iso8583.codec import Spec

# ISO 8583:1987 types of the fields a switch reads (the rest are forwarded untouched).
ISO1987_TYPES: Mapping[str, str] = {
    "2": "n", "3": "n", "4": "n", "5": "n", "6": "n", "7": "n", "11": "n", "12": "n",
    "13": "n", "14": "n", "18": "n", "19": "n", "22": "n", "23": "n", "25": "n", "32": "n",
    "33": "n", "35": "z", "37": "an", "38": "an", "39": "an", "41": "ans", "42": "ans",
    "43": "ans", "49": "n", "50": "n", "51": "n", "70": "n", "90": "n",
}
TYPES = ("n", "an", "ans", "z", "b")
CLASSES = frozenset("12345678")
FUNCTIONS = frozenset("024")  # request, advice, notification: what an acquirer originates
CARD_CLASSES = frozenset("124")  # authorisation, financial, reversal: they carry a card
PAN_MIN, PAN_MAX = 13, 19

FORMAT_ERROR = "30"
INVALID_CARD = "14"

_AN_PAD = str.maketrans("", "", " ")
_Z_SEP = str.maketrans("", "", "=D")


def _n(v: str) -> bool:
    return v.isascii() and v.isdigit()


def _an(v: str) -> bool:
    return v.isascii() and (v.isalnum() or v.translate(_AN_PAD).isalnum())


def _ans(v: str) -> bool:
    return v.isascii() and v.isprintable()


def _z(v: str) -> bool:
    return v.isascii() and v.translate(_Z_SEP).isdigit()


def _b(v: str) -> bool:
    return True


_CHECKS: Mapping[str, Callable[[str], bool]] = {"n": _n, "an": _an, "ans": _ans, "z": _z,
                                                "b": _b}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: the DE39 to answer (None: cannot be answered), the field
    (``t`` for the MTI) and a short reason without any of the field's data."""

    code: str | None
    field: str
    reason: str


def mti_problem(mti: str) -> str | None:
    """Why ``mti`` cannot be a request from an acquirer, or None if it can."""
    if len(mti) != 4 or not _n(mti):
        return "not 4 digits"
    if mti[1] not in CLASSES:
        return f"unknown message class {mti[1]}"
    if mti[2] not in FUNCTIONS:
        return f"function {mti[2]} is not a request, advice or notification"
    return None


def response_mti(mti: str) -> str:
    """The response MTI of a valid request MTI (function + 1: 0100 -> 0110)."""
    return mti[:2] + chr(ord(mti[2]) + 1) + mti[3]


def field_type(spec: Spec, key: str) -> str:
    """The ISO type of field ``key`` under ``spec`` (see module docstring)."""
    f = spec.get(key, {})
    declared = f.get("type")
    if declared in TYPES:
        return declared
    if key in ISO1987_TYPES:  # binary/BCD encodings read as hex digits: still checkable
        return ISO1987_TYPES[key]
    return "b" if f.get("data_enc") in ("b", "bcd") else "ans"


class Validator:
    """Checks one acquirer spec's requests; build once, call ``check`` per message."""

    def __init__(self, spec: Spec, fields: Iterable[str], required_card: Iterable[str],
                 required_other: Iterable[str], pan_luhn: bool = False):
        """Args:
            spec: the acquirer's spec.
            fields: the fields to check when present (types from ``field_type``).
            required_card: fields every card request (classes 1, 2, 4) must carry.
            required_other: fields requests of classes 3, 5, 6, 7 must carry (network
                management, class 8, is answered locally and needs none).
            pan_luhn: also refuse PANs failing the Luhn check.
        """
        self.spec = spec
        self.types = {k: field_type(spec, k) for k in fields}
        self.checks = tuple((k, _CHECKS[self.types[k]]) for k in sorted(set(fields), key=int))
        self.variable = frozenset(k for k in fields if spec.get(k, {}).get("len_type"))
        self.required_card = tuple(sorted(set(required_card), key=int))
        self.required_other = tuple(sorted(set(required_other), key=int))
        self.pan_luhn = pan_luhn
        self._mti_ok: dict[str, bool] = {}
        self._fast: dict[tuple[str, ...], Callable[[Mapping[str, str]], bool]] = {}

    def check(self, mti: str, fields: Mapping[str, str]) -> Rejection | None:
        """None when the request may be routed, else the rejection to answer and audit.

        The common case costs one compiled expression: per MTI and per set of present
        fields (a switch sees a handful), every rule below is generated once as straight
        code; anything it does not pass goes through the general checks, which name the
        field and the reason.
        """
        ok = self._mti_ok.get(mti)
        if ok is None:
            ok = mti_problem(mti) is None
            if len(self._mti_ok) < 4096:  # bounded: a hostile peer may send any MTI
                self._mti_ok[mti] = ok
        if ok:
            layout = (mti[1], *fields)
            fast = self._fast.get(layout)
            if fast is None:
                fast = self._compile(mti[1], tuple(fields))
                if len(self._fast) >= 1024:
                    self._fast.clear()
                self._fast[layout] = fast
            if fast(fields):
                return None
        return self._check(mti, fields)

    def _compile(self, cls: str, present: tuple[str, ...]
                 ) -> Callable[[Mapping[str, str]], bool]:
        """One boolean expression for requests of class ``cls`` carrying ``present``."""
        required = (self.required_card if cls in CARD_CLASSES else
                    () if cls == "8" else self.required_other)
        if any(k not in present for k in required):
            return lambda fields: False  # the general checks say which one
        terms = []
        for k, _ in self.checks:
            if k not in present:
                continue
            v = f"f[{k!r}]"
            ascii_ = f" and {v}.isascii()"
            t = self.types[k]
            if k == "2":
                terms.append(f"{v}.isdigit() and {PAN_MIN} <= len({v}) <= {PAN_MAX}{ascii_}"
                             + (f" and luhn({v})" if self.pan_luhn else ""))
                continue
            if k in self.variable:
                terms.append(f"{v} != ''")
            if t == "n":
                terms.append(f"{v}.isdigit(){ascii_}")
            elif t == "an":
                terms.append(f"({v}.isalnum() or {v}.translate(pad).isalnum()){ascii_}")
            elif t == "ans":
                terms.append(f"{v}.isprintable(){ascii_}")
            elif t == "z":
                terms.append(f"{v}.translate(sep).isdigit(){ascii_}")
        scope = {"luhn": luhn_valid, "pad": _AN_PAD, "sep": _Z_SEP}
        exec(f"def fast(f):\n    return {' and '.join(terms) or 'True'}\n", scope)  # noqa: S102
        fast: Callable[[Mapping[str, str]], bool] = scope["fast"]  # type: ignore[assignment]
        return fast  # built only from the spec's field numbers and our rules

    def _check(self, mti: str, fields: Mapping[str, str]) -> Rejection | None:
        problem = mti_problem(mti)
        if problem is not None:
            return Rejection(None, "t", f"invalid MTI: {problem}")
        pan = fields.get("2")
        if pan is not None:
            why = pan_problem(pan, self.pan_luhn)
            if why is not None:
                return Rejection(INVALID_CARD, "2", why)
        cls = mti[1]
        for key in (self.required_card if cls in CARD_CLASSES else
                    () if cls == "8" else self.required_other):
            if key not in fields:
                return Rejection(FORMAT_ERROR if key != "2" else INVALID_CARD, key,
                                 "required field missing")
        for key, ok in self.checks:
            value = fields.get(key)
            if value is None or key == "2":
                continue
            if not value and key in self.variable:
                return Rejection(FORMAT_ERROR, key, "empty variable-length field")
            if not ok(value):
                return Rejection(FORMAT_ERROR, key, "invalid characters for the field type")
        return None

    def echoable(self, fields: Mapping[str, str]) -> dict[str, str]:
        """The fields of ``fields`` that pass their type check (for an error answer)."""
        out = {}
        for key, ok in self.checks:
            value = fields.get(key)
            if value is None:
                continue
            if key == "2" and pan_problem(value, False) is not None:
                continue
            if (value or key not in self.variable) and ok(value):
                out[key] = value
        return out


def pan_problem(pan: str, luhn: bool) -> str | None:
    """Why ``pan`` is unusable, or None."""
    if not pan:
        return "empty PAN"
    if not _n(pan):
        return "PAN is not digits"
    if not PAN_MIN <= len(pan) <= PAN_MAX:
        return f"PAN length {len(pan)} outside {PAN_MIN}..{PAN_MAX}"
    if luhn and not luhn_valid(pan):
        return "PAN fails the Luhn check"
    return None
