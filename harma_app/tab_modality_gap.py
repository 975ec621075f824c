"""The "Modality gap" tab: the modality-gap literature's figures, live, baseline next to adapted, computed in
the original embedding space (:mod:`harma.gap_figures`) from the cached embeddings of the gallery's split.
plotly is imported when a figure is drawn, not with the app."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import gradio as gr
import torch

from harma.gap_figures import gap_figures
from harma.io import arrays_key, cached_json
from harma.retrieval import Retriever

from .common import USER_ERRORS, AppError, fail, progress_cb
from .galleries import Gallery
from .state import AppState
from .tab_metrics import check_scoreable

FIGURES_VERSION = 2  # bump when harma.gap_figures' numbers change (invalidates the disk cache)
FIGURES_DIR = "gap-figures"  # under the cache folder: the numbers of both models, by a hash of their inputs
BASE_COLOR, ADAPTED_COLOR = "#6b7280", "#2563eb"  # baseline grey, adapted blue, in every figure
MATCHED_COLOR, UNMATCHED_COLOR = "#16a34a", "#9ca3af"
REOPEN = "Open this tab again to compute it for the selected model."
WHAT = {  # one line under each figure: what it shows
    "histogram": "**Matched vs unmatched cosine** (Liang et al., NeurIPS 2022): the cosine of every caption with "
                 "its own image (green) and with every other image (grey). Alignment moves green to the right, "
                 "away from grey; a gap keeps both far below 1.",
    "dimensions": "**The dimensions that carry the gap** (Schrodi et al., ICLR 2025): each embedding dimension's "
                  "share (mean image − mean caption)² of the squared centroid distance, largest first. Tall "
                  "first bars: a few dimensions carry the gap.",
    "shift": "**R@1 as the images shift along the gap** (Liang et al. 2022, Fig. 3-style): every image embedding "
             "moved to normalize(x − λ·(mean image − mean caption)); λ = 0 is the model as it is, λ = 1 puts the "
             "image centroid on the caption centroid. A peak away from 0 means closing the gap alone would change "
             "retrieval.",
    "neighbours": "**Captions among an image's nearest neighbours, per scene class**: the share of each image's "
                  "10 nearest neighbours (cosine, among all images and captions) that are captions; the dotted "
                  "line is the captions' share of all points (perfect mixing). Near 0: images cluster with images.",
}


def figures_data(app: AppState, key: tuple, gallery: Gallery, retrievers: tuple[Retriever, Retriever]) -> dict:
    """``{"baseline": ..., "adapted": ...}``: :func:`harma.gap_figures.gap_figures` of each model on every
    image and caption of the split; kept in memory under ``key`` and on disk under a hash of the exact
    embeddings, pairs and classes."""
    split = gallery.split
    rows = torch.tensor(gallery.pool.caption_to_text)
    imgs = [r.images.embeddings for r in retrievers]
    caps = [r.captions.embeddings[rows] for r in retrievers]
    classes = gallery.classes

    def compute() -> dict:
        return {side: gap_figures(i, c, split.text_to_image, classes)
                for side, i, c in zip(("baseline", "adapted"), imgs, caps)}

    def from_disk() -> dict:
        settings = {"v": FIGURES_VERSION, "t2i": list(split.text_to_image), "classes": classes}
        name = arrays_key([t.contiguous().numpy() for t in imgs + caps], settings)
        return cached_json(app.cache_dir / FIGURES_DIR / f"{name}.json", compute)

    return app.cached(("gap_figures", *key), from_disk)


def _layout(fig, title: str, height: int = 340) -> None:
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=height, template="plotly_white",
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2))


def histogram_figure(data: dict, adapted_name: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    hist = [data[s]["histogram"] for s in ("baseline", "adapted")]
    titles = [f"{name}: mean matched {h['matched_mean']:.3f}, unmatched {h['unmatched_mean']:.3f}"
              for name, h in zip(("Baseline (zero-shot)", adapted_name), hist)]
    fig = make_subplots(1, 2, shared_yaxes=True, subplot_titles=titles)
    for col, h in enumerate(hist, 1):
        centres = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:])]
        width = h["edges"][1] - h["edges"][0]
        for what, color in (("unmatched", UNMATCHED_COLOR), ("matched", MATCHED_COLOR)):
            fig.add_trace(go.Bar(x=centres, y=h[what], width=width, marker_color=color, opacity=0.6,
                                 name=f"{what} pairs", legendgroup=what, showlegend=col == 1,
                                 hovertemplate="cosine %{x:.3f}: density %{y:.2f}<extra></extra>"), 1, col)
    fig.update_layout(barmode="overlay")
    fig.update_annotations(font_size=12)  # the subplot titles
    fig.update_xaxes(title_text="image–caption cosine")
    fig.update_yaxes(title_text="density", col=1)
    gap = [h["matched_mean"] - h["unmatched_mean"] for h in hist]
    _layout(fig, f"Matched minus unmatched mean cosine: {gap[0]:.3f} (baseline) → {gap[1]:.3f} (adapted)", 360)
    return fig


def dimensions_figure(data: dict, adapted_name: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    sides = (("baseline", "Baseline (zero-shot)", BASE_COLOR), ("adapted", adapted_name, ADAPTED_COLOR))
    for side, name, color in sides:
        d = data[side]["dimensions"]
        ranks = list(range(1, len(d["top_dims"]) + 1))
        fig.add_trace(go.Bar(x=ranks, y=[100 * s for s in d["top_shares"]], name=name, marker_color=color,
                             text=[f"d{i}" for i in d["top_dims"]], textposition="outside", cliponaxis=False,
                             customdata=d["top_terms"],
                             hovertemplate="dimension %{text}: %{y:.1f}% (term %{customdata:.4f})<extra></extra>"))
    b, a = data["baseline"]["dimensions"], data["adapted"]["dimensions"]
    fig.update_xaxes(title_text="dimension, by its share (largest first; label: its index)", dtick=1)
    fig.update_yaxes(title_text="% of squared centroid distance")
    _layout(fig, f"Squared centroid distance {b['squared_distance']:.3f} → {a['squared_distance']:.3f}; dimensions "
                 f"for half of it: {b['dims_for_50']} → {a['dims_for_50']}, for 90%: {b['dims_for_90']} → "
                 f"{a['dims_for_90']}")
    return fig


def shift_figure(data: dict, adapted_name: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for side, name, color in (("baseline", "Baseline", BASE_COLOR), ("adapted", adapted_name, ADAPTED_COLOR)):
        s = data[side]["shift"]
        for key, dash, label in (("t2i_R@1", "solid", "text → image"), ("i2t_R@1", "dot", "image → text")):
            fig.add_trace(go.Scatter(x=s["lambdas"], y=s[key], mode="lines+markers", name=f"{name}, {label}",
                                     line=dict(color=color, dash=dash), marker=dict(size=5),
                                     hovertemplate="λ = %{x}: R@1 %{y:.1f}%<extra></extra>"))
    for x, text in ((0, "as trained"), (1, "centroids met")):
        fig.add_vline(x=x, line=dict(color="#d1d5db", dash="dash"), annotation_text=text,
                      annotation_position="top")
    fig.update_xaxes(title_text="λ: shift of every image embedding along −(mean image − mean caption)")
    fig.update_yaxes(title_text="R@1 (%)")
    _layout(fig, "R@1 as the image embeddings shift along the gap vector", 380)
    return fig


def neighbours_figure(data: dict, adapted_name: str):
    import plotly.graph_objects as go

    b, a = data["baseline"]["neighbours"], data["adapted"]["neighbours"]
    names = (b["classes"] or []) + ["all images"]
    fig = go.Figure()
    for n, name, color in ((b, "Baseline", BASE_COLOR), (a, adapted_name, ADAPTED_COLOR)):
        values = [100 * v for v in n["shares"]] + [100 * n["all"]]
        fig.add_trace(go.Bar(y=names, x=values, orientation="h", name=name, marker_color=color,
                             hovertemplate="%{y}: %{x:.1f}% captions<extra></extra>"))
    fig.add_vline(x=100 * b["chance"], line=dict(color="#111827", dash="dot"), annotation_text="perfect mixing",
                  annotation_position="top left")
    fig.update_layout(barmode="group", yaxis=dict(autorange="reversed"))
    fig.update_xaxes(title_text=f"% of an image's {b['k']} nearest neighbours that are captions", range=[0, 100])
    _layout(fig, f"Captions among image neighbours: {100 * b['all']:.1f}% → {100 * a['all']:.1f}% "
                 f"(perfect mixing: {100 * b['chance']:.0f}%)", max(340, 60 + 34 * len(names)))
    return fig


def modality_gap_view(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
                      progress: Any = gr.Progress()) -> tuple[Any, Any, Any, Any, str]:
    """The four figures (histograms, gap dimensions, R@1 under a shift, neighbours per class) and a note."""
    try:
        gallery = app.gallery(gallery_key)
        check_scoreable(gallery, "modality-gap figures", "Modality gap")
        if gallery.split.num_images < 2 or gallery.split.num_captions < 2:
            raise AppError(f"{gallery.name} needs at least 2 images and 2 captions for the modality-gap figures")
        retrievers = app.retrievers(model_key, gallery_key, progress_cb(progress))
        data = figures_data(app, (app.model_key(model_key), gallery_key), gallery, retrievers)
        name = app.adapted_label(model_key)
        figs = (histogram_figure(data, name), dimensions_figure(data, name), shift_figure(data, name),
                neighbours_figure(data, name))
        note = (f"Split: **{gallery.split.name}**, {gallery.split.num_images:,} images and "
                f"{gallery.split.num_captions:,} captions, every one of them; computed on the original embeddings "
                "(cosine), not on a 2-D map. R@1 counts tied scores at their expected rank, as the Metrics tab.")
        if not gallery.classes:
            note += " The gallery has no scene classes, so the last figure shows all images together."
        return (*figs, note)
    except (AppError, *USER_ERRORS) as e:
        return None, None, None, None, fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``); computed when the tab is opened."""
    plots = {}
    with gr.Tab("Modality gap", id="gap") as tab:
        note = gr.Markdown(elem_classes="harma-note", label="note", elem_id="gap-note")
        for key in WHAT:
            plots[key] = gr.Plot(show_label=False, elem_id=f"gap-{key}")
            gr.Markdown(WHAT[key], elem_classes="harma-note")
    return dict(tab=tab, note=note, **plots)


def outputs(ui: dict[str, Any]) -> list:
    return [*(ui[key] for key in WHAT), ui["note"]]


def wire(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State) -> None:
    """Opening the tab (API ``/modality_gap``)."""
    ui["tab"].select(partial(modality_gap_view, app), [model, gallery_key], outputs(ui), api_name="modality_gap")


def on_model_switch(app: AppState, tab: str, model_key: Optional[str], gallery_key: Optional[str],
                    progress: Any = None) -> tuple[Any, Any, Any, Any, str]:
    """After a model switch: the tab recomputed for the new model when it is the open one (``tab`` == "gap"),
    else cleared with a note (it recomputes when opened): never the previous model's figures."""
    if tab == "gap":
        return modality_gap_view(app, model_key, gallery_key, progress)
    return None, None, None, None, REOPEN


def follow(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State, current: gr.State) -> None:
    """Registers :func:`on_model_switch` on the model picker; ``current`` names the open tab."""
    def on_switch(tab: str, model_key: Optional[str], key: Optional[str], progress=gr.Progress()):
        return on_model_switch(app, tab, model_key, key, progress)

    model.change(on_switch, [current, model, gallery_key], outputs(ui), api_visibility="private")
