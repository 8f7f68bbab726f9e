"""What the ``mixer`` CLI does without a long-lived process: enrol and revoke racks, ask
the registry.

* ``add_rack``: refuse a reserved, malformed or already enrolled id; make the rack's nkey;
  write its passport (0600, never overwritten) *before* the hub lists the key, so a failed
  write leaves no user nobody holds the seed of; append ``{id, public key, labels}`` to
  ``racks.json``; a running hub reloads (67-79 ms with 1,000 racks, design section 1).
* ``revoke_rack``: mark the rack revoked in ``racks.json`` and reload. A reload leaves a
  live leaf link up (nats-server re-checks clients only), so the link is then dropped
  through the hub's system account: LEAFZ, and a KICK of every leaf named like the rack.
* ``ask_racks``: the running registry answers ``fluxrig.mixer.racks`` from memory; with
  the Mixer stopped, the DuckDB file is read directly (read-only).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from engine.identity import (
    IdentityError,
    Passport,
    new_seed,
    public_key,
    write_passport,
)
from engine.plan import STATE_FILE
from mixer.hubconf import HubConfigError, check_rack_id
from mixer.hubfiles import (
    Enrolled,
    HubFileError,
    HubServer,
    editing_racks,
    local_users,
    read_racks,
)
from mixer.pki import HubPki
from mixer.registry import RackInfo
from mixer.settings import MixerSettings

ASK_TIMEOUT = 2.0
RELOAD_TIMEOUT = 5.0


class EnrolError(RuntimeError):
    """A rack cannot be enrolled, revoked or listed; the message says why."""


class RigRefused(EnrolError):
    """A deployed rig failed its check (file, key path, rule): nothing was stored."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _running_hub(data_dir: Path) -> tuple[int, str] | None:
    """(nats-server pid, client URL) of the running Mixer's hub, or None."""
    from mixer.supervisor import running_pid

    if running_pid(data_dir) is None:
        return None
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("hub_pid")
    return (pid, state.get("hub_url", "")) if isinstance(pid, int) else None


def reload_hub(data_dir: Path, settings: MixerSettings) -> bool:
    """Re-render the hub's config from ``racks.json``; a running hub reloads it. True if a
    hub was running."""
    hub = HubServer(data_dir, settings)
    running = _running_hub(data_dir)
    if running is None:
        return False
    from engine.bus import write_private

    write_private(hub.conf_path, hub.config_text())
    try:
        seen = hub.log_path.stat().st_size
    except OSError:
        seen = 0
    os.kill(running[0], signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:  # the server says how the reload went in its log
        with open(hub.log_path, "rb") as f:
            f.seek(seen)
            text = f.read().decode(errors="replace")
        if "Reloaded server configuration" in text:
            return True
        if "Failed to reload" in text:
            line = next(x for x in text.splitlines() if "Failed to reload" in x)
            raise EnrolError(f"the hub refused the new config: {line.split('[ERR] ')[-1]}")
        time.sleep(0.02)  # a log line is the only sign of a reload
    raise EnrolError(f"the hub did not confirm the reload within {RELOAD_TIMEOUT} s "
                     f"(see {hub.log_path})")


def add_rack(data_dir: Path, settings: MixerSettings, rack: str, labels: Mapping[str, str],
             out: Path) -> Path:
    """Enrol ``rack``; returns where its passport was written.

    Raises:
        EnrolError: bad or reserved id, already enrolled, no ``mixer init``, passport exists.
    """
    ca = HubPki.in_dir(data_dir).ca_cert
    if not ca.exists():
        raise EnrolError(f"not a hub data dir (run `mixer init {data_dir}` first): missing {ca}")
    try:
        check_rack_id(rack)
        seed = new_seed()
        with editing_racks(data_dir) as racks:
            if any(r.id == rack for r in racks):
                raise EnrolError(f"rack {rack!r} is enrolled already (ids are never reused: "
                                 f"a revoked rack stays in racks.json for the audit trail)")
            write_passport(out, Passport(rack=rack, hub=settings.leaf_urls, nkey_seed=seed,
                                         ca=ca.read_text(), issued=_now(), labels=labels))
            racks.append(Enrolled(id=rack, nkey=public_key(seed), labels=dict(labels),
                                  enrolled=_now()))
    except (HubConfigError, IdentityError, HubFileError, OSError) as exc:
        raise EnrolError(str(exc)) from None
    reload_hub(data_dir, settings)
    return out


def revoke_rack(data_dir: Path, settings: MixerSettings, rack: str) -> int:
    """Revoke ``rack``; returns how many live links were dropped.

    Raises:
        EnrolError: not enrolled, or revoked already.
    """
    try:
        with editing_racks(data_dir) as racks:
            entry = next((r for r in racks if r.id == rack), None)
            if entry is None:
                raise EnrolError(f"rack {rack!r} is not enrolled")
            if entry.revoked:
                raise EnrolError(f"rack {rack!r} was revoked already ({entry.revoked})")
            entry.revoked = _now()
    except (HubFileError, OSError) as exc:
        raise EnrolError(str(exc)) from None
    running = _running_hub(data_dir)
    if not reload_hub(data_dir, settings) or running is None:
        return 0
    return asyncio.run(_kick(running[1], local_users(data_dir)["sys"], rack))


async def _kick(hub_url: str, sys_password: str, rack: str) -> int:
    """Drop every leaf link named ``rack`` through the system account; the count."""
    import nats

    nc = await nats.connect(hub_url, user="sys", password=sys_password, connect_timeout=2,
                            max_reconnect_attempts=0)
    try:
        kicked: set[int] = set()  # a kicked link may still be listed for a moment
        deadline = time.monotonic() + 2.0
        while True:  # the reload is asynchronous: a reconnect may slip in before it lands
            reply = await nc.request("$SYS.REQ.SERVER.PING.LEAFZ", b"{}", timeout=ASK_TIMEOUT)
            doc = json.loads(reply.data)
            server_id = doc["server"]["id"]
            leafs = [leaf for leaf in (doc.get("data") or {}).get("leafs") or []
                     if leaf.get("name") == rack and leaf.get("id") not in kicked]
            if not leafs or time.monotonic() > deadline:
                return len(kicked)
            for leaf in leafs:
                await nc.request(f"$SYS.REQ.SERVER.{server_id}.KICK",
                                 json.dumps({"cid": leaf["id"]}).encode(), timeout=ASK_TIMEOUT)
                kicked.add(leaf["id"])
            await asyncio.sleep(0.1)  # let the server drop them before LEAFZ is asked again
    finally:
        await nc.close()


def ask_racks(data_dir: Path, settings: MixerSettings, selector: Mapping[str, str],
              as_json: bool) -> tuple[list[RackInfo], str]:
    """The racks matching ``selector`` and their table (or JSON) text.

    Raises:
        EnrolError: the registry did not answer, or its file cannot be read.
    """
    from mixer.registry import Registry
    from mixer.registrydb import (
        RegistryStore,
        RegistryStoreError,
        racks_json,
        racks_table,
    )

    if _running_hub(data_dir) is not None:
        from mixer.ask import AskError, ask

        try:
            raw = ask(data_dir, "racks", {"labels": dict(selector)})
        except AskError as exc:
            raise EnrolError(str(exc)) from None
        if as_json:
            return [], raw.decode() + "\n"
        infos = [_info(d) for d in json.loads(raw)]
        return infos, racks_table(infos, time.time_ns())
    reg = Registry(int(settings.offline_after * 1e9))
    db = data_dir / "registry.duckdb"
    if db.exists():
        try:
            with RegistryStore.open(db, read_only=True) as store:
                store.load(reg)
        except RegistryStoreError as exc:
            raise EnrolError(str(exc)) from None
    else:  # never started: what racks.json says, nobody heard yet
        try:
            for r in read_racks(data_dir):
                if not r.revoked:
                    reg.add(r.id, r.labels, time.time_ns())
        except HubFileError as exc:
            raise EnrolError(str(exc)) from None
    infos = reg.select(selector)
    if as_json:
        return infos, racks_json(infos).decode() + "\n"
    return infos, racks_table(infos, time.time_ns())


def ask_rack_status(data_dir: Path, settings: MixerSettings, rack: str) -> dict[str, Any]:
    """A linked rack's answer to ``fluxrig.down.<rack>.req.status``: its state file and
    process table. The reply comes back under the rack's own name
    (``fluxrig.up.<rack>.reply.<token>``): a rack can only publish its own subjects.

    Raises:
        EnrolError: no Mixer, or no answer (the message says what the registry knows).
    """
    if _running_hub(data_dir) is None:
        raise EnrolError(f"no mixer running: data_dir={data_dir}")
    try:
        return asyncio.run(_ask_rack(settings, local_users(data_dir)["admin"], rack))
    except TimeoutError:
        known = {i.id: i.state for i in ask_racks(data_dir, settings, {}, False)[0]}
        state = known.get(rack)
        why = ("not enrolled" if state is None else
               f"the registry has it {state}" if state != "online" else
               "online, but it did not answer (an older fluxrig, or busy)")
        raise EnrolError(f"rack {rack!r}: no answer ({why})") from None


async def _ask_rack(settings: MixerSettings, password: str, rack: str) -> dict[str, Any]:
    import nats

    nc = await nats.connect(settings.hub_url, user="admin", password=password,
                            connect_timeout=2, max_reconnect_attempts=0)
    try:
        reply = f"fluxrig.up.{rack}.reply.{secrets.token_hex(8)}"
        sub = await nc.subscribe(reply, max_msgs=1)
        await nc.publish(f"fluxrig.down.{rack}.req.status", b"{}", reply=reply)
        msg = await sub.next_msg(timeout=ASK_TIMEOUT)
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            raise TimeoutError  # no responders: the rack is not linked (or not listening)
        answer = json.loads(msg.data)
        if not isinstance(answer, dict) or "state" not in answer:
            raise EnrolError(f"rack {rack!r}: unexpected answer")
        return answer
    except nats.errors.TimeoutError:
        raise TimeoutError from None
    finally:
        await nc.close()


def _targets(data_dir: Path, racks: Sequence[str], selector: Mapping[str, str]) -> list[str]:
    enrolled = {r.id: r for r in read_racks(data_dir) if not r.revoked}
    unknown = [r for r in racks if r not in enrolled]
    if unknown:
        raise EnrolError(f"not enrolled (or revoked): {', '.join(unknown)}")
    out = list(dict.fromkeys(racks))
    if selector:
        out += [r.id for r in enrolled.values() if r.id not in out
                and all(r.labels.get(k) == v for k, v in selector.items())]
    if not out:
        raise EnrolError("no target: give --rack ID or --label k=v matching enrolled racks")
    return out


def run_deploy(data_dir: Path, settings: MixerSettings, *, rig: Path | None,
               racks: Sequence[str], selector: Mapping[str, str], dry_run: bool,
               status: bool, rollback: bool, to: int | None) -> str:
    """``mixer deploy``: what it prints.

    Raises:
        EnrolError: bad targets, a rig that fails its check (file, key path, rule), no hub.
    """
    from mixer.deploy import ConfigError, DeployError, check_for, rig_text

    try:
        targets = _targets(data_dir, racks, selector)
        if status:
            return asyncio.run(_with_js(settings, data_dir, _deploy_status, targets))
        if rollback:
            if len(targets) != 1:
                raise EnrolError("--rollback takes one --rack")
            return asyncio.run(_with_js(settings, data_dir, _rollback, targets[0], to))
        if rig is None:
            raise EnrolError("give the rig file to deploy")
        text = rig_text(rig)
        for target in targets:
            check_for(text, str(rig), target)
        if dry_run:
            return f"ok: {rig} checked for {', '.join(targets)} (dry run: nothing stored)\n"
        return asyncio.run(_with_js(settings, data_dir, _deploy, text, targets))
    except ConfigError as exc:
        raise RigRefused(f"{exc} (nothing stored)") from None
    except (DeployError, HubFileError) as exc:
        raise EnrolError(str(exc)) from None


async def _with_js(settings: MixerSettings, data_dir: Path,
                   fn: Callable[..., Awaitable[str]], *args: object) -> str:
    import nats

    try:
        nc = await nats.connect(settings.hub_url, user="admin",
                                password=local_users(data_dir)["admin"], connect_timeout=2,
                                max_reconnect_attempts=0)
    except Exception as exc:
        raise EnrolError(f"cannot reach the hub at {settings.hub_url} (is the Mixer "
                         f"started?): {exc}") from None
    try:
        return str(await fn(nc.jetstream(timeout=ASK_TIMEOUT), *args))
    finally:
        await nc.close()


async def _deploy(js: JetStreamContext, text: str, targets: list[str]) -> str:
    from mixer.deploy import deploy

    revs = await deploy(js, text, targets)
    return "".join(f"rack {r}: stored as rev {rev}\n" for r, rev in revs.items())


async def _deploy_status(js: JetStreamContext, targets: list[str]) -> str:
    from mixer.deploy import states, status_table

    return status_table(await states(js, targets))


async def _rollback(js: JetStreamContext, rack: str, to: int | None) -> str:
    from mixer.deploy import DeployError, deploy, revision, states

    if to is None:
        state = (await states(js, [rack]))[0]
        if state.previous is None:
            raise DeployError(f"rack {rack!r}: no earlier applied revision known; give --to")
        to = state.previous
    text = await revision(js, rack, to)
    rev = (await deploy(js, text, [rack]))[rack]
    return f"rack {rack}: rev {to} deployed again as rev {rev}\n"


def _info(d: Mapping[str, object]) -> RackInfo:
    fields = set(RackInfo.__dataclass_fields__)
    return RackInfo(**{k: v for k, v in d.items() if k in fields})  # type: ignore[arg-type]


