"""Card numbers out of text: the last guard before a log line, span or stored row leaves.

Events and spans carry tokens and masked PANs by construction; this module is what catches
a card number that reached a free text anyway (a log message quoting a field, an exception
text). A run of 13-19 ASCII digits that passes the Luhn check is masked to its first 6 and
last 4 digits; so is one written in groups of 3-6 digits (``4761 7390 0101 0119``,
``3782-822463-10005``: single spaces or dashes between them), its separators kept. Plain runs
are masked first, so a number beside a card number (``0 4761...``) is never merged into it. Tokens (``gears.coatcheck.make_token``) fail the Luhn check on purpose, so they
pass unchanged; one run of random digits in ten passes Luhn and is masked too: a false
positive costs a few digits of a log line, a false negative a card number.
"""

from __future__ import annotations

import re
from typing import Final

_DIGITS: Final = re.compile(r"\d{13,19}")
_GROUPED: Final = re.compile(r"(?<![\d*])\d{3,6}(?:[ -]\d{3,6}){2,5}(?![\d*])")
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
    """``text`` with every Luhn-valid run of 13-19 digits masked (first 6, last 4)."""
    if len(text) < 13:
        return text

    text = _DIGITS.sub(_plain, text)
    return _GROUPED.sub(_grouped, text) if (" " in text or "-" in text) else text


def _plain(m: re.Match[str]) -> str:
    run = m.group()
    return mask_digits(run) if luhn_valid(run) else run


def _grouped(m: re.Match[str]) -> str:
    run = m.group()
    digits = run.replace(" ", "").replace("-", "")
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
