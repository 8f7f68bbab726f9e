"""The archiver's crash safety (``mixer.auditfiles``' theory of operation), against a real
nats-server, real Parquet files and — for the bar the issue set — a real forked archiver
process killed with SIGKILL:

* 200,000 events streamed while the archiver is SIGKILLed 20 times at random points (and
  right after a part's temporary file, the index or a part appears): nothing lost, nothing
  twice, the chain recomputed here from the stored bytes, ``mixer audit verify`` happy;
* each crash window built by hand from what a crash leaves (a temporary part not listed, a
  listed part not renamed, a renamed part not acked, a hub copy made again) and recovered by
  a fresh archiver: exactly once;
* a hub copy holding one rack sequence twice (the hub does not de-duplicate sourced
  messages): each archived once, the first copy's bytes, the others counted and acked.

The random test prints its seed; ``AUDIT_CRASH_SEED=<n>`` replays a run's kill points.

Regression tests for holes found here: a hub copy made again that is already longer than
the archive's hub sequence; the index's temporary file a kill leaves; parts a crash leaves
after compaction or retention saved the index.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import orjson
import pyarrow.parquet as pq
import pytest
from auditparts import write_chain
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig, StreamSource

from engine.bus import BusUser
from engine.cbor import loads
from engine.frame import encode_parts, uuid7
from engine.natsd import NatsServer
from mixer.archiver import Archiver, ArchiverPlan, DirectSource, Source, archiver_main
from mixer.auditfiles import (
    AUDIT_DIR,
    ChainIndex,
    compact,
    index_path,
    load_index,
    recover,
    tmp_of,
)
from mixer.auditrow import Batch
from mixer.auditverify import verify
from mixer.jspull import PullConnection, ack_fields
from mixer.settings import AuditSettings

FORK = multiprocessing.get_context("fork")
USER, PASSWORD = "archiver", "pw"
RACK, STREAM = "a", "TXN"
SETTINGS = AuditSettings(flush_rows=3000, flush_after=0.2, compact_after=0)
GENESIS = bytes(32)


# --- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path):
    """A real nats-server (JetStream) with the archiver's user; stopped afterwards."""
    server = NatsServer(rack_id="hubtest", data_dir=tmp_path / "nats", host="127.0.0.1",
                        port=0, users=[BusUser(name=USER, password=PASSWORD)])
    server.start()
    yield server
    server.stop()


def frame(n: int, **extra: object) -> bytes:
    """One small ISO 8583 event (~160 B) numbered ``n``."""
    ts = time.time_ns()
    body = {"n": n, "mti": "0100", "pcode": "000000", "amount": 1234, "de39": "00",
            "stan": f"{n % 1_000_000:06d}", "latency_us": 321, **extra}
    return encode_parts(uuid7(ts), ts, "test", "iso8583.txn", {}, body)


def plan_for(tmp_path: Path, url: str, js_stream: str = "TXN_a", stream: str = STREAM,
             settings: AuditSettings = SETTINGS) -> ArchiverPlan:
    """An archiver plan reading ``js_stream`` as rack ``a``'s ``stream``."""
    return ArchiverPlan(data_dir=str(tmp_path / "hubdata"), hub_url=url, user=USER,
                        password=PASSWORD, settings=settings, discover=False,
                        direct=(DirectSource(rack=RACK, stream=stream, js_stream=js_stream),))


async def _connect(url: str) -> nats.NATS:
    return await nats.connect(url, user=USER, password=PASSWORD)


async def make_streams(url: str) -> None:
    """``SRC_a`` (the rack's stream) and ``TXN_a`` sourcing it (the hub's copy: every
    message carries ``Nats-Stream-Source``)."""
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="SRC_a", subjects=["src.a"]))
        await js.add_stream(StreamConfig(name="TXN_a", sources=[StreamSource(name="SRC_a")]))
    finally:
        await nc.close()


async def publish(url: str, frames: list[bytes], subject: str = "src.a") -> None:
    """Publish ``frames`` (core publish, a flush every few thousand)."""
    nc = await _connect(url)
    try:
        for i, f in enumerate(frames):
            await nc.publish(subject, f)
            if i % 4000 == 3999:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()


async def wait_stream(url: str, stream: str, last_seq: int, timeout: float = 30.0) -> None:
    """Poll until ``stream`` holds ``last_seq`` (a source copies in its own time)."""
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while (st := (await js.stream_info(stream)).state).last_seq < last_seq:
            assert time.monotonic() < deadline, f"{stream}: last_seq={st.last_seq}"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def rows(data_dir: Path, stream: str = STREAM) -> list[dict]:
    """Every archived row of rack ``a``'s ``stream`` read with pyarrow, in seq order."""
    out: list[dict] = []
    for f in sorted((data_dir / AUDIT_DIR / stream / f"rack={RACK}").rglob("part-*.parquet")):
        out += pq.read_table(f, columns=["event_id", "seq", "hub_seq", "cbor",
                                         "chain"]).to_pylist()
    return sorted(out, key=lambda r: r["seq"])


def index_doc(data_dir: Path, stream: str = STREAM) -> dict:
    """The chain index as stored."""
    return orjson.loads(index_path(data_dir / AUDIT_DIR, stream, RACK).read_bytes())


def temp_files(data_dir: Path) -> list[Path]:
    """Every temporary file left in the archive (parts and the chain index)."""
    return sorted((data_dir / AUDIT_DIR).rglob("*.tmp"))


def assert_exactly_once(got: list[dict], frames: list[bytes]) -> None:
    """Rack seq ``i + 1`` holds ``frames[i]``, each once, and the stored chain is SHA-256
    over the bytes in seq order from 32 zero bytes (computed here, not by our code)."""
    seqs = [r["seq"] for r in got]
    dupes = [s for s, c in Counter(seqs).items() if c > 1]
    assert not dupes, f"seqs archived twice: {dupes[:10]} ({len(dupes)} in all)"
    assert seqs == list(range(1, len(frames) + 1)), \
        f"missing: {sorted(set(range(1, len(frames) + 1)) - set(seqs))[:10]}"
    assert [r["cbor"] for r in got] == frames
    assert {r["event_id"] for r in got} == {loads(f)["id"].hex() for f in frames}
    h = GENESIS
    for r in got:
        h = hashlib.sha256(h + r["cbor"]).digest()
        assert r["chain"] == h, f"chain breaks at seq {r['seq']}"


async def drive(plan: ArchiverPlan, done: Callable[[Archiver], bool],
                timeout: float = 30.0) -> Archiver:
    """Run an ``Archiver`` in this process as ``archiver_main`` does (hub connection, pull
    connection, ``discover``: recovery, then the consumer after the archive), ticking until
    ``done``; then write what waits and close. Returns it for its counters."""
    arch = Archiver(plan)
    arch.nc = await _connect(plan.hub_url)
    conn = PullConnection(arch.on_message, arch.on_status)
    port = int(plan.hub_url.rsplit(":", 1)[1])
    try:
        await conn.open("127.0.0.1", port, USER, PASSWORD, "test-archiver")
        arch.conn = conn
        await arch.discover()
        deadline = time.monotonic() + timeout
        while not done(arch):
            s = arch.sources[0]
            assert time.monotonic() < deadline, \
                f"archiver stalled: last={s.index.last}, copies={s.copies}, taken={s.taken}"
            arch.tick()
            await asyncio.sleep(0.02)
        await arch.drain()
    finally:
        conn.close()
        await arch.nc.close()
    return arch


def through(last: int, hub_last_seq: int) -> Callable[[Archiver], bool]:
    """Done when ``last`` is archived and the delivery of hub seq ``hub_last_seq`` (maybe a
    copy) was handled and acked."""
    def check(arch: Archiver) -> bool:
        s = arch.sources[0]
        return (s.index.last >= last and not s.batch.seqs and not s.ack_due
                and bool(s.last_reply) and ack_fields(s.last_reply)[0] >= hub_last_seq)
    return check


# --- 1. the bar: 20 SIGKILLs during 200,000 events ----------------------------------

N_EVENTS = 200_000
KILLS = 20
PUBLISH_SECONDS = 7.0  # spread the stream over the kill phase


def _publisher_child(url: str, frames: list[bytes]) -> None:
    async def run() -> None:
        nc = await _connect(url)
        t0 = time.monotonic()
        chunk = 2000
        for i in range(0, len(frames), chunk):
            for f in frames[i:i + chunk]:
                await nc.publish("src.a", f)
            await nc.flush()
            ahead = t0 + PUBLISH_SECONDS * (i + chunk) / len(frames) - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)  # pacing the stream, not synchronisation
        await nc.close()
    asyncio.run(run())


def _archiver_child(plan: ArchiverPlan, log_file: str) -> None:
    logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                        format=f"%(asctime)s {os.getpid()} %(levelname)s %(message)s")
    asyncio.run(archiver_main(plan, None, "archiver"))


def _new_file(rack_dir: Path, pattern: str, seen: set[str], deadline: float) -> bool:
    """Poll (tightly: the windows are milliseconds) until a file matching ``pattern`` not
    in ``seen`` appears; False at ``deadline``."""
    while time.monotonic() < deadline:
        if any(p.name not in seen for p in rack_dir.glob(f"*/*/{pattern}")):
            return True
        time.sleep(0.0003)
    return False


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return 0


def _new_index(path: Path, ino: int, deadline: float) -> bool:
    """Poll until the chain index is replaced (a new inode: ``replace_file``)."""
    while time.monotonic() < deadline:
        try:
            if path.stat().st_ino != ino:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0003)
    return False


def test_archiver_sigkilled_20_times_during_200k_events_loses_and_doubles_nothing(
        tmp_path, hub):
    seed = int(os.environ.get("AUDIT_CRASH_SEED", time.time_ns() % 2**32))
    print(f"\nAUDIT_CRASH_SEED={seed}")
    rng = random.Random(seed)
    t_start = time.monotonic()
    asyncio.run(make_streams(hub.url))
    frames = [frame(i) for i in range(N_EVENTS)]
    plan = plan_for(tmp_path, hub.url)
    data_dir = Path(plan.data_dir)
    rack_dir = data_dir / AUDIT_DIR / STREAM / f"rack={RACK}"
    index_file = index_path(data_dir / AUDIT_DIR, STREAM, RACK)
    log_file = str(tmp_path / "archiver.log")
    publisher = FORK.Process(target=_publisher_child, args=(hub.url, frames), daemon=True)
    archiver: multiprocessing.process.BaseProcess | None = None
    modes: Counter[str] = Counter()
    after: Counter[str] = Counter()
    killed: set[int] = set()
    try:
        publisher.start()
        for _ in range(KILLS):
            mode = rng.choices(["delay", "tmp", "index", "part"], [4, 2, 2, 2])[0]
            seen = {p.name for p in rack_dir.glob("*/*/*")}
            ino = _inode(index_file)
            archiver = FORK.Process(target=_archiver_child, args=(plan, log_file))  # (it has a writer child)
            archiver.start()
            deadline = time.monotonic() + 3.0
            if mode == "delay":
                time.sleep(rng.uniform(0.03, 0.4))  # the random kill point
            elif mode == "tmp":    # writing the part (or just after the index names it)
                mode += "" if _new_file(rack_dir, ".part-*.tmp", seen, deadline) else "-late"
            elif mode == "index":  # just after an index save: a flush's, before its rename
                mode += "" if _new_index(index_file, ino, deadline) else "-late"
            else:                  # between the rename and the ack
                mode += "" if _new_file(rack_dir, "part-*.parquet", seen, deadline) else \
                    "-late"
            assert archiver.pid is not None
            os.kill(archiver.pid, signal.SIGKILL)
            killed.add(archiver.pid)
            archiver.join()
            assert archiver.exitcode == -signal.SIGKILL, archiver.exitcode
            modes[mode] += 1
            tmps = list(rack_dir.glob("*/*/.part-*.tmp"))
            pending = set(index_doc(data_dir)["pending"]) if index_file.exists() else set()
            listed = {str(tmp_of(Path(p)).name) for p in pending}
            if not tmps:
                after["no temp part"] += 1
            elif any(t.name in listed for t in tmps):
                after["temp part listed, not renamed"] += 1
            else:
                after["temp part not listed (mid-write)"] += 1
        publisher.join(60)
        assert publisher.exitcode == 0
        kills_done = time.monotonic()
        asyncio.run(wait_stream(hub.url, "TXN_a", N_EVENTS))
        archiver = FORK.Process(target=_archiver_child, args=(plan, log_file))  # (it has a writer child)
        archiver.start()
        deadline = time.monotonic() + 90
        while not (index_file.exists() and index_doc(data_dir)["last"] >= N_EVENTS):
            assert time.monotonic() < deadline, f"not all archived: {index_doc(data_dir)}"
            assert archiver.is_alive(), Path(log_file).read_text()[-3000:]
            time.sleep(0.1)
        drained = time.monotonic()
        assert archiver.pid is not None
        os.kill(archiver.pid, signal.SIGTERM)
        archiver.join(5)
        assert archiver.exitcode == 0, Path(log_file).read_text()[-3000:]
    finally:
        for p in (publisher, archiver):
            if p is not None and p.is_alive():
                p.kill()
                p.join()
    mid_write = after["temp part listed, not renamed"] + after["temp part not listed (mid-write)"]
    print(f"kills={sum(modes.values())}, modes={dict(modes)}, state after kill={dict(after)}, "
          f"kills landing mid-write (a .tmp present)={mid_write}, "
          f"kill phase={kills_done - t_start:.1f}s, drain={drained - kills_done:.1f}s")
    assert sum(modes.values()) == KILLS
    assert temp_files(data_dir) == []  # (an index write a kill cut is cleaned up too)
    doc = index_doc(data_dir)
    assert doc["last"] == N_EVENTS and doc["gaps"] == [] and doc["start_seq"] == 1
    got = rows(data_dir)
    assert_exactly_once(got, frames)
    assert doc["head"] == got[-1]["chain"].hex()
    on_disk = {str(p.relative_to(data_dir / AUDIT_DIR)) for p in rack_dir.rglob("*.parquet")}
    assert on_disk == {p["path"] for p in doc["parts"]}
    verified = subprocess.run([sys.executable, "-m", "mixer", "audit", "verify",
                               str(data_dir), "--no-ask"], capture_output=True, text=True,
                              timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{STREAM} rack={RACK}: {N_EVENTS} events" in verified.stdout
    print(f"total={time.monotonic() - t_start:.1f}s, parts={len(doc['parts'])}")


# --- 2. each crash window, built by hand and recovered ---------------------------------------

N_FIRST, N_MORE = 10_000, 500


def _undo_last_part(data_dir: Path) -> tuple[dict, Path]:
    """The index as it was before the last part was listed (what the previous flush left);
    returns the last part's entry and path."""
    doc = index_doc(data_dir)
    last = doc["parts"].pop()
    prev = doc["parts"][-1]
    doc.update(last=prev["last"], head=prev["head"], hub_last=prev["hub_last"],
               pending=[prev["path"]])
    index_path(data_dir / AUDIT_DIR, STREAM, RACK).write_bytes(orjson.dumps(doc))
    return last, data_dir / AUDIT_DIR / last["path"]


@pytest.mark.parametrize("window", ["tmp-not-listed", "listed-not-renamed",
                                    "renamed-not-acked", "hub-copy-made-again"])
def test_a_crash_window_recovered_by_a_fresh_archiver_is_exactly_once(tmp_path, hub, window):
    first = [frame(i) for i in range(N_FIRST)]
    more = [frame(N_FIRST + i) for i in range(N_MORE)]
    plan = plan_for(tmp_path, hub.url)
    data_dir = Path(plan.data_dir)

    async def scenario() -> Archiver:
        await make_streams(hub.url)
        await publish(hub.url, first)
        await wait_stream(hub.url, "TXN_a", N_FIRST)
        await drive(plan, through(N_FIRST, N_FIRST))
        doc = index_doc(data_dir)
        assert doc["last"] == N_FIRST and len(doc["parts"]) >= 3
        # what flush leaves: the part it listed is still named pending (cleared next save)
        assert doc["pending"] == [doc["parts"][-1]["path"]]
        hub_last = N_FIRST + N_MORE
        if window == "tmp-not-listed":
            # the crash came while the part was written: a half file, the index not told
            last, path = _undo_last_part(data_dir)
            data = path.read_bytes()
            path.unlink()
            tmp_of(path).write_bytes(data[:len(data) // 2])
        elif window == "listed-not-renamed":
            last = doc["parts"][-1]
            path = data_dir / AUDIT_DIR / last["path"]
            os.rename(path, tmp_of(path))
        elif window == "renamed-not-acked":
            # files and index whole; the consumer still holds every delivery unacked
            nc = await _connect(hub.url)
            js = nc.jetstream()
            await js.delete_consumer("TXN_a", "archiver")
            await js.add_consumer("TXN_a", ConsumerConfig(
                durable_name="archiver", ack_policy=AckPolicy.ALL, ack_wait=30.0,
                max_ack_pending=2 * N_FIRST))
            sub = await js.pull_subscribe_bind("archiver", "TXN_a")
            got = 0
            while got < N_FIRST:
                got += len(await sub.fetch(4000, timeout=5))
            info = await js.consumer_info("TXN_a", "archiver")
            assert info.num_ack_pending == N_FIRST
            await nc.close()
        else:
            # the hub copy made again while the archiver was down, from the rack's 5001:
            # shorter than the archive's hub sequence, so it is read whole, copies skipped
            nc = await _connect(hub.url)
            js = nc.jetstream()
            await js.delete_stream("TXN_a")
            await js.add_stream(StreamConfig(name="TXN_a", sources=[
                StreamSource(name="SRC_a", opt_start_seq=5001)]))
            await nc.close()
            await wait_stream(hub.url, "TXN_a", N_FIRST - 5000)
            hub_last = N_FIRST - 5000 + N_MORE
        await publish(hub.url, more)
        await wait_stream(hub.url, "TXN_a", hub_last)
        arch = await drive(plan, through(N_FIRST + N_MORE, hub_last))
        if window == "tmp-not-listed":
            assert not tmp_of(path).exists()
            assert arch.sources[0].taken == last["count"] + N_MORE  # archived again
        elif window == "listed-not-renamed":
            assert path.exists() and not tmp_of(path).exists()
        return arch

    arch = asyncio.run(scenario())
    s = arch.sources[0]
    assert s.gaps == 0
    if window == "hub-copy-made-again":
        assert s.copies == N_FIRST - 5000  # every redelivered event skipped
    else:
        assert s.copies == 0
    if window != "tmp-not-listed":
        assert s.taken == N_MORE
    assert temp_files(data_dir) == []
    doc = index_doc(data_dir)
    assert doc["last"] == N_FIRST + N_MORE and doc["gaps"] == []
    assert_exactly_once(rows(data_dir), first + more)
    reports = verify(data_dir / AUDIT_DIR)
    assert [r.findings for r in reports] == [[]]


# --- 3. a hub copy holding a rack sequence twice ---------------------------------------------

async def reset_source(url: str, filter_subject: str, start: int) -> None:
    """Reset ``TXN_a``'s source the way the hub may (a new filter is a new source to the
    server): it copies the rack's stream again from ``start``, whatever it holds already.
    (A client cannot forge ``Nats-Stream-Source``: nats-server refuses such a publish with
    err_code 10227, "message stream source header is not allowed".)"""
    nc = await _connect(url)
    try:
        await nc.jetstream().update_stream(StreamConfig(name="TXN_a", sources=[
            StreamSource(name="SRC_a", filter_subject=filter_subject, opt_start_seq=start)]))
    finally:
        await nc.close()


def test_a_rack_sequence_held_twice_by_the_hub_is_archived_once(tmp_path, hub):
    events = [frame(i) for i in range(11)]  # rack seq i + 1
    # flush_rows=3: copies come with rows waiting and with none (only an ack is due)
    settings = AuditSettings(flush_rows=3, flush_after=0.2, compact_after=0)
    plan = plan_for(tmp_path, hub.url, settings=settings)
    data_dir = Path(plan.data_dir)

    async def scenario() -> tuple[Archiver, Archiver, object, list[str]]:
        await make_streams(hub.url)
        await publish(hub.url, events[:8])                 # hub 1-8: rack 1-8
        await wait_stream(hub.url, "TXN_a", 8)
        await reset_source(hub.url, "src.a", 3)            # hub 9-14: rack 3-8 again
        await wait_stream(hub.url, "TXN_a", 14)
        await publish(hub.url, events[8:10])               # hub 15-16: rack 9-10
        await wait_stream(hub.url, "TXN_a", 16)
        await reset_source(hub.url, "src.*", 10)           # hub 17: rack 10 again, last
        await wait_stream(hub.url, "TXN_a", 17)
        one = await drive(plan, through(10, 17))
        await publish(hub.url, events[10:])                # hub 18: rack 11
        await wait_stream(hub.url, "TXN_a", 18)
        await reset_source(hub.url, "src.>", 9)            # hub 19-21: rack 9-11 again
        await wait_stream(hub.url, "TXN_a", 21)
        # a fresh archiver starts after hub 16 (the last one written): hub 17 comes again
        two = await drive(plan, through(11, 21))
        nc = await _connect(hub.url)
        js = nc.jetstream()
        info = await js.consumer_info("TXN_a", "archiver")
        sub = await js.pull_subscribe("", durable="check", stream="TXN_a")
        headers = [m.headers["Nats-Stream-Source"] for m in await sub.fetch(21, timeout=5)]
        await nc.close()
        return one, two, info, headers

    one, two, info, headers = asyncio.run(scenario())
    # the hub copy really holds rack seqs twice (the header's second token)
    assert [int(h.split()[1]) for h in headers] == \
        [1, 2, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 9, 10, 11]
    assert (one.sources[0].taken, one.sources[0].copies) == (10, 7)
    assert (two.sources[0].taken, two.sources[0].copies) == (1, 4)
    assert one.sources[0].gaps == two.sources[0].gaps == 0
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 21  # copies acked too
    got = rows(data_dir)
    assert_exactly_once(got, events)
    assert [r["hub_seq"] for r in got] == [1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 18]  # the first
    assert temp_files(data_dir) == []
    assert [r.findings for r in verify(data_dir / AUDIT_DIR)] == [[]]


# --- a hub copy made again that is already past the archive's hub seq -----------------------

def test_a_hub_copy_made_again_past_the_archived_hub_seq_is_archived_whole(tmp_path, hub):
    first = [frame(i) for i in range(N_FIRST)]
    more = [frame(N_FIRST + i) for i in range(6000)]
    plan = plan_for(tmp_path, hub.url)
    data_dir = Path(plan.data_dir)

    async def scenario() -> Archiver:
        await make_streams(hub.url)
        await publish(hub.url, first)
        await wait_stream(hub.url, "TXN_a", N_FIRST)
        await drive(plan, through(N_FIRST, N_FIRST))
        nc = await _connect(hub.url)
        js = nc.jetstream()
        await js.delete_stream("TXN_a")  # made again from what the rack still holds
        await js.add_stream(StreamConfig(name="TXN_a", sources=[
            StreamSource(name="SRC_a", opt_start_seq=5001)]))
        await nc.close()
        await publish(hub.url, more)     # the copy: hub 1-11000 = rack 5001-16000
        await wait_stream(hub.url, "TXN_a", 11_000)
        return await drive(plan, through(N_FIRST + 6000, 11_000))

    arch = asyncio.run(scenario())
    assert arch.sources[0].gaps == 0, index_doc(data_dir)["gaps"]
    assert_exactly_once(rows(data_dir), first + more)


# --- files a crash leaves that recovery cleans up ------------------------------------------

def write_parts(root: Path, parts: int, rows_each: int, ts_ns: int) -> ChainIndex:
    """Parts of rack ``a``'s ``TXN`` at ``ts_ns``, written in ``Archiver.flush``'s order
    (temporary file, index, rename)."""
    return write_chain(root, STREAM, RACK, [[frame(p * rows_each + i + 1)
                                             for i in range(rows_each)]
                                            for p in range(parts)], ts_ns)


def test_an_index_temp_file_left_by_a_kill_is_removed_at_restart(tmp_path):
    root = tmp_path / AUDIT_DIR
    index = write_parts(root, 2, 10, time.time_ns())
    left = index_path(root, STREAM, RACK).with_name(f".{RACK}.json.4242.tmp")
    left.write_bytes(orjson.dumps(index.as_json())[:50])  # killed while writing it
    recover(root, load_index(root, STREAM, RACK))  # what a fresh archiver does first
    assert not left.exists()


@pytest.mark.parametrize("job", ["compaction", "retention"])
def test_parts_a_crash_left_after_compaction_or_retention_are_gone_after_recovery(
        tmp_path, job):
    from mixer.auditquery import open_views, run_query

    root = tmp_path / AUDIT_DIR
    index = write_parts(root, 3, 10, time.time_ns() - 3 * 3600 * 10**9)  # a closed hour
    saved = {p.path: (root / p.path).read_bytes() for p in index.parts}
    if job == "compaction":
        compact(root, index, list(index.parts))
    else:
        plan = ArchiverPlan(data_dir=str(tmp_path), hub_url="nats://127.0.0.1:1", user=USER,
                            password=PASSWORD, settings=SETTINGS, discover=False)
        source = Source(n=0, rack=RACK, stream=STREAM, js_stream="TXN_a", index=index,
                        batch=Batch(RACK, STREAM, bytes.fromhex(index.head)))
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
        Archiver(plan).retain(source, tomorrow)
    for rel, data in saved.items():  # the crash: after the index save, before the unlinks
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    recover(root, load_index(root, STREAM, RACK))
    findings = [f.line() for r in verify(root) for f in r.findings]
    _, ((n, distinct),) = run_query(open_views(root), "select count(*), count(distinct seq) "
                                    "from events")
    assert findings == []
    assert n == distinct == (30 if job == "compaction" else 0)
