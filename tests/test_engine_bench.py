"""``engine bench RIG`` (engine/bench.py, benchcompare.py, benchrun.py, benchkit.py).

The decisions are tested as tables without processes: which requests reach which routes,
the CPU ledger, the band and verdict, the refusals of a baseline. The command itself runs
real racks: a switch rig driven by the ISO load generator against the issuer simulator, and
a generator rig made a baseline, then compared with a run that passes and with a doctored
baseline that claims twice the throughput.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from rackutil import rig, switch_rig, uid
from typer.testing import CliRunner

import gears.base
from engine.bench import (
    BenchError,
    CpuLedger,
    Latency,
    luhn_digit,
    mix_for,
    parse_band,
    parse_duration_option,
    sample_pan,
)
from engine.benchcompare import check_comparable, compare, parse_baseline
from engine.benchkit import band, fingerprint, verdict
from engine.cli import app
from engine.counters import HIST_BUCKETS, bucket_index
from engine.natsd import free_port
from gears.base import Source
from gears.iso8583.router import BinRange, Rule

runner = CliRunner()


def _luhn_valid(pan: str) -> bool:
    """An independent Luhn check (double every second digit from the right)."""
    total = 0
    for i, ch in enumerate(reversed(pan)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


# --- what to drive -------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "digit"), [
    ("476173900101011", "9"), ("400000000000000", "2"), ("550000000000000", "4"),
    ("7992739871", "3"),
])
def test_luhn_digit_completes_known_card_numbers(body, digit):
    assert luhn_digit(body) == digit


@pytest.mark.parametrize(("prefix", "length"), [("4", 16), ("510000", 16), ("62" * 8, 17),
                                                 ("9" * 19, 19)])
def test_sample_pan_keeps_the_prefix_and_is_luhn_valid(prefix, length):
    pan = sample_pan(prefix)
    assert len(pan) == length and _luhn_valid(pan)
    assert pan.startswith(prefix[:18])


def _rule(name: str, bins: tuple[str, ...] = (), **kw) -> Rule:
    return Rule(name=name, group="g", bins=tuple(BinRange.parse(b) for b in bins), **kw)


def test_the_mix_reaches_every_route_a_request_can_match_and_says_why_not_the_others():
    rules = [
        _rule("visa", ("4",)),
        _rule("mc", ("510000-559999",), mti=frozenset({"0200", "0400"})),
        _rule("reversals", mti=frozenset({"0400"})),
        _rule("cash", processing_code=("01",)),
        _rule("big", ("4",), amount_min=500_000),
        _rule("eur", ("6",), currency=frozenset({"978", "826"}), amount_max=5_000),
    ]
    mix, routes, left_out = mix_for(rules)
    assert routes == ("visa", "mc", "eur")
    assert left_out == (
        "reversals: MTIs ['0400'] (the load generator sends 0100 or 0200)",
        "cash: processing codes ['01'] (the load generator sends DE3 000000)",
        "big: its requests are taken by route 'visa' first",
    )
    by_route = dict(zip(routes, mix, strict=True))
    assert by_route["mc"].mti == "0200" and by_route["mc"].pan.startswith("510000")
    assert (by_route["eur"].currency, by_route["eur"].amount) == ("826", 5_000)
    for route, entry in by_route.items():
        assert _luhn_valid(entry.pan)
        rule = next(r for r in rules if r.name == route)
        assert rule.matches(entry.mti, {"2": entry.pan, "3": "000000",
                                        "4": f"{entry.amount:012d}", "49": entry.currency})


def test_a_switch_without_reachable_routes_still_gets_load_and_is_told():
    mix, routes, left_out = mix_for([_rule("rev", mti=frozenset({"0420"}))])
    assert len(mix) == 1 and routes == ()
    assert left_out[-1] == "no route reachable: every request is answered no-route"


# --- what was measured ---------------------------------------------------------------------------


def test_cpu_ledger_counts_newborn_processes_from_zero_and_keeps_the_dead_ones():
    ledger = CpuLedger()
    ledger.mark({(10, 1.0): 10.0, (11, 1.0): 5.0})
    ledger.observe({(10, 1.0): 12.5, (11, 1.0): 5.5, (12, 9.0): 0.75})  # 12 born in between
    ledger.observe({(10, 1.0): 13.0, (12, 9.0): 1.0})  # 11 died; 10 is now someone else
    ledger.observe({(10, 50.0): 0.25})  # a recycled pid: another process, from zero
    assert ledger.used() == {(10, 1.0): 3.0, (11, 1.0): 0.5, (12, 9.0): 1.0, (10, 50.0): 0.25}
    assert ledger.total() == pytest.approx(4.75)


def test_latency_from_counter_buckets_never_understates():
    hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
    hist[bucket_index(1_000_000)] += 98  # 1 ms
    hist[bucket_index(5_000_000)] += 1
    hist[bucket_index(50_000_000)] += 1
    lat = Latency.from_histogram(hist)
    assert 1.0 <= lat.p50_ms == lat.p90_ms <= 1.125
    assert 5.0 <= lat.p99_ms <= 5.625 and 50.0 <= lat.max_ms <= 56.25
    assert Latency.from_histogram(np.zeros(HIST_BUCKETS, dtype=np.int64)).p99_ms is None


@pytest.mark.parametrize(("base", "now", "higher", "expected"), [
    (100.0, 91.0, True, "ok"), (100.0, 89.0, True, "REGRESSED"), (100.0, 111.0, True, "better"),
    (50.0, 54.0, False, "ok"), (50.0, 56.0, False, "REGRESSED"), (50.0, 44.0, False, "better"),
])
def test_verdict_within_a_band_for_rates_and_for_costs(base, now, higher, expected):
    assert verdict(base, now, 0.10, higher_is_better=higher) == expected


def test_band_is_twice_the_spread_of_repeats_never_below_the_floor():
    assert band([7.0], 0.05) == 0.05
    assert band([6.3, 7.0, 7.7], 0.05) == pytest.approx(0.4)


@pytest.mark.parametrize(("text", "value"), [("20s", 20.0), ("500ms", 0.5), ("2m", 120.0),
                                             ("3", 3.0), ("2.5", 2.5)])
def test_duration_option(text, value):
    assert parse_duration_option(text) == value


@pytest.mark.parametrize("text", ["0", "-1s", "soon", "25h", "nan"])
def test_a_bad_duration_is_refused_naming_the_option(text):
    with pytest.raises(BenchError) as exc:
        parse_duration_option(text)
    assert str(exc.value) == ("--duration: expected seconds or a duration like 20s, 500ms, "
                              f"2m, more than 0 and at most 24h, got {text!r}")


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.25", 0.25), ("35%", 0.35)])
def test_band_option(text, value):
    assert parse_band(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "100%", "1.5", "-5%", "wide"])
def test_a_bad_band_is_refused(text):
    with pytest.raises(BenchError, match=r"^--band: expected a fraction like 0.1 or a "):
        parse_band(text)


# --- comparison ----------------------------------------------------------------------------------

SHA = "a" * 64
OPTIONS = {"source": "generator", "duration_s": 2.0, "workers": 1, "rate": None,
           "connections": None, "window": None, "issuer_sim": False}


def _baseline_doc(**figures: float) -> dict:
    return {"schema": "fluxrig-engine-bench/1", "ok": True,
            "rig": {"file": "r.yaml", "sha256": SHA, "source": "generator"},
            "options": dict(OPTIONS), "fingerprint": {"cpu_model": "cpu A"},
            "figures": {"throughput": 2000.0, "unit": "frames/s", "cpu_us_per_msg": 50.0,
                        "p99_ms": 4.0, **figures}}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema="x"),
     ("base.json: key schema: expected 'fluxrig-engine-bench/1' (a file written by engine "
      "bench --json)")),
    (lambda d: d.pop("figures"), "base.json: key figures: expected an object"),
    (lambda d: d["figures"].update(throughput=0),
     "base.json: key figures.throughput: expected a positive number, got 0"),
    (lambda d: d["figures"].pop("cpu_us_per_msg"),
     "base.json: key figures.cpu_us_per_msg: expected a positive number, got None"),
    (lambda d: d["rig"].update(sha256="abc"),
     "base.json: key rig.sha256: expected a SHA-256 in hex, got 'abc'"),
])
def test_a_bad_baseline_is_refused_naming_file_and_key(mutate, message):
    doc = _baseline_doc()
    mutate(doc)
    with pytest.raises(BenchError) as exc:
        parse_baseline(doc, "base.json")
    assert str(exc.value) == message


def test_a_baseline_of_other_rig_content_or_load_or_a_failed_run_is_refused_unless_forced():
    base = parse_baseline(_baseline_doc(), "base.json")
    other = "b" * 64
    with pytest.raises(BenchError) as exc:
        check_comparable(base, rig="r.yaml", rig_sha256=other, options=OPTIONS, force=False)
    assert str(exc.value) == ("base.json: key rig.sha256: expected bbbbbbbbbbbb.. (the content "
                              "of r.yaml now), got aaaaaaaaaaaa.. (the baseline measured other "
                              "rig content); --force compares anyway")
    with pytest.raises(BenchError, match=r"^base.json: key options.workers: expected 2 like "
                                         r"this run, got 1 \(the figures would measure "):
        check_comparable(base, rig="r.yaml", rig_sha256=SHA, options={**OPTIONS, "workers": 2},
                         force=False)
    failed = parse_baseline({**_baseline_doc(), "ok": False}, "base.json")
    with pytest.raises(BenchError, match=r"^base.json: key ok: expected true, got false"):
        check_comparable(failed, rig="r.yaml", rig_sha256=SHA, options=OPTIONS, force=False)
    notes = check_comparable(base, rig="r.yaml", rig_sha256=other,
                             options={**OPTIONS, "workers": 2, "duration_s": 5.0}, force=True)
    assert [n.split(":")[0] for n in notes] == ["forced", "forced", "durations differ"]


def test_compare_judges_throughput_falling_and_cpu_per_message_rising():
    from engine.bench import figures_of

    base = parse_baseline(_baseline_doc(), "base.json")
    lat = Latency(p50_ms=1.0, p90_ms=2.0, p99_ms=9.0, max_ms=12.0)

    def now(messages: int, cpu: float):  # over 10 s
        return figures_of(messages=messages, seconds=10.0, unit="frames/s", latency=lat,
                          latency_what="t", cpu_seconds=cpu, peak_rss_mb=1.0, peak_pss_mb=1.0,
                          processes=6)

    same = compare(base, now(20_500, 20_500 * 51e-6), {"cpu_model": "cpu A"}, 0.10)
    assert [r.verdict for r in same.rows] == ["ok", "ok", "info"] and not same.failed
    assert not any("another machine" in n for n in same.notes)
    assert any(n.startswith("absolute figures: the verdict means something only against a "
                            "baseline made on this machine") for n in same.notes)
    slower = compare(base, now(17_000, 17_000 * 58e-6), {"cpu_model": "cpu B"}, 0.10)
    assert [r.verdict for r in slower.rows] == ["REGRESSED", "REGRESSED", "info"]
    assert slower.failed
    assert any("cpu_model: baseline 'cpu A', now 'cpu B'" in n for n in slower.notes)
    cheaper = compare(base, now(20_000, 20_000 * 40e-6), {"cpu_model": "cpu A"}, 0.10)
    assert [r.verdict for r in cheaper.rows][:2] == ["ok", "better"] and not cheaper.failed
    silent = compare(base, now(0, 1.0), {}, 0.10)
    assert [r.verdict for r in silent.rows][:2] == ["MISSING", "MISSING"] and silent.failed


# --- the command: refusals before anything starts -----------------------------------------------


class Ticker(Source):
    """A source engine bench has no load for (a Modbus poller, say)."""

    async def run(self, emit, stopping) -> None:
        await stopping.wait()


def test_a_source_without_a_load_is_refused_by_name_before_anything_starts(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(gears.base._BUILTIN, "ticker", f"{__name__}:Ticker")
    path = rig(tmp_path, uid("btick"), count=1, rate=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["pipelines"][0]["source"] = {"name": "poller", "gear": "ticker"}
    path.write_text(yaml.safe_dump(cfg))
    out = runner.invoke(app, ["bench", str(path), "--duration", "1s"])
    assert out.exit_code == 2, out.output
    assert out.stderr == (f"error: {path}: pipelines[0].source.gear: engine bench has no load "
                          f"for source gear 'ticker' (expected one of: iso8583 (the ISO 8583 "
                          f"load generator), generator (none: it generates by itself); Modbus "
                          f"comes later)\n")
    assert not (tmp_path / "data").exists()  # no rack was started


def test_iso_options_on_a_generator_rig_are_refused(tmp_path):
    path = rig(tmp_path, uid("bopt"), count=1, rate=1)
    out = runner.invoke(app, ["bench", str(path), "--rate", "500", "--issuer-sim"])
    assert out.exit_code == 2
    assert out.stderr.startswith(f"error: --rate, --issuer-sim: options of the ISO load "
                                 f"generator; {path}'s source is a generator")


# --- the command: real racks ---------------------------------------------------------------------


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=150, check=False)


@pytest.mark.slow
def test_bench_drives_a_switch_rig_with_the_issuer_simulator(tmp_path):
    path = switch_rig(tmp_path, uid("bsw"), free_port(), free_port())
    refused = _bench(str(path), "--duration", "3s", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "issuers: nobody listens for a (127.0.0.1:" in refused.stderr
    assert "add --issuer-sim to serve them" in refused.stderr
    out = tmp_path / "switch.json"
    proc = _bench(str(path), "--duration", "3s", "--issuer-sim", "--connections", "20",
                  "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "issuer simulator started (--issuer-sim; approves every request) for a " \
           "(127.0.0.1:" in proc.stdout
    doc = json.loads(out.read_text())
    fig, details = doc["figures"], doc["details"]
    assert fig["unit"] == "TPS" and fig["throughput"] > 0 and fig["messages"] > 0
    assert 0 < fig["p50_ms"] <= fig["p90_ms"] <= fig["p99_ms"] <= fig["max_ms"]
    assert fig["cpu_us_per_msg"] > 0 and fig["peak_rss_mb"] > 0 and fig["peak_pss_mb"] > 0
    assert details["answered"] == details["sent"] == fig["messages"]
    assert details["cross_wired"] == details["lost"] == 0
    assert details["routes"] == ["visa", "mc"] and set(details["de39"]) == {"00"}
    assert {"supervisor", "nats-server", "payments.switch.0", "egress"} <= set(
        doc["cpu_by_process"])
    assert doc["ok"] is True and doc["rack_exit"] == 0
    assert doc["options"]["connections"] == 20 and doc["options"]["issuer_sim"] is True
    # the test card numbers the load sent appear nowhere the bench writes
    log = (tmp_path / "data" / "bench-rack.log").read_text()
    for pan in (sample_pan("4"), sample_pan("5")):
        assert pan not in proc.stdout + proc.stderr + out.read_text() + log


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generator rig at 2,000 frames/s and its first ``engine bench --json`` (a baseline)."""
    tmp = tmp_path_factory.mktemp("bgen")
    path = rig(tmp, uid("bgen"), count=0, rate=2000)
    out = tmp / "base.json"
    proc = _bench(str(path), "--duration", "2s", "--json", str(out), cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path, out


@pytest.mark.slow
def test_bench_measures_a_generator_rig_from_its_counters(generator_run):
    _, out = generator_run
    doc = json.loads(out.read_text())
    fig = doc["figures"]
    assert fig["unit"] == "frames/s"
    assert 1600 < fig["throughput"] < 2400  # the generator's own pace: frames counted once
    assert fig["cpu_us_per_msg"] > 0 and fig["p99_ms"] > 0 and fig["peak_pss_mb"] > 0
    assert doc["details"]["counted"] == ["p.s0.0"]
    assert doc["details"]["acked_by_jetstream"] > 0
    assert {"supervisor", "nats-server", "p.source", "p.s0.0", "egress", "telemetry"} <= set(
        doc["cpu_by_process"])
    assert set(doc["fingerprint"]) == set(fingerprint())
    assert doc["rig"]["source"] == "generator" and len(doc["rig"]["sha256"]) == 64


@pytest.mark.slow
def test_compare_with_a_baseline_of_the_same_rig_passes(generator_run):
    path, base = generator_run
    out = base.with_name("now.json")
    # 40%: CPU per message over 2 s moves by tens of % on a shared 2-core VM
    proc = _bench(str(path), "--duration", "2s", "--compare", str(base), "--band", "40%",
                  "--json", str(out), cwd=base.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compare: 0 of 2 judged figures regressed — PASS" in proc.stdout
    assert "note: absolute figures: the verdict means something only against a baseline made " \
           "on this machine" in proc.stdout
    assert json.loads(out.read_text())["compare"]["failed"] is False


@pytest.mark.slow
def test_compare_fails_against_a_baseline_claiming_twice_the_throughput(generator_run):
    path, base = generator_run
    doc = json.loads(base.read_text())
    doc["figures"]["throughput"] *= 2
    doctored = base.with_name("doctored.json")
    doctored.write_text(json.dumps(doc))
    proc = _bench(str(path), "--duration", "2s", "--compare", str(doctored), "--band", "40%",
                  cwd=base.parent)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("throughput ("))
    assert row.endswith("REGRESSED"), proc.stdout
    assert "— FAIL" in proc.stdout


def test_the_fingerprint_names_the_code_path_so_a_comparison_says_it_differs():
    """Found by a hostile review: a pure-Python run compared with a C baseline read as a
    20% regression with no hint why."""
    from engine.benchkit import differences, fingerprint

    base = fingerprint()
    assert base["code_paths"] == {"ring": "C", "cbor": "C"}
    other = {**base, "code_paths": {"ring": "python (forced by FLUXRIG_PURE_PYTHON=1)",
                                    "cbor": "python (forced by FLUXRIG_PURE_PYTHON=1)"}}
    assert any(line.startswith("code_paths: baseline") for line in differences(base, other))
