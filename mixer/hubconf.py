"""The hub's nats-server configuration and each rack's permissions there — sans I/O.

``rack_permissions(rack)`` is the hub-side permission table of one rack's nkey user
(``docs/mixer-design.md`` section 6, verified against nats-server 2.15.1 in the design's
experiments): what a rack may publish into the hub (its stats, traces and logs, its ``up``
subjects, the deliveries of its sourced streams, answers to the hub's consumer resets, and
its own config consumer) and what it may receive (its ``down`` subjects, the hub's calls to its JetStream
API, flow control of its own consumers). Everything else — another rack's subjects, the
hub's JetStream API, ``$JS.FC.>`` of others — is refused by omission.

``render_hub_config`` writes the whole server config as JSON (valid nats-server syntax):
JetStream domain ``hub``, ``js_ack_fc_v2`` (flow-control subjects carry the rack name, so
permissions can be per rack), a TLS leaf-node listener that does not advertise, a system
account for LEAFZ and kicks (a config reload does not drop a revoked rack's live link).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.config import RESERVED_RACK_IDS
from engine.schema import NAME_RE

HUB_DOMAIN = "hub"
CONFIG_BUCKET = "fluxrig_config"
#: rack ids that would collide with the hub's own subject tokens
RESERVED_IDS = RESERVED_RACK_IDS  # fluxrig.<id>.> must not take a hub subject


class HubConfigError(ValueError):
    """A rack or user cannot be put into the hub's config; the message says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RackUser:
    """An enrolled rack: its id and public nkey (the hub never holds a seed)."""

    rack: str
    nkey: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HubPlan:
    """Where and how the hub's nats-server listens and stores."""

    host: str
    port: int
    leaf_host: str
    leaf_port: int
    store_dir: str
    cert_file: str
    key_file: str
    log_file: str
    sys_password: str


def check_rack_id(rack: str) -> None:
    """Raise ``HubConfigError`` for an id that is not a rack name or is reserved."""
    if not NAME_RE.match(rack):
        raise HubConfigError(f"invalid rack id {rack!r} (lowercase letters, digits, - and _, "
                             f"at most 32)")
    if rack in RESERVED_IDS:
        raise HubConfigError(f"rack id {rack!r} is reserved (the hub's subjects use it: "
                             f"{', '.join(sorted(RESERVED_IDS))})")


def rack_permissions(rack: str) -> dict[str, dict[str, list[str]]]:
    """The hub-side permissions of ``rack``'s nkey user (leaf view: publish = rack -> hub)."""
    check_rack_id(rack)
    consumer = f"KV_{CONFIG_BUCKET}.cfg_{rack}"
    return {
        "publish": {"allow": [
            f"fluxrig.stats.{rack}",
            # spans (OTLP) and log records for the hub's `traces` process: fire and forget
            f"fluxrig.traces.{rack}",
            f"fluxrig.logs.{rack}",
            f"fluxrig.up.{rack}.>",
            f"fluxrig.src.{rack}.>",
            "$JSC.R.>",
            f"$JS.{HUB_DOMAIN}.API.CONSUMER.INFO.{consumer}",
            f"$JS.{HUB_DOMAIN}.API.CONSUMER.MSG.NEXT.{consumer}",
            f"$JS.ACK.{HUB_DOMAIN}.*.{consumer}.>",
        ]},
        "subscribe": {"allow": [
            f"fluxrig.down.{rack}.>",
            f"$JS.{rack}.API.>",
            f"$JS.FC.{rack}.>",
        ]},
    }


def render_hub_config(plan: HubPlan, racks: Sequence[RackUser],
                      users: Sequence[Mapping[str, object]] = ()) -> str:
    """The hub's nats-server config text.

    Args:
        plan: listeners, files, the system user's password.
        racks: enrolled racks (revoked ones left out by the caller).
        users: hub-local users as nats-server entries (``{"user", "password",
            "permissions"}``), e.g. the registry's.

    Raises:
        HubConfigError: a bad or reserved rack id, or one rack or nkey listed twice.
    """
    seen_racks: set[str] = set()
    seen_keys: set[str] = set()
    # the hub's own users log in on the client port only, racks on the leaf port only:
    # without this, nats-server checks leaf logins against every top-level user too
    entries: list[Mapping[str, object]] = [{"allowed_connection_types": ["STANDARD"], **u}
                                           for u in users]
    for r in racks:
        if r.rack in seen_racks:
            raise HubConfigError(f"rack {r.rack!r} enrolled twice")
        if r.nkey in seen_keys:
            raise HubConfigError(f"rack {r.rack!r}: nkey already used by another rack")
        if not (r.nkey.startswith("U") and len(r.nkey) == 56):
            raise HubConfigError(f"rack {r.rack!r}: not a user public nkey: {r.nkey[:8]}...")
        seen_racks.add(r.rack)
        seen_keys.add(r.nkey)
        entries.append({"nkey": r.nkey, "permissions": rack_permissions(r.rack),
                        "allowed_connection_types": ["LEAFNODE"]})
    conf = {
        "server_name": HUB_DOMAIN,
        "host": plan.host,
        "port": plan.port,
        "max_payload": 8 * 1024 * 1024,
        "max_connections": 4096,
        "jetstream": {"store_dir": plan.store_dir, "domain": HUB_DOMAIN},
        "feature_flags": {"js_ack_fc_v2": True},
        "leafnodes": {"host": plan.leaf_host, "port": plan.leaf_port, "no_advertise": True,
                      "tls": {"cert_file": plan.cert_file, "key_file": plan.key_file,
                              "timeout": 2}},
        "accounts": {"SYS": {"users": [{"user": "sys", "password": plan.sys_password,
                                        "allowed_connection_types": ["STANDARD"]}]}},
        "system_account": "SYS",
        "authorization": {"users": entries},
        "log_file": plan.log_file,
        "logtime_utc": True,
    }
    return json.dumps(conf, indent=1) + "\n"
