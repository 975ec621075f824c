"""The Embedding space maps in headless Chromium (Playwright driving Debian's ``/usr/bin/chromium``), on what
the page draws: play moves every point from its baseline place to its adapted one (Gradio's
``Plotly.react`` drops figure frames, so linked_maps.js runs ``Plotly.animate``); zooming one map sets
the same axis ranges on the others; the legend names images and captions; hovering rings the twin;
the map search highlights points. The app is launched once, on the tiny checkpoint and synthetic gallery,
with the PCA + Procrustes layout (no umap-learn import or numba compile)."""

from __future__ import annotations

import httpx
import pytest

import harma.projection as projection
from benchmarks.browser import launch
from benchmarks.sections import _api
from tests.test_app import tiny_setup
from tests.test_app_browser import BROWSER_MARKS, open_page
from tests.test_app_api import serve

pytestmark = [*BROWSER_MARKS, pytest.mark.filterwarnings("ignore::UserWarning")]
GD = "document.querySelector('{} .js-plotly-plot')"
BASE, ADAPTED, MOVE = GD.format("#baseline-plot"), GD.format("#adapted-plot"), GD.format("#move-plot")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    real = projection.aligned_2d
    mp.setattr(projection, "aligned_2d", lambda b, a, seed=0, **k: real(b, a, seed, use_umap=False))
    config = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")["config"]
    try:
        with serve(config) as local_url:
            yield local_url
    finally:
        mp.undo()


def _point(page, plot: str, trace: int, k: int) -> list[float]:
    """Where point ``k`` of ``trace`` is drawn: the translate() of its SVG marker, in pixels."""
    return page.evaluate(f"""(() => {{
        const t = {plot}.querySelectorAll('.scatterlayer .trace')[{trace}];
        const m = t.querySelectorAll('path.point')[{k}].getAttribute('transform');
        return m.match(/translate\\(([-\\d.e]+),\\s*([-\\d.e]+)\\)/).slice(1).map(Number); }})()""")


def test_maps_move_link_and_name_the_modalities(url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page, errors = open_page(browser, url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Embedding space").click()
            for plot in (BASE, ADAPTED, MOVE):
                page.wait_for_function(f"{plot} && {plot}.__harmaLinked && {plot}.data.length > 0", timeout=60_000)

            # colour by modality: the legend the page shows names images and captions
            legend = page.locator("#baseline-plot .legendtext").all_text_contents()
            assert "images" in legend and "captions" in legend and "centroids, gap vector" in legend

            # play: the plotted place of an image point (the one moving most) moves by its baseline -> adapted move
            k = page.evaluate(f"{MOVE}.data.findIndex(t => t.name === 'images')")
            i, *move = page.evaluate(f"""(() => {{ const m = {MOVE}.layout.meta.move; const j = m.traces.indexOf({k});
                const [b, a] = [m.base[j], m.adapted[j]]; let i = 0, best = -1;
                b[0].forEach((x, n) => {{ const d = Math.hypot(a[0][n] - x, a[1][n] - b[1][n]);
                                          if (d > best) {{ best = d; i = n; }} }});
                return [i, b[0][i], b[1][i], a[0][i], a[1][i]]; }})()""")
            px = page.evaluate(f"(() => {{ const l = {MOVE}._fullLayout; return [l.xaxis._m, l.yaxis._m]; }})()")
            before = _point(page, MOVE, k, i)
            assert page.evaluate(f"{MOVE}._transitionData._frames.length") == 0  # no frames: Plotly.react drops them
            page.locator("#move-plot .updatemenu-button").first.click()
            page.wait_for_function(f"{MOVE}.__harmaAt === 1", timeout=20_000)
            after = _point(page, MOVE, k, i)
            want = [(move[2] - move[0]) * px[0], (move[3] - move[1]) * px[1]]  # data units -> pixels
            assert abs(after[0] - before[0] - want[0]) < 1.5 and abs(after[1] - before[1] - want[1]) < 1.5
            assert abs(want[0]) + abs(want[1]) > 3  # the point did move on screen
            assert page.evaluate(f"{MOVE}.data[{k}].x[{i}]") == pytest.approx(move[2])

            # zoom one map: the others get the same axis ranges
            page.evaluate(f"Plotly.relayout({BASE}, {{'xaxis.range': [-0.5, 0.25], 'yaxis.range': [-0.3, 0.4]}})")
            page.wait_for_function(f"{ADAPTED}.layout.xaxis.range[1] === 0.25 && {MOVE}.layout.yaxis.range[0] === -0.3",
                                   timeout=10_000)
            assert page.evaluate(f"{BASE}.layout.xaxis.range") == [-0.5, 0.25]

            # hovering an item on one map rings the same item on the others
            page.evaluate(f"{BASE}.emit('plotly_hover', {{points: [{{customdata: 'i:3'}}], event: {{}}}})")
            ring = page.evaluate(f"""(() => {{ const d = {ADAPTED}.data; const r = d.find(t => t.name === 'harma-ring');
                const t = d.find(t => t.name === 'images'); const j = t.customdata.indexOf('i:3');
                return [r.x[0], t.x[j], r.y[0], t.y[j]]; }})()""")
            assert ring[0] == ring[1] and ring[2] == ring[3]

            # the map search highlights the matching points (dims the others) on every map
            page.locator("#map-search textarea, #map-search input").first.fill("a")
            page.locator("#map-search textarea, #map-search input").first.press("Enter")
            page.wait_for_function(f"{BASE}.data.some(t => Array.isArray(t.selectedpoints) && t.selectedpoints.length)",
                                   timeout=20_000)
            # another colour: the legend names the scene classes; the API keeps its inputs (model, lines)
            page.locator("#map-colour input").click()
            page.get_by_role("option", name="Scene class").click()
            page.wait_for_function(f"{BASE}.layout.meta.colour === 'scene'", timeout=20_000)
            assert "shape: caption" in page.locator("#baseline-plot .legendtext").all_text_contents()
            page.screenshot(path=str(tmp_path / "embedding.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    with httpx.Client(timeout=60) as http:
        assert len(_api(http, url.rstrip("/"), "embedding_view", [None, False])) == 5
