"""The report in a real browser: headless Chromium (Debian's `chromium`) via Playwright.

Needs /usr/bin/chromium (CI: `apt-get install -y chromium`) and the playwright package
(no Playwright-managed browser download: it drives the system Chromium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_report_opens_in_chromium(digits_run, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("/usr/bin/chromium is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from imgcls.evaluation.report import build_report

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    report = build_report(run, "digits", mistakes=4).html_path
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            failed: list[str] = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            cm = page.locator("#confusion-matrix")
            assert cm.is_visible()
            width, height = page.evaluate(
                "() => { const i = document.getElementById('confusion-matrix');"
                " return i.complete ? [i.naturalWidth, i.getBoundingClientRect().height] : [0, 0]; }")
            assert width > 200 and height > 100  # decoded and laid out, not a broken-image icon
            broken = page.evaluate("() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                   ".map(i => i.alt)")
            assert broken == []
            assert page.locator("#per-class tbody tr").count() == 12
            assert problems == [] and failed == []
        finally:
            browser.close()
