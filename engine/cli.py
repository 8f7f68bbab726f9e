"""The ``engine`` command line (typer). Thin: parses arguments and calls into the engine."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(
    help="fluxrig rack engine: run and inspect a rack on this machine.",
    no_args_is_help=True,
    add_completion=False,
)

CONFIG = typer.Option(..., "--config", "-c", help="rig file (YAML)")


def _load(config: Path):
    from engine.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _setup_logging(data_dir: Path | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(data_dir / "rack.log"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        handlers=handlers,
    )
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # its reconnect noise is ours to log


@app.command()
def version() -> None:
    """Print the fluxrig version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fluxrig"))


@app.command()
def check(config: Path = typer.Argument(..., help="rig file (YAML)")) -> None:
    """Validate a rig file without starting anything."""
    cfg = _load(config)
    stages = sum(len(p.stages) for p in cfg.pipelines)
    typer.echo(f"ok: {config}: rack={cfg.rack_id}, pipelines={len(cfg.pipelines)}, "
               f"stages={stages}")


@app.command()
def start(
    config: Path = CONFIG,
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="replicas of every stage"),
    drain_timeout: float = typer.Option(30.0, help="seconds to let rings empty on stop"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a rack in the foreground until SIGTERM/SIGINT (then drain and stop)."""
    from engine.supervisor import RackAlreadyRunning, Supervisor

    cfg = _load(config)
    _setup_logging(Path(cfg.data_dir), verbose)
    sup = Supervisor(cfg, workers=workers, drain_timeout=drain_timeout)
    try:
        sup.start()
    except RackAlreadyRunning as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    except BaseException:
        sup.cleanup()
        raise
    raise typer.Exit(sup.run())


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    if config is not None:
        return Path(_load(config).data_dir)
    typer.echo("error: give --config or --data-dir", err=True)
    raise typer.Exit(2)


@app.command()
def stop(
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the drain"),
) -> None:
    """Ask a running rack to drain and stop; waits until it has."""
    from engine.supervisor import running_pid

    d = _data_dir(config, data_dir)
    pid = running_pid(d)
    if pid is None:
        typer.echo(f"error: no rack running: data_dir={d}", err=True)
        raise typer.Exit(1)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(d) != pid:  # the lock goes with the supervisor (zombie or not)
            typer.echo(f"stopped: pid={pid}")
            return
        time.sleep(0.1)  # another process's exit has no event we can wait on here
    typer.echo(f"error: rack still running after {timeout}s: pid={pid}", err=True)
    raise typer.Exit(1)


@app.command()
def status(
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    interval: float = typer.Option(1.0, help="seconds between the two samples"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per-process table of a running rack: pid, CPU, RSS, frames/s, errors, fill, latency."""
    from engine.supervisor import running_pid
    from engine.telemetry import RackProbe, read_state, rows

    d = _data_dir(config, data_dir)
    try:
        if running_pid(d) is None:
            raise FileNotFoundError(d)
        state = read_state(d)
    except FileNotFoundError:
        typer.echo(f"error: no rack running: data_dir={d}", err=True)
        raise typer.Exit(1) from None
    probe = RackProbe(state)
    try:
        first = probe.sample()
        time.sleep(interval)  # the rate window itself
        table = rows(first, probe.sample())
    finally:
        probe.close()
    if as_json:
        typer.echo(json.dumps({"rack": state["rack"], "pid": state["pid"],
                               "nats_url": state["nats_url"], "processes": table}, indent=1))
        return
    typer.echo(f"rack {state['rack']}  supervisor pid {state['pid']}  nats {state['nats_url']}")
    head = (f"{'process':<24} {'pid':>7} {'cpu':>3} {'cpu%':>6} {'rss MB':>7} {'in/s':>9} "
            f"{'out/s':>9} {'errors':>6} {'fill':>6} {'p50 ms':>7} {'p99 ms':>7}")
    typer.echo(head)
    for r in table:
        def ms(v):
            return f"{v / 1e6:7.2f}" if v is not None else f"{'-':>7}"
        typer.echo(
            f"{r['name']:<24} {r['pid'] or '-':>7} {r['cpu'] if r['cpu'] is not None else '-':>3} "
            f"{r.get('cpu_pct', 0):6.1f} {r['rss'] / 2**20:7.1f} {r.get('in_per_s', 0):9.0f} "
            f"{r.get('out_per_s', 0):9.0f} {r.get('errors', 0):6} {r['ring_fill']:6.1%} "
            f"{ms(r.get('p50_ns'))} {ms(r.get('p99_ns'))}"
        )


@app.command()
def demo(seconds: float = typer.Option(20.0, help="how long to run")) -> None:
    """Run the demo rack (configs/demo.yaml) with live progress and a summary."""
    from engine.demo import run

    raise typer.Exit(run(seconds))


def main() -> None:
    """Console-script entry point."""
    app()
if __name__ == "__main__":
    main()
