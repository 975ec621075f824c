"""The embedding-space maps: both models' images and captions in one 2-D frame
(:func:`harma.projection.aligned_projection`, cached on disk), drawn side by side with the same axes
and as one animated figure whose slider moves every point from its baseline to its adapted place.
plotly is imported when a figure is drawn, not with the app."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from harma.projection import ALIGNED, aligned_projection
from harma.retrieval import Retriever, content_fingerprint, model_identity

from .galleries import Gallery

IMAGE_COLOR, CAPTION_COLOR = "#2563eb", "#f97316"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363", "#9c9ede", "#cedb9c", "#e7ba52", "#ad494a"]
STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the animated figure's frames, baseline (0) to adapted (1)


def layout_key(retrievers: tuple[Retriever, Retriever], gallery: Gallery, max_points: int, seed: int = 0) -> str:
    """What a map depends on, independent of the machine: both models' identities (weights by sha256),
    the gallery's image bytes and captions, and the sampling settings. Names a precomputed map."""
    models = [r.identity or model_identity(r.model) for r in retrievers]
    h = hashlib.sha256(json.dumps({"v": 1, "models": models, "points": max_points, "seed": seed}, sort_keys=True,
                                  default=str).encode())
    h.update(content_fingerprint(gallery.images).encode())
    for caption in (gallery.pool.texts if gallery.pool else []):
        h.update(caption.encode() + b"\x00")
    return h.hexdigest()[:32]


def aligned_view(retrievers: tuple[Retriever, Retriever], gallery: Gallery, max_points: int, cache_dir: Path,
                 precomputed: Optional[Path] = None, seed: int = 0) -> dict:
    """Both models' layouts of the same seeded sample of images and distinct captions, in one frame: a
    map shipped in ``precomputed`` for exactly these models and this gallery, else computed (and cached)."""
    if precomputed is not None and precomputed.is_dir():
        path = precomputed / f"aligned-{layout_key(retrievers, gallery, max_points, seed)}.json"
        if path.is_file():
            return json.loads(path.read_text())

    def parts(r: Retriever):
        return r.images.embeddings, (r.captions.embeddings if r.captions is not None else None)

    return aligned_projection(parts(retrievers[0]), parts(retrievers[1]), max_points=max_points,
                              cache_dir=cache_dir, seed=seed)


def method_note(view: dict) -> str:
    if view["method"] == ALIGNED:
        return ("one layout for both models: umap-learn's AlignedUMAP (cosine, random_state=0), each point tied to "
                "the same item in the other model's layout")
    return ("each model's own 2-D layout (PCA), the adapted one rotated and scaled onto the baseline's "
            "(orthogonal Procrustes on the shared items): umap-learn was unavailable or the set too small")


def _points(view: dict, t: float) -> list[tuple[float, float]]:
    return [((1 - t) * b[0] + t * a[0], (1 - t) * b[1] + t * a[1]) for b, a in zip(view["base"], view["adapted"])]


def _traces(view: dict, xy: list, gallery: Gallery, r: Retriever, classes: Optional[list[str]], lines: bool) -> list:
    """Scatter traces: per scene class (or per modality without classes), images as circles and
    captions as crosses; optionally a grey segment from each caption to each of its images shown."""
    import plotly.graph_objects as go

    n = len(view["img_rows"])
    img = [(xy[k], i, gallery.images[i].name) for k, i in enumerate(view["img_rows"])]
    pool = gallery.pool
    cap = [(xy[n + k], j, r.captions.metadata[j]["caption"][:120]) for k, j in enumerate(view["txt_rows"])]
    cap_class = {j: classes[pool.images[j][0]] for _, j, _ in cap} if classes and pool else {}
    groups = sorted(set(classes[i] for _, i, _ in img)) if classes else [None]
    traces = []
    if lines and pool is not None:
        where = {i: xy[k] for k, i in enumerate(view["img_rows"])}
        seg_x, seg_y = [], []
        for p, j, _ in cap:
            for i in pool.images[j]:
                if i in where:
                    seg_x += [p[0], where[i][0], None]
                    seg_y += [p[1], where[i][1], None]
        traces.append(go.Scatter(x=seg_x, y=seg_y, mode="lines", line=dict(color="#9ca3af", width=0.6),
                                 hoverinfo="skip", name="image–caption", opacity=0.5))
    for g, group in enumerate(groups):
        color = PALETTE[g % len(PALETTE)] if group is not None else None
        pick_i = [p for p in img if group is None or classes[p[1]] == group]
        pick_c = [p for p in cap if group is None or cap_class.get(p[1]) == group]
        name = group if group is not None else "images"
        traces.append(go.Scatter(x=[p[0][0] for p in pick_i], y=[p[0][1] for p in pick_i], mode="markers",
                                 customdata=[f"i:{p[1]}" for p in pick_i], name=name, legendgroup=name,
                                 hovertext=[p[2] + (f" ({group})" if group else "") for p in pick_i],
                                 hoverinfo="text",
                                 marker=dict(size=7, symbol="circle", color=color or IMAGE_COLOR, opacity=0.8)))
        if pick_c:
            traces.append(go.Scatter(x=[p[0][0] for p in pick_c], y=[p[0][1] for p in pick_c], mode="markers",
                                     customdata=[f"t:{p[1]}" for p in pick_c],
                                     name=f"{name} captions" if group else "captions", legendgroup=name,
                                     showlegend=group is None, hovertext=[p[2] for p in pick_c], hoverinfo="text",
                                     marker=dict(size=7, symbol="x-thin", opacity=0.8, color=color or CAPTION_COLOR,
                                                 line=dict(width=1.5, color=color or CAPTION_COLOR))))
    return traces


def _frame_layout(view: dict, title: Optional[str]) -> dict:
    xs = [p[0] for p in view["base"] + view["adapted"]]
    ys = [p[1] for p in view["base"] + view["adapted"]]
    pad_x, pad_y = 0.05 * (max(xs) - min(xs) or 1), 0.05 * (max(ys) - min(ys) or 1)
    return dict(title=dict(text=title, font=dict(size=13)) if title else None, height=460,
                margin=dict(l=10, r=10, t=40, b=10), template="plotly_white", dragmode="lasso",
                legend=dict(font=dict(size=10), itemsizing="constant"),
                xaxis=dict(range=[min(xs) - pad_x, max(xs) + pad_x], showticklabels=False, title=None),
                yaxis=dict(range=[min(ys) - pad_y, max(ys) + pad_y], showticklabels=False, title=None))


def layout_figure(view: dict, which: str, gallery: Gallery, r: Retriever, classes: Optional[list[str]],
                  lines: bool = False):
    """One model's layout (``which`` is "base" or "adapted"), on the axes both panels share."""
    import plotly.graph_objects as go

    fig = go.Figure(_traces(view, view[which], gallery, r, classes, lines))
    fig.update_layout(**_frame_layout(view, None))  # the panel's label names the model
    return fig


def move_figure(view: dict, gallery: Gallery, r: Retriever, classes: Optional[list[str]], lines: bool = False):
    """Every point moving from its baseline place (slider at 0) to its adapted place (1), with play."""
    import plotly.graph_objects as go

    frames = [go.Frame(data=_traces(view, _points(view, t), gallery, r, classes, lines), name=f"{t:g}")
              for t in STEPS]
    fig = go.Figure(data=frames[0].data, frames=frames)
    steps = [dict(method="animate", label="baseline" if t == 0 else "adapted" if t == 1 else f"{t:g}",
                  args=[[f"{t:g}"], dict(mode="immediate", frame=dict(duration=300, redraw=True),
                                         transition=dict(duration=250))]) for t in STEPS]
    fig.update_layout(**_frame_layout(view, "Baseline → adapted: drag the slider or press play"),
                      sliders=[dict(active=0, steps=steps, x=0.1, len=0.85, y=0, pad=dict(t=30))],
                      updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=0, xanchor="left", yanchor="top",
                                        pad=dict(t=30), buttons=[dict(label="▶", method="animate", args=[
                                            None, dict(frame=dict(duration=500, redraw=True), fromcurrent=True,
                                                       transition=dict(duration=400))])])])
    fig.update_layout(height=520)
    return fig
