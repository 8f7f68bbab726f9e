"""The ``mixer`` command line (typer): the central registry, telemetry and audit service."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from mixer.settings import MixerSettings

app = typer.Typer(
    help="fluxrig mixer: registry, fleet telemetry and audit trail for many racks.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the fluxrig version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fluxrig"))


@app.command()
def init(
    data_dir: Path = typer.Argument(..., help="the hub's data dir (created 0700)"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host", help=(
        "a name or address racks dial to reach the hub, repeatable (the hub certificate's "
        "subject alternative names and the passports' URLs)")),
    port: int = typer.Option(4222, min=1, max=65535, help="the hub's client port"),
    leaf_port: int = typer.Option(7422, min=1, max=65535, help="the port racks link to"),
) -> None:
    """Create a hub's data dir: its certificate authority and the hub's TLS certificate
    (private keys 0600, never overwritten), the hub's own users and mixer.yaml."""
    from mixer.hubfiles import HubFileError, local_users
    from mixer.pki import PkiError, init_pki
    from mixer.settings import SETTINGS_FILE, settings_text

    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki = init_pki(data_dir, host)
        local_users(data_dir)
        settings = data_dir / SETTINGS_FILE
        if not settings.exists():
            settings.write_text(settings_text(host, port, leaf_port))
    except (PkiError, HubFileError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"hub initialised: data_dir={data_dir}")
    typer.echo(f"  CA certificate (give to racks): {pki.ca_cert}")
    typer.echo(f"  hub certificate for: {', '.join(host)}")
    typer.echo(f"  settings: {settings} (leaf port {leaf_port}, client port {port})")


DATA_DIR = typer.Argument(..., help="the hub's data dir (made by `mixer init`)")


def _fail(message: object, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(data_dir: Path) -> MixerSettings:
    from mixer.settings import ConfigError, load_settings

    try:
        return load_settings(data_dir)
    except ConfigError as exc:
        _fail(exc)


@app.command()
def start(
    data_dir: Path = DATA_DIR,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log at DEBUG level"),
    log_file: str = typer.Option("", help="log file (size-rotated); '-' for stderr; "
                                          "default: mixer.log in the data dir"),
    log_format: str = typer.Option("text", help="log line format: text or json"),
    ready_fd: int = typer.Option(-1, help="write 'ready' to this inherited file descriptor "
                                            "once every process serves, then close it"),
) -> None:
    """Run the Mixer in the foreground until SIGTERM/SIGINT: the hub's nats-server (leaf
    listener for racks, JetStream domain hub) and the registry process.

    Exit codes: 0 stopped cleanly, 1 could not start or gave up, 2 bad settings, 3 already
    running.
    """
    from engine.logsetup import LOG_FORMATS, setup_logging
    from engine.service import Notifier
    from mixer.supervisor import MixerAlreadyRunning, MixerStartError, MixerSupervisor

    settings = _settings(data_dir)
    if log_format not in LOG_FORMATS:
        _fail(f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    path = None if log_file == "-" else (Path(log_file) if log_file
                                          else data_dir / "mixer.log")
    setup_logging(path, fmt=log_format, verbose=verbose)
    sup = MixerSupervisor(data_dir, settings, ready_fd=ready_fd, notifier=Notifier())
    try:
        sup.start()
    except MixerAlreadyRunning as exc:
        _fail(exc, 3)
    except MixerStartError as exc:
        _fail(exc, 1)
    code = sup.run()
    if code:
        typer.echo(f"error: mixer stopped, not cleanly: {sup.procs.failed}", err=True)
    raise typer.Exit(code)


@app.command()
def stop(data_dir: Path = DATA_DIR,
         timeout: float = typer.Option(30.0, help="seconds to wait")) -> None:
    """Ask a running Mixer to stop; waits until it has."""
    from engine.procset import stop_holder
    from mixer.supervisor import LOCK

    try:
        pid = stop_holder(data_dir, LOCK, timeout)
    except TimeoutError as exc:
        _fail(f"mixer {exc}", 1)
    if pid is None:
        _fail(f"no mixer running: data_dir={data_dir}", 1)
    typer.echo(f"stopped: pid={pid}")


@app.command()
def status(data_dir: Path = DATA_DIR,
           as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """What a running Mixer runs: hub, leaf listener, processes, restarts."""
    from engine.plan import STATE_FILE
    from mixer.supervisor import running_pid

    if running_pid(data_dir) is None:
        _fail(f"no mixer running: data_dir={data_dir}", 1)
    state = json.loads((data_dir / STATE_FILE).read_text())
    if as_json:
        typer.echo(json.dumps(state, indent=1))
        return
    typer.echo(f"mixer: {state['status']}{' (ready)' if state['ready'] else ''}, "
               f"pid={state['pid']}")
    typer.echo(f"  hub: {state['hub_url']} (nats-server pid {state['hub_pid']}), "
               f"leaf listener {state['leaf']}, racks dial {', '.join(state['leaf_urls'])}")
    if state.get("prometheus"):
        typer.echo(f"  prometheus: http://{state['prometheus']}/metrics")
    if state.get("console"):
        typer.echo(f"  console: {state['console']}")
    if state.get("reason"):
        typer.echo(f"  reason: {state['reason']}")
    for p in state["processes"]:
        typer.echo(f"  {p['name']:<12} pid={p['pid']} restarts={p['restarts']}"
                   + (f" last_error={p['last_error']!r}" if p["last_error"] else ""))


rack_app = typer.Typer(help="Enrol and revoke racks.", no_args_is_help=True)
app.add_typer(rack_app, name="rack")


@rack_app.command("add")
def rack_add(
    data_dir: Path = DATA_DIR,
    rack: str = typer.Argument(..., help="the rack's id (its rig's rack.id)"),
    label: list[str] = typer.Option([], "--label", help="k=v, repeatable: what "
                                    "`mixer racks --label` selects on"),
    out: Path = typer.Option(None, "--out", help="where to write the passport (0600); "
                             "default: <rack>.passport in the current directory"),
) -> None:
    """Enrol a rack: its passport (nkey seed, hub URLs, CA certificate) and its user at the
    hub, limited to the rack's own subjects. A running hub takes it at once (reload)."""
    from mixer.enrol import EnrolError, add_rack
    from mixer.registry import parse_selector

    settings = _settings(data_dir)
    try:
        labels = parse_selector(label)
        path = add_rack(data_dir, settings, rack, labels, out or Path(f"{rack}.passport"))
    except (EnrolError, ValueError) as exc:
        _fail(exc, 1)
    typer.echo(f"rack {rack!r} enrolled; passport: {path} (mode 0600: it holds the rack's "
               f"key; give it to the rack and name it in its rig: mixer: {{passport: ...}})")


@rack_app.command("revoke")
def rack_revoke(data_dir: Path = DATA_DIR,
                rack: str = typer.Argument(..., help="the rack's id")) -> None:
    """Revoke a rack: its user leaves the hub and a live link is dropped at once."""
    from mixer.enrol import EnrolError, revoke_rack

    try:
        kicked = revoke_rack(data_dir, _settings(data_dir), rack)
    except EnrolError as exc:
        _fail(exc, 1)
    typer.echo(f"rack {rack!r} revoked" + (f"; {kicked} live link(s) dropped" if kicked else ""))


@rack_app.command("status")
def rack_status(data_dir: Path = DATA_DIR,
                rack: str = typer.Argument(..., help="the rack's id"),
                as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Ask a linked rack how it is (over its link: the table `engine status` prints)."""
    from engine.cli import print_status
    from mixer.enrol import EnrolError, ask_rack_status

    try:
        answer = ask_rack_status(data_dir, _settings(data_dir), rack)
    except EnrolError as exc:
        _fail(exc, 1)
    print_status(answer["state"], answer["processes"], as_json)


@app.command()
def deploy(
    data_dir: Path = DATA_DIR,
    rig: Path = typer.Argument(None, help="the rig file to deploy (not with --status or "
                               "--rollback)"),
    rack: list[str] = typer.Option([], "--rack", help="a target rack, repeatable"),
    label: list[str] = typer.Option([], "--label", help="k=v, repeatable: every enrolled "
                                    "rack with all these labels"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check for every target, store "
                                 "nothing"),
    show_status: bool = typer.Option(False, "--status", help="what each target was given "
                                     "and what it reported"),
    rollback: bool = typer.Option(False, "--rollback", help="deploy an earlier revision "
                                  "again (the one applied before the current one, or --to)"),
    to: int = typer.Option(None, "--to", help="with --rollback: the revision to go back to"),
) -> None:
    """Config as code: check a rig for each target rack (as `engine check` would, the rack's
    id set), store it as a new revision in the hub; each linked rack pulls it, checks it
    again, applies it (drain, restart on it) and reports `applied` or the error. A running
    rack is never stopped for a config it cannot run."""
    from mixer.enrol import EnrolError, RigRefused, run_deploy
    from mixer.registry import parse_selector

    try:
        selector = parse_selector(label)
        text = run_deploy(data_dir, _settings(data_dir), rig=rig, racks=rack,
                          selector=selector, dry_run=dry_run, status=show_status,
                          rollback=rollback, to=to)
    except RigRefused as exc:
        _fail(exc, 2)
    except (EnrolError, ValueError) as exc:
        _fail(exc, 1)
    typer.echo(text, nl=not text.endswith("\n"))


@app.command()
def racks(
    data_dir: Path = DATA_DIR,
    label: list[str] = typer.Option([], "--label", help="k=v, repeatable: only racks with "
                                    "all these enrolled labels"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every enrolled rack: state (online, offline, never-seen), labels, version, rig.

    A running Mixer's registry answers from memory; a stopped one's file is read."""
    from mixer.ask import AskError, ask, running
    from mixer.registry import RackInfo, parse_selector

    try:
        selector = parse_selector(label)
    except ValueError as exc:
        _fail(exc)
    if running(data_dir):  # the light path: no DuckDB, no Arrow, no rig checker
        from mixer.views import racks_table

        try:
            raw = ask(data_dir, "racks", {"labels": selector})
        except AskError as exc:
            _fail(exc, 1)
        if as_json:
            typer.echo(raw.decode())
            return
        fields = set(RackInfo.__dataclass_fields__)
        infos = [RackInfo(**{k: v for k, v in d.items() if k in fields})
                 for d in json.loads(raw)]
        typer.echo(racks_table(infos, time.time_ns()), nl=False)
        return
    from mixer.enrol import EnrolError, ask_racks

    try:
        _, text = ask_racks(data_dir, _settings(data_dir), selector, as_json)
    except EnrolError as exc:
        _fail(exc, 1)
    typer.echo(text, nl=not text.endswith("\n"))


@app.command()
def top(
    data_dir: Path = DATA_DIR,
    interval: float = typer.Option(1.0, min=0.2, max=3600, help="seconds between tables"),
    count: int = typer.Option(0, min=0, help="stop after this many tables (0: until Ctrl-C)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON table and stop"),
) -> None:
    """A live fleet table: rack, state, frames/s, p99, errors, CPU, RSS, backlog not yet at
    the hub, age of its last snapshot."""
    from mixer.ask import AskError, ask
    from mixer.views import format_top

    shown = 0
    try:
        while True:
            raw = ask(data_dir, "top", {})
            if as_json:
                typer.echo(raw.decode())
                return
            rows = json.loads(raw)
            if os.isatty(1):
                typer.echo("\x1b[H\x1b[2J", nl=False)  # home + clear: redraw, not scroll
            typer.echo(format_top(rows))
            shown += 1
            if count and shown >= count:
                return
            time.sleep(interval)  # the refresh period itself
    except AskError as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        return


console_app = typer.Typer(help="The web console's users and API tokens (console: in "
                          "mixer.yaml turns it on).", no_args_is_help=True)
app.add_typer(console_app, name="console")
console_user_app = typer.Typer(help="Console users (viewer: reads; admin: also deploys).",
                               no_args_is_help=True)
console_app.add_typer(console_user_app, name="user")


@console_user_app.command("add")
def console_user_add(
    data_dir: Path = DATA_DIR,
    name: str = typer.Argument(..., help="the user's name"),
    role: str = typer.Option("viewer", "--role", help="viewer or admin"),
    password_env: str = typer.Option("", "--password-env", help="take the password from "
                                     "this environment variable (else asked twice)"),
) -> None:
    """Add a console user, or change its password and role (kept as scrypt, 0600)."""
    from mixer.consoleauth import ConsoleAuthError, Credentials

    if password_env:
        password = os.environ.get(password_env, "")
        if not password:
            _fail(f"--password-env: {password_env} is not set or empty")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        Credentials(data_dir).set_user(name, password, role)
    except ConsoleAuthError as exc:
        _fail(exc)
    typer.echo(f"console user {name!r} ({role}) saved")


@console_user_app.command("remove")
def console_user_remove(data_dir: Path = DATA_DIR,
                        name: str = typer.Argument(..., help="the user's name")) -> None:
    """Remove a console user and its tokens (its sessions end at their next request)."""
    from mixer.consoleauth import Credentials

    if not Credentials(data_dir).remove_user(name):
        _fail(f"no console user {name!r}", 1)
    typer.echo(f"console user {name!r} removed")


@console_user_app.command("list")
def console_user_list(data_dir: Path = DATA_DIR) -> None:
    """The console's users and their roles."""
    from mixer.consoleauth import Credentials

    creds = Credentials(data_dir)
    for name, user in sorted(creds.users.items()):
        tokens = sum(1 for t in creds.tokens.values() if t["name"] == name)
        typer.echo(f"{name:<24} {user['role']:<8} {tokens} token(s)")


@console_app.command("token")
def console_token(data_dir: Path = DATA_DIR,
                  name: str = typer.Argument(..., help="the user the token acts as")) -> None:
    """A new API token for a user (Authorization: Bearer TOKEN); printed once, kept hashed."""
    from mixer.consoleauth import ConsoleAuthError, Credentials

    try:
        typer.echo(Credentials(data_dir).new_token(name))
    except ConsoleAuthError as exc:
        _fail(exc, 1)


audit_app = typer.Typer(help="The audit trail: every rack's events in hash-chained Parquet "
                        "(query, reports, verification).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def _audit_root(data_dir: Path) -> Path:
    from mixer.auditfiles import AUDIT_DIR

    if not data_dir.is_dir():
        _fail(f"not a hub data dir: {data_dir}", 1)
    return data_dir / AUDIT_DIR


def _print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    import csv
    import sys

    from mixer.views import text_table

    if fmt == "json":
        import orjson

        typer.echo(orjson.dumps([dict(zip(columns, r)) for r in rows],
                                default=lambda v: v.hex() if isinstance(v, bytes) else str(v),
                                option=orjson.OPT_NON_STR_KEYS).decode())
    elif fmt == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[v.hex() if isinstance(v, bytes) else v for v in r] for r in rows])
    else:
        typer.echo(text_table(columns, rows), nl=False)


def _format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        _fail("--json and --csv: choose one")
    return "json" if as_json else "csv" if as_csv else "table"


@audit_app.command("query")
def audit_query(
    data_dir: Path = DATA_DIR,
    sql: str = typer.Argument(..., help="one read-only SQL statement over the views "
                              "`events` and `txn`"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON array of objects"),
    as_csv: bool = typer.Option(False, "--csv", help="print CSV with a header row"),
) -> None:
    """Run SQL (DuckDB) over the archive: `events` (every event: rack, stream, seq, ts,
    kind, the ISO 8583 fields, cbor, chain, date, hour) and `txn` (ISO 8583 transactions
    and rejections). Filters on rack, date and hour read only those directories. The query
    can read the archive only."""
    from mixer.auditquery import QueryError, open_views, run_query

    fmt = _format(as_json, as_csv)
    try:
        cols, rows = run_query(open_views(_audit_root(data_dir)), sql)
    except QueryError as exc:
        _fail(exc, 2)
    _print_rows(cols, rows, fmt)


@audit_app.command("report")
def audit_report(
    kind: str = typer.Argument(..., help="the report: daily"),
    data_dir: Path = DATA_DIR,
    day: str = typer.Option(None, "--date", help="YYYY-MM-DD (UTC; default: today)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON array of objects"),
    as_csv: bool = typer.Option(False, "--csv", help="print CSV with a header row"),
) -> None:
    """Canned reports. daily: transactions by rack, DE39 and issuer — count, amount (minor
    units), p50 and p99 latency (µs)."""
    import datetime as dt

    from mixer.auditquery import QueryError, daily_report, open_views

    if kind != "daily":
        _fail(f"unknown report {kind!r} (reports: daily)")
    fmt = _format(as_json, as_csv)
    try:
        when = (dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date())
    except ValueError:
        _fail(f"invalid --date {day!r} (expected YYYY-MM-DD)")
    try:
        cols, rows = daily_report(open_views(_audit_root(data_dir)), when.isoformat())
    except QueryError as exc:
        _fail(exc, 2)
    if fmt == "table":
        typer.echo(f"daily report {when.isoformat()} (UTC)")
    _print_rows(cols, rows, fmt)


@audit_app.command("verify")
def audit_verify(
    data_dir: Path = DATA_DIR,
    rack: str = typer.Option(None, "--rack", help="only this rack's chains"),
    since: str = typer.Option(None, "--since", help="YYYY-MM-DD: only parts of days from "
                              "this one on"),
    as_json: bool = typer.Option(False, "--json", help="print the reports as JSON"),
    ask: bool = typer.Option(True, "--ask/--no-ask", help="for a gap, ask the rack (over "
                             "its link, when the Mixer runs) whether it still holds it"),
) -> None:
    """Re-read the archive and recompute every chain: exit 0 when every rack's stream is
    whole and untouched; 1 with each finding (tampered row, duplicate, gap with its range,
    missing or unlisted file, misplaced file, wrong count, a clear card number) naming file
    and row."""
    import datetime as dt

    from mixer.auditverify import ok, verify

    if since is not None:
        try:
            since = dt.date.fromisoformat(since).isoformat()
        except ValueError:
            _fail(f"invalid --since {since!r} (expected YYYY-MM-DD)")
    root = _audit_root(data_dir)
    holds = _rack_holds(data_dir) if ask else None
    reports = verify(root, rack, since, holds)
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in reports], indent=1))
    else:
        for r in reports:
            state = "ok" if not r.findings else f"{len(r.findings)} finding(s)"
            typer.echo(f"{r.stream} rack={r.rack}: {r.rows} events in {r.files} files, "
                       f"seq {r.first}-{r.last}: {state}")
            for f in r.findings:
                typer.echo(f"  {f.line()}")
        if not reports:
            typer.echo("the archive is empty")
    if not ok(reports):
        raise typer.Exit(1)


def _rack_holds(data_dir: Path):  # -> Holds
    from mixer.enrol import EnrolError, ask_rack_status

    cache: dict[str, dict] = {}

    def holds(rack: str, stream: str) -> tuple[int, int] | None:
        if rack not in cache:
            try:
                cache[rack] = ask_rack_status(data_dir, _settings(data_dir), rack)
            except (EnrolError, OSError, ValueError):
                cache[rack] = {}
        got = cache[rack].get("streams", {}).get(stream)
        return (int(got[0]), int(got[1])) if got else None

    return holds


def _since(text: str, option: str) -> float:
    """``--since``: a duration (``10m``, ``1h``, ``2d``; at most ten years) in seconds; a
    bad one fails with exit 2."""
    from mixer.tracecli import since_seconds

    try:
        return since_seconds(text, option)
    except ValueError as exc:
        _fail(exc)


@app.command()
def traces(
    data_dir: Path = DATA_DIR,
    query: str = typer.Argument(..., help="a card token (digits), TERMINAL:STAN, or a trace "
                                "id (32 hex digits or a UUID)"),
    since: str = typer.Option("1h", "--since", help="how far back to look (a trace id that "
                              "is a UUIDv7 is looked up in its own hour)"),
    limit: int = typer.Option(10, "--limit", min=1, max=1000, help="newest transactions "
                              "shown"),
    as_json: bool = typer.Option(False, "--json", help="print the traces as JSON"),
) -> None:
    """Show the stored traces of a transaction across every rack, newest first, as terminal
    waterfalls: a header (trace id, rack, token, terminal, stan, mti, de39, outcome, keep,
    total) and one line per span (depth, name, offset, duration, bar). Traces that overlap
    in time (the same terminal:stan through two racks) share one time axis. Exit 1 when
    nothing matches. (``mixer.entry`` runs the usual forms without loading this CLI.)"""
    from mixer.tracecli import run_traces

    code = run_traces(data_dir, query, since, limit, as_json)
    if code:
        raise typer.Exit(code)


@app.command()
def logs(
    data_dir: Path = DATA_DIR,
    rack: str = typer.Option(None, "--rack", help="only this rack's records"),
    since: str = typer.Option("10m", "--since", help="how far back to start"),
    level: str = typer.Option("debug", "--level", help="this level and above: debug, info, "
                              "warning, error, critical"),
    grep: str = typer.Option(None, "--grep", help="only records whose message or traceback "
                             "holds this text (case-insensitive)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="then print new records live "
                                "(from the hub) until Ctrl-C"),
) -> None:
    """Print the racks' stored log records, oldest first (`ts level rack process logger:
    msg`); with --follow, then the new ones as racks send them."""
    import time as _time

    from mixer.tracequery import levels_from, log_line, read_logs, readonly

    if not data_dir.is_dir():
        _fail(f"not a hub data dir: {data_dir}", 1)
    seconds = _since(since, "--since")
    try:
        levels = levels_from(level)
    except ValueError as exc:
        _fail(f"--level: {exc}")
    if rack is not None:
        from mixer.hubconf import HubConfigError, check_rack_id

        try:
            check_rack_id(rack)
        except HubConfigError as exc:
            _fail(f"--rack: {exc}")
    now = _time.time_ns()

    def stored(since_ns: int = 0) -> list:
        return read_logs(readonly(data_dir), data_dir,
                         max(since_ns, now - int(seconds * 1e9)), _time.time_ns(), rack,
                         levels, grep)

    if not follow:
        for r in stored():
            typer.echo(log_line(r))
        return
    from mixer.logfollow import FollowError, follow_logs

    try:
        follow_logs(data_dir, _settings(data_dir), rack, levels, grep, stored,
                    lambda r: typer.echo(log_line(r)))
    except FollowError as exc:
        _fail(exc, 1)
    except KeyboardInterrupt:
        return


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
