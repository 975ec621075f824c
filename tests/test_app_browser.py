"""End to end in headless Chromium (Playwright driving Debian's ``/usr/bin/chromium``): type a query, see both
galleries fill, open the embedding tab and wait for the plots, save a screenshot.

Skipped when ``/usr/bin/chromium`` is absent (``apt-get install chromium``); nothing is installed here.
Screenshots go to ``tmp_path``; with ``HARMA_UPDATE_SCREENSHOT=1`` they replace ``assets/screenshot.png`` and
``assets/screenshot-embedding.png``, and if ``HARMA_DATA`` is set too the app runs on the real configuration
(``HARMA_DATA`` plus the default model, or ``HARMA_CHECKPOINT``) instead of the tiny test model.
"""

from __future__ import annotations

import os

import pytest

import harma_app as app
from benchmarks.browser import CHROMIUM, launch, open_query_page
from harma_app.common import ASSETS
from harma_app.tab_text_to_image import load_examples
from tests.test_app import tiny_setup
from tests.test_app_api import serve

QUERY = "many planes parked at an airport"
K = 4

BROWSER_MARKS = [  # every browser-test module's marks
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium)"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
pytestmark = BROWSER_MARKS


def open_page(browser, url: str, **goto):
    """A 1400 x 1000 page at ``url``, and the list its uncaught script errors go to."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, **goto)
    return page, errors


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    update = os.environ.get("HARMA_UPDATE_SCREENSHOT") == "1"
    if update and os.environ.get("HARMA_DATA"):
        config = app.AppConfig.from_env()
    else:
        config = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")["config"]
    with serve(config) as local_url:
        yield local_url


def test_query_galleries_embedding_tab_screenshot(url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    update = os.environ.get("HARMA_UPDATE_SCREENSHOT") == "1"
    out = ASSETS if update else tmp_path
    slow = 1_200_000 if update else 180_000  # ms; a real gallery is encoded once (cached afterwards)
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page, box = open_query_page(browser, url, K)  # the SPA has hydrated, Top k set
            # clicking an example runs it: the query box fills and both galleries answer
            example = load_examples()[0]
            page.get_by_text(example, exact=True).first.click()
            page.locator("#adapted-gallery img").nth(K - 1).wait_for(timeout=slow)
            assert box.input_value() == example and example in page.locator("#status").inner_text()
            assert page.get_by_text("Adapted (HarMA)").first.is_visible()  # set on load from the model's method
            box.fill(QUERY)
            page.locator("#search").click()
            for gallery in ("#baseline-gallery", "#adapted-gallery"):
                page.locator(f"{gallery} img").nth(K - 1).wait_for(timeout=slow)
            assert page.locator("#baseline-gallery img").count() >= K
            assert page.locator("#adapted-gallery img").count() >= K
            assert "⚠️" not in page.locator("#status").inner_text()
            page.screenshot(path=str(out / "screenshot.png"), full_page=True)

            page.get_by_role("tab", name="Embedding space").click()
            for plot in ("#baseline-plot", "#adapted-plot", "#move-plot"):  # UMAP: cached on disk after the first time
                page.locator(f"{plot} .js-plotly-plot").wait_for(timeout=slow)
            page.get_by_text("Relative modality gap").first.wait_for(timeout=30_000)
            # linked selection: a click on one map highlights the item in the others and shows it
            page.wait_for_function("document.querySelector('#adapted-plot .js-plotly-plot').__harmaLinked")
            page.evaluate("document.querySelector('#adapted-plot .js-plotly-plot')"
                          ".emit('plotly_click', {points: [{customdata: 'i:3'}]})")
            page.locator("#pick-image img").wait_for(timeout=60_000)
            assert update or page.locator("#pick-text").inner_text().startswith("train_0003.png")
            selected = page.evaluate("document.querySelector('#baseline-plot .js-plotly-plot').data"
                                     ".map(t => (t.selectedpoints || []).length)")
            assert sum(selected) == 1  # the same image, highlighted in the baseline map
            page.evaluate("document.querySelector('#move-plot .js-plotly-plot').emit('plotly_selected', "
                          "{points: [{customdata: 'i:1'}, {customdata: 'i:2'}, {customdata: 'i:5'}]})")
            page.locator("#pick-gallery img").nth(2).wait_for(timeout=60_000)
            assert "Selected 3 image(s)" in page.locator("#pick-text").inner_text()
            # hovering an image point shows its thumbnail, a file the app serves
            page.evaluate("document.querySelector('#baseline-plot .js-plotly-plot').emit('plotly_hover', "
                          "{points: [{customdata: 'i:4'}], event: {clientX: 200, clientY: 300}})")
            page.wait_for_function("(() => { const i = document.getElementById('harma-hover'); return i && "
                                   "i.style.display === 'block' && i.complete && i.naturalWidth > 0; })()",
                                   timeout=30_000)
            assert update or "train_0004" in page.locator("#harma-hover").get_attribute("src")
            page.evaluate("document.querySelector('#baseline-plot .js-plotly-plot').emit('plotly_unhover', {})")
            assert not page.locator("#harma-hover").is_visible()
            # the selected images load once scrolled to, as a visitor would (lazy), and the screenshot shows them
            page.locator("#pick-gallery").scroll_into_view_if_needed()
            page.wait_for_function("(() => { const im = [...document.querySelectorAll('#pick-gallery img')]; "
                                   "return im.length >= 3 && im.every(i => i.complete && i.naturalWidth > 0); })()",
                                   timeout=30_000)
            page.screenshot(path=str(out / "screenshot-embedding.png"), full_page=True)

            # Compare: the per-caption table fills in; selecting a row shows both models' galleries for it
            page.get_by_role("tab", name="Compare").click()
            cell = page.locator("#compare-table [role=gridcell][data-col='1']").first  # an image name
            cell.wait_for(timeout=slow)
            gains = [float(g) for g in page.locator("#compare-table [role=gridcell][data-col='5']").all_inner_texts()]
            assert len(gains) >= 5 and gains == sorted(gains, reverse=True)  # largest gain first
            cell.click()
            for gallery in ("#compare-baseline", "#compare-adapted"):
                page.locator(f"{gallery} img").nth(K - 1).wait_for(timeout=slow)
            assert "⚠️" not in page.locator("#status").inner_text()
            if not update:
                _switching_model_refreshes_the_map(page, slow)
        finally:
            browser.close()
    assert (out / "screenshot.png").stat().st_size > 10_000


def _switching_model_refreshes_the_map(page, slow: int) -> None:
    """On the Embedding space tab, another model in the picker redraws the maps for that model: new
    points, and the adapted map's label names the new method."""
    page.get_by_role("tab", name="Embedding space").click()
    plot = "document.querySelector('#adapted-plot .js-plotly-plot')"
    page.wait_for_function(f"{plot} && {plot}.data.length > 0", timeout=slow)
    before = page.evaluate(f"JSON.stringify({plot}.data.map(t => t.x))")
    page.locator("#model input").click()
    page.get_by_role("option", name="ucm-mrs (mrs on RS-ViT-S16-MiniLM)").click()
    page.wait_for_function(f"(() => {{ const p = {plot}; return p && p.data.length > 0 && "
                           f"JSON.stringify(p.data.map(t => t.x)) !== {before!r}; }})()", timeout=slow)
    page.locator("#adapted-plot").get_by_text("Adapted (MRS-Adapter)").wait_for(timeout=30_000)
    assert "⚠️" not in page.locator("#status").inner_text()
