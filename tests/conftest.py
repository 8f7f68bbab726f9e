"""Shared fixtures: unique shared-memory names that are removed after each test."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator

import pytest

from engine.shm import unlink

# The rack forks its workers (rings and eventfds are inherited); tests do the same.
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def shm_name() -> Iterator[callable]:
    """Factory of unique segment names; every name handed out is unlinked afterwards."""
    names: list[str] = []

    def make(tag: str = "t") -> str:
        name = f"fx-test-{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield make
    for name in names:
        unlink(name)


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server with JetStream on 127.0.0.1 and a free port, stopped afterwards."""
    from engine.natsd import NatsServer

    server = NatsServer(rack_id="testhub", data_dir=tmp_path / "nats", host="127.0.0.1", port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def peers():
    """Independent peers (acquirers, issuers, proxies) on a thread of their own."""
    from peers import PeerThread

    p = PeerThread()
    yield p
    p.stop()
