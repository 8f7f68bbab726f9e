"""``mixer start``: the Mixer as a supervised process set, like a rack.

The machinery is the rack's (``engine.procset``: lock, fork, restart back-off, crash loops,
readiness, ordered stop); what differs is the plan:

* the hub's nats-server (``mixer.hubfiles.HubServer``): JetStream domain ``hub``, a TLS
  leaf listener racks link to with their nkeys, a system account; restarted on the same
  port and store if it dies;
* the ``registry`` process (``mixer.registryproc``): registry, fleet telemetry, the hub's
  sourced streams, answers to the CLI; the fleet's Prometheus socket is bound here, before
  the fork, so a busy port stops the start with a clear message;
* the ``archiver`` process (``mixer.archiver``, unless ``audit.enabled`` is false): the
  hub's copies of the racks' streams into the audit trail;
* the ``traces`` process (``mixer.traceproc``, unless ``traces.enabled`` is false): the
  racks' spans and log records into ``traces/`` and ``logs/`` (Parquet);
* the ``console`` process (``mixer.console``, with ``console.enabled``): the web console,
  its socket bound here before the fork like Prometheus'.

``state.json`` in the hub's data dir says what runs (``mixer status``); ``mixer.lock`` says
who runs it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from pathlib import Path

from engine.bus import masked_url
from engine.listeners import ListenerError, bind
from engine.natsd import NatsServerError
from engine.plan import STATE_FILE, Runtime
from engine.procset import AlreadyRunning, Child, ProcessSet
from engine.procset import running_pid as procset_running_pid
from engine.service import Notifier, process_title, set_process_title
from mixer.archiver import ArchiverPlan, run_archiver
from mixer.console import ConsolePlan, run_console
from mixer.hubconf import HubConfigError
from mixer.hubfiles import HubFileError, HubServer, local_users
from mixer.pki import HubPki
from mixer.registryproc import RegistryPlan, run_registry
from mixer.settings import MixerSettings
from mixer.traceproc import TracesPlan, run_traces

log = logging.getLogger("fluxrig.mixer")

LOCK = "mixer.lock"
MixerAlreadyRunning = AlreadyRunning


class MixerStartError(RuntimeError):
    """The Mixer cannot work here (the message says why; nothing is left running)."""


def running_pid(data_dir: str | os.PathLike[str]) -> int | None:
    """Pid of the Mixer supervisor holding ``data_dir``, or None."""
    return procset_running_pid(data_dir, LOCK)


class MixerSupervisor:
    """One Mixer on this machine."""

    def __init__(self, data_dir: Path, settings: MixerSettings, ready_fd: int = -1,
                 notifier: Notifier | None = None):
        self.data_dir = data_dir.resolve()
        self.settings = settings
        self.procs: ProcessSet[None] = ProcessSet(self.data_dir, LOCK, "mixer", ready_fd,
                                                  notifier, self._write_state)
        self.hub = HubServer(self.data_dir, settings)
        self.prometheus: socket.socket | None = None
        self.console: socket.socket | None = None

    def start(self) -> None:
        """Lock, check the files, start the hub's nats-server, fork the registry.

        Raises:
            AlreadyRunning: another Mixer holds the data dir.
            MixerStartError: the Mixer cannot work (missing ``mixer init``, busy port...).
        """
        self.procs.lock()
        set_process_title(process_title("mixer", "supervisor"))
        pki = HubPki.in_dir(self.data_dir)
        for path in (pki.hub_cert, pki.hub_key, pki.ca_cert):
            if not path.exists():
                raise MixerStartError(f"not a hub data dir (run `mixer init {self.data_dir}` "
                                      f"first): missing {path}")
        try:
            users = local_users(self.data_dir)
            if self.settings.prometheus_port is not None:
                self.prometheus = bind(self.settings.prometheus_host,
                                       self.settings.prometheus_port)
            if self.settings.console.enabled:
                self.console = bind(self.settings.console.host, self.settings.console.port)
            self.procs.clear_crash_files()
            self.hub.start()
        except (HubFileError, HubConfigError, ListenerError, NatsServerError, OSError) as exc:
            self.cleanup()
            raise MixerStartError(str(exc)) from None
        log.info("hub started: url=%s, leaf=%s:%d, pid=%s", self.hub.url,
                 self.settings.leaf_host, self.settings.leaf_port, self.hub.pid)
        self.procs.install_signals()
        rt = Runtime(rack_id="mixer", data_dir=str(self.data_dir), nats_url=self.hub.url,
                     batch=1, ready_fd=self.procs.ready_w)
        plan = RegistryPlan(data_dir=str(self.data_dir), hub_url=self.hub.url,
                            password=users["registry"],
                            offline_after=self.settings.offline_after,
                            rollup_interval=self.settings.rollup_interval)
        self.procs.children = [Child(
            name="registry", role="registry", title=process_title("mixer", "registry"),
            spec=None, run=functools.partial(run_registry, plan, rt, "registry",
                                             self.prometheus))]
        if self.settings.audit.enabled:
            arch = ArchiverPlan(data_dir=str(self.data_dir), hub_url=self.hub.url,
                                user="archiver", password=users["archiver"],
                                settings=self.settings.audit)
            self.procs.children.append(Child(
                name="archiver", role="archiver", title=process_title("mixer", "archiver"),
                spec=None, run=functools.partial(run_archiver, arch, rt, "archiver")))
        if self.settings.traces.enabled:
            tr = TracesPlan(data_dir=str(self.data_dir), hub_url=self.hub.url,
                            password=users["traces"], settings=self.settings.traces)
            self.procs.children.append(Child(
                name="traces", role="traces", title=process_title("mixer", "traces"),
                spec=None, run=functools.partial(run_traces, tr, rt, "traces")))
        if self.console is not None:
            cons = ConsolePlan(data_dir=str(self.data_dir), hub_url=self.hub.url,
                               password=users["console"], settings=self.settings.console)
            self.procs.children.append(Child(
                name="console", role="console", title=process_title("mixer", "console"),
                spec=None, run=functools.partial(run_console, cons, rt, "console",
                                                 self.console)))
        for child in self.procs.children:
            self.procs.fork(child)
        self._write_state()
        log.info("mixer started: data_dir=%s, processes=%d", self.data_dir,
                 len(self.procs.children))

    def _nats_exited(self, pid: int, status: int) -> bool:
        proc = self.hub.proc
        if proc is not None and pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return True
        return False

    def run(self) -> int:
        """Supervise until a stop signal, then stop everything; the exit code."""
        procs = self.procs
        while not procs.stop_requested:
            procs.reap(self._nats_exited)
            timeout = procs.restart_due()
            proc = self.hub.proc
            if proc is not None and proc.poll() is not None:
                log.error("hub nats-server died, restarting: code=%s", proc.returncode)
                try:
                    self.hub.start()
                    self._write_state()
                except NatsServerError as exc:
                    log.error("hub nats-server restart failed: error=%s", exc)
            if (ping := procs.ping()) is not None:
                timeout = min(timeout, ping)
            procs.sleep(timeout)
        return self.stop()

    def stop(self) -> int:
        """Stop the registry (it flushes), then the hub; 0 unless the Mixer gave up."""
        self.procs.notifier.send("STOPPING=1", "STATUS=stopping")
        # the archiver first: it writes what waits while the hub is still there to ack it
        self.procs.stop_children({"console"}, 5.0)
        self.procs.stop_children({"traces"}, 15.0)  # writes what waits
        self.procs.stop_children({"archiver"}, 30.0)
        self.procs.stop_children({"registry"}, 15.0)
        self.hub.stop()
        self.cleanup()
        if self.procs.failed:
            log.error("mixer stopped, not cleanly: reason=%s", self.procs.failed)
            return 1
        log.info("mixer stopped cleanly")
        return 0

    def reload_hub(self) -> None:
        """Re-render the hub's config and have it reload (after ``rack add/revoke``)."""
        self.hub.reload()

    def cleanup(self) -> None:
        """Remove the state file, close the Prometheus and console sockets, release the
        lock."""
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        for sock in (self.prometheus, self.console):
            if sock is not None:
                sock.close()
        self.prometheus = self.console = None
        self.procs.close()

    def _write_state(self) -> None:
        procs = self.procs
        state = {
            "mixer": True,
            "pid": os.getpid(),
            "hub_url": masked_url(self.hub.url),
            "hub_pid": self.hub.pid,
            "leaf": f"{self.settings.leaf_host}:{self.settings.leaf_port}",
            "leaf_urls": list(self.settings.leaf_urls),
            "prometheus": (f"{self.settings.prometheus_host}:{self.prometheus.getsockname()[1]}"
                           if self.prometheus is not None else None),
            "console": (f"http://{self.settings.console.host}:"
                        f"{self.console.getsockname()[1]}/" if self.console is not None
                        else None),
            "status": "failed" if procs.failed else "degraded" if procs.degraded
            else "running",
            "ready": procs.ready,
            "reason": procs.failed or procs.degraded,
            "updated": time.time(),
            "processes": [{"name": c.name, "role": c.role, "pid": c.pid,
                           "restarts": c.restarts, "last_error": c.last_error}
                          for c in procs.children],
        }
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.data_dir / STATE_FILE)
