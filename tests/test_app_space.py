"""The app as a Hugging Face Space runs it: its own files only (no ../shared beside it, no HARMA_*
variables), ``python app.py``; the bundled demo gallery answers ``/search_text`` for both models, from
its shipped embeddings, and (where ``/usr/bin/chromium`` exists) a visitor's query in the browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.browser import CHROMIUM, launch

ROOT = Path(__file__).resolve().parents[1]
SPACE_FILES = ("app.py", "harma_app", "harma", "assets", "checkpoints")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fresh_space_answers_from_the_bundled_gallery(tmp_path):
    from gradio_client import Client

    if not (ROOT / "assets" / "demo" / "test.csv").is_file() or not (ROOT / "checkpoints" / "ucm-harma").is_dir():
        pytest.skip("the bundled gallery or the default checkpoints are not in this checkout")
    space = tmp_path / "space"
    space.mkdir()
    for name in SPACE_FILES:
        src = ROOT / name
        (shutil.copytree(src, space / name, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy(src, space / name))
    assert not (space.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARMA_") and k != "PYTHONPATH"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1"], cwd=space,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {proc.stderr.read()[-800:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.time() < deadline, "the app did not start"
                time.sleep(0.2)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        base, adapted, status = client.predict("storage tanks", 8, api_name="/search_text")
        assert "⚠️" not in status and len(base) == len(adapted) == 8
        assert all(item["image"] for item in base + adapted)
        # answered from the embeddings shipped in assets/demo/precomputed: nothing was encoded or cached
        # (stale shipped files, after new checkpoints without python -m harma_app.precompute, fail here)
        assert not list((space / ".cache" / "harma-app" / "index").glob("*/index.json"))
        status = client.predict(None, None, api_name="/status")
        assert "bundled demo gallery" in status and "210 images" in status
        if CHROMIUM.is_file():
            _a_visitor_searches(f"http://127.0.0.1:{port}/")
    finally:
        proc.terminate()
        proc.wait(30)


def _a_visitor_searches(url: str) -> None:
    """In headless Chromium: the page names the bundled gallery, and a typed query fills both galleries."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_text("bundled demo gallery").first.wait_for(timeout=60_000)
            page.locator("#query textarea").fill("many planes parked at an airport")
            page.locator("#search").click()
            for gallery in ("#baseline-gallery", "#adapted-gallery"):
                page.locator(f"{gallery} img").nth(7).wait_for(timeout=60_000)
            assert "⚠️" not in page.locator("#status").inner_text()
            assert page.locator("#adapted-gallery").get_by_text("Adapted (HarMA)").is_visible()
        finally:
            browser.close()
