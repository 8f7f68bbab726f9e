"""Console benchmark: the fleet page with 1,000 simulated racks, in a real browser.

    python perf/console_bench.py [--racks 1000] [--seconds 30] [--loads 5] [--json PATH]
    python perf/console_bench.py --quick        # 200 racks, 10 s windows, 3 loads

1. A hub (``mixer init``, every rack enrolled with its labels, ``simulator: true``) with the
   console on; ``perf/mixer_fleet.py``'s simulator publishes every rack's hello and one
   snapshot per rack per second (10 processes each) as the ``sim`` user, as 1,000 racks do.
2. Headless Chromium (Debian's, through Playwright) logs in and loads the fleet page
   ``--loads`` times: **load time** = navigation start to the frame after every rack's row
   was added to the table, on the page's own clock (``performance.mark`` by the page),
   median and worst; the resources' timeline of each load is printed too.
3. With the page open and live, two windows of ``--seconds`` each, same run:

   * **A** — the console running: CPU of the console process, and of the registry (which
     answers the console's ``top`` and ``racks`` once a second);
   * **B** — the console stopped (SIGSTOP): the registry alone, the baseline.

   **Mixer-side cost of the live console** = console CPU + (registry A - registry B), as %
   of one CPU; the page's updates received in window A are counted too.

Bars (issue 14): load <= 1 s, live cost <= 10% of one CPU. Exit 1 if one fails. Writes
``perf/results/console_bench.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf"))
sys.path.insert(0, str(ROOT / "tests"))

from mixer_fleet import FleetSim, make_hub  # noqa: E402 - perf/ sibling
from mixerutil import MixerProcess  # type: ignore[import-not-found]  # noqa: E402

from engine.natsd import free_port  # noqa: E402
from mixer.consoleauth import Credentials  # noqa: E402
from mixer.consoledata import ask  # noqa: E402
from mixer.hubfiles import local_users  # noqa: E402
from mixer.settings import load_settings  # noqa: E402

BARS = {"load_s": 1.0, "live_cpu_pct": 10.0}
PASSWORD = "bench password 1234"


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def _all_online(hub: Path, racks: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if sum(r["state"] == "online" for r in await ask(hub, "racks")) >= racks:
                return time.monotonic() - t0
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"not every rack online after {timeout:.0f} s")


async def measure(hub: Path, m: MixerProcess, port: int, racks: int, seconds: float,
                  loads: int, chromium: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    settings = load_settings(hub)
    state = m.state()
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    sim = FleetSim(racks)
    pub = await nats.connect(settings.hub_url, user="sim", password=local_users(hub)["sim"],
                             pending_size=64 * 1024 * 1024)
    stop = asyncio.Event()
    load = asyncio.create_task(sim.run(pub, stop))
    out: dict[str, Any] = {}
    try:
        out["all_online_s"] = round(await _all_online(hub, racks, 120.0), 2)
        await asyncio.sleep(3.0)  # the console's board holds every rack
        base = f"http://127.0.0.1:{port}"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            # bypass_csp: Playwright's wait_for_function evaluates a string in the page,
            # which the console's policy (script-src 'self') forbids, as it should
            ctx = await browser.new_context(viewport={"width": 1400, "height": 900},
                                            bypass_csp=True)
            page = await ctx.new_page()
            await page.goto(base + "/login")
            await page.fill("#user", "bench")
            await page.fill("#password", PASSWORD)
            await page.click("#submit")
            await page.wait_for_url(base + "/")
            times: list[float] = []
            parts: list[dict[str, Any]] = []  # per load: resource -> [start, end] ms
            for _ in range(loads):
                await page.goto(base + "/")
                await page.wait_for_function(
                    "performance.getEntriesByName('fleet-shown').length > 0 && "
                    f"document.querySelectorAll('#fleet-body tr').length >= {racks}",
                    timeout=30_000)
                # the page's own clock: navigation start -> the frame after the rows were
                # added (Playwright's polling and round trips left out)
                times.append(await page.evaluate(
                    "performance.getEntriesByName('fleet-shown')[0].startTime") / 1000)
                parts.append(await page.evaluate(
                    "(() => { const r = {}; for (const e of performance.getEntriesByType"
                    "('resource')) r[new URL(e.name).pathname] = [Math.round(e.startTime),"
                    " Math.round(e.responseEnd)]; const n = performance.getEntriesByType"
                    "('navigation')[0]; r.dom = Math.round(n.domContentLoadedEventEnd); "
                    "r.now = Math.round(performance.now()); return r; })()"))
            out["load_s"] = {"median": round(statistics.median(times), 3),
                             "max": round(max(times), 3), "all": [round(t, 3) for t in times],
                             "timings_ms": parts}
            await page.wait_for_function("window.fluxrigUpdates >= 1", timeout=10_000)
            # window A: the console live
            u0 = await page.evaluate("window.fluxrigUpdates")
            c0, r0, t0 = _cpu(pids["console"]), _cpu(pids["registry"]), time.monotonic()
            await asyncio.sleep(seconds)
            c1, r1, t1 = _cpu(pids["console"]), _cpu(pids["registry"]), time.monotonic()
            u1 = await page.evaluate("window.fluxrigUpdates")
            rows_now = await page.evaluate("document.querySelectorAll('#fleet-body tr').length")
            # window B: the console stopped, the registry alone
            os.kill(pids["console"], signal.SIGSTOP)
            try:
                r2, t2 = _cpu(pids["registry"]), time.monotonic()
                await asyncio.sleep(seconds)
                r3, t3 = _cpu(pids["registry"]), time.monotonic()
            finally:
                os.kill(pids["console"], signal.SIGCONT)
            await browser.close()
        a = t1 - t0
        out.update({
            "window_s": round(a, 1), "updates": u1 - u0, "rows_shown": rows_now,
            "console_cpu_pct": round(100 * (c1 - c0) / a, 2),
            "registry_cpu_pct_with_console": round(100 * (r1 - r0) / a, 2),
            "registry_cpu_pct_without_console": round(100 * (r3 - r2) / (t3 - t2), 2)})
        out["live_cpu_pct"] = round(out["console_cpu_pct"] + max(
            0.0, out["registry_cpu_pct_with_console"]
            - out["registry_cpu_pct_without_console"]), 2)
    finally:
        stop.set()
        await load
        await pub.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--racks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="200 racks, 10 s windows, 3 loads")
    ap.add_argument("--json", type=Path,
                    default=ROOT / "perf" / "results" / "console_bench.json")
    args = ap.parse_args()
    if args.quick:
        args.racks, args.seconds, args.loads = min(args.racks, 200), 10.0, 3
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium: apt-get install chromium (scripts/test does as root)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    try:
        hub, enrol_s = make_hub(tmp, args.racks, True, 10.0)
        port = free_port()
        with open(hub / "mixer.yaml", "a") as f:
            f.write(f"audit: {{enabled: false}}\nconsole: {{enabled: true, host: 127.0.0.1, "
                    f"port: {port}}}\n")
        Credentials(hub).set_user("bench", PASSWORD, "viewer")
        m = MixerProcess(hub)
        try:
            res = asyncio.run(measure(hub, m, port, args.racks, args.seconds, args.loads,
                                      chromium))
        finally:
            m.stop()
            m.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [("fleet page load, median (s)", res["load_s"]["median"], BARS["load_s"],
             res["load_s"]["median"] <= BARS["load_s"]),
            ("fleet page load, worst (s)", res["load_s"]["max"], BARS["load_s"],
             res["load_s"]["max"] <= BARS["load_s"]),
            ("live cost, % of one CPU", res["live_cpu_pct"], BARS["live_cpu_pct"],
             res["live_cpu_pct"] <= BARS["live_cpu_pct"])]
    print(f"console benchmark: {args.racks} racks (10 processes each, 1 snapshot/s), "
          f"{os.cpu_count()} CPUs; all online {res['all_online_s']} s after the start; "
          f"enrolment {enrol_s:.0f} s")
    for t in res["load_s"]["timings_ms"]:
        print("  load timeline (ms from navigation): " + ", ".join(
            f"{k} {v}" for k, v in t.items()))
    print(f"  loads (s): {res['load_s']['all']}; window {res['window_s']} s: "
          f"{res['updates']} live updates, {res['rows_shown']} rows shown")
    print(f"  console {res['console_cpu_pct']}% of one CPU; registry "
          f"{res['registry_cpu_pct_with_console']}% with it, "
          f"{res['registry_cpu_pct_without_console']}% without (same run)")
    print(f"{'figure':<32} {'value':>8} {'bar':>6}  verdict")
    for name, value, bar, ok in rows:
        print(f"{name:<32} {value:>8} {bar:>6}  {'PASS' if ok else 'FAIL'}")
    ratio = (res["registry_cpu_pct_with_console"] + res["console_cpu_pct"]) / max(
        0.01, res["registry_cpu_pct_without_console"])
    print(f"Mixer-side CPU with the live console / without: {ratio:.2f}x")
    doc = {"benchmark": "console", "racks": args.racks, "seconds": args.seconds, **res,
           "ratio": round(ratio, 3), "bars": {n: ok for n, _, _, ok in rows},
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "platform": platform.platform()},
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
