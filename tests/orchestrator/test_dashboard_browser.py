"""A real browser on the dashboard of a real `longroll run` (tiny model, embedded Ray).

Headless Chromium (Debian's package, driven by Playwright's Python client) opens the URL the run
prints, sees the streams table fill and the preview change, clicks Pause and sees the state change,
and saves screenshots of the table and of a stream's page under out/test-artifacts/ (or
$LONGROLL_TEST_ARTIFACTS).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def chromium() -> str:
    for name in (os.environ.get("LONGROLL_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium here: `make test` installs Debian's `chromium` when run as root (apt-get)")


def artifacts() -> Path:
    d = Path(os.environ.get("LONGROLL_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture()
def live_run(tmp_path):
    """`longroll run` of two endless streams; yields the dashboard URL it printed (with its token)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--streams", "2", "--infinite", "--workers", "1",
           "--checkpoint-every", "4", "--segment-chunks", "2", "--dashboard-port", "0", "--out", str(out), "--quiet"]
    log = open(tmp_path / "run.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            m = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/#token=\S+)", line)
            url = m.group(1) if m else None
        if url is None:
            log.seek(0)
            pytest.fail(f"the run printed no dashboard URL; exit {proc.poll()}; stderr:\n{log.read()[-3000:]}")
        yield url, out
    finally:
        proc.send_signal(signal.SIGINT)  # the driver checkpoints every stream and exits
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_browser_sees_table_and_preview_change_and_pauses_a_stream(live_run):
    url, out = live_run
    base = url.split("#")[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 520})
            page.goto(url)
            expect(page.locator("#token-state")).to_have_text("set")  # taken from the URL fragment
            assert "#token" not in page.url  # and removed from the address bar
            row0, row1 = page.locator("#row-s0"), page.locator("#row-s1")
            expect(row0).to_be_visible(timeout=60_000)
            expect(row1).to_be_visible()
            expect(row0.locator(".state")).to_have_text("running", timeout=60_000)

            # the preview: loaded, then replaced by a newer chunk's frame
            img = row0.locator("img.preview")
            page.wait_for_function(
                "img => img.dataset.chunk !== undefined && img.complete && img.naturalWidth > 0",
                arg=img.element_handle(),
                timeout=60_000,
            )
            first = int(img.get_attribute("data-chunk"))
            page.wait_for_function(
                "([img, c]) => Number(img.dataset.chunk) > c && img.complete && img.naturalWidth > 0",
                arg=[img.element_handle(), first],
                timeout=60_000,
            )
            assert int(img.get_attribute("data-chunk")) > first

            # Pause s0 from the page; its state changes and its chunk count stops rising
            row0.locator("button[data-action=pause]").click()
            expect(row0.locator(".state")).to_have_text("paused", timeout=60_000)
            expect(row0.locator("button[data-action=resume]")).to_be_enabled()
            count = row0.locator("td").nth(3)
            before, other = count.inner_text(), row1.locator("td").nth(3).inner_text()
            time.sleep(2.5)
            assert count.inner_text() == before, "a paused stream's chunk count rose"
            assert row1.locator("td").nth(3).inner_text() != other, "the other stream stopped too"
            shot = artifacts() / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # one stream's page: preview, plots and log
            page.goto(f"{base}streams/s1")
            expect(page.locator("#stream-state")).to_have_text("running", timeout=30_000)
            page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0", timeout=30_000)
            expect(page.locator("#log")).to_contain_text("stream.assigned")
            time.sleep(2)  # a few more samples in the plots
            page.screenshot(path=str(artifacts() / "dashboard-stream.png"), full_page=True)
        finally:
            browser.close()
    assert '"state": "paused"' in (out / "streams" / "s0" / "manifest.json").read_text()
