"""Config as code, the rack's files: which rig a linked rack runs, and what it reports.

A linked rack starts from its *bootstrap* rig (the file ``engine start --config`` names: its
id, data dir and passport). Revisions deployed by the Mixer live in ``<data_dir>/config/``:

* ``rig.<rev>.yaml`` — a deployed rig with the rack's own keys (``rack.id``,
  ``rack.data_dir``, ``mixer``) taken from the bootstrap rig, written by ``hublink``;
* ``candidate`` — the revision ``hublink`` checked and asked the supervisor to apply;
* ``trying`` — a candidate the supervisor (re)started on and that is not ready yet;
* ``applied`` — the last revision that ran (a restart with the hub away starts on it);
* ``result.json`` — ``{rev, status: applied|failed, error, previous}``, which ``hublink``
  reports to the hub.

At start (``choose``): a candidate becomes ``trying``; a ``trying`` left by a start that never
became ready is a failed revision, and the rack falls back to ``applied`` (or the bootstrap
rig). Once every process serves (``ready``), ``trying`` becomes ``applied``. So a deployed rig
the rack cannot run costs one restart, never the rack.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from engine.bus import write_private
from engine.config import ConfigError, RigConfig, load_config, parse_config
from engine.yamlfile import load_yaml, parse_yaml

log = logging.getLogger("fluxrig.supervisor")

CONFIG_DIR = "config"


def _dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / CONFIG_DIR


def _read_rev(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def rig_path(data_dir: str | os.PathLike[str], rev: int) -> Path:
    """Where revision ``rev`` is kept."""
    return _dir(data_dir) / f"rig.{rev}.yaml"


def anchored_text(text: str, rev: int, bootstrap: Path) -> str:
    """A deployed rig's text with the bootstrap rig's own keys: the rack's id, data dir and
    passport are the rack's, whatever the hub sent (paths made absolute: the file lives in
    the data dir, not beside the bootstrap rig).

    Raises:
        ConfigError: the deployed text is not YAML of a mapping.
    """
    doc = parse_yaml(text, f"rev {rev}")
    if not isinstance(doc.data, dict):
        raise ConfigError(f"rev {rev}: expected a rig (a mapping)")
    boot = load_yaml(bootstrap).data
    assert isinstance(boot, dict)
    base = bootstrap.resolve().parent
    rack = dict(doc.data.get("rack") or {})
    own = boot.get("rack") or {}
    rack["id"] = own.get("id")
    rack["data_dir"] = str(base / str(own.get("data_dir", ".")))
    mixer = dict(boot.get("mixer") or {})
    if "passport" in mixer:
        mixer["passport"] = str(base / str(mixer["passport"]))
    data = {**doc.data, "rack": rack, "mixer": mixer}
    return json.dumps(data, indent=1)  # JSON is YAML: no re-quoting questions


def stage(data_dir: str | os.PathLike[str], rev: int, text: str, bootstrap: Path) -> Path:
    """Write revision ``rev`` (anchored) and check it as the rack would run it.

    Raises:
        ConfigError: it cannot run here (file, key path, rule).
    """
    path = rig_path(data_dir, rev)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, anchored_text(text, rev, bootstrap))
    load_config(path)
    return path


def request(data_dir: str | os.PathLike[str], rev: int) -> None:
    """Ask for ``rev`` to be applied (the supervisor is told with SIGHUP)."""
    write_private(_dir(data_dir) / "candidate", f"{rev}\n")


def candidate(data_dir: str | os.PathLike[str]) -> int | None:
    """The revision waiting to be applied, if any."""
    return _read_rev(_dir(data_dir) / "candidate")


def trying(data_dir: str | os.PathLike[str]) -> int | None:
    """The revision the rack (re)started on that has not been ready yet."""
    return _read_rev(_dir(data_dir) / "trying")


def fail_trying(data_dir: str | os.PathLike[str], error: str) -> None:
    """The revision being tried cannot run (it did not start, or gave up): report why; the
    next start is on the last applied one."""
    rev = trying(data_dir)
    if rev is not None:
        (_dir(data_dir) / "trying").unlink(missing_ok=True)
        log.error("config rev %d failed, back to the last applied one: %s", rev, error)
        report(data_dir, rev, "failed", error)


def applied(data_dir: str | os.PathLike[str]) -> int | None:
    """The last revision that ran."""
    return _read_rev(_dir(data_dir) / "applied")


def result(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last outcome (``result.json``), or None."""
    try:
        doc = json.loads((_dir(data_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def report(data_dir: str | os.PathLike[str], rev: int, status: str, error: str = "") -> None:
    """Record an outcome for ``hublink`` to report."""
    doc = {"rev": rev, "status": status, "error": error[:2000],
           "previous": applied(data_dir), "ts": time.time_ns()}
    write_private(_dir(data_dir) / "result.json", json.dumps(doc))


def refuse_candidate(data_dir: str | os.PathLike[str], error: str) -> None:
    """The candidate cannot run: report it and forget it (the rack keeps what it runs)."""
    rev = candidate(data_dir)
    (_dir(data_dir) / "candidate").unlink(missing_ok=True)
    if rev is not None:
        log.error("config rev %d refused, the rack keeps its config: %s", rev, error)
        report(data_dir, rev, "failed", error)


def choose(bootstrap: RigConfig) -> RigConfig:
    """The rig a linked rack starts on (see the module docstring); the bootstrap rig for a
    rack without a passport or without deployed revisions."""
    if bootstrap.passport is None:
        return bootstrap
    d = _dir(bootstrap.data_dir)
    trying = _read_rev(d / "trying")
    if trying is not None:  # the last start on it never became ready
        (d / "trying").unlink(missing_ok=True)
        log.error("config rev %d did not come up, back to the last applied one", trying)
        report(bootstrap.data_dir, trying, "failed", "the rack did not become ready on it")
    rev = candidate(bootstrap.data_dir)
    if rev is not None:
        os.replace(d / "candidate", d / "trying")
        try:
            return load_config(rig_path(bootstrap.data_dir, rev))
        except ConfigError as exc:
            (d / "trying").unlink(missing_ok=True)
            report(bootstrap.data_dir, rev, "failed", str(exc))
    rev = applied(bootstrap.data_dir)
    if rev is not None:
        try:
            return load_config(rig_path(bootstrap.data_dir, rev))
        except ConfigError as exc:
            log.error("the last applied config rev %d cannot run any more, starting on the "
                      "bootstrap rig: %s", rev, exc)
    return bootstrap


def ready(data_dir: str | os.PathLike[str]) -> None:
    """Every process serves: a revision being tried is now the applied one."""
    d = _dir(data_dir)
    rev = _read_rev(d / "trying")
    if rev is None:
        return
    previous = applied(data_dir)
    write_private(d / "applied", f"{rev}\n")
    (d / "trying").unlink(missing_ok=True)
    doc = {"rev": rev, "status": "applied", "error": "", "previous": previous,
           "ts": time.time_ns()}
    write_private(d / "result.json", json.dumps(doc))
    log.info("config rev %d applied", rev)


__all__ = ["ConfigError", "anchored_text", "applied", "candidate", "choose", "parse_config",
           "ready", "refuse_candidate", "report", "request", "result", "rig_path", "stage",
           "fail_trying", "trying"]
