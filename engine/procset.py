"""A supervised set of forked processes: the machinery a rack and the Mixer share.

Theory of operation
-------------------
``ProcessSet`` owns what does not depend on what the processes do:

* the data dir's lock (``flock`` on ``<data_dir>/<lock>``, held for the supervisor's life and
  released by the kernel even on SIGKILL; ``running_pid`` reads it);
* forking a ``Child``: in the child, the set's descriptors are closed, SIGTERM is restored,
  ``PR_SET_PDEATHSIG`` makes the kernel stop it with its supervisor, the process gets its
  name and title, runs ``Child.run`` and leaves its last error in ``crash/<name>.last``;
* the supervision loop's parts: ``reap`` (exit statuses), restart with back-off (0.1 s
  doubling to 5 s, reset after 10 s of good health), crash loops (``DEGRADED_AFTER`` deaths
  in ``CRASH_WINDOW`` degrade the set, ``GIVE_UP_AFTER`` make it give up and stop), a sleep
  on a signal wake-up fd, readiness (children write their name into a pipe; once all have,
  the set is ready: ``--ready-fd`` and the service manager are told);
* an ordered stop by role (SIGTERM, then SIGKILL after a timeout).

What the processes are (a rack's plan, the Mixer's roles) and what is written into
``state.json`` is the owner's (``engine.supervisor``, ``mixer.supervisor``); the owner passes
``on_change`` to hear of restarts and state changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from engine.logsetup import set_process_name
from engine.natsd import set_parent_death_signal
from engine.service import Notifier, set_process_title

log = logging.getLogger("fluxrig.supervisor")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 10.0
CRASH_WINDOW = 60.0  # seconds over which a process's deaths are counted
DEGRADED_AFTER = 3  # deaths in the window: "degraded" (status says why)
GIVE_UP_AFTER = 5  # deaths in the window: the set stops, exit code 1, with the last error
CRASH_DIR = "crash"  # <data_dir>/crash/<process>.last: the last error of each process

P = TypeVar("P")


class AlreadyRunning(RuntimeError):
    """Another supervisor holds the data dir's lock."""


@dataclass(slots=True)
class Child(Generic[P]):
    """One supervised process: ``run`` is its body (in the forked child); ``spec`` is the
    owner's description of it (a rack's ``ProcessSpec``)."""

    name: str
    role: str
    run: Callable[[], None]
    title: str
    spec: P
    cpu: int | None = None
    pid: int | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    stopped: bool = False  # deliberately stopped (drain): do not restart
    deaths: list[float] = field(default_factory=list)  # unexpected exits in CRASH_WINDOW
    last_error: str = ""


def running_pid(data_dir: str | os.PathLike[str], lock: str) -> int | None:
    """Pid of the supervisor holding ``data_dir``'s ``lock`` file, or None.

    A state file alone is not proof: a killed supervisor leaves it behind, and its pid may
    since belong to another process. The lock is released by the kernel when the holder dies.
    """
    path = Path(data_dir) / lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def stop_holder(data_dir: str | os.PathLike[str], lock: str, timeout: float) -> int | None:
    """SIGTERM the supervisor holding ``data_dir``'s ``lock`` and wait until it let go (the
    lock goes with the process, zombie or not); its pid, None if nobody held it.

    Raises:
        TimeoutError: still running after ``timeout`` seconds (the message has the pid).
    """
    pid = running_pid(data_dir, lock)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(data_dir, lock) != pid:
            return pid
        time.sleep(0.1)  # another process's exit has no event we can wait on here
    raise TimeoutError(f"still running after {timeout}s: pid={pid}")


class ProcessSet(Generic[P]):
    """The supervised processes of one rack or one Mixer.

    Args:
        data_dir: where the lock, ``crash/`` and the owner's state live.
        lock: the lock file's name (``rack.lock``, ``mixer.lock``).
        what: how messages name the owner (``rack=r1``, ``mixer``).
        ready_fd: written "ready" once every child announced it, then closed; -1: none.
        notifier: the service manager (``engine.service``).
        on_change: called after a restart or a state change (the owner rewrites its state).
        on_ready: called once, when every child announced it serves.
    """

    def __init__(self, data_dir: Path, lock: str, what: str, ready_fd: int = -1,
                 notifier: Notifier | None = None, on_change: Callable[[], None] = lambda: None,
                 on_ready: Callable[[], None] = lambda: None):
        self.data_dir = data_dir
        self.lock_name = lock
        self.what = what
        self.ready_fd = ready_fd
        self.notifier = notifier or Notifier()
        self.on_change = on_change
        self.on_ready = on_ready
        self.reload_requested = False  # SIGHUP: the owner decides what a reload is
        self.children: list[Child[P]] = []
        self.ready = False
        self.ready_names: set[str] = set()
        self.degraded = ""  # why the set is degraded (a process crash-looping), or ""
        self.failed = ""  # why the set gave up (stops with exit code 1), or ""
        self.stop_requested = False
        self._lock_fd: int | None = None
        self._wake_r = self._wake_w = -1
        self.ready_r = self.ready_w = -1  # children announce readiness on ready_w

    # --- lock and signals -------------------------------------------------------------------

    def lock(self) -> None:
        """Take the data dir's lock.

        Raises:
            AlreadyRunning: another supervisor holds it (the message names its pid).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / self.lock_name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            kind, _, _ = self.what.partition("=")
            raise AlreadyRunning(f"{kind} already running: {self.what}, pid={holder}, "
                                 f"data_dir={self.data_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def clear_crash_files(self) -> None:
        """A past run's last errors are not this run's."""
        (self.data_dir / CRASH_DIR).mkdir(exist_ok=True)
        for old in (self.data_dir / CRASH_DIR).glob("*.last"):
            old.unlink(missing_ok=True)

    def install_signals(self) -> None:
        """Wake-up and readiness pipes; SIGTERM/SIGINT request a stop, SIGCHLD wakes."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ready_r, self.ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _on_reload_signal(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def request_stop(self) -> None:
        """Ask the owner's loop to stop (from a signal handler or another thread)."""
        self.stop_requested = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    # --- fork and reap ----------------------------------------------------------------------

    def fork(self, child: Child[P]) -> None:
        """Start ``child`` (again)."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                for fd in (self._wake_r, self._wake_w, self.ready_r, self.ready_fd,
                           self._lock_fd):
                    if fd is not None and fd >= 0:
                        os.close(fd)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                set_parent_death_signal(signal.SIGTERM)
                set_process_name(child.name)
                set_process_title(child.title)
                if os.getppid() == 1:  # the supervisor died before prctl took effect
                    os._exit(1)
                child.run()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                log.exception("process crashed: process=%s", child.name)
                code = 1
                self._record_error(child.name, f"{type(exc).__name__}: {exc}")
            finally:
                os._exit(code)
        child.pid = pid
        child.started = time.monotonic()
        child.restart_at = None
        log.info("process started: process=%s, pid=%d, cpu=%s", child.name, pid, child.cpu)

    def _record_error(self, name: str, text: str) -> None:
        """(In a dying child) leave the last error where the supervisor reads it."""
        try:
            path = self.data_dir / CRASH_DIR / f"{name}.last"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text[:2000])
        except OSError:
            pass

    def _last_error(self, name: str) -> str:
        try:
            return (self.data_dir / CRASH_DIR / f"{name}.last").read_text()[:2000]
        except OSError:
            return ""

    def reap(self, other: Callable[[int, int], bool] = lambda pid, status: False) -> None:
        """Collect exit statuses; an unexpected exit schedules a restart. ``other`` is
        offered pids that are not children (a nats-server the owner started)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if other(pid, status):
                continue
            for child in self.children:
                if child.pid == pid:
                    child.pid = None
                    code = os.waitstatus_to_exitcode(status)
                    if child.stopped:
                        log.info("process stopped: process=%s, code=%s", child.name, code)
                    else:
                        self._died(child, code)
                    break

    def _died(self, child: Child[P], code: int) -> None:
        """An unexpected exit: restart with back-off; count it; degrade or give up."""
        now = time.monotonic()
        if now - child.started > HEALTHY_AFTER:
            child.backoff = BACKOFF_MIN
        child.restart_at = now + child.backoff
        child.deaths = [t for t in child.deaths if now - t < CRASH_WINDOW] + [now]
        child.last_error = self._last_error(child.name) or f"exit code {code}"
        log.error("process died, restarting: process=%s, code=%s, in=%.1fs, error=%s",
                  child.name, code, child.backoff, child.last_error.splitlines()[-1])
        child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        n = len(child.deaths)
        kind = self.what.partition("=")[0]
        reason = (f"process {child.name} died {n} times in {CRASH_WINDOW:.0f} s; last "
                  f"error: {child.last_error.splitlines()[-1]}")
        if n >= GIVE_UP_AFTER:
            self.failed = reason
            child.restart_at = None
            log.error("%s giving up: %s", kind, reason)
            self.notifier.send(f"STATUS=giving up: {reason}")
            self.stop_requested = True
        elif n >= DEGRADED_AFTER and not self.degraded:
            self.degraded = reason
            log.error("%s degraded: %s", kind, reason)
            self.notifier.send(f"STATUS=degraded: {reason}")
        self.on_change()

    def restart_due(self) -> float:
        """Restart children whose back-off elapsed, lift a degraded state whose crash loop
        ended; return seconds to the next restart (at most 1)."""
        now = time.monotonic()
        next_in = 1.0
        changed = False
        for child in self.children:
            if child.pid is None and not child.stopped and child.restart_at is not None:
                if child.restart_at <= now:
                    child.restarts += 1
                    self.fork(child)
                    changed = True
                else:
                    next_in = min(next_in, child.restart_at - now)
        if self.degraded and all(len([t for t in c.deaths if now - t < CRASH_WINDOW])
                                 < DEGRADED_AFTER for c in self.children):
            log.info("%s no longer degraded: %s", self.what.partition("=")[0], self.degraded)
            self.degraded = ""
            self.notifier.send("STATUS=serving")
            changed = True
        if changed:
            self.on_change()
        return next_in

    # --- the loop's sleep and readiness -----------------------------------------------------

    def sleep(self, timeout: float) -> None:
        """Sleep until a signal, a child's readiness or ``timeout``."""
        fds = [self._wake_r] + ([self.ready_r] if self.ready_r >= 0 else [])
        r, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if self._wake_r in r:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        if self.ready_r in r:
            self._read_ready()

    def _read_ready(self) -> None:
        data = b""
        try:
            while chunk := os.read(self.ready_r, 4096):
                data += chunk
        except BlockingIOError:
            pass
        self.ready_names.update(line for line in data.decode(errors="replace").splitlines())
        if not self.ready and {c.name for c in self.children} <= self.ready_names:
            self.ready = True
            self.on_ready()
            self.on_change()
            log.info("%s ready: %s, processes=%d", self.what.partition("=")[0], self.what,
                     len(self.children))
            self._announce_ready()

    def _announce_ready(self) -> None:
        """Tell whoever waits: the ``--ready-fd`` pipe ("ready", then closed) and the service
        manager (``engine.service.Notifier``)."""
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, b"ready\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = -1
        self.notifier.send("READY=1", f"STATUS={self.degraded and 'degraded: '}"
                           f"{self.degraded or 'serving'}", f"MAINPID={os.getpid()}")

    def ping(self) -> float | None:
        """Feed the service manager's watchdog (not once the set gave up); seconds to the
        next ping, or None."""
        return None if self.failed else self.notifier.ping()

    # --- stop -------------------------------------------------------------------------------

    def stop_children(self, roles: Iterable[str], timeout: float) -> None:
        """SIGTERM the children of ``roles``, wait up to ``timeout``, SIGKILL the rest."""
        wanted = set(roles)
        targets = [c for c in self.children if c.role in wanted]
        for c in targets:
            c.stopped = True
            if c.pid is not None:
                try:
                    os.kill(c.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        while any(c.pid is not None for c in targets) and time.monotonic() < deadline:
            self.reap()
            self.sleep(0.05)
        for c in targets:
            if c.pid is not None:
                log.error("process did not stop, killing: process=%s", c.name)
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while any(c.pid is not None for c in targets):
            self.reap()
            self.sleep(0.05)

    def close(self) -> None:
        """Close the pipes and release the lock (idempotent)."""
        signal.set_wakeup_fd(-1)
        for fd in (self.ready_r, self.ready_w, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.ready_r = self.ready_w = self._wake_r = self._wake_w = -1
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
