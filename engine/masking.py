"""Card numbers out of text: the last guard before a log line, span or stored row leaves.

Events and spans carry tokens and masked PANs by construction; this module is what catches
a card number that reached a free text anyway (a log message quoting a field, an exception
text). A run of 13-19 ASCII digits that passes the Luhn check is masked to its first 6 and
last 4 digits; so is one written in groups of 3-6 digits (``4761 7390 0101 0119``,
``3782-822463-10005``, ``4761.7390...``, ``4761_7390...``, ``4761/7390...``: one or two
spaces, tabs, dashes, dots, underscores or slashes between them), its separators kept; so is one in any script's digits, and one inside a longer run of digits
that it starts or ends or that puts a two-digit length before it (DE2 as sent: ``16`` + the
PAN). Plain runs are masked first, so a number beside a card number (``0 4761...``) is never
merged into it. A 19-digit run starting ``17`` (a nanosecond time until 2033) is masked
only when it is Luhn-valid as a whole, not as a length and a 17-digit card number.

Tokens (``gears.coatcheck.make_token``) fail the Luhn check on purpose, so they pass
unchanged; one run of random digits in ten passes Luhn and is masked too: a false positive
costs a few digits of a log line, a false negative a card number.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

_DIGITS: Final = re.compile(r"\d{13,}")  # any script's digits (full-width, Arabic-Indic)
# groups split by up to two of: space, tab, dash, dot, underscore, slash
_GROUPED: Final = re.compile(r"(?<![\d*])\d{3,6}(?:[ \t.\-_/]{1,2}\d{3,6}){2,5}(?![\d*])")
_SEPARATORS: Final = frozenset(" \t.-_/")
# ASCII digit -> the digit sum of its double, as a byte value (not a character): the doubled
# positions of a card number are summed by one ``translate`` and one ``sum``, both C loops
_DOUBLED: Final = bytes((2 * (b - 48) - 9 if 2 * (b - 48) > 9 else 2 * (b - 48))
                        if 48 <= b <= 57 else 0 for b in range(256))


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (ASCII digits) passes the Luhn (mod 10) check."""
    b = digits.encode()
    kept = b[-1::-2]  # from the right: every second digit is doubled, the others kept
    return (sum(kept) - 48 * len(kept) + sum(b[-2::-2].translate(_DOUBLED))) % 10 == 0


def mask_digits(digits: str) -> str:
    """First 6 and last 4 digits kept, the rest as ``*``."""
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def mask_card_numbers(text: str) -> str:
    """``text`` with every card number masked (first 6, last 4 digits kept): a Luhn-valid
    run of 13-19 digits; one written in groups; one inside a longer run of digits when it
    starts or ends it or follows a two-digit length (an ISO 8583 LLVAR field as sent)."""
    if len(text) < 13:
        return text
    text = _DIGITS.sub(_plain, text)
    if not _SEPARATORS.isdisjoint(text):
        text = _GROUPED.sub(_grouped, text)
    return text


def _ascii(run: str) -> str:
    return run if run.isascii() else "".join(str(unicodedata.digit(c)) for c in run)


def _hide(run: str, start: int, length: int) -> str:
    """``run`` with the card number at ``start`` (``length`` digits) masked."""
    return run[:start + 6] + "*" * (length - 10) + run[start + length - 4:]


def _plain(m: re.Match[str]) -> str:
    run = m.group()
    digits = _ascii(run)
    n = len(digits)
    if n <= 19 and luhn_valid(digits):
        return _hide(run, 0, n)
    ll = int(digits[:2])
    # LLVAR: "16" + PAN; not "17" + 17 digits, the shape of a nanosecond time (to 2033)
    if 13 <= ll <= 19 and n >= ll + 2 and not (ll == 17 and n == 19) \
            and luhn_valid(digits[2:2 + ll]):
        return _hide(run, 2, ll)
    if n > 19:  # a card number at either end of a longer run (PAN + expiry, id + PAN)
        for k in range(19, 12, -1):
            if luhn_valid(digits[:k]):
                return _hide(run, 0, k)
            if luhn_valid(digits[-k:]):
                return _hide(run, n - k, k)
    return run


def _grouped(m: re.Match[str]) -> str:
    run = m.group()
    digits = _ascii("".join(ch for ch in run if ch.isdigit()))
    if not 13 <= len(digits) <= 19 or not luhn_valid(digits):
        return run
    out, seen, last = [], 0, len(digits) - 4
    for ch in run:  # the digits between the first 6 and the last 4 hidden, separators kept
        if ch.isdigit():
            out.append(ch if seen < 6 or seen >= last else "*")
            seen += 1
        else:
            out.append(ch)
    return "".join(out)


__all__ = ["luhn_valid", "mask_card_numbers", "mask_digits"]


def mask_tree(value: object, depth: int = 0) -> object:
    """``value`` with card numbers masked in every text, byte string (read as Latin-1, so a
    PAN in ASCII bytes is found and the length kept), text map key and number that could be
    one (an integer or integral float of 13-19 digits, either sign), at any depth; other
    values as they are. For what is kept on disk for diagnosis (dead letters). Never
    raises: what it cannot walk (a cycle, nesting past 200 levels) becomes a placeholder."""
    if depth > 200:
        return "<nested too deep>"
    if isinstance(value, str):
        return mask_card_numbers(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        text = raw.decode("latin-1")
        masked = mask_card_numbers(text)
        return raw if masked == text else masked.encode("latin-1", "replace")
    if isinstance(value, dict):
        return {(mask_card_numbers(k) if isinstance(k, str) else k): mask_tree(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_tree(v, depth + 1) for v in value]
    if isinstance(value, float) and value.is_integer() and 1e12 <= abs(value) < 1e20:
        value = int(value)  # a card number sent as a JSON number with a fraction
    if isinstance(value, int) and not isinstance(value, bool) and 10**12 <= abs(value) < 10**20:
        text = str(abs(value))
        masked = mask_card_numbers(text)
        return value if masked == text else ("-" if value < 0 else "") + masked
    return value
