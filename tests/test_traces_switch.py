"""The switch's traces in process: keep rules, a full tap, no card number (issue "Pipeline B").

A real switch shell (``switchkit.Kit``: real rings, journal, counters, sockets) with real
issuer simulators; its tracer writes to a real tap ring, read back with telemetry's own
reader (``engine.traceexport``) and turned into OpenTelemetry spans.
"""

from __future__ import annotations

import asyncio

import pytest
from switchkit import PANS, Kit, issuers, load, settings

from engine.counters import Counters
from engine.ring import Ring
from engine.shm import KIND_TAP
from engine.tap import Tap, Tracer, TraceSettings
from engine.traceexport import (
    OtlpEncoder,
    Resources,
    SpanFactory,
    TapReader,
    span_batch,
)

SLOW_BIN = "6"  # issuer c answers after 0.3 s


@pytest.fixture
def traced(shm_name, tmp_path):
    made = []

    def make(trace: TraceSettings, ring_capacity: int = 1 << 20):
        tap_ring = Ring.create(shm_name("tap"), trace.tap, KIND_TAP, doorbells=False)
        counters = Counters.create(shm_name("tc"))
        made.append((tap_ring, counters))
        tracer = Tracer(trace, Tap(tap_ring, counters))
        return tracer, tap_ring, counters

    yield make
    for ring, counters in made:
        ring.close()
        counters.close()


def _read(tap_ring: Ring) -> list[tuple[str, list]]:
    reader = TapReader([{"name": "payments.switch.0", "tap": tap_ring.segment.name}])
    try:
        return reader.poll().traces
    finally:
        reader.close()


def test_keep_rules_keep_declines_timeouts_errors_and_slow_ones_only(traced, shm_name,
                                                                     tmp_path):
    tracer, tap_ring, counters = traced(TraceSettings(sample=0.0, slower_than=0.2))

    async def main():
        sims, ports = await issuers({"a": ["4:500000=drop", "4=00"], "b": ["5=05"],
                                     "c": ["6=00"]})
        sims["c"].delay = 0.3
        k = Kit(settings(ports, timeout=0.5), shm_name, tmp_path, tracer=tracer)
        port = await k.start()
        await k.wait_links(["a", "b", "c"])
        out = {"approved": await load(port, PANS["4"], 30),
               "declined": await load(port, PANS["5"], 4),
               "slow": await load(port, PANS[SLOW_BIN], 3, conns=3)}
        # a timeout (the issuer drops big amounts) and a format error (DE4 not numeric)
        from switchkit import exchange, frame, request
        answers, _ = await exchange(port, [frame(request(f4="000000600000", f11="000777"))], 1)
        out["timeout"] = answers[0]["39"]
        answers, _ = await exchange(port, [frame(request(f4="00000000ABCD", f11="000778"))], 1)
        out["format"] = answers[0]["39"]
        await k.stop()
        for s in sims.values():
            await s.close()
        return out

    out = asyncio.run(main())
    assert out["timeout"] == "91" and out["format"] == "30"
    traces = _read(tap_ring)
    keeps = sorted(rec[1] for _, rec in traces)
    # nothing approved in time is kept: the declines, the slow approvals, the timeout, the error
    n_declined, n_slow = out["declined"]["received"], out["slow"]["received"]
    assert out["approved"]["codes"] == {"00": out["approved"]["received"]}
    assert out["declined"]["codes"] == {"05": n_declined} and n_declined
    assert n_slow and out["slow"]["codes"] == {"00": n_slow}
    assert keeps == ["decline"] * n_declined + ["error"] + ["slow"] * n_slow + ["timeout"]
    assert counters.snapshot().traces_kept == len(keeps)
    spans, bad = span_batch(SpanFactory(Resources("r1")), traces)
    assert bad == 0
    by_trace: dict[int, list] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    for group in by_trace.values():
        root = next(s for s in group if s.parent is None)
        keep = root.attributes["fluxrig.keep"]
        if keep == "timeout":
            issuer = next(s for s in group if s.name == "issuer answer")
            assert root.attributes["iso8583.de39"] == "91"
            assert issuer.status.description == "timeout"
            assert root.end_time - root.start_time >= 0.5e9  # the deadline (from receipt)
            assert issuer.end_time - issuer.start_time >= 0.45e9  # spent waiting on it
        elif keep == "slow":
            assert root.end_time - root.start_time > 0.2e9
            issuer = next(s for s in group if s.name == "issuer answer")
            assert issuer.end_time - issuer.start_time >= 0.29e9  # where the time went
        elif keep == "error":
            assert [s.name for s in group if s.parent is not None] == [
                "acquirer receive", "validate", "audit write", "respond"]
            assert root.attributes["iso8583.de39"] == "30"
    # the spans encode as OTLP and carry no clear card number anywhere
    blob, n, bad = OtlpEncoder(Resources("r1")).request(traces)
    assert n == len(spans) and bad == 0
    for pan in PANS.values():
        assert pan.encode() not in blob


def test_a_full_tap_drops_and_counts_and_the_switch_does_not_notice(traced, shm_name,
                                                                    tmp_path):
    # a 16 KiB tap nobody reads: a few traces fit, every later one is dropped and counted
    tracer, tap_ring, counters = traced(TraceSettings(sample=1.0, tap=16384))

    async def main():
        sims, ports = await issuers({"a": ["4=00"], "b": ["5=05"], "c": ["6=00"]})
        k = Kit(settings(ports), shm_name, tmp_path, tracer=tracer)
        port = await k.start()
        await k.wait_links(["a"])
        report = await load(port, PANS["4"], 400, conns=4)
        await k.stop()
        for s in sims.values():
            await s.close()
        return report, k.events("iso8583.txn")

    report, events = asyncio.run(main())
    n = report["received"]
    assert n >= 400 and report["lost"] == 0 and report["codes"] == {"00": n}
    assert len(events) == n  # every transaction answered and audited
    snap = counters.snapshot()
    kept = len(_read(tap_ring))
    assert 0 < kept == snap.traces_kept < n
    assert snap.traces_kept + snap.traces_dropped == n


def test_the_keep_rule_rate_cap_drops_and_counts(traced):
    _, tap_ring, counters = traced(TraceSettings())
    clock = [100.0]
    tracer = Tracer(TraceSettings(sample=0.0, max_kept=3, slower_than=0.0),
                    Tap(tap_ring, counters), clock=lambda: clock[0])
    assert [tracer.keep(False, decline=True) for _ in range(5)] == ["decline"] * 3 + [None] * 2
    assert tracer.keep(False, seconds=10.0) is None  # slow rule off (slower_than 0)
    assert tracer.keep(True) == "sampled"  # head-sampled ones are not capped
    assert counters.snapshot().traces_dropped == 2
    clock[0] += 1.0  # a new second
    assert tracer.keep(False, timeout=True) == "timeout"


def test_head_sampling_keeps_about_the_configured_share(traced):
    tracer, _, _ = traced(TraceSettings(sample=0.1))
    picked = sum(tracer.head() for _ in range(20_000))
    assert 1_600 < picked < 2_400
    off, _, _ = traced(TraceSettings(enabled=False))
    assert not off.on and not any(off.head() for _ in range(1000))
