"""The "Compare" tab: for every query of a captioned gallery, the rank of its ground truth under the
baseline and under the adapted model; sorted by gain or loss, filtered by scene class; a selected row
shows both models' results for that query; the table exports as CSV.

Ranks are expected ranks over random orders of tied scores (:func:`harma.metrics.expected_ranks`),
the per-query numbers behind the tie-aware R@K, so they do not depend on the order of the file.
"""

from __future__ import annotations

import csv
import io
import re
from functools import partial
from typing import Any, Optional

import gradio as gr
import pandas as pd

from harma.io import atomic_write_bytes
from harma.metrics import expected_ranks

from .common import USER_ERRORS, AppError, fail, progress_cb
from .state import AppState
from .tab_image_to_text import gallery_image_captions
from .tab_metrics import check_scoreable, split_similarity
from .tab_text_to_image import search_text

DIRECTIONS = {"Text → image (each caption)": "t2i", "Image → text (each image)": "i2t"}
SORTS = ("largest gain first", "largest loss first", "worst adapted rank first", "file order")
ALL = "all classes"
HEADERS = {"t2i": ["caption", "image", "class", "baseline rank", "adapted rank", "gain"],
           "i2t": ["image", "class", "captions", "baseline rank", "adapted rank", "gain"]}
# every column inside the table's width (the long text column wraps): rank and gain stay in view
WIDTHS = {"t2i": ["38%", "13%", "13%", "12%", "12%", "12%"], "i2t": ["13%", "13%", "38%", "12%", "12%", "12%"]}
NOTE = ("Rank = where the query's ground truth lands (1 = first), expected over random orders of tied "
        "scores; for an image, its best-ranked caption. Gain = baseline rank − adapted rank (positive: the "
        "adapters moved the right answer up). Select a row to see both models' results for it.")


def query_ranks(app: AppState, model_key: Optional[str], gallery_key: Optional[str], direction: str,
                progress: Any = None) -> list[dict[str, Any]]:
    """One record per query (caption for t2i, image for i2t), in file order: text, image, class and the
    baseline and adapted expected ranks. Cached per model, gallery and direction."""
    gallery = app.gallery(gallery_key)
    check_scoreable(gallery, "per-query ranks", "Compare")
    base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress) if progress else None)
    split = gallery.split

    def compute() -> list[dict[str, Any]]:
        ranks = [expected_ranks(split_similarity(r, gallery), split.text_to_image) for r in (base, adapted)]
        classes = gallery.classes
        side = 0 if direction == "i2t" else 1
        b, a = ranks[0][side].tolist(), ranks[1][side].tolist()
        cls = classes or [""] * split.num_images
        if direction == "t2i":
            return [{"query": t, "caption": c, "image": split.images[i].name, "class": cls[i], "baseline": b[t],
                     "adapted": a[t]} for t, (c, i) in enumerate(zip(split.captions, split.text_to_image))]
        captions: list[list[str]] = [[] for _ in split.images]
        for c, i in zip(split.captions, split.text_to_image):
            captions[i].append(c)
        return [{"query": i, "image": p.name, "class": cls[i], "captions": " | ".join(captions[i]), "baseline": b[i],
                 "adapted": a[i]} for i, p in enumerate(split.images)]

    return app.cached(("compare", app.model_key(model_key), gallery_key, direction), compute)


def natural_key(text: str) -> list:
    """Sort key reading runs of digits as numbers: "ids 101-200" after "ids 1-100", before "ids 1001-1100"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def arrange(records: list[dict[str, Any]], sort: str, cls: Optional[str]) -> list[dict[str, Any]]:
    """``records`` of one class (or all) in the order ``sort`` names; ties keep file order."""
    out = [r for r in records if not cls or cls == ALL or r["class"] == cls]
    if sort == SORTS[0]:
        out.sort(key=lambda r: r["adapted"] - r["baseline"])
    elif sort == SORTS[1]:
        out.sort(key=lambda r: r["baseline"] - r["adapted"])
    elif sort == SORTS[2]:
        out.sort(key=lambda r: -r["adapted"])
    return out


def _row(r: dict[str, Any], direction: str) -> list:
    ranks = [round(r["baseline"], 1), round(r["adapted"], 1), round(r["baseline"] - r["adapted"], 1)]
    if direction == "t2i":
        return [r["caption"], r["image"], r["class"], *ranks]
    return [r["image"], r["class"], r["captions"], *ranks]


def compare_view(app: AppState, model_key: Optional[str], gallery_key: Optional[str], direction_label: str,
                 sort: str, cls: Optional[str],
                 progress: Any = gr.Progress()) -> tuple[pd.DataFrame, Any, list[int], Optional[str], str]:
    """The table (sorted, filtered), the class choices, the query behind each row, the CSV file and a note."""
    try:
        direction = DIRECTIONS.get(direction_label, "t2i")
        records = query_ranks(app, model_key, gallery_key, direction, progress)
        classes = sorted({r["class"] for r in records if r["class"]}, key=natural_key)
        if cls and cls != ALL and cls not in classes:
            raise AppError(f"no scene class {cls!r} in this gallery; choose {ALL!r} or one of: "
                           + (", ".join(classes) if classes else "(none: its images carry no class)"))
        shown = arrange(records, sort, cls)
        rows = [_row(r, direction) for r in shown]
        buf = io.StringIO()
        csv.writer(buf).writerows([HEADERS[direction], *rows])
        path = app.cache_dir / "exports" / f"compare-{direction}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue().encode())
        gains = sum(r["baseline"] > r["adapted"] for r in shown)
        losses = sum(r["baseline"] < r["adapted"] for r in shown)
        note = (f"{len(shown):,} queries: the adapters ranked the right answer higher for {gains:,}, lower for "
                f"{losses:,}, the same for {len(shown) - gains - losses:,}. {NOTE}")
        choices = gr.Dropdown(choices=[ALL, *classes], value=cls if cls in classes else ALL,
                              interactive=bool(classes))
        # a DataFrame carries its column names, which differ between the two directions
        return pd.DataFrame(rows, columns=HEADERS[direction]), choices, [r["query"] for r in shown], str(path), note
    except (AppError, *USER_ERRORS) as e:
        return pd.DataFrame(columns=HEADERS["t2i"]), gr.Dropdown(choices=[ALL], value=ALL), [], None, fail(e)


def show_row(app: AppState, row: int, queries: list[int], direction_label: str, k: Any, model_key: Optional[str],
             gallery_key: Optional[str], progress: Any = gr.Progress()) -> tuple[list, list, Any, list, list, str]:
    """Both models' results for the query in table row ``row``: galleries for a caption, ranked captions
    for an image (the other pair of outputs is cleared)."""
    try:
        if not 0 <= row < len(queries):
            raise AppError(f"no row {row} in the table; refresh it")
        gallery = app.gallery(gallery_key)
        q = queries[row]
        if DIRECTIONS.get(direction_label, "t2i") == "t2i":
            base, adapted, status = search_text(app, gallery.split.captions[q], k, model_key, gallery_key, progress)
            return base, adapted, None, [], [], status
        preview, base_caps, adapted_caps, status = gallery_image_captions(app, q, k, model_key, gallery_key, progress)
        return [], [], preview, base_caps, adapted_caps, status
    except (AppError, *USER_ERRORS) as e:
        return [], [], None, [], [], fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``); the table is computed when the tab is opened."""
    with gr.Tab("Compare", id="compare") as tab:
        with gr.Row():
            direction = gr.Radio(list(DIRECTIONS), value=next(iter(DIRECTIONS)), label="Queries", scale=2)
            sort = gr.Dropdown(list(SORTS), value=SORTS[0], label="Sort", scale=1)
            # custom values: the choices are filled when the table is first computed, and an API client
            # filtering by class on its first call must not be refused for that (compare_view checks the class)
            cls = gr.Dropdown([ALL], value=ALL, label="Scene class", scale=1, allow_custom_value=True)
            export = gr.File(label="CSV", scale=1, elem_id="compare-csv")
        note = gr.Markdown(elem_classes="harma-note", label="note")
        table = gr.Dataframe(headers=HEADERS["t2i"], wrap=True, interactive=False, max_height=420,
                             elem_id="compare-table", label="ranks", show_label=False, column_widths=WIDTHS["t2i"])
        queries = gr.State([])
        with gr.Row():
            base_gallery = gr.Gallery(label="Baseline (zero-shot)", columns=4, height=260, elem_id="compare-baseline",
                                      elem_classes="harma-tiles")
            adapted_gallery = gr.Gallery(label="Adapted", columns=4, height=260, elem_id="compare-adapted",
                                         elem_classes="harma-tiles")
        with gr.Row():
            preview = gr.Image(label="Query image", interactive=False, height=200, scale=1)
            base_caps = gr.Dataframe(headers=["rank", "score", "caption", "✓"], label="Baseline (zero-shot)", scale=2)
            adapted_caps = gr.Dataframe(headers=["rank", "score", "caption", "✓"], label="Adapted", scale=2)
    return dict(tab=tab, direction=direction, sort=sort, cls=cls, export=export, note=note, table=table,
                queries=queries, base_gallery=base_gallery, adapted_gallery=adapted_gallery, preview=preview,
                base_caps=base_caps, adapted_caps=adapted_caps)


def wire(app: AppState, ui: dict[str, Any], common: list, status: gr.Markdown, fast: dict) -> None:
    """Opening the tab or changing a control recomputes the table (API ``/compare``); selecting a row shows it."""
    k, model, gallery_key = common
    inputs = [model, gallery_key, ui["direction"], ui["sort"], ui["cls"]]
    outputs = [ui["table"], ui["cls"], ui["queries"], ui["export"], ui["note"]]
    view = partial(compare_view, app)
    ui["tab"].select(view, inputs, outputs, api_name="compare")
    ui["direction"].change(lambda d: gr.update(column_widths=WIDTHS[DIRECTIONS.get(d, "t2i")]), ui["direction"],
                           ui["table"], api_visibility="private", queue=False)
    for control in (ui["direction"], ui["sort"], ui["cls"]):
        control.input(view, inputs, outputs, api_visibility="private")

    def on_select(queries, direction, k_, model_, gallery_, evt: gr.SelectData, progress=gr.Progress()):
        return show_row(app, evt.index[0], queries, direction, k_, model_, gallery_, progress)

    ui["table"].select(on_select, [ui["queries"], ui["direction"], k, model, gallery_key],
                       [ui["base_gallery"], ui["adapted_gallery"], ui["preview"], ui["base_caps"], ui["adapted_caps"],
                        status], api_visibility="private", **fast)
