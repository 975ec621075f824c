"""The "Embedding space" tab: UMAP plots of both models' embeddings and the modality-gap numbers."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import gradio as gr
import torch

from harma.data import image_classes
from harma.errors import DatasetError
from harma.gap_ci import gap_with_intervals
from harma.retrieval import Retriever

from .common import USER_ERRORS, AppError, fail, progress_cb
from .galleries import Gallery
from .plots import figure, projection
from .state import AppState

GAP_ROWS = [  # harma.gap.modality_gap keys shown next to the plots: readable name, what it measures
    ("centroid_cosine", "Centroid cosine", "cosine of the two modality means"),
    ("alignment", "Alignment (matched pairs)",
     "mean ‖x − y‖² over matched image-caption pairs (Wang & Isola); lower = better aligned"),
    ("uniformity_joint", "Uniformity, both modalities", "log E exp(−2‖u − v‖²); lower = more spread out"),
    ("uniformity_image", "Uniformity, images", "the same within images"),
    ("uniformity_text", "Uniformity, captions", "the same within captions"),
    ("mean_cosine_image", "Mean cosine between images", "cone effect: how narrow the image cone is"),
    ("mean_cosine_text", "Mean cosine between captions", "cone effect: how narrow the caption cone is"),
    ("knn_modality_purity", "k-NN modality purity",
     "share of each point's 10 nearest neighbours of its own modality (chance ≈ 0.5): same-modality clustering"),
    ("linear_probe_accuracy", "Modality probe accuracy",
     "held-out accuracy of predicting the modality (0.5 = mixed, 1 = separated)"),
]
CI_ROWS = [  # harma.gap_ci keys, shown first, with 95% bootstrap intervals over images
    ("centroid_distance", "Centroid distance", "‖mean image − mean caption‖ (Liang et al. 2022); lower = closer"),
    ("relative_modality_gap", "Relative modality gap",
     "matched-pair dissimilarity relative to within-modality spread (Schrodi et al. 2025); 0 = no gap"),
    ("knn_scene_purity", "k-NN scene purity",
     "share of each point's 10 nearest neighbours (images and captions) showing its scene: semantic clustering"),
    ("knn_scene_chance", "Scene purity by chance", "what k-NN scene purity would be with random neighbours"),
]


def gap_rows(app: AppState, key: tuple, gallery: Gallery, retrievers: tuple[Retriever, Retriever],
             views: list[dict]) -> list:
    """[measure, baseline, adapted, meaning]: the bootstrap-interval numbers on every embedding of the
    split (when it has captions; cached under ``key``), then the projection's modality-gap numbers."""
    rows = []
    if gallery.pool is not None:
        try:
            classes = image_classes(gallery.split)[0]
        except DatasetError:  # no scene classes (uploads): no scene purity
            classes = None

        def compute() -> list[dict]:
            order = torch.tensor(gallery.pool.caption_to_text)
            return [gap_with_intervals(r.images.embeddings, r.captions.embeddings[order], gallery.split.text_to_image,
                                       classes) for r in retrievers]

        stats = app.cached(("gap_ci", *key), compute)
        rows += [[name, str(stats[0][key]), str(stats[1][key]), meaning] for key, name, meaning in CI_ROWS
                 if key in stats[0]]
    return rows + [[name, round(views[0]["gap"][key], 4), round(views[1]["gap"][key], 4), meaning]
                   for key, name, meaning in GAP_ROWS if key in views[0]["gap"]]


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
        rows = gap_rows(app, (app.model_key(model_key), gallery_key), gallery, (base, adapted), views)
        n_img, n_txt = len(views[0]["img_rows"]), len(views[0]["txt_rows"])
        note = (f"UMAP (cosine, random_state=0) of {n_img:,} images and {n_txt:,} distinct captions "
                f"(a seeded sample of at most {app.config.umap_points:,} per modality), fit separately per model. "
                "The numbers are computed on the original embeddings, not on the 2-D projection, which distorts "
                "global distances; brackets are 95% bootstrap intervals over images (200 seeded resamples).")
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
        gap_table = gr.Dataframe(headers=["measure", "baseline", "adapted", "what it measures"],
                                 label="Modality gap (original embedding space)", wrap=True)
        note = gr.Markdown(elem_classes="harma-note", label="note")
    return dict(tab=tab, base_plot=base_plot, adapted_plot=adapted_plot, gap_table=gap_table, note=note)


def wire(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State) -> None:
    """Opening the tab (API ``/embedding_view``)."""
    ui["tab"].select(partial(embedding_view, app), [model, gallery_key],
                     [ui["base_plot"], ui["adapted_plot"], ui["gap_table"], ui["note"]], api_name="embedding_view")
