"""The hub's files that say who may connect: ``racks.json`` and ``nats-users.json``.

* ``racks.json`` (0600) lists every enrolled rack: id, **public** nkey, labels, when it was
  enrolled and, once revoked, when. ``mixer rack add/revoke`` change it under ``racks.lock``
  (``flock``), so two CLI calls never lose each other's change. The hub never keeps a seed.
* ``nats-users.json`` (0600) holds the generated passwords of the hub's own users:
  ``registry`` (the Mixer's registry process), ``traces`` (its traces process), ``admin``
  (the ``mixer`` CLI) and ``sys``
  (the system account: LEAFZ, kicks). Made on first use, never rewritten.

``HubServer`` is the hub's nats-server: ``engine.natsd.NatsServer`` with the config
``mixer.hubconf.render_hub_config`` renders from these files. ``reload`` re-renders and
signals it, which is how ``rack add`` and ``rack revoke`` take effect on a running hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.bus import write_private
from engine.natsd import NatsServer
from mixer.hubconf import (
    HUB_DOMAIN,
    HubPlan,
    RackUser,
    check_rack_id,
    render_hub_config,
)
from mixer.pki import HubPki
from mixer.settings import MixerSettings

RACKS_FILE = "racks.json"
USERS_FILE = "nats-users.json"
LOCAL_USERS = ("registry", "admin", "sys", "sim", "archiver", "console", "traces")


class HubFileError(RuntimeError):
    """A hub file is missing, unreadable or says something impossible (the message names
    the file)."""


@dataclass(slots=True, kw_only=True)
class Enrolled:
    """One rack in ``racks.json``."""

    id: str
    nkey: str
    labels: dict[str, str] = field(default_factory=dict)
    enrolled: str = ""
    revoked: str = ""  # RFC 3339 time of the revocation, "" while the rack may link


def read_racks(data_dir: Path) -> list[Enrolled]:
    """Every rack ever enrolled (revoked ones too), in file order.

    Raises:
        HubFileError: the file is not valid (names file and entry).
    """
    path = data_dir / RACKS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise HubFileError(f"{path}: unreadable: {exc}") from None
    out = []
    for i, item in enumerate(raw.get("racks", []) if isinstance(raw, dict) else [None]):
        try:
            out.append(Enrolled(id=item["id"], nkey=item["nkey"],
                                labels=dict(item.get("labels", {})),
                                enrolled=item.get("enrolled", ""),
                                revoked=item.get("revoked", "")))
        except (TypeError, KeyError, ValueError):
            raise HubFileError(f"{path}: racks[{i}]: expected {{id, nkey, labels, enrolled, "
                               f"revoked}}") from None
    return out


@contextlib.contextmanager
def editing_racks(data_dir: Path) -> Iterator[list[Enrolled]]:
    """Read ``racks.json`` under its lock; what the caller leaves in the list is written
    back (atomically, 0600) when the block ends without an exception."""
    fd = os.open(data_dir / "racks.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        racks = read_racks(data_dir)
        yield racks
        text = json.dumps({"racks": [vars_of(r) for r in racks]}, indent=1) + "\n"
        write_private(data_dir / RACKS_FILE, text)
    finally:
        os.close(fd)


def vars_of(r: Enrolled) -> dict[str, object]:
    """``r`` as its JSON object."""
    return {"id": r.id, "nkey": r.nkey, "labels": r.labels, "enrolled": r.enrolled,
            "revoked": r.revoked}


def local_users(data_dir: Path) -> dict[str, str]:
    """User -> password of the hub's own users, generated (0600) on first use."""
    path = data_dir / USERS_FILE
    try:
        users = json.loads(path.read_text())
    except FileNotFoundError:
        users = {}
    except (OSError, ValueError) as exc:
        raise HubFileError(f"{path}: unreadable: {exc}") from None
    if not isinstance(users, dict) or not all(isinstance(users.get(u, ""), str)
                                              for u in LOCAL_USERS):
        raise HubFileError(f"{path}: expected {{user: password}}")
    if any(u not in users for u in LOCAL_USERS):
        users = {u: users.get(u) or secrets.token_urlsafe(24) for u in LOCAL_USERS}
        write_private(path, json.dumps(users, indent=1) + "\n")
    return users


def user_entries(users: dict[str, str], simulator: bool = False) -> list[dict[str, object]]:
    """The hub's own users as nats-server entries (``sys`` lives in the SYS account);
    ``sim`` (it may speak for every rack: fleet load tests) only with ``simulator``.

    ``registry`` hears the racks' stats, hellos and the CLI's questions and manages the
    hub's streams; no hub user may subscribe ``fluxrig.src.>`` or ``fluxrig.>`` (sourced
    deliveries would reach it under the racks' business subjects).
    """
    entries: list[dict[str, object]] = [
        {"user": "registry", "password": users["registry"], "permissions": {
            "publish": {"allow": [f"$JS.{HUB_DOMAIN}.API.>", "$JS.API.>", "fluxrig.down.>",
                                  "_INBOX.>", "$KV.fluxrig_applied.>"]},
            "subscribe": {"allow": ["fluxrig.stats.*", "fluxrig.up.>", "fluxrig.mixer.>",
                                    "_INBOX.>"]},
            "allow_responses": True}},
        # the archiver: read-only on the hub's streams, its own consumers, acks for them
        {"user": "archiver", "password": users["archiver"], "permissions": {
            "publish": {"allow": [
                "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.MSG.GET.*",
                "$JS.API.CONSUMER.CREATE.*.archiver",
                "$JS.API.CONSUMER.CREATE.*.archiver.>", "$JS.API.CONSUMER.DURABLE.CREATE.*.archiver",
                "$JS.API.CONSUMER.DELETE.*.archiver",
                "$JS.API.CONSUMER.INFO.*.archiver", "$JS.API.CONSUMER.MSG.NEXT.*.archiver",
                "$JS.ACK.*.archiver.>", "$JS.ACK.*.*.*.archiver.>"]},
            "subscribe": {"allow": ["_INBOX.>"]}}},
        # the console: reads the hub's streams by direct gets (UNS copies, config history);
        # deploys and rolls back for its admins (the config bucket and its consumers only)
        {"user": "console", "password": users["console"], "permissions": {
            "publish": {"allow": [
                "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.INFO.*", "$JS.API.DIRECT.GET.>", "$JS.API.STREAM.MSG.GET.*",
                "$JS.API.STREAM.CREATE.KV_fluxrig_config",
                "$JS.API.STREAM.CREATE.KV_fluxrig_applied",
                "$JS.API.CONSUMER.CREATE.KV_fluxrig_config.>",
                "$JS.API.CONSUMER.DURABLE.CREATE.KV_fluxrig_config.>",
                "$JS.API.CONSUMER.INFO.KV_fluxrig_config.>", "$KV.fluxrig_config.>",
                "_INBOX.>"]},
            "subscribe": {"allow": ["_INBOX.>"]}}},
        # the traces process: hears the racks' spans and logs, publishes nothing
        {"user": "traces", "password": users["traces"], "permissions": {
            "publish": {"deny": [">"]},
            "subscribe": {"allow": ["fluxrig.traces.*", "fluxrig.logs.*", "_INBOX.>"]}}},
        # admin (the CLI): `mixer logs --follow` hears the racks' log records live
        {"user": "admin", "password": users["admin"], "permissions": {
            "publish": {"allow": ["fluxrig.mixer.>", "fluxrig.down.>", f"$JS.{HUB_DOMAIN}.API.>",
                                  "$JS.API.>", "_INBOX.>", "$KV.fluxrig_config.>"]},
            "subscribe": {"allow": ["fluxrig.up.*.reply.>", "fluxrig.logs.*", "_INBOX.>"]}}},
    ]
    if simulator:
        entries.append({"user": "sim", "password": users["sim"], "permissions": {
            "publish": {"allow": ["fluxrig.stats.*", "fluxrig.up.*.hello", "fluxrig.traces.*",
                                  "fluxrig.logs.*"]},
            "subscribe": {"allow": ["_INBOX.>"]}}})
    return entries


class HubServer(NatsServer):
    """The hub's nats-server, its config rendered from the hub's files at each start and
    reload (revoked racks left out)."""

    def __init__(self, data_dir: Path, settings: MixerSettings):
        # resolved: the config names the store by path, and a reload refuses another text
        super().__init__(rack_id=HUB_DOMAIN, data_dir=data_dir.resolve(), host=settings.hub_host,
                         port=settings.hub_port)
        self.settings = settings

    def config_text(self) -> str:
        paths = HubPki.in_dir(self.data_dir)
        users = local_users(self.data_dir)
        plan = HubPlan(host=self.host, port=self.port, leaf_host=self.settings.leaf_host,
                       leaf_port=self.settings.leaf_port,
                       store_dir=str(self.data_dir / "jetstream"),
                       cert_file=str(paths.hub_cert), key_file=str(paths.hub_key),
                       log_file=str(self.log_path), sys_password=users["sys"])
        racks = []
        for r in read_racks(self.data_dir):
            if not r.revoked:
                check_rack_id(r.id)
                racks.append(RackUser(rack=r.id, nkey=r.nkey))
        return render_hub_config(plan, racks, user_entries(users, self.settings.simulator))
