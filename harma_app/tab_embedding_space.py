"""The "Embedding space" tab: UMAP plots of both models' embeddings and the modality-gap numbers."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import gradio as gr

from .common import USER_ERRORS, AppError, fail, progress_cb
from .plots import figure, projection
from .state import AppState

GAP_ROWS = [  # harma.gap.modality_gap keys shown next to the plots, with what they measure
    ("centroid_distance", "‖mean image − mean caption‖ (Liang et al. 2022); lower = modalities closer"),
    ("centroid_cosine", "cosine of the two modality means"),
    ("alignment", "mean ‖x − y‖² over matched image-caption pairs (Wang & Isola); lower = better aligned"),
    ("uniformity_joint", "log E exp(−2‖u − v‖²) over both modalities; lower = more spread out"),
    ("uniformity_image", "the same within images"),
    ("uniformity_text", "the same within captions"),
    ("mean_cosine_image", "mean cosine between images (cone effect)"),
    ("mean_cosine_text", "mean cosine between captions (cone effect)"),
    ("knn_modality_purity", "share of each point's 10 nearest neighbours of its own modality (chance ≈ 0.5)"),
    ("linear_probe_accuracy", "held-out accuracy of predicting the modality (0.5 = mixed, 1 = separated)"),
]


def embedding_view(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
                   progress: Any = gr.Progress()) -> tuple[Any, Any, list, str]:
    """UMAP plots (baseline, adapted) and the modality-gap table [metric, baseline, adapted, meaning]."""
    try:
        gallery = app.gallery(gallery_key)
        base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress))
        progress(None, desc="UMAP projection (cached after the first time)")
        views = app.cached(("view", app.model_key(model_key), gallery_key), lambda: [
            projection(r, gallery, app.config.umap_points, app.cache_dir) for r in (base, adapted)])
        figs = [figure(v, r, gallery) for v, r in zip(views, (base, adapted))]
        rows = [[name, round(views[0]["gap"][name], 4), round(views[1]["gap"][name], 4), meaning]
                for name, meaning in GAP_ROWS if name in views[0]["gap"]]
        n_img, n_txt = len(views[0]["img_rows"]), len(views[0]["txt_rows"])
        note = (f"UMAP (cosine, random_state=0) of {n_img:,} images and {n_txt:,} distinct captions "
                f"(a seeded sample of at most {app.config.umap_points:,} per modality), fit separately per model. "
                "The numbers are computed on all original embeddings, not on the 2-D projection, which distorts "
                "global distances.")
        if not rows:
            note += " Modality-gap numbers need a gallery with captions."
        return figs[0], figs[1], rows, note
    except (AppError, *USER_ERRORS) as e:
        return None, None, [], fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``); computed when the tab is opened."""
    with gr.Tab("Embedding space", id="space") as tab:
        with gr.Row():
            base_plot = gr.Plot(label="Baseline (zero-shot)", elem_id="baseline-plot")
            adapted_plot = gr.Plot(label="Adapted (HarMA)", elem_id="adapted-plot")
        gap_table = gr.Dataframe(headers=["metric", "baseline", "adapted", "what it measures"],
                                 label="Modality gap (original embedding space)", wrap=True)
        note = gr.Markdown(elem_classes="harma-note", label="note")
    return dict(tab=tab, base_plot=base_plot, adapted_plot=adapted_plot, gap_table=gap_table, note=note)


def wire(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State) -> None:
    """Opening the tab (API ``/embedding_view``)."""
    ui["tab"].select(partial(embedding_view, app), [model, gallery_key],
                     [ui["base_plot"], ui["adapted_plot"], ui["gap_table"], ui["note"]], api_name="embedding_view")
