"""The whole UI assembled from its parts (:func:`build_demo`), and its launch (:func:`main`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from harma.data.decode_limits import decode_budget_mb
from harma.data.images import image_bands
from harma.errors import ConfigError, DatasetError, one_line
from harma.sources import ModelSource

from . import (controls, tab_compare, tab_embedding_space, tab_image_to_text, tab_metrics, tab_modality_gap,
               tab_text_to_image)
from .galleries import SECRET_FILE, SERVED
from .state import AppConfig, AppState, ModelPair, load_models, parse_args

LINKED_MAPS = Path(__file__).parent / "static" / "linked_maps.js"  # map clicks and lassos -> show_pick
CSS = "#status {font-size: 0.95em} .harma-note {color: var(--body-text-color-subdued); font-size: 0.9em}"


def build_demo(config: Optional[AppConfig] = None,
               loader: Callable[[ModelSource, str], ModelPair] = load_models) -> gr.Blocks:
    """The whole UI. Cheap: models, galleries and embeddings load on first use.

    Args:
        config: gallery and model sources; default :meth:`AppConfig.from_env`.
        loader: ``loader(source, device) -> ModelPair``; tests and other front ends can inject models.
    """
    app = AppState(config or AppConfig.from_env(), loader)
    with gr.Blocks(title="HarMA: remote-sensing image-text retrieval") as demo:
        demo.harma_state = app  # for tests and launch_options
        gr.Markdown("# HarMA: remote-sensing image–text retrieval\nThe frozen backbone (**baseline**) next to "
                    "the same backbone with **HarMA adapters** (arXiv 2404.18253).")
        top = controls.layout(app)
        with gr.Tabs():
            t2i = tab_text_to_image.layout()
            i2t = tab_image_to_text.layout()
            space = tab_embedding_space.layout()
            metrics = tab_metrics.layout()
            compare = tab_compare.layout()
            gap = tab_modality_gap.layout()

        common = [top["k"], top["model"], top["gallery_key"]]
        # queries are served concurrently (one pool for all query events); the model calls inside
        # are serialised by harma.retrieval.Retriever, everything else (search, files, streaming) overlaps
        fast = dict(concurrency_limit=app.config.query_concurrency, concurrency_id="queries")
        tab_text_to_image.wire(app, t2i, common, top["status"], fast)
        tab_image_to_text.wire(app, i2t, common, top["status"], fast)
        tab_embedding_space.wire(app, space, top["model"], top["gallery_key"])
        tab_metrics.wire(app, metrics, top["model"], top["gallery_key"])
        tab_modality_gap.wire(app, gap, top["model"], top["gallery_key"])
        tab_compare.wire(app, compare, common, top["status"], fast)
        controls.wire(app, demo, top, i2t["picker"])
        _follow_the_model(app, demo, top, dict(t2i=t2i, i2t=i2t, space=space, metrics=metrics, compare=compare,
                                               gap=gap))
    return demo


def _follow_the_model(app: AppState, demo: gr.Blocks, top: dict, tabs: dict[str, dict]) -> None:
    """Every view follows the model picker: the adapted side's labels name the method, the open tab is
    recomputed for the new model, and the other computed tabs are cleared (they recompute when opened)."""
    current = gr.State("t2i")
    for name, ui in tabs.items():
        ui["tab"].select(lambda name=name: name, None, current, api_visibility="private", queue=False)
    tab_modality_gap.follow(app, tabs["gap"], top["model"], top["gallery_key"], current)  # its own handler
    space, metrics, compare = tabs["space"], tabs["metrics"], tabs["compare"]
    labelled = [tabs["t2i"]["adapted_gallery"], tabs["i2t"]["adapted_caps"], space["adapted_plot"],
                compare["adapted_gallery"], compare["adapted_caps"]]
    space_out = [space["base_plot"], space["adapted_plot"], space["move_plot"], space["gap_table"], space["note"]]
    metrics_out = [metrics["table"], metrics["note"]]
    compare_out = [compare["table"], compare["cls"], compare["queries"], compare["export"], compare["note"]]
    reopen = "Open this tab again to compute it for the selected model."

    def follow(tab, model_key, gallery_key, lines, direction, sort, cls, progress=gr.Progress()):
        label = app.adapted_label(model_key)
        labels = [gr.update(label=label) for _ in labelled]
        space_v = (tab_embedding_space.embedding_view(app, model_key, gallery_key, lines, progress) if tab == "space"
                   else (None, None, None, [], reopen))
        metrics_v = (tab_metrics.metrics_table(app, model_key, gallery_key, progress) if tab == "metrics"
                     else ([], reopen))
        compare_v = (tab_compare.compare_view(app, model_key, gallery_key, direction, sort, cls, progress)
                     if tab == "compare" else (None, gr.update(), [], None, reopen))
        return [*labels, *space_v, *metrics_v, *compare_v]

    demo.load(lambda model_key: [gr.update(label=app.adapted_label(model_key)) for _ in labelled], top["model"],
              labelled, api_visibility="private", queue=False)
    top["model"].change(follow, [current, top["model"], top["gallery_key"], space["lines"], compare["direction"],
                                 compare["sort"], compare["cls"]],
                        [*labelled, *space_out, *metrics_out, *compare_out], api_visibility="private")


def served_folders(app: AppState) -> list[str]:
    """The only folders the app serves files from (docs/security.md): the files it made itself under its
    cache folder (:data:`harma_app.galleries.SERVED`: display copies, uploaded galleries, CSV exports). Never
    a dataset or index folder: every image a page shows is a display copy (:func:`~.galleries.displayable`)."""
    return [str(app.cache_dir / name) for name in SERVED]


def launch_options(demo: gr.Blocks) -> dict[str, Any]:
    """``launch()`` arguments: theme and css (Gradio 6 takes them here), the folders files are served
    from (:func:`served_folders`), and the embedding cache and install key, which are never served."""
    app: AppState = demo.harma_state
    return dict(allowed_paths=served_folders(app),
                blocked_paths=[str(app.cache_dir / "index"), str(app.cache_dir / SECRET_FILE)],
                theme=gr.themes.Soft(), css=CSS, max_file_size="25mb",
                head=f"<script>{LINKED_MAPS.read_text()}</script>")


def main(argv: Optional[list[str]] = None) -> None:
    """``python app.py [flags]``: build the UI for the flags (over ``HARMA_*``) and serve it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, args = parse_args(argv)
        image_bands(), decode_budget_mb()  # read at every decode: a bad HARMA_BANDS / HARMA_DECODE_MB stops the start
        ui = build_demo(config)
    except (ConfigError, DatasetError) as e:  # a setting (flag or HARMA_* variable) that cannot be used: one line, like the commands
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    ui.queue().launch(server_name=args.host, server_port=args.port, **launch_options(ui))
