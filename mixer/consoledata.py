"""Where the console's pages get their data: the registry, the audit trail, the hub's UNS
copies and the deploy history. Thin I/O around what other modules own; every text that
leaves through the console passes ``mask_pans``.

* **registry** — ``ask``: the registry's local socket (``registry.sock``, the questions of
  ``mixer.ask``) without blocking the event loop;
* **audit trail** — ``AuditReader``: the DuckDB views of ``mixer.auditquery`` (sandboxed),
  searched with bound parameters only (a filter value is never SQL), one event with its
  decoded body and its chain's verification (``mixer.auditverify``, cached a minute per
  chain);
* **UNS** — ``UnsReader``: the hub's copies of racks' ``UNS`` streams (``UNS_<rack>``) read
  with JetStream *direct gets* (``multi_last`` for every tag's newest sample, ``start_time``
  + ``next_by_subj`` batches for a tag's history): no consumer is made, and nats-py's
  ordered consumers break on this server (``docs/mixer-design.md`` section 1).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import duckdb
import orjson
from nats.aio.client import Client

from engine.cbor import CBORDecodeError, loads
from engine.masking import mask_card_numbers
from mixer.ask import SOCKET
from mixer.auditfiles import AUDIT_DIR
from mixer.auditquery import daily_report, open_views
from mixer.auditverify import verify_chain

ASK_TIMEOUT: Final = 2.0
SEARCH_LIMIT: Final = 500
VERIFY_TTL_S: Final = 60.0
UNS_PREFIX: Final = "uns.v1."
UNS_STREAM_PREFIX: Final = "UNS_"
HISTORY_POINTS: Final = 2_000


class DataError(RuntimeError):
    """The data a page asked for cannot be had (the message says why)."""


# -- card numbers ---------------------------------------------------------------------------
def mask_pans(obj: Any) -> Any:
    """``obj`` with every Luhn-valid run of 13-19 digits masked (first 6, last 4) — in texts,
    map keys, and numbers (a number that is one becomes the masked text): the console's
    last guard — events carry tokens and masked PANs already, but no role may obtain a
    clear card number through it, whatever a rack put in an event."""
    if isinstance(obj, str):
        return mask_card_numbers(obj) if len(obj) >= 13 else obj
    if type(obj) is int and 10**12 <= abs(obj) < 10**19:
        text = str(obj)
        masked = mask_card_numbers(text)
        return obj if masked == text else masked
    if isinstance(obj, dict):
        return {mask_pans(k) if isinstance(k, str) else k: mask_pans(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [mask_pans(v) for v in obj]
    if isinstance(obj, bytes):
        return mask_card_numbers(obj.hex())
    return obj


_NS_LO: Final = 946_684_800 * 10**9     # 2000-01-01 in ns since the epoch
_NS_HI: Final = 4_102_444_800 * 10**9   # 2100-01-01


def _iso_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds") \
        .replace("+00:00", "Z")


def uuid_text(hex32: str) -> str:
    """A 32-digit hex id in the UUID form (8-4-4-4-12)."""
    h = hex32.replace("-", "")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(h) == 32 else hex32


def present(obj: Any) -> Any:
    """``obj`` as the console sends it: times in nanoseconds as RFC 3339 text (a key
    ``x_ns`` becomes ``x_at``), 16-byte and 32-hex ids in the UUID form, then
    ``mask_pans``. Besides being readable, no long run of digits is left that a card-number
    scanner could mistake for a PAN (a 19-digit time passes the Luhn check one time in
    ten)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = mask_pans(str(k))
            if key.endswith("_ns") and type(v) is int and _NS_LO <= v < _NS_HI:
                out[key[:-3] + "_at"] = _iso_ns(v)
            elif key in ("event_id", "id") and isinstance(v, str):
                out[key] = uuid_text(v)
            else:
                out[key] = present(v)
        return out
    if isinstance(obj, list | tuple):
        return [present(v) for v in obj]
    if type(obj) is int and _NS_LO <= obj < _NS_HI:
        return _iso_ns(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        b = bytes(obj)
        return uuid_text(b.hex()) if len(b) == 16 else b.hex()
    if isinstance(obj, datetime):
        return _json_value(obj)
    if not (isinstance(obj, int | float | str | bool) or obj is None):
        obj = str(obj)  # a CBOR tag, a decimal: as text
    return mask_pans(obj)


# -- registry -------------------------------------------------------------------------------
async def ask(data_dir: Path, what: str, query: Mapping[str, Any] | None = None) -> Any:
    """The registry's JSON answer to ``what`` (``racks``, ``top``, ``rack``).

    Raises:
        DataError: the registry is not there or did not answer in time.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(data_dir / SOCKET), limit=1 << 24), ASK_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise DataError(f"registry not reachable: {exc}") from None
    try:
        writer.write(f"{what} ".encode() + orjson.dumps(query or {}) + b"\n")
        data = await asyncio.wait_for(reader.read(), ASK_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise DataError(f"registry did not answer: {exc}") from None
    finally:
        writer.close()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DataError(f"registry answered junk: {exc}") from None


# -- audit trail ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TxnQuery:
    """A transaction search; every field optional (``None``: any)."""

    terminal: str | None = None
    stan: str | None = None
    token: str | None = None
    rack: str | None = None
    de39: str | None = None
    date_from: str | None = None   # YYYY-MM-DD, inclusive
    date_to: str | None = None     # YYYY-MM-DD, inclusive
    amount_min: int | None = None  # minor units
    amount_max: int | None = None
    limit: int = 100


_TXN_COLUMNS: Final = ("event_id", "rack", "stream", "seq", "ts", "kind", "mti", "pcode",
                       "amount", "currency", "de39", "outcome", "issuer", "route",
                       "latency_us", "token", "pan", "stan", "terminal", "reason")
_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    return v


class AuditReader:
    """Searches of the audit trail under ``<hub data dir>/audit`` (module doc)."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / AUDIT_DIR
        self._verified: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    def _con(self) -> duckdb.DuckDBPyConnection:
        self.root.mkdir(parents=True, exist_ok=True)
        return open_views(self.root)

    def search(self, q: TxnQuery) -> list[dict[str, Any]]:
        """Transactions matching ``q``, newest first (at most ``q.limit``, <= 500).

        Raises:
            DataError: a date not ``YYYY-MM-DD``.
        """
        where: list[str] = []
        args: list[str | int] = []
        for col, value in (("terminal", q.terminal), ("stan", q.stan), ("token", q.token),
                           ("rack", q.rack), ("de39", q.de39)):
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        for op, day in ((">=", q.date_from), ("<=", q.date_to)):
            if day:
                if not _DATE.match(day):
                    raise DataError(f"date: expected YYYY-MM-DD, got {day!r}")
                where.append(f"date {op} ?::DATE")
                args.append(day)
        for op, amount in ((">=", q.amount_min), ("<=", q.amount_max)):
            if amount is not None:
                where.append(f"amount {op} ?")
                args.append(amount)
        sql = (f"SELECT {', '.join(_TXN_COLUMNS)} FROM txn"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY ts DESC LIMIT ?")
        args.append(max(1, min(q.limit, SEARCH_LIMIT)))
        con = self._con()
        try:
            rows = con.execute(sql, args).fetchall()
        except duckdb.Error as exc:
            raise DataError(f"search failed: {exc}") from None
        finally:
            con.close()
        return [present({c: _json_value(v) for c, v in zip(_TXN_COLUMNS, r, strict=True)})
                for r in rows]

    def event(self, event_id: str) -> dict[str, Any] | None:
        """One event: its row, its decoded body (``cbor``) and ``chain``: the verification
        of its rack's chain (``chain_state``), or None if there is none."""
        con = self._con()
        try:
            rel = con.execute("SELECT *, filename AS file FROM read_parquet("
                              "?, hive_partitioning = true, filename = true, "
                              "hive_types = {'date': DATE, 'hour': INTEGER}) "
                              "WHERE event_id = ? LIMIT 1",
                              [str(self.root / "*/rack=*/date=*/hour=*/*.parquet"),
                               event_id.replace("-", "").lower()])
            cols = [d[0] for d in rel.description]
            row = rel.fetchone()
        except duckdb.Error:
            row = None  # no part yet
        finally:
            con.close()
        if row is None:
            return None
        doc = dict(zip(cols, row, strict=True))
        try:
            body = loads(bytes(doc.pop("cbor")))
        except CBORDecodeError as exc:
            body = {"undecodable": str(exc)}
        doc.pop("chain", None)
        file = str(Path(str(doc.pop("file"))).relative_to(self.root))
        out = {k: _json_value(v) for k, v in doc.items()}
        out["part"] = file
        out["event"] = body
        # from the event's day on (the head before it recorded): a click on an event does
        # not re-read years of archive
        out["chain"] = self.chain_state(str(doc["stream"]), str(doc["rack"]), file,
                                        since=str(doc.get("date") or "") or None)
        return present(out)

    def chain_state(self, stream: str, rack: str, part: str, since: str | None = None
                    ) -> dict[str, Any]:
        """Whether ``rack``'s chain of ``stream`` verifies from day ``since`` on (cached
        ``VERIFY_TTL_S``): its findings, and those naming ``part`` (``here``)."""
        now = time.monotonic()
        key = (stream, rack, since or "")
        hit = self._verified.get(key)
        if hit is None or now - hit[0] > VERIFY_TTL_S:
            rep = verify_chain(self.root, stream, rack, since)
            hit = (now, rep.as_json())
            self._verified[key] = hit
        report = hit[1]
        return {"state": "verified" if report["ok"] else "findings",
                "rows": report["rows"], "files": report["files"],
                "here": [f for f in report["findings"] if f.get("file") == part][:20],
                "findings": report["findings"][:20]}

    def daily(self, day: str) -> dict[str, Any]:
        """``mixer audit report daily`` for ``day`` as JSON columns and rows.

        Raises:
            DataError: not ``YYYY-MM-DD``.
        """
        if not _DATE.match(day):
            raise DataError(f"date: expected YYYY-MM-DD, got {day!r}")
        con = self._con()
        try:
            cols, rows = daily_report(con, day)
        finally:
            con.close()
        return {"date": day, "columns": cols,
                "rows": [[_json_value(v) for v in r] for r in rows]}


# -- UNS ------------------------------------------------------------------------------------
class UnsReader:
    """The racks' UNS samples as the hub keeps them (``UNS_<rack>`` copies)."""

    def __init__(self, nc: Client):
        self.nc = nc

    async def streams(self) -> list[str]:
        """The hub's UNS copies."""
        js = self.nc.jetstream()
        names = await js.streams_info()
        return sorted(s.config.name for s in names
                      if s.config.name and s.config.name.startswith(UNS_STREAM_PREFIX))

    async def _direct(self, stream: str, request: Mapping[str, Any]
                      ) -> list[tuple[str, bytes]]:
        return [(s, d) for s, _, d in await direct_batch(self.nc, stream, request)]

    async def latest(self) -> list[dict[str, Any]]:
        """Every tag's newest sample across the hub's UNS copies: ``{rack, path, value,
        unit, quality, ts}``, by path."""
        out = []
        for stream in await self.streams():
            rack = stream[len(UNS_STREAM_PREFIX):]
            got = await self._direct(stream, {"multi_last": [f"{UNS_PREFIX}>"],
                                              "batch": 100_000})
            for subject, data in got:
                out.append({"rack": rack, **_sample(subject, data)})
        out.sort(key=lambda s: (s["path"], s["rack"]))
        return present(out)

    async def history(self, rack: str, path: str, since_s: float,
                      points: int = HISTORY_POINTS) -> list[dict[str, Any]]:
        """A tag's samples from ``since_s`` (epoch seconds) on, oldest first, at most
        ``points``."""
        start = datetime.fromtimestamp(since_s, UTC).isoformat().replace("+00:00", "Z")
        got = await self._direct(f"{UNS_STREAM_PREFIX}{rack}", {
            "next_by_subj": UNS_PREFIX + path, "start_time": start,
            "batch": max(1, min(points, HISTORY_POINTS))})
        return present([_sample(s, d) for s, d in got])


async def direct_batch(nc: Client, stream: str, request: Mapping[str, Any],
                       timeout: float = 3.0) -> list[tuple[str, int, bytes]]:
    """A batched JetStream direct get on ``stream``: (subject, sequence, data) of every
    message until the end marker (or nothing, for a stream without them)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[tuple[str, int, bytes]] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), reply=inbox)
        deadline = time.monotonic() + timeout
        while True:
            msg = await sub.next_msg(timeout=max(0.05, deadline - time.monotonic()))
            headers = msg.headers or {}
            if headers.get("Status"):  # 204 end, 404 nothing, 408 timeout, 503 no direct get
                break
            seq = headers.get("Nats-Sequence", "0")
            out.append((headers.get("Nats-Subject", ""), int(seq) if seq.isdigit() else 0,
                        msg.data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return out


def _sample(subject: str, data: bytes) -> dict[str, Any]:
    path = subject.removeprefix(UNS_PREFIX)
    try:
        body = loads(data).get("body", {})
    except (CBORDecodeError, AttributeError):
        return {"path": path, "value": None, "quality": "undecodable", "unit": None, "ts": None}
    return {"path": path, "value": body.get("value"), "unit": body.get("unit"),
            "quality": body.get("quality"), "ts": body.get("ts")}


__all__ = ["AuditReader", "DataError", "TxnQuery", "UnsReader", "ask", "direct_batch",
           "mask_pans", "present", "uuid_text"]
