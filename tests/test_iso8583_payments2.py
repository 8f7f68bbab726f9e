"""Coat check and store-and-forward reversals: switch, issuer simulator and a real
nats-server (JetStream KV vault, SAF work queue) over real TCP."""

from __future__ import annotations

import asyncio

import nats
import pytest

from engine.cbor import loads
from gears.coatcheck import luhn_valid, page_entries, rotate
from gears.iso8583.codec import decode, encode, spec_by_name
from gears.iso8583.framing import NEED_DATA, Framer, FramingConfig
from gears.iso8583.loadgen import LoadConfig, LoadGenerator, MixEntry
from gears.iso8583.switch import Switch
from test_iso8583_switch import _issuers, _settings, _wait_links

PAN4, PAN6 = "4761739001010119", "6011000990139424"
TRACK2 = PAN4 + "=27121011234567890"


def _coat_settings(ports, tmp_path, timeout=1.0, saf=None, groups=None, routes=None):
    s = _settings(ports, timeout=timeout, groups=groups or {"A": {"endpoints": ["a"]}},
                  routes=routes or [{"bins": ["4", "6"], "group": "A"}])
    from gears.iso8583.switch import CoatCheckSettings, SafSettings
    fields = {f: getattr(s, f) for f in s.__slots__}
    fields["coatcheck"] = CoatCheckSettings(fields=("2", "35", "45", "52"),
                                            bucket="vault_test", key_file="vault.keys",
                                            ttl_margin=30.0)
    if saf is not None:
        fields["saf"] = SafSettings(stream="SAF_TEST", retry_interval=saf.get("retry", 0.3),
                                    retry_limit=saf.get("limit", 50),
                                    expire_after=saf.get("expire", 3600.0), inter_delay=0.0)
    return s.__class__(**fields)


async def _switch(settings, nats_url, tmp_path, replica=0, events=None):
    switch = Switch(settings, events.append if events is not None else None,
                    data_dir=str(tmp_path), replica=replica)
    nc = await nats.connect(nats_url)
    await switch.attach_nats(nc, "t")
    port = await switch.start()
    return switch, nc, port


async def _flusher(switch, stop):
    """What SwitchGear.run does every 20 ms in a rack; ends with a flush that reaches NATS."""
    while not stop.is_set():
        await switch.flush_vault()
        await asyncio.sleep(0.01)
    await switch.flush_vault()
    if switch._nc is not None and switch._nc.is_connected:
        await switch._nc.flush()


async def _one(port, doc, spec=spec_by_name("default")):
    framer = Framer(FramingConfig(prefix="2B"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(framer.frame(encode(doc, spec)))
    while (msg := framer.next_message()) is NEED_DATA:
        framer.receive_data(await reader.read(4096))
    writer.close()
    return decode(msg.payload, spec)


async def _vault_raw(nats_url, bucket):
    """Every stored vault message (pages), read raw from the bucket's stream."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    info = await js.stream_info(f"KV_{bucket}")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            out.append(await js.get_msg(f"KV_{bucket}", seq))
        except Exception:
            pass
    await nc.close()
    return out


def _entries(pages) -> dict[str, bytes]:
    out = {}
    for m in pages:
        out.update(page_entries(m.data))
    return out


def test_issuer_gets_the_pan_acquirer_gets_its_answer_vault_holds_ciphertext(nats_server,
                                                                             tmp_path):
    request = {"t": "0100", "2": PAN4, "3": "000000", "4": "000000002500", "11": "000001",
               "35": TRACK2, "41": "TERM0001", "49": "840"}

    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        sims["a"].record_pans = True
        events = []
        switch, nc, port = await _switch(_coat_settings(ports, tmp_path), nats_server.url,
                                         tmp_path, events=events)
        stop = asyncio.Event()
        flusher = asyncio.create_task(_flusher(switch, stop))
        await _wait_links(switch, ["a"])
        reply = await _one(port, request)
        await asyncio.sleep(0.1)
        stop.set()
        await flusher
        await switch.stop()
        await nc.close()
        await sims["a"].close()
        return reply, sims["a"].stats.pans, events, switch

    reply, issuer_pans, events, switch = asyncio.run(main())
    assert issuer_pans == {PAN4}  # the issuer-facing leg put the real PAN back
    assert reply["t"] == "0110" and reply["39"] == "00" and reply["2"] == PAN4
    assert reply["35"] == TRACK2
    (event,) = events
    token = event["token"]
    assert len(token) == len(PAN4) and token[:6] == PAN4[:6] and token[-4:] == PAN4[-4:]
    assert token != PAN4 and not luhn_valid(token)
    assert event["pan"] == "476173******0119"
    assert switch.stats.tokenised == 1 and switch.vault.local == {}  # released after reply
    stored = asyncio.run(_vault_raw(nats_server.url, "vault_test"))
    assert [m.subject for m in stored] == ["$KV.vault_test.l0.p1"]
    page = stored[0].data
    assert PAN4.encode() not in page and TRACK2.encode() not in page
    assert bytes.fromhex(PAN4) not in page  # nor as BCD
    entries = page_entries(page)
    assert list(entries) == [f"l0.{token}"]
    sealed = loads(entries[f"l0.{token}"])
    assert set(sealed) == {"k", "n", "c"} and sealed["k"] == "k1"
    assert switch.keyring.open(f"l0.{token}", entries[f"l0.{token}"]) == {"2": PAN4,
                                                                          "35": TRACK2}


def test_key_rotation_keeps_in_flight_transactions_working(nats_server, tmp_path):
    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        sims["a"].delay = 0.3  # requests stay in flight while the key rotates
        switch, nc, port = await _switch(_coat_settings(ports, tmp_path), nats_server.url,
                                         tmp_path)
        stop = asyncio.Event()
        flusher = asyncio.create_task(_flusher(switch, stop))
        await _wait_links(switch, ["a"])
        gen = LoadGenerator(LoadConfig(
            host="127.0.0.1", port=port, spec=spec_by_name("default"),
            framing=FramingConfig(prefix="2B"), connections=10, rate=300, duration=1.5,
            grace=3, mix=(MixEntry(pan=PAN4),)))
        run = asyncio.create_task(gen.run())
        await asyncio.sleep(0.6)
        new_kid = rotate(tmp_path / "vault.keys")
        report = (await run).summary()
        stop.set()
        await flusher
        current = switch.keyring.current
        await switch.stop()
        await nc.close()
        await sims["a"].close()
        return report, new_kid, current

    report, new_kid, current = asyncio.run(main())
    assert new_kid == "k2" and current == "k2"
    assert report["codes"] == {"00": report["received"]} and report["lost"] == 0
    entries = _entries(asyncio.run(_vault_raw(nats_server.url, "vault_test")))
    kids = {loads(e)["k"] for e in entries.values()}
    assert kids == {"k1", "k2"}  # entries sealed before and after the rotation


def _saf_run(nats_url, tmp_path, phases, saf):
    """Run a switch whose issuer drops authorisations (BIN 6) but answers reversals."""

    async def main():
        sims, ports = await _issuers({"a": ["6=drop", "4=00"]})
        result = {}
        switch, nc, port = await _switch(
            _coat_settings(ports, tmp_path, timeout=0.3, saf=saf), nats_url, tmp_path)
        stop = asyncio.Event()
        flusher = asyncio.create_task(_flusher(switch, stop))
        await _wait_links(switch, ["a"])
        ctx = {"sims": sims, "ports": ports, "switch": switch, "nc": nc, "port": port,
               "result": result, "stop": stop, "flusher": flusher}
        for phase in phases:
            await phase(ctx)
        ctx["stop"].set()
        await ctx["flusher"]
        await ctx["switch"].stop()
        await ctx["nc"].close()
        for sim in ctx["sims"].values():
            await sim.close()
        return result

    return asyncio.run(main())


async def _timeouts(ctx, n=5):
    stans = []
    for i in range(n):
        stan = f"{100 + i:06d}"
        reply = await _one(ctx["port"], {"t": "0100", "2": PAN6, "3": "000000",
                                         "4": "000000001000", "11": stan, "41": "TERM0009",
                                         "49": "840"})
        assert reply["39"] == "91" and reply["2"] == PAN6  # acquirer sees its own PAN
        stans.append(stan)
    ctx["result"]["stans"] = stans


async def _wait(cond, timeout=15.0):
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)  # SAF progress is only visible in counters
    raise AssertionError("condition not reached")


def test_timeouts_are_reversed_exactly_once_each(nats_server, tmp_path):
    async def deliver(ctx):
        sim = ctx["sims"]["a"]
        await _wait(lambda: len({r[1] for r in sim.stats.reversals}) >= 5)
        await _wait(lambda: ctx["switch"].stats.reversals_done >= 5)
        ctx["result"]["reversals"] = list(sim.stats.reversals)

    result = _saf_run(nats_server.url, tmp_path, [_timeouts, deliver], {"retry": 0.3})
    reversed_stans = sorted(r[1] for r in result["reversals"])
    assert reversed_stans == result["stans"]  # exactly the expected set, each once
    assert {r[2] for r in result["reversals"]} == {PAN6}  # the issuer gets the real PAN


def test_reversals_wait_for_a_dead_issuer_and_are_retransmitted_as_0401(nats_server,
                                                                         tmp_path):
    async def kill_issuer(ctx):
        await ctx["sims"]["a"].close()  # down: links drop, reversals cannot go out

    async def revive(ctx):
        await asyncio.sleep(1.0)  # several retry intervals pass with the issuer down
        from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
        sim = IssuerSimulator(spec_by_name("default"), FramingConfig(prefix="2B"),
                              [IssuerRule.parse("6=drop")])
        await sim.start("127.0.0.1", ctx["ports"]["a"])
        ctx["sims"]["a"] = sim
        await _wait(lambda: ctx["switch"].stats.reversals_done >= 5, 20)
        ctx["result"]["reversals"] = list(sim.stats.reversals)

    async def timeouts_then_kill(ctx):
        await _timeouts(ctx)
        # the first attempts may already have reached the live issuer: count what is left
        ctx["result"]["done_before"] = ctx["switch"].stats.reversals_done
        await kill_issuer(ctx)

    result = _saf_run(nats_server.url, tmp_path, [timeouts_then_kill, revive],
                      {"retry": 0.2})
    got = result["reversals"]
    assert len({r[1] for r in got}) == 5 - result["done_before"]
    assert all(r[0] == "0401" for r in got)  # every attempt after the first is a repeat


def test_reversals_survive_a_switch_restart(nats_server, tmp_path):
    async def restart(ctx):
        await ctx["sims"]["a"].close()  # issuer down: nothing can be delivered
        ctx["stop"].set()
        await ctx["flusher"]
        await ctx["switch"].stop()  # the "rack" stops with 5 reversals queued
        await ctx["nc"].close()
        from gears.iso8583.issuer_sim import IssuerRule, IssuerSimulator
        sim = IssuerSimulator(spec_by_name("default"), FramingConfig(prefix="2B"),
                              [IssuerRule.parse("6=drop")])
        await sim.start("127.0.0.1", ctx["ports"]["a"])
        ctx["sims"]["a"] = sim
        switch, nc, port = await _switch(
            _coat_settings(ctx["ports"], tmp_path, timeout=0.3, saf={"retry": 0.2}),
            nats_server.url, tmp_path)
        ctx.update(switch=switch, nc=nc, port=port, stop=asyncio.Event())
        ctx["flusher"] = asyncio.create_task(_flusher(switch, ctx["stop"]))
        await _wait(lambda: len({r[1] for r in sim.stats.reversals}) >= 5, 20)
        ctx["result"]["reversals"] = list(sim.stats.reversals)

    async def timeouts_issuer_dead(ctx):
        ctx["sims"]["a"].drop_all = True
        await _timeouts(ctx)

    result = _saf_run(nats_server.url, tmp_path, [timeouts_issuer_dead, restart],
                      {"retry": 0.2})
    assert sorted({r[1] for r in result["reversals"]}) == result["stans"]


def test_retry_limit_moves_reversals_to_the_dead_letter_subject(nats_server, tmp_path):
    async def never_acked(ctx):
        ctx["sims"]["a"].drop_all = True  # the issuer answers nothing, not even 0400s
        await _timeouts(ctx, n=2)
        await _wait(lambda: ctx["switch"].stats.reversals_dead >= 2, 20)
        js = ctx["nc"].jetstream()
        ctx["result"]["dead"] = (await js.stream_info("SAF_TEST_DEAD")).state.messages
        ctx["result"]["queue"] = (await js.stream_info("SAF_TEST")).state.messages
        ctx["result"]["attempts"] = len(ctx["sims"]["a"].stats.reversals)

    result = _saf_run(nats_server.url, tmp_path, [never_acked], {"retry": 0.1, "limit": 3})
    assert result["dead"] == 2 and result["queue"] == 0
    assert result["attempts"] == 2 * 3  # each tried retry_limit times


@pytest.mark.parametrize("field", ["2", "35"])
def test_no_clear_card_data_in_the_vault_stream_as_ascii_or_bcd(nats_server, tmp_path, field):
    async def main():
        sims, ports = await _issuers({"a": ["4=00"]})
        switch, nc, port = await _switch(_coat_settings(ports, tmp_path), nats_server.url,
                                         tmp_path)
        stop = asyncio.Event()
        flusher = asyncio.create_task(_flusher(switch, stop))
        await _wait_links(switch, ["a"])
        for i in range(20):
            await _one(port, {"t": "0100", "2": PAN4, "3": "000000", "4": "000000001000",
                              "11": f"{i:06d}", "35": TRACK2, "41": "TERM0001", "49": "840"})
        stop.set()
        await flusher
        await switch.stop()
        await nc.close()
        await sims["a"].close()

    asyncio.run(main())
    stored = asyncio.run(_vault_raw(nats_server.url, "vault_test"))
    assert len(_entries(stored)) == 20
    secret = PAN4 if field == "2" else TRACK2
    for m in stored:
        assert secret.encode() not in m.data
        assert secret[:16].encode("cp500") not in m.data
        assert bytes.fromhex(PAN4) not in m.data


def test_a_field_the_spec_marks_sensitive_goes_to_the_vault_too(nats_server, tmp_path):
    spec_path = tmp_path / "acme.yaml"
    spec_path.write_text("base: default\nfields:\n  '48': {data_enc: ascii, len_enc: ascii, "
                         "len_type: 3, max_len: 40, sensitive: true}\n")
    secret = "CVV2=123;DOB=19700101"

    async def main():
        sims, ports = await _issuers({"a": ["4=00"]}, spec=str(spec_path))
        s = _coat_settings(ports, tmp_path)
        acq = s.acquirer.__class__(framing=s.acquirer.framing, spec_name=str(spec_path))
        issuers = tuple(i.__class__(**{**{f: getattr(i, f) for f in i.__slots__},
                                       "link": i.link.__class__(framing=i.link.framing,
                                                                spec_name=str(spec_path))})
                        for i in s.issuers)
        s = s.__class__(**{**{f: getattr(s, f) for f in s.__slots__}, "acquirer": acq,
                           "issuers": issuers})
        switch, nc, port = await _switch(s, nats_server.url, tmp_path)
        stop = asyncio.Event()
        flusher = asyncio.create_task(_flusher(switch, stop))
        await _wait_links(switch, ["a"])
        reply = await _one(port, {"t": "0100", "2": PAN4, "4": "000000001000", "11": "000001",
                                  "41": "TERM0001", "48": secret},
                           spec=spec_by_name(str(spec_path)))
        stop.set()
        await flusher
        await switch.stop()
        await nc.close()
        await sims["a"].close()
        return reply, switch

    reply, switch = asyncio.run(main())
    assert "48" in switch.sensitive and reply["48"] == secret and reply["39"] == "00"
    stored = asyncio.run(_vault_raw(nats_server.url, "vault_test"))
    assert len(_entries(stored)) == 1 and secret.encode() not in stored[0].data
