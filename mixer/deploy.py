"""Config as code, the hub's half: ``mixer deploy``.

* ``deploy``: the rig is checked for every target rack with the rack's own checker
  (``engine.config``), its id set to the target and the keys a rack keeps for itself
  (``rack.id``, ``rack.data_dir``, ``mixer``) left to the rack. A failure names the file, the
  key path and the rule, and stores nothing. Then the text goes into the hub's KV bucket
  ``fluxrig_config`` under ``<rack>.rig`` (history 16): the KV revision is the deploy's
  ``rev``. The durable pull consumer ``cfg_<rack>`` (filtered to the rack's keys, starting at
  the last value) is made if missing; the rack's ``hublink`` pulls it over the leaf link.
* ``status``: what each rack was given (the latest rev) against what it reported
  (``fluxrig.up.<rack>.applied``, kept by the registry in the KV bucket ``fluxrig_applied``).
* ``rollback``: an earlier revision's text is put again as a new revision, so history only
  moves forward and every rack applies it like any deploy.

nats-py's KV ``history``/``watch`` use ordered consumers, which break on a server with
``js_ack_fc_v2`` (``docs/mixer-design.md`` section 1): revisions are read with direct
message gets instead.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from engine.config import ConfigError, parse_config
from engine.yamlfile import parse_yaml
from mixer.hubconf import CONFIG_BUCKET

APPLIED_BUCKET = "fluxrig_applied"
HISTORY = 16


class DeployError(RuntimeError):
    """A deploy, status or rollback cannot be done; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RackConfigState:
    """One rack's config: what it was given and what it said."""

    rack: str
    rev: int | None  # the latest deployed revision (None: never deployed)
    applied: int | None  # what the rack runs (its last applied revision)
    status: str  # "applied", "failed", "pending" or "never deployed"
    error: str
    previous: int | None  # before the last report: a rollback target


def key_of(rack: str) -> str:
    """The rack's key in the config bucket."""
    return f"{rack}.rig"


def consumer_of(rack: str) -> str:
    """The durable consumer a rack pulls its config from."""
    return f"cfg_{rack}"


def check_for(text: str, file: str, rack: str) -> None:
    """Check ``text`` as ``rack``'s rig, the rack's own keys set as the rack will set them.

    Raises:
        ConfigError: file, key path and rule.
    """
    doc = parse_yaml(text, file)
    data = doc.data if isinstance(doc.data, dict) else {}
    with tempfile.TemporaryDirectory(prefix="fluxrig-deploy-") as tmp:
        data = anchored(data, rack=rack, data_dir=tmp, mixer=None)
        parse_config(data, file, base_dir=Path(file).resolve().parent)


def anchored(data: Mapping[str, Any], *, rack: str, data_dir: str,
             mixer: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` (a deployed rig) with the keys the rack keeps for itself: its id, data dir
    and ``mixer`` section (its passport) — the deployed ones are ignored."""
    out = dict(data)
    section = dict(out.get("rack") or {}) if isinstance(out.get("rack"), dict) else {}
    section.update(id=rack, data_dir=data_dir)
    out["rack"] = section
    out.pop("mixer", None)
    if mixer is not None:
        out["mixer"] = dict(mixer)
    return out


async def _kv(js: JetStreamContext, bucket: str) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=HISTORY, storage=StorageType.FILE))


async def deploy(js: JetStreamContext, text: str, racks: Sequence[str]) -> dict[str, int]:
    """Store ``text`` for each of ``racks`` (checked already); their new revisions."""
    kv = await _kv(js, CONFIG_BUCKET)
    await _kv(js, APPLIED_BUCKET)
    out = {}
    for rack in racks:
        out[rack] = await kv.put(key_of(rack), text.encode())
        await ensure_consumer(js, rack)
    return out


async def ensure_consumer(js: JetStreamContext, rack: str) -> None:
    """The rack's durable pull consumer on the config bucket (its keys only, from the
    latest value on: a rack linked late gets the current config, not the history)."""
    stream = f"KV_{CONFIG_BUCKET}"
    try:
        await js.consumer_info(stream, consumer_of(rack))
    except NotFoundError:
        await js.add_consumer(stream, ConsumerConfig(
            durable_name=consumer_of(rack), ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            filter_subject=f"$KV.{CONFIG_BUCKET}.{rack}.>", max_ack_pending=1, ack_wait=30))


async def revision(js: JetStreamContext, rack: str, rev: int) -> str:
    """The text of revision ``rev`` of ``rack``'s config.

    Raises:
        DeployError: no such revision for that rack (or it was cut from the history).
    """
    try:
        msg = await js.get_msg(f"KV_{CONFIG_BUCKET}", rev)
    except NotFoundError:
        raise DeployError(f"rack {rack!r}: no revision {rev} (the hub keeps the last "
                          f"{HISTORY} per rack)") from None
    if msg.subject != f"$KV.{CONFIG_BUCKET}.{key_of(rack)}":
        raise DeployError(f"revision {rev} is not rack {rack!r}'s config")
    return (msg.data or b"").decode()


async def states(js: JetStreamContext, racks: Sequence[str]) -> list[RackConfigState]:
    """Given against reported, per rack."""
    try:
        kv = await js.key_value(CONFIG_BUCKET)
    except BucketNotFoundError:
        kv = None
    try:
        applied_kv = await js.key_value(APPLIED_BUCKET)
    except BucketNotFoundError:
        applied_kv = None
    out = []
    for rack in racks:
        rev = None
        if kv is not None:
            try:
                rev = (await kv.get(key_of(rack))).revision
            except Exception:  # KeyNotFoundError and friends: never deployed
                rev = None
        report: dict[str, Any] = {}
        if applied_kv is not None:
            try:
                entry = await applied_kv.get(rack)
                report = json.loads(entry.value or b"{}")
            except Exception:
                report = {}
        # a failed report carries the revision still running as its "previous"
        applied = report.get("rev") if report.get("status") == "applied" \
            else report.get("previous")
        status = ("never deployed" if rev is None else
                  report.get("status", "pending") if report.get("rev") == rev else
                  "pending")
        out.append(RackConfigState(
            rack=rack, rev=rev, applied=applied if isinstance(applied, int) else None,
            status=status, error=str(report.get("error") or "") if status == "failed" else "",
            previous=report.get("previous") if isinstance(report.get("previous"), int)
            else None))
    return out


def status_table(rows: Sequence[RackConfigState]) -> str:
    """``mixer deploy --status`` as text."""
    head = f"{'RACK':<24} {'REV':>5} {'APPLIED':>7} {'STATUS':<15} ERROR"
    lines = [head]
    for r in rows:
        lines.append(f"{r.rack:<24} {r.rev if r.rev is not None else '-':>5} "
                     f"{r.applied if r.applied is not None else '-':>7} {r.status:<15} "
                     f"{r.error}".rstrip())
    return "\n".join(lines) + "\n"


def rig_text(path: Path) -> str:
    """A rig file's text for a deploy (checked to be YAML of a mapping).

    Raises:
        DeployError: unreadable, or not a mapping.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeployError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeployError(f"{path}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DeployError(f"{path}: expected a rig (a mapping)")
    return text


__all__ = ["APPLIED_BUCKET", "ConfigError", "DeployError", "RackConfigState", "anchored",
           "check_for", "consumer_of", "deploy", "key_of", "revision", "rig_text", "states",
           "status_table"]
