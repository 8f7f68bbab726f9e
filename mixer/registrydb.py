"""The fleet registry on disk: ``registry.duckdb`` (``docs/mixer-design.md`` section 9).

Theory of operation: the ``registry`` process is the only writer. It ``load``s the file into
a sans-I/O ``mixer.registry.Registry`` at start, then writes each batch of state changes
with ``save_changes`` (rack rows and ``rack_events`` rows in one transaction) and, every
10 s, ``flush_seen`` for the heartbeat fields of all racks (one statement, so 1,000 racks at
1 Hz cost one write, not 1,000). Memory is the truth while it runs; a crash loses the heartbeat
fields since the last flush, never a state change the caller saved (committed to the WAL). With the Mixer
stopped, ``mixer racks`` opens the file ``read_only`` and renders it with ``racks_table``
or ``racks_json``.

DuckDB takes an OS lock on the file: exclusive for a writer, shared for read-only. While
one process holds it for writing, another process's open (writer or read-only) fails with
``duckdb.IOException``: ``IO Error: Could not set lock on file "<path>": Conflicting lock is
held in <exe> (PID <n>)`` (seen with duckdb 2.0.1). Readers share, but a reader also keeps
a writer out: a ``mixer racks`` in progress makes a starting registry fail its open. ``open`` turns that, and a file that is
not a DuckDB database, into ``RegistryStoreError``; so does every later ``duckdb.Error``.

Times are ``TIMESTAMP_NS`` (TIMESTAMP with nanoseconds), so the ns the registry holds round
trip exactly; 0 ("never") is stored as NULL. Labels are ``JSON`` text, kept byte for byte.
A revoked rack keeps its row (``revoked_at`` set, state ``revoked``) and its history, and is
not loaded; only ``enroll`` brings it back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import orjson

from mixer.registry import NEVER_SEEN, RackInfo, Registry, StateChange

REVOKED = "revoked"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS racks (
  id TEXT PRIMARY KEY,
  nkey TEXT,                         -- public nkey; NULL: heard of before enrolled here
  labels JSON NOT NULL DEFAULT '{}',
  enrolled_at TIMESTAMP_NS, revoked_at TIMESTAMP_NS,
  state TEXT NOT NULL CHECK (state IN ('never-seen', 'online', 'offline', 'revoked')),
  state_since TIMESTAMP_NS,
  version TEXT NOT NULL DEFAULT '', rig_hash TEXT NOT NULL DEFAULT '',
  processes INTEGER NOT NULL DEFAULT 0,
  started_at TIMESTAMP_NS, first_seen TIMESTAMP_NS, last_seen TIMESTAMP_NS);
CREATE SEQUENCE IF NOT EXISTS rack_events_seq;
CREATE TABLE IF NOT EXISTS rack_events (
  seq BIGINT NOT NULL DEFAULT nextval('rack_events_seq'),  -- orders events of equal ts
  rack TEXT NOT NULL, ts TIMESTAMP_NS NOT NULL,
  kind TEXT NOT NULL,                -- state, enroll, revoke
  from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL);
"""

# One statement for any number of racks: the columns arrive as lists and unnest into rows.
# A revoked rack is never brought back by a late heartbeat (the WHERE on the update).
_UPSERT = """
INSERT INTO racks (id, labels, state, state_since, version, rig_hash, processes,
                   started_at, first_seen, last_seen)
SELECT id, labels::JSON, state, make_timestamp_ns(nullif(changed, 0)), version, rig_hash,
       processes, make_timestamp_ns(nullif(started, 0)),
       make_timestamp_ns(nullif(first_seen, 0)), make_timestamp_ns(nullif(last_seen, 0))
FROM (SELECT unnest($id) AS id, unnest($labels) AS labels, unnest($state) AS state,
             unnest($changed) AS changed, unnest($version) AS version,
             unnest($rig_hash) AS rig_hash, unnest($processes) AS processes,
             unnest($started) AS started, unnest($first_seen) AS first_seen,
             unnest($last_seen) AS last_seen)
ON CONFLICT (id) DO UPDATE SET
  labels = excluded.labels, state = excluded.state, state_since = excluded.state_since,
  version = excluded.version, rig_hash = excluded.rig_hash,
  processes = excluded.processes, started_at = excluded.started_at,
  first_seen = excluded.first_seen, last_seen = excluded.last_seen
WHERE racks.revoked_at IS NULL
"""

_EVENTS = """
INSERT INTO rack_events (rack, ts, kind, from_state, to_state, reason)
SELECT unnest($rack), make_timestamp_ns(unnest($ts)), $kind, unnest($before),
       unnest($after), unnest($reason)
"""


class RegistryStoreError(RuntimeError):
    """``registry.duckdb`` cannot be opened, read or written; the message names the file."""


def _reason(exc: duckdb.Error) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Could not set lock" in text:
        pid = re.search(r"PID (\d+)", text)
        return "locked by another process" + (f" (pid {pid.group(1)})" if pid else "")
    if "not a valid DuckDB database file" in text:
        return "not a DuckDB database file"
    if "database does not exist" in text:
        return "does not exist"
    return text


class RegistryStore:
    """The registry's DuckDB file; use ``RegistryStore.open``. Not thread-safe."""

    def __init__(self, db: duckdb.DuckDBPyConnection, path: Path):
        self._db = db
        self.path = path

    @classmethod
    def open(cls, path: Path, read_only: bool = False) -> RegistryStore:
        """Open (a writer creates the file and schema if missing) ``path``.

        Raises:
            RegistryStoreError: not a DuckDB file, locked by another process (a writer
                anywhere blocks every other open), missing (read-only), or no registry
                tables in it (read-only).
        """
        try:
            db = duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            raise RegistryStoreError(f"registry store {path}: {_reason(exc)}") from exc
        store = cls(db, path)
        try:
            with store._tx():
                if not read_only:
                    db.execute(_SCHEMA)
                found = db.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name"
                                   " IN ('racks', 'rack_events')").fetchone()
            if not found or found[0] != 2:
                raise RegistryStoreError(f"registry store {path}: no registry tables in it")
        except RegistryStoreError:
            db.close()
            raise
        return store

    @contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            self._db.begin()
            try:
                yield
            except BaseException:
                self._db.rollback()
                raise
            self._db.commit()
        except duckdb.Error as exc:
            raise RegistryStoreError(f"registry store {self.path}: {_reason(exc)}") from exc

    def close(self) -> None:
        """Close the file (checkpointing it); the store cannot be used afterwards."""
        self._db.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self, registry: Registry) -> None:
        """Put every rack not revoked into ``registry.racks`` (replacing same ids) with its
        stored state; history stays on disk."""
        with self._tx():
            rows = self._db.execute(
                "SELECT id, state, labels, version, rig_hash, processes, epoch_ns(state_since),"
                " epoch_ns(started_at), epoch_ns(first_seen), epoch_ns(last_seen)"
                " FROM racks WHERE revoked_at IS NULL ORDER BY id").fetchall()
        for (rack, state, labels, version, rig_hash, processes, changed, started,
             first_seen, last_seen) in rows:
            registry.racks[rack] = RackInfo(
                id=rack, state=state, labels=orjson.loads(labels), version=version,
                rig_hash=rig_hash, processes=processes, started_ns=started or 0,
                first_seen_ns=first_seen or 0, last_seen_ns=last_seen or 0,
                changed_ns=changed or 0)

    def _upsert(self, infos: Sequence[RackInfo]) -> None:
        if infos:
            self._db.execute(_UPSERT, {
                "id": [i.id for i in infos],
                "labels": [orjson.dumps(dict(i.labels)).decode() for i in infos],
                "state": [i.state for i in infos], "changed": [i.changed_ns for i in infos],
                "version": [i.version for i in infos], "rig_hash": [i.rig_hash for i in infos],
                "processes": [i.processes for i in infos],
                "started": [i.started_ns for i in infos],
                "first_seen": [i.first_seen_ns for i in infos],
                "last_seen": [i.last_seen_ns for i in infos]})

    def _append(self, kind: str, changes: Sequence[StateChange]) -> None:
        if changes:  # one statement: executemany costs ~0.3 ms a row, too slow for 1,000
            self._db.execute(_EVENTS, {
                "kind": kind, "rack": [c.rack for c in changes],
                "ts": [c.ts_ns for c in changes], "before": [c.before for c in changes],
                "after": [c.after for c in changes], "reason": [c.reason for c in changes]})

    def save_changes(self, changes: Sequence[StateChange],
                     racks: Mapping[str, RackInfo]) -> None:
        """In one transaction: upsert the racks ``changes`` name (as found in ``racks``;
        one no longer there is skipped) and append the changes to ``rack_events``."""
        ids = dict.fromkeys(c.rack for c in changes)  # once each: an upsert may not repeat
        with self._tx():
            self._upsert([racks[r] for r in ids if r in racks])
            self._append("state", changes)

    def flush_seen(self, racks: Iterable[RackInfo]) -> None:
        """Write what heartbeats change (and the state) of all ``racks`` in one statement;
        racks revoked on disk are left alone."""
        with self._tx():
            self._upsert(list(racks))

    def enroll(self, rack: str, nkey: str, labels: Mapping[str, str], now_ns: int) -> None:
        """Record ``rack``'s public ``nkey`` and enrolled ``labels`` (replacing stored ones).
        A new or revoked rack becomes ``never-seen`` (an ``enroll`` event); a live one keeps
        its state."""
        self.enroll_many([(rack, nkey, labels)], now_ns)

    def enroll_many(self, racks: Sequence[tuple[str, str, Mapping[str, str]]],
                    now_ns: int) -> None:
        """``enroll`` for each ``(rack, nkey, labels)``, in one transaction (a registry
        starting with 1,000 enrolled racks: one commit, not 1,000)."""
        with self._tx():
            for rack, nkey, labels in racks:
                self._enroll(rack, nkey, labels, now_ns)

    def _enroll(self, rack: str, nkey: str, labels: Mapping[str, str], now_ns: int) -> None:
        row = self._db.execute("SELECT state, epoch_ns(state_since) FROM racks WHERE"
                               " id = ?", [rack]).fetchone()
        state, since = row or ("", None)
        if state in ("", REVOKED):  # new or revoked: starts over as never-seen
            self._append("enroll", [StateChange(rack=rack, ts_ns=now_ns, before=state,
                                                after=NEVER_SEEN, reason="enrolled")])
            state, since = NEVER_SEEN, now_ns
        self._db.execute(
            "INSERT INTO racks (id, nkey, labels, enrolled_at, state, state_since) VALUES"
            " (?, ?, ?::JSON, make_timestamp_ns(?), ?, make_timestamp_ns(?)) ON CONFLICT"
            " (id) DO UPDATE SET nkey = excluded.nkey, labels = excluded.labels,"
            " enrolled_at = excluded.enrolled_at, revoked_at = NULL,"
            " state = excluded.state, state_since = excluded.state_since",
            [rack, nkey, orjson.dumps(dict(labels)).decode(), now_ns, state, since])

    def revoke(self, rack: str, now_ns: int) -> StateChange | None:
        """Mark ``rack`` revoked (``revoked_at``, state ``revoked``, a ``revoke`` event);
        None when it is unknown or already revoked."""
        with self._tx():
            row = self._db.execute("SELECT state FROM racks WHERE id = ? AND revoked_at IS"
                                   " NULL", [rack]).fetchone()
            if row is None:
                return None
            change = StateChange(rack=rack, ts_ns=now_ns, before=row[0], after=REVOKED,
                                 reason="revoked")
            self._db.execute("UPDATE racks SET revoked_at = make_timestamp_ns(?), state = ?,"
                             " state_since = make_timestamp_ns(?) WHERE id = ?",
                             [now_ns, REVOKED, now_ns, rack])
            self._append("revoke", [change])
        return change

    def history(self, rack: str | None = None, limit: int = 100) -> list[StateChange]:
        """The last ``limit`` events (of ``rack``, or of all racks), oldest first."""
        with self._tx():
            rows = self._db.execute(
                "SELECT rack, epoch_ns(ts), from_state, to_state, reason FROM rack_events"
                " WHERE ? IS NULL OR rack = ? ORDER BY ts DESC, seq DESC LIMIT ?",
                [rack, rack, limit]).fetchall()
        return [StateChange(rack=r, ts_ns=ts, before=b, after=a, reason=why)
                for r, ts, b, a, why in reversed(rows)]


from mixer.views import racks_json, racks_table  # noqa: E402,F401 - their home until moved
