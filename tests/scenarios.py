"""Fault scenarios against a whole switch rack, judged by independent peers (``peers.py``).

Each function starts ``engine start`` with a switch rig in ``workdir``, drives it with the
peers, injects its fault, stops the rack (drain), reads the audit trail back from its
JetStream and returns a ``Result``: what was measured and the list of ``problems`` (broken
promises). The tests run them short (``tests/test_switch_hostile.py``); the bars of issue
"Switch core" run them at full size (``perf/switch_faults.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peers import Acquirer, Issuer, PeerThread
from rackutil import RackProcess, stream_contents, switch_rig, wait_switch_ready

from engine.frame import decode as decode_frame
from engine.natsd import free_port

PAN4, PAN6 = "4761739001010119", "6011000990139424"


@dataclass
class Result:
    """What a scenario measured; ``problems`` empty means every promise held."""

    name: str
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def events_by_key(workdir: Path, rack_id: str, kind: str = "iso8583.txn") -> Counter:
    """Audit events in the rack's TXN stream, counted by (terminal, STAN)."""
    _, messages = stream_contents(workdir / "data", rack_id, "TXN", f"fluxrig.{rack_id}.txn")
    frames = [decode_frame(data, strict=True) for _, data in messages]
    return Counter((f.body["terminal"], f.body["stan"]) for f in frames if f.kind == kind)


def _rack_id(name: str) -> str:
    """A rack id of this run only: racks of one id share shared-memory names, so a test
    and a full-size run (or two test sessions) must not meet."""
    return f"{name}-{os.getpid()}"


def _busiest(rack: RackProcess) -> str:
    """The switch replica with the most acquirer connections: what a kill of it cuts is
    what the scenario is about."""
    return max(("payments.switch.0", "payments.switch.1"),
               key=lambda n: rack.stats(n)["iso8583.connections"])


def _settle_reversals(issuer: Issuer, owed: set, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if {(t, s) for _, t, s, _ in issuer.reversals} >= owed:
            break
        time.sleep(0.1)  # reversals travel ring -> egress -> SAF queue -> sender
    time.sleep(1.0)  # and nothing more arrives


def _saf_rack(workdir: Path, peers: PeerThread, name: str, issuer_delay: float
              ) -> tuple[Issuer, int, str, Path, RackProcess]:
    """An issuer peer and a ready two-replica switch rack with SAF on, timeout 5 s."""
    port = free_port()
    issuer = Issuer(delay=issuer_delay)
    issuer_port = peers.call(issuer.start())
    rid = _rack_id(name)
    rig = switch_rig(workdir, rid, port, issuer_port, timeout=5.0,
                     saf={"enabled": True, "retry_interval": 1.0})
    rack = RackProcess(rig, workdir / "data", workers=2)
    try:
        wait_switch_ready(rack, port, replicas=2)
    except BaseException:
        rack.close()
        raise
    return issuer, port, rid, rig, rack


def _kill_under_load(peers: PeerThread, acq: Acquirer, seconds: float, kill_at: float,
                     target: Callable[[], int]) -> bool:
    """Run ``acq`` for ``seconds``, SIGKILL ``target()`` once ``kill_at`` s in; True if it
    was killed."""
    killed: list[float] = []

    def tick(t: float) -> None:
        if t > kill_at and not killed:
            os.kill(target(), signal.SIGKILL)
            killed.append(t)

    peers.call(acq.run(seconds, on_tick=tick), timeout=seconds + 60)
    return bool(killed)


def kill_replica(workdir: Path, peers: PeerThread, *, tps: float = 300, seconds: float = 5,
                 kill_at: float = 2.0, issuer_delay: float = 0.2) -> Result:
    """SIGKILL one of two switch replicas under load with a slow issuer (SAF on): every
    request the issuer saw is answered with exactly one audit event, or reversed once."""
    r = Result("kill-replica")
    issuer, port, rid, _, rack = _saf_rack(workdir, peers, "killrep", issuer_delay)
    acq = Acquirer(port, terminals=20, rate=tps)
    try:
        killed = _kill_under_load(peers, acq, seconds, kill_at,
                                  lambda: rack.pid_of(_busiest(rack)))
        unanswered = issuer.seen() - set(acq.answers)
        _settle_reversals(issuer, unanswered, 60)
        r.check(rack.stop() == 0, "rack did not drain cleanly")
    finally:
        rack.close()
    reversed_ = Counter((t, s) for _, t, s, _ in issuer.reversals)
    events = events_by_key(workdir, rid)
    r.figures = {"sent": len(acq.sent), "issuer_saw": len(issuer.seen()),
                 "answered": len(acq.answers), "cut_by_kill": len(unanswered),
                 "reversed": len(reversed_)}
    r.check(killed and bool(unanswered), "the kill cut no request in flight (meaningless run)")
    for key in issuer.seen():
        if key in acq.answers:
            r.check(events[key] == 1, f"answered {key} has {events[key]} audit events")
            r.check(key not in reversed_, f"answered {key} was reversed too")
        else:
            r.check(reversed_[key] == 1, f"unanswered {key} reversed {reversed_[key]} times")
    r.check(all(n == 1 for n in reversed_.values()), "a reversal went out more than once")
    r.check(acq.strays == 0, f"{acq.strays} answers matched nothing sent (cross-wired)")
    r.check({p for _, _, _, p in issuer.reversals} <= {PAN4}, "a reversal carried a bad PAN")
    return r


def stalled_egress(workdir: Path, peers: PeerThread, *, tps: float = 400, seconds: float = 5,
                   stall_at: float = 0.5, stall: float = 3.0, ring: str = "64KiB") -> Result:
    """Egress SIGSTOPped under load, then a replica SIGKILLed, then egress resumed: no
    transaction the acquirers got an answer for lacks its audit event."""
    r = Result("stalled-egress")
    port = free_port()
    issuer = Issuer()
    issuer_port = peers.call(issuer.start())
    rid = _rack_id("stall")
    rig = switch_rig(workdir, rid, port, issuer_port, rings={"capacity": ring})
    rack = RackProcess(rig, workdir / "data", workers=2)
    acq = Acquirer(port, terminals=10, rate=tps)
    try:
        wait_switch_ready(rack, port, replicas=2)
        egress = rack.pid_of("egress")
        steps: list[str] = []

        def tick(t: float) -> None:
            if t > stall_at and "stop" not in steps:
                os.kill(egress, signal.SIGSTOP)
                steps.append("stop")
            if t > stall_at + stall and "kill" not in steps:
                os.kill(rack.pid_of(_busiest(rack)), signal.SIGKILL)
                steps.append("kill")
            if t > stall_at + stall + 0.5 and "cont" not in steps:
                os.kill(egress, signal.SIGCONT)
                steps.append("cont")

        peers.call(acq.run(seconds, on_tick=tick), timeout=seconds + 60)
        held = "ring full, intake paused" in rack.output()
        r.check(rack.stop() == 0, "rack did not drain cleanly")
    finally:
        rack.close()
    events = events_by_key(workdir, rid)
    answered = set(acq.answers)
    missing = [k for k in answered if events[k] != 1]
    r.figures = {"sent": len(acq.sent), "answered": len(answered),
                 "answered_without_one_event": len(missing)}
    r.check(bool(answered) and held, "backpressure never held intake (meaningless run)")
    r.check(not missing, f"{len(missing)} answered transactions without exactly one event, "
                         f"e.g. {missing[:3]}")
    return r


def nats_outage(workdir: Path, peers: PeerThread, *, outage: float = 3.0,
                timeouts_per_s: float = 5.0, kill_switch: bool = True) -> Result:
    """nats-server killed and kept away (the supervisor held with SIGSTOP) for ``outage``
    seconds while requests time out; optionally the switch is SIGKILLed before NATS comes
    back. Every reversal owed is delivered, each exactly once."""
    r = Result("nats-outage")
    port = free_port()
    issuer = Issuer(drop={"6"})
    issuer_port = peers.call(issuer.start())
    rid = _rack_id("natsdown")
    rig = switch_rig(workdir, rid, port, issuer_port, timeout=0.3,
                     saf={"enabled": True, "retry_interval": 0.5})
    rack = RackProcess(rig, workdir / "data", workers=1)
    acq = Acquirer(port, terminals=4, rate=timeouts_per_s, pan=PAN6)
    try:
        wait_switch_ready(rack, port)
        os.kill(rack.proc.pid, signal.SIGSTOP)
        try:
            os.kill(rack.state["nats_pid"], signal.SIGKILL)
            peers.call(acq.run(outage), timeout=outage + 60)
            from engine.egress import (
                STAT_DEFS,  # here: the scenarios also run on older trees
            )

            waiting = dict(zip([d.key for d in STAT_DEFS],
                               rack.counters("egress").snapshot().stats.tolist()))
            if kill_switch:
                os.kill(rack.pid_of("payments.switch"), signal.SIGKILL)
        finally:
            os.kill(rack.proc.pid, signal.SIGCONT)  # it restarts nats-server (and the switch)
        owed = set(acq.answers)
        _settle_reversals(issuer, owed, 60 + len(owed) / 20)
        r.check(rack.stop() == 0, "rack did not drain cleanly")
    finally:
        rack.close()
    reversed_ = Counter((t, s) for _, t, s, _ in issuer.reversals)
    r.figures = {"outage_s": outage, "timeouts_answered_91": sum(
        1 for c in acq.answers.values() if c == "91"), "reversed": len(reversed_),
        "egress_during_outage": waiting}
    if outage > 10:  # past egress's ack timeout (5 s) it is recovering, and says so
        r.check(waiting["egress.waiting"] > 0, "egress did not show frames waiting for NATS")
    r.check(set(acq.answers.values()) <= {"91"}, "an answer other than 91 during the outage")
    r.check(bool(acq.answers), "no timeout happened (meaningless run)")
    lost = set(acq.answers) - set(reversed_)
    r.check(not lost, f"{len(lost)} reversals never delivered, e.g. {sorted(lost)[:3]}")
    r.check(all(n == 1 for n in reversed_.values()), "a reversal was delivered twice")
    return r


def _raise_nofile(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def connection_flood(workdir: Path, peers: PeerThread, *, connections: int = 5000,
                     nofile: int = 1024, tps: float = 200, seconds: float = 12,
                     flood_at: float = 1.0) -> Result:
    """``connections`` opened and held idle against a rack limited to ``nofile`` descriptors
    per process, plus one slow sender: the rack stays up, refuses at once beyond its caps,
    logs little, and a background load started before loses nothing."""
    r = Result("connection-flood")
    _raise_nofile(connections + 3000)
    port = free_port()
    issuer = Issuer()
    issuer_port = peers.call(issuer.start())
    rid = _rack_id("flood")
    rig = switch_rig(workdir, rid, port, issuer_port,
                     listen={"host": "127.0.0.1", "port": port, "frame_timeout": 2.0})
    rack = RackProcess(rig, workdir / "data", workers=2, nofile=nofile)
    acq = Acquirer(port, terminals=4, rate=tps, prefix="B")
    flood: list[socket.socket] = []
    try:
        wait_switch_ready(rack, port, replicas=2)
        lines_before = rack.output().count("\n")
        slow: list[socket.socket] = []

        def tick(t: float) -> None:
            if t > flood_at and not flood:
                # first a slow sender (admitted: the flood would have it refused), then the flood
                slow_sock = socket.create_connection(("127.0.0.1", port))
                slow_sock.sendall(b"\x00\x40abc")  # a frame that never completes
                slow.append(slow_sock)
                for _ in range(connections):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    flood.append(s)

        t_start = time.monotonic()
        peers.call(acq.run(seconds, on_tick=tick), timeout=seconds + 90)
        minutes = (time.monotonic() - t_start) / 60
        closed = 0
        t0 = time.monotonic()
        for s in flood[:400]:  # a sample: refused ones were closed by the switch at once
            try:
                s.setblocking(True)
                s.settimeout(0.01)
                closed += s.recv(1) == b""
            except (ConnectionError, OSError):
                closed += 1
        sample_seconds = time.monotonic() - t0
        slow[0].settimeout(5)
        try:
            slow_closed = slow[0].recv(1) == b""
        except ConnectionError:
            slow_closed = True
        alive = rack.proc.poll() is None
        lines = rack.output().count("\n") - lines_before
        for s in flood:
            s.close()
        r.check(rack.stop() == 0, "rack did not drain cleanly")
    finally:
        for s in flood:
            s.close()
        rack.close()
    r.figures = {"connections": connections, "nofile": nofile, "background_sent": len(acq.sent),
                 "background_answered": len(acq.answers), "sample_closed_of_400": closed,
                 "log_lines": lines, "log_lines_per_min": round(lines / max(minutes, 1e-9), 1)}
    r.check(alive, "the rack died")
    r.check(bool(acq.sent) and set(acq.sent) == set(acq.answers),
            f"the background load lost {len(set(acq.sent) - set(acq.answers))} requests")
    r.check(set(acq.answers.values()) <= {"00"}, "background answers other than 00")
    r.check(closed > 200 and sample_seconds < 10, "connections beyond the cap left hanging")
    r.check(slow_closed, "a slow sender kept its connection past frame_timeout")
    r.check(lines / max(minutes, 1.0) < 100, f"{lines} log lines in {minutes:.1f} min")
    return r


def supervisor_kill(workdir: Path, peers: PeerThread, *, tps: float = 300,
                    seconds: float = 5, kill_at: float = 2.0) -> Result:
    """SIGKILL of the supervisor under load, then ``engine start`` again: the new supervisor
    stops the survivors, adopts the rings and journals, and every answered transaction has
    exactly one audit event; every request the issuer saw is answered or reversed once."""
    r = Result("supervisor-kill")
    issuer, port, rid, rig, rack = _saf_rack(workdir, peers, "supkill", 0.05)
    acq = Acquirer(port, terminals=20, rate=tps)
    try:
        killed = _kill_under_load(peers, acq, seconds, kill_at, lambda: rack.proc.pid)
    finally:
        rack.close()
    again = RackProcess(rig, workdir / "data", workers=2)
    try:
        wait_switch_ready(again, port, replicas=2)
        unanswered = issuer.seen() - set(acq.answers)
        _settle_reversals(issuer, unanswered, 60)
        adopted = "segments of the previous run adopted" in again.output()
        r.check(again.stop() == 0, "the restarted rack did not drain cleanly")
    finally:
        again.close()
    reversed_ = Counter((t, s) for _, t, s, _ in issuer.reversals)
    events = events_by_key(workdir, rid)
    r.figures = {"sent": len(acq.sent), "issuer_saw": len(issuer.seen()),
                 "answered": len(acq.answers), "not_answered": len(unanswered),
                 "reversed": len(reversed_), "adopted": adopted}
    r.check(killed, "the supervisor was not killed (meaningless run)")
    r.check(adopted, "the restarted supervisor adopted nothing")
    for key in acq.answers:
        r.check(events[key] == 1, f"answered {key} has {events[key]} audit events")
    for key in issuer.seen() - set(acq.answers):
        r.check(reversed_[key] == 1, f"unanswered {key} reversed {reversed_[key]} times")
    r.check(all(n == 1 for n in reversed_.values()), "a reversal went out more than once")
    return r


def sigterm_drain(workdir: Path, peers: PeerThread, *, tps: float = 300, seconds: float = 5,
                  stop_at: float = 2.0, drain_timeout: float = 30.0) -> Result:
    """SIGTERM (``engine stop``) under load: every request the switch read is answered (or
    timed out 91 and reversed), every answer has its audit event, exit 0 in time."""
    r = Result("sigterm-drain")
    port = free_port()
    issuer = Issuer(delay=0.2)
    issuer_port = peers.call(issuer.start())
    rid = _rack_id("drain")
    rig = switch_rig(workdir, rid, port, issuer_port, timeout=5.0,
                     saf={"enabled": True, "retry_interval": 1.0})
    rack = RackProcess(rig, workdir / "data", workers=2)
    acq = Acquirer(port, terminals=20, rate=tps)
    code = None
    took = 0.0
    try:
        wait_switch_ready(rack, port, replicas=2)
        stopped: list[float] = []
        exited: list[float] = []

        def tick(t: float) -> None:  # every 5 ms: when the signal went, when the rack was gone
            if t > stop_at and not stopped:
                rack.proc.send_signal(signal.SIGTERM)
                stopped.append(time.monotonic())
            elif stopped and not exited and rack.proc.poll() is not None:
                exited.append(time.monotonic())

        peers.call(acq.run(seconds, on_tick=tick), timeout=seconds + 60)
        code = rack.proc.wait(drain_timeout + 30)
        took = (exited[0] if exited else time.monotonic()) - stopped[0]
    finally:
        rack.close()
    events = events_by_key(workdir, rid)
    timeouts = {k for k, c in acq.answers.items() if c == "91"}
    r.figures = {"sent": len(acq.sent), "issuer_saw": len(issuer.seen()),
                 "answered": len(acq.answers), "timeouts": len(timeouts),
                 "exit_code": code, "drain_seconds": round(took, 2)}
    r.check(code == 0, f"exit code {code}")
    r.check(took < drain_timeout, f"the drain took {took:.1f} s")
    for key in acq.answers:
        r.check(events[key] == 1, f"answered {key} has {events[key]} audit events")
    lost = issuer.seen() - set(acq.answers)
    r.check(not lost, f"{len(lost)} requests the issuer saw were never answered, "
                      f"e.g. {sorted(lost)[:3]}")
    return r
