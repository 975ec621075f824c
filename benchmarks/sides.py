"""Benchmark section ``sides``: a query's two models (baseline and adapted) at once, as the app answers
(``harma_app.common.both_sides``), against one after the other.

The app's own answer functions, called as a request reaches them (no HTTP, no browser), on its default
model and bundled demo gallery and scene: a text query (Text -> image), an uploaded image (Image -> text,
the image is encoded by both models) and a scene query (both models score every chip and draw a
heatmap). After one warm-up round the two ways alternate round by round; each row is the p50 over
``ROUNDS`` rounds of ``QUERIES``. The two forwards share the machine's cores, so the gain is smaller
than the slower side's share of the sum, and depends on the core count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Any, Callable
from unittest import mock

import torch

from .sections import ROOT, Skip

ROUNDS = 3
QUERIES = ["a bridge over a river", "many cars in a parking lot", "dense buildings", "trees beside a road",
           "many planes parked at an airport", "a baseball field", "a harbour with boats", "a freeway"]


def _one_after_the_other(fn: Callable, baseline: Any, adapted: Any) -> tuple:
    return fn("baseline", baseline), fn("adapted", adapted)


def _sides(impl: Callable, tabs: list) -> contextlib.ExitStack:
    """Every tab's ``both_sides`` replaced by ``impl`` now; leaving the returned stack puts them back."""
    stack = contextlib.ExitStack()
    for tab in tabs:
        stack.enter_context(mock.patch.object(tab, "both_sides", impl))
    return stack


def sides(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    from harma_app import common, state, tab_image_to_text, tab_scene, tab_text_to_image

    if not (ROOT / "assets" / "demo").is_dir():
        raise Skip("no bundled demo gallery (python -m training.build_demo)")
    config = dataclasses.replace(state.AppConfig.from_env(), device=str(device))
    app = state.AppState(config)
    gallery = app.default_gallery
    images = app.gallery(gallery).images
    queries = QUERIES[:2] if quick else QUERIES
    rounds = 1 if quick else ROUNDS

    def check(status: str) -> None:
        if status.startswith("⚠️"):
            raise Skip(f"the app answered with a warning: {status}")

    answers: dict[str, Callable[[int, str], str]] = {
        "text -> image": lambda i, q: tab_text_to_image.search_text(app, q, 8, None, gallery, progress=None)[-1],
        "image -> text (upload)": lambda i, q: tab_image_to_text.search_image(
            app, str(images[(37 * i) % len(images)]), 8, None, gallery, progress=None)[-1],
        "scene search": lambda i, q: tab_scene.search_scene(app, tab_scene.DEMO_KEY, q, 8, None, progress=None)[-1],
    }
    ways = {"at once": common.both_sides, "one after the other": _one_after_the_other}
    times: dict[tuple[str, str], list[float]] = {(a, w): [] for a in answers for w in ways}
    for r in range(rounds + 1):  # round 0 warms up: models, galleries, chip embeddings, first allocations
        for way, impl in ways.items():
            with _sides(impl, [tab_text_to_image, tab_image_to_text, tab_scene]):
                for name, answer in answers.items():
                    for i, q in enumerate(queries):
                        t0 = time.perf_counter()
                        check(answer(i, q + " " * r))  # a new text each round: no heatmap or tile from a cache
                        if r:
                            times[(name, way)].append(1000 * (time.perf_counter() - t0))
    rows = []
    for name in answers:
        at_once, serial = (statistics.median(times[(name, w)]) for w in ways)
        rows.append({"query": name, "at once p50 ms": round(at_once, 1), "one after the other p50 ms": round(serial, 1),
                     "saved": f"{1 - at_once / serial:.0%}", "n": len(times[(name, "at once")]),
                     "threads": torch.get_num_threads(), "model": app.model_key(None)})
    return rows
