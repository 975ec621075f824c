"""The "Text → image" tab: a query, example queries, and the top-k gallery tiles of both models."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from harma.errors import DatasetError, IndexFormatError, one_line
from harma.retrieval import Hit

from .common import (ASSETS, MAX_QUERY_CHARS, USER_ERRORS, AppError, both_sides, clamp_k, fail, file_names_only,
                     progress_cb, short_list)
from .galleries import Gallery, displayable
from .indexes import MissingSide
from .state import AppState

MATCH_NOTE = ("✓ marks an image whose ground-truth captions contain the query as a whole-word phrase, after both are "
              "normalised with `harma.data.clean_caption` (lower case, no punctuation); exact matches count.")

EXAMPLES_NOTE = ("Each example query matches ground-truth captions of the bundled demo gallery "
                 "(picked by `python -m harma_app.precompute --examples`).")


def load_examples() -> list[str]:
    try:
        return [str(q) for q in json.loads((ASSETS / "examples.json").read_text())["queries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ["many planes parked at an airport"]


def tile_caption(gallery: Gallery, i: int, path: Optional[Path] = None) -> str:
    """What a tile says about gallery image ``i`` (file ``path`` when known): its file name, and its scene
    class when the gallery has them."""
    classes = gallery.classes
    return (path or gallery.images[i]).name + (f" · {classes[i]}" if classes else "")


def _tiles(app: AppState, gallery: Gallery, hits: list[Hit], matches: set[int],
           skipped: list[str]) -> list[tuple[Any, str]]:
    """The hits' tiles: a display copy of each image (made now, for the shown rows only) and its caption. A
    hit whose file cannot be shown (an archive row resolving outside its image root, a file gone or
    unreadable) is left out and named in ``skipped``."""
    tiles = []
    for h in hits:
        try:
            path = gallery.images[h.index]  # an archive's row: resolved and checked now
            tiles.append((displayable(path, app.cache_dir),
                          f"#{h.rank} · {h.score:.3f}{' ✓' if h.index in matches else ''}\n"
                          f"{tile_caption(gallery, h.index, path)}"))
        except (IndexFormatError, DatasetError, OSError) as e:
            skipped.append(f"#{h.rank} {h.id} ({file_names_only(one_line(e))})")
    return tiles


def search_text(app: AppState, query: Optional[str], k: Any, model_key: Optional[str], gallery_key: Optional[str],
                progress: Any = gr.Progress()) -> tuple[list, list, str]:
    """Text -> image: top-k gallery tiles (image, "#rank · score [✓]") for the baseline and the adapted model."""
    try:
        query = str(query or "").strip()
        if not query:
            raise AppError("type a query first (e.g. one of the examples)")
        note = ""
        if len(query) > MAX_QUERY_CHARS:
            query, note = query[:MAX_QUERY_CHARS], f" The query was cut to {MAX_QUERY_CHARS} characters."
        k = clamp_k(k)
        gallery = app.gallery(gallery_key)
        base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress))
        matches = gallery.pool.images_matching(query) if gallery.pool else set()

        def side(name: str, r: Any) -> tuple[list, str, list[str]]:
            if isinstance(r, MissingSide):  # an archive index by the other model only
                return [], f"{name}: no index (⚠️ {r.problem})", []
            t0 = time.perf_counter()
            hits = r.search_text(query, k)
            took, skipped = f"{name} {1000 * (time.perf_counter() - t0):.0f} ms", []
            return _tiles(app, gallery, hits, matches, skipped), took, skipped

        sides = both_sides(side, base, adapted)  # the two models encode the query and search at once
        out, times = [tiles for tiles, _, _ in sides], [took for _, took, _ in sides]
        skipped = [s for _, _, missed in sides for s in missed]
        status = f"Top {k} of {len(gallery.images):,} images for “{query}” — {', '.join(times)}.{note}"
        if skipped:
            status += f" ⚠️ Not shown, {len(skipped)} image(s) that cannot be: {short_list(skipped)}."
        if matches:
            status += f" {len(matches)} images have a matching ground-truth caption. {MATCH_NOTE}"
        return out[0], out[1], status
    except (AppError, *USER_ERRORS) as e:
        return [], [], fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("Text → image", id="t2i") as tab:
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="many planes parked at an airport",
                               max_length=MAX_QUERY_CHARS, scale=4, elem_id="query")
            search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
        with gr.Row():
            examples = gr.Examples([[q] for q in load_examples()], inputs=[query], label="Example queries")
            gr.Markdown(MATCH_NOTE + " " + EXAMPLES_NOTE, elem_classes="harma-note", elem_id="match-note")
        note = gr.Markdown(elem_classes="harma-note", elem_id="t2i-note")  # what a model switch did to the results
        with gr.Row():
            base_gallery = gr.Gallery(label="Baseline (zero-shot)", columns=4, elem_id="baseline-gallery",
                                      elem_classes="harma-tiles")
            adapted_gallery = gr.Gallery(label="Adapted", columns=4, elem_id="adapted-gallery",
                                         elem_classes="harma-tiles")
    return dict(tab=tab, query=query, search=search, examples=examples, base_gallery=base_gallery,
                adapted_gallery=adapted_gallery, note=note)


def wire(app: AppState, ui: dict[str, Any], common: list, status: gr.Markdown, fast: dict) -> None:
    """Search button (API ``/search_text``) and Enter in the query box. Progress (a gallery's first encoding)
    shows on the status line, not as an overlay over both galleries: the page answers sooner (in headless
    Chromium on the app's 2 cores, status p50 168 -> 155 ms over a 10M archive)."""
    t2i = dict(fn=partial(search_text, app), inputs=[ui["query"]] + common,
               outputs=[ui["base_gallery"], ui["adapted_gallery"], status], show_progress_on=[status], **fast)
    ui["search"].click(**t2i, api_name="search_text")
    ui["query"].submit(**t2i, api_visibility="private")
    ui["examples"].load_input_event.then(**t2i, api_visibility="private")  # clicking an example runs it
    for trigger in (ui["search"].click, ui["query"].submit, ui["examples"].load_input_event.then):
        trigger(lambda: "", None, ui["note"], api_visibility="private", queue=False)  # a new search: no switch note
