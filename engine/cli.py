"""The ``engine`` command line (typer). Thin: parses arguments and calls into the engine."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(
    help="fluxrig rack engine: run and inspect a rack on this machine.",
    no_args_is_help=True,
    add_completion=False,
)

CONFIG = typer.Option(..., "--config", "-c", help="rig file (YAML)")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version as dist_version

        typer.echo(dist_version("fluxrig"))
        raise typer.Exit(0)


@app.callback()
def _root(version_flag: bool = typer.Option(False, "--version", is_eager=True,
                                            callback=_print_version,
                                            help="print the version and exit")) -> None:
    """fluxrig rack engine: run and inspect a rack on this machine.

    Exit codes: 0 success; 1 the operation failed (a rack could not start, stopped with
    work left, a load run lost replies); 2 bad arguments or rig file; 3 the rack is
    running already.
    """


def _fail(message: object, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad usage or input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(config: Path):
    from engine.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        _fail(exc)


@app.command()
def version(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="also where it runs from, the code path of the ring and "
        "the CBOR encoder (C, or pure Python and why: missing or forced by "
        "FLUXRIG_PURE_PYTHON=1) and the installed versions of its dependencies")) -> None:
    """Print the fluxrig version."""
    from engine.about import version_lines

    try:
        lines = version_lines(verbose)
    except ValueError as exc:  # FLUXRIG_PURE_PYTHON holds something that is not yes/no
        _fail(exc)
    for line in lines:
        typer.echo(line)


@app.command()
def check(
    configs: list[Path] = typer.Argument(..., help="rig files (YAML)", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list, one object per "
                                 "file: {file, ok, rack, data_dir, nats, pipelines, stages, "
                                 "listeners} or {file, ok: false, error: {path, message, "
                                 "text}}"),
    tests: Path | None = typer.Option(None, "--tests", help="a rig tests file to run once "
                                      "the rig checks out (as `engine test`)"),
) -> None:
    """Validate rig files without starting anything: per file, what it would run or the
    first error (file, key path, what was expected). Exit 2 if any file fails; with
    --tests, then run the rig tests too (exit 1 if one fails)."""
    from engine.rigcheck import check_file, summary_lines

    results = [check_file(c) for c in configs]
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in results], indent=1))
    else:
        for r in results:
            if r.ok:
                typer.echo("\n".join(summary_lines(r)))
            else:
                typer.echo(f"error: {r.text}", err=True)
    if not all(r.ok for r in results):
        raise typer.Exit(2)
    if tests is not None:
        if len(configs) != 1:
            _fail("--tests takes one rig file")
        _run_tests(configs[0], tests)


def _run_tests(rig: Path, tests: Path) -> None:
    from engine.rigtest import ConfigError, run_file

    try:
        code = run_file(tests, rig, typer.echo)
    except ConfigError as exc:
        _fail(exc)
    if code:
        raise typer.Exit(code)


@app.command("test")
def test_rig(
    rig: Path = typer.Argument(..., help="the rig file (YAML)", show_default=False),
    tests: Path = typer.Argument(..., help="the tests file (YAML; docs/connectors.md)",
                                 show_default=False),
) -> None:
    """Run a rig's stage tests (input frames, expected output frames and sinks) in this
    process, without NATS or rack processes. Exit 1 if a test fails, 2 if a file is
    wrong."""
    _run_tests(rig, tests)


@app.command()
def start(
    config: Path = CONFIG,
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="replicas of every stage"),
    drain_timeout: float = typer.Option(30.0, help="seconds to let rings empty on stop"),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="log at DEBUG level (default INFO)"),
    log_file: str = typer.Option("", help="log file (size-rotated); '-' for stderr; "
                                          "default: rack.log in the data dir"),
    log_format: str = typer.Option("text", help="log line format: text or json"),
    log_max_bytes: int = typer.Option(16 * 1024 * 1024, min=0,
                                      help="rotate the log file at this size (0: never)"),
    log_backups: int = typer.Option(5, min=0, help="rotated log files kept"),
    notify: bool = typer.Option(False, "--notify", help="require systemd's notify socket "
                                "(Type=notify): READY, STATUS, WATCHDOG, STOPPING; without "
                                "this flag they are sent only when NOTIFY_SOCKET is set"),
    ready_fd: int = typer.Option(-1, help="write 'ready' to this inherited file descriptor "
                                            "once every process serves, then close it"),
) -> None:
    """Run a rack in the foreground until SIGTERM/SIGINT (then drain and stop).

    Readiness: once every process serves (listeners bound, NATS reached), the rack writes
    "ready" to --ready-fd, sends READY=1 to $NOTIFY_SOCKET (systemd Type=notify) and marks
    its state file ready. Exit codes: 0 drained cleanly, 1 could not start or stopped with
    work left or a process given up on, 2 bad config or arguments, 3 already running.
    """
    from engine.deployed import choose, fail_trying, trying
    from engine.logsetup import LOG_FORMATS, setup_logging
    from engine.natsd import NatsServerError
    from engine.service import Notifier, NotifyError
    from engine.supervisor import RackAlreadyRunning, RackStartError, Supervisor

    cfg = choose(_load(config))  # a linked rack: the config revision it runs, if any
    if not math.isfinite(drain_timeout) or drain_timeout < 0:
        _fail(f"--drain-timeout: expected a finite number of seconds >= 0, got {drain_timeout}")
    if ready_fd >= 0:
        try:
            kind = os.fstat(ready_fd).st_mode
        except OSError:
            _fail(f"--ready-fd: {ready_fd} is not an open file descriptor")
        if ready_fd <= 2 or not (stat.S_ISFIFO(kind) or stat.S_ISREG(kind)
                                 or stat.S_ISSOCK(kind)):
            _fail(f"--ready-fd: {ready_fd} must be a pipe, socket or file the caller passed "
                  f"(not stdin/stdout/stderr)")
    try:  # the lock, state, logs and store live there: say so before anything else fails
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"{config}: rack.data_dir: cannot use {cfg.data_dir}: {exc.strerror or exc}", 1)
    if log_format not in LOG_FORMATS:
        _fail(f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    try:
        notifier = Notifier(required=notify)
    except NotifyError as exc:
        _fail(exc)
    path = None if log_file == "-" else (Path(log_file) if log_file
                                          else Path(cfg.data_dir) / "rack.log")
    if path is not None:
        problem = _unusable_log_file(path)
        if problem:
            _fail(f"--log-file: {path}: {problem}")
    setup_logging(path, fmt=log_format, verbose=verbose, max_bytes=log_max_bytes,
                  backups=log_backups)
    if path is not None:
        typer.echo(f"rack {cfg.rack_id!r}: logging to {path}", err=True)
    sup = Supervisor(cfg, workers=workers, drain_timeout=drain_timeout, ready_fd=ready_fd,
                     notifier=notifier, bootstrap=config)
    try:
        sup.start()
    except RackAlreadyRunning as exc:
        _fail(exc, 3)
    except (RackStartError, NatsServerError) as exc:
        sup.cleanup()
        if trying(cfg.data_dir) is not None:  # a deployed rig that cannot start here:
            fail_trying(cfg.data_dir, str(exc))  # back to the last applied one
            _restart_self(1)
        _fail(exc, 1)
    except BaseException:
        sup.cleanup()
        raise
    code = sup.run()
    # a deployed config to apply, or one that gave up before it was ready: start again
    # (same pid: service managers and terminals keep following the rack)
    if code and trying(cfg.data_dir) is not None:
        fail_trying(cfg.data_dir, sup.procs.failed or sup.outcome)
        _restart_self(code)
    if sup.reexec:
        _restart_self(code)
    if code and path is not None:  # the reason is in the log; say it where the user looks
        typer.echo(f"error: rack stopped, not cleanly: {sup.outcome}", err=True)
    raise typer.Exit(code)


def _restart_self(code: int) -> NoReturn:
    """``engine start`` again in this process (``execv``: the pid, the service manager's
    view and the terminal stay); ``--ready-fd`` only if it was not used yet (still open)."""
    import logging

    argv, skip = [], False
    for i, arg in enumerate(sys.argv[1:], 1):
        if skip:
            skip = False
        elif arg == "--ready-fd" and i + 1 < len(sys.argv):
            skip = True
            try:
                os.fstat(int(sys.argv[i + 1]))
                argv += [arg, sys.argv[i + 1]]
            except (OSError, ValueError):
                pass
        else:
            argv.append(arg)
    logging.getLogger("fluxrig.supervisor").info("restarting on the new config (drain code "
                                                 "%d)", code)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "engine.cli", *argv])


def _unusable_log_file(path: Path) -> str:
    """Why the rack could not write its log at ``path`` ("" when it can): every line would
    otherwise be lost to a traceback on stderr while the rack looked fine."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            return "not a regular file"
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    if config is not None:
        return Path(_load(config).data_dir)
    _fail("give --config or --data-dir")


@app.command()
def stop(
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the drain"),
) -> None:
    """Ask a running rack to drain and stop; waits until it has."""
    from engine.procset import stop_holder
    from engine.supervisor import LOCK

    d = _data_dir(config, data_dir)
    try:
        pid = stop_holder(d, LOCK, timeout)
    except TimeoutError as exc:
        _fail(f"rack {exc}", 1)
    if pid is None:
        _fail(f"no rack running: data_dir={d}", 1)
    typer.echo(f"stopped: pid={pid}")


@app.command()
def status(
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    interval: float = typer.Option(1.0, min=0.05, max=3600,
                                   help="seconds between samples (the rate window)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    watch: bool = typer.Option(False, "--watch", help="refresh every interval until Ctrl-C "
                               "(redrawn in place on a terminal)"),
    count: int = typer.Option(0, min=0, help="with --watch: stop after this many tables"),
) -> None:
    """Per-process table of a running rack: pid, CPU, RSS, frames/s, errors, fill, latency.

    Rates and percentiles cover the last interval; --watch refreshes every interval.
    """
    from engine.supervisor import running_pid
    from engine.telemetry import RackProbe, read_state, rows

    d = _data_dir(config, data_dir)
    try:
        if running_pid(d) is None:
            raise FileNotFoundError(d)
        state = read_state(d)
    except FileNotFoundError:
        _fail(f"no rack running: data_dir={d}", 1)
    probe = RackProbe(state)
    try:
        prev = probe.sample()
        shown = 0
        while True:
            time.sleep(interval)  # the rate window itself
            if watch:  # the rack may have stopped, restarted a process or degraded
                if running_pid(d) is None:
                    _fail(f"rack stopped: data_dir={d}", 1)
                try:
                    fresh = read_state(d)
                except (FileNotFoundError, ValueError):
                    fresh = state  # being rewritten right now: next turn
                if [p.get("pid") for p in fresh["processes"]] != \
                        [p.get("pid") for p in state["processes"]]:
                    probe.close()
                    probe = RackProbe(fresh)
                    prev = probe.sample()
                    state = fresh
                    continue
                state = fresh
            cur = probe.sample()
            table = rows(prev, cur)
            prev = cur
            if watch and not as_json and sys.stdout.isatty():
                typer.echo("\x1b[H\x1b[2J", nl=False)  # home + clear: redraw, not scroll
            print_status(state, table, as_json)
            shown += 1
            if not watch or (count and shown >= count):
                break
    except KeyboardInterrupt:
        pass
    finally:
        probe.close()


def _hub_link(state: dict) -> str | None:
    """The rack's link to its Mixer hub (None: no passport); ``hub_link`` when the state
    came from elsewhere (``mixer rack status`` asks the rack, which reads its own log)."""
    from engine.hublink import read_link_state

    if "hub_link" in state:
        return state["hub_link"]
    return read_link_state(Path(state["data_dir"])) if state.get("hub") else None


def print_status(state: dict, table: list[dict], as_json: bool) -> None:
    """The ``engine status`` table (or JSON) of ``state`` (the rack's state file) and
    ``table`` (``engine.telemetry.rows``); ``mixer rack status`` prints a rack's with it."""
    if as_json:
        typer.echo(json.dumps({"rack": state["rack"], "pid": state["pid"],
                               "nats_url": state["nats_url"],
                               "status": state.get("status", "running"),
                               "reason": state.get("reason", ""),
                               "code_paths": state.get("code_paths", {}),
                               "hub_link": _hub_link(state), "processes": table},
                              indent=1))
        return
    typer.echo(f"rack {state['rack']}  {state.get('status', 'running')}  supervisor pid "
               f"{state['pid']}  nats {state['nats_url']}  {time.strftime('%H:%M:%S')}")
    if state.get("reason"):
        typer.echo(f"  {state['reason']}")
    if state.get("code_paths"):
        typer.echo("  code: " + ", ".join(f"{k} {v}" for k, v in state["code_paths"].items()))
    if state.get("hub"):
        typer.echo(f"  hub link: {_hub_link(state)} ({', '.join(state['hub'])})")
    head = (f"{'process':<24} {'pid':>7} {'cpu':>3} {'cpu%':>6} {'rss MB':>7} {'in/s':>9} "
            f"{'out/s':>9} {'errors':>6} {'fill':>6} {'p50 ms':>7} {'p99 ms':>7}")
    typer.echo(head)

    def ms(v):
        return f"{v / 1e6:7.2f}" if v is not None else f"{'-':>7}"

    for r in table:
        typer.echo(
            f"{r['name']:<24} {r['pid'] or '-':>7} {r['cpu'] if r['cpu'] is not None else '-':>3} "
            f"{r.get('cpu_pct', 0):6.1f} {r['rss'] / 2**20:7.1f} {r.get('in_per_s', 0):9.0f} "
            f"{r.get('out_per_s', 0):9.0f} {r.get('errors', 0):6} {r['ring_fill']:6.1%} "
            f"{ms(r.get('p50_ns'))} {ms(r.get('p99_ns'))}"
        )
    for gear, stats in _gear_stats(table).items():
        typer.echo(f"{gear}:")
        line = " "
        for key, value in stats.items():
            item = f" {key}={value}"
            if len(line) + len(item) > 100:
                typer.echo(line)
                line = " "
            line += item
        if line.strip():
            typer.echo(line)
    typer.echo("")


def _gear_stats(table: list[dict]) -> dict[str, dict[str, int]]:
    """Gear stats summed over the replicas of each gear (``payments.switch.0`` and ``.1``
    -> ``payments.switch``), counters that never moved left out."""
    out: dict[str, dict[str, int]] = {}
    for r in table:
        if not r.get("stats"):
            continue
        name = r["name"]
        base = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
        acc = out.setdefault(base, {})
        for key, value in r["stats"].items():
            acc[key] = acc.get(key, 0) + value
    return out


keys = typer.Typer(help="Vault keys (coat check): rotation.", no_args_is_help=True)
app.add_typer(keys, name="keys")


@keys.command("rotate")
def keys_rotate(
    config: Path = CONFIG,
) -> None:
    """Add a new vault key and make it current: new entries use it, old ones stay readable
    until they expire. A running switch picks the new key up within a second."""
    from gears.coatcheck import ENV_KEY, rotate

    cfg = _load(config)
    key_files = {coat.key_file for p in cfg.pipelines
                 if (coat := getattr(p.source.settings, "coatcheck", None)) is not None}
    if not key_files:
        _fail(f"{config}: no gear has coat check enabled: there is no vault key to rotate", 1)
    key_file = key_files.pop()
    if os.environ.get(ENV_KEY):
        _fail(f"the vault key comes from {ENV_KEY}; rotate it there")
    path = Path(cfg.data_dir) / key_file
    typer.echo(f"rotated: key_id={rotate(path)}, key_file={path}")


iso = typer.Typer(help="ISO 8583 tools: load generator, issuer simulator, codec.",
                  no_args_is_help=True)
app.add_typer(iso, name="iso")
modbus = typer.Typer(help="Modbus tools: a device simulator.", no_args_is_help=True)
app.add_typer(modbus, name="modbus")
uns = typer.Typer(help="The rack's Unified Namespace: last values (KV bucket uns) and live "
                  "samples.", no_args_is_help=True)
app.add_typer(uns, name="uns")
UNS_BUCKET = "uns"


def _rack_bus(config: Path | None, data_dir: Path | None) -> tuple[str, object]:
    """(NATS URL, auth) of a running rack."""
    from engine.bus import load_auth
    from engine.supervisor import running_pid
    from engine.telemetry import read_state

    d = _data_dir(config, data_dir)
    try:
        if running_pid(d) is None:
            raise FileNotFoundError(d)
        state = read_state(d)
    except FileNotFoundError:
        _fail(f"no rack running: data_dir={d}", 1)
    return state["nats_url"], load_auth(d)


async def _uns_values(url: str, auth, prefix: str) -> dict:
    from nats.js.errors import NoKeysError, NotFoundError

    from engine.bus import close_quietly, connect
    from engine.cbor import loads

    nc = await connect(url, auth, "fluxrig-uns-cli")
    try:
        try:
            kv = await nc.jetstream().key_value(UNS_BUCKET)
            keys = await kv.keys()
        except (NotFoundError, NoKeysError):
            return {}
        out = {}
        for k in keys:
            if not prefix or k == prefix or k.startswith(prefix + "."):
                entry = await kv.get(k)
                out[k] = loads(entry.value)["body"]
        return out
    finally:
        await close_quietly(nc)


@uns.command("browse")
def uns_browse(
    prefix: str = typer.Argument("", help="a path prefix (acme.lyon): only under it"),
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    as_json: bool = typer.Option(False, "--json", help="print {path: sample}"),
) -> None:
    """The UNS tree under PREFIX with every tag's last value, quality and age."""
    import asyncio

    from gears.modbus.unsview import tree

    url, auth = _rack_bus(config, data_dir)
    values = asyncio.run(_uns_values(url, auth, prefix))
    if as_json:
        typer.echo(json.dumps(values, indent=1, sort_keys=True))
    elif values:
        typer.echo(tree(values, time.time_ns()), nl=False)
    else:
        _fail(f"no UNS values{' under ' + prefix if prefix else ''}", 1)


@uns.command("get")
def uns_get(
    path: str = typer.Argument(..., help="a tag's full path"),
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    as_json: bool = typer.Option(False, "--json", help="print the sample as JSON"),
) -> None:
    """One tag's last value (exit 1 when the path has none)."""
    import asyncio

    from gears.modbus.unsview import line

    url, auth = _rack_bus(config, data_dir)
    values = asyncio.run(_uns_values(url, auth, path))
    sample = values.get(path)
    if sample is None:
        _fail(f"no value for {path}", 1)
    typer.echo(json.dumps(sample, sort_keys=True) if as_json else line(sample, time.time_ns()))


@uns.command("set")
def uns_set(
    path: str = typer.Argument(..., help="a writable tag's full path"),
    value: str = typer.Argument(..., help="the value: a number, true/false, or text"),
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    who: str = typer.Option(None, "--as", help="who asks (kept in the audit event; default: "
                            "user@host)"),
    as_json: bool = typer.Option(False, "--json", help="print the answer as JSON"),
    timeout: float = typer.Option(10.0, min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Write a value to a tag (writable: true in the rig): range-checked, encoded with the
    tag's type and order, written in order with the device's other writes, read back to
    confirm, and kept as an audit event (stream UNS_WRITES). Exit 0 when confirmed, 1 when
    refused or failed (the reason is printed)."""
    import asyncio
    import getpass
    import secrets
    import socket

    from engine.bus import close_quietly, connect
    from engine.telemetry import read_state
    from gears.modbus.write import reply_prefix, set_subject

    url, auth = _rack_bus(config, data_dir)
    rack = read_state(_data_dir(config, data_dir))["rack"]
    try:
        parsed: object = json.loads(value)
    except ValueError:
        parsed = value  # bare text
    asker = who or f"{getpass.getuser()}@{socket.gethostname()}"

    async def ask() -> dict | None:
        nc = await connect(url, auth, "fluxrig-uns-set")
        try:
            reply = f"{reply_prefix(rack)}.{secrets.token_hex(8)}"
            sub = await nc.subscribe(reply, max_msgs=1)
            await nc.publish(set_subject(rack, path), json.dumps(
                {"value": parsed, "who": asker}).encode(), reply=reply)
            try:
                msg = await sub.next_msg(timeout=timeout)
            except Exception:
                return None
            return json.loads(msg.data)
        finally:
            await close_quietly(nc)

    answer = asyncio.run(ask())
    if answer is None:
        _fail(f"no answer for {path} (no modbus source with writable tags runs here?)", 1)
    if as_json:
        typer.echo(json.dumps(answer, sort_keys=True))
    elif answer["result"] == "confirmed":
        typer.echo(f"{path}: {answer.get('old')} -> {answer.get('new')} (read back "
                   f"{answer.get('read_back')})")
    else:
        typer.echo(f"error: {path}: {answer['result']}: {answer.get('reason', '')}",
                   err=True)
    if answer["result"] != "confirmed":
        raise typer.Exit(1)


@uns.command("watch")
def uns_watch(
    prefix: str = typer.Argument("", help="a path prefix: only samples under it"),
    config: Path = typer.Option(None, "--config", "-c", help="rig file (YAML)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="the rack's data dir"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    count: int = typer.Option(0, min=0, help="stop after this many samples (0: Ctrl-C)"),
) -> None:
    """Samples as they are published (the stream's subjects uns.v1.PREFIX.>)."""
    import asyncio

    from engine.bus import close_quietly, connect
    from engine.cbor import loads
    from gears.modbus.unsview import line

    url, auth = _rack_bus(config, data_dir)
    subject = f"uns.v1.{prefix}.>" if prefix else "uns.v1.>"

    async def follow() -> None:
        nc = await connect(url, auth, "fluxrig-uns-watch")
        try:
            sub = await nc.subscribe(subject)
            seen = 0
            async for msg in sub.messages:
                body = loads(msg.data)["body"]
                typer.echo(json.dumps(body, sort_keys=True) if as_json
                           else line(body, time.time_ns()))
                seen += 1
                if count and seen >= count:
                    return
        finally:
            await close_quietly(nc)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        return


@modbus.command("sim")
def modbus_sim(
    devices: int = typer.Option(1, min=1, max=10_000, help="devices to simulate"),
    port: int = typer.Option(5020, min=1, max=65535, help="first port (device i on "
                             "port + i), or the one port with --units"),
    units: bool = typer.Option(False, "--units", help="all devices on one port, unit ids "
                               "1..N (a gateway)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    registers: int = typer.Option(100, min=22, max=65536, help="registers per table"),
    seed: int = typer.Option(0, help="seed of the random walks"),
) -> None:
    """Modbus TCP devices with moving values (counter, sine, random walk, float32) and fixed
    test values; the register map is in gears/modbus/simulator.py. Runs until stopped."""
    from gears.modbus.simulator import sim_command

    raise typer.Exit(sim_command(devices=devices, port=port, units=units, host=host,
                                 registers=registers, seed=seed))


def _framing(prefix: str, header_len: int, max_frame: int):
    from gears.iso8583.framing import FramingConfig

    try:
        return FramingConfig(prefix=prefix, header_len=header_len, max_frame=max_frame)
    except ValueError as exc:
        _fail(exc)


def _spec(name: str):
    from gears.iso8583.codec import CodecError, spec_by_name

    try:
        return spec_by_name(name)
    except CodecError as exc:
        _fail(exc)


@iso.command("load")
def iso_load(
    host: str = typer.Option("127.0.0.1", help="the switch's acquirer host"),
    port: int = typer.Option(8583, min=1, max=65535, help="the switch's acquirer port"),
    connections: int = typer.Option(10, min=1, help="acquirer connections (one terminal each)"),
    rate: float = typer.Option(0.0, min=0, help="requests/s in total; 0 = max (closed loop)"),
    window: int = typer.Option(4, min=1, help="outstanding requests per connection at max rate"),
    duration: float = typer.Option(10.0, help="seconds of sending"),
    count: int = typer.Option(0, min=0, help="stop after this many requests (overrides duration)"),
    mix: list[str] = typer.Option(["4761739001010119:0100:10000"], help=(
        "request mix entries PAN[:MTI[:AMOUNT[:WEIGHT]]], repeatable")),
    spec: str = typer.Option("default", help="codec spec name or YAML spec file"),
    prefix: str = typer.Option("2B", help="length prefix: 2B 2L 4B 4L 4A"),
    header: str = typer.Option("", help="header/TPDU as hex"),
    max_frame: int = typer.Option(8192, help="largest message accepted, bytes"),
    grace: float = typer.Option(7.0, help="seconds to wait for outstanding replies"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (no "
                                 "progress lines)"),
) -> None:
    """Drive a switch like many acquirer terminals; exit 1 on any cross-wired or lost reply."""
    import asyncio

    from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

    entries = []
    for m in mix:
        parts = m.split(":")
        try:
            entries.append(MixEntry(pan=parts[0], mti=parts[1] if len(parts) > 1 else "0100",
                                    amount=int(parts[2]) if len(parts) > 2 else 10_000,
                                    weight=int(parts[3]) if len(parts) > 3 else 1))
        except (ValueError, IndexError):
            _fail(f"--mix: invalid entry {m!r} (expected PAN[:MTI[:AMOUNT[:WEIGHT]]])")
    try:
        hdr = bytes.fromhex(header)
    except ValueError:
        _fail(f"--header: expected hex, got {header!r}")
    gen = LoadGenerator(LoadConfig(
        host=host, port=port, spec=_spec(spec), framing=_framing(prefix, len(hdr), max_frame),
        header=hdr, connections=connections, rate=rate, window=window, duration=duration,
        count=count, grace=grace, mix=tuple(entries)))
    if not as_json:
        def progress(g) -> None:
            r = g.report
            typer.echo(f"sent {r.sent:>9,}  received {r.received:>9,}  "
                       f"cross-wired {r.cross_wired}", err=True)
        gen.progress = progress
    report = asyncio.run(gen.run())
    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        typer.echo(f"TPS {summary['tps']:,.0f}  sent {summary['sent']:,}  received "
                   f"{summary['received']:,}  approved {summary['approved']:,}  declined "
                   f"{summary['declined']:,}  timeouts {summary['timeouts']:,}")
        typer.echo(f"latency ms p50 {summary['p50_ms']}  p90 {summary['p90_ms']}  p99 "
                   f"{summary['p99_ms']}  max {summary['max_ms']}")
        if report.connect_errors:
            typer.echo(f"connections refused or failed: {report.connect_errors} of "
                       f"{connections}; last error: {report.connect_error}", err=True)
        reason = "" if report.ok else (" (nothing sent)" if report.sent == 0 else
                                       " (replies cross-wired or lost)")
        typer.echo(f"codes {summary['codes']}  cross-wired {summary['cross_wired']}  lost "
                   f"{summary['lost']}  -> {'OK' if report.ok else 'FAILED'}{reason}")
    raise typer.Exit(0 if report.ok else 1)


@iso.command("issuer")
def iso_issuer(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: list[int] = typer.Option([9001], min=0, max=65535,
                                   help="port(s) to serve, repeatable"),
    rule: list[str] = typer.Option([], help="BIN[:min_amount]=DE39 or BIN=drop, repeatable"),
    delay: float = typer.Option(0.0, help="seconds before each answer"),
    jitter: float = typer.Option(0.0, help="extra random delay, uniform 0..jitter seconds"),
    drop_rate: float = typer.Option(0.0, min=0, max=1, help="fraction never answered"),
    spec: str = typer.Option("default", help="codec spec name or YAML spec file"),
    prefix: str = typer.Option("2B", help="length prefix: 2B 2L 4B 4L 4A"),
    header_len: int = typer.Option(0, min=0, help="header/TPDU bytes before each message"),
    max_frame: int = typer.Option(8192, help="largest message accepted, bytes"),
) -> None:
    """Issuer host simulator: DE39 by BIN/amount rules, delay, drop rate. Runs until killed."""
    import asyncio

    from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator

    try:
        rules = [IssuerRule.parse(r) for r in rule]
    except ValueError as exc:
        _fail(f"--rule: {exc}")
    sim = IssuerSimulator(_spec(spec), _framing(prefix, header_len, max_frame), rules,
                          delay=delay, drop_rate=drop_rate, jitter=jitter)

    async def serve() -> None:
        for p in port:
            try:
                bound = await sim.start(host, p)
            except OSError as exc:
                _fail(f"cannot listen: host={host}, port={p}: {exc.strerror or exc}", 1)
            typer.echo(f"issuer simulator listening on {host}:{bound}", err=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


@iso.command("decode")
def iso_decode(
    hex_message: str = typer.Argument(..., help="ISO 8583 message as hex (no length prefix)"),
    spec: str = typer.Option("default", help="codec spec name or YAML spec file"),
    show_pan: bool = typer.Option(False, "--show-pan",
                                  help="print DE2/35/45/52 in clear (default masked)"),
) -> None:
    """Hex -> JSON (DE2 masked to first 6 + last 4, DE35/45/52 hidden, unless --show-pan)."""
    from gears.iso8583.codec import CodecError, decode
    from gears.iso8583.core import mask_pan

    try:
        raw = bytes.fromhex(hex_message)
    except ValueError:
        _fail(f"expected the message as hex digits, got {hex_message[:40]!r}")
    try:
        doc = decode(raw, _spec(spec))
    except (ValueError, CodecError) as exc:
        _fail(exc, 1)
    if not show_pan:
        if "2" in doc:
            doc["2"] = mask_pan(doc["2"])
        for f in ("35", "45", "52"):  # tracks hold the PAN too; a PIN block is never shown
            if f in doc:
                doc[f] = "*" * len(doc[f])
    typer.echo(json.dumps(doc, indent=1))


@iso.command("encode")
def iso_encode(
    json_message: str = typer.Argument(..., help='fields as JSON, e.g. {"t":"0800","70":"301"}'),
    spec: str = typer.Option("default", help="codec spec name or YAML spec file"),
) -> None:
    """JSON object of fields (field number or "t" for the MTI -> text value) -> hex."""
    from gears.iso8583.codec import CodecError, encode

    try:
        doc = json.loads(json_message)
    except RecursionError:
        _fail("invalid JSON: nested too deeply", 2)
    except ValueError as exc:
        _fail(f"invalid JSON: {exc}", 2)
    if not isinstance(doc, dict):
        _fail(f"expected a JSON object of fields, got {type(doc).__name__}", 2)
    for key, value in doc.items():
        if not isinstance(value, str):
            _fail(f"field {key}: expected a string value, got {type(value).__name__}", 2)
    try:
        typer.echo(encode(doc, _spec(spec)).hex())
    except CodecError as exc:
        _fail(exc, 1)


@app.command()
def bench(
    config: Path = typer.Argument(..., help="rig file (YAML) to run and drive",
                                  show_default=False),
    duration: str = typer.Option("20s", help="how long to drive it: seconds, or 20s, 2m"),
    workers: int = typer.Option(1, "--workers", "-w", help="replicas of every stage, as "
                                "engine start --workers"),
    rate: float = typer.Option(None, help="ISO rigs: requests/s in total; default: max rate "
                               "(closed loop)", show_default=False),
    connections: int = typer.Option(None, help="ISO rigs: acquirer connections (default 50)",
                                    show_default=False),
    issuer_sim: bool = typer.Option(False, "--issuer-sim", help="ISO rigs: serve the "
                                    "127.0.0.1 issuers nobody listens for with the issuer "
                                    "simulator"),
    json_out: Path = typer.Option(None, "--json", help="write the figures and the machine "
                                  "fingerprint to this JSON file", show_default=False),
    baseline: Path = typer.Option(None, "--compare", help="a previous engine bench --json of "
                                  "the same rig: exit 1 when throughput fell or CPU per "
                                  "message rose beyond --band", show_default=False),
    band: str = typer.Option("10%", help="change allowed against --compare: 10% or 0.1"),
    force: bool = typer.Option(False, "--force", help="compare with a baseline of other rig "
                               "content or load options all the same"),
) -> None:
    """Run a rig as a rack, drive it with its source's load (ISO load generator, or the
    generator itself) for a duration, drain it; print throughput, latency percentiles, CPU
    per message and peak RSS/PSS. Figures compare only with a baseline from this machine."""
    from engine.bench import BenchError, parse_band, parse_duration_option
    from engine.benchrun import BenchFailed, prepare, run

    try:
        spec = prepare(config, duration=parse_duration_option(duration), workers=workers,
                       rate=rate, connections=connections, issuer_sim=issuer_sim,
                       baseline=baseline, band=parse_band(band), force=force)
        code = run(spec, json_out=json_out, echo=typer.echo)
    except BenchError as exc:
        _fail(exc)
    except BenchFailed as exc:
        _fail(exc, exc.code)
    raise typer.Exit(code)


@app.command()
def demo(seconds: float = typer.Option(20.0, help="how long to run"),
         pipeline: bool = typer.Option(False, "--pipeline",
                                       help="the generic generator rig instead of the switch")) -> None:
    """Run the ISO 8583 switch demo (or --pipeline: configs/demo.yaml) and summarise."""
    from engine.demo import run, run_switch

    raise typer.Exit(run(seconds) if pipeline else run_switch(seconds))


def main() -> None:
    """Console-script entry point."""
    from engine._native import pure_forced

    try:  # checked once here, so no command meets it as a traceback at its first import
        pure_forced()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    app()
if __name__ == "__main__":
    main()
