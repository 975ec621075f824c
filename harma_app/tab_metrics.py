"""The "Metrics" tab: R@1/5/10 in both directions and mR of both models on the gallery's split."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import gradio as gr
import torch

from harma.metrics import METRIC_KEYS, retrieval_metrics
from harma.retrieval import Retriever

from .common import USER_ERRORS, AppError, fail, progress_cb
from .galleries import Gallery
from .indexes import needs_every_embedding
from .state import AppState

MAX_METRIC_CELLS = 10**8  # image x caption similarities the Metrics tab computes in memory


def split_similarity(r: Retriever, gallery: Gallery) -> torch.Tensor:
    """(N_img, N_captions) cosine similarities of the gallery's split, every caption in file order (a
    caption's embedding is its cleaned text's, as in evaluation)."""
    return r.images.embeddings @ r.captions.embeddings[torch.tensor(gallery.pool.caption_to_text)].T


def check_scoreable(gallery: Gallery, what: str, tab: str) -> None:
    """Refuse a gallery whose split cannot be scored in the app (tab ``tab``): an archive index, no
    captions, or too large."""
    needs_every_embedding(gallery, tab)
    if gallery.pool is None:
        raise AppError(f"{gallery.name} has no captions, so {what} cannot be computed")
    if gallery.split.num_images * gallery.split.num_captions > MAX_METRIC_CELLS:
        raise AppError(f"{gallery.name} is too large for the in-app {what}; use `python -m training.evaluate`")


def metrics_table(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
                  progress: Any = gr.Progress()) -> tuple[list, str]:
    """R@1/5/10 in both directions and mR (percent) of baseline and adapted on the gallery's split."""
    try:
        gallery = app.gallery(gallery_key)
        check_scoreable(gallery, "R@K", "Metrics")
        base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress))

        def compute() -> list[list]:
            rows = []
            for name, r in (("baseline (zero-shot)", base), ("adapted", adapted)):
                m = retrieval_metrics(split_similarity(r, gallery), gallery.split.text_to_image)
                rows.append([name] + [round(m[key], 2) for key in METRIC_KEYS])
            return rows

        rows = app.cached(("metrics", app.model_key(model_key), gallery_key), compute)
        note = (f"Split scored: **{gallery.split.name}**, {gallery.split.num_images:,} images, "
                f"{gallery.split.num_captions:,} captions (cleaned as in evaluation; an image's i2t rank is the best "
                "rank among its captions; tied scores count at their expected rank, so the order of the file does "
                "not matter). Same protocol as `python -m training.evaluate --baseline`. If the adapters were "
                "trained on this split, the numbers measure fit, not generalisation.")
        return rows, note
    except (AppError, *USER_ERRORS) as e:
        return [], fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``); computed when the tab is opened."""
    with gr.Tab("Metrics", id="metrics") as tab:
        table = gr.Dataframe(headers=["model"] + [m.replace("_", " ") for m in METRIC_KEYS],
                             label="Retrieval on the current split (%)")
        note = gr.Markdown(elem_classes="harma-note", label="note")
    return dict(tab=tab, table=table, note=note)


def wire(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State) -> None:
    """Opening the tab (API ``/metrics``)."""
    ui["tab"].select(partial(metrics_table, app), [model, gallery_key], [ui["table"], ui["note"]], api_name="metrics")
