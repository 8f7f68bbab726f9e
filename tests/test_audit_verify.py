"""The audit trail's tamper evidence and queries, attacked from outside.

Archives are made by the real archiver (``mixer.archiver.archiver_main``) reading real
JetStream streams of a real nats-server; the files are then read with pyarrow directly and
the chain recomputed here with hashlib (not with ``mixer.auditrow``), and tampered with the
way someone with write access to the hub's disk would; every verdict comes from the real CLI
(``python -m mixer audit ...``) in a subprocess.

Two archives are built once per module and copied per test (``shutil.copytree``), so one
test's tampering never reaches another:

* ``clean``: racks ``a`` and ``b``, ISO 8583 transactions (plus edge rejections and
  non-transaction events) spread over five hours across midnight UTC;
* ``dirty``: rack ``g`` (events 300-399 deleted on its stream before the archiver read them),
  rack ``h`` (its first 50 events purged before the archiver read them) and rack ``l``
  (some events carry a clear, Luhn-valid test PAN).

Test PANs only (4111 1111 1111 1111 and friends, published by the card schemes for tests);
no test prints one: assertion messages name seqs and files.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.bus import BusUser
from engine.frame import encode_parts, uuid7
from engine.natsd import NatsServer
from mixer.archiver import ArchiverPlan, DirectSource, archiver_main
from mixer.auditfiles import load_index
from mixer.settings import AuditSettings

REPO = Path(__file__).resolve().parent.parent
STREAM = "TXN"
GENESIS = bytes(32)  # written out here, not imported: the test's chain is its own
HOUR_NS = 3_600_000_000_000
# 2024-03-05T22:10:00Z: five hours of events cross midnight, so two dates and five hours
BASE_NS = 1_709_676_600 * 1_000_000_000
MASKED_PAN = "476173******0119"
TXN_KINDS = ("iso8583.txn", "iso8583.rejected")
DE39 = ("00", "00", "00", "05", "51", "91")
ISSUERS = ("visa-eu", "mc-eu", "amex")
GAP = (300, 399)          # rack g: deleted on the stream before the archiver read them
PURGED_HEAD = 50          # rack h: its first 50 purged before the archiver read them
DIGIT_RUN = re.compile(rb"(?<![0-9])[0-9]{13,19}(?![0-9])")
# In raw bytes, a hex word of 32 (event id) or 64 (chain head) characters is not card data
# even where a run of its characters are decimal digits.
HEX_WORD = re.compile(rb"[0-9a-f]+")


def luhn_ok(digits: str) -> bool:
    """The Luhn check, written out here (independent of ``gears.coatcheck``)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    """``prefix`` with the check digit that makes it pass Luhn."""
    return next(prefix + c for c in "0123456789" if luhn_ok(prefix + c))


# test PANs: 16 digits (Visa's test card), 13 digits (Visa's), 19 digits (made Luhn-valid)
CLEAR_PANS = ("4111111111111111", "4222222222222", luhn_complete("622126000000000000"))
LEAKY_ROWS = {12: 0, 77: 1, 150: 2, 151: 0, 299: 1}  # rack l: 0-based index -> CLEAR_PANS


@dataclass(frozen=True, slots=True)
class Event:
    """One published event as the test knows it."""

    seq: int          # its sequence in the rack's stream
    id: str           # hex event id
    ts: int
    kind: str
    # never in a failure's output: some carry a (test) card number
    body: dict[str, Any] = field(repr=False)
    payload: bytes = field(repr=False)


@dataclass(slots=True)
class Archives:
    """The two archives built once, and what was published into them."""

    clean: Path
    dirty: Path
    # rack -> every event published / what the stream still held when the archiver read it
    published: dict[str, list[Event]] = field(default_factory=dict, repr=False)
    archived: dict[str, list[Event]] = field(default_factory=dict, repr=False)


def make_events(rack: str, n: int, base_ns: int, step_s: float, seed: int,
                clear: dict[int, str] | None = None) -> list[Event]:
    """``n`` events of ``rack``: ISO 8583 transactions, every 25th an edge rejection, every
    40th a non-transaction event; ``clear`` puts a clear PAN in the events it names."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = base_ns + int(i * step_s * 1e9)
        body: dict[str, Any]
        if i % 40 == 39:
            kind, body = "rack.heartbeat", {"uptime_s": i, "load": rng.randint(0, 99)}
        elif i % 25 == 24:
            kind = "iso8583.rejected"
            body = {"mti": "0200", "pan": MASKED_PAN,
                    "amount": f"{rng.randint(1, 99_999):012d}", "currency": "978",
                    "stan": f"{i + 1:06d}", "terminal": f"T{rng.randint(1, 9):07d}",
                    "reason": "mac check failed", "outcome": "rejected"}
        else:
            de39 = rng.choice(DE39)
            kind = "iso8583.txn"
            body = {"mti": "0210", "pcode": "000000", "pan": MASKED_PAN,
                    "amount": f"{rng.randint(1, 99_999):012d}", "currency": "978",
                    "stan": f"{i + 1:06d}", "terminal": f"T{rng.randint(1, 9):07d}",
                    "de39": de39, "outcome": "approved" if de39 == "00" else "declined",
                    "issuer": rng.choice(ISSUERS), "route": "primary",
                    "latency_us": rng.randint(200, 90_000)}
        if clear and i in clear:
            body["pan"] = clear[i]
        eid = uuid7(ts)
        out.append(Event(seq=i + 1, id=eid.hex(), ts=ts, kind=kind, body=body,
                         payload=encode_parts(eid, ts, f"{rack}.switch", kind, {}, body)))
    return out


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    """Poll an async condition (state in another process) until it holds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _archive(url: str, hubdir: Path, sources: dict[str, int]) -> None:
    """Run the real archiver on ``hubdir`` until every rack's index reaches its last seq."""
    stop = asyncio.Event()
    plan = ArchiverPlan(
        data_dir=str(hubdir), hub_url=url, user="archiver", password="pw",
        settings=AuditSettings(flush_rows=500, flush_after=0.2), discover=False,
        direct=tuple(DirectSource(rack=r, stream=STREAM, js_stream=f"{STREAM}_{r}")
                     for r in sources))
    task = asyncio.create_task(archiver_main(plan, None, "archiver", stop))

    async def done() -> bool:
        if task.done():
            task.result()  # the archiver died: say why
        return all(load_index(hubdir / "audit", STREAM, r).last >= last
                   for r, last in sources.items())

    try:
        await _wait(done, 30, f"the archive of {sorted(sources)}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def _build(url: str, clean: Path, dirty: Path) -> Archives:
    arch = Archives(clean=clean, dirty=dirty)
    pub = arch.published
    pub["a"] = make_events("a", 1500, BASE_NS, 10.0, seed=1)
    pub["b"] = make_events("b", 1200, BASE_NS + 7 * 60 * 10**9, 12.5, seed=2)
    pub["g"] = make_events("g", 1000, BASE_NS, 3.0, seed=3)
    pub["h"] = make_events("h", 200, BASE_NS, 3.0, seed=4)
    pub["l"] = make_events("l", 300, BASE_NS, 3.0, seed=5,
                           clear={i: CLEAR_PANS[k] for i, k in LEAKY_ROWS.items()})
    nc = await nats.connect(url, user="archiver", password="pw")
    try:
        js = nc.jetstream()
        for rack, events in pub.items():
            await js.add_stream(name=f"{STREAM}_{rack}", subjects=[f"t.{rack}"])
            for ev in events:
                await nc.publish(f"t.{rack}", ev.payload)
        await nc.flush()
        for rack, events in pub.items():
            async def stored(rack: str = rack, n: int = len(events)) -> bool:
                return (await js.stream_info(f"{STREAM}_{rack}")).state.messages == n
            await _wait(stored, 15, f"stream of rack {rack} holding its events")
        for seq in range(GAP[0], GAP[1] + 1):
            await js.delete_msg(f"{STREAM}_g", seq)
        await js.purge_stream(f"{STREAM}_h", seq=PURGED_HEAD + 1)  # up to, not including
        info = await js.stream_info(f"{STREAM}_h")
        assert info.state.first_seq == PURGED_HEAD + 1
    finally:
        await nc.close()
    arch.archived = {r: list(evs) for r, evs in pub.items()}
    arch.archived["g"] = [e for e in pub["g"] if not GAP[0] <= e.seq <= GAP[1]]
    arch.archived["h"] = pub["h"][PURGED_HEAD:]
    await asyncio.gather(
        _archive(url, clean, {"a": 1500, "b": 1200}),
        _archive(url, dirty, {"g": 1000, "h": 200, "l": 300}))
    return arch


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Archives:
    """Both archives, made by the real archiver from a real nats-server (module doc)."""
    base = tmp_path_factory.mktemp("audit")
    srv = NatsServer(rack_id="hub", data_dir=base / "nats", host="127.0.0.1", port=0,
                     users=[BusUser(name="archiver", password="pw")])
    srv.start()
    try:
        clean, dirty = base / "clean", base / "dirty"
        clean.mkdir()
        dirty.mkdir()
        return asyncio.run(_build(srv.url, clean, dirty))
    finally:
        srv.stop()


@pytest.fixture
def clean(archives: Archives, tmp_path: Path) -> Path:
    """A private copy of the clean archive's hub dir (tamper at will)."""
    return Path(shutil.copytree(archives.clean, tmp_path / "hub"))


@pytest.fixture
def dirty(archives: Archives, tmp_path: Path) -> Path:
    """A private copy of the dirty archive's hub dir."""
    return Path(shutil.copytree(archives.dirty, tmp_path / "hub"))


# --- helpers: the CLI, and the files read without mixer's code ------------------------------

def mixer(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mixer ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mixer", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def verify(hub: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    """``mixer audit verify HUB --no-ask --json``: (exit code, reports)."""
    done = mixer("audit", "verify", str(hub), "--no-ask", "--json", *extra)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def findings(reports: list[dict[str, Any]], rack: str | None = None) -> list[dict[str, Any]]:
    """Every finding (of ``rack``'s chains)."""
    return [f for r in reports if rack is None or r["rack"] == rack for f in r["findings"]]


def audit(hub: Path) -> Path:
    return hub / "audit"


def parts(hub: Path, rack: str) -> list[Path]:
    """The rack's part files on disk, in the order of their first seq (from the name)."""
    found = (audit(hub) / STREAM / f"rack={rack}").rglob("part-*.parquet")
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rel(hub: Path, path: Path) -> str:
    return str(path.relative_to(audit(hub)))


def read_part(path: Path) -> pa.Table:
    """A part as stored (no hive partition columns: one file, read as one file)."""
    return pq.ParquetFile(path).read()


def rewrite(path: Path, table: pa.Table, like: pa.Table) -> None:
    """Replace a part by ``table`` with ``like``'s footer metadata (what a forger keeps)."""
    pq.write_table(table.replace_schema_metadata(like.schema.metadata), path)


def rack_rows(hub: Path, rack: str) -> pa.Table:
    """Every row of the rack, in seq order."""
    return pa.concat_tables([read_part(p) for p in parts(hub, rack)]).sort_by("seq")


def middle_part(hub: Path, rack: str, min_rows: int = 5) -> tuple[Path, pa.Table]:
    """A part that is neither the rack's first nor last and has ``min_rows`` rows."""
    files = parts(hub, rack)
    for p in files[1:-1]:
        t = read_part(p)
        if t.num_rows >= min_rows:
            return p, t
    raise AssertionError(f"no middle part with {min_rows} rows among {len(files)} parts")


def leaks(data: bytes, raw: bool = False) -> list[int]:
    """Offsets of 13-19 digit runs passing Luhn in ``data`` (offsets only: a failing
    assertion must not print what it found); ``raw``: bytes of a file, where runs inside a
    32 or 64 character hex word (with a letter) are ids and hashes."""
    found = []
    for m in DIGIT_RUN.finditer(data):
        if not luhn_ok(m.group().decode()):
            continue
        if raw:
            a, b = m.start(), m.end()
            while a and data[a - 1:a] in b"0123456789abcdef":
                a -= 1
            while b < len(data) and data[b:b + 1] in b"0123456789abcdef":
                b += 1
            word = data[a:b]
            if len(word) in (32, 64) and HEX_WORD.fullmatch(word) and not word.isdigit() \
                    and (a == 0 or not data[a - 1:a].isalnum()) \
                    and (b == len(data) or not data[b:b + 1].isalnum()):
                continue
        found.append(m.start())
    return found


def card_runs_in(t: pa.Table, skip: tuple[str, ...] = ()) -> list[str]:
    """``column[row]`` of every value of ``t`` holding a Luhn-valid 13-19 digit run (text
    and bytes as they are, numbers as their decimal text)."""
    found = []
    for name in t.column_names:
        if name in skip:
            continue
        for i, v in enumerate(t.column(name).to_pylist()):
            if v is None:
                continue
            data = v if isinstance(v, bytes) else v.encode() if isinstance(v, str) \
                else str(v).encode()
            if leaks(data):
                found.append(f"{name}[{i}]")
    return found


def footer(path: Path) -> bytes:
    """A Parquet file's footer as stored: its only bytes not compressed (schema, key-value
    metadata, column statistics), where a value would lie in clear in the raw file."""
    raw = path.read_bytes()
    assert raw[-4:] == b"PAR1"
    return raw[-8 - int.from_bytes(raw[-8:-4], "little"):]


# --- 1. a whole archive -----------------------------------------------------------------------

def test_two_racks_archived_one_to_one_chained_and_verified(archives: Archives,
                                                             clean: Path) -> None:
    for rack in ("a", "b"):
        published = {e.id: e for e in archives.published[rack]}
        t = rack_rows(clean, rack)
        ids = t.column("event_id").to_pylist()
        assert len(ids) == len(set(ids)) == len(published), f"rack {rack}: row count"
        assert set(ids) == set(published), f"rack {rack}: event ids differ"
        seqs = t.column("seq").to_pylist()
        assert seqs == list(range(1, len(published) + 1)), f"rack {rack}: seqs not 1..N"
        cbors = t.column("cbor").to_pylist()
        for eid, seq, cbor in zip(ids, seqs, cbors, strict=True):
            assert published[eid].seq == seq and published[eid].payload == cbor, \
                f"rack {rack}: seq {seq} is not the published event"
        # the rack is a hive partition (in the path and the footer), not a file column:
        # Spark and Arrow datasets refuse a column that is in both
        assert "rack" not in t.column_names
        assert set(t.column("stream").to_pylist()) == {STREAM}
        # the chain, recomputed here from genesis over the rack's bytes in seq order
        h, expect = GENESIS, []
        for cbor in cbors:
            h = hashlib.sha256(h + cbor).digest()
            expect.append(h)
        assert t.column("chain").to_pylist() == expect, f"rack {rack}: chain differs"
        index = json.loads((audit(clean) / "_chain" / STREAM / f"{rack}.json").read_bytes())
        assert index["last"] == len(published) and index["head"] == h.hex()
        # each part: one hour, its footer's prev/head/count are what its rows say
        files = parts(clean, rack)
        assert len(files) >= 5, "five hours of events: at least five parts"
        for p in files:
            pt = read_part(p)
            meta = json.loads(pt.schema.metadata[b"fluxrig.audit"])
            first_seq = pt.column("seq")[0].as_py()
            prev = GENESIS if first_seq == 1 else expect[first_seq - 2]
            assert (meta["rack"], meta["stream"], meta["count"]) == (rack, STREAM,
                                                                       pt.num_rows)
            assert meta["prev"] == prev.hex()
            assert meta["head"] == pt.column("chain")[-1].as_py().hex()
            hours = {ts.value // HOUR_NS for ts in pt.column("ts")}
            assert len(hours) == 1, f"{p.name} spans hours"
    rc, reports = verify(clean)
    assert rc == 0, findings(reports)
    assert {(r["rack"], r["rows"], r["first"], r["last"], r["ok"]) for r in reports} == \
        {("a", 1500, 1, 1500, True), ("b", 1200, 1, 1200, True)}


# --- 2. a flipped byte ------------------------------------------------------------------------

def test_flipped_byte_in_one_cbor_is_tampered_at_that_file_and_row(clean: Path) -> None:
    path, t = middle_part(clean, "a")
    k = t.num_rows // 2
    cbors = t.column("cbor").to_pylist()
    raw = bytearray(cbors[k])
    raw[len(raw) // 2] ^= 0x20
    cbors[k] = bytes(raw)
    forged = t.set_column(t.schema.get_field_index("cbor"), "cbor",
                          pa.array(cbors, pa.binary()))
    rewrite(path, forged, t)
    after = read_part(path)
    assert after.schema.metadata == t.schema.metadata
    changed = [c for c in t.column_names if not after.column(c).equals(t.column(c))]
    assert changed == ["cbor"], "only the one cell may differ"

    rc, reports = verify(clean)
    assert rc == 1
    seq = t.column("seq")[k].as_py()
    assert findings(reports) == [{
        "kind": "tampered", "rack": "a", "stream": STREAM, "file": rel(clean, path),
        "row": k, "detail": f"seq {seq}: the event's bytes or chain value were changed "
        "(they do not hash from the row before)"}]


def test_edited_query_column_is_tampered(clean: Path) -> None:
    """The flattened columns are what queries and reports sum: an amount edited in the file
    (the event's bytes and chain left alone) must not pass verify."""
    path, t = middle_part(clean, "a")
    kinds = t.column("kind").to_pylist()
    k = kinds.index("iso8583.txn")
    amounts = t.column("amount").to_pylist()
    amounts[k] = amounts[k] + 1_000_000
    forged = t.set_column(t.schema.get_field_index("amount"), "amount",
                          pa.array(amounts, pa.int64()))
    rewrite(path, forged, t)

    rc, reports = verify(clean)
    assert rc == 1, "an edited amount passed verify"
    assert [(f["kind"], f["file"], f["row"]) for f in findings(reports)] == \
        [("tampered", rel(clean, path), k)]


# --- 3. a deleted row -------------------------------------------------------------------------

def test_deleted_row_is_located_by_file_and_row(clean: Path) -> None:
    path, t = middle_part(clean, "b")
    k = t.num_rows // 2
    seq = t.column("seq")[k].as_py()
    rewrite(path, pa.concat_tables([t.slice(0, k), t.slice(k + 1)]), t)

    rc, reports = verify(clean)
    assert rc == 1
    got = findings(reports, "b")
    assert findings(reports, "a") == []
    f = rel(clean, path)
    kinds = {(x["kind"], x["file"], x["row"]) for x in got}
    # the row after the deleted one (now at position k) no longer chains
    assert ("tampered", f, k) in kinds, got
    assert ("count", f, None) in kinds, got
    gaps = [x for x in got if x["kind"] == "gap"]
    assert len(gaps) == 1 and gaps[0]["detail"].startswith(f"missing seq {seq}-{seq} (1 events)")
    assert "archiver saw it" not in gaps[0]["detail"], "the archiver did not see this one"


def test_truncated_tail_is_a_gap_to_the_index_last(clean: Path) -> None:
    path = parts(clean, "a")[-1]
    t = read_part(path)
    assert t.num_rows > 3
    rewrite(path, t.slice(0, t.num_rows - 3), t)

    rc, reports = verify(clean)
    assert rc == 1
    got = findings(reports, "a")
    kinds = {(x["kind"], x["file"]) for x in got}
    assert ("count", rel(clean, path)) in kinds
    assert any(x["kind"] == "gap" and x["detail"].startswith("missing seq 1498-1500 ")
               for x in got), got


def test_rechained_forgery_is_caught_at_the_index_head(clean: Path) -> None:
    """A forger who edits an event and recomputes every chain value after it (and every
    footer) still leaves the index's heads behind, and the event's query columns no longer
    match its bytes."""
    files = parts(clean, "a")
    i = len(files) // 2
    t0 = read_part(files[i])
    k = 1
    cbors = t0.column("cbor").to_pylist()
    cbors[k] = cbors[k].replace(b"approved", b"APPROVED") if b"approved" in cbors[k] \
        else cbors[k].replace(b"declined", b"DECLINED")
    prev = bytes.fromhex(json.loads(t0.schema.metadata[b"fluxrig.audit"])["prev"])
    for j, p in enumerate(files[i:]):
        t = t0 if j == 0 else read_part(p)
        cs = cbors if j == 0 else t.column("cbor").to_pylist()
        meta = json.loads(t.schema.metadata[b"fluxrig.audit"])
        meta["prev"] = prev.hex()
        chain = []
        for c in cs:
            prev = hashlib.sha256(prev + c).digest()
            chain.append(prev)
        meta["head"] = prev.hex()
        forged = t.set_column(t.schema.get_field_index("cbor"), "cbor", pa.array(cs))
        forged = forged.set_column(forged.schema.get_field_index("chain"), "chain",
                                   pa.array(chain, pa.binary(32)))
        pq.write_table(forged.replace_schema_metadata(
            {b"fluxrig.audit": json.dumps(meta).encode()}), p)

    rc, reports = verify(clean)
    assert rc == 1
    got = findings(reports)
    assert {x["kind"] for x in got} == {"head", "tampered"}
    assert any(x["file"] == rel(clean, files[i]) and x["row"] == k
               and "column outcome does not match" in x["detail"] for x in got), got


# --- 4. swapped and moved files ---------------------------------------------------------------

def test_swapped_parts_are_misplaced(clean: Path) -> None:
    files = parts(clean, "a")
    x, y = files[1], files[3]
    tmp = x.with_name("swap.tmp")
    x.rename(tmp)
    y.rename(x)
    tmp.rename(y)

    rc, reports = verify(clean)
    assert rc == 1
    got = findings(reports)
    assert {f["rack"] for f in got} == {"a"}
    misplaced = {f["file"] for f in got if f["kind"] == "misplaced"}
    assert misplaced == {rel(clean, x), rel(clean, y)}, got
    assert all(f["file"] in misplaced for f in got), got


def test_part_moved_to_another_rack_is_misplaced(clean: Path) -> None:
    src = parts(clean, "a")[2]
    dst = audit(clean) / STREAM / "rack=b" / src.relative_to(audit(clean) / STREAM / "rack=a")
    assert not dst.exists()
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)

    rc, reports = verify(clean)
    assert rc == 1
    in_a = {(f["kind"], f["file"]) for f in findings(reports, "a")}
    assert ("missing-file", rel(clean, src)) in in_a
    in_b = {(f["kind"], f["file"]) for f in findings(reports, "b")}
    assert ("unlisted-file", rel(clean, dst)) in in_b
    # its footer and rows say rack a: the docs call that misplaced, wherever it lies
    assert ("misplaced", rel(clean, dst)) in in_b, findings(reports, "b")


# --- 5. gaps ----------------------------------------------------------------------------------

def test_gap_purged_before_archiving_is_reported_as_seen(archives: Archives,
                                                         dirty: Path) -> None:
    t = rack_rows(dirty, "g")
    assert set(t.column("event_id").to_pylist()) == {e.id for e in archives.archived["g"]}
    rc, reports = verify(dirty, "--rack", "g")
    assert rc == 1
    got = findings(reports)
    assert [f["kind"] for f in got] == ["gap"], got
    assert got[0]["detail"] == (f"missing seq {GAP[0]}-{GAP[1]} (100 events); the archiver "
                                f"saw it: purged before the hub had it")
    index = json.loads((audit(dirty) / "_chain" / STREAM / "g.json").read_bytes())
    assert [(g["from"], g["to"]) for g in index["gaps"]] == [GAP]


def test_gap_at_the_start_of_the_chain_is_reported(archives: Archives, dirty: Path) -> None:
    """Rack h's first 50 events were purged before the archiver ever read it: the archiver
    records the gap 1-50 in the index; verify must not call the chain whole."""
    t = rack_rows(dirty, "h")
    assert t.column("seq").to_pylist() == list(range(PURGED_HEAD + 1, 201))
    index = json.loads((audit(dirty) / "_chain" / STREAM / "h.json").read_bytes())
    assert [(g["from"], g["to"]) for g in index["gaps"]] == [(1, PURGED_HEAD)]
    rc, reports = verify(dirty, "--rack", "h")
    assert [f["detail"] for f in findings(reports) if f["kind"] == "gap"] == \
        [f"missing seq 1-{PURGED_HEAD} ({PURGED_HEAD} events); the archiver saw it: purged "
         f"before the hub had it"], findings(reports)
    assert rc == 1


# --- 6. card numbers --------------------------------------------------------------------------

def test_clear_pans_masked_in_columns_and_reported_as_leaks(archives: Archives,
                                                            dirty: Path) -> None:
    files = parts(dirty, "l")
    where: dict[tuple[str, int], int] = {}   # (file, row) -> seq, of rows with a clear PAN
    unmasked = []
    for p in files:
        t = read_part(p)
        # every column but the event's own bytes (and the hex event id: see the clean test)
        assert card_runs_in(t, skip=("cbor", "event_id")) == [], p.name
        pans = t.column("pan").to_pylist()
        for i, (seq, cbor) in enumerate(zip(t.column("seq").to_pylist(),
                                            t.column("cbor").to_pylist(), strict=True)):
            if leaks(cbor):
                where[(rel(dirty, p), i)] = seq
                if not re.fullmatch(r"\d{6}\*+\d{4}", pans[i]):
                    unmasked.append(seq)
    assert sorted(where.values()) == sorted(i + 1 for i in LEAKY_ROWS)
    assert unmasked == []

    rc, reports = verify(dirty, "--rack", "l")
    assert rc == 1
    got = findings(reports)
    assert {f["kind"] for f in got} == {"leak"}
    assert {(f["file"], f["row"]) for f in got} == set(where)
    for f in got:
        assert f["detail"].startswith(f"seq {where[(f['file'], f['row'])]}: a clear card number")
    # the query layer shows masked PANs only
    done = mixer("audit", "query", str(dirty), "select pan from txn where rack = 'l'", "--csv")
    assert done.returncode == 0, done.stderr
    assert not leaks(done.stdout.encode())


def test_clean_archive_has_no_card_number_anywhere(archives: Archives, clean: Path) -> None:
    """Every decompressed value, and every byte stored in clear (footers, chain indexes).

    The compressed pages are checked decompressed, not as raw bytes: zstd keeps the bytes
    that differ between neighbouring values as literals, side by side — the last digit of
    each terminal id makes a run of digits there, Luhn-valid one time in ten, a card number
    to no one. An event id is hex by construction (uuid7): one in a few dozen holds a run
    of 13+ decimal digits; it is checked for its shape instead."""
    hex_id = re.compile(r"[0-9a-f]{32}")
    for rack in ("a", "b"):
        for p in parts(clean, rack):
            t = read_part(p)
            assert card_runs_in(t, skip=("event_id",)) == [], p.name
            assert all(hex_id.fullmatch(v) for v in t.column("event_id").to_pylist())
            assert leaks(footer(p), raw=True) == [], p.name
    for path in (audit(clean) / "_chain").rglob("*.json"):
        assert leaks(path.read_bytes(), raw=True) == [], path.name
    rc, _ = verify(clean)
    assert rc == 0


def test_part_footers_hold_no_event_bytes(dirty: Path) -> None:
    """A footer is stored uncompressed: the min/max statistics of the ``cbor`` column would
    put a whole event there in clear — a clear PAN an event carries becomes greppable in the
    raw file (the event's bytes are the rack's and stay in the column: compressed)."""
    exposed = [f"{p.name}@{off}" for p in parts(dirty, "l") for off in leaks(footer(p), raw=True)]
    assert exposed == []
    in_clear = [p.name for p in parts(dirty, "l")
                if any(pan.encode() in footer(p) for pan in CLEAR_PANS)]
    assert in_clear == []


def test_clear_pan_with_padding_is_masked_in_the_column() -> None:
    """ISO 8583 fields are often space-padded: a padded clear PAN must not reach the ``pan``
    column (the event's bytes are the rack's; the column is what queries show)."""
    from mixer.auditrow import Batch

    b = Batch("x", STREAM, GENESIS)
    for i, pan in enumerate((CLEAR_PANS[0] + " ", " " + CLEAR_PANS[0], CLEAR_PANS[0])):
        ts = BASE_NS + i
        b.add(i + 1, 0, encode_parts(uuid7(ts), ts, "x.switch", "iso8583.txn", {},
                                     {"mti": "0210", "pan": pan}))
    clear = [bool(leaks(v.encode())) for v in b.table().column("pan").to_pylist()]
    assert clear == [False, False, False]


# --- 7. queries -------------------------------------------------------------------------------

def test_query_counts_formats_and_sandbox(archives: Archives, clean: Path) -> None:
    want = {r: sum(e.kind in TXN_KINDS for e in archives.published[r]) for r in ("a", "b")}
    sql = "select rack, count(*) from txn group by 1 order by 1"
    done = mixer("audit", "query", str(clean), sql, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [tuple(r.values()) for r in rows] == [("a", want["a"]), ("b", want["b"])]

    done = mixer("audit", "query", str(clean), sql, "--csv")
    assert done.returncode == 0, done.stderr
    table = list(csv.reader(io.StringIO(done.stdout)))
    assert table[0][0] == "rack" and table[1:] == [["a", str(want["a"])],
                                                   ["b", str(want["b"])]]

    done = mixer("audit", "query", str(clean), "describe events", "--json")
    assert done.returncode == 0, done.stderr
    types = {r["column_name"]: r["column_type"] for r in json.loads(done.stdout)}
    assert (types["date"], types["hour"]) == ("DATE", "INTEGER")
    assert types["seq"] == "BIGINT" and types["cbor"] == "BLOB"

    # partition pruning reads the right hours: 22:00 on the first day has the first events
    done = mixer("audit", "query", str(clean), "select rack, min(seq), count(*) from events "
                 "where date = DATE '2024-03-05' and hour = 22 group by 1 order by 1", "--json")
    assert done.returncode == 0, done.stderr
    first_hour = {r: sum(e.ts // HOUR_NS == BASE_NS // HOUR_NS for e in archives.published[r])
                  for r in ("a", "b")}
    assert [tuple(r.values()) for r in json.loads(done.stdout)] == \
        [("a", 1, first_hour["a"]), ("b", 1, first_hour["b"])]

    secret = clean / "secret.txt"
    secret.write_text("hub key material\n")
    out = clean.parent / "out.csv"
    refused = {
        f"copy (select * from events) to '{out}'": "only read-only queries",
        "create table t as select * from events": "only read-only queries",
        "select 1; select 2": "one statement at a time",
        "select * from read_text('/etc/hostname')": "Permission Error",
        f"select * from read_text('{secret}')": "Permission Error",
        # a path that starts inside the archive and climbs out of it
        f"select * from read_text('{audit(clean)}/../secret.txt')": "Permission Error",
        f"select * from read_text('{audit(clean)}/{STREAM}/../../secret.txt')":
            "Permission Error",
        "set enable_external_access = true": "only read-only queries",
    }
    for sql, words in refused.items():
        done = mixer("audit", "query", str(clean), sql, "--json")
        assert done.returncode == 2, f"not refused: {sql!r}: {done.stdout[:200]}"
        assert done.stderr.startswith("error: ") and words in done.stderr, (sql, done.stderr)
        assert "key material" not in done.stdout + done.stderr
    assert not out.exists()


def test_query_on_an_empty_archive_gives_empty_views(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    done = mixer("audit", "query", str(tmp_path / "hub"), "select count(*) from txn", "--csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["0"]


# --- 8. the daily report ----------------------------------------------------------------------

def _quantile(values: list[int], q: float) -> float | None:
    """DuckDB's ``quantile_cont``: linear interpolation between closest ranks."""
    if not values:
        return None
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_daily_report_counts_and_sums_per_rack_de39_issuer(archives: Archives,
                                                            clean: Path) -> None:
    by_day: dict[str, dict[tuple, list[Event]]] = defaultdict(lambda: defaultdict(list))
    for rack in ("a", "b"):
        for e in archives.published[rack]:
            if e.kind in TXN_KINDS:
                day = time.strftime("%Y-%m-%d", time.gmtime(e.ts / 1e9))
                by_day[day][(rack, e.body.get("de39"), e.body.get("issuer"))].append(e)
    assert sorted(by_day) == ["2024-03-05", "2024-03-06"]
    for day, groups in by_day.items():
        done = mixer("audit", "report", "daily", str(clean), "--date", day, "--json")
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        got = {(r["rack"], r["de39"], r["issuer"]): r for r in rows}
        assert len(got) == len(rows) and set(got) == set(groups), day
        for key, evs in groups.items():
            r = got[key]
            lat = [e.body["latency_us"] for e in evs if "latency_us" in e.body]
            p50, p99 = _quantile(lat, 0.5), _quantile(lat, 0.99)
            assert r["events"] == len(evs), (day, key)
            assert r["amount"] == sum(int(e.body["amount"]) for e in evs), (day, key)
            for name, want in (("p50_us", p50), ("p99_us", p99)):
                if want is None:
                    assert r[name] is None, (day, key, name)
                else:
                    assert r[name] == pytest.approx(want, abs=0.5 + 1e-9), (day, key, name)
        keys = [(r["rack"], r["de39"] or "\uffff", r["issuer"] or "\uffff") for r in rows]
        assert keys == sorted(keys), "ordered by rack, de39, issuer (nulls last)"
