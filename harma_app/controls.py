"""The controls above the tabs: model choice, top k, the status line and the gallery source (dataset or
uploaded images), with their handlers."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import gradio as gr

from harma.errors import one_line
from harma.sources import ModelSource, dataset_key, dataset_name

from .common import (
    DEFAULT_PRESET,
    HOW_TO_DATA,
    MAX_K,
    USER_ERRORS,
    AppError,
    fail,
    file_names_only,
    plain_text,
    progress_cb,
    short_list,
)
from .galleries import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, Gallery
from .state import AppState
from .tab_image_to_text import picker_view


def gallery_dataset(gallery: Gallery) -> Optional[str]:
    """The :func:`harma.sources.dataset_key` of a gallery's images: the bundled demo is UCM-Captions' test
    split; a dataset folder is known by its folder name (``ucm``, ``UCM_Captions``, ``rsicd``); uploaded
    images and archive indexes are not known (None)."""
    if gallery.bundled:
        return "ucm"
    if gallery.archive or gallery.name.startswith("uploaded images"):
        return None
    return dataset_key(gallery.split.root.resolve()) or None


def adaptation_note(source: ModelSource, gallery: Gallery) -> Optional[str]:
    """A note when the gallery is not from the data the model's adapters were adapted on (by dataset
    name, :func:`gallery_dataset`); None when it is, or when the checkpoint records no data."""
    if not source.adapted_on:
        return None
    data = gallery_dataset(gallery)
    if data == source.adapted_on:
        return None
    adapted = dataset_name(source.adapted_on)
    where = f"is from {dataset_name(data)}" if data else f"is not recognised as {adapted}"
    return (f"This model was adapted on {adapted} and this gallery {where}: away from their data adapters can "
            "rank below the baseline (on RSICD the UCM adapters score far below the backbone alone; README, "
            "Results), so compare both columns")


def status_text(app: AppState, model_key: Optional[str], gallery_key: Optional[str]) -> str:
    lines, key, source = [], None, None
    try:
        key = app.model_key(model_key)
        source = app.sources[key]
        lines.append(f"**Model:** {source.label} — " + (f"⚠️ {file_names_only(source.problem)}" if source.problem
                     else "baseline = the same backbone without adapters (zero-shot)"))
    except AppError as e:
        lines.append(f"**Model:** ⚠️ {file_names_only(str(e))}")
    default = app.sources.get(f"preset:{DEFAULT_PRESET}")
    if default is not None and default.problem and key != default.key:
        lines.append(f"ℹ️ {file_names_only(default.problem)}")
    try:
        gallery = app.gallery(gallery_key)
        lines.append("**Gallery:** " + gallery.describe())
        note = adaptation_note(source, gallery) if source is not None else None
        if note:
            lines.append(f"ℹ️ {note}.")
    except (AppError, *USER_ERRORS) as e:
        lines.append(f"**Gallery:** ⚠️ {file_names_only(str(e) if isinstance(e, AppError) else one_line(e))}")
    lines += [f"ℹ️ {note[:1].upper()}{note[1:]}." for note in app.notes(gallery_key)]
    return "\n\n".join(lines)


def use_uploads(app: AppState, files: Optional[list], model_key: Optional[str], current: Optional[str],
                progress: Any = gr.Progress()) -> tuple[str, str, Any]:
    """Make the uploaded images the gallery (embeddings computed now, with a progress bar)."""
    try:
        key, gallery, skipped = app.add_uploads(files)
        msg = f"Gallery: {gallery.name}."
        if skipped:
            msg += f" Skipped {len(skipped)} file(s) that are not readable images: " + short_list(skipped)
            gr.Warning(plain_text(msg))
        if app.model_problem(model_key) is None:
            app.retrievers(model_key, key, progress_cb(progress))
        return key, status_text(app, model_key, key) + "\n\n" + msg, picker_view(app, key)
    except (AppError, *USER_ERRORS) as e:
        return current or "", fail(e), picker_view(app, current)


def use_dataset(app: AppState, model_key: Optional[str]) -> tuple[str, str, Any]:
    key = app.default_gallery
    return key, status_text(app, model_key, key), picker_view(app, key)


def layout(app: AppState) -> dict[str, Any]:
    """Gallery key (session state), model dropdown, top-k slider, status line and the gallery-source accordion."""
    choices = [(s.label + (" — unavailable" if s.problem else ""), k) for k, s in app.sources.items()]
    gallery_key = gr.State(app.default_gallery)
    with gr.Row():
        # custom values: the API also takes a preset's or folder's name, or an adapter directory's path (the
        # earlier keys); the handlers map them to a choice, or answer with a message naming the choices
        model = gr.Dropdown(choices, value=app.default_model, label="Model", scale=3, elem_id="model",
                            allow_custom_value=True)
        k = gr.Slider(1, MAX_K, value=8, step=1, label="Top k", scale=1)
    status = gr.Markdown(elem_id="status", label="status")
    with gr.Accordion("Gallery source", open=False):
        gr.Markdown(HOW_TO_DATA)
        files = gr.File(file_count="multiple", file_types=["image"], height=220,
                        label=f"Images to search (at most {MAX_UPLOAD_FILES}, {MAX_UPLOAD_BYTES // 2**20} MB in all)",
                        elem_id="upload-files")  # a long list scrolls inside 220 px
        with gr.Row():
            use_files = gr.Button("Use the uploaded images")
            use_data = gr.Button("Back to the dataset", visible=bool(app.config.data))
    return dict(gallery_key=gallery_key, model=model, k=k, status=status, files=files, use_files=use_files,
                use_data=use_data)


def wire(app: AppState, demo: gr.Blocks, ui: dict[str, Any], picker: gr.Gallery) -> None:
    """Model change (API ``/status``), the gallery-source buttons, and the status line and picker on page load."""
    model, gallery_key, status = ui["model"], ui["gallery_key"], ui["status"]
    model.change(partial(status_text, app), [model, gallery_key], status, api_name="status")
    ui["use_files"].click(partial(use_uploads, app), [ui["files"], model, gallery_key], [gallery_key, status, picker],
                          api_visibility="private")
    ui["use_data"].click(partial(use_dataset, app), [model], [gallery_key, status, picker], api_visibility="private")
    demo.load(partial(status_text, app), [model, gallery_key], status, api_visibility="private")
    demo.load(partial(picker_view, app), [gallery_key], picker, api_visibility="private")
