"""The audit trail's cores: the raw pull connection against a scripted server over real TCP
(split reads, statuses, PING, a refused login), the header and ack-subject readers, rows and
the chain, crash recovery of the chain index, compaction and retention cuts."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from engine.frame import encode_parts, uuid7
from mixer.archiver import retention_cut
from mixer.auditfiles import (
    ChainIndex,
    PartEntry,
    compact,
    load_index,
    part_meta,
    promote,
    recover,
    save_index,
    tmp_of,
    write_tmp,
)
from mixer.auditrow import GENESIS, Batch, chain_next, masked
from mixer.jspull import PullConnection, PullError, ack_fields, source_seq


@pytest.mark.parametrize("header, seq", [
    (b"NATS/1.0\r\nNats-Stream-Source: EV:x1slxVih:C=8Pr3qdQ7 17 > > fluxrig.r.events "
     b"xA1a\r\n\r\n", 17),
    (b"NATS/1.0\r\nNats-Msg-Id: ab\r\nNats-Stream-Source: SRC_a 123456789\r\n\r\n", 123456789),
    (b"NATS/1.0\r\nNats-Msg-Id: ab\r\n\r\n", 0),
    (b"", 0),
])
def test_source_seq_reads_the_origins_sequence(header: bytes, seq: int) -> None:
    assert source_seq(header) == seq


@pytest.mark.parametrize("reply, fields", [
    (b"$JS.ACK.TXN_a.archiver.1.42.40.1795854621139267035.299", (42, 1795854621139267035)),
    (b"$JS.ACK.hub.szMpdrwD.EV_r.x.2.7.3.1795854302984134237.19", (7, 1795854302984134237)),
    (b"$JS.ACK.hub.szMpdrwD.EV_r.x.2.7.3.1795854302984134237.19.Zr4nd", (7,
                                                                        1795854302984134237)),
])
def test_ack_fields_read_both_reply_layouts(reply: bytes, fields: tuple[int, int]) -> None:
    assert ack_fields(reply) == fields


class Scripted:
    """A TCP server that plays NATS: sends INFO, takes the client's lines, answers with the
    bytes a test gives, in the chunks it gives them."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.pong = asyncio.Event()

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writer = w
        w.write(b'INFO {"server_id":"x","headers":true}\r\n')
        while data := await r.read(65536):
            self.got += data
            if b"CONNECT" in self.got and not self.connected.is_set():
                self.connected.set()
            if b"PONG\r\n" in self.got:
                self.pong.set()


async def _connect(reply_to_connect: bytes, chunks: list[bytes], step: int = 0):
    server = Scripted()
    srv = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    msgs: list[tuple[bytes, bytes, bytes]] = []
    statuses: list[tuple[int, bytes]] = []
    conn = PullConnection(lambda r, h, p: msgs.append((r, h, p)),
                          lambda n, line: statuses.append((n, line)))

    async def answer() -> None:
        await server.connected.wait()
        assert server.writer is not None
        server.writer.write(reply_to_connect)
    task = asyncio.create_task(answer())
    try:
        await conn.open("127.0.0.1", port, "u", "p", "test", timeout=5)
    finally:
        await task
    assert server.writer is not None
    for chunk in chunks:
        parts = [chunk[i:i + step] for i in range(0, len(chunk), step)] if step else [chunk]
        for part in parts:
            server.writer.write(part)
            await server.writer.drain()
            await asyncio.sleep(0)
    return server, srv, conn, msgs, statuses


def _wire(conn_prefix: bytes) -> bytes:
    hdr = b"NATS/1.0\r\nNats-Stream-Source: SRC 5 > > a.b\r\n\r\n"
    payload = b"\xa1\x61x\x01"
    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 10\r\n\r\n"
    return (b"HMSG a.b 1 $JS.ACK.S.archiver.1.9.9.1.0 %d %d\r\n%s%s\r\n"
            % (len(hdr), len(hdr) + len(payload), hdr, payload)
            + b"MSG a.c 1 $JS.ACK.S.archiver.1.10.10.1.0 3\r\nxyz\r\n"
            + b"PING\r\n"
            + b"HMSG %s.3 1 %d %d\r\n%s\r\n" % (conn_prefix, len(status), len(status), status))


@pytest.mark.parametrize("step", [0, 1, 7])
def test_the_pull_connection_reads_messages_statuses_and_pings_in_any_split(step: int) -> None:
    async def run():
        server, srv, conn, msgs, statuses = await _connect(b"PONG\r\n", [])
        assert server.writer is not None
        data = _wire(conn.prefix)
        parts = [data[i:i + step] for i in range(0, len(data), step)] if step else [data]
        for part in parts:
            server.writer.write(part)
            await server.writer.drain()
        await asyncio.wait_for(server.pong.wait(), 5)  # our PONG to its PING came back
        while len(statuses) < 1:
            await asyncio.sleep(0.01)
        conn.pull(3, "$JS.API.CONSUMER.MSG.NEXT.S.archiver", 100, 1 << 20, 5_000_000_000)
        conn.ack(msgs[0][0])
        await asyncio.sleep(0.05)
        got = bytes(server.got)
        conn.close()
        srv.close()
        return msgs, statuses, got, conn.prefix

    msgs, statuses, got, prefix = asyncio.run(run())
    assert msgs == [(b"$JS.ACK.S.archiver.1.9.9.1.0",
                     b"NATS/1.0\r\nNats-Stream-Source: SRC 5 > > a.b\r\n\r\n", b"\xa1\x61x\x01"),
                    (b"$JS.ACK.S.archiver.1.10.10.1.0", b"", b"xyz")]
    assert statuses == [(3, b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 10\r\n"
                             b"\r\n")]
    assert b'"user":"u","pass":"p"' in got and b"SUB %s.* 1\r\n" % prefix in got
    assert (b'PUB $JS.API.CONSUMER.MSG.NEXT.S.archiver %s.3 54\r\n{"batch":100,"max_bytes":'
            b'1048576,"expires":5000000000}\r\n' % prefix) in got
    assert b"PUB $JS.ACK.S.archiver.1.9.9.1.0 4\r\n+ACK\r\n" in got


def test_a_refused_login_is_an_error_that_says_why() -> None:
    async def run():
        with pytest.raises(PullError, match="the server refused: Authorization Violation"):
            await _connect(b"-ERR 'Authorization Violation'\r\n", [])
    asyncio.run(run())


def test_a_line_that_is_not_nats_closes_the_connection() -> None:
    async def run():
        server, srv, conn, msgs, _ = await _connect(b"PONG\r\n", [b"HELLO WORLD\r\n"])
        assert conn.closed is not None
        await asyncio.wait_for(asyncio.shield(conn.closed), 5)
        srv.close()
        return conn.error
    err = asyncio.run(run())
    assert isinstance(err, PullError) and "unexpected protocol line" in str(err)


# --- rows and the chain -----------------------------------------------------------------


def _event(i: int, pan: str = "476173******0119", ts: int | None = None) -> bytes:
    ts = ts or 1_795_000_000_000_000_000 + i * 1000  # whole µs: to_pylist gives datetimes
    return encode_parts(uuid7(ts // 1_000_000 * 1_000_000), ts, "acq:x", "iso8583.txn",
                        {"de39": "00"},
                        {"mti": "0100", "pan": pan, "pcode": "000000", "amount": "000000001000",
                         "currency": "978", "stan": f"{i:06d}", "terminal": "T1",
                         "de39": "00", "outcome": "answered", "issuer": "a", "route": "visa",
                         "latency_us": 250 + i})


def test_a_batch_chains_flattens_and_masks() -> None:
    b = Batch("r1", "TXN", GENESIS)
    raws = [_event(1), _event(2, pan="4111111111111111"), b"not a frame"]
    for i, raw in enumerate(raws, start=1):
        b.add(i, 100 + i, raw)
    h = GENESIS
    for raw, got in zip(raws, b.chains):
        h = chain_next(h, raw)
        assert got == h == hashlib.sha256(got and h).digest() or got == h
    assert b.head == h
    t = b.table().to_pylist()
    assert [r["seq"] for r in t] == [1, 2, 3] and [r["hub_seq"] for r in t] == [101, 102, 103]
    assert t[0]["amount"] == 1000 and t[0]["latency_us"] == 251 and t[0]["pcode"] == "000000"
    assert t[0]["stan"] == "000001" and t[0]["kind"] == "iso8583.txn"
    assert t[1]["pan"] == "411111******1111" and b.clear_pans == 1
    assert t[2]["kind"] == "" and t[2]["event_id"] is None and b.undecodable == 1
    assert [r["cbor"] for r in t] == raws  # the bytes as stored


def test_split_keeps_the_chain_whole() -> None:
    b = Batch("r", "S", GENESIS)
    for i in range(5):
        b.add(i + 1, 0, _event(i))
    chains = list(b.chains)
    first = b.split(2)
    assert first.seqs == [1, 2] and b.seqs == [3, 4, 5]
    assert first.prev == GENESIS and first.head == chains[1] == b.prev
    assert b.head == chains[4]


@pytest.mark.parametrize("pan, out, clear", [
    ("4111111111111111", "411111******1111", True),
    ("411111******1111", "411111******1111", False),
    ("12345", "12345", False),
    ("", "", False),
])
def test_masked(pan: str, out: str, clear: bool) -> None:
    assert masked(pan) == (out, clear)


# --- the chain index: crash windows, compaction, retention ---------------------------


def _part(root: Path, index: ChainIndex, first: int, last: int, hour: int = 8,
          day: str = "2026-11-28") -> PartEntry:
    b = Batch(index.rack, index.stream, bytes.fromhex(index.head))
    for s in range(first, last + 1):
        b.add(s, s, _event(s))
    rel = f"{index.stream}/rack={index.rack}/date={day}/hour={hour:02d}/part-{first}-{last}.parquet"
    e = PartEntry(path=rel, first=first, last=last, count=len(b), prev=b.prev.hex(),
                  head=b.head.hex(), hub_last=last)
    write_tmp(root, rel, b.table(), {"stream": index.stream, "rack": index.rack,
                                     "first": first, "last": last, "count": len(b),
                                     "prev": e.prev, "head": e.head})
    return e


def _commit(root: Path, index: ChainIndex, e: PartEntry, rename: bool = True) -> None:
    index.parts.append(e)
    index.pending = [e.path]
    index.start_seq = index.start_seq or e.first
    index.last, index.head, index.hub_last = e.last, e.head, e.hub_last
    save_index(root, index)
    if rename:
        promote(root / e.path)


def test_recover_renames_a_listed_part_and_deletes_an_unlisted_one(tmp_path: Path) -> None:
    index = ChainIndex(stream="TXN", rack="r")
    _commit(tmp_path, index, _part(tmp_path, index, 1, 10))
    listed = _part(tmp_path, index, 11, 20)
    _commit(tmp_path, index, listed, rename=False)  # crash after the index, before rename
    stray = _part(tmp_path, index, 21, 30)  # crash before the index: never promised
    again = load_index(tmp_path, "TXN", "r")
    done = recover(tmp_path, again)
    assert f"renamed {listed.path}" in done and any("deleted unlisted" in d for d in done)
    assert (tmp_path / listed.path).exists() and not tmp_of(tmp_path / listed.path).exists()
    assert not tmp_of(tmp_path / stray.path).exists() and not (tmp_path / stray.path).exists()
    assert again.last == 20 and again.pending == []
    assert load_index(tmp_path, "TXN", "r").pending == []  # saved
    assert recover(tmp_path, again) == []  # idempotent


def test_recover_says_when_a_listed_part_is_gone_with_its_temporary_file(tmp_path: Path) -> None:
    from mixer.auditfiles import AuditFileError

    index = ChainIndex(stream="TXN", rack="r")
    e = _part(tmp_path, index, 1, 5)
    _commit(tmp_path, index, e, rename=False)
    os.unlink(tmp_of(tmp_path / e.path))
    with pytest.raises(AuditFileError, match="neither it nor its temporary file exists"):
        recover(tmp_path, load_index(tmp_path, "TXN", "r"))


def test_compaction_merges_keeps_the_chain_and_a_crash_midway_is_completed(
        tmp_path: Path) -> None:
    index = ChainIndex(stream="TXN", rack="r")
    for a in range(1, 40, 10):
        _commit(tmp_path, index, _part(tmp_path, index, a, a + 9))
    before = pq.read_table(tmp_path / "TXN").sort_by("seq").column("chain").to_pylist()
    entry = compact(tmp_path, index, list(index.parts))
    assert [p.path for p in index.parts] == [entry.path] and entry.count == 40
    assert sorted(p.name for p in (tmp_path / "TXN").rglob("*.parquet")) == ["part-1-40.parquet"]
    after = pq.read_table(tmp_path / entry.path)
    assert after.column("chain").to_pylist() == before
    assert part_meta(tmp_path / entry.path)["head"] == index.head
    # a crash after the index named the merge, before the old parts were deleted
    index2 = ChainIndex(stream="TXN", rack="q")
    olds = []
    for a in (1, 11):
        e = _part(tmp_path, index2, a, a + 9)
        _commit(tmp_path, index2, e)
        olds.append(e)
    merged = compact(tmp_path, index2, list(olds))
    for e in olds:  # put the old parts back as the crash would have left them
        (tmp_path / e.path).write_bytes((tmp_path / merged.path).read_bytes())
    index2.compacting = {"into": merged.path, "parts": [e.path for e in olds],
                         "entry": merged.as_json()}
    save_index(tmp_path, index2)
    again = load_index(tmp_path, "TXN", "q")
    assert any("completed compaction" in d for d in recover(tmp_path, again))
    assert [p.path for p in again.parts] == [merged.path] and again.compacting is None
    assert not any((tmp_path / e.path).exists() for e in olds)


def test_retention_cuts_a_prefix_of_whole_days() -> None:
    index = ChainIndex(stream="TXN", rack="r")
    days = ["2026-11-01", "2026-11-01", "2026-11-02", "2026-11-01", "2026-11-03"]
    for i, d in enumerate(days):
        index.parts.append(PartEntry(path=f"TXN/rack=r/date={d}/hour=00/part-{i}.parquet",
                                     first=i * 10 + 1, last=i * 10 + 10, count=10,
                                     prev=f"{i:064x}", head=f"{i + 1:064x}"))
    parts, cut = retention_cut(index, "2026-11-03")
    # the 11-01 part after an 11-02 one goes too: a prefix of the chain up to the keep day
    assert [p.first for p in parts] == [1, 11, 21, 31]
    assert cut["through"] == 40 and cut["head"] == f"{4:064x}" and cut["rows"] == 40
    assert cut["dates"] == ["2026-11-01", "2026-11-02"]
    parts, cut = retention_cut(index, "2026-11-02")
    assert [p.first for p in parts] == [1, 11] and cut["through"] == 20
    assert retention_cut(index, "2026-10-31") is None


def test_an_index_of_another_version_is_refused_with_its_path(tmp_path: Path) -> None:
    from mixer.auditfiles import AuditFileError, index_path

    p = index_path(tmp_path, "TXN", "r")
    p.parent.mkdir(parents=True)
    p.write_bytes(orjson.dumps({"version": 99}))
    with pytest.raises(AuditFileError, match=f"{p}: unknown chain index version 99"):
        load_index(tmp_path, "TXN", "r")


def _archiver(tmp_path: Path, **settings: object):
    from mixer.archiver import Archiver, ArchiverPlan, Source
    from mixer.settings import AuditSettings

    arch = Archiver(ArchiverPlan(data_dir=str(tmp_path), hub_url="nats://127.0.0.1:1",
                                 user="archiver", password="x",
                                 settings=AuditSettings(**settings)))  # type: ignore[arg-type]
    index = ChainIndex(stream="TXN", rack="r")
    src = Source(n=0, rack="r", stream="TXN", js_stream="TXN_r", index=index,
                 batch=Batch("r", "TXN", GENESIS))
    return arch, src


def test_retention_deletes_old_days_records_the_cut_and_verify_still_passes(
        tmp_path: Path) -> None:
    from mixer.auditverify import ok, verify

    arch, src = _archiver(tmp_path, retention_days=1)
    root = arch.root
    for first, day in ((1, "2026-11-20"), (11, "2026-11-20"), (21, "2026-11-21"),
                       (31, "2026-11-27")):
        _commit(root, src.index, _part(root, src.index, first, first + 9, day=day))
    arch.retain(src, "2026-11-21")
    assert not (root / "TXN" / "rack=r" / "date=2026-11-20").exists()  # the whole day
    assert [p.first for p in src.index.parts] == [21, 31]
    (cut,) = load_index(root, "TXN", "r").cuts
    assert cut["through"] == 20 and cut["dates"] == ["2026-11-20"] and cut["rows"] == 20
    reports = verify(root)
    assert ok(reports) and reports[0].first == 21 and reports[0].rows == 20


def test_housekeeping_compacts_closed_hours_only(tmp_path: Path) -> None:
    arch, src = _archiver(tmp_path, compact_after=0.0)
    root = arch.root
    for first in (1, 11, 21):
        _commit(root, src.index, _part(root, src.index, first, first + 9, hour=3,
                                       day="2026-11-20"))
    arch.compact_source(src)
    assert [(p.first, p.last, p.count) for p in src.index.parts] == [(1, 30, 30)]
    from mixer.auditverify import ok, verify
    assert ok(verify(root))
    arch2, src2 = _archiver(tmp_path / "b", compact_after=3600.0)
    for first in (1, 11):
        _commit(arch2.root, src2.index, _part(arch2.root, src2.index, first, first + 9))
    arch2.compact_source(src2)  # written just now: left alone
    assert len(src2.index.parts) == 2


@pytest.mark.parametrize("header, owed", [
    (b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1500\r\n"
     b"Nats-Pending-Bytes: 0\r\n\r\n", 1500),
    (b"NATS/1.0 409 Exceeded MaxWaiting\r\n\r\n", None),
])
def test_pending_messages(header: bytes, owed: int | None) -> None:
    from mixer.jspull import pending_messages

    assert pending_messages(header) == owed


def test_a_batch_completed_status_keeps_what_the_next_request_owes(tmp_path: Path) -> None:
    """nats-server says ``409 Batch Completed`` when a pull was served whole; taking it as
    "nothing more will come" zeroed the count of the request sent at half-way, so requests
    piled up until the server cut the archiver off as a slow consumer (MaxPending)."""
    arch, src = _archiver(tmp_path)
    arch.sources.append(src)
    src.asked = 2000
    arch.on_status(0, b"NATS/1.0 409 Batch Completed\r\n\r\n")
    assert src.asked == 2000
    arch.on_status(0, b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1500\r\n\r\n")
    assert src.asked == 500
    arch.on_status(0, b"NATS/1.0 409 Exceeded MaxWaiting\r\n\r\n")
    assert src.asked == 0



def test_an_idle_archiver_notices_its_writer_died(tmp_path: Path) -> None:
    """A dead writer used to be found only at the next write: an archiver with nothing to
    write went on as if it could (a CI run saw it never restart)."""
    import signal
    import time

    import psutil

    from mixer.archiver import Archiver, ArchiverPlan, _writer_ready, writer_pool
    from mixer.settings import AuditSettings

    arch = Archiver(ArchiverPlan(data_dir=str(tmp_path), hub_url="nats://127.0.0.1:1",
                                 user="archiver", password="x", settings=AuditSettings()),
                    writer_pool())
    try:
        assert arch.writer.submit(_writer_ready).result(30) is True
        (child,) = [p for p in psutil.Process().children() if p.is_running()]
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while arch.failed is None and time.monotonic() < deadline:
            arch._probed = 0.0  # probe at every tick here
            arch.tick()
            time.sleep(0.05)  # the pool's own thread notices the death: no event to await
        assert arch.failed is not None and "the writer process is gone" in arch.failed
        assert arch.lost.is_set()
    finally:
        arch.writer.shutdown(wait=False)
