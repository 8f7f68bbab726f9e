"""Reversal documents (sans-I/O): the 0400 the switch owes an issuer for a request whose
outcome it cannot prove reached the acquirer. Built when the request is forwarded, sealed, and
kept in the in-flight journal until owed (``gears.iso8583.core``); delivered by the SAF sender
(``gears.iso8583.saf``)."""

from __future__ import annotations

from collections.abc import Mapping

REVERSAL_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "14", "22", "32", "33", "37", "41",
                   "42", "49")


def reversal_doc(original: Mapping[str, str], mti: str) -> dict[str, str]:
    """The 0400 for a request (its fields and MTI): card, amount and identification fields
    copied, DE90 = original MTI + STAN + transmission date/time + acquiring and forwarding
    institution ids (ISO 8583:1987, n 42). Track data and PIN blocks are never copied."""
    doc = {k: original[k] for k in REVERSAL_FIELDS if k in original}
    doc["t"] = mti[0] + "400"
    doc["90"] = (mti + original.get("11", "").rjust(6, "0")[-6:]
                 + original.get("7", "").rjust(10, "0")[-10:]
                 + original.get("32", "").rjust(11, "0")[-11:]
                 + original.get("33", "").rjust(11, "0")[-11:])
    return doc
