"""``engine check``'s work: validate rig files and say what each would run, as plain data.

One result per file, in the order given; a file that fails does not stop the others. The
result is JSON-ready (``engine check --json`` prints the list) and holds no secret: a NATS
URL's password is masked and values from the environment are never echoed (errors show the
``${VAR}`` reference instead, ``engine.schema.At.show``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.bus import masked_url
from engine.config import ConfigError, RigConfig, load_config
from gears.base import Gear, gear_class


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """The verdict on one rig file.

    Attributes:
        file: the path as given.
        ok: True when the rig would start (as far as can be known without starting it).
        notes: what gears say about their work (``Gear.describe``), as (pipeline.gear,
            lines), e.g. the modbus source's request plan.
        rack, data_dir, nats, pipelines, stages, listeners: what it would run (ok only);
            ``nats`` is ``embedded`` plus address, or the external URL with any password
            masked; ``listeners`` are ``(pipeline.gear, host, port)``.
        error_path, error: where and what is wrong (not ok only); ``error_path`` is "" for
            the file as a whole (unreadable, bad YAML).
        text: the whole error line, as ``engine check`` prints it.
    """

    file: str
    ok: bool
    rack: str = ""
    data_dir: str = ""
    nats: str = ""
    pipelines: int = 0
    stages: int = 0
    listeners: tuple[tuple[str, str, int], ...] = field(default=())
    notes: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())  # (gear, lines)
    error_path: str = ""
    error: str = ""
    text: str = ""

    def as_json(self) -> Mapping[str, object]:
        """The result as ``engine check --json`` prints it."""
        if not self.ok:
            return {"file": self.file, "ok": False,
                    "error": {"path": self.error_path, "message": self.error,
                              "text": self.text}}
        return {"file": self.file, "ok": True, "rack": self.rack, "data_dir": self.data_dir,
                "nats": self.nats, "pipelines": self.pipelines, "stages": self.stages,
                "listeners": [{"gear": g, "host": h, "port": p} for g, h, p in self.listeners],
                "notes": {g: list(lines) for g, lines in self.notes}}


def _summary(file: str, cfg: RigConfig) -> CheckResult:
    nats = cfg.nats
    listeners = tuple(
        (f"{p.name}.{g.name}", host, port)
        for p in cfg.pipelines for g in (p.source, *p.stages, *p.sinks)
        for host, port in gear_class(g.gear, Gear).listeners(g.settings))
    tel = cfg.telemetry
    if tel.prometheus_port is not None:  # bound by the supervisor too: it can be busy
        listeners += (("telemetry.prometheus", tel.prometheus_host, tel.prometheus_port),)
    bound = list(listeners)
    if not nats.url and nats.port:
        bound.append(("nats", nats.host, nats.port))
    clash = _port_clash(bound)
    if clash:
        return CheckResult(file=file, ok=False, error_path=clash[0], error=clash[1],
                           text=f"{file}: {clash[0]}: {clash[1]}")
    notes = tuple(
        (f"{p.name}.{g.name}", lines)
        for p in cfg.pipelines for g in (p.source, *p.stages, *p.sinks)
        if (lines := gear_class(g.gear, Gear).describe(g.settings)))
    return CheckResult(
        file=file, ok=True, rack=cfg.rack_id, data_dir=str(cfg.data_dir), notes=notes,
        nats=masked_url(nats.url) if nats.url else
        f"embedded, nats://{nats.host}:{nats.port or '<free port chosen at start>'}",
        pipelines=len(cfg.pipelines), stages=sum(len(p.stages) for p in cfg.pipelines),
        listeners=listeners)


_ANY = ("0.0.0.0", "::", "")


def _port_clash(bound: list[tuple[str, str, int]]) -> tuple[str, str] | None:
    """(where, what) for the first two listeners of one rig on the same port and an
    overlapping address (the start would fail on the second bind), or None."""
    for i, (name, host, port) in enumerate(bound):
        for other, other_host, other_port in bound[:i]:
            if port and port == other_port and (host == other_host or host in _ANY
                                                 or other_host in _ANY):
                return name, (f"port {port} is also used by {other} "
                              f"({other_host}:{other_port})")
    return None


def check_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None
               ) -> CheckResult:
    """Validate the rig file at ``path`` (``${VAR}`` from ``env``, default the process
    environment); never raises for what is wrong with the file."""
    file = str(path)
    try:
        cfg = load_config(path, env)
    except ConfigError as exc:
        return CheckResult(file=file, ok=False, error_path=exc.path, error=exc.problem,
                           text=str(exc))
    return _summary(file, cfg)


def summary_lines(result: CheckResult) -> list[str]:
    """The lines ``engine check`` prints on stdout for a rig that passed."""
    lines = [(f"ok: {result.file}: rack={result.rack}, pipelines={result.pipelines}, "
              f"stages={result.stages}"),
             f"  data_dir: {result.data_dir}",
             f"  nats: {result.nats}"]
    lines += [f"  listens: {gear} on {host}:{port}" for gear, host, port in result.listeners]
    for gear, notes in result.notes:
        lines.append(f"  {gear}:")
        lines += [f"    {line}" for line in notes]
    return lines
