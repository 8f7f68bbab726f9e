"""The switch over real TCP: issuer simulators, load generator and the switch shell on one
event loop, with its real rings, journal and counters in shared memory."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from switchkit import (
    PANS,
    SPEC,
    Kit,
    exchange,
    frame,
    issuers,
    load,
    request,
    settings,
)

from gears.iso8583.codec import FieldIndex, decode, encode, spec_by_name
from gears.iso8583.core import mask_pan
from gears.iso8583.framing import NEED_DATA, Framer, FramingConfig
from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry
from gears.iso8583.settings import parse_switch_settings


@pytest.fixture
def kit(shm_name, tmp_path):
    kits = []

    def make(s, **kw):
        k = Kit(s, shm_name, tmp_path, **kw)
        kits.append(k)
        return k

    return make


def test_bin_table_routes_approves_declines_times_out_and_declines_unrouted(kit):
    async def main():
        sims, ports = await issuers({"a": ["4=00"], "b": ["5=05"], "c": ["6=drop"]})
        k = kit(settings(ports))
        port = await k.start()
        await k.wait_links(["a", "b", "c"])
        out = {b: await load(port, PANS[b], 40) for b in ("4", "5", "6", "9")}
        await k.stop()
        for s in sims.values():
            await s.close()
        return out, k

    out, k = asyncio.run(main())
    assert out["4"]["codes"] == {"00": out["4"]["received"]}
    assert out["5"]["codes"] == {"05": out["5"]["received"]}
    assert out["6"]["codes"] == {"91": out["6"]["received"]}
    assert out["9"]["codes"] == {"92": out["9"]["received"]}
    for r in out.values():
        assert r["received"] >= 40 and r["cross_wired"] == 0 and r["lost"] == 0
    # timeouts answered within the deadline (0.5 s) plus the timer's granularity
    assert 0.5 * 1000 <= out["6"]["p50_ms"] <= 0.5 * 1000 + 150
    assert k.stat("iso8583.outcomes{outcome=timeout}") == out["6"]["received"]
    assert k.stat("iso8583.outcomes{outcome=no_route}") == out["9"]["received"]
    assert k.stat("iso8583.answers{de39=05}") == out["5"]["received"]
    events = k.events()
    assert len(events) == sum(r["received"] for r in out.values())  # one per answer
    assert {e.body["pan"] for e in events} == {mask_pan(p) for p in PANS.values()}


def test_acquirer_echo_is_answered_locally_and_issuer_links_send_echoes(kit):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}]))
        port = await k.start()
        await k.wait_links(["a"])
        replies, _ = await exchange(port, [frame({"t": "0800", "7": "1127120000",
                                                  "11": "000042", "70": "301"})], 1)
        for _ in range(100):
            if sims["a"].stats.echoes >= 2:
                break
            await asyncio.sleep(0.05)  # idle links echo after echo_interval (0.2 s)
        await k.stop()
        await sims["a"].close()
        return replies[0], sims["a"].stats.echoes, k

    reply, issuer_echoes, k = asyncio.run(main())
    assert reply["t"] == "0810" and reply["39"] == "00" and reply["11"] == "000042"
    assert reply["70"] == "301"
    assert issuer_echoes >= 2  # both idle links of issuer "a" kept themselves alive
    assert k.events() == [] and k.stat("iso8583.echoes") == 1


def test_failover_when_an_issuer_dies_mid_run(kit):
    async def main():
        sims, ports = await issuers({"a1": ["4=00"], "a2": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a1", "a2"]}},
                         routes=[{"bins": ["4"], "group": "A"}]))
        port = await k.start()
        await k.wait_links(["a1", "a2"])
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=SPEC, framing=FramingConfig(prefix="2B"),
            connections=5, rate=400, duration=2.0, grace=2.0, mix=(MixEntry(pan=PANS["4"]),)))
        run = asyncio.create_task(gen.run())
        while sims["a1"].stats.answered < 100:
            await asyncio.sleep(0.01)
        await sims["a1"].close()  # the primary issuer dies: connections reset
        report = (await run).summary()
        await k.stop()
        await sims["a2"].close()
        return report, sims, k

    report, sims, k = asyncio.run(main())
    assert sims["a1"].stats.answered > 0 and sims["a2"].stats.answered > 0
    assert report["cross_wired"] == 0 and report["lost"] == 0
    assert report["received"] == report["sent"]
    # only requests in flight on the dying links may time out
    assert report["codes"].get("00", 0) >= report["received"] - 20
    assert "a1" not in k.shell.core.router.up
    assert k.stat("iso8583.links_up{issuer=a1}") == 0


def test_twenty_thousand_transactions_over_fifty_connections_none_cross_wired(kit):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        sims["a"].jitter = 0.02  # random 0-20 ms per answer: they come back out of order
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}], timeout=5.0))
        port = await k.start()
        await k.wait_links(["a"])
        report = await load(port, PANS["4"], 20_000, conns=50, window=4)
        reordered = k.shell.core.reordered
        await k.stop()
        await sims["a"].close()
        return report, reordered, k

    report, reordered, k = asyncio.run(main())
    assert reordered  # the test is only meaningful if answers overtook each other
    assert report["received"] == report["sent"] >= 20_000
    assert report["cross_wired"] == 0 and report["lost"] == 0
    assert report["codes"] == {"00": report["received"]}
    assert len(k.events()) == report["received"]
    assert k.journal.in_use == 0  # every slot closed once its answer left


@pytest.mark.parametrize(
    ("spec", "framing", "header"),
    [
        ("default", {"prefix": "2B"}, ""),
        ("default", {"prefix": "2L"}, ""),
        ("default", {"prefix": "4B"}, ""),
        ("default", {"prefix": "4L"}, ""),
        ("default", {"prefix": "4A"}, ""),
        ("default", {"prefix": "2B", "header_len": 5}, "6000030000"),
        ("default_ascii", {"prefix": "2B"}, ""),
        ("bcd", {"prefix": "2B", "header_len": 5}, "6000030000"),
        ("ebcdic", {"prefix": "4A"}, ""),
    ],
)
def test_every_framing_and_codec_variant_end_to_end(kit, spec, framing, header):
    fcfg = FramingConfig(**framing)

    async def main():
        sims, ports = await issuers({"a": ["4=00", "5=05"]}, spec=spec, framing=fcfg)
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4", "5"], "group": "A"}], spec=spec,
                         framing=framing, header=header))
        port = await k.start()
        await k.wait_links(["a"])
        approve = await load(port, PANS["4"], 30, spec=spec, framing=fcfg,
                             header=bytes.fromhex(header))
        decline = await load(port, PANS["5"], 30, spec=spec, framing=fcfg,
                             header=bytes.fromhex(header))
        await k.stop()
        await sims["a"].close()
        return approve, decline

    approve, decline = asyncio.run(main())
    assert approve["codes"] == {"00": approve["received"]} and approve["received"] >= 30
    assert decline["codes"] == {"05": decline["received"]}
    assert approve["cross_wired"] == decline["cross_wired"] == 0
    assert approve["lost"] == decline["lost"] == 0


def test_issuer_on_another_spec_is_translated(kit):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]}, spec="bcd")
        s = settings(ports, groups={"A": {"endpoints": ["a"]}},
                     routes=[{"bins": ["4"], "group": "A"}])
        issuer = s.issuers[0]
        s = s.__class__(**{**{f: getattr(s, f) for f in s.__slots__}, "issuers": (
            issuer.__class__(**{**{f: getattr(issuer, f) for f in issuer.__slots__},
                                "link": issuer.link.__class__(framing=issuer.link.framing,
                                                              spec_name="bcd")}),)})
        k = kit(s)
        port = await k.start()
        await k.wait_links(["a"])
        report = await load(port, PANS["4"], 20)
        await k.stop()
        await sims["a"].close()
        return report

    report = asyncio.run(main())
    assert report["codes"] == {"00": report["received"]} and report["lost"] == 0


def test_malformed_input_gets_format_error_or_closes_only_that_connection(kit, caplog):
    good = encode(request(), SPEC)
    # DE4 cut short: MTI and DE2 parse, the message does not
    _, _, spans = FieldIndex(SPEC, ()).spans(good)
    f4 = next(s for s in spans if s[0] == 4)
    broken = good[:f4[2] + 5]
    framer = Framer(FramingConfig(prefix="2B"))

    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}]))
        port = await k.start()
        await k.wait_links(["a"])
        results = {
            "format": await exchange(port, [framer.frame(broken), framer.frame(good)], 2),
            "bad_length": await exchange(port, [b"\x00\x00"], 1),
            "oversize": await exchange(port, [b"\xff\xff" + b"x" * 100], 1),
            "garbage": await exchange(port, [framer.frame(b"\x01\x02garbage")], 1),
        }
        results["after"] = await load(port, PANS["4"], 20)  # everybody else is still served
        await k.stop()
        await sims["a"].close()
        return results, k

    with caplog.at_level(logging.WARNING):
        results, k = asyncio.run(main())
    replies, closed = results["format"]
    assert [r["39"] for r in replies] == ["30", "00"] and not closed
    assert replies[0]["t"] == "0110" and replies[0]["2"] == PANS["4"]
    assert results["bad_length"] == ([], True)
    assert results["oversize"] == ([], True)
    assert results["garbage"] == ([], True)  # no MTI to answer: recorded, closed
    assert results["after"]["codes"] == {"00": results["after"]["received"]}
    assert k.stat("iso8583.rejected{reason=framing}") == 2
    assert k.stat("iso8583.rejected{reason=undecodable}") == 2
    assert k.stat("iso8583.connections_closed{reason=framing}") == 2
    rejected = k.events("iso8583.rejected")
    assert sorted(e.headers["reason"] for e in rejected) == ["framing", "framing",
                                                            "undecodable", "undecodable"]
    assert PANS["4"] not in caplog.text


def test_duplicate_key_in_flight_is_answered_94_and_late_responses_are_dropped(kit):
    req = frame(request(f11="000777"))

    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        sims["a"].delay = 0.6  # slower than the 0.4 s timeout: every answer is late
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}], timeout=0.4))
        port = await k.start()
        await k.wait_links(["a"])
        replies, _ = await exchange(port, [req, req], 2)
        for _ in range(100):
            if k.stat("iso8583.late"):
                break
            await asyncio.sleep(0.02)  # the late issuer answer arrives after 0.6 s
        await k.stop()
        await sims["a"].close()
        return replies, k

    replies, k = asyncio.run(main())
    assert sorted(r["39"] for r in replies) == ["91", "94"]
    assert k.stat("iso8583.outcomes{outcome=duplicate}") == 1
    assert k.stat("iso8583.outcomes{outcome=timeout}") == 1
    assert k.stat("iso8583.late") == 1
    assert k.stat("iso8583.outcomes{outcome=answered}") == 0


def test_mask_pan():
    assert mask_pan("4761739001010119") == "476173******0119"
    assert mask_pan("1234") == "****"
    assert mask_pan("") == ""


def test_card_data_cannot_be_a_match_key():
    from engine.config import At, ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_switch_settings({"issuers": {"a": {"port": 1}}, "routes": [], "groups": {},
                               "match_key": ["41", "2"]}, At("t.yaml", "settings"))
    assert str(exc.value) == ("t.yaml: settings.match_key[1]: field 2 holds card data and "
                              "cannot be part of the match key")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("timeout", float("nan"), "settings.timeout: expected a finite number <= 600, got nan"),
    ("timeout", float("inf"), "settings.timeout: expected a finite number <= 600, got inf"),
    ("timeout", 1e308, "settings.timeout: expected a finite number <= 600, got 1e+308"),
    ("max_inflight", 3, "settings.max_inflight: must be >= 16, got 3"),
    ("no_route_code", "9\n", "settings.no_route_code: expected a 2-character DE39 code"),
])
def test_absurd_settings_are_refused_with_the_key(key, value, message):
    from engine.config import At, ConfigError

    raw = {"issuers": {"a": {"port": 1}}, "groups": {"A": {"endpoints": ["a"]}},
           "routes": [{"bins": ["4"], "group": "A"}], key: value}
    with pytest.raises(ConfigError) as exc:
        parse_switch_settings(raw, At("t.yaml", "settings"))
    assert message in str(exc.value)


def test_idle_spin_keeps_the_switch_working(kit):
    async def main():
        from gears.iso8583.gear import spin_before_sleep

        spin_before_sleep(asyncio.get_running_loop(), 0.0002)
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}]))
        port = await k.start()
        await k.wait_links(["a"])
        report = await load(port, PANS["4"], 200, rate=500)
        await k.stop()
        await sims["a"].close()
        return report

    report = asyncio.run(main())
    assert report["codes"] == {"00": report["received"]} and report["received"] >= 200


# -- regressions from the hostile run (issue "Switch core") -----------------------------------


def _one_issuer(timeout=0.3, **extra):
    async def start(kit_factory, rules=("4=00", "6=drop")):
        sims, ports = await issuers({"a": list(rules)})
        k = kit_factory(settings(ports, groups={"A": {"endpoints": ["a"]}},
                                 routes=[{"bins": ["4", "6"], "group": "A"}],
                                 timeout=timeout, **extra))
        port = await k.start()
        await k.wait_links(["a"])
        return sims, k, port
    return start


def test_a_message_with_mti_abcd_does_not_disable_the_replica(kit):
    """Before: ABCD was forwarded, its timeout raised in the expiry timer, and the replica
    never answered 91 again."""
    async def main():
        sims, k, port = await _one_issuer()(kit)
        bad, closed = await exchange(port, [frame(request(t="ABCD", f2=PANS["6"]))], 1)
        for stan in ("000002", "000003"):  # timeouts after the bad message still get 91
            again, _ = await exchange(port, [frame(request(f2=PANS["6"], f11=stan))], 1,
                                      timeout=3)
            assert again[0]["39"] == "91"
        await k.stop()
        await sims["a"].close()
        return bad, closed, k, sims["a"].stats

    bad, closed, k, issuer = asyncio.run(main())
    assert bad == [] and closed
    assert issuer.dropped == 2  # the issuer never saw ABCD
    (rej,) = k.events("iso8583.rejected")
    assert rej.body["field"] == "t" and rej.headers["reason"] == "mti"
    assert k.stat("iso8583.outcomes{outcome=timeout}") == 2


def test_mti_0199_gets_no_five_character_answer(kit):
    async def main():
        sims, k, port = await _one_issuer()(kit)
        out = await exchange(port, [frame(request(t="0199"))], 1)
        await k.stop()
        await sims["a"].close()
        return out, sims["a"].stats

    (replies, closed), issuer = asyncio.run(main())
    assert replies == [] and closed and issuer.requests == 0


def test_a_timer_that_raises_lives_on(kit, monkeypatch):
    async def main():
        sims, k, port = await _one_issuer()(kit)
        real = k.shell.core.tick
        calls = []

        def flaky(now):
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return real(now)

        monkeypatch.setattr(k.shell.core, "tick", flaky)
        replies = []
        for stan in ("000010", "000011"):
            r, _ = await exchange(port, [frame(request(f2=PANS["6"], f11=stan))], 1, timeout=3)
            replies += r
        await k.stop()
        await sims["a"].close()
        return replies, k

    replies, k = asyncio.run(main())
    assert [r["39"] for r in replies] == ["91", "91"]
    assert k.stat("iso8583.errors") == 1


@pytest.mark.parametrize(("change", "code", "field"), [
    ({"f2": "47617390010X0119"}, "14", "2"),
    ({"f2": ""}, "14", "2"),
    ({"f2": "476173900101"}, "14", "2"),
    ({"f3": "00000Z"}, "30", "3"),
    ({"f4": "0000000010.0"}, "30", "4"),
    ({"f11": "0000x1"}, "30", "11"),
    ({"f49": "EUR"}, "30", "49"),
    ({"f11": None}, "30", "11"),
    ({"f41": None}, "30", "41"),
])
def test_unvalidated_fields_are_no_longer_approved(kit, change, code, field):
    async def main():
        sims, k, port = await _one_issuer(coatcheck={"enabled": True})(kit)
        sims["a"].record_pans = True
        replies, closed = await exchange(port, [frame(request(**change)),
                                                frame(request(f11="000099"))], 2)
        await k.stop()
        await sims["a"].close()
        return replies, closed, sims["a"].stats, k

    replies, closed, issuer, k = asyncio.run(main())
    bad, good = replies
    assert bad["t"] == "0110" and bad["39"] == code
    doc = request(**change)
    for f in ("11", "41"):  # the terminal can match the answer when it sent them
        assert bad.get(f) == doc.get(f)
    assert good["39"] == "00" and not closed  # the connection goes on
    assert issuer.requests == 1 and issuer.pans == {PANS["4"]}  # only the good one
    (rej,) = k.events("iso8583.rejected")
    assert rej.body["field"] == field and rej.body["de39"] == code
    assert k.shell.core.vault.local == {}


def test_the_same_bad_pan_is_refused_every_time_not_routed_by_a_random_token(kit):
    async def main():
        sims, k, port = await _one_issuer(coatcheck={"enabled": True})(kit)
        codes = []
        for i in range(20):
            r, _ = await exchange(port, [frame(request(f2="4761739001AB", f11=f"{i:06d}"))], 1)
            codes.append(r[0]["39"])
        await k.stop()
        await sims["a"].close()
        return codes, sims["a"].stats

    codes, issuer = asyncio.run(main())
    assert codes == ["14"] * 20 and issuer.requests == 0


def _bad_llvar(field: int, prefix: bytes, **extra) -> bytes:
    raw = encode(request(**extra), SPEC)
    _, _, spans = FieldIndex(SPEC, ()).spans(raw)
    start, data_start = next((s[1], s[2]) for s in spans if s[0] == field)
    return Framer(FramingConfig(prefix="2B")).frame(raw[:start] + prefix + raw[data_start:])


@pytest.mark.parametrize(("field", "prefix", "echo"), [
    (2, b"+9", ()),  # before DE11/DE41: neither can be read
    (2, b" 9", ()),
    (44, b"+3", ("11", "41")),  # after both: the answer carries them
    (44, b" 3", ("11", "41")),
])
def test_length_prefixes_with_sign_or_space_are_format_errors(kit, field, prefix, echo):
    async def main():
        sims, k, port = await _one_issuer()(kit)
        replies, _ = await exchange(port, [_bad_llvar(field, prefix, f44="ABC")], 1)
        await k.stop()
        await sims["a"].close()
        return replies, sims["a"].stats

    (reply,), issuer = asyncio.run(main())
    assert reply["39"] == "30" and issuer.requests == 0
    assert {f for f in ("11", "41") if f in reply} == set(echo)


def test_wire_bytes_never_reach_the_log_unescaped(kit, caplog):
    async def main():
        sims, k, port = await _one_issuer(timeout=0.2, on_malformed="keep")(kit)
        await exchange(port, [frame(request(t="\n\x1b[2", f2=PANS["6"])),
                              frame(request(f41="EVIL\nFAK", f2=PANS["6"])),
                              frame(request(f41="T\x1b[31m12", f2=PANS["6"])),
                              frame(request(f2=PANS["6"], f41="EVIL 002"))], 3, timeout=3)
        await k.stop()
        await sims["a"].close()

    with caplog.at_level(logging.DEBUG, logger="fluxrig"):
        asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in text and "EVIL\nFAK" not in text
    assert "\\x1b" in text  # shown, escaped
    assert "EVIL 002" in text  # a valid terminal id stays readable in the timeout log


def test_a_full_ring_pauses_intake_and_loses_no_event(kit):
    """Before: events waited in an unbounded list while the ring was full and the switch
    kept approving. Now nothing is answered before its event is in the ring."""
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}], timeout=5.0),
                ring_capacity=16 << 10, reader=False)  # ~40 events, nobody reading yet
        port = await k.start()
        await k.wait_links(["a"])
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=SPEC, framing=FramingConfig(prefix="2B"),
            connections=4, rate=0, window=2, count=400, duration=60, grace=10,
            mix=(MixEntry(pan=PANS["4"]),)))
        run = asyncio.create_task(gen.run())
        while not k.shell.blocked:
            await asyncio.sleep(0.005)  # nobody reads the ring yet: it fills
        answered_while_full = gen.report.received
        await asyncio.sleep(0.3)
        assert gen.report.received == answered_while_full  # no answer without its event
        events = []
        while not run.done():
            events += k.events()  # now a reader drains the ring
            await asyncio.sleep(0.01)
        report = (await run).summary()
        await k.stop()
        events += k.events()
        await sims["a"].close()
        return report, events, k

    report, events, k = asyncio.run(main())
    assert report["received"] == report["sent"] >= 400 and report["lost"] == 0
    assert len(events) == report["received"]
    assert k.stat("iso8583.backpressure") >= 1


def test_a_drained_connection_ends_with_its_answers_then_fin_not_a_reset(kit):
    """Before: after the drain the switch closed connections over requests it had stopped
    reading; the kernel sent a reset, which can destroy answers the peer has not read yet
    (a CI run lost two that way). Now: the answer, then an orderly end of stream."""
    framer = Framer(FramingConfig(prefix="2B"))

    async def main():
        sims, ports = await issuers({"a": ["4=drop"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}], timeout=0.3))
        port = await k.start()
        await k.wait_links(["a"])
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)

        async def read_to_end():
            data, end = b"", "fin"
            try:
                while chunk := await loop.sock_recv(sock, 4096):
                    data += chunk
            except ConnectionResetError:
                end = "reset"
            sock.close()  # a peer that sees our end of stream closes its own
            return data, end

        await loop.sock_sendall(sock, framer.frame(encode(request(f11="000001"), SPEC)))
        while not len(k.shell.core.matcher):
            await asyncio.sleep(0.005)  # the switch read it and forwarded it
        reading = loop.create_task(read_to_end())
        drain = loop.create_task(k.shell.drain(5.0))
        await asyncio.sleep(0)  # the drain has paused intake
        await loop.sock_sendall(sock, framer.frame(encode(request(f11="000002"), SPEC)))
        assert await drain  # the first one timed out: answered 91
        await k.stop()
        await sims["a"].close()
        return await reading

    data, end = asyncio.run(main())
    framer = Framer(FramingConfig(prefix="2B"))
    framer.receive_data(data)
    answers = []
    while (msg := framer.next_message()) not in (NEED_DATA, None):
        answers.append(decode(msg.payload, SPEC))
    assert [(a["11"], a["39"]) for a in answers] == [("000001", "91")]
    assert end == "fin"


def test_listener_limits_refuse_at_once_and_close_idle_and_slow_connections(kit, caplog):
    async def main():
        sims, ports = await issuers({"a": ["4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}],
                         listen={"host": "127.0.0.1", "port": 0, "max_connections": 6,
                                 "max_per_address": 5, "idle_timeout": 1.5,
                                 "frame_timeout": 1.0}))
        port = await k.start()
        await k.wait_links(["a"])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        refused = []
        for _ in range(20):  # beyond the per-address cap: closed as soon as accepted
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                refused.append(await asyncio.wait_for(r.read(1), 2) == b"")
                w.close()
            except ConnectionError:  # the reset may even beat the end of the handshake
                refused.append(True)
        # the held ones: one sends half a frame, the others stay silent
        held[0][1].write(b"\x00\x40abc")
        closed_at = {}
        t0 = asyncio.get_running_loop().time()

        async def watch(i, reader):
            try:
                await reader.read(1)
            except ConnectionError:
                pass
            closed_at[i] = asyncio.get_running_loop().time() - t0

        await asyncio.gather(*(watch(i, r) for i, (r, _) in enumerate(held)))
        after = await load(port, PANS["4"], 20, conns=2)  # new clients are welcome again
        await k.stop()
        await sims["a"].close()
        return refused, closed_at, after, k

    with caplog.at_level(logging.WARNING):
        refused, closed_at, after, k = asyncio.run(main())
    assert refused == [True] * 20
    assert k.stat("iso8583.connections_refused{reason=max_per_address}") == 20
    assert 1.0 <= closed_at[0] < 3.0  # the slow sender: frame_timeout
    assert all(1.5 <= closed_at[i] < 4.0 for i in range(1, 5))  # idle_timeout
    assert k.stat("iso8583.connections_closed{reason=frame_timeout}") == 1
    assert k.stat("iso8583.connections_closed{reason=idle}") == 4
    assert after["received"] >= 20 and after["codes"] == {"00": after["received"]}
    refusal_lines = [r for r in caplog.records if "connection refused" in r.getMessage()]
    assert 1 <= len(refusal_lines) <= 2  # rate-limited: one line, then a count


def test_issuer_sim_and_loadgen_share_the_framed_shell():
    from gears.iso8583 import issuer_sim, loadgen
    from gears.iso8583.framed import FramedProtocol

    assert issubclass(issuer_sim._IssuerProtocol, FramedProtocol)
    assert issubclass(loadgen._Conn, FramedProtocol)


def test_decode_of_an_answer_with_every_code(kit):
    # every DE39 an issuer may send is counted by code (and "other" for non-numeric)
    async def main():
        sims, ports = await issuers({"a": ["4:5000=51", "4=00"]})
        k = kit(settings(ports, groups={"A": {"endpoints": ["a"]}},
                         routes=[{"bins": ["4"], "group": "A"}]))
        port = await k.start()
        await k.wait_links(["a"])
        replies, _ = await exchange(port, [frame(request(f4="000000009000", f11="000001")),
                                           frame(request(f11="000002"))], 2)
        await k.stop()
        await sims["a"].close()
        return replies, k

    replies, k = asyncio.run(main())
    assert sorted(r["39"] for r in replies) == ["00", "51"]
    assert k.stat("iso8583.answers{de39=51}") == 1 and k.stat("iso8583.answers{de39=00}") == 1
    assert decode  # noqa: B018 - imported for the tests above
    assert NEED_DATA is not None and IssuerRule and IssuerSimulator and spec_by_name
