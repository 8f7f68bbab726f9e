"""The in-flight journal: slots that survive the process writing them."""

from __future__ import annotations

import os

import pytest
from conftest import FORK

from engine.journal import (
    DECIDED,
    OPEN,
    Journal,
    JournalError,
    JournalFull,
    PayloadTooLarge,
)
from engine.shm import KIND_JOURNAL, Segment


def test_open_decide_close_and_take_over(shm_name):
    j = Journal.create(shm_name("j"), slots=4, slot_size=64)
    assert j.take_over() == []
    a = j.open(b"alpha")
    b = j.open(b"bravo")
    j.decide(b, reverse=True)
    c = j.open(b"charlie")
    j.decide(c, reverse=False)
    j.close(a)
    assert j.in_use == 2
    successor = Journal.attach(j.segment.name)
    entries = successor.take_over()
    assert [(e.slot, e.state, e.reverse, e.payload) for e in entries] == [
        (b, DECIDED, True, b"bravo"), (c, DECIDED, False, b"charlie")]
    for e in entries:
        successor.close(e.slot)
    assert Journal.attach(j.segment.name).take_over() == []


def test_a_killed_writer_leaves_every_opened_slot_whole(shm_name):
    j = Journal.create(shm_name("j"), slots=64, slot_size=128)
    j.take_over()

    def child():
        j.take_over()
        for i in range(40):
            slot = j.open(f"request-{i}".encode() * 3)
            if i % 2:
                j.close(slot)
        os.kill(os.getpid(), 9)  # no cleanup of any kind

    p = FORK.Process(target=child)
    p.start()
    p.join()
    assert p.exitcode == -9
    left = Journal.attach(j.segment.name).take_over()
    assert [e.payload for e in left] == [f"request-{i}".encode() * 3 for i in range(0, 40, 2)]
    assert {e.state for e in left} == {OPEN}


def test_close_wipes_the_payload_unless_told_not_to(shm_name):
    j = Journal.create(shm_name("j"), slots=2, slot_size=64)
    j.take_over()
    slot = j.open(b"sealed-secret")
    j.close(slot)
    assert b"sealed-secret" not in bytes(j.segment.payload)
    j.wipe = False
    slot = j.open(b"not-secret")
    j.close(slot)
    assert b"not-secret" in bytes(j.segment.payload)  # left for the next writer to overwrite


def test_full_and_oversize_are_refused_without_writing(shm_name):
    j = Journal.create(shm_name("j"), slots=2, slot_size=64)
    j.take_over()
    with pytest.raises(PayloadTooLarge) as exc:
        j.open(b"x" * 57)
    assert str(exc.value) == "journal payload too large: size=57, max=56"
    j.open(b"x" * 56)
    j.open(b"y")
    with pytest.raises(JournalFull) as exc:
        j.open(b"z")
    assert str(exc.value) == "journal full: slots=2"
    assert j.in_use == 2


def test_use_before_take_over_and_corrupt_segments_are_refused(shm_name):
    j = Journal.create(shm_name("j"), slots=2, slot_size=64)
    with pytest.raises(JournalError) as exc:
        j.open(b"x")
    assert str(exc.value) == "journal used before take_over()"
    name = shm_name("bad")
    seg = Segment.create(name, KIND_JOURNAL, 256)
    seg.close()
    with pytest.raises(JournalError) as exc:
        Journal.attach(name)
    assert str(exc.value) == f"corrupt journal control block: name={name}, slot_size=0, slots=0"


def test_a_garbage_header_is_returned_for_settling_not_reused(shm_name):
    j = Journal.create(shm_name("j"), slots=3, slot_size=64)
    q = j.segment.payload.cast("q")
    q[(128 + 64) // 8] = 0x7F  # slot 1: a state we never write
    q.release()
    entries = j.take_over()
    assert [(e.slot, e.payload) for e in entries] == [(1, b"")]
    assert {j.open(b"a"), j.open(b"b")} == {0, 2}


@pytest.mark.parametrize(("slots", "slot_size", "message"), [
    (0, 64, "invalid journal slots: slots=0, rule=1..1048576"),
    (4, 40, "invalid journal slot size: slot_size=40, rule=multiple of 16 >= 64"),
    (4, 100, "invalid journal slot size: slot_size=100, rule=multiple of 16 >= 64"),
])
def test_create_checks_its_arguments(shm_name, slots, slot_size, message):
    with pytest.raises(ValueError) as exc:
        Journal.create(shm_name("j"), slots, slot_size)
    assert str(exc.value) == message
