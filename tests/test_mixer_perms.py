"""The hostile permission matrix of a real Mixer and two real linked racks.

The first two tests run ``mixer start`` and two racks enrolled with the real CLI (rack-a
and rack-b, small generator rigs whose ``EV`` stream the hub sources as ``EV_<rack>``) and
try from the wrong side what ``docs/mixer-design.md`` sections 5 and 6 forbid:

* rack-a speaking for rack-b (its stats, hello, business, source and ``down`` subjects) and
  rack-a hearing rack-b (its stats, hello, business events, what the hub sends rack-b);
* rack-a calling the hub's or rack-b's JetStream API, and the hub (its users and its own
  JetStream) calling a rack's.

The last two run the Mixer alone: anonymous, wrong-password and junk connections on the
hub's client and leaf ports, and the hub's own users' passwords on the leaf port.

A negative ("never arrives") is proven by an allowed message sent after the forbidden one
on the same path and awaited first: a marker on the same leaf link, or, for the hub's
JetStream, a consumer reset it may send after the consumer create it may not.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from mixerutil import MixerProcess, enrol, hub_ports, init_hub, racks
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ExternalStream, StreamConfig, StreamSource
from rackutil import RackProcess, rig, uid

from engine.bus import load_auth
from engine.cbor import dumps
from engine.streams import ensure_hub_consumer
from mixer.registryproc import hub_stream_config

N = 40  # events each rack's generator makes; all of them at the hub before the attacks
FORGED = b"forged-by-a"  # in every payload rack-a forges: found anywhere else, it leaked
REFUSED = (NoRespondersError, NatsTimeout, asyncio.TimeoutError)


# --- a Mixer and two racks ------------------------------------------------------------------


@dataclass
class Fleet:
    """A running Mixer, both racks enrolled; racks started on demand."""

    tmp: Path
    hub: Path
    mixer: MixerProcess
    ids: dict[str, str]
    passports: dict[str, Path]
    racks: dict[str, RackProcess] = field(default_factory=dict)

    def start(self, who: str) -> RackProcess:
        """Start rack ``who`` ("a" or "b"): N events into its ``EV`` stream, stats every
        0.2 s, linked with its passport."""
        d = self.tmp / who
        d.mkdir()
        config = rig(d, self.ids[who], count=N, rate=400, telemetry={"interval": 0.2},
                     mixer={"passport": str(self.passports[who])})
        rack = RackProcess(config, d / "data")
        self.racks[who] = rack
        return rack

    def hub_password(self, user: str) -> str:
        return json.loads((self.hub / "nats-users.json").read_text())[user]

    @property
    def hub_url(self) -> str:
        return f"nats://127.0.0.1:{hub_ports(self.hub)[0]}"


@pytest.fixture
def mixer_only(tmp_path: Path) -> Iterator[Fleet]:
    """A running Mixer, no rack enrolled."""
    hub = init_hub(tmp_path)
    m = MixerProcess(hub)
    f = Fleet(tmp_path, hub, m, {}, {})
    try:
        yield f
    finally:
        for rack in f.racks.values():
            rack.close()
        m.close()


@pytest.fixture
def fleet(mixer_only: Fleet) -> Fleet:
    """The Mixer with rack-a and rack-b enrolled through the CLI (not started yet)."""
    for who in ("a", "b"):
        mixer_only.ids[who] = uid(f"perm{who}")
        mixer_only.passports[who] = enrol(mixer_only.hub, mixer_only.ids[who])
    return mixer_only


# --- clients --------------------------------------------------------------------------------


class Listener:
    """Every message of one subscription, in order, and a way to await one of them."""

    def __init__(self) -> None:
        self.msgs: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.msgs.append((msg.subject, msg.data))
        self._arrived.set()

    async def until(self, pred: Callable[[str, bytes], bool], what: str,
                    timeout: float = 20.0) -> None:
        """Until a message matching ``pred`` has arrived."""
        deadline = time.monotonic() + timeout
        while not any(pred(s, d) for s, d in self.msgs):
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass

    def leaked(self, pred: Callable[[str, bytes], bool]) -> list[tuple[str, bytes]]:
        return [(s, d[:80]) for s, d in self.msgs if pred(s, d)]


async def listen(nc: Client, *subjects: str) -> Listener:
    lst = Listener()
    for s in subjects:
        await nc.subscribe(s, cb=lst.on_msg)
    await nc.flush()
    return lst


async def hub_client(f: Fleet, user: str = "admin", **opts) -> Client:
    return await nats.connect(f.hub_url, user=user, password=f.hub_password(user),
                              allow_reconnect=False, **opts)


async def rack_client(f: Fleet, who: str, **opts) -> Client:
    """The rack's admin on its own embedded nats-server (it may do anything there)."""
    rack = f.racks[who]
    auth = load_auth(rack.data_dir)
    assert auth is not None
    return await nats.connect(rack.state["nats_url"], user=auth.user, password=auth.password,
                              allow_reconnect=False, **opts)


async def count(nc: Client, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def wait_count(nc: Client, stream: str, n: int, timeout: float = 30.0) -> None:
    """Poll (JetStream state in another process: no event) until ``stream`` holds ``n``."""
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        try:
            got = await count(nc, stream)
        except nats.js.errors.NotFoundError:
            got = -1
        if got == n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"stream {stream}: expected {n} messages, has {got} after {timeout} s")


async def last_seq(nc: Client, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.last_seq


async def wait_seq(nc: Client, stream: str, n: int, timeout: float = 30.0) -> None:
    """Poll until a rack's ``stream`` has stored ``n`` events (a linked stream keeps an event
    only until the hub has it: its count drops, its last sequence does not)."""
    deadline = time.monotonic() + timeout
    while (got := await last_seq(nc, stream)) != n:
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream}: expected last_seq {n}, got {got}")
        await asyncio.sleep(0.1)


async def refused(nc: Client, subject: str, payload: bytes = b"",
                  timeout: float = 1.5) -> str:
    """The request's fate: ``refused`` (no responders or no answer) or the answer."""
    try:
        reply = await nc.request(subject, payload, timeout=timeout)
    except REFUSED:
        return "refused"
    return f"answered: {reply.data[:160]!r}"


# --- 1. speaking for and hearing another rack -----------------------------------------------


def test_a_rack_can_neither_speak_for_another_rack_nor_hear_it(fleet: Fleet):
    a, b = fleet.ids["a"], fleet.ids["b"]
    asyncio.run(_speak_and_hear(fleet, a, b))
    # the registry's view of rack-b is rack-b's own hello, not the forged one
    row = next(r for r in racks(fleet.hub) if r["id"] == b)
    assert row["version"] != "forged" and row["rig_hash"] != "f" * 64, row
    assert fleet.mixer.proc.poll() is None


async def _speak_and_hear(f: Fleet, a: str, b: str) -> None:
    admin = await hub_client(f)
    registry = await hub_client(f, "registry")
    js = admin.jetstream()
    # a hub stream capturing both racks' business subjects: anything of theirs that
    # reaches the hub's account lands here (no hub user may subscribe them)
    await js.add_stream(StreamConfig(name="SPY", subjects=[f"fluxrig.{a}.>", f"fluxrig.{b}.>"]))
    at_hub = await listen(registry, "fluxrig.stats.*", "fluxrig.up.>")
    await asyncio.to_thread(f.start, "a")
    rack_a = await rack_client(f, "a")
    on_a = await listen(rack_a, ">")  # from before rack-b exists: it hears all rack-b says
    await asyncio.to_thread(f.start, "b")
    rack_b = await rack_client(f, "b")
    on_b = await listen(rack_b, ">")
    forger = await rack_client(f, "a")
    try:
        await wait_count(admin, f"EV_{a}", N)
        await wait_count(admin, f"EV_{b}", N)
        await wait_seq(rack_b, "EV", N)
        # the listener works: it heard rack-b's own hello and stats
        await at_hub.until(lambda s, d: s == f"fluxrig.up.{b}.hello", "rack-b's hello at the hub")
        await at_hub.until(lambda s, d: s == f"fluxrig.stats.{b}", "rack-b's stats at the hub")
        before_b = await js.stream_info(f"EV_{b}")

        # rack-a speaks for rack-b, then says something it may say, on the same link
        hello = dumps({"rack": b, "version": "forged", "rig_hash": "f" * 64,
                       "streams": ["FORGED"], "started_ns": 1, "note": FORGED.decode()})
        for subject, data in ((f"fluxrig.stats.{b}", FORGED),
                              (f"fluxrig.up.{b}.hello", hello),
                              (f"fluxrig.up.{b}.applied", FORGED),
                              (f"fluxrig.{b}.events", FORGED),
                              (f"fluxrig.src.{b}.EV", FORGED),
                              (f"fluxrig.down.{b}.req.status", FORGED),
                              (f"fluxrig.down.{b}.inbox.x", FORGED)):
            await forger.publish(subject, data)
        await forger.flush()
        await forger.publish(f"fluxrig.up.{a}.marker", b"after")
        # rack-a's own business event: its stream's copy reaches the hub, the event does not
        await forger.jetstream().publish(f"fluxrig.{a}.events", b"own business")
        await at_hub.until(lambda s, d: s == f"fluxrig.up.{a}.marker", "rack-a's marker")
        await wait_count(admin, f"EV_{a}", N + 1)

        # the hub speaks to rack-b: rack-a must hear none of it, and each its own
        await admin.publish(f"fluxrig.down.{b}.req.secret", b"for rack-b only")
        await admin.publish(f"fluxrig.down.{b}.inbox.secret", b"for rack-b only")
        await admin.publish(f"fluxrig.down.{a}.marker", b"for rack-a")
        await admin.publish(f"fluxrig.down.{b}.marker", b"for rack-b")
        await admin.flush()
        await on_a.until(lambda s, d: s == f"fluxrig.down.{a}.marker", "rack-a's down marker")
        await on_b.until(lambda s, d: s == f"fluxrig.down.{b}.marker", "rack-b's down marker")

        # nothing rack-a forged reached the hub (its users, its streams) or rack-b
        assert at_hub.leaked(lambda s, d: FORGED in d) == []
        assert on_b.leaked(lambda s, d: FORGED in d) == []
        assert await count(admin, "SPY") == 0  # no business subject of either rack crossed
        assert await last_seq(rack_b, "EV") == N  # the forged fluxrig.<b>.events: not stored
        after_b = await js.stream_info(f"EV_{b}")
        assert after_b.state.messages == N
        assert after_b.state.last_seq == before_b.state.last_seq
        names = await js.streams_info()
        assert f"FORGED_{b}" not in [s.config.name for s in names]
        # rack-a heard nothing of rack-b: its stats, hello, events, the hub's words to it
        # (rack-a's own forgeries, published on its own server, are left out)
        assert on_a.leaked(lambda s, d: (b in s.split(".") or b.encode() in d)
                           and FORGED not in d) == []
        heard_b = [s for s, _ in on_b.msgs]
        assert f"fluxrig.down.{b}.req.secret" in heard_b  # what rack-a missed was sent
        assert f"fluxrig.stats.{b}" in heard_b
    finally:
        for nc in (forger, rack_b, rack_a, registry, admin):
            await nc.close()


# --- 2. JetStream APIs across the link ------------------------------------------------------


def test_jetstream_apis_are_refused_across_the_link_in_both_directions(fleet: Fleet):
    fleet.start("a")
    fleet.start("b")
    a, b = fleet.ids["a"], fleet.ids["b"]
    outcome = asyncio.run(_jetstream_calls(fleet, a, b))
    assert outcome["rack_a_own_config"].startswith("answered"), outcome  # the path works
    for subject, fate in outcome["from_rack_a"].items():
        assert fate == "refused", (subject, fate)
    for subject, fate in outcome["from_hub"].items():
        assert fate == "refused", (subject, fate)
    assert outcome["probe_consumers"] == [], outcome  # the hub made no consumer on rack-a
    assert outcome["probe_messages"] == 0
    # and nothing changed anywhere: the hub's copies, the racks' streams and hub consumers
    assert outcome["hub_counts"] == {f"EV_{a}": N + 1, f"EV_{b}": N}, outcome
    assert outcome["rack_ev"] == {a: [N + 1, ["hub"]], b: [N, ["hub"]]}, outcome
    assert outcome["rack_local"] == {a: LOCAL, b: LOCAL}, outcome


LOCAL = 3  # messages in a rack-local stream that a purge or delete would show


async def _jetstream_calls(f: Fleet, a: str, b: str) -> dict[str, Any]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    admin = await hub_client(f, error_cb=on_error)
    # rack-a asks with the inbox its hub permissions let answers reach (as its hublink
    # does): a refusal is then the request's, not the reply's
    rack_a = await rack_client(f, "a", inbox_prefix=f"fluxrig.down.{a}.inbox")
    rack_b = await rack_client(f, "b")
    try:
        await wait_count(admin, f"EV_{a}", N)
        await wait_count(admin, f"EV_{b}", N)
        # EV keeps an event only until the hub has it: a rack-local stream that holds its
        # messages shows what a purge or delete would do
        for nc, r in ((rack_a, a), (rack_b, b)):
            jsr = nc.jetstream()
            await jsr.add_stream(StreamConfig(name="LOCAL", subjects=[f"local.{r}"]))
            for i in range(LOCAL):
                await jsr.publish(f"local.{r}", b"%d" % i)
        out: dict[str, Any] = {}
        out["rack_a_own_config"] = await refused(
            rack_a, f"$JS.hub.API.CONSUMER.INFO.KV_fluxrig_config.cfg_{a}")
        from_a = ["$JS.hub.API.INFO", "$JS.hub.API.STREAM.NAMES",
                  f"$JS.hub.API.STREAM.INFO.EV_{b}", f"$JS.hub.API.STREAM.PURGE.EV_{b}",
                  f"$JS.hub.API.STREAM.DELETE.EV_{a}",
                  f"$JS.hub.API.CONSUMER.INFO.KV_fluxrig_config.cfg_{b}",
                  f"$JS.hub.API.CONSUMER.MSG.NEXT.KV_fluxrig_config.cfg_{b}",
                  f"$JS.{b}.API.INFO", f"$JS.{b}.API.STREAM.INFO.EV",
                  f"$JS.{b}.API.STREAM.PURGE.EV", f"$JS.{b}.API.STREAM.PURGE.LOCAL",
                  f"$JS.{b}.API.STREAM.DELETE.LOCAL", f"$JS.{b}.API.CONSUMER.DELETE.EV.hub"]
        fates = await asyncio.gather(*(refused(rack_a, s) for s in from_a))
        out["from_rack_a"] = dict(zip(from_a, fates, strict=True))
        api = f"$JS.{a}.API"
        from_hub = {f"{api}.INFO": b"", f"{api}.STREAM.INFO.EV": b"",
                    f"{api}.STREAM.PURGE.EV": b"", f"{api}.STREAM.DELETE.EV": b"",
                    f"{api}.STREAM.PURGE.LOCAL": b"", f"{api}.STREAM.DELETE.LOCAL": b"",
                    f"{api}.CONSUMER.DELETE.EV.hub": b"",
                    f"{api}.DIRECT.GET.LOCAL": b'{"seq": 1}',
                    f"{api}.CONSUMER.CREATE.EV.x": json.dumps(
                        {"stream_name": "EV", "config": {"name": "x", "ack_policy": "none",
                                                         "deliver_policy": "all"}}).encode()}
        fates = await asyncio.gather(*(refused(admin, s, p) for s, p in from_hub.items()))
        out["from_hub"] = dict(zip(from_hub, fates, strict=True))
        out["admin_errors"] = list(errors)

        # the hub's own JetStream (no user permission in its way) sources rack-a's LOCAL
        # twice: PROBE through an ephemeral consumer it must create there (the rack's
        # deny_imports refuse CONSUMER.CREATE), then LOCAL_<a> through a durable ``hub``
        # consumer it only resets (allowed). The reset and its copy come after the create
        # on the same link: once LOCAL_<a> holds everything, the create had its chance.
        jsa = rack_a.jetstream()
        await ensure_hub_consumer(jsa, a, "LOCAL")
        made = await listen(rack_a, "$JS.EVENT.ADVISORY.CONSUMER.CREATED.>")
        js = admin.jetstream()
        await js.add_stream(StreamConfig(name="PROBE", subjects=[], sources=[StreamSource(
            name="LOCAL", external=ExternalStream(api=f"$JS.{a}.API"))]))
        await js.add_stream(hub_stream_config("LOCAL", a))
        await wait_count(admin, f"LOCAL_{a}", LOCAL)
        out["probe_consumers"] = [s.rsplit(".", 1)[1] for s, _ in made.msgs]
        out["probe_messages"] = await count(admin, "PROBE")

        # the hub's consumer survived all that: a new event on rack-a still reaches the hub
        await jsa.publish(f"fluxrig.{a}.events", b"after the attacks")
        await wait_count(admin, f"EV_{a}", N + 1)
        out["hub_counts"] = {s: await count(admin, s) for s in (f"EV_{a}", f"EV_{b}")}
        out["rack_ev"] = {r: [await last_seq(nc, "EV"),
                              sorted(c.name for c in await nc.jetstream().consumers_info("EV"))]
                          for nc, r in ((rack_a, a), (rack_b, b))}
        out["rack_local"] = {r: await count(nc, "LOCAL") for nc, r in ((rack_a, a), (rack_b, b))}
        return out
    finally:
        for nc in (rack_b, rack_a, admin):
            await nc.close()


# --- 3. who may connect to the hub at all ---------------------------------------------------


def _read_all(sock: socket.socket | ssl.SSLSocket, timeout: float = 5.0,
              until: bytes | None = None) -> tuple[bytes, bool]:
    """What the server sends until it closes (True), goes quiet for ``timeout`` or sends
    ``until`` (False)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
            if until is not None and until in got:
                return got, False
    except (TimeoutError, socket.timeout):
        return got, False
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    return got, True


def _tls(leaf_port: int, ca: Path) -> ssl.SSLSocket:
    """A TLS connection to the hub's leaf port that trusts the hub (INFO read first: the
    server speaks before the handshake)."""
    raw = socket.create_connection(("127.0.0.1", leaf_port), timeout=5)
    info = b""
    while not info.endswith(b"\r\n"):
        info += raw.recv(1)
    assert info.startswith(b"INFO "), info
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_the_hub_refuses_anonymous_wrong_passwords_and_junk_on_both_ports(mixer_only: Fleet):
    fleet = mixer_only
    port, leaf = hub_ports(fleet.hub)
    ca = fleet.hub / "pki" / "ca.pem"
    admin_pw = fleet.hub_password("admin")

    async def clients() -> dict[str, str]:
        out = {}
        for name, opts in (("anonymous", {}),
                           ("admin wrong password", {"user": "admin", "password": "nope"}),
                           ("registry with admin's password",
                            {"user": "registry", "password": admin_pw}),
                           ("rack id as user", {"user": "rack-x", "password": "x"})):
            try:
                nc = await nats.connect(fleet.hub_url, allow_reconnect=False,
                                        max_reconnect_attempts=0, connect_timeout=3, **opts)
            except Exception as exc:
                out[name] = f"refused: {exc}"
            else:
                out[name] = "accepted"
                await nc.close()
        nc = await nats.connect(fleet.hub_url, user="admin", password=admin_pw,
                                allow_reconnect=False)
        out["admin"] = "accepted"
        await nc.close()
        return out

    fates = asyncio.run(clients())
    assert fates["admin"] == "accepted"  # the listener and the test's clients work
    for name in ("anonymous", "admin wrong password", "registry with admin's password",
                 "rack id as user"):
        assert fates[name].startswith("refused") and "Authorization" in fates[name], fates

    # client port: junk instead of CONNECT is answered with an error and closed
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage\r\nMORE GARBAGE\r\n")
        got, closed = _read_all(s)
    assert got.startswith(b"INFO ") and closed and b"-ERR" in got, got

    # leaf port, plain TCP: junk where the TLS handshake should be
    with socket.create_connection(("127.0.0.1", leaf), timeout=5) as s:
        s.sendall(b"CONNECT {}\r\nPING\r\n" + bytes(range(256)) * 4)
        got, closed = _read_all(s)
    assert closed and b"PONG" not in got, got

    # leaf port, valid TLS: junk, then log-ins without or with wrong credentials
    attempts = {"junk": b"\x00\x01garbage\r\n" * 8,
                "anonymous": b'CONNECT {"tls_required": true}\r\nPING\r\n',
                "wrong password": b'CONNECT {"user": "admin", "pass": "nope"}\r\nPING\r\n',
                "rack id, no key": b'CONNECT {"name": "rack-x", "user": "rack-x"}\r\nPING\r\n'}
    for name, data in attempts.items():
        with _tls(leaf, ca) as s:
            s.sendall(data)
            got, closed = _read_all(s)
        assert closed, (name, got)
        assert b"PONG" not in got and b"LS+" not in got, (name, got)
        if name != "junk":
            assert b"Authorization Violation" in got, (name, got)
    assert fleet.mixer.proc.poll() is None
    assert "panic" not in fleet.mixer.output().lower()


def test_the_leaf_port_admits_rack_nkeys_only_not_the_hubs_local_users(mixer_only: Fleet):
    """The hub's own users (``nats-users.json``) are for its loopback client port (design
    section 6); the leaf port is the one racks reach over the network. A leaf log-in with
    their passwords must be refused there like any other."""
    _, leaf = hub_ports(mixer_only.hub)
    ca = mixer_only.hub / "pki" / "ca.pem"
    fates = {}
    for user in ("admin", "registry", "sys"):
        connect = {"user": user, "pass": mixer_only.hub_password(user)}
        with _tls(leaf, ca) as s:
            s.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            got, closed = _read_all(s, until=b"PONG")
        if closed and b"Authorization Violation" in got:
            fates[user] = "refused"
        else:  # the server's INFO after a log-in names the account the leaf is bound to
            account = json.loads(got.split(b"\r\n", 1)[0][5:]).get("remote_account")
            fates[user] = (f"admitted as a leaf: account={account}, "
                           f"pong={b'PONG' in got}, interest={got.count(b'LS+')}")
    assert fates == dict.fromkeys(fates, "refused"), fates
