"""The embedding-space maps: both models' images and captions in one 2-D frame
(:func:`harma.projection.aligned_projection`, cached on disk), drawn side by side with the same axes
and as one figure whose slider and play button move every point from its baseline to its adapted place.

Gradio's Plotly component draws with ``Plotly.react``, which drops ``frames``: the slider steps are
``update`` calls carrying the in-between coordinates themselves, and play (a ``skip`` button) is run by
linked_maps.js with ``Plotly.animate`` on ``layout.meta.move``. Points are coloured by modality (the
default), scene class, retrieval outcome under that model or rank change between the models; each
modality's centroid and the gap vector between them are drawn on every map. plotly is imported when a
figure is drawn, not with the app."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from harma.map_fidelity import map_fidelity
from harma.projection import ALIGNED, MAP_NEIGHBORS, PROJECTION_VERSION, SEPARATE, aligned_projection
from harma.retrieval import Retriever, content_fingerprint, model_identity

from .galleries import Gallery

IMAGE_COLOR, CAPTION_COLOR = "#1d4ed8", "#ea580c"  # two strong colours: blue images, orange captions
SYMBOL = {"i": "circle", "t": "diamond"}
# plotly's Alphabet (26 distinguishable colours), then Dark24 for galleries with more scene classes
PALETTE = ["#AA0DFE", "#3283FE", "#85660D", "#782AB6", "#565656", "#1C8356", "#16FF32", "#F7E1A0", "#E2E2E2",
           "#1CBE4F", "#C4451C", "#DEA0FD", "#FE00FA", "#325A9B", "#FEAF16", "#F8A19F", "#90AD1C", "#F6222E",
           "#1CFFCE", "#2ED9FF", "#B10DA1", "#C075A6", "#FC1CBF", "#B00068", "#FBE426", "#FA0087",
           "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86", "#EB663B",
           "#511CFB", "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE", "#862A16", "#A777F1"]
COLOUR_BY = {  # colour-by choices: key -> label shown in the app
    "modality": "Modality (image vs caption)",
    "scene": "Scene class",
    "outcome": "Retrieval outcome under that model",
    "rank": "Rank change, baseline → adapted",
}
OUTCOMES = [("ground truth at rank 1", "#16a34a"), ("ground truth in the top 10", "#f59e0b"),
            ("missed (not in the top 10)", "#dc2626")]
CHANGES = [("ranked higher by adapted", "#16a34a"), ("same rank", "#9ca3af"), ("ranked lower by adapted", "#dc2626")]
STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # the move figure's slider, baseline (0) to adapted (1)
RING = "harma-ring"  # the trace linked_maps.js moves onto the hovered or picked item


def layout_key(retrievers: tuple[Retriever, Retriever], gallery: Gallery, max_points: int, seed: int = 0) -> str:
    """What a map depends on, independent of the machine: both models' identities (weights by sha256),
    the gallery's image bytes and captions, and the sampling settings. Names a precomputed map."""
    models = [r.identity or model_identity(r.model) for r in retrievers]
    h = hashlib.sha256(json.dumps({"v": 2, "models": models, "points": max_points, "seed": seed,
                                   "projection": [PROJECTION_VERSION, MAP_NEIGHBORS]},  # a new projection: not shipped
                                  sort_keys=True, default=str).encode())
    h.update(content_fingerprint(gallery.images).encode())
    for caption in (gallery.pool.texts if gallery.pool else []):
        h.update(caption.encode() + b"\x00")
    return h.hexdigest()[:32]


def aligned_view(retrievers: tuple[Retriever, Retriever], gallery: Gallery, max_points: int, cache_dir: Path,
                 precomputed: Optional[Path] = None, seed: int = 0) -> dict:
    """Both models' layouts of the same seeded sample of images and distinct captions, in one frame: a
    map shipped in ``precomputed`` for exactly these models and this gallery, else computed (and cached);
    with ``"fidelity"``, :func:`fidelity` of both layouts (shipped with the map, or computed here)."""
    def parts(r: Retriever):
        return r.images.embeddings, (r.captions.embeddings if r.captions is not None else None)

    view = None
    if precomputed is not None and precomputed.is_dir():
        path = precomputed / f"aligned-{layout_key(retrievers, gallery, max_points, seed)}.json"
        if path.is_file():
            view = json.loads(path.read_text())
    if view is None:
        view = aligned_projection(parts(retrievers[0]), parts(retrievers[1]), max_points=max_points,
                                  cache_dir=cache_dir, seed=seed)
    if "fidelity" not in view:  # shipped with the map by python -m harma_app.precompute
        view = {**view, "fidelity": fidelity(view, gallery, retrievers, gallery.classes)}
    return view


def fidelity(view: dict, gallery: Gallery, retrievers: tuple[Retriever, Retriever],
             classes: Optional[list[str]]) -> list[dict]:
    """:func:`harma.map_fidelity.map_fidelity` of each model's map (baseline, adapted), on the mapped
    sample; [] without captions."""
    if len(view["txt_rows"]) < 2 or len(view["img_rows"]) < 2 or gallery.pool is None:
        return []
    n, img_rows, txt_rows = len(view["img_rows"]), view["img_rows"], view["txt_rows"]
    cls_i = [classes[i] for i in img_rows] if classes else None
    cls_t = [classes[gallery.pool.images[j][0]] for j in txt_rows] if classes else None
    out = []
    for r, which in zip(retrievers, ("base", "adapted")):
        xy = np.asarray(view[which], dtype=np.float64)
        out.append(map_fidelity(r.images.embeddings[img_rows], r.captions.embeddings[txt_rows], xy[:n], xy[n:],
                                cls_i, cls_t))
    return out


def method_note(view: dict) -> str:
    if view["method"] == SEPARATE:
        return (f"each model's own UMAP (cosine, {MAP_NEIGHBORS} neighbours, random_state=0; the adapted one started "
                "from the baseline layout), then rotated, "
                "scaled and shifted onto the baseline's (orthogonal Procrustes on the shared items); the baseline "
                "map depends on the baseline model only. Read the groups, not single points: refitting the same "
                "embeddings moves points too (on the demo gallery by about a quarter of the move between the models)")
    if view["method"] == ALIGNED:
        return ("one layout for both models: umap-learn's AlignedUMAP (cosine, random_state=0), each point tied to "
                "the same item in the other model's layout")
    return ("each model's own 2-D layout (PCA), the adapted one rotated and scaled onto the baseline's "
            "(orthogonal Procrustes on the shared items): umap-learn was unavailable or the set too small")


def projection_label(view: dict) -> str:
    """The short name of the projection, written on every map."""
    return {SEPARATE: "projection: UMAP per model + Procrustes", ALIGNED: "projection: AlignedUMAP"}.get(
        view["method"], "projection: PCA per model + Procrustes")


def _items(view: dict, gallery: Gallery, r: Retriever, classes: Optional[list[str]]) -> list[tuple]:
    """Every mapped point: (id "i:<row>" / "t:<row>", its index in the layout, modality, scene, hover text)."""
    pool, n = gallery.pool, len(view["img_rows"])
    out = []
    for k, i in enumerate(view["img_rows"]):
        scene = classes[i] if classes else None
        out.append((f"i:{i}", k, "i", scene, gallery.images[i].name + (f" ({scene})" if scene else "")))
    for k, j in enumerate(view["txt_rows"]):
        scene = classes[pool.images[j][0]] if classes and pool and pool.images[j] else None
        text = r.captions.metadata[j]["caption"][:120]
        out.append((f"t:{j}", n + k, "t", scene, text + (f" ({scene})" if scene else "")))
    return out


def gt_ranks(view: dict, gallery: Gallery, r: Retriever) -> dict[str, int]:
    """Rank (1 = first) of the best ground truth for every mapped point under ``r``'s embeddings: an image
    among all distinct captions (its own captions), a caption among all images (the images it describes)."""
    pool = gallery.pool
    if pool is None or r.captions is None:
        return {}
    imgs, caps = r.images.embeddings.float(), r.captions.embeddings.float()
    own: dict[int, list[int]] = {}
    for j, images in enumerate(pool.images):
        for i in images:
            own.setdefault(i, []).append(j)
    out = {}
    for rows, queries, keys, truth, kind in ((view["img_rows"], imgs, caps, own, "i"),
                                             (view["txt_rows"], caps, imgs, dict(enumerate(pool.images)), "t")):
        for start in range(0, len(rows), 512):
            chunk = rows[start:start + 512]
            sims = queries[torch.as_tensor(chunk, dtype=torch.long)] @ keys.T
            for q, row in zip(sims, chunk):
                gt = truth.get(row, [])
                best = float(q[torch.as_tensor(gt, dtype=torch.long)].max()) if gt else float("inf")
                out[f"{kind}:{row}"] = int((q > best).sum()) + 1 if gt else 10**9
    return out


def _groups(items: list[tuple], colour: str, classes: Optional[list[str]], ranks: dict, other: dict) -> list:
    """Legend groups: [(name, colour, items)] for the colour-by choice (modality when it cannot be drawn)."""
    if colour == "scene" and classes:
        names = sorted({it[3] for it in items if it[3] is not None})
        return [(c, PALETTE[g % len(PALETTE)], [it for it in items if it[3] == c]) for g, c in enumerate(names)]
    if colour == "outcome" and ranks:
        bins = [1 if ranks[it[0]] == 1 else 2 if ranks[it[0]] <= 10 else 3 for it in items]
        return [(name, col, [it for it, b in zip(items, bins) if b == g + 1]) for g, (name, col) in enumerate(OUTCOMES)]
    if colour == "rank" and ranks and other:
        signs = [(other[it[0]] > ranks[it[0]]) - (other[it[0]] < ranks[it[0]]) for it in items]
        return [(name, col, [it for it, s in zip(items, signs) if s == 1 - g]) for g, (name, col) in enumerate(CHANGES)]
    return [("images", IMAGE_COLOR, [it for it in items if it[2] == "i"]),
            ("captions", CAPTION_COLOR, [it for it in items if it[2] == "t"])]


def _traces(view: dict, xy: list, groups: list, gallery: Gallery, lines: bool, by_modality: bool) -> list:
    """The scatter traces of one map: optional caption-image segments, the legend groups, a legend key of
    the two marker shapes (when colour is not modality), the modality centroids, and the ring."""
    import plotly.graph_objects as go

    traces = []
    pool = gallery.pool
    if lines and pool is not None:
        where = {i: xy[k] for k, i in enumerate(view["img_rows"])}
        seg_x, seg_y, seg_id = [], [], []
        n = len(view["img_rows"])
        for k, j in enumerate(view["txt_rows"]):
            p = xy[n + k]
            for i in pool.images[j]:
                if i in where:
                    seg_x += [p[0], where[i][0], None]
                    seg_y += [p[1], where[i][1], None]
                    seg_id += [f"t:{j}", f"i:{i}", None]
        traces.append(go.Scatter(x=seg_x, y=seg_y, mode="lines", line=dict(color="#9ca3af", width=0.6),
                                 hoverinfo="skip", name="image–caption pairs", opacity=0.5))
    for name, colour, members in groups:
        traces.append(go.Scatter(
            x=[xy[it[1]][0] for it in members], y=[xy[it[1]][1] for it in members], mode="markers", name=name,
            customdata=[it[0] for it in members], hovertext=[it[4] for it in members], hoverinfo="text",
            marker=dict(size=8, color=colour, opacity=0.85, symbol=[SYMBOL[it[2]] for it in members],
                        line=dict(width=0.5, color="white"))))
    if not by_modality:
        for kind, label in (("i", "shape: image"), ("t", "shape: caption")):
            traces.append(go.Scatter(x=[None], y=[None], mode="markers", name=label, hoverinfo="skip",
                                     marker=dict(size=8, color="#6b7280", symbol=SYMBOL[kind])))
    traces.append(go.Scatter(x=[c[0] for c in centroids(view, xy)], y=[c[1] for c in centroids(view, xy)],
                             mode="markers", name="centroids, gap vector", hoverinfo="text",
                             hovertext=["image centroid", "caption centroid"],
                             marker=dict(size=17, symbol=["circle-x", "diamond-x"], color=[IMAGE_COLOR, CAPTION_COLOR],
                                         line=dict(width=2, color="black"))))
    traces.append(go.Scatter(x=[], y=[], mode="markers", name=RING, showlegend=False, hoverinfo="skip",
                             marker=dict(size=20, symbol="circle-open", color="black", line=dict(width=3))))
    return traces


def centroids(view: dict, xy: list) -> list[tuple[float, float]]:
    """The 2-D mean of the mapped images and of the mapped captions (the captions' is the images' without any)."""
    n = len(view["img_rows"])
    img, txt = xy[:n], xy[n:] or xy[:n]
    return [(sum(p[0] for p in part) / len(part), sum(p[1] for p in part) / len(part)) for part in (img, txt)]


def _arrow(view: dict, xy: list) -> dict:
    (x0, y0), (x1, y1) = centroids(view, xy)
    return dict(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True, arrowhead=3,
                arrowsize=1.4, arrowwidth=2.5, arrowcolor="black", text="", standoff=9, startstandoff=9)


def _frame_layout(view: dict, n_groups: int) -> dict:
    xs = [p[0] for p in view["base"] + view["adapted"]]
    ys = [p[1] for p in view["base"] + view["adapted"]]
    pad_x, pad_y = 0.05 * (max(xs) - min(xs) or 1), 0.05 * (max(ys) - min(ys) or 1)
    return dict(height=560 + 18 * max(0, (n_groups + 4) // 5 - 1), margin=dict(l=10, r=10, t=10, b=10),
                template="plotly_white", dragmode="lasso", uirevision="harma-map",
                legend=dict(font=dict(size=11), itemsizing="constant", orientation="h", x=0, y=-0.01,
                            xanchor="left", yanchor="top", itemclick="toggle"),
                xaxis=dict(range=[min(xs) - pad_x, max(xs) + pad_x], showticklabels=False, title=None, zeroline=False),
                yaxis=dict(range=[min(ys) - pad_y, max(ys) + pad_y], showticklabels=False, title=None, zeroline=False),
                annotations=[None, dict(text=projection_label(view), xref="paper", yref="paper", x=1, y=1,
                                        xanchor="right", yanchor="top", showarrow=False,
                                        font=dict(size=11, color="#4b5563"), bgcolor="rgba(255,255,255,0.7)")])


def map_figure(view: dict, which: str, gallery: Gallery, retrievers: tuple[Retriever, Retriever],
               classes: Optional[list[str]], colour: str = "modality", lines: bool = False, ranks=None):
    """One model's map (``which`` "base" or "adapted") on the axes both maps share, coloured by ``colour``
    (a :data:`COLOUR_BY` key); ``ranks``: :func:`gt_ranks` of (baseline, adapted), computed when needed."""
    import plotly.graph_objects as go

    r = retrievers[0 if which == "base" else 1]
    if ranks is None:
        ranks = _ranks(view, gallery, retrievers, colour)
    mine, other = (ranks[0], ranks[1]) if which == "base" else (ranks[1], ranks[0])
    if colour == "rank":  # the change is one property of the item: adapted's rank against baseline's
        mine, other = ranks[1], ranks[0]
    groups = _groups(_items(view, gallery, r, classes), colour, classes, mine, other)
    by_modality = groups[0][0] == "images"
    fig = go.Figure(_traces(view, view[which], groups, gallery, lines, by_modality))
    layout = _frame_layout(view, len(groups))
    layout["annotations"][0] = _arrow(view, view[which])
    fig.update_layout(**layout, meta={"colour": colour if not by_modality else "modality"})
    return fig


def _ranks(view: dict, gallery: Gallery, retrievers: tuple[Retriever, Retriever], colour: str) -> tuple[dict, dict]:
    if colour not in ("outcome", "rank"):
        return {}, {}
    return gt_ranks(view, gallery, retrievers[0]), gt_ranks(view, gallery, retrievers[1])


def move_figure(view: dict, gallery: Gallery, retrievers: tuple[Retriever, Retriever],
                classes: Optional[list[str]], colour: str = "modality", lines: bool = False, ranks=None):
    """Every point moving from its baseline place (slider at 0) to its adapted place (1), with play.

    Drawn at the baseline places; ``layout.meta.move`` holds each trace's baseline and adapted
    coordinates (and the gap arrow's), which linked_maps.js animates; the slider steps carry theirs."""
    if ranks is None:
        ranks = _ranks(view, gallery, retrievers, colour)
    fig = map_figure(view, "adapted", gallery, retrievers, classes, colour, lines, ranks)
    end = [(list(t.x), list(t.y)) for t in fig.data]
    start_xy = _traces_at(view, "base", fig, gallery, lines)
    moving = [k for k, t in enumerate(fig.data) if t.name != RING]
    for k in moving:
        fig.data[k].x, fig.data[k].y = start_xy[k]
    arrows = [_arrow(view, view["base"]), _arrow(view, view["adapted"])]
    fig.layout.annotations[0].update(arrows[0])

    def mix(a, b, t):
        return [None if p is None else (1 - t) * p + t * q for p, q in zip(a, b)]

    def arrow_at(t):
        return {f"annotations[0].{c}": (1 - t) * arrows[0][c] + t * arrows[1][c] for c in ("x", "y", "ax", "ay")}

    steps = [dict(method="update", label="baseline" if t == 0 else "adapted" if t == 1 else f"{t:g}",
                  args=[{"x": [mix(start_xy[k][0], end[k][0], t) for k in moving],
                         "y": [mix(start_xy[k][1], end[k][1], t) for k in moving]}, arrow_at(t), moving])
             for t in STEPS]
    fig.update_layout(
        sliders=[dict(active=0, steps=steps, x=0.12, len=0.86, y=1.0, yanchor="bottom", pad=dict(t=0, b=10),
                      currentvalue=dict(prefix="showing: ", font=dict(size=12)))],
        updatemenus=[dict(type="buttons", showactive=False, x=0.0, y=1.0, xanchor="left", yanchor="bottom",
                          pad=dict(t=0, b=10), buttons=[dict(label="▶ play", method="skip", args=[None])])],
        meta={**fig.layout.meta, "move": {"traces": moving, "base": [start_xy[k] for k in moving],
                                          "adapted": [end[k] for k in moving], "arrow": arrows}})
    fig.update_layout(margin=dict(t=80))
    return fig


def _traces_at(view: dict, which: str, fig, gallery: Gallery, lines: bool) -> list[tuple[list, list]]:
    """Each trace's coordinates with every point at its ``which`` place (points found by their ids)."""
    n = len(view["img_rows"])
    where = {f"i:{i}": view[which][k] for k, i in enumerate(view["img_rows"])}
    where.update({f"t:{j}": view[which][n + k] for k, j in enumerate(view["txt_rows"])})
    cents = centroids(view, view[which])
    out = []
    for t in fig.data:
        if t.name == "centroids, gap vector":
            out.append(([c[0] for c in cents], [c[1] for c in cents]))
        elif t.name == "image–caption pairs" and lines:
            twin = map_figure_lines(view, which, gallery)
            out.append(twin)
        elif t.customdata is not None:
            out.append(([where[c][0] for c in t.customdata], [where[c][1] for c in t.customdata]))
        else:
            out.append((list(t.x), list(t.y)))
    return out


def map_figure_lines(view: dict, which: str, gallery: Gallery) -> tuple[list, list]:
    """The caption-image segments' coordinates at ``which`` places (the lines trace of :func:`_traces`)."""
    tr = _traces(view, view[which], [], gallery, True, True)[0]
    return list(tr.x), list(tr.y)
