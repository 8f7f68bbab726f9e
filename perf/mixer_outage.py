"""Mixer edge autonomy: a switch rack linked to a Mixer keeps serving through hub outages,
and its audit trail reaches the hub exactly once, quickly, when the hub returns.

    python perf/mixer_outage.py [--outage 60] [--runs 3] [--tps 1000] [--down kill|stop]
                                [--between 20] [--json PATH] [--keep]
    python perf/mixer_outage.py --outage 10 --runs 1 --tps 300     # quick: ~1 minute

Not a ``*_bench.py``: ``scripts/bench`` does not run it (the bar's run takes ~5 minutes).

What runs (all on this machine, sharing its CPUs):

1. ``mixer init`` in a temporary dir (``tests/mixerutil.init_hub``: free ports, offline
   after 5 s), ``mixer start`` (``MixerProcess``: ready when the Mixer says so), one rack
   enrolled with ``mixer rack add`` (its passport).
2. An issuer peer and acquirer terminals from ``tests/peers.py`` (asyncio streams and
   pyiso8583 only, none of fluxrig's ISO code; 20 terminals, ``--tps`` in total, BIN 4,
   answered 00) on one event loop in a thread of this process.
3. The switch rack: ``tests/scenarios.switch_rig`` (one pipeline, the switch's audit events
   to the egress stream ``TXN``), 4 MiB rings, ``telemetry.interval`` 1 s, ``mixer:
   {passport}``, ``engine start --workers 1``. The registry creates the hub stream
   ``TXN_<rack>`` at the rack's first hello; it sources the rack's ``TXN`` through the
   rack's durable ``hub`` consumer. The rack's ``TXN`` has interest retention (an event
   leaves the rack once the hub has it), so the rack's figure is its stream's ``last_seq``.
4. Traffic starts; once the hub holds events, ``--between`` s of steady traffic. Then, each
   of ``--runs`` times, with traffic flowing:

   * the hub goes down: ``--down kill`` (default) SIGKILLs the Mixer's supervisor and its
     hub nats-server together (its registry follows, ``PR_SET_PDEATHSIG``): a crash;
     ``--down stop`` runs ``mixer stop`` (the registry flushes, the hub stops cleanly);
   * ``--outage`` s later ``mixer start`` again; the hub is down from the moment every
     Mixer process is gone until the new Mixer says ready (its start-up is part of the
     outage);
   * the answers the acquirers got in that time, as TPS: the rack kept serving;
   * at ready: the rack's ``TXN`` ``last_seq`` (as the rack's admin: ``engine.bus.load_auth``
     and ``state.json`` ``nats_url``) is the target; *behind* = target - the hub's
     ``TXN_<rack>`` message count at its first answer; *catch-up* = from ready until the hub
     stream holds the target (stream info polled every 20 ms). Where the time goes: when
     the rack's leaf link came back (the rack's nats-server log) and when the hub's copy
     first grew, both from ready;
   * ``--between`` s of traffic with the hub up before the next run.

5. After the last run the traffic stops; once the rack's ``last_seq`` stays put and the hub
   holds as many, every hub message is read back (a pull consumer as the hub's admin,
   batches of 10,000, no acks) and checked: message count = the rack's ``last_seq``, every
   frame id once, each ``Nats-Msg-Id`` = its frame's id, and every answer an acquirer got
   has exactly one ``iso8583.txn`` event at the hub (by terminal + STAN), none twice.

Bar (issue "Mixer I", edge autonomy): a switch rack at 1,000 TPS with the hub down 60 s
keeps serving and loses or duplicates no event; catch-up median of 3 <= 10 s.
Prints a table and the verdicts; writes JSON with ``--json``; exit 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nats
import psutil  # type: ignore[import-untyped]
import yaml  # type: ignore[import-untyped]
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mixerutil import (  # type: ignore[import-not-found]  # noqa: E402 - tests/ harness
    MixerProcess,
    admin_password,
    enrol,
    hub_ports,
    init_hub,
    mixer,
)
from peers import Acquirer, Issuer, PeerThread  # type: ignore[import-not-found]  # noqa: E402
from rackutil import RackProcess  # type: ignore[import-not-found]  # noqa: E402
from scenarios import switch_rig, wait_switch_ready  # type: ignore[import-not-found]  # noqa: E402

from engine.bus import load_auth  # noqa: E402
from engine.frame import decode  # noqa: E402
from engine.natsd import free_port  # noqa: E402

CATCH_UP_BAR = 10.0  # s, median of the runs (docs/mixer-design.md section 7)
SERVE_BAR = 0.95  # answered TPS during an outage, at least this share of the offered rate
TERMINALS = 20
POLL = 0.02  # s between stream-info polls while catching up (another process: no event)
KIND = "iso8583.txn"


async def _noop(*_: Any) -> None:
    """nats-py callbacks: a hub that goes away is the point of the bench, not news."""


class Streams:
    """The two figures the bench follows: the rack's ``TXN`` ``last_seq`` (a connection
    that lives as long as the rack) and the hub's ``TXN_<rack>`` message count (a
    connection per Mixer life; None while the hub is down)."""

    def __init__(self, hub: Path, data_dir: Path, rack: str):
        self.hub_url = f"nats://127.0.0.1:{hub_ports(hub)[0]}"
        self.hub_password = admin_password(hub)
        self.data_dir = data_dir
        self.stream = f"TXN_{rack}"
        self.rack_nc: Any = None
        self.hub_nc: Any = None

    async def open_rack(self) -> None:
        auth = load_auth(self.data_dir)
        if auth is None:
            raise RuntimeError(f"no rack credentials in {self.data_dir}")
        url = json.loads((self.data_dir / "state.json").read_text())["nats_url"]
        self.rack_nc = await nats.connect(url, user=auth.user, password=auth.password,
                                          error_cb=_noop, name="outage-bench")

    async def rack_txn(self) -> tuple[int, int, int]:
        """(last_seq, messages held, bytes held) of the rack's ``TXN``."""
        state = (await self.rack_nc.jetstream().stream_info("TXN")).state
        return state.last_seq, state.messages, state.bytes

    async def open_hub(self) -> None:
        """Connect to the (just started) hub; no reconnects: a hub that goes is gone."""
        self.hub_nc = await nats.connect(self.hub_url, user="admin", password=self.hub_password,
                                         allow_reconnect=False, connect_timeout=2,
                                         error_cb=_noop, disconnected_cb=_noop,
                                         name="outage-bench")

    async def close_hub(self) -> None:
        if self.hub_nc is not None:
            nc, self.hub_nc = self.hub_nc, None
            try:
                await nc.close()
            except Exception:  # noqa: BLE001 - the hub is gone already
                pass

    async def hub_count(self) -> int | None:
        """Messages in the hub's ``TXN_<rack>`` (None: not reachable, or not there yet)."""
        if self.hub_nc is None or self.hub_nc.is_closed:
            return None
        try:
            return int((await self.hub_nc.jetstream().stream_info(self.stream)).state.messages)
        except Exception:  # noqa: BLE001 - starting, gone, or the stream not created yet
            return None

    async def close(self) -> None:
        await self.close_hub()
        if self.rack_nc is not None:
            await self.rack_nc.close()


class Sampler:
    """Once a second: answers the acquirers have, the rack's ``last_seq``, the hub's count;
    a progress line every 5 s."""

    def __init__(self, acq: Acquirer, streams: Streams, t0: float):
        self.acq = acq
        self.streams = streams
        self.t0 = t0
        self.rows: list[tuple[float, int, int, int | None]] = []
        self.hub_up = True

    async def run(self) -> None:
        while True:
            t = time.monotonic() - self.t0
            last_seq = (await self.streams.rack_txn())[0]
            at_hub = await self.streams.hub_count() if self.hub_up else None
            self.rows.append((t, len(self.acq.answers), last_seq, at_hub))
            if len(self.rows) % 5 == 0 and len(self.rows) > 5:
                t5, a5, _, _ = self.rows[-6]
                rate = (self.rows[-1][1] - a5) / (t - t5)
                print(f"  t={t:6.1f} s  answered {self.rows[-1][1]:8,} ({rate:6.0f}/s)  "
                      f"rack TXN {last_seq:8,}  hub "
                      f"{'DOWN' if at_hub is None else format(at_hub, ','):>8}", flush=True)
            await asyncio.sleep(1.0 - (time.monotonic() - self.t0 - t) % 1.0)

    def min_rate(self, start: float, end: float, window: int = 5) -> float | None:
        """The lowest answered rate over ``window`` s between ``start`` and ``end``."""
        rows = [r for r in self.rows if start <= r[0] <= end]
        rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(rows, rows[window:])]
        return min(rates) if rates else None


def _mixer_pids(mp: MixerProcess) -> dict[str, int]:
    state = mp.state()
    pids = {"supervisor": state["pid"], "hub": state["hub_pid"]}
    for p in state["processes"]:
        if p.get("pid"):
            pids[p["name"]] = p["pid"]
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def take_hub_down(mp: MixerProcess, how: str) -> None:
    """``kill``: SIGKILL the supervisor and its hub nats-server (the registry follows);
    ``stop``: ``mixer stop``. Returns once every Mixer process is gone."""
    pids = _mixer_pids(mp)
    if how == "kill":
        for name in ("supervisor", "hub"):
            os.kill(pids[name], signal.SIGKILL)
    else:
        done = mixer("stop", str(mp.hub))
        if done.returncode:
            raise RuntimeError(f"mixer stop failed: {done.stderr.strip()}")
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values() if p != mp.proc.pid) \
            and time.monotonic() < deadline:
        time.sleep(0.01)  # other processes' exits: no event to wait on
    mp.proc.wait(30)
    mp.close()


async def wait_caught_up(streams: Streams, target: int, t_ready: float,
                         timeout: float) -> tuple[float | None, int | None, float | None]:
    """(seconds from ``t_ready`` until the hub holds ``target`` messages or None, the hub's
    first count after ready, seconds from ``t_ready`` until that count first grew)."""
    first = moved = None
    while time.monotonic() - t_ready < timeout:
        if streams.hub_nc is None:
            try:
                await streams.open_hub()
            except Exception:  # noqa: BLE001 - ready, but not answering yet: ask again
                await asyncio.sleep(POLL)
                continue
        count = await streams.hub_count()
        now = time.monotonic()
        if count is not None:
            first = count if first is None else first
            if moved is None and count > first:
                moved = now - t_ready
            if count >= target:
                return now - t_ready, first, moved
        await asyncio.sleep(POLL)
    return None, first, moved


async def read_hub(streams: Streams, rack: str) -> dict[str, Any]:
    """Every message of the hub's ``TXN_<rack>``: counts, uniqueness, events by key."""
    js = streams.hub_nc.jetstream()
    info = await js.stream_info(streams.stream)
    total = info.state.messages
    sub = await js.pull_subscribe(
        f"fluxrig.{rack}.txn", stream=streams.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                              inactive_threshold=60.0),
        pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
    ids: set[bytes] = set()
    header_mismatch = no_header = read = 0
    by_key: Counter[tuple[str, str]] = Counter()
    kinds: Counter[str] = Counter()
    t = time.perf_counter()
    try:
        while read < total:
            try:
                msgs = await sub.fetch(10_000, timeout=5)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                read += 1
                frame = decode(m.data, strict=True)
                ids.add(frame.id)
                msg_id = (m.headers or {}).get("Nats-Msg-Id")
                if msg_id is None:
                    no_header += 1
                elif msg_id != frame.id.hex():
                    header_mismatch += 1
                kinds[frame.kind] += 1
                if frame.kind == KIND:
                    by_key[(frame.body["terminal"], frame.body["stan"])] += 1
    finally:
        await sub.unsubscribe()
    return {"messages": total, "first_seq": info.state.first_seq,
            "last_seq": info.state.last_seq, "read": read, "distinct_ids": len(ids),
            "msg_id_mismatch": header_mismatch, "msg_id_missing": no_header,
            "kinds": dict(kinds), "by_key": by_key,
            "read_s": round(time.perf_counter() - t, 2)}


async def settle_rack(streams: Streams, quiet: float = 2.0, timeout: float = 60.0) -> int:
    """The rack's ``last_seq`` once it has not moved for ``quiet`` s (egress flushed)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now_seq = (await streams.rack_txn())[0]
        if now_seq != last:
            last, since = now_seq, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
        await asyncio.sleep(0.1)
    return last


def rack_rig(work: Path, rack: str, port: int, issuer_port: int, passport: Path) -> Path:
    """``tests/scenarios.switch_rig`` with the rack linked to the Mixer."""
    path = switch_rig(work, rack, port, issuer_port, rings={"capacity": "4MiB"},
                      telemetry={"interval": 1.0})
    cfg = yaml.safe_load(path.read_text())
    cfg["mixer"] = {"passport": str(passport)}
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_lines(text: str, *words: str) -> list[str]:
    """Lines of a process's output holding any of ``words``."""
    return [line for line in text.splitlines() if any(w in line for w in words)]


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole run; every figure of the JSON."""
    hub = init_hub(work, offline_after="5s")
    rack = f"outage-{os.getpid()}"
    rack_dir = work / "rack"
    rack_dir.mkdir()
    out: dict[str, Any] = {"rack": rack, "down": args.down, "outage_s": args.outage,
                           "tps": args.tps, "runs": []}
    peers = PeerThread()
    issuer = Issuer()
    acq: Acquirer | None = None
    mp: MixerProcess | None = None
    rp: RackProcess | None = None
    traffic = None
    sampler_task = None
    try:
        mp = MixerProcess(hub)
        passport = enrol(hub, rack, "role=payments")
        issuer_port = peers.call(issuer.start())
        port = free_port()
        rp = RackProcess(rack_rig(rack_dir, rack, port, issuer_port, passport),
                         rack_dir / "data", workers=1)
        wait_switch_ready(rp, port)
        streams = Streams(hub, rack_dir / "data", rack)
        await streams.open_rack()
        await streams.open_hub()
        acq = Acquirer(port, terminals=TERMINALS, rate=args.tps)
        t0 = time.monotonic()
        traffic = peers.spawn(acq.run(10 ** 9))
        sampler = Sampler(acq, streams, t0)
        sampler_task = asyncio.create_task(sampler.run())
        print(f"rack {rack} linked; {args.tps:g} TPS from {TERMINALS} terminals", flush=True)
        while not (await streams.hub_count() or 0):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("no event reached the hub in 60 s")
            await asyncio.sleep(0.2)  # the hello, the hub stream, the first events
        out["first_at_hub_s"] = round(time.monotonic() - t0, 2)
        for run in range(1, args.runs + 1):
            await asyncio.sleep(args.between)
            before = await streams.hub_count()
            sampler.hub_up = False
            await streams.close_hub()
            await asyncio.to_thread(take_hub_down, mp, args.down)
            t_down, wall_down = time.monotonic(), time.time()  # every Mixer process gone
            a_down = len(acq.answers)
            seq_down = (await streams.rack_txn())[0]
            print(f"run {run}: hub down ({args.down}) at t={t_down - t0:.1f} s, "
                  f"{_f(before, ',')} events at the hub", flush=True)
            await asyncio.sleep(max(0.0, t_down + args.outage - time.monotonic()))
            t_start = time.monotonic()
            mp = await asyncio.to_thread(MixerProcess, hub)
            t_ready, wall_ready = time.monotonic(), time.time()
            a_ready = len(acq.answers)
            target, held, held_bytes = await streams.rack_txn()
            caught, first, moved = await wait_caught_up(streams, target, t_ready,
                                                        args.catch_up_max)
            sampler.hub_up = True
            r = {"run": run, "down_at_s": round(t_down - t0, 2),
                 "down_wall": wall_down, "ready_wall": wall_ready,
                 "outage_s": round(t_ready - t_down, 2),
                 "mixer_start_s": round(t_ready - t_start, 2),
                 "answered_in_outage": a_ready - a_down,
                 "outage_tps": round((a_ready - a_down) / (t_ready - t_down), 1),
                 "outage_min_5s_tps": sampler.min_rate(t_down - t0, t_ready - t0),
                 "stored_alone": target - seq_down, "rack_seq_at_ready": target,
                 "rack_held_at_ready": held,
                 "rack_held_mb_at_ready": round(held_bytes / 1e6, 2),
                 "hub_at_ready": first, "behind": None if first is None else target - first,
                 "catch_up_s": None if caught is None else round(caught, 3),
                 "first_progress_s": None if moved is None else round(moved, 3)}
            out["runs"].append(r)
            print(f"run {run}: Mixer ready after {r['outage_s']:.1f} s down (start "
                  f"{r['mixer_start_s']:.1f} s); {r['answered_in_outage']:,} answered "
                  f"meanwhile ({r['outage_tps']:.0f} TPS); {r['behind']} events behind; "
                  f"caught up in {r['catch_up_s']} s", flush=True)
            if caught is None:
                break  # the hub never caught up: later runs would measure a backlog
        await asyncio.sleep(args.between / 2)
        t_stop = time.monotonic()  # the last send; answers in flight still come
        acq.running = False
        await asyncio.wrap_future(traffic)
        traffic = None
        final = await settle_rack(streams)
        sampler_task.cancel()
        sampler_task = None
        caught, _, _ = await wait_caught_up(streams, final, time.monotonic(), args.catch_up_max)
        print(f"traffic stopped at t={t_stop - t0:.1f} s: {len(acq.answers):,} answered; rack "
              f"TXN last_seq {final:,}; the hub {'has all' if caught is not None else 'LACKS'}"
              f"; reading the hub's copy", flush=True)
        hub_read = await read_hub(streams, rack)
        held_after = (await streams.rack_txn())[1]
        await streams.close()
        by_key = hub_read.pop("by_key")
        answered = set(acq.answers)
        out.update(
            traffic_s=round(t_stop - t0, 1), sent=len(acq.sent), answered=len(answered),
            answer_codes=dict(Counter(acq.answers.values())), strays=acq.strays,
            refused=acq.refused, steady_min_5s_tps=sampler.min_rate(5.0, t_stop - t0),
            rack_last_seq=final, rack_held_after=held_after, hub=hub_read,
            events_per_answer=dict(Counter(by_key[k] for k in answered)),
            answered_without_event=sum(1 for k in answered if by_key[k] == 0),
            events_twice=sum(1 for n in by_key.values() if n > 1),
            events_without_answer=sum(1 for k in by_key if k not in answered),
            events_not_sent=sum(1 for k in by_key if k not in acq.sent),
            stan_wrapped=len(acq.sent) > 999_999,  # (terminal, STAN) keys would repeat
            per_second=[[round(t, 2), a, q, h] for t, a, q, h in sampler.rows])
        out["rack_stop_exit"] = rp.stop()
        out["mixer_stop_exit"] = mp.stop()  # type: ignore[union-attr]  # set above
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
        if acq is not None:
            acq.running = False
        if traffic is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(traffic), 10)
            except Exception:  # noqa: BLE001 - tearing down after a failure
                pass
        if rp is not None:
            rp.close()
        if mp is not None:
            mp.close()
        peers.call(issuer.close())
        peers.stop()
        out["logs"] = problems(work, rack_dir / "data", hub)
    links = leaf_links(rack_dir / "data" / "nats-server.log")
    for r in out["runs"]:
        back = next((t for t in links if t > r["down_wall"]), None)
        r["link_after_ready_s"] = None if back is None else round(back - r["ready_wall"], 3)
    return out


def leaf_links(log: Path) -> list[float]:
    """Wall times (s) the rack's nats-server logged a leaf connection to the hub created
    (its log is in UTC)."""
    out = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if "Leafnode connection created" in line:
            stamp = " ".join(line.split()[1:3])
            out.append(datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f")
                       .replace(tzinfo=timezone.utc).timestamp())
    return out


def problems(work: Path, data_dir: Path, hub: Path) -> dict[str, Any]:
    """Error and warning lines of the rack, the Mixers and both nats-servers; the rack's
    failed leaf dials (one a second while the hub is down: expected) counted apart."""
    def read(paths: list[Path]) -> str:
        return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())

    def errors(path: Path) -> list[str]:  # the plaintext-password warning is the design's
        return [x for x in log_lines(read([path]), "[ERR]", "[WRN]")
                if "Plaintext passwords" not in x]

    rack_nats = errors(data_dir / "nats-server.log")
    dials = [x for x in rack_nats if "connect as leafnode" in x or "leafnode" in x.lower()
             and "connection refused" in x]
    return {
        "rack": log_lines(read(sorted(work.glob("rack/engine-*.out"))), " ERROR ",
                          " WARNING ", "Traceback"),
        "mixer": log_lines(read(sorted(work.glob("mixer-*.out"))), " ERROR ", " WARNING ",
                           "Traceback"),
        "hub_nats": errors(hub / "nats-server.log"),
        "rack_nats_leaf_dials_failed": len(dials),
        "rack_nats": [x for x in rack_nats if x not in dials],
    }


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bar with its figure and verdict."""
    runs = res["runs"]
    catch = [r["catch_up_s"] for r in runs]
    median = statistics.median(catch) if catch and None not in catch else None
    hub = res["hub"]
    once = (hub["messages"] == res["rack_last_seq"] == hub["read"] == hub["distinct_ids"]
            and hub["first_seq"] == 1 and not hub["msg_id_mismatch"]
            and not hub["msg_id_missing"] and not res["events_twice"])
    served = [r["outage_tps"] / res["tps"] for r in runs]
    out = [
        {"bar": f"catch-up after {res['outage_s']:g} s down, median of {len(runs)}, s",
         "figure": median, "limit": CATCH_UP_BAR,
         "ratio": None if median is None else round(median / CATCH_UP_BAR, 3),
         "met": median is not None and median <= CATCH_UP_BAR and len(runs) == res["nruns"]},
        {"bar": "exactly once: hub count = rack last_seq, every frame id once",
         "figure": f"{hub['messages']:,} / {res['rack_last_seq']:,} / "
                   f"{hub['distinct_ids']:,}", "limit": "equal", "ratio": None, "met": once},
        {"bar": "no audit event lost: every answer has one event at the hub",
         "figure": f"{res['answered_without_event']} without",
         "limit": "0", "ratio": None,
         "met": res["answered_without_event"] == 0 and res["answered"] > 0
         and not res["stan_wrapped"]},
        {"bar": f"rack served through each outage (>= {SERVE_BAR:.0%} of the offered TPS)",
         "figure": round(min(served), 3) if served else None, "limit": SERVE_BAR,
         "ratio": None, "met": bool(served) and min(served) >= SERVE_BAR
         and set(res["answer_codes"]) <= {"00"}},
    ]
    return out


def _f(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(res: dict[str, Any]) -> None:
    """The table and the verdicts."""
    hub = res["hub"]
    print(f"\nMixer edge autonomy: switch rack at {res['tps']:g} TPS offered ({TERMINALS} "
          f"terminals, independent peers), hub down {res['outage_s']:g} s x {res['nruns']} "
          f"({'SIGKILL of supervisor + hub nats-server' if res['down'] == 'kill' else 'mixer stop'}"
          f"), {os.cpu_count()} CPUs shared by everything")
    print(f"{'run':>3} {'outage s':>8} {'start s':>7} {'answered':>9} {'TPS':>7} "
          f"{'min 5s':>7} {'stored alone':>12} {'behind':>8} {'link s':>6} {'moved s':>7} "
          f"{'catch-up s':>10}")
    for r in res["runs"]:
        print(f"{r['run']:>3} {r['outage_s']:8.2f} {r['mixer_start_s']:7.2f} "
              f"{r['answered_in_outage']:9,} {r['outage_tps']:7.1f} "
              f"{_f(r['outage_min_5s_tps'], '.0f'):>7} {r['stored_alone']:12,} "
              f"{_f(r['behind'], ','):>8} {_f(r['link_after_ready_s']):>6} "
              f"{_f(r['first_progress_s']):>7} {_f(r['catch_up_s'], '.3f'):>10}")
    print("(outage: hub gone -> new Mixer ready; start: `mixer start` -> ready; link: the "
          "rack's leaf link up, s after ready, from its nats-server log; moved: the hub's copy "
          "first grew; catch-up: ready -> the hub holds what the rack had at ready)")
    print(f"traffic {res['traffic_s']:.0f} s: {res['sent']:,} sent, {res['answered']:,} "
          f"answered (codes {res['answer_codes']}), {res['strays']} strays, lowest 5 s rate "
          f"{_f(res['steady_min_5s_tps'], '.0f')}/s")
    print(f"hub TXN_<rack>: {hub['messages']:,} messages (seq {hub['first_seq']}.."
          f"{hub['last_seq']:,}), {hub['read']:,} read back in {hub['read_s']} s, "
          f"{hub['distinct_ids']:,} distinct frame ids, Nats-Msg-Id != frame id "
          f"{hub['msg_id_mismatch']}, missing {hub['msg_id_missing']}; kinds {hub['kinds']}")
    print(f"rack TXN last_seq {res['rack_last_seq']:,}, held on the rack after "
          f"{res['rack_held_after']}; events per answered transaction "
          f"{res['events_per_answer']}; events twice {res['events_twice']}, without an answer "
          f"{res['events_without_answer']}, not sent by the acquirers {res['events_not_sent']}")
    print(f"exits: rack {res['rack_stop_exit']}, Mixer {res['mixer_stop_exit']}")
    logs = res["logs"]
    print(f"rack nats-server: {logs['rack_nats_leaf_dials_failed']} failed leaf dials "
          f"(the hub away: expected)")
    for name in ("rack", "mixer", "hub_nats", "rack_nats"):
        if logs[name]:
            print(f"{name} log: {len(logs[name])} error/warning line(s); first ones:")
            for line in logs[name][:8]:
                print(f"  {line[:240]}")
    print(f"\n{'bar':<66} {'figure':>22} {'bar':>7} {'ratio':>6}  verdict")
    for v in res["bars"]:
        fig = v["figure"] if isinstance(v["figure"], str) else _f(v["figure"], ".3f")
        print(f"{v['bar']:<66} {fig:>22} {v['limit']!s:>7} {_f(v['ratio'], '.3f'):>6}  "
              f"{'PASS' if v['met'] else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--outage", type=float, default=60.0, help="s the hub stays down")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tps", type=float, default=1000.0, help="offered by the acquirers")
    ap.add_argument("--down", choices=("kill", "stop"), default="kill",
                    help="kill: SIGKILL supervisor + hub nats-server; stop: mixer stop")
    ap.add_argument("--between", type=float, default=20.0,
                    help="s of traffic with the hub up before each outage")
    ap.add_argument("--catch-up-max", type=float, default=120.0,
                    help="s to wait for the hub to catch up before calling it failed")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work dir and print its path")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mixer-outage-"))
    try:
        res = asyncio.run(bench(args, work))
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.update(bench="mixer_outage", nruns=args.runs, between_s=args.between,
               terminals=TERMINALS, date=time.strftime("%Y-%m-%d %H:%M:%S"),
               machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    res["bars"] = verdicts(res)
    print_report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if all(v["met"] for v in res["bars"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
