"""Coat check and store-and-forward reversals: the switch shell, issuer simulators, the rack's
egress process body and a real nats-server (SAF work queue) over real TCP."""

from __future__ import annotations

import asyncio

import nats
import pytest
from switchkit import Kit, exchange, frame, issuers, request, settings

from engine.frame import decode as decode_frame
from gears.coatcheck import luhn_valid, rotate
from gears.iso8583.codec import spec_by_name
from gears.iso8583.framing import FramingConfig
from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry

PAN4, PAN6 = "4761739001010119", "6011000990139424"
TRACK2 = PAN4 + "=27121011234567890"


def _coat(ports, timeout=1.0, saf=None, **extra):
    raw_saf = None
    if saf is not None:
        raw_saf = {"enabled": True, "stream": "SAF_TEST", "retry_interval": saf.get("retry", 0.3),
                   "retry_limit": saf.get("limit", 50), "expire_after": saf.get("expire", 3600),
                   "inter_delay": 0}
    return settings(ports, timeout=timeout, groups={"A": {"endpoints": ["a"]}},
                    routes=[{"bins": ["4", "6"], "group": "A"}],
                    coatcheck={"enabled": True}, **({"saf": raw_saf} if raw_saf else {}),
                    **extra)


@pytest.fixture
def kit(shm_name, tmp_path):
    def make(s):
        return Kit(s, shm_name, tmp_path)
    return make


def _segment_bytes(k: Kit) -> bytes:
    """Everything in the switch's shared memory right now: journal and rings."""
    return b"".join(bytes(seg.payload) for seg in (k.journal.segment, k.ring.segment,
                                                   *(k.saf_ring.segment for _ in [0]
                                                     if k.saf_ring is not None)))


def test_issuer_gets_the_pan_the_acquirer_its_answer_and_nothing_else_sees_it(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        sims["a"].record_pans = True
        sims["a"].delay = 0.3  # in flight long enough to look at shared memory meanwhile
        k = kit(_coat(ports, saf={}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        ask = asyncio.create_task(exchange(port, [frame(request(f35=TRACK2))], 1))
        while not k.shell.core.matcher.pending:
            await asyncio.sleep(0.01)
        in_flight = _segment_bytes(k)
        replies, _ = await ask
        await k.stop()
        nc = await nats.connect(nats_server.url)
        names = [s.config.name async for s in _streams(nc)]
        await nc.close()
        await sims["a"].close()
        return replies[0], sims["a"].stats.pans, in_flight, names, k

    reply, issuer_pans, in_flight, streams, k = asyncio.run(main())
    assert issuer_pans == {PAN4}  # the issuer-facing leg carries the real PAN
    assert reply["t"] == "0110" and reply["39"] == "00" and reply["2"] == PAN4
    assert reply["35"] == TRACK2
    assert k.shell.core.vault.local == {}  # released after the answer
    assert k.journal.in_use == 0
    for needle in (PAN4.encode(), bytes.fromhex(PAN4), PAN4.encode("cp500"), b"=2712101"):
        assert needle not in in_flight  # the journal holds the reversal sealed
    assert not any(s.startswith("KV_") for s in streams)  # no vault copy is written


async def _streams(nc):
    js = nc.jetstream()
    for info in await js.streams_info():
        yield info


async def _txn(url: str) -> list:
    nc = await nats.connect(url)
    js = nc.jetstream()
    out = []
    info = await js.stream_info("TXN")
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        out.append(decode_frame((await js.get_msg("TXN", seq)).data))
    await nc.close()
    return out


def test_events_carry_the_token_and_the_masked_pan_only(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(_coat(ports))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        await exchange(port, [frame(request(f35=TRACK2))], 1)
        await k.stop()
        await sims["a"].close()
        return await _txn(nats_server.url)

    (event,) = asyncio.run(main())
    token = event.body["token"]
    assert len(token) == len(PAN4) and token[:6] == PAN4[:6] and token[-4:] == PAN4[-4:]
    assert token != PAN4 and not luhn_valid(token)
    assert event.body["pan"] == "476173******0119"
    assert PAN4 not in repr(event)


def test_key_rotation_keeps_in_flight_transactions_and_queued_reversals_working(
        kit, nats_server, tmp_path):
    async def main():
        sims, ports = await issuers({"a": ["4=00", "6=drop"]})
        sims["a"].delay = 0.2
        # 1 s: BIN 4 answers after 0.2 s and must never time out on a busy machine (its
        # reversal would break the last assertion); BIN 6 is dropped, so it always does
        k = kit(_coat(ports, timeout=1.0, saf={"retry": 0.3}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=10, rate=300, duration=1.5,
            grace=3, mix=(MixEntry(pan=PAN4), MixEntry(pan=PAN6))))
        run = asyncio.create_task(gen.run())
        await asyncio.sleep(0.6)
        new_kid = rotate(tmp_path / "vault.keys")
        report = (await run).summary()
        timeouts = report["codes"].get("91", 0)
        for _ in range(300):
            if k.stat("saf.sent") >= timeouts:
                break
            await asyncio.sleep(0.05)  # reversals drain through the SAF queue
        current = k.shell.keyring.current
        sent = k.stat("saf.sent")
        await k.stop()
        await sims["a"].close()
        return report, new_kid, current, sent, sims["a"].stats

    report, new_kid, current, sent, issuer = asyncio.run(main())
    assert new_kid == "k2" and current == "k2"
    assert report["codes"]["00"] > 0 and report["lost"] == 0
    assert sent == report["codes"]["91"] == len({(r[3], r[1]) for r in issuer.reversals}) > 0
    assert {r[2] for r in issuer.reversals} == {PAN6}  # sealed under k1 or k2: all opened


async def _timeouts(port, n=5, first=100):
    stans = []
    for i in range(n):
        stan = f"{first + i:06d}"
        (reply,), _ = await exchange(port, [frame(request(f2=PAN6, f11=stan,
                                                          f41="TERM0009"))], 1)
        assert reply["39"] == "91" and reply["2"] == PAN6  # acquirer sees its own PAN
        stans.append(stan)
    return stans


async def _wait(cond, timeout=20.0):
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)  # SAF progress is only visible in counters
    raise AssertionError("condition not reached")


def test_timeouts_are_reversed_exactly_once_each(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["6=drop", "4=00"]})
        # 1 s: BIN 4 answers after 0.2 s and must never time out on a busy machine (its
        # reversal would break the last assertion); BIN 6 is dropped, so it always does
        k = kit(_coat(ports, timeout=1.0, saf={"retry": 0.3}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        stans = await _timeouts(port)
        await _wait(lambda: k.stat("saf.sent") >= 5)
        await asyncio.sleep(0.5)  # nothing more arrives
        await k.stop()
        await sims["a"].close()
        return stans, sims["a"].stats.reversals

    stans, reversals = asyncio.run(main())
    assert sorted(r[1] for r in reversals) == stans  # exactly the expected set, each once
    assert {r[2] for r in reversals} == {PAN6}  # the issuer gets the real PAN
    assert {r[0] for r in reversals} == {"0400"}


def test_reversals_wait_for_a_dead_issuer_and_are_retransmitted_as_0401(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["6=drop", "4=00"]})
        sims["a"].drop_all = True  # hung: reads everything, answers nothing, not even 0400s
        k = kit(_coat(ports, timeout=0.3, saf={"retry": 0.2}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        stans = await _timeouts(port)
        # every reversal tried at least once and left unanswered
        await _wait(lambda: len({r[1] for r in sims["a"].stats.reversals}) >= 5)
        await sims["a"].close()
        sim = IssuerSimulator(spec_by_name("default"), FramingConfig(prefix="2B"),
                              [IssuerRule.parse("6=drop")])
        await sim.start("127.0.0.1", ports["a"])
        await _wait(lambda: k.stat("saf.sent") >= 5)
        await k.stop()
        await sim.close()
        return stans, sim.stats.reversals

    stans, reversals = asyncio.run(main())
    assert sorted({r[1] for r in reversals}) == stans
    assert {r[0] for r in reversals} == {"0401"}  # every attempt after the first is a repeat


def test_reversals_survive_a_switch_restart(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["6=drop", "4=00"]})
        sims["a"].drop_all = True
        s = _coat(ports, timeout=0.3, saf={"retry": 0.2})
        k = kit(s)
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        stans = await _timeouts(port)
        await k.stop()  # the rack stops with 5 reversals queued
        await sims["a"].close()
        sim = IssuerSimulator(spec_by_name("default"), FramingConfig(prefix="2B"),
                              [IssuerRule.parse("6=drop")])
        await sim.start("127.0.0.1", ports["a"])
        k2 = kit(s)
        await k2.start(nats_server.url)
        await _wait(lambda: k2.stat("saf.sent") >= 5)
        await k2.stop()
        await sim.close()
        return stans, sim.stats.reversals

    stans, reversals = asyncio.run(main())
    assert sorted({r[1] for r in reversals}) == stans


def test_retry_limit_moves_reversals_to_the_dead_letter_stream(kit, nats_server):
    async def main():
        sims, ports = await issuers({"a": ["6=drop", "4=00"]})
        sims["a"].drop_all = True
        k = kit(_coat(ports, timeout=0.3, saf={"retry": 0.1, "limit": 3}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        await _timeouts(port, n=2)
        await _wait(lambda: k.stat("saf.dead") >= 2)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        dead = (await js.stream_info("SAF_TEST_DEAD")).state.messages
        queue = (await js.stream_info("SAF_TEST")).state.messages
        await nc.close()
        attempts = len(sims["a"].stats.reversals)
        await k.stop()
        await sims["a"].close()
        return dead, queue, attempts

    dead, queue, attempts = asyncio.run(main())
    assert dead == 2 and queue == 0
    assert attempts == 2 * 3  # each tried retry_limit times


def test_a_deleted_saf_stream_is_recreated_and_reversals_still_go_out(kit, nats_server,
                                                                       caplog):
    async def main():
        sims, ports = await issuers({"a": ["6=drop", "4=00"]})
        # 1 s: BIN 4 answers after 0.2 s and must never time out on a busy machine (its
        # reversal would break the last assertion); BIN 6 is dropped, so it always does
        k = kit(_coat(ports, timeout=1.0, saf={"retry": 0.3}))
        port = await k.start(nats_server.url)
        await k.wait_links(["a"])
        await _timeouts(port, n=2)
        await _wait(lambda: k.stat("saf.sent") >= 2)
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().delete_stream("SAF_TEST")  # an operator's mistake, or an attack
        await nc.close()
        stans = await _timeouts(port, n=3, first=200)
        await _wait(lambda: k.stat("saf.sent") >= 5, timeout=30)
        await k.stop()
        await sims["a"].close()
        return stans, sims["a"].stats.reversals

    stans, reversals = asyncio.run(main())
    assert set(stans) <= {r[1] for r in reversals}
    assert "egress stream missing, recreating it: stream=SAF_TEST" in caplog.text


def test_a_field_the_spec_marks_sensitive_is_held_back_too(kit, tmp_path):
    spec_path = tmp_path / "acme.yaml"
    spec_path.write_text("base: default\nfields:\n  '48': {data_enc: ascii, len_enc: ascii, "
                         "len_type: 3, max_len: 40, sensitive: true}\n")
    secret = "CVV2=123;DOB=19700101"

    async def main():
        sims, ports = await issuers({"a": ["4=00"]}, spec=str(spec_path))
        sims["a"].delay = 0.3
        s = settings(ports, timeout=1.0, groups={"A": {"endpoints": ["a"]}},
                     routes=[{"bins": ["4"], "group": "A"}], spec=str(spec_path),
                     coatcheck={"enabled": True})
        k = kit(s)
        port = await k.start()
        await k.wait_links(["a"])
        ask = asyncio.create_task(exchange(port, [frame(request(f48=secret))], 1))
        while not k.shell.core.matcher.pending:
            await asyncio.sleep(0.01)
        (txn,) = k.shell.core.matcher.pending.values()
        held = txn.context.raw  # what the switch keeps while the issuer decides
        replies, _ = await ask
        await k.stop()
        await sims["a"].close()
        return replies[0], k, held

    reply, k, held = asyncio.run(main())
    assert "48" in k.shell.core.sensitive and reply["48"] == secret and reply["39"] == "00"
    assert secret.encode() not in held
