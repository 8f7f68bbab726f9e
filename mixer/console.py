"""The Mixer console: a web page on the fleet, its transactions and its namespace, and the
JSON API under ``/api/v1/`` that the page and scripts use (``docs/console.md``).

Theory of operation
-------------------
A process of ``mixer start`` (``console.enabled``), serving aiohttp on the socket the
supervisor bound before forking (a busy port stops the start with a clear message):

* **who** — every route but ``/login`` needs a session cookie (``POST /login``) or an API
  token (``Authorization: Bearer fxc_...``), else 401; ``mixer.consoleauth`` keeps users
  (scrypt) and tokens (SHA-256) in the hub data dir. Roles: ``viewer`` reads, ``admin`` also
  deploys and rolls back. Failed logins are limited per address (429 past
  ``login_attempts`` a minute);
* **limits** — ``max_clients`` connections at once (503 past it: a live page holds one),
  request bodies of 256 KiB at most, a strict content security policy (the page loads only
  its own script and style);
* **live** — once a second the console asks the registry (its local socket) for ``top`` and
  ``racks``, merges them on a ``FleetBoard`` and sends the rows that changed to every
  ``/api/v1/fleet/events`` stream (server-sent events). A client too slow to take them is
  sent ``reset`` and reloads the fleet;
* **data** — ``mixer.consoledata``: the audit trail (DuckDB, bound parameters), the hub's
  UNS copies and config history (direct gets as the hub user ``console``); every text goes
  out through ``mask_pans``.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import signal
import socket
import time
import urllib.parse
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web
from nats.aio.client import Client

from engine.bus import BusAuth, close_quietly, connect
from engine.config import ConfigError
from engine.plan import Runtime, signal_ready
from mixer import deploy as deploys
from mixer.consoleapi import OPENAPI
from mixer.consoleauth import Credentials, Principal
from mixer.consoledata import (
    AuditReader,
    DataError,
    TxnQuery,
    UnsReader,
    ask,
    mask_pans,
    present,
)
from mixer.consolefleet import FleetBoard
from mixer.hubconf import CONFIG_BUCKET
from mixer.settings import ConsoleSettings

log = logging.getLogger("fluxrig.console")

STATIC: Final = Path(__file__).parent / "console_static"
ASSETS: Final = {"app.js": "text/javascript", "app.css": "text/css"}
COOKIE: Final = "fx_session"
MAX_BODY: Final = 256 << 10
FEED_INTERVAL: Final = 1.0
CLIENT_QUEUE: Final = 8           # updates waiting for one live client before ``reset``
PING_EVERY: Final = 15.0
BODY_TIMEOUT: Final = 10.0        # seconds to send a request body
HEADER_TIMEOUT: Final = 10.0      # seconds from connecting to a whole request head
KEEPALIVE: Final = 15.0           # seconds an idle kept-alive connection stays open
STREAMS_PER_USER: Final = 4       # live event streams one user may hold
RACK_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PATH_RE: Final = re.compile(r"^[^\s*>]{1,400}$")
CSP: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
WHO: Final = web.RequestKey("who", Principal)
SECURITY: Final = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@dataclass(slots=True)
class ConsoleState:
    """What the handlers share (one per process)."""

    data_dir: Path
    settings: ConsoleSettings
    creds: Credentials
    board: FleetBoard = field(default_factory=FleetBoard)
    audit: AuditReader | None = None
    nc: Client | None = None
    clients: set[asyncio.Queue[bytes | None]] = field(default_factory=set)
    failures: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    streams: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    active: int = 0
    registry_ok: bool = False
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.audit = AuditReader(self.data_dir)


STATE: Final = web.AppKey("state", ConsoleState)


# -- responses ------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> web.Response:
    """A JSON answer; everything goes through ``present`` (times as text, ids as UUIDs,
    card numbers masked)."""
    return web.Response(body=orjson.dumps(present(obj)), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _who(request: web.Request) -> Principal | None:
    st = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return st.creds.token(auth[7:].strip())
    cookie = request.cookies.get(COOKIE)
    return st.creds.session(cookie) if cookie else None


OPEN_ROUTES: Final = frozenset({"/login"})


@web.middleware
async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Limits, authentication and the security headers, for every route."""
    st = request.app[STATE]
    if st.active >= st.settings.max_clients:
        return _error(503, "too many connections")
    st.active += 1
    try:
        if request.path not in OPEN_ROUTES:
            who = _who(request)
            if who is None:
                if request.path.startswith("/api/"):
                    return _error(401, "log in first (POST /login) or send a bearer token")
                return web.Response(status=401, content_type="text/html", text=(
                    "<!doctype html><meta http-equiv='refresh' content='0; url=/login'>"
                    "<title>401</title><a href='/login'>Log in</a>"))
            request[WHO] = who
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = exc
    finally:
        st.active -= 1
    if not resp.prepared:  # an event stream sent its own (``SECURITY``) already
        for k, v in SECURITY.items():
            resp.headers.setdefault(k, v)
    return resp


def _admin(request: web.Request) -> Principal | None:
    who: Principal = request[WHO]
    return who if who.admin else None


# -- login ----------------------------------------------------------------------------------
LOGIN_CSP: Final = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                    "frame-ancestors 'none'; base-uri 'none'")


async def login_page(request: web.Request) -> web.Response:
    """The one page without a login: a plain form (no script), its style inline."""
    html = (STATIC / "login.html").read_text()
    note = ("<p class=err>Wrong user or password.</p>" if "failed" in request.query else
            "<p class=err>Too many failed logins: wait a minute.</p>"
            if "wait" in request.query else "")
    return web.Response(text=html.replace("<!--note-->", note), content_type="text/html",
                        headers={"Content-Security-Policy": LOGIN_CSP})


async def _body(request: web.Request) -> bytes:
    """The request's body within ``BODY_TIMEOUT``: a client sending it slowly would hold a
    connection slot for ever (a hostile probe locked everyone out with 64 of them)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body too slow") from None


async def login(request: web.Request) -> web.Response:
    st = request.app[STATE]
    peer = request.remote or "?"
    is_form = request.content_type != "application/json"
    body = await _body(request)
    try:
        form: Any = (orjson.loads(body) if not is_form
                     else dict(urllib.parse.parse_qsl(body.decode(), max_num_fields=8)))
        if not isinstance(form, dict):
            raise ValueError("not an object")
        name, password = str(form.get("user", "")), str(form.get("password", ""))
    except (ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
        return _error(400, "expected JSON or a form with user and password")
    # attempts are counted per address and user, and reserved before the check: parallel
    # guesses all count (they once all got through), and behind a proxy (one address for
    # everybody) a stranger locks out the user it guesses at, not every user
    now = time.monotonic()
    recent = st.failures[f"{peer} {name[:64]}"]
    while recent and now - recent[0] > 60.0:
        recent.popleft()
    if len(recent) >= st.settings.login_attempts:
        return web.Response(status=429, headers={"Retry-After": "60"},
                            text="too many failed logins: wait a minute")
    recent.append(now)
    # scrypt takes tens of ms: off the event loop, the live pages keep moving
    who = await asyncio.get_running_loop().run_in_executor(None, st.creds.login, name,
                                                           password)
    if who is None:
        # the name as typed, escaped (no forged lines) and masked (a card number typed
        # into the user field stays out of the log)
        log.warning("console login refused: user=%r, address=%s", mask_pans(name[:64]), peer)
        if is_form:
            return web.Response(status=303, headers={"Location": "/login?failed=1"})
        return _error(401, "wrong user or password")
    recent.remove(now)  # a good login is no failure
    log.info("console login: user=%s, role=%s, address=%s", who.name, who.role, peer)
    resp: web.Response = (web.Response(status=303, headers={"Location": "/"}) if is_form
                          else _json({"user": who.name, "role": who.role}))
    resp.set_cookie(COOKIE, st.creds.issue(who, st.settings.session_ttl), httponly=True,
                    samesite="Strict", path="/", max_age=int(st.settings.session_ttl))
    return resp


async def logout(request: web.Request) -> web.Response:
    resp = _json({"ok": True})
    resp.del_cookie(COOKIE, path="/")
    return resp


async def me(request: web.Request) -> web.Response:
    who: Principal = request[WHO]
    return _json({"user": who.name, "role": who.role})


# -- the page -------------------------------------------------------------------------------
async def index(request: web.Request) -> web.Response:
    return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:  # an allow-list, not a path: nothing else is served
        raise web.HTTPNotFound()
    return web.Response(body=(STATIC / name).read_bytes(), content_type=ASSETS[name])


# -- fleet ----------------------------------------------------------------------------------
def _labels(request: web.Request) -> dict[str, str]:
    out = {}
    for item in request.query.getall("label", []):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise web.HTTPBadRequest(
                text=mask_pans(f"label: expected KEY=VALUE, got {item!r}"))
        out[k] = v
    return out


async def fleet(request: web.Request) -> web.Response:
    st = request.app[STATE]
    # not through ``present``: the board's rows hold numbers, short names and masked
    # labels only, and 1,000 racks' rows are 76,000 values to walk (the page's load time)
    return web.Response(body=orjson.dumps({
        "version": st.board.version, "registry": st.registry_ok,
        "racks": st.board.rows(_labels(request))}), content_type="application/json")


async def fleet_events(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    who: Principal = request[WHO]
    if st.streams[who.name] >= STREAMS_PER_USER:  # one user cannot take every slot
        return _error(429, f"at most {STREAMS_PER_USER} live streams per user")
    resp = web.StreamResponse(headers={**SECURITY, "Content-Type": "text/event-stream"})
    st.streams[who.name] += 1
    try:
        return await _stream(st, request, resp)
    finally:
        st.streams[who.name] -= 1


async def _stream(st: ConsoleState, request: web.Request, resp: web.StreamResponse
                  ) -> web.StreamResponse:
    await resp.prepare(request)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)
    st.clients.add(queue)
    try:
        await resp.write(b"event: hello\ndata: " + orjson.dumps(
            {"version": st.board.version}) + b"\n\n")
        quiet = 0.0
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                # a client gone is noticed within a second (its slot and its place in the
                # per-user count freed), not at the next write
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                quiet += 1.0
                if quiet >= PING_EVERY:
                    quiet = 0.0
                    await resp.write(b": ping\n\n")
                continue
            quiet = 0.0
            if item is None:  # fell behind: the page reloads the fleet
                await resp.write(b"event: reset\ndata: {}\n\n")
                continue
            await resp.write(item)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        st.clients.discard(queue)
    return resp


def broadcast(st: ConsoleState, changed: list[dict[str, Any]]) -> None:
    """Queue one ``fleet`` event for every live client (``reset`` for one that lags)."""
    if not changed or not st.clients:
        return
    data = b"event: fleet\ndata: " + orjson.dumps(
        {"version": st.board.version, "racks": changed}) + b"\n\n"
    for q in list(st.clients):
        try:
            q.put_nowait(data)
        except asyncio.QueueFull:
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)


async def feed(st: ConsoleState, stopping: asyncio.Event) -> None:
    """Once a second: the registry's answers onto the board, the changes to the clients."""
    while not stopping.is_set():
        t0 = time.monotonic()
        try:
            top, racks = await asyncio.gather(ask(st.data_dir, "top"),
                                              ask(st.data_dir, "racks"))
            if not st.registry_ok:
                log.info("console: registry answering")
            st.registry_ok = True
            broadcast(st, st.board.update(top, racks))
        except DataError as exc:
            if st.registry_ok:
                log.warning("console: %s", exc)
            st.registry_ok = False
        try:
            await asyncio.wait_for(stopping.wait(),
                                   max(0.05, FEED_INTERVAL - (time.monotonic() - t0)))
        except TimeoutError:
            pass


# -- one rack -------------------------------------------------------------------------------
async def _config_history(nc: Client | None, rack: str) -> list[dict[str, Any]]:
    """The rack's config revisions the hub keeps (at most ``deploys.HISTORY``), oldest
    first: one message get per revision (the bucket allows no direct gets)."""
    if nc is None:
        return []
    subject = f"$KV.{CONFIG_BUCKET}.{deploys.key_of(rack)}"
    out: list[dict[str, Any]] = []
    seq = 1
    for _ in range(deploys.HISTORY):
        try:
            msg = await nc.jetstream().get_msg(f"KV_{CONFIG_BUCKET}", seq=seq, next=True,
                                                 subject=subject)
        except Exception:  # NotFoundError: no more; a missing bucket: none at all
            break
        if msg.seq is None or not msg.data:  # a delete marker carries no text
            if msg.seq is None:
                break
        else:
            out.append({"rev": msg.seq, "text": mask_pans(msg.data.decode(errors="replace"))})
        seq = (msg.seq or seq) + 1
    return out


async def rack(request: web.Request) -> web.Response:
    st = request.app[STATE]
    rack_id = request.match_info["rack"]
    row = st.board.row(rack_id)
    if row is None:
        return _error(404, f"no rack {rack_id!r}")
    try:
        detail = await ask(st.data_dir, "rack", {"rack": rack_id})
    except DataError as exc:
        return _error(503, str(exc))
    snap = detail.get("snapshot")
    if snap:
        st.board.observe_processes(rack_id, snap["processes"], snap["received_ns"])
        row = st.board.row(rack_id)
    history = await _config_history(st.nc, rack_id)
    config: dict[str, Any] = {"revisions": [], "state": None}
    if history:
        revs = [h["rev"] for h in history]
        cur, prev = history[-1], history[-2] if len(history) > 1 else None
        diff = "".join(difflib.unified_diff(
            (prev["text"] if prev else "").splitlines(keepends=True),
            cur["text"].splitlines(keepends=True),
            f"rev {prev['rev']}" if prev else "(none)", f"rev {cur['rev']}"))
        config = {"revisions": revs, "current": cur, "diff": diff}
    if st.nc is not None:
        try:
            state = (await deploys.states(st.nc.jetstream(), [rack_id]))[0]
            config["state"] = {"rev": state.rev, "applied": state.applied,
                               "status": state.status, "error": state.error}
        except Exception as exc:  # a hub without the buckets yet: no state to show
            log.debug("config state unavailable: rack=%s, error=%s", rack_id, exc)
    return _json({**(row or {}), "snapshot": snap, "config": config})


async def rack_config(request: web.Request) -> web.Response:
    st = request.app[STATE]
    rack_id = request.match_info["rack"]
    history = await _config_history(st.nc, rack_id)
    try:
        rev = int(request.query.get("rev", "0"))
    except ValueError:
        return _error(400, "rev: expected a number")
    for i, h in enumerate(history):
        if h["rev"] == rev:
            prev = history[i - 1] if i else None
            diff = "".join(difflib.unified_diff(
                (prev["text"] if prev else "").splitlines(keepends=True),
                h["text"].splitlines(keepends=True),
                f"rev {prev['rev']}" if prev else "(none)", f"rev {rev}"))
            return _json({"rev": rev, "text": h["text"], "diff": diff})
    return _error(404, f"rack {rack_id!r} has no revision {rev}")


async def rack_deploy(request: web.Request) -> web.Response:
    """Admins: ``{"text": RIG}`` deploys a new rig, ``{"rev": N}`` rolls back to N."""
    st = request.app[STATE]
    who = _admin(request)
    if who is None:
        return _error(403, "deploy and rollback need the admin role")
    if st.nc is None:
        return _error(503, "the hub is not reachable")
    rack_id = request.match_info["rack"]
    if st.board.row(rack_id) is None:
        return _error(404, f"no rack {rack_id!r}")
    try:
        body = orjson.loads(await _body(request))
    except orjson.JSONDecodeError as exc:
        return _error(400, f"expected JSON: {exc}")
    if not isinstance(body, dict) or ("rev" in body and type(body["rev"]) is not int) or (
            "rev" not in body and not isinstance(body.get("text"), str)):
        return _error(400, 'expected {"text": RIG} or {"rev": N} (an integer)')
    js = st.nc.jetstream()
    try:
        if "rev" in body:
            text = await deploys.revision(js, rack_id, body["rev"])
            what = f"rollback to rev {body['rev']}"
        else:
            text = str(body.get("text", ""))
            what = "deploy"
        deploys.check_for(text, f"console:{rack_id}", rack_id)
        revs = await deploys.deploy(js, text, [rack_id])
    except (deploys.DeployError, ConfigError, ValueError) as exc:
        return _error(400, mask_pans(str(exc)))
    log.info("console %s: rack=%s, rev=%s, by=%s", what, rack_id, revs[rack_id], who.name)
    return _json({"rack": rack_id, "rev": revs[rack_id], "what": what})


# -- transactions ---------------------------------------------------------------------------
def _int_arg(request: web.Request, name: str) -> int | None:
    v = request.query.get(name)
    if v in (None, ""):
        return None
    try:
        return int(str(v))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: expected an integer (minor units)") from None


async def transactions(request: web.Request) -> web.Response:
    st = request.app[STATE]
    q = request.query
    query = TxnQuery(terminal=q.get("terminal") or None, stan=q.get("stan") or None,
                     token=q.get("token") or None, rack=q.get("rack") or None,
                     de39=q.get("de39") or None, date_from=q.get("from") or None,
                     date_to=q.get("to") or None, amount_min=_int_arg(request, "amount_min"),
                     amount_max=_int_arg(request, "amount_max"),
                     limit=_int_arg(request, "limit") or 100)
    assert st.audit is not None
    try:
        rows = await asyncio.get_running_loop().run_in_executor(None, st.audit.search, query)
    except DataError as exc:
        return _error(400, str(exc))
    return _json({"transactions": rows})


async def transaction(request: web.Request) -> web.Response:
    st = request.app[STATE]
    assert st.audit is not None
    doc = await asyncio.get_running_loop().run_in_executor(
        None, st.audit.event, request.match_info["event_id"])
    return _json(doc) if doc else _error(404, "no such event in the audit trail")


async def daily(request: web.Request) -> web.Response:
    st = request.app[STATE]
    assert st.audit is not None
    day = request.query.get("date") or time.strftime("%Y-%m-%d", time.gmtime())
    try:
        doc = await asyncio.get_running_loop().run_in_executor(None, st.audit.daily, day)
    except DataError as exc:
        return _error(400, str(exc))
    return _json(doc)


# -- namespace ------------------------------------------------------------------------------
async def uns(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.nc is None:
        return _error(503, "the hub is not reachable")
    return _json({"samples": await UnsReader(st.nc).latest()})


async def uns_history(request: web.Request) -> web.Response:
    st = request.app[STATE]
    if st.nc is None:
        return _error(503, "the hub is not reachable")
    rack_id, path = request.query.get("rack", ""), request.query.get("path", "")
    if not RACK_RE.match(rack_id) or not PATH_RE.match(path):
        return _error(400, "rack (letters, digits, '-', '_') and path (no spaces or "
                           "wildcards) are required")
    try:
        since = float(request.query.get("since", str(time.time() - 3600)))
        if not 0 <= since < 4e9:
            raise ValueError(since)
    except ValueError:
        return _error(400, "since: expected epoch seconds")
    return _json({"rack": rack_id, "path": path,
                  "samples": await UnsReader(st.nc).history(rack_id, path, since)})


async def openapi(request: web.Request) -> web.Response:
    return _json(OPENAPI)


# -- the app and the process ----------------------------------------------------------------
ROUTES: Final = (
    ("GET", "/login", login_page), ("POST", "/login", login),
    ("GET", "/", index), ("GET", "/static/{name}", asset),
    ("POST", "/api/v1/logout", logout), ("GET", "/api/v1/me", me),
    ("GET", "/api/v1/fleet", fleet), ("GET", "/api/v1/fleet/events", fleet_events),
    ("GET", "/api/v1/racks/{rack}", rack), ("GET", "/api/v1/racks/{rack}/config", rack_config),
    ("POST", "/api/v1/racks/{rack}/deploy", rack_deploy),
    ("GET", "/api/v1/transactions", transactions),
    ("GET", "/api/v1/transactions/{event_id}", transaction),
    ("GET", "/api/v1/reports/daily", daily),
    ("GET", "/api/v1/uns", uns), ("GET", "/api/v1/uns/history", uns_history),
    ("GET", "/api/v1/openapi.json", openapi),
)


def build_app(st: ConsoleState) -> web.Application:
    """The console's aiohttp application over ``st``."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[STATE] = st
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app


class _Refused(asyncio.Protocol):
    """A connection past the cap: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Door:
    """The listener's protocol factory around aiohttp's: at most ``max_connections`` open
    connections (past it a new one is closed at once), and a connection that has not sent
    a whole request head within ``HEADER_TIMEOUT`` is closed. aiohttp has neither: a probe
    held 20,000 half-sent heads open until the process ran out of file descriptors."""

    def __init__(self, server: web.Server, max_connections: int):
        self.server = server
        self.max_connections = max_connections

    def __call__(self) -> asyncio.Protocol:
        if len(self.server.connections) >= self.max_connections:
            return _Refused()
        handler = self.server()
        asyncio.get_running_loop().call_later(HEADER_TIMEOUT, _head_due, handler)
        return handler


def _head_due(handler: Any) -> None:
    # aiohttp counts a request once its head is parsed; none yet: a slow or idle client
    if getattr(handler, "_request_count", 1) == 0 and handler.transport is not None:
        handler.force_close()
        handler.transport.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolePlan:
    """What the console process needs (built by ``mixer.supervisor`` before forking)."""

    data_dir: str
    hub_url: str
    password: str
    settings: ConsoleSettings


async def console_main(plan: ConsolePlan, rt: Runtime | None, name: str,
                       sock: socket.socket, stopping: asyncio.Event | None = None) -> None:
    """Serve on ``sock`` until SIGTERM (or ``stopping``)."""
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    if rt is not None:
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    data_dir = Path(plan.data_dir)
    st = ConsoleState(data_dir=data_dir, settings=plan.settings, creds=Credentials(data_dir))
    try:
        st.nc = await connect(plan.hub_url, BusAuth(user="console", password=plan.password),
                              "fluxrig-console", max_reconnect_attempts=-1,
                              reconnect_time_wait=0.5)
    except Exception as exc:  # the pages that need the hub say so; the rest serve
        log.warning("console: hub not reachable, UNS and deploys unavailable: %s", exc)
    runner = web.AppRunner(build_app(st), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0, keepalive_timeout=KEEPALIVE)
    await runner.setup()
    assert runner.server is not None
    listener = await loop.create_server(
        Door(runner.server, 4 * plan.settings.max_clients), sock=sock)
    host, port = sock.getsockname()[:2]
    log.info("console listening: url=http://%s:%d/, users=%d", host, port, len(st.creds.users))
    if not st.creds.users:
        log.warning("console has no users: add one with `mixer console user add NAME`")
    if rt is not None:
        signal_ready(rt, name)
    feeding = asyncio.create_task(feed(st, stopping))
    try:
        await stopping.wait()
    finally:
        feeding.cancel()
        for q in list(st.clients):
            q.put_nowait(None)
        listener.close()
        await runner.cleanup()
        if st.nc is not None:
            await close_quietly(st.nc)


def run_console(plan: ConsolePlan, rt: Runtime, name: str, sock: socket.socket) -> None:
    """Entry point in the forked child."""
    asyncio.run(console_main(plan, rt, name, sock))


__all__ = ["COOKIE", "ConsolePlan", "ConsoleState", "ROUTES", "broadcast", "build_app",
           "console_main", "feed", "run_console"]
