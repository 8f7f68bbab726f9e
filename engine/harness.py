"""Start a rack as a child process and wait until it is *ready* — every process serving,
every listener bound — without polling: the rack writes "ready" on a pipe it inherits
(``engine start --ready-fd``); and read a stopped rack's JetStream store. One way, used by
the demo, the tests and the benches.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nats.js.api import AckPolicy, ConsumerConfig

from engine.bus import ADMIN, BusAuth, close_quietly, connect, load_auth, rack_users
from engine.natsd import NatsServer


class RackNotReady(RuntimeError):
    """The rack exited or did not become ready in time; the message says which."""


class RackRun:
    """``engine start`` running as a child; ``wait_ready`` blocks on its readiness pipe."""

    def __init__(self, config: Path, *, workers: int = 1, drain_timeout: float = 30.0,
                 args: Sequence[str] = (), stdout: IO[bytes] | int | None = subprocess.DEVNULL,
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None):
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "start", "--config", str(config),
                 "--workers", str(workers), "--drain-timeout", str(drain_timeout),
                 "--ready-fd", str(write), "--log-file", "-", *args],
                stdout=stdout, stderr=subprocess.STDOUT, pass_fds=(write,), cwd=cwd,
                env=env, preexec_fn=preexec_fn)
        finally:
            os.close(write)  # ours: the pipe reports EOF when the rack closes or dies
        self._ready = read

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the rack announces it is ready.

        Raises:
            RackNotReady: it exited (exit code given) or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        got = b""
        try:
            while b"ready" not in got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RackNotReady(f"rack not ready after {timeout:g} s")
                r, _, _ = select.select([self._ready], [], [], left)
                if r:
                    chunk = os.read(self._ready, 64)
                    if not chunk:
                        code = self.proc.wait(10)
                        raise RackNotReady(f"rack exited before it was ready: code={code}")
                    got += chunk
        finally:
            os.close(self._ready)
            self._ready = -1

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM (drain) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_rack(config: Path, *, workers: int = 1, timeout: float = 60.0,
               **kwargs: object) -> RackRun:
    """Start ``engine start`` for ``config`` and return once it is ready.

    Raises:
        RackNotReady: see ``RackRun.wait_ready`` (the rack is killed then).
    """
    run = RackRun(config, workers=workers, **kwargs)  # type: ignore[arg-type]
    try:
        run.wait_ready(timeout)
    except BaseException:
        run.kill()
        raise
    return run


@dataclass(frozen=True, slots=True)
class StoreContents:
    """What a stream of a stopped rack holds."""

    count: int
    last_seq: int
    messages: list[tuple[str, bytes]]  # (Nats-Msg-Id, data) in stream order, if asked for


def read_store(data_dir: Path, rack_id: str, stream: str, subject: str | None = None, *,
               messages: bool = True) -> StoreContents:
    """Serve a *stopped* rack's JetStream store on a free local port, to the rack's admin
    user only (the store holds its audit trail), and read ``stream`` (``subject``: a
    filter, default every subject of the rack); ``messages=False`` only counts.

    Raises:
        NatsServerError: the store cannot be served (a rack still runs on it?).
    """
    admin = rack_users(data_dir, {})[ADMIN]
    server = NatsServer(rack_id=rack_id, data_dir=data_dir, host="127.0.0.1", port=0,
                        users=(admin,))
    server.start()
    try:
        return asyncio.run(_read(server.url, load_auth(data_dir), stream,
                                 subject or f"fluxrig.{rack_id}.>", messages))
    finally:
        server.stop()


async def _read(url: str, auth: BusAuth | None, stream: str, subject: str,
                want: bool) -> StoreContents:
    nc = await connect(url, auth, "fluxrig-harness")
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[tuple[str, bytes]] = []
        if want and info.state.messages:
            # a reader, not a worker: no acks, so no max_ack_pending stall after 1,000
            sub = await js.pull_subscribe(subject, stream=stream,
                                          config=ConsumerConfig(ack_policy=AckPolicy.NONE))
            while len(out) < info.state.messages:
                out += [((m.headers or {}).get("Nats-Msg-Id", ""), m.data)
                        for m in await sub.fetch(1000, timeout=5)]
        return StoreContents(info.state.messages, info.state.last_seq, out)
    finally:
        await close_quietly(nc)
