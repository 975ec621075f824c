"""A query's two models (baseline and adapted) answer at the same time in every tab
(:func:`harma_app.common.both_sides`)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from harma.data import load_split
from harma.retrieval import Retriever
from harma_app import blocks, common
from harma_app import state as app_state
from harma_app import tab_image_to_text as i2t
from harma_app import tab_text_to_image as t2i
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")


def meeting(monkeypatch, owner, name: str) -> None:
    """``owner.name`` waits (10 s at most) for a second call: two models run one after the other break it."""
    meet, real = threading.Barrier(2), getattr(owner, name)

    def both_here(*args, **kwargs):
        meet.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, both_here)


def test_both_sides_run_at_once_and_the_baseline_error_is_raised_after_both():
    meet = threading.Barrier(2)
    met = common.both_sides(lambda side, x: (side, x, meet.wait(10) in (0, 1)), 1, 2)
    assert met == (("baseline", 1, True), ("adapted", 2, True))
    finished = []

    def baseline_fails(side, x):
        if side == "baseline":
            raise ValueError("the baseline failed")
        time.sleep(0.2)
        finished.append(side)

    with pytest.raises(ValueError, match="the baseline failed"):
        common.both_sides(baseline_fails, 1, 2)
    assert finished == ["adapted"]  # no work of the query is left running when the error reaches the tab


def test_every_query_served_at_once_runs_its_two_sides_at_once(setup):
    """The app serves ``query_concurrency`` queries at once; with more than the default, each still runs
    its baseline and adapted sides together (the adapted sides' pool follows the setting)."""
    n = common.QUERY_CONCURRENCY + 4
    blocks.build_demo(dataclasses.replace(setup["config"], query_concurrency=n))
    try:
        meet, answered = threading.Barrier(2 * n), []  # every side of every query waits for all the others
        queries = [threading.Thread(target=lambda: answered.append(common.both_sides(
            lambda side, x: meet.wait(10) is not None, 1, 2))) for _ in range(n)]
        for q in queries:
            q.start()
        for q in queries:
            q.join(15)
        assert answered == [(True, True)] * n and not meet.broken
    finally:
        common.size_sides(common.QUERY_CONCURRENCY)


def test_both_models_answer_a_query_at_once(setup, monkeypatch):
    """Text -> image, an uploaded image and a picked one: each query's two models run at the same time."""
    state = app_state.AppState(setup["config"])
    split = load_split(setup["data"], "train")
    for name in ("search_text", "search_image", "search_gallery_image"):
        meeting(monkeypatch, Retriever, name)
    base, adapted, status = t2i.search_text(state, "a red square on a grey field", 3, None, "data")
    assert len(base) == len(adapted) == 3 and "⚠️" not in status, status
    for answer in (i2t.search_image(state, str(split.images[0]), 3, None, "data"),
                   i2t.pick_image(state, 0, 3, None, "data")):
        assert len(answer[1]) == len(answer[2]) == 3 and "⚠️" not in answer[3], answer[3]
