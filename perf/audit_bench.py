"""Audit trail (Mixer II): the archiver's throughput against a plain nats-py archiver, what the
archive costs on disk against JetStream, and how fast DuckDB answers over it.

    python -m perf.audit_bench [--quick] [--events N] [--json PATH] [--profile]
                               [--cache DIR] [--query-events N] [--experiments]

1. Throughput. A real nats-server (``engine.natsd.NatsServer``, one user ``archiver``);
   stream ``SRC_a`` (subject ``src.a``) and ``TXN_a`` *sourcing* it, so every message of
   ``TXN_a`` carries ``Nats-Stream-Source`` exactly like the hub's copy of a rack's stream.
   ``SRC_a`` is filled with N ISO 8583 transaction events (deterministic-CBOR frames, kind
   ``iso8583.txn``, masked PAN, 12-digit amount...; ``HPUB`` with ``Nats-Msg-Id`` over a raw
   socket, the stream's ack awaited once per 5,000); once ``TXN_a`` holds N:

   * ours: ``mixer.archiver.archiver_main`` in this process (``DirectSource`` on ``TXN_a``,
     ``flush_rows`` 50,000, ``flush_after`` 1 s), timed from its start until its chain index
     says the N-th event is archived; the process's CPU time (the event loop, pyarrow's
     threads) and the server's over the same span;
   * baseline: ``perf/baselines/nats_archiver.py`` (nats-py ``fetch(1000)``, a dict per row,
     ``pa.Table.from_pylist``, a zstd file per batch, ``await m.ack()`` per message) on the
     same stream with its own durable consumer;
   * our archive checked: rows = N, ``mixer.auditverify.verify`` clean (timed, rows/s).

2. Storage. Bytes of our archive per event; the same rows rewritten without the ``cbor``
   column (same writer options); the JetStream file store of ``TXN_a`` (``state.bytes`` and
   the stream directory's blocks on disk, as ``du``).

3. Query. An archive of ``--query-events`` (10,000,000) transactions over 2 racks and 10
   days, written with the archiver's own code (``Batch`` -> ``write_tmp`` -> ``promote``, a
   chain index per rack), one part per hour partition as compaction leaves it (~20,800 rows
   at 1M events a day), cached in ``--cache`` with a manifest (generated once, ~2 minutes on
   2 cores). Over ``mixer.auditquery.open_views``: a day's counts and amounts by rack and
   DE39, and the lookup of one transaction by day, STAN and terminal; best of 5 after one
   warm-up. ``--experiments`` (or a lookup over its bar) rewrites that day's parts with other
   Parquet options and times the lookup on each.

Bars (issue "Mixer II"): >= 60,000 events/s and >= 3x the baseline; archive <= 50% of
JetStream's bytes; the day's report <= 1 s; the lookup <= 200 ms. Prints a table, writes
JSON (``--json``, default ``perf/results/audit_bench.json``); exit 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import io
import json
import logging
import multiprocessing
import os
import platform
import pstats
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import orjson
import psutil  # type: ignore[import-untyped]
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from nats.js.api import StreamConfig, StreamSource

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (scripts/bench) as well as with -m
    sys.path.insert(0, str(ROOT))

from engine.bus import BusUser  # noqa: E402
from engine.egress import hpub  # noqa: E402
from engine.frame import encode_parts, frame_id_of, uuid7  # noqa: E402
from engine.natsd import NatsServer  # noqa: E402
from mixer.archiver import ArchiverPlan, DirectSource, archiver_main  # noqa: E402
from mixer.auditfiles import (  # noqa: E402
    AUDIT_DIR,
    ROW_GROUP,
    ChainIndex,
    PartEntry,
    hour_dir,
    load_index,
    part_name,
    promote,
    save_index,
    write_tmp,
)
from mixer.auditquery import open_views  # noqa: E402
from mixer.auditrow import GENESIS, SCHEMA, Batch  # noqa: E402
from mixer.auditverify import ok, verify  # noqa: E402
from mixer.settings import AuditSettings  # noqa: E402
from perf.baselines.nats_archiver import run_baseline  # noqa: E402

RATE_BAR = 60_000       # events/s archived
RATIO_BAR = 3.0         # ours / baseline
STORAGE_BAR = 0.5       # archive bytes / JetStream bytes
REPORT_BAR = 1.0        # s, one day's report over 10M events
LOOKUP_BAR = 0.2        # s, one transaction by day, STAN and terminal

KIND = "iso8583.txn"
STREAM = "TXN"
RACK = "a"
TERMINALS = 2000        # per rack; each keeps its own STAN counter
PUB_BATCH = 5000        # messages per write + PING
QUERY_EVENTS = 10_000_000
QUERY_DAYS = 10
QUERY_RACKS = ("a", "b")
QUERY_FIRST_DAY = "2026-11-01"
GEN_VERSION = 1         # bump when the generated archive changes shape
# the writer options of mixer.auditfiles.write_tmp, for the lookup experiments
DICT_COLS = ["rack", "stream", "kind", "src", "mti", "pcode", "currency", "de39", "outcome",
             "issuer", "route"]

ISSUERS = ("visa-eu", "mc-eu", "amex", "onus")
BINS = ("476173", "535310", "374245", "401288")
# DE39 and outcome, weighted by repetition: mostly approved
CODES = (("00", "approved"),) * 17 + (("05", "declined"), ("51", "declined"),
                                       ("91", "issuer_unavailable"))


def txn_frame(rng: random.Random, ts: int, src: str, terminal: str, stan: int) -> bytes:
    """One ISO 8583 transaction event as the switch would store it (masked PAN only)."""
    de39, outcome = CODES[rng.randrange(len(CODES))]
    k = rng.randrange(4)
    body = {"mti": "0110", "pan": f"{BINS[k]}******{rng.randrange(10000):04d}",
            "amount": f"{rng.randrange(100, 500_000):012d}", "currency": "978",
            "stan": f"{stan:06d}", "terminal": terminal, "de39": de39, "outcome": outcome,
            "issuer": ISSUERS[k], "latency_us": rng.randrange(300, 40_000)}
    return encode_parts(uuid7(ts), ts, src, KIND, {}, body)


def make_events(n: int, rack: str, start_ns: int, seed: int = 1) -> list[bytes]:
    """``n`` distinct transaction events of ``rack``, 2 ms apart from ``start_ns``."""
    rng = random.Random(seed)
    stans = [0] * TERMINALS
    out = []
    for i in range(n):
        t = rng.randrange(TERMINALS)
        stans[t] = stans[t] % 999_999 + 1
        out.append(txn_frame(rng, start_ns + i * 2_000_000, f"sw-{rack}",
                             f"T{rack.upper()}{t:06d}", stans[t]))
    return out


# --- 1. throughput --------------------------------------------------------------------------

async def _read_until(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      want: bytes) -> bytes:
    """Read protocol lines until one starting with ``want``; a ``MSG``'s payload, or the
    line. Answers the server's ``PING``\\ s."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("nats-server closed the publishing connection")
        if line.startswith(want):
            if want == b"MSG ":
                size = int(line.split()[-1])
                return (await reader.readexactly(size + 2))[:-2]
            return line
        if line.startswith(b"PING"):
            writer.write(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            raise ConnectionError(f"nats-server refused: {line.decode(errors='replace')}")


async def publish(host: str, port: int, user: str, password: str, subject: bytes,
                  frames: list[bytes]) -> float:
    """Publish ``frames`` into a new stream over a raw connection: ``HPUB`` with
    ``Nats-Msg-Id``, ``PUB_BATCH`` per write, the last of each asking for the stream's ack
    (messages without a reply that a busy stream cannot queue are dropped: waiting for the
    batch's last ack bounds its queue); seconds taken.

    Raises:
        RuntimeError: an ack says an error, or a sequence other than the batch's last.
    """
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    inbox = b"_INBOX.auditbench"
    try:
        await reader.readline()  # INFO
        creds = orjson.dumps({"verbose": False, "pedantic": False, "user": user,
                              "pass": password, "headers": True, "protocol": 1,
                              "name": "audit-bench-publisher", "lang": "python-raw"})
        writer.write(b"CONNECT " + creds + b"\r\nSUB " + inbox + b" 1\r\nPING\r\n")
        await _read_until(reader, writer, b"PONG")
        for i in range(0, len(frames), PUB_BATCH):
            chunk = frames[i:i + PUB_BATCH]
            last = chunk.pop()
            header = b"NATS/1.0\r\nNats-Msg-Id: " + frame_id_of(last).hex().encode() + \
                b"\r\n\r\n"
            writer.write(b"".join(hpub(subject, frame_id_of(f).hex().encode(), f)
                                  for f in chunk)
                         + b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                             subject, inbox, len(header), len(header) + len(last), header,
                             last))
            ack = orjson.loads(await _read_until(reader, writer, b"MSG "))
            if ack.get("error") or ack.get("seq") != i + len(chunk) + 1:
                raise RuntimeError(f"publish ack not the batch's last: ack={ack}, "
                                   f"expected_seq={i + len(chunk) + 1}")
    finally:
        writer.close()
    return time.perf_counter() - t0


async def wait_count(js: Any, stream: str, n: int, stall: float = 30.0) -> float:
    """Seconds until ``stream`` holds ``n`` messages.

    Raises:
        RuntimeError: its count did not move for ``stall`` seconds (messages dropped).
    """
    t0 = time.perf_counter()
    last, since = -1, time.monotonic()
    while True:
        count = (await js.stream_info(stream)).state.messages
        if count >= n:
            return time.perf_counter() - t0
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since > stall:
            raise RuntimeError(f"stream stalled: stream={stream}, messages={count}, "
                               f"expected={n}")
        await asyncio.sleep(0.05)  # another process fills it: no event to wait on


def proc_cpu() -> float:
    """This process's user+system CPU seconds (every thread) and its live children's (our
    archiver's writer process)."""
    t = os.times()
    kids = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "nats-server" in child.name():
                continue  # counted on its own
            c = child.cpu_times()
            kids += c.user + c.system
        except psutil.Error:
            pass
    return t.user + t.system + kids


def server_cpu(pid: int | None) -> float:
    """The nats-server's CPU seconds so far."""
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


class Collect(logging.Handler):
    """Keeps the archiver's warnings and errors (a lost connection is a figure here)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def run_ours(url: str, password: str, data_dir: Path, n: int,
                   profile: cProfile.Profile | None) -> dict[str, Any]:
    """Our archiver in this process on ``TXN_a`` until its index says ``n`` are archived;
    its warnings kept (``reconnects``: how often it lost its data connection)."""
    seen = Collect()
    logging.getLogger("fluxrig.mixer.archiver").addHandler(seen)
    plan = ArchiverPlan(data_dir=str(data_dir), hub_url=url, user="archiver",
                        password=password,
                        settings=AuditSettings(flush_rows=50_000, flush_after=1.0),
                        discover=False,
                        direct=(DirectSource(rack=RACK, stream=STREAM, js_stream="TXN_a"),))
    root = data_dir / AUDIT_DIR
    stop = asyncio.Event()
    cpu0 = proc_cpu()
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    task = asyncio.create_task(archiver_main(plan, None, "archiver", stop))
    try:
        # the clock runs from the first part committed: start-up (the writer process's
        # interpreter, connections, the consumer) is paid once per process, not per event
        first = 0
        while (last := load_index(root, STREAM, RACK).last) < n:
            if task.done():
                task.result()
                raise RuntimeError("the archiver stopped before archiving everything")
            if not first and last:
                first, t0, cpu0 = last, time.perf_counter(), proc_cpu()
            await asyncio.sleep(0.02)  # its progress is a file: polled
        seconds = time.perf_counter() - t0
        cpu = proc_cpu() - cpu0
        n -= first
    finally:
        stop.set()
        await task
        if profile is not None:
            profile.disable()
        logging.getLogger("fluxrig.mixer.archiver").removeHandler(seen)
    return {"seconds": seconds, "events_per_s": n / seconds, "cpu_s": cpu,
            "cpu_us_per_event": cpu / n * 1e6, "measured_events": n,
            "reconnects": sum("lost the hub" in line for line in seen.lines),
            "warnings": seen.lines[:20]}


async def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Part 1, and the JetStream figures part 2 needs (the server is gone after)."""
    n = args.events
    password = secrets.token_hex(12)
    srv = NatsServer(rack_id="auditbench", data_dir=work / "nats", host="127.0.0.1", port=0,
                     users=[BusUser(name="archiver", password=password)])
    srv.start()
    out: dict[str, Any] = {"events": n}
    try:
        nc = await nats.connect(srv.url, user="archiver", password=password)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="SRC_a", subjects=["src.a"]))
        await js.add_stream(StreamConfig(name="TXN_a", sources=[StreamSource(name="SRC_a")]))
        t = time.perf_counter()
        start_ns = int(datetime(2026, 11, 27, 10, tzinfo=UTC).timestamp()) * 10**9
        frames = make_events(n, RACK, start_ns)
        sizes = [len(f) for f in frames]
        out["event_bytes_mean"] = statistics.fmean(sizes)
        out["event_bytes_min_max"] = [min(sizes), max(sizes)]
        out["make_s"] = time.perf_counter() - t
        print(f"{n:,} events made in {out['make_s']:.1f} s (mean {out['event_bytes_mean']:.1f}"
              f" B); publishing", flush=True)
        out["publish_s"] = await publish("127.0.0.1", srv.port, "archiver", password,
                                         b"src.a", frames)
        del frames
        out["src_stored_s"] = await wait_count(js, "SRC_a", n)
        out["sourced_s"] = await wait_count(js, "TXN_a", n)
        print(f"published in {out['publish_s']:.1f} s ({n / out['publish_s']:,.0f}/s); "
              f"TXN_a holds {n:,} {out['sourced_s']:.1f} s later", flush=True)

        profile = cProfile.Profile() if args.profile else None
        s0 = server_cpu(srv.pid)
        out["ours"] = await run_ours(srv.url, password, work / "ours", n, profile)
        out["ours"]["server_cpu_s"] = server_cpu(srv.pid) - s0
        print(f"ours: {out['ours']['events_per_s']:,.0f} events/s "
              f"({out['ours']['seconds']:.2f} s, CPU {out['ours']['cpu_s']:.2f} s)", flush=True)
        if profile is not None:
            buf = io.StringIO()
            pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(20)
            out["profile"] = buf.getvalue()
            print(out["profile"])

        s0, c0 = server_cpu(srv.pid), proc_cpu()
        secs = await run_baseline(srv.url, "archiver", password, "TXN_a", work / "baseline", n,
                                  rack=RACK, name=STREAM)
        out["baseline"] = {"seconds": secs, "events_per_s": n / secs,
                           "cpu_s": proc_cpu() - c0, "server_cpu_s": server_cpu(srv.pid) - s0}
        out["baseline"]["cpu_us_per_event"] = out["baseline"]["cpu_s"] / n * 1e6
        out["ratio"] = out["ours"]["events_per_s"] / out["baseline"]["events_per_s"]
        print(f"baseline: {out['baseline']['events_per_s']:,.0f} events/s ({secs:.2f} s); "
              f"ratio {out['ratio']:.2f}x", flush=True)

        info = await js.stream_info("TXN_a")
        out["jetstream"] = {"state_bytes": info.state.bytes, "messages": info.state.messages,
                            "du_bytes": du(stream_dir(work / "nats", "TXN_a")),
                            "src_state_bytes": (await js.stream_info("SRC_a")).state.bytes}
        await nc.close()
    finally:
        srv.stop()
    return out


def stream_dir(nats_dir: Path, name: str) -> Path:
    """The file store directory of stream ``name`` under the server's data dir."""
    found = [p for p in nats_dir.rglob(name) if p.parent.name == "streams"]
    if len(found) != 1:
        raise RuntimeError(f"stream directory not found: stream={name}, found={found}")
    return found[0]


def du(path: Path) -> int:
    """Bytes of disk blocks under ``path`` (what ``du`` counts)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def apparent(path: Path, pattern: str = "*.parquet") -> int:
    """Sum of file sizes matching ``pattern`` under ``path``."""
    return sum(p.stat().st_size for p in path.rglob(pattern))


def check_archive(data_dir: Path, n: int) -> dict[str, Any]:
    """Rows on disk, and ``verify`` (timed)."""
    root = data_dir / AUDIT_DIR
    files = sorted(root.rglob("part-*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    t = time.perf_counter()
    reports = verify(root)
    secs = time.perf_counter() - t
    return {"files": len(files), "rows": rows, "rows_ok": rows == n,
            "verify_ok": ok(reports) and sum(r.rows for r in reports) == n,
            "verify_findings": [f.line() for r in reports for f in r.findings][:10],
            "verify_s": secs, "verify_rows_per_s": n / secs}


# --- 2. storage -----------------------------------------------------------------------------

def write_like_archiver(table: pa.Table, path: Path, **extra: Any) -> None:
    """``table`` written with the archive's Parquet options (``write_tmp``'s), plus
    ``extra``; dictionary columns limited to those present."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {"compression": "zstd", "row_group_size": ROW_GROUP,
                            "use_dictionary": [c for c in DICT_COLS
                                               if c in table.column_names]}
    opts.update(extra)
    pq.write_table(table, path, **opts)


def storage(data_dir: Path, work: Path, n: int, js: dict[str, Any]) -> dict[str, Any]:
    """Part 2: bytes per event, with and without the CBOR column, against JetStream."""
    root = data_dir / AUDIT_DIR
    files = sorted(root.rglob("part-*.parquet"))
    out: dict[str, Any] = {"archive_bytes": apparent(root), "archive_du": du(root / STREAM)}
    for label, drop in (("no_cbor", ["cbor"]), ("no_cbor_no_chain", ["cbor", "chain"])):
        dest = work / f"rewrite-{label}"
        for f in files:
            write_like_archiver(pq.read_table(f).drop_columns(drop),
                                dest / f.relative_to(root))
        out[f"{label}_bytes"] = apparent(dest)
        shutil.rmtree(dest)
    out["baseline_bytes"] = apparent(work / "baseline")
    out["per_event"] = {"archive": out["archive_bytes"] / n,
                        "archive_du": out["archive_du"] / n,
                        "no_cbor": out["no_cbor_bytes"] / n,
                        "no_cbor_no_chain": out["no_cbor_no_chain_bytes"] / n,
                        "baseline": out["baseline_bytes"] / n}
    out["jetstream_per_event"] = js["state_bytes"] / n
    out["jetstream_du_per_event"] = js["du_bytes"] / n
    out["ratio_vs_jetstream"] = out["archive_bytes"] / js["state_bytes"]
    out["ratio_vs_jetstream_du"] = out["archive_du"] / js["du_bytes"]
    return out


# --- 3. query -------------------------------------------------------------------------------

def _day(i: int) -> str:
    return (datetime.fromisoformat(QUERY_FIRST_DAY) + timedelta(days=i)).strftime("%Y-%m-%d")


def gen_rack(root: str, rack: str, per_day: int, days: int, seed: int) -> dict[str, Any]:
    """Write ``rack``'s archive (one part per hour, chained, its index); the transaction to
    look up (the middle one of the middle day's noon hour)."""
    rng = random.Random(seed)
    terminals = [f"T{rack.upper()}{i:06d}" for i in range(TERMINALS)]
    stans = [0] * TERMINALS
    src = f"sw-{rack}"
    head, seq = GENESIS, 0
    index = ChainIndex(stream=STREAM, rack=rack, start_seq=1)
    probe: dict[str, Any] = {}
    hours = [per_day // 24 + (1 if h < per_day % 24 else 0) for h in range(24)]
    for d in range(days):
        base = int(datetime.fromisoformat(_day(d)).replace(tzinfo=UTC).timestamp()) * 10**9
        for h, n in enumerate(hours):
            t0 = base + h * 3_600_000_000_000
            step = 3_600_000_000_000 // n
            batch = Batch(rack, STREAM, head)
            for i in range(n):
                t = rng.randrange(TERMINALS)
                stans[t] = stans[t] % 999_999 + 1
                seq += 1
                batch.add(seq, seq, txn_frame(rng, t0 + i * step + rng.randrange(step), src,
                                              terminals[t], stans[t]))
                if d == days // 2 and h == 12 and i == n // 2:
                    probe = {"day": _day(d), "rack": rack, "terminal": terminals[t],
                             "stan": f"{stans[t]:06d}", "seq": seq}
            rel = str(hour_dir(Path(), STREAM, rack, t0) / part_name(batch.seqs[0], seq))
            entry = PartEntry(path=rel, first=batch.seqs[0], last=seq, count=n,
                              prev=batch.prev.hex(), head=batch.head.hex(), hub_last=seq)
            write_tmp(Path(root), rel, batch.table(),
                      {"stream": STREAM, "rack": rack, "first": entry.first,
                       "last": entry.last, "count": n, "prev": entry.prev,
                       "head": entry.head})
            promote(Path(root) / rel)
            index.parts.append(entry)
            head = batch.head
    index.last = index.hub_last = seq
    index.head = head.hex()
    save_index(Path(root), index)
    return probe


def query_archive(cache: Path, events: int) -> tuple[Path, dict[str, Any]]:
    """The generated archive of ``events`` (made now, or reused when its manifest matches):
    its audit root and manifest."""
    want = {"version": GEN_VERSION, "events": events, "racks": list(QUERY_RACKS),
            "days": QUERY_DAYS, "first_day": QUERY_FIRST_DAY,
            "schema": [f.name for f in SCHEMA]}  # the writer's columns changed: make it again
    d = cache / f"audit-{events}"
    manifest = d / "manifest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        if {k: doc.get(k) for k in want} == want:
            print(f"query archive reused: {d} ({doc['gen_s']:.0f} s to make)", flush=True)
            return d / AUDIT_DIR, doc
    shutil.rmtree(d, ignore_errors=True)
    (d / AUDIT_DIR).mkdir(parents=True)
    per_day = events // QUERY_DAYS // len(QUERY_RACKS)
    print(f"making the query archive: {events:,} events, {len(QUERY_RACKS)} racks x "
          f"{QUERY_DAYS} days, in {d}", flush=True)
    t = time.perf_counter()
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(len(QUERY_RACKS), mp_context=ctx) as ex:
        futs = [ex.submit(gen_rack, str(d / AUDIT_DIR), r, per_day, QUERY_DAYS, 100 + i)
                for i, r in enumerate(QUERY_RACKS)]
        probes = [f.result() for f in futs]
    root = d / AUDIT_DIR
    doc = {**want, "gen_s": time.perf_counter() - t, "probe": probes[0],
           "files": len(list(root.rglob("part-*.parquet"))), "bytes": apparent(root),
           "rows_per_part": per_day // 24}
    manifest.write_text(json.dumps(doc, indent=1))
    print(f"made in {doc['gen_s']:.0f} s: {doc['files']} parts, {doc['bytes'] / 1e9:.2f} GB",
          flush=True)
    return root, doc


def best_of(con: Any, sql: str, params: list[Any], runs: int = 5) -> dict[str, Any]:
    """One warm-up, then ``runs`` timed runs: best, median, and the warm-up's rows."""
    rows = con.execute(sql, params).fetchall()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        con.execute(sql, params).fetchall()
        times.append(time.perf_counter() - t)
    return {"best_s": min(times), "median_s": statistics.median(times), "rows": len(rows),
            "result": rows}


REPORT_SQL = ("SELECT rack, de39, count(*), sum(amount) FROM txn WHERE date = ? "
              "GROUP BY ALL ORDER BY rack, de39")
LOOKUP_SQL = "SELECT * FROM txn WHERE date = ? AND stan = ? AND terminal = ?"


def query(root: Path, probe: dict[str, Any]) -> dict[str, Any]:
    """Part 3's two queries over ``root``."""
    con = open_views(root)
    t = time.perf_counter()
    con.execute("SELECT count(*) FROM events").fetchall()
    first = time.perf_counter() - t
    day = probe["day"]
    rep = best_of(con, REPORT_SQL, [day])
    look = best_of(con, LOOKUP_SQL, [day, probe["stan"], probe["terminal"]])
    day_rows = sum(r[2] for r in rep["result"])
    names = [d[0] for d in con.execute(LOOKUP_SQL, [day, probe["stan"],
                                                    probe["terminal"]]).description]
    found = [dict(zip(names, r, strict=True)) for r in look["result"]]
    look["found"] = len(found) == 1 and found[0]["seq"] == probe["seq"]
    rep["result"] = [[str(v) for v in r] for r in rep["result"]]
    look["result"] = {k: str(v) for k, v in found[0].items()} if found else {}
    con.close()
    return {"count_all_first_s": first, "report": rep, "lookup": look, "day_rows": day_rows}


def lookup_experiments(root: Path, probe: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """The probe day's parts rewritten with other writer options; the lookup on each."""
    day = probe["day"]
    files = sorted(root.glob(f"*/rack=*/date={day}/hour=*/*.parquet"))
    rows = max(pq.read_metadata(f).num_rows for f in files)
    bloom = {"stan": {"ndv": rows, "fpp": 0.01}, "terminal": {"ndv": TERMINALS, "fpp": 0.01}}
    variants: list[tuple[str, dict[str, Any], bool]] = [
        ("as archived (copy of the day)", {}, False),
        ("write_page_index", {"write_page_index": True}, False),
        ("bloom filters stan+terminal", {"bloom_filter_options": bloom}, False),
        ("bloom + page index", {"bloom_filter_options": bloom, "write_page_index": True},
         False),
        ("row groups 4096 + page index", {"row_group_size": 4096,
                                          "write_page_index": True}, False),
        ("sorted by terminal,stan + page index (breaks seq order)",
         {"write_page_index": True}, True),
    ]
    out = []
    for label, opts, sort in variants:
        dest = work / "variant"
        shutil.rmtree(dest, ignore_errors=True)
        for f in files:
            table = pq.read_table(f)
            if sort:
                table = table.sort_by([("terminal", "ascending"), ("stan", "ascending")])
            write_like_archiver(table, dest / f.relative_to(root), **opts)
        con = open_views(dest)
        look = best_of(con, LOOKUP_SQL, [day, probe["stan"], probe["terminal"]])
        rep = best_of(con, REPORT_SQL, [day])
        con.close()
        out.append({"variant": label, "lookup_best_s": look["best_s"],
                    "lookup_median_s": look["median_s"], "found": look["rows"] == 1,
                    "report_best_s": rep["best_s"],
                    "bytes_per_event": apparent(dest) / sum(pq.read_metadata(f).num_rows
                                                             for f in files)})
        print(f"  {label:<58} lookup {look['best_s'] * 1e3:7.1f} ms  report "
              f"{rep['best_s'] * 1e3:7.1f} ms  {out[-1]['bytes_per_event']:.1f} B/event",
              flush=True)
        shutil.rmtree(dest)
    return out


# --- report ---------------------------------------------------------------------------------

def bars(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure with its bar and verdict."""
    tp, st, q, chk = res["throughput"], res["storage"], res["query"], res["check"]
    scale = "" if res["query_events"] == QUERY_EVENTS else \
        f" ({res['query_events']:,} events, bar is for {QUERY_EVENTS:,})"
    return [
        {"figure": "ours, events/s", "value": tp["ours"]["events_per_s"], "bar": RATE_BAR,
         "op": ">=", "met": tp["ours"]["events_per_s"] >= RATE_BAR},
        {"figure": "ours / baseline", "value": tp["ratio"], "bar": RATIO_BAR, "op": ">=",
         "met": tp["ratio"] >= RATIO_BAR},
        {"figure": "rows archived = N, verify clean", "value": chk["rows"],
         "bar": tp["events"], "op": "==", "met": chk["rows_ok"] and chk["verify_ok"]},
        {"figure": "archive bytes / JetStream bytes", "value": st["ratio_vs_jetstream"],
         "bar": STORAGE_BAR, "op": "<=", "met": st["ratio_vs_jetstream"] <= STORAGE_BAR},
        {"figure": f"day report, s{scale}", "value": q["report"]["best_s"],
         "bar": REPORT_BAR, "op": "<=", "met": q["report"]["best_s"] <= REPORT_BAR},
        {"figure": f"lookup by day+stan+terminal, s{scale}", "value": q["lookup"]["best_s"],
         "bar": LOOKUP_BAR, "op": "<=",
         "met": q["lookup"]["best_s"] <= LOOKUP_BAR and q["lookup"]["found"]},
    ]


def print_report(res: dict[str, Any]) -> None:
    """The tables."""
    tp, st, q, chk = res["throughput"], res["storage"], res["query"], res["check"]
    n = tp["events"]
    print(f"\nAudit trail: {n:,} ISO 8583 events of {tp['event_bytes_mean']:.1f} B "
          f"(min {tp['event_bytes_min_max'][0]}, max {tp['event_bytes_min_max'][1]}), "
          f"{os.cpu_count()} CPUs shared with nats-server")
    print(f"{'archiver':<44} {'events/s':>10} {'s':>7} {'CPU s':>7} {'µs/ev':>7} "
          f"{'server CPU s':>12}")
    for name, label in (("ours", "ours (mixer.archiver, raw pull)"),
                        ("baseline", "baseline (nats-py fetch(1000), file/batch)")):
        r = tp[name]
        print(f"{label:<44} {r['events_per_s']:>10,.0f} {r['seconds']:>7.2f} "
              f"{r['cpu_s']:>7.2f} {r['cpu_us_per_event']:>7.1f} {r['server_cpu_s']:>12.2f}")
    if tp["ours"]["reconnects"]:
        print(f"ours lost its data connection {tp['ours']['reconnects']} time(s) and started "
              f"again from the archive (nats-server: slow consumer; see perf/README.md)")
    print(f"ratio ours/baseline {tp['ratio']:.2f}x; our archive: {chk['files']} parts, "
          f"{chk['rows']:,} rows, verify {'clean' if chk['verify_ok'] else 'FAILED'} in "
          f"{chk['verify_s']:.2f} s ({chk['verify_rows_per_s']:,.0f} rows/s)")
    pe = st["per_event"]
    print(f"\n{'storage, bytes per event':<44} {'B/event':>10}")
    for label, v in (("archive (with cbor)", pe["archive"]),
                     ("archive, du", pe["archive_du"]),
                     ("archive without cbor", pe["no_cbor"]),
                     ("archive without cbor and chain", pe["no_cbor_no_chain"]),
                     ("baseline's files (1,000 rows each)", pe["baseline"]),
                     ("JetStream TXN_a state.bytes", st["jetstream_per_event"]),
                     ("JetStream TXN_a directory, du", st["jetstream_du_per_event"])):
        print(f"{label:<44} {v:>10.1f}")
    print(f"archive / JetStream: {st['ratio_vs_jetstream']:.1%} (state.bytes), "
          f"{st['ratio_vs_jetstream_du']:.1%} (du)")
    m = res["query_manifest"]
    print(f"\nquery archive: {res['query_events']:,} events, {m['files']} parts of "
          f"~{m['rows_per_part']:,} rows, {m['bytes'] / 1e9:.2f} GB; day {m['probe']['day']} "
          f"({q['day_rows']:,} events)")
    print(f"{'query':<44} {'best ms':>10} {'median ms':>10}")
    for label, key in (("day report (rack, de39, count, sum)", "report"),
                       ("lookup day + stan + terminal", "lookup")):
        print(f"{label:<44} {q[key]['best_s'] * 1e3:>10.1f} {q[key]['median_s'] * 1e3:>10.1f}")
    print(f"(first query on a new connection, count(*) of all events: "
          f"{q['count_all_first_s'] * 1e3:.0f} ms)")
    print(f"\n{'figure':<74} {'value':>10} {'bar':>12}  verdict")
    for b in res["bars"]:
        v = b["value"]
        fv = f"{v:,.3f}" if isinstance(v, float) and v < 100 else f"{v:,.0f}"
        print(f"{b['figure']:<74} {fv:>10} {b['op']} {b['bar']:>9,}  "
              f"{'PASS' if b['met'] else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="100,000 events, a 1,000,000-event query archive")
    ap.add_argument("--events", type=int, help="events archived (default 500,000)")
    ap.add_argument("--query-events", type=int, help="events in the query archive "
                    "(default 10,000,000)")
    ap.add_argument("--cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "fluxrig-audit-bench",
                    help="where the query archive is kept between runs")
    ap.add_argument("--experiments", action="store_true",
                    help="time the lookup with other Parquet writer options")
    ap.add_argument("--profile", action="store_true", help="cProfile our archiver")
    ap.add_argument("--no-query", action="store_true", help="parts 1 and 2 only")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (server log, archives) and print its path")
    ap.add_argument("--json", type=Path, default=ROOT / "perf" / "results" / "audit_bench.json")
    args = ap.parse_args()
    args.events = args.events or (100_000 if args.quick else 500_000)
    qn = args.query_events or (1_000_000 if args.quick else QUERY_EVENTS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    res: dict[str, Any] = {"bench": "audit", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "machine": {"cpus": os.cpu_count(),
                                       "python": platform.python_version(),
                                       "load_average": os.getloadavg()},
                           "query_events": qn}
    try:
        res["throughput"] = asyncio.run(throughput(args, work))
        res["check"] = check_archive(work / "ours", args.events)
        res["storage"] = storage(work / "ours", work, args.events,
                                 res["throughput"]["jetstream"])
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.no_query:
        print(json.dumps({k: res[k] for k in ("throughput", "check", "storage")}, indent=1,
                         default=str))
        return 0
    root, manifest = query_archive(args.cache, qn)
    res["query_manifest"] = manifest
    res["query"] = query(root, manifest["probe"])
    if args.experiments or res["query"]["lookup"]["best_s"] > LOOKUP_BAR:
        print("lookup with other writer options (the probe day's parts rewritten):",
              flush=True)
        exp = Path(tempfile.mkdtemp(prefix="audit-bench-exp-"))
        try:
            res["lookup_experiments"] = lookup_experiments(root, manifest["probe"], exp)
        finally:
            shutil.rmtree(exp, ignore_errors=True)
    res["ratio"] = res["throughput"]["ratio"]
    res["bars"] = bars(res)
    print_report(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0 if all(b["met"] for b in res["bars"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
