"""Headless Chromium settings shared by the browser benchmark and the end-to-end browser test.

Playwright drives Debian's Chromium (``apt-get install chromium``); no browser is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# offline and quiet: no GPU, no sandbox (containers), none of Chromium's background network traffic
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(playwright):
    """A headless Chromium browser from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def open_query_page(browser, url: str, k: int, timeout: int = 60_000):
    """A 1400 x 1000 page of the app at ``url`` once it has hydrated (its query box shown), with Top k set to
    ``k``: the page and its query box."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    box = page.locator("#query textarea")
    box.wait_for(timeout=timeout)
    number = page.locator("input[type=number]").first
    number.fill(str(k))
    number.press("Enter")
    return page, box
