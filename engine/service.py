"""What a service manager sees of a rack: systemd's notify protocol and process titles.

Notify protocol (``sd_notify(3)``): a datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). No library is
needed. The supervisor sends ``READY=1`` once every process serves, ``STATUS=...`` when the
rack's state changes (degraded, recovered), ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` while its loop turns and the rack has not given up, and ``STOPPING=1`` with
``EXTEND_TIMEOUT_USEC`` when it starts to drain, so a drain longer than the unit's stop
timeout is not cut by SIGKILL while it still makes progress.

Process titles: every rack process shows as ``fluxrig <rack> <role> [replica]`` in ``ps`` and
``top`` (``setproctitle`` rewrites the argv area; without it, only the 15-character kernel
name is set through ``prctl(PR_SET_NAME)``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time

log = logging.getLogger("fluxrig.service")

_PR_SET_NAME = 15  # linux/prctl.h


class NotifyError(RuntimeError):
    """``--notify`` was asked for but the service manager gave no socket."""


class Notifier:
    """The rack's side of systemd's notify protocol (a no-op without ``$NOTIFY_SOCKET``).

    Args:
        environ: the environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` from (``os.environ`` by default).
        required: raise ``NotifyError`` when there is no socket (``engine start --notify``:
            a unit of ``Type=notify`` that would otherwise wait for ever).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, environ: dict[str, str] | None = None, *, required: bool = False,
                 clock=time.monotonic):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        if required and not path:
            raise NotifyError("--notify: NOTIFY_SOCKET is not set (run under systemd with "
                              "Type=notify, or drop --notify)")
        self._addr = ("\0" + path[1:]) if path.startswith("@") else path
        self._clock = clock
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: seconds between two ``WATCHDOG=1`` (half the manager's timeout), or None
        self.watchdog_interval: float | None = (
            max(int(usec) / 2e6, 0.01) if watchdog else None)  # a 1 µs timeout: no storm
        self._next_ping = 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return bool(self._addr)

    def send(self, *lines: str) -> None:
        """One datagram with ``lines`` (e.g. ``"READY=1"``, ``"STATUS=serving"``); a failure
        is logged once and otherwise ignored (the rack must not stop over it)."""
        if not self._addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify failed: socket=%s, error=%s", self._addr.lstrip("\0"),
                            exc)
                self._warned = True

    def ping(self) -> float | None:
        """Send ``WATCHDOG=1`` if it is due; seconds until the next one (None: no watchdog)."""
        if self.watchdog_interval is None:
            return None
        now = self._clock()
        if now >= self._next_ping:
            self.send("WATCHDOG=1")
            self._next_ping = now + self.watchdog_interval
        return max(0.0, self._next_ping - now)


def process_title(rack: str, role: str, replica: int | None = None) -> str:
    """``fluxrig <rack> <role> [replica]``: what ``ps`` shows for a rack process."""
    return f"fluxrig {rack} {role}" + ("" if replica is None else f" {replica}")


def set_process_title(title: str) -> None:
    """Show ``title`` in ``ps``/``top`` for this process (best effort)."""
    try:
        import setproctitle  # an optional dependency: wheels for common platforms only

        setproctitle.setproctitle(title)
        return
    except ImportError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
