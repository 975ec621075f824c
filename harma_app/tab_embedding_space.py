"""The "Embedding space" tab: both models' maps in one frame (side by side, and one that moves every point
from its baseline to its adapted place), coloured by modality, scene class, retrieval outcome or rank
change, with the map's fidelity to the original space beneath, a search that rings matching points, and
the numbers that say how the modality gap and the scene clustering changed."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import torch

from harma.gap import canonical_order, modality_gap
from harma.gap_ci import gap_with_intervals
from harma.io import arrays_key, cached_json, parse_json
from harma.retrieval import Retriever

from .common import MAX_QUERY_CHARS, PRECOMPUTED, USER_ERRORS, AppError, fail, progress_cb
from .galleries import Gallery, displayable
from .indexes import needs_every_embedding
from .plots import COLOUR_BY, aligned_view, gt_ranks, map_figure, method_note, move_figure
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
GAP_VERSION = 2  # bump when the rows or their measures change (invalidates the disk cache)
MAX_PICKED = 48  # images shown for a box or lasso selection
SEARCH_K = 10  # each model's top images ringed by the map search
FIDELITY_ROWS = [("knn_modality_purity", "k-NN modality purity"), ("knn_scene_purity", "k-NN scene purity"),
                 ("trustworthiness", "trustworthiness")]
CI_ROWS = [  # harma.gap_ci keys, shown first, with 95% bootstrap intervals over images
    ("centroid_distance", "Centroid distance", "‖mean image − mean caption‖ (Liang et al. 2022); lower = closer"),
    ("relative_modality_gap", "Relative modality gap",
     "matched-pair dissimilarity relative to within-modality spread (Schrodi et al. 2025); 0 = no gap"),
    ("knn_scene_purity", "k-NN scene purity",
     "share of each point's 10 nearest neighbours (images and captions) showing its scene: semantic clustering"),
    ("knn_scene_chance", "Scene purity by chance", "what k-NN scene purity would be with random neighbours"),
]


def gap_file(gallery: Gallery, retrievers: tuple[Retriever, Retriever],
             classes: Optional[list[str]]) -> Optional[tuple[str, Callable[[], list]]]:
    """(file name, compute) of the numbers table [measure, baseline, adapted, meaning] on every embedding of
    the split: the bootstrap-interval numbers, then the other modality-gap numbers; the name is a hash of
    the exact embeddings, pairs and classes. None without captions."""
    if gallery.pool is None or gallery.split.num_images < 2 or gallery.split.num_captions < 2:
        return None
    split = gallery.split  # rows in an order set by paths and texts: the sampled numbers ignore file order
    img_order, txt_order, t2i = canonical_order([str(p) for p in split.images], split.captions, split.text_to_image)
    rows = torch.tensor(gallery.pool.caption_to_text)[txt_order]
    caps = [r.captions.embeddings[rows] for r in retrievers]
    imgs = [r.images.embeddings[img_order] for r in retrievers]
    classes = [classes[i] for i in img_order] if classes is not None else None

    def compute() -> list:
        ci = [gap_with_intervals(i, c, t2i, classes) for i, c in zip(imgs, caps)]
        gap = [modality_gap(i, c, t2i) for i, c in zip(imgs, caps)]
        return ([[name, str(ci[0][k]), str(ci[1][k]), meaning] for k, name, meaning in CI_ROWS if k in ci[0]]
                + [[name, round(gap[0][k], 4), round(gap[1][k], 4), meaning] for k, name, meaning in GAP_ROWS
                   if k in gap[0]])

    settings = {"v": GAP_VERSION, "t2i": list(t2i), "classes": classes}
    return f"{arrays_key([t.contiguous().numpy() for t in imgs + caps], settings)}.json", compute


def gap_rows(app: AppState, key: tuple, gallery: Gallery, retrievers: tuple[Retriever, Retriever],
             classes: Optional[list[str]]) -> list:
    """The numbers table (:func:`gap_file`), empty without captions. Kept in memory under ``key`` and on
    disk: shipped with the bundled gallery for the shipped models (``python -m harma_app.precompute``),
    else in the cache folder (a few seconds on 2 cores for UCM train, and the sklearn import, otherwise)."""
    def from_disk() -> list:
        found = gap_file(gallery, retrievers, classes)
        if found is None:
            return []
        name, compute = found
        shipped = PRECOMPUTED / "gap" / name
        return cached_json(shipped if gallery.bundled and shipped.is_file() else app.cache_dir / "gap" / name, compute)

    return app.cached(("gap", *key), from_disk)


def ship_gap_rows(gallery: Gallery, retrievers: tuple[Retriever, Retriever], classes: Optional[list[str]],
                  folder: Path) -> Optional[Path]:
    """Write the numbers table under ``folder/gap/`` (for precompute); its path, None without captions."""
    found = gap_file(gallery, retrievers, classes)
    if found is None:
        return None
    name, compute = found
    cached_json(folder / "gap" / name, compute)
    return folder / "gap" / name


def hover_thumbnails(app: AppState, gallery: Gallery, rows: list[int]) -> dict[str, str]:
    """The file a browser shows for each mapped image (``"i:<row>"``): its display copy, made by the app in
    a folder it serves (:func:`~.galleries.displayable`); the maps carry them for the hover thumbnails of
    linked_maps.js. An image without one (an unwritable cache folder) shows no thumbnail."""
    shown = {f"i:{i}": displayable(gallery.images[i], app.cache_dir) for i in rows}
    return {k: v for k, v in shown.items() if isinstance(v, str)}


def fidelity_note(fid: list[dict]) -> str:
    """The map-fidelity table (Markdown) and a line saying whether the 2-D change has the original's sign."""
    if not fid:
        return "**Map fidelity** needs a gallery with captions."

    def num(v):
        return "–" if v is None else f"{v:.3f}"

    lines = ["**Map fidelity**: the same numbers on the original embeddings and on the 2-D maps above (k = 10).",
             "", "| measure | original space: baseline | original: adapted | 2-D map: baseline | 2-D map: adapted |",
             "|---|---|---|---|---|"]
    verdict = []
    for key, name in FIDELITY_ROWS:
        if fid[0].get(key) is None:
            continue
        if key == "trustworthiness":
            lines.append(f"| {name} (1 = no false 2-D neighbours) | | | {num(fid[0][key])} | {num(fid[1][key])} |")
            continue
        o, m = fid[1][key] - fid[0][key], fid[1][key + "_2d"] - fid[0][key + "_2d"]
        lines.append(f"| {name} | {num(fid[0][key])} | {num(fid[1][key])} | {num(fid[0][key + '_2d'])} | "
                     f"{num(fid[1][key + '_2d'])} |")
        same = (o > 0) == (m > 0) or abs(o) < 0.005
        verdict.append(f"{name} changes by {m:+.3f} on the maps and {o:+.3f} in the original space"
                       f"{'' if same else ' (opposite signs: read this change on the numbers, not the picture)'}")
    return "\n".join(lines) + ("\n\n" + "; ".join(verdict) + "." if verdict else "")


def embedding_view(app: AppState, model_key: Optional[str], gallery_key: Optional[str], lines: bool = False,
                   progress: Any = gr.Progress(),
                   colour: Optional[str] = "modality") -> tuple[Any, Any, Any, list, str]:
    """The two models' maps in one frame (side by side, and one moving from baseline to adapted), the
    numbers table [measure, baseline, adapted, meaning] and a note with the map's fidelity; ``colour`` is a
    :data:`~.plots.COLOUR_BY` key (default modality), ``lines`` joins each caption to its images."""
    try:
        colour = colour if colour in COLOUR_BY else "modality"
        gallery = app.gallery(gallery_key)
        needs_every_embedding(gallery, "Embedding map", "every embedding in memory")
        base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress))
        if progress is not None:
            progress(None, desc="2-D layout of both models (cached after the first time)")
        key = (app.model_key(model_key), gallery_key)
        view = app.cached(("aligned", *key), lambda: aligned_view((base, adapted), gallery, app.config.umap_points,
                                                                  app.cache_dir,
                                                                  PRECOMPUTED if gallery.bundled else None))
        classes = gallery.classes
        pair = (base, adapted)
        ranks = (app.cached(("ranks", *key), lambda: (gt_ranks(view, gallery, base), gt_ranks(view, gallery, adapted)))
                 if colour in ("outcome", "rank") else ({}, {}))
        figs = [map_figure(view, "base", gallery, pair, classes, colour, bool(lines), ranks),
                map_figure(view, "adapted", gallery, pair, classes, colour, bool(lines), ranks),
                move_figure(view, gallery, pair, classes, colour, bool(lines), ranks)]
        thumbs = app.cached(("thumbs", *key), lambda: hover_thumbnails(app, gallery, view["img_rows"]))
        for fig in figs:  # linked_maps.js shows the thumbnails on hover
            fig.layout.meta = {**(fig.layout.meta or {}), "thumbs": thumbs}
        fid = view.get("fidelity") or []
        rows = gap_rows(app, key, gallery, pair, classes)
        n_img, n_txt = len(view["img_rows"]), len(view["txt_rows"])
        shown = figs[0].layout.meta.get("colour", "modality")
        note = (f"{fidelity_note(fid)}\n\n{n_img:,} images (circles) and {n_txt:,} distinct captions (diamonds), a "
                f"seeded sample of at most {app.config.umap_points:,} per modality, coloured by "
                f"{COLOUR_BY[shown].lower()}; the large marked symbols are each modality's centroid on the map, "
                f"the arrow the gap vector from images to captions. Projection: {method_note(view)}. The table "
                "below is computed on all original embeddings; brackets are 95% bootstrap intervals over images "
                "(200 seeded resamples).")
        if shown != colour:
            needs = "scene classes" if colour == "scene" else "captions"
            note += f" ({COLOUR_BY[colour]} needs {needs}: shown by modality.)"
        if not rows:
            note += " The numbers need a gallery with captions."
        return figs[0], figs[1], figs[2], rows, note
    except (AppError, *USER_ERRORS) as e:
        return None, None, None, [], fail(e)


def map_search(app: AppState, model_key: Optional[str], gallery_key: Optional[str],
               query: Optional[str]) -> tuple[str, str]:
    """The points a text search rings on the maps, as JSON ``{"baseline-plot": ids, "adapted-plot": ids,
    "move-plot": ids}`` for linked_maps.js: the captions containing every word of ``query`` (case-insensitive),
    and each model's top :data:`SEARCH_K` images for it (the move map: the adapted model's); and a line."""
    try:
        query = (query or "").strip()[:MAX_QUERY_CHARS]
        if not query:
            return json.dumps({}), ""
        gallery = app.gallery(gallery_key)
        needs_every_embedding(gallery, "Embedding map", "every embedding in memory")
        base, adapted = app.retrievers(model_key, gallery_key)
        words = query.lower().split()
        pool = gallery.pool
        caps = [f"t:{j}" for j, text in enumerate(pool.raw if pool else []) if all(w in text.lower() for w in words)]
        tops = [[f"i:{h.index}" for h in r.search_text(query, min(SEARCH_K, len(r.images)))] for r in (base, adapted)]
        ids = {"baseline-plot": caps + tops[0], "adapted-plot": caps + tops[1], "move-plot": caps + tops[1]}
        return json.dumps(ids), (f"“{query}”: {len(caps)} caption(s) contain the words; each map also rings its "
                                 f"model's top {SEARCH_K} images for it. Other points are dimmed.")
    except (AppError, *USER_ERRORS) as e:
        return json.dumps({}), fail(e)


def show_pick(app: AppState, gallery_key: Optional[str], payload: Optional[str]) -> tuple[Any, str, list]:
    """What a click or a box/lasso selection on a map picked (``payload``: JSON ``{"kind", "ids"}`` from
    linked_maps.js, ids ``i:<image>`` / ``t:<caption>``): the clicked image and its captions (or the
    clicked caption and its image), and the selected images as a gallery."""
    try:
        gallery = app.gallery(gallery_key)
        try:  # the one JSON reader: a payload nested too deeply is refused, not a RecursionError
            picked = parse_json(payload or "{}", AppError, "the map's selection")
            ids = list(dict.fromkeys(str(x) for x in picked.get("ids", [])))  # each item once
        except (AppError, ValueError, AttributeError, TypeError):
            raise AppError("the map sent a selection that cannot be read") from None
        images, captions = [], []
        for item in ids:
            kind, _, row = item.partition(":")
            if not row.isdigit():
                continue
            if kind == "i" and int(row) < gallery.split.num_images:
                images.append(int(row))
            elif kind == "t" and gallery.pool is not None and int(row) < len(gallery.pool):
                captions.append(int(row))
        if not images and not captions:
            return None, "Click a point, or draw a lasso or box around some, on either map.", []
        linked = list(dict.fromkeys(images + [i for j in captions for i in gallery.pool.images[j]]))
        tiles = [(displayable(gallery.images[i], app.cache_dir), gallery.images[i].name) for i in linked[:MAX_PICKED]]
        if picked.get("kind") == "click" and images:
            i = images[0]
            own = [c for c, img in zip(gallery.split.captions, gallery.split.text_to_image) if img == i]
            return (displayable(gallery.images[i], app.cache_dir),
                    f"**{gallery.images[i].name}**" + "".join(f"\n- {c}" for c in own), tiles)
        if picked.get("kind") == "click":
            text = f"**Caption:** {gallery.pool.raw[captions[0]]}\n\nIt describes {len(linked)} image(s), shown below."
            return displayable(gallery.images[linked[0]], app.cache_dir), text, tiles
        more = f" (the first {MAX_PICKED} shown)" if len(linked) > MAX_PICKED else ""
        return None, (f"Selected {len(images)} image(s) and {len(captions)} caption(s); {len(linked)} image(s) "
                      f"below{more}."), tiles
    except (AppError, *USER_ERRORS) as e:
        return None, fail(e), []


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``); computed when the tab is opened."""
    with gr.Tab("Embedding space", id="space") as tab:
        with gr.Row(equal_height=True):
            colour = gr.Dropdown([(label, key) for key, label in COLOUR_BY.items()], value="modality",
                                 label="Colour by", scale=1, elem_id="map-colour")
            search = gr.Textbox(label="Search the maps", placeholder="e.g. storage tanks: rings captions with "
                                "these words and each model's top 10 images", scale=2, elem_id="map-search",
                                max_length=MAX_QUERY_CHARS)
            lines = gr.Checkbox(value=False, label="Join each caption to its image (the gap made visible)", scale=1)
        colour_state = gr.State("modality")  # the choice, outside the API's inputs (/embedding_view: model, lines)
        hits = gr.Textbox(visible="hidden", elem_id="map-hits")  # map_search -> linked_maps.js
        search_note = gr.Markdown(elem_classes="harma-note")
        with gr.Row():
            base_plot = gr.Plot(label="Baseline (zero-shot)", elem_id="baseline-plot")
            adapted_plot = gr.Plot(label="Adapted", elem_id="adapted-plot")
        move_plot = gr.Plot(label="Baseline → adapted: press play or drag the slider", elem_id="move-plot")
        note = gr.Markdown(elem_classes="harma-note", label="note", elem_id="map-note")
        gr.Markdown("Hover a point to ring the same item on every map; click it to see its image and captions; draw "
                    "a lasso (or pick the box tool) to collect the images of many. Zooming one map zooms all.",
                    elem_classes="harma-note")
        pick = gr.Textbox(visible="hidden", elem_id="map-pick")  # filled by linked_maps.js
        with gr.Row():
            pick_image = gr.Image(label="Picked", interactive=False, height=220, scale=1, elem_id="pick-image")
            pick_text = gr.Markdown(elem_id="pick-text")
        pick_gallery = gr.Gallery(label="Selected images", columns=10, height="auto", object_fit="cover",
                                  allow_preview=False, elem_id="pick-gallery")
        gap_table = gr.Dataframe(headers=["measure", "baseline", "adapted", "what it measures"],
                                 label="Modality gap (original embedding space)", wrap=True)
    return dict(tab=tab, lines=lines, colour=colour, colour_state=colour_state, search=search, hits=hits,
                search_note=search_note,
                base_plot=base_plot, adapted_plot=adapted_plot, move_plot=move_plot, pick=pick, pick_image=pick_image,
                pick_text=pick_text, pick_gallery=pick_gallery, gap_table=gap_table, note=note)


def wire(app: AppState, ui: dict[str, Any], model: gr.Dropdown, gallery_key: gr.State) -> None:
    """Opening the tab (API ``/embedding_view``), a colour-by choice or toggling the caption-image lines;
    the map search (rings drawn by linked_maps.js)."""
    def view(model_key, gallery, lines, colour, progress=gr.Progress()):
        return embedding_view(app, model_key, gallery, lines, progress, colour)

    def recolour(model_key, gallery, lines, colour, progress=gr.Progress()):
        return (*embedding_view(app, model_key, gallery, lines, progress, colour), colour)

    outputs = [ui["base_plot"], ui["adapted_plot"], ui["move_plot"], ui["gap_table"], ui["note"]]
    args = dict(fn=view, inputs=[model, gallery_key, ui["lines"], ui["colour_state"]], outputs=outputs)
    ui["tab"].select(**args, api_name="embedding_view")
    ui["lines"].input(**args, api_visibility="private")
    ui["colour"].input(recolour, [model, gallery_key, ui["lines"], ui["colour"]], [*outputs, ui["colour_state"]],
                       api_visibility="private")
    # a model switch redraws the maps (blocks._follow_the_model) coloured by modality: the picker says so
    model.change(lambda: ("modality", "modality"), None, [ui["colour"], ui["colour_state"]], queue=False,
                 api_visibility="private")
    ui["search"].submit(partial(map_search, app), [model, gallery_key, ui["search"]], [ui["hits"], ui["search_note"]],
                        api_visibility="private").then(
        None, ui["hits"], None, js="(h) => { if (window.harmaSearch) window.harmaSearch(h); }")
    ui["pick"].change(partial(show_pick, app), [gallery_key, ui["pick"]],
                     [ui["pick_image"], ui["pick_text"], ui["pick_gallery"]], api_visibility="private")
