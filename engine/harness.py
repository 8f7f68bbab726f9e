"""Start a rack as a child process and wait until it is *ready* — every process serving,
every listener bound — without polling: the rack writes "ready" on a pipe it inherits
(``engine start --ready-fd``). One way, used by the demo, the tests and the benches.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO


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
                 "--ready-fd", str(write), *args],
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
