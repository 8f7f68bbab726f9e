"""The switch over real TCP: issuer simulators, load generator and switch on one event loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine.config import At
from gears.iso8583.codec import FieldIndex, decode, encode, spec_by_name
from gears.iso8583.framing import NEED_DATA, Framer, FramingConfig
from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry
from gears.iso8583.switch import Switch, mask_pan, parse_switch_settings

PANS = {"4": "4761739001010119", "5": "5500000000000004", "6": "6011000990139424",
        "9": "9000000000000001"}


def _settings(issuers: dict[str, int], groups=None, routes=None, timeout=0.5, spec="default",
              framing=None, issuer_framing=None, header=""):
    framing = framing or {"prefix": "2B"}
    return parse_switch_settings({
        "listen": {"host": "127.0.0.1", "port": 0},
        "acquirer": {"framing": framing, "spec": spec},
        "issuers": {name: {"host": "127.0.0.1", "port": port, "connections": 2,
                           "echo_interval": 0.2,
                           "framing": issuer_framing or framing, "spec": spec,
                           "header": header}
                    for name, port in issuers.items()},
        "groups": groups or {"A": {"endpoints": ["a"]}, "B": {"endpoints": ["b"]},
                             "C": {"endpoints": ["c"]}},
        "routes": routes or [
            {"name": "visa", "bins": ["4"], "group": "A"},
            {"name": "mc", "bins": ["5"], "group": "B"},
            {"name": "disc", "bins": ["6"], "group": "C"},
        ],
        "timeout": timeout,
    }, At("test.yaml", "settings"))


async def _issuers(rules: dict[str, list[str]], spec="default", framing=None):
    sims, ports = {}, {}
    for name, rs in rules.items():
        sim = IssuerSimulator(spec_by_name(spec), framing or FramingConfig(prefix="2B"),
                              [IssuerRule.parse(r) for r in rs])
        ports[name] = await sim.start("127.0.0.1", 0)
        sims[name] = sim
    return sims, ports


async def _wait_links(switch: Switch, names) -> None:
    for _ in range(500):
        if all(switch.router.up >= {n} for n in names):
            return
        await asyncio.sleep(0.01)  # links connect in the background
    raise AssertionError(f"issuer links not up: {switch.router.up}")


async def _load(port: int, pan: str, count: int, conns=5, spec="default", framing=None,
                header=b"", rate=0.0, window=2, grace=3.0):
    gen = LoadGenerator(LoadConfig(
        host="127.0.0.1", port=port, spec=spec_by_name(spec),
        framing=framing or FramingConfig(prefix="2B"), header=header, connections=conns,
        rate=rate, window=window, count=count, duration=60, grace=grace,
        mix=(MixEntry(pan=pan),)))
    return (await gen.run()).summary()


def test_bin_table_routes_approves_declines_times_out_and_declines_unrouted():
    async def main():
        sims, ports = await _issuers({"a": ["4=00"], "b": ["5=05"], "c": ["6=drop"]})
        switch = Switch(_settings(ports))
        port = await switch.start()
        await _wait_links(switch, ["a", "b", "c"])
        out = {b: await _load(port, PANS[b], 40) for b in ("4", "5", "6", "9")}
        await switch.stop()
        for s in sims.values():
            await s.close()
        return out, switch

    out, switch = asyncio.run(main())
    assert out["4"]["codes"] == {"00": out["4"]["received"]}
    assert out["5"]["codes"] == {"05": out["5"]["received"]}
    assert out["6"]["codes"] == {"91": out["6"]["received"]}
    assert out["9"]["codes"] == {"92": out["9"]["received"]}
    for r in out.values():
        assert r["received"] >= 40 and r["cross_wired"] == 0 and r["lost"] == 0
    # timeouts answered within the deadline (0.5 s) plus the timer's granularity
    assert 0.5 * 1000 <= out["6"]["p50_ms"] <= 0.5 * 1000 + 150
    assert switch.stats.timeouts == out["6"]["received"]
    assert switch.stats.no_route == out["9"]["received"]


def test_acquirer_echo_is_answered_locally_and_issuer_links_send_echoes():
    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"]}},
                                  routes=[{"bins": ["4"], "group": "A"}]))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        spec = spec_by_name("default")
        framer = Framer(FramingConfig(prefix="2B"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(framer.frame(encode({"t": "0800", "7": "1127120000", "11": "000042",
                                          "70": "301"}, spec)))
        while (msg := framer.next_message()) is NEED_DATA:
            framer.receive_data(await reader.read(4096))
        await asyncio.sleep(0.5)  # idle links send their 0800 echo after echo_interval (0.2 s)
        writer.close()
        await switch.stop()
        await sims["a"].close()
        return decode(msg.payload, spec), sims["a"].stats.echoes

    reply, issuer_echoes = asyncio.run(main())
    assert reply["t"] == "0810" and reply["39"] == "00" and reply["11"] == "000042"
    assert reply["70"] == "301"
    assert issuer_echoes >= 2  # both idle links of issuer "a" kept themselves alive


def test_failover_when_an_issuer_dies_mid_run():
    async def main():
        sims, ports = await _issuers({"a1": ["4=00"], "a2": ["4=00"]})
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a1", "a2"]}},
                                  routes=[{"bins": ["4"], "group": "A"}]))
        port = await switch.start()
        await _wait_links(switch, ["a1", "a2"])
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=5, rate=400, duration=2.0,
            grace=2.0, mix=(MixEntry(pan=PANS["4"]),)))
        run = asyncio.create_task(gen.run())
        await asyncio.sleep(0.7)
        before = sims["a1"].stats.answered
        await sims["a1"].close()  # the primary issuer dies: connections reset
        report = (await run).summary()
        after_a2 = sims["a2"].stats.answered
        await switch.stop()
        await sims["a2"].close()
        return report, before, after_a2, switch

    report, a1_answered, a2_answered, switch = asyncio.run(main())
    assert a1_answered > 0 and a2_answered > 0  # failover moved the traffic
    assert report["cross_wired"] == 0 and report["lost"] == 0
    assert report["received"] == report["sent"]
    # only requests in flight on the dying links may time out
    assert report["codes"].get("00", 0) >= report["received"] - 20
    assert "a1" not in switch.router.up


def _reordered(switch: Switch) -> bool:
    return switch.stats.responses > 0 and switch.reordered > 0


def test_twenty_thousand_transactions_over_fifty_connections_none_cross_wired():
    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        for s in sims.values():
            s.jitter = 0.02  # random 0-20 ms per answer: they come back out of order
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"], }},
                                  routes=[{"bins": ["4"], "group": "A"}], timeout=5.0))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        report = await _load(port, PANS["4"], 20_000, conns=50, window=4)
        reordered = _reordered(switch)
        await switch.stop()
        await sims["a"].close()
        return report, reordered

    report, reordered = asyncio.run(main())
    assert reordered  # the test is only meaningful if answers overtook each other
    assert report["received"] == report["sent"] >= 20_000
    assert report["cross_wired"] == 0 and report["lost"] == 0
    assert report["codes"] == {"00": report["received"]}


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
def test_every_framing_and_codec_variant_end_to_end(spec, framing, header):
    fcfg = FramingConfig(**framing)

    async def main():
        sims, ports = await _issuers({"a": ["4=00", "5=05"]}, spec=spec, framing=fcfg)
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"]}},
                                  routes=[{"bins": ["4", "5"], "group": "A"}], spec=spec,
                                  framing=framing, header=header))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        approve = await _load(port, PANS["4"], 30, spec=spec, framing=fcfg,
                              header=bytes.fromhex(header))
        decline = await _load(port, PANS["5"], 30, spec=spec, framing=fcfg,
                              header=bytes.fromhex(header))
        await switch.stop()
        await sims["a"].close()
        return approve, decline

    approve, decline = asyncio.run(main())
    assert approve["codes"] == {"00": approve["received"]} and approve["received"] >= 30
    assert decline["codes"] == {"05": decline["received"]}
    assert approve["cross_wired"] == decline["cross_wired"] == 0
    assert approve["lost"] == decline["lost"] == 0


def test_issuer_on_another_spec_is_translated():
    async def main():
        sims, ports = await _issuers({"a": ["4=00"]}, spec="bcd")
        s = _settings(ports, groups={"A": {"endpoints": ["a"]}},
                      routes=[{"bins": ["4"], "group": "A"}])
        issuers = tuple(i.__class__(**{**{f: getattr(i, f) for f in i.__slots__},
                                       "link": i.link.__class__(framing=i.link.framing,
                                                                spec_name="bcd")})
                        for i in s.issuers)
        switch = Switch(s.__class__(**{**{f: getattr(s, f) for f in s.__slots__},
                                       "issuers": issuers}))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        report = await _load(port, PANS["4"], 20)
        await switch.stop()
        await sims["a"].close()
        return report

    report = asyncio.run(main())
    assert report["codes"] == {"00": report["received"]} and report["lost"] == 0


async def _raw_exchange(port: int, chunks: list[bytes], read_replies: int, spec="default"):
    framer = Framer(FramingConfig(prefix="2B"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for c in chunks:
        writer.write(c)
    replies = []
    closed = False
    while len(replies) < read_replies and not closed:
        msg = framer.next_message()
        if msg is NEED_DATA:
            data = await asyncio.wait_for(reader.read(4096), 5)
            if not data:
                closed = True
            framer.receive_data(data)
        elif msg is None:
            closed = True
        else:
            replies.append(decode(msg.payload, spec_by_name(spec)))
    if not closed:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
    writer.close()
    return replies, closed


def test_malformed_input_gets_format_error_or_closes_only_that_connection(caplog):
    spec = spec_by_name("default")
    good = encode({"t": "0100", "2": PANS["4"], "3": "000000", "4": "000000001000",
                   "11": "000001", "41": "TERM0001", "49": "840"}, spec)
    # DE4 cut short: MTI and DE2 parse, the message does not
    _, _, spans = FieldIndex(spec, ()).spans(good)
    f4 = next(s for s in spans if s[0] == 4)
    broken = good[:f4[2] + 5]
    framer = Framer(FramingConfig(prefix="2B"))

    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"]}},
                                  routes=[{"bins": ["4"], "group": "A"}]))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        results = {
            "format": await _raw_exchange(port, [framer.frame(broken), framer.frame(good)], 2),
            "bad_length": await _raw_exchange(port, [b"\x00\x00"], 1),
            "oversize": await _raw_exchange(port, [b"\xff\xff" + b"x" * 100], 1),
            "garbage": await _raw_exchange(port, [framer.frame(b"\x01\x02garbage")], 1),
            "truncated": await _raw_exchange(port, [b"\x00\x50abc"], 0),
        }
        # the switch still serves everybody else
        results["after"] = await _load(port, PANS["4"], 20)
        await switch.stop()
        await sims["a"].close()
        return results, switch

    with caplog.at_level(logging.WARNING):
        results, switch = asyncio.run(main())
    replies, closed = results["format"]
    assert [r["39"] for r in replies] == ["30", "00"] and not closed
    assert replies[0]["t"] == "0110" and replies[0]["2"] == PANS["4"]
    assert results["bad_length"] == ([], True)
    assert results["oversize"] == ([], True)
    assert results["garbage"] == ([], True)  # no MTI to answer: counted, closed (on_malformed)
    assert results["after"]["codes"] == {"00": results["after"]["received"]}
    assert switch.stats.framing_errors == 2 and switch.stats.format_errors == 2
    assert PANS["4"] not in caplog.text  # masked everywhere
    assert mask_pan(PANS["4"]) in caplog.text


def test_duplicate_key_in_flight_is_answered_94_and_late_responses_are_dropped():
    spec = spec_by_name("default")
    req = encode({"t": "0100", "2": PANS["4"], "3": "000000", "4": "000000001000",
                  "11": "000777", "41": "TERM0001", "49": "840"}, spec)
    framer = Framer(FramingConfig(prefix="2B"))

    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        sims["a"].delay = 0.6  # slower than the 0.4 s timeout: every answer is late
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"]}},
                                  routes=[{"bins": ["4"], "group": "A"}], timeout=0.4))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        replies, _ = await _raw_exchange(port, [framer.frame(req), framer.frame(req)], 2)
        await asyncio.sleep(0.4)  # let the late issuer answer arrive
        await switch.stop()
        await sims["a"].close()
        return replies, switch

    replies, switch = asyncio.run(main())
    assert sorted(r["39"] for r in replies) == ["91", "94"]
    assert switch.stats.duplicates == 1 and switch.stats.timeouts == 1
    assert switch.stats.late == 1 and switch.stats.responses == 0


def test_mask_pan():
    assert mask_pan("4761739001010119") == "476173******0119"
    assert mask_pan("1234") == "****"
    assert mask_pan("") == ""


def test_card_data_cannot_be_a_match_key():
    from engine.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_switch_settings({"issuers": {"a": {"port": 1}}, "routes": [], "groups": {},
                               "match_key": ["41", "2"]}, At("t.yaml", "settings"))
    assert str(exc.value) == ("t.yaml: settings.match_key[1]: field 2 holds card data and "
                              "cannot be part of the match key")


def test_idle_spin_keeps_the_switch_working():
    async def main():
        from gears.iso8583.switch import spin_before_sleep

        spin_before_sleep(asyncio.get_running_loop(), 0.0002)
        sims, ports = await _issuers({"a": ["4=00"]})
        switch = Switch(_settings(ports, groups={"A": {"endpoints": ["a"]}},
                                  routes=[{"bins": ["4"], "group": "A"}]))
        port = await switch.start()
        await _wait_links(switch, ["a"])
        report = await _load(port, PANS["4"], 200, rate=500)
        await switch.stop()
        await sims["a"].close()
        return report

    report = asyncio.run(main())
    assert report["codes"] == {"00": report["received"]} and report["received"] >= 200
