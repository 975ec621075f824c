"""The "Image → text" tab: an uploaded or picked query image and the gallery's captions ranked by both models."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from PIL import Image

from harma.data import open_image
from harma.retrieval import Hit

from .common import USER_ERRORS, AppError, both_sides, clamp_k, fail, progress_cb
from .galleries import Gallery, displayable
from .indexes import needs_every_embedding
from .state import AppState
from .tab_text_to_image import tile_caption

PICKER_SIZE = 48


def _caption_rows(hits: list[Hit], truth: Optional[int]) -> list[list]:
    return [[h.rank, round(h.score, 4), h.metadata.get("caption", ""),
             "✓" if truth is not None and truth in h.metadata.get("images", []) else ""] for h in hits]


def picker_indices(gallery: Gallery) -> list[int]:
    """Evenly spaced images of the gallery (so every class of a sorted dataset shows up)."""
    n = gallery.split.num_images
    step = max(1, n // PICKER_SIZE)
    return list(range(0, n, step))[:PICKER_SIZE]


def query_preview(path: str, pil: Image.Image) -> Any:
    """The uploaded query image as the preview shows it: the upload itself when a browser can show it (a
    file in Gradio's upload folder), else (a TIFF) a copy of its decoded RGB, longest side <= 512."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"):
        return path
    preview = pil.copy()
    preview.thumbnail((512, 512))
    return preview


def _rank_captions(app: AppState, model_key, gallery_key, k, progress, query_fn) -> tuple[list, list]:
    gallery = app.gallery(gallery_key)
    needs_every_embedding(gallery, "Image → text", "captions to rank")
    if gallery.pool is None:
        raise AppError(f"{gallery.name} has no captions to rank; start with a dataset that has captions "
                       "(`--data DIR`)")
    base, adapted = app.retrievers(model_key, gallery_key, progress_cb(progress))
    k = clamp_k(k)
    return both_sides(lambda _side, r: query_fn(r, k), base, adapted)  # the two models answer at once


def search_image(app: AppState, image: Optional[str], k: Any, model_key: Optional[str], gallery_key: Optional[str],
                 progress: Any = gr.Progress()) -> tuple[Optional[str], list, list, str]:
    """Image -> text: ranked captions of the gallery's caption pool, rows (rank, score, caption, ✓)."""
    try:
        if not image:
            raise AppError("upload an image, or pick one from the gallery below")
        path = str(getattr(image, "name", image))
        pil = open_image(path)  # refuses non-images, corrupt files and decompression bombs
        base, adapted = _rank_captions(app, model_key, gallery_key, k, progress, lambda r, kk: r.search_image(pil, kk))
        return (query_preview(path, pil), _caption_rows(base, None), _caption_rows(adapted, None),
                f"Captions ranked for {Path(path).name}.")
    except (AppError, *USER_ERRORS) as e:
        return None, [], [], fail(e)


def pick_image(app: AppState, index: int, k: Any, model_key: Optional[str], gallery_key: Optional[str],
               progress: Any = gr.Progress()) -> tuple[Optional[str], list, list, str]:
    """Image -> text for tile ``index`` of the picker (its stored embedding; ✓ = its ground-truth captions)."""
    try:
        gallery = app.gallery(gallery_key)
        indices = picker_indices(gallery)
        if not 0 <= int(index) < len(indices):
            raise AppError(f"no picker tile {index}")
        return gallery_image_captions(app, indices[int(index)], k, model_key, gallery_key, progress)
    except (AppError, *USER_ERRORS) as e:
        return None, [], [], fail(e)


def gallery_image_captions(app: AppState, i: int, k: Any, model_key: Optional[str], gallery_key: Optional[str],
                           progress: Any = None) -> tuple[Optional[str], list, list, str]:
    """Image -> text for gallery image ``i`` (its stored embedding; ✓ = its ground-truth captions)."""
    try:
        gallery = app.gallery(gallery_key)
        base, adapted = _rank_captions(app, model_key, gallery_key, k, progress,
                                       lambda r, kk: r.search_gallery_image(i, kk))
        return (displayable(gallery.images[i], app.cache_dir), _caption_rows(base, i), _caption_rows(adapted, i),
                f"Captions ranked for {gallery.images[i].name}; ✓ = one of its ground-truth captions.")
    except (AppError, *USER_ERRORS) as e:
        return None, [], [], fail(e)


PICKER_LABEL = "…or pick one from the gallery"
NO_PICKER = "No picker: an archive index has no captions to rank (search it from Text → image)"


def picker_contents(app: AppState, gallery_key: Optional[str]) -> tuple[str, list[tuple[Any, str]]]:
    """The picker's label and tiles (image, file name · scene class): :func:`picker_indices` of the gallery;
    no tiles without a gallery, and none, with a label that says why, for an archive index (no captions)."""
    try:
        gallery = app.gallery(gallery_key)
    except (AppError, *USER_ERRORS):
        return PICKER_LABEL, []
    if gallery.archive:  # nothing to rank: an archive index has no captions (needs_every_embedding)
        return NO_PICKER, []
    return PICKER_LABEL, [(displayable(gallery.images[i], app.cache_dir), tile_caption(gallery, i))
                          for i in picker_indices(gallery)]


def picker_view(app: AppState, gallery_key: Optional[str]) -> Any:
    """The picker component's update: :func:`picker_contents`' tiles under its label."""
    label, tiles = picker_contents(app, gallery_key)
    return gr.update(value=tiles, label=label)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("Image → text", id="i2t") as tab:
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(file_types=["image"], label="Query image (upload)", type="filepath")
                preview = gr.Image(label="Query image", interactive=False, height=200)
            picker = gr.Gallery(label=PICKER_LABEL, columns=6, height=340, scale=2,
                                allow_preview=False, elem_id="picker", elem_classes="harma-tiles")
        headers = ["rank", "score", "caption", "✓"]
        with gr.Row():
            base_caps = gr.Dataframe(headers=headers, label="Baseline (zero-shot)", wrap=True,
                                     column_widths=["10%", "15%", "67%", "8%"], elem_id="baseline-caps")
            adapted_caps = gr.Dataframe(headers=headers, label="Adapted", wrap=True,
                                        column_widths=["10%", "15%", "67%", "8%"], elem_id="adapted-caps")
        note = gr.Markdown(elem_classes="harma-note", elem_id="i2t-note")  # what a model switch did to the results
        query = gr.State(None)  # the last query: ("upload", path) or ("pick", picker tile), re-run on a model switch
    return dict(tab=tab, upload=upload, preview=preview, picker=picker, base_caps=base_caps, adapted_caps=adapted_caps,
                note=note, query=query)


def rerun(app: AppState, query: Any, k: Any, model_key: Optional[str], gallery_key: Optional[str],
          progress: Any = None) -> tuple[Optional[str], list, list, str]:
    """The last query of the tab (:func:`layout`'s ``query`` state) answered again, e.g. by another model."""
    kind, value = query if isinstance(query, (tuple, list)) and len(query) == 2 else (None, None)
    if kind == "upload":
        return search_image(app, value, k, model_key, gallery_key, progress)
    if kind == "pick":
        return pick_image(app, value, k, model_key, gallery_key, progress)
    return None, [], [], ""


def wire(app: AppState, ui: dict[str, Any], common: list, status: gr.Markdown, fast: dict) -> None:
    """Upload (API ``/search_image``) and a click on a picker tile."""
    outputs = [ui["preview"], ui["base_caps"], ui["adapted_caps"], status]
    ui["upload"].upload(partial(search_image, app), [ui["upload"]] + common, outputs, api_name="search_image", **fast)
    ui["upload"].upload(lambda path: (("upload", path) if path else None, ""), ui["upload"], [ui["query"], ui["note"]],
                        api_visibility="private", queue=False)

    def on_pick(k_, model_, gallery_, evt: gr.SelectData, progress=gr.Progress()):
        return *pick_image(app, evt.index, k_, model_, gallery_, progress), ("pick", evt.index), ""

    ui["picker"].select(on_pick, common, outputs + [ui["query"], ui["note"]], api_visibility="private", **fast)
