"""The rack's NATS from the client side: who may do what (users, permissions), how each
process connects, and closing without hanging.

Security model
--------------
The embedded nats-server refuses anonymous clients. Every process role has a user of its
own, with a password generated at the rack's first start and kept in
``<data_dir>/nats-users.json`` (mode 0600; the server's config file is 0600 too), and
permissions limited to what the role does:

* ``egress``: publish to the subjects of the streams it owns and manage those streams
  (``$JS.API.STREAM.INFO|CREATE|UPDATE.<stream>``); nothing else;
* ``telemetry``: publish ``fluxrig.stats.<rack>``; nothing else;
* a gear that uses NATS declares its own (``Gear.bus_permissions``): the switch may work
  its SAF consumer and write its dead letters, and cannot read the TXN stream;
* ``admin``: everything, for the operator's tools (``engine`` subcommands read the file);
* operator-declared read-only users (``nats.users`` in the rig): consumers on the streams
  they name.

Every user gets its own inbox prefix (``_INBOX_<user>``) and may subscribe only there, so
no role can read another's replies. A rack on an external NATS (``nats.url``) connects every
process with the configured credentials (user/password, token, creds file, nkey seed, TLS).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client

USERS_FILE = "nats-users.json"
ADMIN = "admin"


@dataclass(frozen=True, slots=True, kw_only=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (NATS wildcards)."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BusAuth:
    """How one client authenticates (all empty: anonymous, tests' own servers only)."""

    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    nkey_seed_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    inbox_prefix: str = "_INBOX"


@dataclass(frozen=True, slots=True, kw_only=True)
class BusUser:
    """One user of the embedded server: name, password, permissions (None: all)."""

    name: str
    password: str
    permissions: Permissions | None = None

    @property
    def inbox(self) -> str:
        """The user's inbox prefix (a subject token: no dots)."""
        return "_INBOX_" + self.name.replace(".", "_")

    def auth(self) -> BusAuth:
        """What this user's process connects with."""
        return BusAuth(user=self.name, password=self.password, inbox_prefix=self.inbox)

    def server_entry(self) -> dict:
        """The user's entry in nats-server's ``authorization.users``."""
        entry: dict = {"user": self.name, "password": self.password}
        if self.permissions is not None:
            entry["permissions"] = {
                "publish": {"allow": list(self.permissions.publish) or ["_NOTHING_"]},
                "subscribe": {"allow": [f"{self.inbox}.>", *self.permissions.subscribe]},
            }
        return entry


def stream_admin(streams: Iterable[str]) -> tuple[str, ...]:
    """JetStream API subjects to look at, create and update ``streams``."""
    return tuple(f"$JS.API.STREAM.{op}.{s}" for s in streams for op in ("INFO", "CREATE",
                                                                         "UPDATE"))


def pull_consumer(stream: str, durable: str) -> tuple[str, ...]:
    """JetStream API subjects to create, inspect and work the durable pull consumer."""
    return (f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>")


def hub_consumer_admin(stream: str) -> tuple[str, ...]:
    """JetStream API subjects egress needs to make the durable ``hub`` consumer of
    ``stream`` (a Mixer hub sources the stream through it)."""
    return (f"$JS.API.CONSUMER.INFO.{stream}.hub",
            f"$JS.API.CONSUMER.DELETE.{stream}.hub",
            f"$JS.API.CONSUMER.CREATE.{stream}.hub",
            f"$JS.API.CONSUMER.CREATE.{stream}.hub.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.hub")


def stream_reader(streams: Iterable[str]) -> Permissions:
    """Read-only access to ``streams``: consumers of its own, message gets, stream info."""
    pub: list[str] = []
    for s in streams:
        pub += [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.MSG.GET.{s}",
                f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>",
                f"$JS.API.CONSUMER.CREATE.{s}", f"$JS.API.CONSUMER.CREATE.{s}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.>", f"$JS.API.CONSUMER.INFO.{s}.>",
                f"$JS.API.CONSUMER.DELETE.{s}.>", f"$JS.API.CONSUMER.MSG.NEXT.{s}.>",
                f"$JS.ACK.{s}.>"]
    return Permissions(publish=tuple(pub))


def rack_users(data_dir: Path, roles: Mapping[str, Permissions | None],
               extra: Iterable[BusUser] = ()) -> dict[str, BusUser]:
    """The embedded server's users: one per role (passwords made once and kept in
    ``<data_dir>/nats-users.json``, 0600), ``admin``, and ``extra`` (operator users)."""
    path = Path(data_dir) / USERS_FILE
    try:
        passwords = json.loads(path.read_text())
    except (OSError, ValueError):
        passwords = {}
    changed = False
    users = {}
    for name, perms in {ADMIN: None, **roles}.items():
        if not isinstance(passwords.get(name), str):
            passwords[name] = secrets.token_urlsafe(24)
            changed = True
        users[name] = BusUser(name=name, password=passwords[name], permissions=perms)
    for user in extra:
        users[user.name] = user
    if changed:
        write_private(path, json.dumps(passwords, indent=1, sort_keys=True))
    return users


def load_auth(data_dir: Path, user: str = ADMIN) -> BusAuth | None:
    """A tool's credentials for a rack's embedded NATS (None: the rack writes none)."""
    try:
        passwords = json.loads((Path(data_dir) / USERS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if user not in passwords:
        return None
    return BusUser(name=user, password=passwords[user]).auth()


def masked_url(url: str) -> str:
    """``url`` (or a comma-separated list of them) with any password or token in its user
    info replaced by ``***``: what logs, ``state.json``, ``engine status`` and ``engine
    check`` show. It never raises: a password may hold ``/``, ``#``, ``?`` or ``@`` unescaped,
    and a port may be garbage, so the URL is not parsed beyond ``scheme://`` and the last
    ``@``."""
    out = []
    for one in url.split(","):
        scheme, sep, rest = one.partition("://")
        if not sep:
            scheme, rest = "", one
        at = rest.rfind("@")
        if at >= 0:
            user, colon, _ = rest[:at].partition(":")
            rest = (f"{user}:***" if colon else "***") + rest[at:]
        out.append(f"{scheme}{sep}{rest}")
    return ",".join(out)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` and ``mode``, exclusively (never following a symlink,
    never replacing a file: key material and passports are not overwritten), and fsync it.

    Raises:
        FileExistsError: ``path`` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def connect(url: str, auth: BusAuth | None, name: str, **options: object) -> Client:
    """Connect to ``url`` as ``auth`` (None: anonymous). ``options`` go to nats-py.

    Raises:
        RuntimeError: a creds file or nkey seed is configured but the ``nkeys`` package
            (needed by nats-py for them) is not installed.
    """
    auth = auth or BusAuth()
    kwargs: dict = {"servers": [url], "name": name, "inbox_prefix": auth.inbox_prefix}
    if auth.user:
        kwargs.update(user=auth.user, password=auth.password)
    if auth.token:
        kwargs["token"] = auth.token
    if auth.creds_file or auth.nkey_seed_file:
        try:
            import nkeys  # noqa: F401 - nats-py imports it for creds and nkeys
        except ImportError:
            raise RuntimeError("nats creds_file / nkey_seed_file need the nkeys package: "
                               "pip install nkeys") from None
        if auth.creds_file:
            kwargs["user_credentials"] = auth.creds_file
        if auth.nkey_seed_file:
            kwargs["nkeys_seed"] = auth.nkey_seed_file
    if auth.tls_ca or auth.tls_cert:
        ctx = ssl.create_default_context(cafile=auth.tls_ca or None)
        if auth.tls_cert:
            ctx.load_cert_chain(auth.tls_cert, auth.tls_key or None)
        kwargs["tls"] = ctx
    kwargs.update(options)
    return await nats.connect(**kwargs)


async def close_quietly(nc: Client | None, timeout: float = 2.0) -> None:
    """Close ``nc`` without waiting on a server that is gone: nats-py's ``close`` flushes
    first and, with the server dead and reconnecting forever, can wait for ever — which once
    left a telemetry process alive after its rack was killed."""
    if nc is None:
        return
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except (TimeoutError, asyncio.CancelledError, OSError, Exception):  # noqa: BLE001
        pass  # closing on the way out: nothing left to report to


__all__ = ["ADMIN", "BusAuth", "BusUser", "Permissions", "close_quietly", "connect",
           "load_auth", "pull_consumer", "rack_users", "stream_admin",
           "stream_reader", "write_private"]
