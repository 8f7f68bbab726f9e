"""Audit rows — sans I/O: one stored event in, one row of the archive out, chained.

Theory of operation
-------------------
Every event a rack stored (a deterministic-CBOR frame, ``engine.frame``) becomes one row:
the envelope (event id, time, source, kind), where it was stored (rack, stream, the rack's
own stream sequence, the hub copy's sequence), the ISO 8583 fields flattened for queries,
the event's exact bytes and its chain hash::

    h_n = SHA-256(h_{n-1} || cbor_n)        h_{first} uses GENESIS (32 zero bytes) or the
                                             head recorded where retention cut the chain

The chain runs per rack and stream in the rack's sequence order, so it is the same whatever
the hub did (restarts, source resets): the bytes are the rack's, the order is the rack's.

``Batch`` collects rows column by column (lists: appending is cheaper than building a dict
per row) and hands them to ``pyarrow`` in one call; it never touches a file.

Card data: the switch writes masked PANs and tokens only. A ``pan`` value that is a run of
13-19 digits (a clear card number from a misconfigured rig) is masked in its column and
counted (``Batch.clear_pans``); the CBOR column keeps the rack's bytes — the chain covers
them — so such an event is also reported by ``mixer audit verify``'s leak check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa  # type: ignore[import-untyped]

from engine.cbor import CBORDecodeError, loads

GENESIS: Final = bytes(32)
SCHEMA_VERSION: Final = 1

#: the file schema. ``rack``, ``date`` and ``hour`` are hive partition columns: in the path
#: only (a column in both the path and the file is an error in Spark and Arrow datasets);
#: a part's footer names its rack too
SCHEMA: Final = pa.schema([
    ("event_id", pa.string()),
    ("stream", pa.string()),
    ("seq", pa.int64()),          # the rack's own stream sequence: the chain's order
    ("hub_seq", pa.int64()),      # the hub copy's sequence (0: read from the rack directly)
    ("ts", pa.timestamp("ns", tz="UTC")),  # the event's own time (the rack's clock)
    ("kind", pa.string()),
    ("src", pa.string()),
    ("mti", pa.string()),
    ("pcode", pa.string()),       # DE3, processing code
    ("amount", pa.int64()),       # DE4, minor units
    ("currency", pa.string()),    # DE49
    ("de39", pa.string()),
    ("outcome", pa.string()),
    ("issuer", pa.string()),
    ("route", pa.string()),
    ("latency_us", pa.int64()),
    ("token", pa.string()),
    ("pan", pa.string()),         # masked: first 6, last 4
    ("stan", pa.string()),        # DE11
    ("terminal", pa.string()),    # DE41
    ("reason", pa.string()),      # why a request was refused at the edge
    ("cbor", pa.binary()),
    ("chain", pa.binary(32)),
])
_TEXT: Final = ("mti", "pcode", "currency", "de39", "outcome", "issuer", "route", "token",
                "stan", "terminal", "reason")
_TEXT_KEYS: Final = _TEXT  # the body's keys for those columns (the same names)
_NO_TEXT: Final = (None,) * len(_TEXT)


def chain_next(prev: bytes, cbor: bytes) -> bytes:
    """``SHA-256(prev || cbor)``: the chain hash of an event after ``prev``."""
    return hashlib.sha256(prev + cbor).digest()


_CARD_RUN: Final = re.compile(r"(?<![0-9])[0-9]{13,19}(?![0-9])")


def _mask_run(m: re.Match[str]) -> str:
    run = m.group()
    return run[:6] + "*" * (len(run) - 10) + run[-4:]


def masked(pan: str) -> tuple[str, bool]:
    """``pan`` as it may be stored, and whether it held a clear card number (any run of
    13-19 digits: a fixed-width field pads it with spaces)."""
    out, n = _CARD_RUN.subn(_mask_run, pan)
    return out, n > 0


@dataclass(slots=True)
class Batch:
    """Rows of one rack and stream, in sequence order, not yet written (see module doc)."""

    rack: str
    stream: str
    prev: bytes                      # chain head before the first row
    head: bytes = b""                # chain head after the last row
    seqs: list[int] = field(default_factory=list)
    hub_seqs: list[int] = field(default_factory=list)
    cbors: list[bytes] = field(default_factory=list)
    chains: list[bytes] = field(default_factory=list)
    undecodable: int = 0             # rows whose bytes are not a frame (kept, kind "")
    clear_pans: int = 0

    def __post_init__(self) -> None:
        if not self.head:
            self.head = self.prev

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: int, hub_seq: int, cbor: bytes) -> None:
        """Append the event stored at ``seq`` (chained after the previous one)."""
        self.head = h = hashlib.sha256(self.head + cbor).digest()
        self.seqs.append(seq)
        self.hub_seqs.append(hub_seq)
        self.cbors.append(cbor)
        self.chains.append(h)

    def split(self, n: int) -> Batch:
        """Take the first ``n`` rows out as a batch of their own (an hour boundary)."""
        first = Batch(self.rack, self.stream, self.prev, self.chains[n - 1],
                      self.seqs[:n], self.hub_seqs[:n], self.cbors[:n], self.chains[:n])
        self.prev = first.head
        del self.seqs[:n], self.hub_seqs[:n], self.cbors[:n], self.chains[:n]
        return first

    def table(self) -> pa.Table:
        """The rows as an Arrow table of ``SCHEMA`` (decodes each event once).

        Per row only what must be looked at in Python is (the envelope, the PAN, the
        amount); the text fields are taken as one tuple per row (``map(body.get, ...)``)
        and turned into columns by ``zip`` — half the time of a loop over the keys. A
        value of the wrong type sends its column down a checking path.
        """
        n = len(self.seqs)
        ids: list[str | None] = [None] * n
        ts: list[int | None] = [None] * n
        kinds: list[str] = [""] * n
        srcs: list[str] = [""] * n
        pans: list[str | None] = [None] * n
        amounts: list[int | None] = [None] * n
        lat: list[int | None] = [None] * n
        texts: list[tuple[object, ...]] = [_NO_TEXT] * n
        search = _CARD_RUN.search
        for i, raw in enumerate(self.cbors):
            try:
                ev = loads(raw)
                ids[i] = ev["id"].hex()
                ts[i] = ev["ts"]
                kind = kinds[i] = ev["kind"]
                srcs[i] = ev["src"]
                body = ev["body"]
            except (CBORDecodeError, KeyError, TypeError, AttributeError, ValueError):
                self.undecodable += 1
                kinds[i] = srcs[i] = ""
                ids[i] = ts[i] = None
                continue
            if type(body) is not dict or not kind.startswith("iso8583."):
                continue
            get = body.get
            texts[i] = tuple(map(get, _TEXT_KEYS))
            pan = get("pan")
            if type(pan) is str:
                if search(pan) is not None:
                    pan = masked(pan)[0]
                    self.clear_pans += 1
                pans[i] = pan
            amount = get("amount")
            if type(amount) is str and amount.isdigit():
                amounts[i] = int(amount)
            elif type(amount) is int:
                amounts[i] = amount
            latency = get("latency_us")
            if type(latency) is int:
                lat[i] = latency
        cols: dict[str, object] = {
            "event_id": ids, "stream": [self.stream] * n,
            "seq": self.seqs, "hub_seq": self.hub_seqs, "ts": ts, "kind": kinds,
            "src": srcs, "amount": amounts, "latency_us": lat, "pan": pans,
            "cbor": self.cbors, "chain": self.chains,
        }
        for col, values in zip(_TEXT, zip(*texts, strict=True) if n else [()] * len(_TEXT),
                               strict=True):
            cols[col] = values
        arrays = []
        for f in SCHEMA:
            column: Any = cols[f.name]
            try:
                arrays.append(pa.array(column, f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a non-text value: null it
                arrays.append(pa.array([v if type(v) is str else None for v in column],
                                       f.type))
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


__all__ = ["Batch", "GENESIS", "SCHEMA", "SCHEMA_VERSION", "chain_next", "masked"]
