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
