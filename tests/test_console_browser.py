"""The Mixer console in a real browser (headless Chromium, Debian's, driven by Playwright):
log in, see two live racks linked to the hub, watch a counter move on a rack's page,
search a transaction and open it, look at the namespace, stop a rack and see it turn
offline. A screenshot of each page goes to ``artifacts/console/`` (``FLUXRIG_ARTIFACTS``
to put them elsewhere).

``scripts/test`` installs Chromium (apt, as root, as CI runs); where it cannot be found
this test is skipped and says why."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from mixerutil import MixerProcess, enrol, hub_ports, init_hub, linked_rig, mixer
from rackutil import RackProcess
from test_mixer_console import PASSWORD, _uns_copy, write_audit

from engine.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("FLUXRIG_ARTIFACTS", ROOT / "artifacts")) / "console"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here (scripts/test installs Debian's chromium as "
                             "root: apt-get install chromium)")


def test_a_user_logs_in_sees_live_racks_searches_and_sees_a_rack_go_offline(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    hub = init_hub(tmp_path, offline_after="2s", audit="{enabled: false}")
    with open(hub / "mixer.yaml", "a") as f:
        f.write(f"console: {{enabled: true, host: 127.0.0.1, port: {port}}}\n")
    os.environ["FX_BROWSER_PW"] = PASSWORD
    try:
        done = mixer("console", "user", "add", str(hub), "ada", "--role", "admin",
                     "--password-env", "FX_BROWSER_PW")
        assert done.returncode == 0, done.stderr
    finally:
        del os.environ["FX_BROWSER_PW"]
    write_audit(hub, "north", 20)
    racks = []
    m = MixerProcess(hub)
    try:
        for name, site in (("north", "lyon"), ("south", "oslo")):
            passport = enrol(hub, name, f"site={site}")
            config, data = linked_rig(tmp_path, name, passport, count=0, rate=50, name=name)
            racks.append(RackProcess(config, data))
        asyncio.run(_uns_copy(hub, f"nats://127.0.0.1:{hub_ports(hub)[0]}"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # not logged in: sent to the login page
            page.goto(base + "/")
            page.wait_for_url(base + "/login")
            page.fill("#user", "ada")
            page.fill("#password", PASSWORD)
            page.screenshot(path=str(ARTIFACTS / "login.png"))
            page.click("#submit")
            page.wait_for_url(base + "/")
            # the fleet: both racks online, live
            expect(page.locator("#live")).to_have_text("live", timeout=15_000)
            for name in ("north", "south"):
                expect(page.locator(f"#rack-{name}")).to_have_attribute(
                    "data-state", "online", timeout=30_000)
            page.fill("#filter", "site=oslo")
            expect(page.locator("#rack-north")).to_be_hidden()
            expect(page.locator("#rack-south")).to_be_visible()
            page.fill("#filter", "")
            expect(page.locator("#rack-north")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "fleet.png"))
            # a rack's page: its source's frames-out counter moves
            page.click("#rack-north a")
            counter = page.locator("#processes tr[data-process='p.source'] td.frames-out")
            expect(counter).to_have_count(1, timeout=10_000)
            first = counter.inner_text()
            expect(counter).not_to_have_text(first, timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "rack.png"))
            # transactions: find one by terminal and STAN, open it, its chain verified
            page.click("#nav-transactions")
            page.fill("#q-terminal", "T0000001")
            page.fill("#q-stan", "000007")
            page.click("#search-go")
            rows = page.locator("#txns tr.txn")
            expect(rows).to_have_count(1)
            expect(rows.first.locator("td.pan")).to_have_text("411111******1111")
            rows.first.click()
            expect(page.locator("#detail .badge")).to_have_text("verified")
            expect(page.locator("#event-json")).to_contain_text('"stan": "000007"')
            expect(page.locator("#daily svg rect")).to_have_count(2)  # DE39 00 and 05
            page.screenshot(path=str(ARTIFACTS / "transactions.png"), full_page=True)
            # the namespace: the tree with its last values, a tag's trend
            page.click("#nav-namespace")
            leaf = page.locator("li.leaf[data-path$='.temp']")
            expect(leaf).to_contain_text("21.5")
            leaf.click()
            expect(page.locator("#trend svg polyline")).to_have_count(1)
            page.screenshot(path=str(ARTIFACTS / "namespace.png"))
            # a rack stopped turns offline on the live fleet page
            page.click("#nav-fleet")
            assert racks[1].stop() == 0
            expect(page.locator("#rack-south")).to_have_attribute(
                "data-state", "offline", timeout=20_000)
            expect(page.locator("#rack-north")).to_have_attribute("data-state", "online")
            page.screenshot(path=str(ARTIFACTS / "fleet-offline.png"))
            browser.close()
    finally:
        for r in racks:
            r.close()
        m.close()
    for shot in ("login", "fleet", "rack", "transactions", "namespace", "fleet-offline"):
        assert (ARTIFACTS / f"{shot}.png").stat().st_size > 5_000, shot
