"""Segments found at start: inspected without mapping, adopted, removed or kept.

``/dev/shm`` is world-writable and a killed rack leaves work in it; these tests plant real
files there and leave real segments behind with real forked owners that are gone.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.journal import Journal
from engine.leftovers import LeftoverError, Leftovers
from engine.ring import Ring
from engine.ring import segment_size as ring_segment_size
from engine.shm import (
    KIND_RING,
    SHM_DIR,
    ForeignSegmentError,
    inspect,
    segment_names,
    unlink,
)

RACK = f"t-left{os.getpid()}"
PREFIX = f"fx-{RACK}-"


@pytest.fixture(autouse=True)
def _clean():
    yield
    for name in segment_names(PREFIX):
        unlink(name)


def _plant(name: str, data: bytes, mode: int = 0o600) -> Path:
    path = Path(SHM_DIR) / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have narrowed it
    return path


def _left_by_a_dead_process(make) -> None:
    """Run ``make`` in a forked child that exits: its segments stay, their owner is gone."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            make()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _ring_with_work(name: str, capacity: int, records: int) -> None:
    def make() -> None:
        ring = Ring.create(name, capacity)
        ring.producer().write([b"x" * 40] * records)
        ring.close()
    _left_by_a_dead_process(make)


@pytest.mark.parametrize("data, mode, message", [
    (b"", 0o644, "segment open to other users"),
    (b"\x00" * 8, 0o600, "segment too small"),
    (b"NOTOURS!" + b"\x00" * 200, 0o600, "not a fluxrig segment"),
], ids=["world-readable", "short", "garbage"])
def test_a_planted_file_is_reported_by_name_never_mapped(data, mode, message):
    name = PREFIX + "ring-0"
    _plant(name, data, mode)
    with pytest.raises(ForeignSegmentError, match=message) as info:
        inspect(name)
    assert name in str(info.value)


def test_a_symlink_or_fifo_under_our_name_is_foreign_and_does_not_hang(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\x00" * 4096)
    link = Path(SHM_DIR) / (PREFIX + "ring-1")
    link.symlink_to(target)
    with pytest.raises(ForeignSegmentError, match="cannot be opened as a file"):
        inspect(link.name)
    fifo = Path(SHM_DIR) / (PREFIX + "ring-2")
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ForeignSegmentError, match="not a regular file"):
        inspect(fifo.name)  # opened O_NONBLOCK: returns at once instead of waiting for a writer


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root (CI is)")
def test_a_segment_of_another_user_is_foreign():
    path = _plant(PREFIX + "ring-3", b"", 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(ForeignSegmentError, match="segment not ours"):
        inspect(path.name)


def test_an_empty_segment_of_ours_is_removed_at_scan(tmp_path):
    # a creator killed between shm_open and ftruncate leaves a 0-byte file: once it blocked
    # every later start with "cannot mmap an empty file"
    name = PREFIX + "ring-0"
    _plant(name, b"", 0o600)
    assert inspect(name) is None
    left = Leftovers(RACK, tmp_path)
    left.scan()
    assert not (Path(SHM_DIR) / name).exists()
    assert left.take(name, KIND_RING, ring_segment_size(1 << 16)) is None


def test_scan_refuses_a_foreign_segment_and_leaves_it_alone(tmp_path):
    path = _plant(PREFIX + "journal-0", b"\x00" * 64, 0o644)
    with pytest.raises(LeftoverError, match=f"rm {SHM_DIR}/{path.name}"):
        Leftovers(RACK, tmp_path).scan()
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_ring_of_the_same_size_is_adopted_with_its_records(tmp_path):
    name = PREFIX + "ring-0"
    _ring_with_work(name, 1 << 16, 5)
    left = Leftovers(RACK, tmp_path)
    left.scan()
    segment = left.take(name, KIND_RING, ring_segment_size(1 << 16))
    assert segment is not None and segment.is_owner
    ring = Ring(segment)
    assert len(ring.consumer().poll()) == 5
    ring.close()


def test_a_ring_holding_work_that_the_new_plan_sizes_differently_stops_the_start(tmp_path):
    name = PREFIX + "ring-0"
    _ring_with_work(name, 1 << 16, 3)
    left = Leftovers(RACK, tmp_path)
    left.scan()
    with pytest.raises(LeftoverError, match=f"{name} holds work of the previous run"):
        left.take(name, KIND_RING, ring_segment_size(1 << 17))
    assert Ring.attach(name).statistics().used > 0  # the work is still there


def test_an_empty_ring_of_another_size_is_replaced(tmp_path):
    name = PREFIX + "ring-0"
    _ring_with_work(name, 1 << 16, 0)
    left = Leftovers(RACK, tmp_path)
    left.scan()
    assert left.take(name, KIND_RING, ring_segment_size(1 << 17)) is None
    assert not (Path(SHM_DIR) / name).exists()


def test_settle_keeps_what_holds_work_and_removes_what_is_empty(tmp_path, caplog):
    full, empty = PREFIX + "ring-7", PREFIX + "journal-7"
    _ring_with_work(full, 1 << 16, 2)

    def make_journal() -> None:
        Journal.create(empty, 8, 256).close_mapping()
    _left_by_a_dead_process(make_journal)
    left = Leftovers(RACK, tmp_path)
    left.scan()
    left.settle()  # the new plan took neither
    assert (Path(SHM_DIR) / full).exists()
    assert not (Path(SHM_DIR) / empty).exists()
    assert f"{full} (" in caplog.text and "bytes)" in caplog.text


def test_a_segment_whose_owner_lives_means_the_rack_runs_already(tmp_path):
    name = PREFIX + "ring-0"
    owner = subprocess.Popen(  # another live process owns it
        [sys.executable, "-c", "import sys; from engine.ring import Ring; "
         f"r = Ring.create({name!r}, 1 << 16); print('made', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "made"
        with pytest.raises(LeftoverError, match=f"belongs to live pid {owner.pid}"):
            Leftovers(RACK, tmp_path).scan()
    finally:
        owner.stdin.close()
        owner.wait(10)
        unlink(name)


def test_a_segment_its_owner_released_is_adopted_though_the_owner_lives(tmp_path):
    """A supervisor that drains and starts again in place (execv, to run a deployed config)
    keeps its pid: the rings it kept are released at the drain, so the restarted supervisor
    adopts them. Before: it refused to start ("belongs to live pid <its own>")."""
    name = PREFIX + "ring-0"
    ring = Ring.create(name, 1 << 16)
    try:
        with pytest.raises(LeftoverError, match="is running already"):
            Leftovers(RACK, tmp_path).scan()  # still ours: a live twin's, for all it knows
        ring.segment.release()
        left = Leftovers(RACK, tmp_path)
        left.scan()
        assert name in left.found
        assert left.take(name, KIND_RING, ring_segment_size(1 << 16)) is not None
    finally:
        ring.close()
        unlink(name)


def test_a_rack_whose_id_extends_ours_is_not_ours(tmp_path):
    """``fx-<rack>-`` names are ambiguous when ids contain '-': rack ``plant`` refused to
    start while ``plant-6786`` ran ("running already"), and would have stopped that rack's
    orphans or removed its segments. The header now says which rack made a segment."""
    other = f"{RACK}-6786"
    live = subprocess.Popen(  # the other rack, running: its ring stamped with its id
        [sys.executable, "-c", "import sys; from engine.ring import Ring; "
         f"r = Ring.create({PREFIX + '6786-p-src-0'!r}, 1 << 16); r.segment.stamp({other!r});"
         " print('made', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dead = PREFIX + "p-src-0"  # ours, left by a killed run
    _left_by_a_dead_process(lambda: Ring.create(dead, 1 << 16).segment.stamp(RACK))
    try:
        assert live.stdout.readline().strip() == "made"
        assert inspect(PREFIX + "6786-p-src-0").rack == other
        left = Leftovers(RACK, tmp_path)
        left.scan()  # no "running already": the live segment is the other rack's
        assert set(left.found) == {dead} and left.found[dead].rack == RACK
        assert live.poll() is None  # and its process was not stopped as a survivor of ours
    finally:
        live.stdin.close()
        live.wait(10)
