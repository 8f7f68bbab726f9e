"""``mixer traces``'s body, without the CLI framework: the typer command calls it, and
``mixer.entry`` calls ``quick_traces`` first so a lookup does not pay ~150 ms importing
typer (the lookup itself takes less: the bar is 500 ms end to end)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Final

from engine.units import parse_duration

# ten years: beyond any retention worth having, and far inside the dates Python can show
# (a larger window ran past year 1 and ended in a ValueError traceback)
MAX_SINCE_DAYS: Final = 3650


def since_seconds(text: str, option: str = "--since") -> float:
    """``--since``: a duration (``30s``, ``10m``, ``1h``, ``2d``) in seconds, more than 0 and
    at most ``MAX_SINCE_DAYS`` days.

    Raises:
        ValueError: anything else (the message names ``option`` and the rule).
    """
    t = text.strip()
    seconds = (float(t[:-1]) * 86_400.0 if t.endswith("d") and t[:-1].isdigit()
               else parse_duration(t))
    if seconds is None or seconds <= 0:
        raise ValueError(f"invalid {option} {text!r} (expected a duration: 30s, 10m, 1h, 2d)")
    if seconds > MAX_SINCE_DAYS * 86_400.0:
        raise ValueError(f"invalid {option} {text!r} (at most {MAX_SINCE_DAYS}d)")
    return seconds


def run_traces(data_dir: Path, query: str, since: str, limit: int, as_json: bool) -> int:
    """Look ``query`` up and print it (waterfalls or JSON); the exit code: 0 found, 1 no
    match or no hub dir, 2 a bad query or option (said on stderr)."""
    if not data_dir.is_dir():
        sys.stderr.write(f"error: not a hub data dir: {data_dir}\n")
        return 1
    try:
        seconds = since_seconds(since)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    import duckdb

    from mixer.tracequery import (
        TraceLookupError,
        find_traces,
        parse_lookup,
        readonly,
        waterfall,
    )

    try:
        lookup = parse_lookup(query)
    except TraceLookupError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        found = find_traces(readonly(data_dir), data_dir, lookup, seconds, limit)
    except duckdb.Error as exc:
        sys.stderr.write(f"error: cannot read the traces: {exc}\n")
        return 1
    if not found:
        sys.stderr.write(f"no trace matches {query!r} in the last {since} (traces are "
                         f"stored under {data_dir / 'traces'})\n")
        return 1
    if as_json:
        sys.stdout.write(json.dumps([t.as_json() for t in found], indent=1) + "\n")
    else:
        sys.stdout.write(waterfall(found, shutil.get_terminal_size((120, 24)).columns))
    sys.stdout.flush()
    return 0


def quick_traces(argv: list[str]) -> bool:
    """``mixer traces DIR QUERY [--since S] [--limit N] [--json]`` run here; False (nothing
    done) for anything else (help, unknown options: the full CLI says what is wrong)."""
    if len(argv) < 3 or argv[0] != "traces" or any(a.startswith("-") for a in argv[1:3]):
        return False
    since, limit, as_json = "1h", 10, False
    rest = argv[3:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--json":
            as_json = True
        elif a in ("--since", "--limit") and i + 1 < len(rest):
            if a == "--since":
                since = rest[i + 1]
            elif rest[i + 1].isdigit() and 1 <= int(rest[i + 1]) <= 1000:
                limit = int(rest[i + 1])
            else:
                return False
            i += 1
        else:
            return False
        i += 1
    raise SystemExit(run_traces(Path(argv[1]), argv[2], since, limit, as_json))


__all__ = ["MAX_SINCE_DAYS", "quick_traces", "run_traces", "since_seconds"]
