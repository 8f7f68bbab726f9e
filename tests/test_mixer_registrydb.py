"""registry.duckdb: racks and state changes survive close/reopen (and a killed writer), a
read-only open sees what was committed, revocation, the 1,000-rack flush, the `mixer racks`
table and JSON, and the errors for a corrupt or locked file (real files, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from mixer.registry import (
    NEVER_SEEN,
    OFFLINE,
    ONLINE,
    RackInfo,
    Registry,
    Report,
    StateChange,
)
from mixer.registrydb import RegistryStore, RegistryStoreError, racks_json, racks_table

S = 1_000_000_000  # ns per second
T0 = 1_714_564_800 * S  # 2024-05-01T12:00:00Z
ROOT = Path(__file__).resolve().parents[1]
LABELS = {"site": "Zürich-Ost", "expr": "a=b=c", "role": "payments, ISO 8583 ✓"}


def _enroll(reg: Registry, store: RegistryStore, rack: str, labels: dict[str, str],
            now_ns: int) -> None:
    """What `mixer rack add` amounts to in the registry process: memory and file."""
    reg.add(rack, labels, now_ns)
    store.enroll(rack, f"U{rack.upper()}KEY", labels, now_ns)


def test_racks_and_their_changes_survive_close_and_reopen_into_a_fresh_registry(tmp_path):
    path = tmp_path / "registry.duckdb"
    reg = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path) as store:
        _enroll(reg, store, "rack-a", LABELS, T0)
        _enroll(reg, store, "rack-b", {"site": "lab"}, T0 + 1)
        _enroll(reg, store, "rack-never", {}, T0 + 2)
        store.save_changes(reg.observe(Report(
            rack="rack-a", labels=LABELS, version="0.3.1", rig_hash="f" * 64, processes=7,
            started_ns=T0 - 3 * S + 123), T0 + 10 * S + 456), reg.racks)
        store.save_changes(reg.observe(Report(rack="rack-b", version="0.3.0", processes=2),
                                       T0 + 11 * S), reg.racks)
        store.save_changes(reg.tick(T0 + 20 * S), reg.racks)  # rack-a stays online
        store.save_changes(reg.observe(Report(rack="rack-a"), T0 + 25 * S), reg.racks)
        changes = reg.tick(T0 + 40 * S)  # rack-a: 15 s silence, not more; rack-b offline
        assert [(c.rack, c.after) for c in changes] == [("rack-b", OFFLINE)]
        store.save_changes(changes, reg.racks)
        store.flush_seen(reg.racks.values())  # rack-a's last heartbeat at +25 s

    fresh = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path) as store:
        store.load(fresh)
        assert fresh.racks == reg.racks  # every field, ns exact, labels byte for byte
        assert [fresh.racks[r].state for r in ("rack-a", "rack-b", "rack-never")] == \
            [ONLINE, OFFLINE, NEVER_SEEN]
        assert list(fresh.racks["rack-a"].labels) == list(LABELS)  # key order kept too
        assert fresh.history == []  # history stays on disk
        stored = store.history(None, 100)
    enrolled = [StateChange(rack=r, ts_ns=T0 + n, before="", after=NEVER_SEEN,
                            reason="enrolled")
                for n, r in enumerate(("rack-a", "rack-b", "rack-never"))]
    assert stored == enrolled + reg.history


def test_a_state_change_saved_by_a_writer_killed_afterwards_is_on_disk(tmp_path):
    path = tmp_path / "registry.duckdb"
    holder = _holder(path)
    os.kill(holder.pid, signal.SIGKILL)  # no close, no checkpoint: only the WAL has it
    holder.wait()
    reg = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path, read_only=True) as store:
        store.load(reg)
        assert reg.racks["rack-held"].state == ONLINE
        assert [c.after for c in store.history("rack-held", 10)] == [NEVER_SEEN, ONLINE]


def test_a_read_only_open_sees_what_the_writer_committed_and_cannot_write(tmp_path):
    path = tmp_path / "registry.duckdb"
    reg = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path) as store:
        _enroll(reg, store, "rack-a", {"site": "lab"}, T0)
        store.save_changes(reg.observe(Report(rack="rack-a", version="1.0"), T0 + S),
                           reg.racks)
    seen = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path, read_only=True) as ro:
        ro.load(seen)
        assert seen.racks == reg.racks
        assert [r.id for r in seen.select({"site": "lab"})] == ["rack-a"]
        with pytest.raises(RegistryStoreError, match=f"^registry store {path}: .*read-only"):
            ro.revoke("rack-a", T0 + 2 * S)
        assert [c.after for c in ro.history("rack-a", 10)] == [NEVER_SEEN, ONLINE]


def test_history_is_oldest_first_filtered_by_rack_and_limited_to_the_newest(tmp_path):
    changes = [StateChange(rack=r, ts_ns=T0 + ts * S, before=NEVER_SEEN if n < 2 else ONLINE,
                           after=ONLINE if n < 2 else OFFLINE, reason=f"step {n}")
               for n, (r, ts) in enumerate([("a", 1), ("b", 1), ("a", 5), ("b", 5)])]
    with RegistryStore.open(tmp_path / "registry.duckdb") as store:
        store.save_changes(changes[:2], {})  # racks unknown to memory: events only
        store.save_changes(changes[2:], {})
        assert store.history(None, 100) == changes  # equal ts: in the order saved
        assert store.history(None, 3) == changes[1:]
        assert store.history("a", 100) == [changes[0], changes[2]]
        assert store.history("a", 1) == [changes[2]]
        assert store.history("nobody", 10) == []


def test_revoke_keeps_the_history_marks_the_row_and_is_not_undone_by_a_late_flush(tmp_path):
    path = tmp_path / "registry.duckdb"
    reg = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path) as store:
        _enroll(reg, store, "rack-a", {"site": "lab"}, T0)
        store.save_changes(reg.observe(Report(rack="rack-a"), T0 + S), reg.racks)
        late = reg.racks["rack-a"]
        revoked = store.revoke("rack-a", T0 + 2 * S)
        assert revoked == StateChange(rack="rack-a", ts_ns=T0 + 2 * S, before=ONLINE,
                                      after="revoked", reason="revoked")
        assert store.revoke("rack-a", T0 + 3 * S) is None  # already revoked
        assert store.revoke("rack-unknown", T0 + 3 * S) is None
        store.flush_seen([late])  # a heartbeat that raced the revocation
        assert [c.after for c in store.history("rack-a", 10)] == \
            [NEVER_SEEN, ONLINE, "revoked"]
    with RegistryStore.open(path, read_only=True) as ro:
        after = Registry(offline_after_ns=15 * S)
        ro.load(after)
        assert after.racks == {}
    with RegistryStore.open(path) as store:
        store.enroll("rack-a", "UNEWKEY", {"site": "lab2"}, T0 + 9 * S)  # enrolled again
        again = Registry(offline_after_ns=15 * S)
        store.load(again)
        info = again.racks["rack-a"]
        assert (info.state, info.changed_ns, info.labels) == \
            (NEVER_SEEN, T0 + 9 * S, {"site": "lab2"})
        assert store.history("rack-a", 1)[0].before == "revoked"


def test_1000_racks_first_heard_then_flushed_are_each_one_fast_transaction(tmp_path):
    path = tmp_path / "registry.duckdb"
    reg = Registry(offline_after_ns=15 * S)
    changes: list[StateChange] = []
    for n in range(1000):
        changes += reg.observe(Report(rack=f"rack-{n:04d}", labels={"site": f"s{n % 7}"},
                                      version="0.3.1", rig_hash=f"{n:064x}", processes=5,
                                      started_ns=T0), T0 + S)
    with RegistryStore.open(path) as store:
        started = time.perf_counter()
        store.save_changes(changes, reg.racks)  # 1,000 inserts and 1,000 events
        saved = time.perf_counter() - started
        for n, rack in enumerate(sorted(reg.racks)):  # a round of heartbeats, in memory
            reg.observe(Report(rack=rack, processes=6), T0 + 10 * S + n)
        started = time.perf_counter()
        store.flush_seen(reg.racks.values())
        flushed = time.perf_counter() - started
        assert len(store.history(None, 5000)) == 1000
    print(f"1000 racks: save_changes {saved * 1000:.1f} ms, flush_seen {flushed * 1000:.1f} ms")
    assert saved < 1.0 and flushed < 1.0
    fresh = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path, read_only=True) as ro:
        ro.load(fresh)
    assert fresh.racks == reg.racks
    assert fresh.racks["rack-0999"].last_seen_ns == T0 + 10 * S + 999


def test_racks_table_and_json_for_never_seen_online_and_offline_racks():
    now = T0 + 3 * 3600 * S
    infos = [
        RackInfo(id="rack-new", labels={}, changed_ns=now - 59 * S),
        RackInfo(id="rack-on", state=ONLINE, labels={"site": "Zürich", "expr": "a=b"},
                 version="0.3.1", rig_hash="0123456789abcdef", processes=12,
                 started_ns=T0, first_seen_ns=T0 + 5 * S, last_seen_ns=now - 4 * S,
                 changed_ns=now - 192 * S),
        RackInfo(id="rack-off", state=OFFLINE, labels={"site": "lab"}, version="0.2.0",
                 rig_hash="abc", processes=3, started_ns=T0, first_seen_ns=T0 + S,
                 last_seen_ns=T0 + 3 * S, changed_ns=T0 + 3 * S + 15 * S),
    ]
    assert racks_table(infos, now) == (
        "RACK      STATE       SINCE  LABELS                VERSION  RIG           PROCS"
        "  LAST SEEN\n"
        "rack-new  never-seen  59s    -                     -        -             -"
        "      never\n"
        "rack-on   online      3m12s  expr=a=b,site=Zürich  0.3.1    0123456789ab  12"
        "     4s ago\n"
        "rack-off  offline     2h59m  site=lab              0.2.0    abc           3"
        "      2h59m ago\n")
    docs = orjson.loads(racks_json(infos))
    assert [d["id"] for d in docs] == ["rack-new", "rack-on", "rack-off"]
    assert docs[0] == {"id": "rack-new", "state": NEVER_SEEN, "labels": {}, "version": "",
                       "rig_hash": "", "processes": 0, "started_at": None, "started_ns": 0,
                       "first_seen_at": None, "first_seen_ns": 0, "last_seen_at": None,
                       "last_seen_ns": 0, "changed_at": "2024-05-01T14:59:01.000Z",
                       "changed_ns": now - 59 * S}
    assert docs[1]["labels"] == {"site": "Zürich", "expr": "a=b"}
    assert (docs[1]["last_seen_at"], docs[1]["last_seen_ns"]) == \
        ("2024-05-01T14:59:56.000Z", now - 4 * S)
    assert (docs[1]["rig_hash"], docs[1]["processes"]) == ("0123456789abcdef", 12)
    assert (docs[2]["state"], docs[2]["started_at"], docs[2]["changed_at"]) == \
        (OFFLINE, "2024-05-01T12:00:00.000Z", "2024-05-01T12:00:18.000Z")
    assert racks_table([], now) == \
        "RACK  STATE  SINCE  LABELS  VERSION  RIG  PROCS  LAST SEEN\n"


def test_a_file_that_is_not_a_duckdb_database_is_refused_naming_it(tmp_path):
    path = tmp_path / "registry.duckdb"
    path.write_bytes(b"not a database\n" * 1000)
    for read_only in (False, True):
        with pytest.raises(RegistryStoreError) as err:
            RegistryStore.open(path, read_only=read_only)
        assert str(err.value) == f"registry store {path}: not a DuckDB database file"
    missing = tmp_path / "missing.duckdb"
    with pytest.raises(RegistryStoreError) as err:
        RegistryStore.open(missing, read_only=True)
    assert str(err.value) == f"registry store {missing}: does not exist"


def test_a_duckdb_file_without_registry_tables_is_refused_read_only(tmp_path):
    import duckdb

    path = tmp_path / "other.duckdb"
    duckdb.connect(str(path)).close()
    with pytest.raises(RegistryStoreError) as err:
        RegistryStore.open(path, read_only=True)
    assert str(err.value) == f"registry store {path}: no registry tables in it"


_HOLD = """
import sys
from mixer.registry import Registry, Report
from mixer.registrydb import RegistryStore
store = RegistryStore.open(__import__("pathlib").Path(sys.argv[1]))
reg = Registry(offline_after_ns=10**10)
reg.add("rack-held", {}, 1)
store.enroll("rack-held", "UKEY", {}, 1)
store.save_changes(reg.observe(Report(rack="rack-held"), 2), reg.racks)
print("ready", flush=True)
sys.stdin.read()
store.close()
"""


def _holder(path: Path) -> subprocess.Popen[str]:
    """A second real process holding ``path`` open for writing until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_file_locked_by_a_writer_in_another_process_is_refused_naming_it(tmp_path):
    path = tmp_path / "registry.duckdb"
    holder = _holder(path)
    try:
        for read_only in (False, True):  # the CLI's read-only open fails too
            with pytest.raises(RegistryStoreError) as err:
                RegistryStore.open(path, read_only=read_only)
            assert str(err.value) == \
                f"registry store {path}: locked by another process (pid {holder.pid})"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with RegistryStore.open(path, read_only=True) as ro:  # released on the holder's exit
        assert [c.after for c in ro.history("rack-held", 10)] == [NEVER_SEEN, ONLINE]


def test_enroll_stores_the_nkey_and_times_and_a_live_rack_keeps_its_state(tmp_path):
    import duckdb

    path = tmp_path / "registry.duckdb"
    reg = Registry(offline_after_ns=15 * S)
    with RegistryStore.open(path) as store:
        _enroll(reg, store, "rack-a", {"site": "lab"}, T0)
        store.save_changes(reg.observe(Report(rack="rack-a"), T0 + S), reg.racks)
        store.enroll("rack-a", "UROTATED", {"site": "lab", "row": "3"}, T0 + 5 * S)
        assert len(store.history("rack-a", 10)) == 2  # no event: the state did not change
        live = Registry(offline_after_ns=15 * S)
        store.load(live)
        assert (live.racks["rack-a"].state, live.racks["rack-a"].changed_ns) == \
            (ONLINE, T0 + S)
        store.revoke("rack-a", T0 + 7 * S)
        store.flush_seen([replace(reg.racks["rack-a"], last_seen_ns=T0 + 8 * S)])  # too late
    db = duckdb.connect(str(path), read_only=True)
    try:
        row = db.execute("SELECT nkey, labels, epoch_ns(enrolled_at), epoch_ns(revoked_at),"
                         " state, epoch_ns(state_since), epoch_ns(last_seen) FROM racks"
                         ).fetchall()
    finally:
        db.close()
    assert row == [("UROTATED", '{"site":"lab","row":"3"}', T0 + 5 * S, T0 + 7 * S,
                    "revoked", T0 + 7 * S, T0 + S)]
