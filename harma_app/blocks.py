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
               tab_scene, tab_text_to_image)
from .common import size_sides
from .galleries import SECRET_FILE, SERVED
from .state import AppConfig, AppState, ModelPair, load_models, parse_args

LINKED_MAPS = Path(__file__).parent / "static" / "linked_maps.js"  # map clicks and lassos -> show_pick
CSS = ("#status {font-size: 0.95em} .harma-note {color: var(--body-text-color-subdued); font-size: 0.9em} "
       # gallery tiles: the whole caption (rank, score, ✓ / file name · scene class) on up to two lines
       ".harma-tiles .caption-label {white-space: pre-line; max-width: calc(100% - 8px); line-height: 1.25; "
       "font-size: 0.8em}")


def build_demo(config: Optional[AppConfig] = None,
               loader: Callable[[ModelSource, str], ModelPair] = load_models) -> gr.Blocks:
    """The whole UI. Cheap: models, galleries and embeddings load on first use.

    Args:
        config: gallery and model sources; default :meth:`AppConfig.from_env`.
        loader: ``loader(source, device) -> ModelPair``; tests and other front ends can inject models.
    """
    app = AppState(config or AppConfig.from_env(), loader)
    # Display copies are static files: Gradio serves a tile where the app made it instead of checking and
    # copying every tile into its own cache on every answer (about 1 ms a tile). Set here, with the UI, so a
    # host that launches the returned Blocks itself gets it too (Gradio keeps it for the interpreter).
    gr.set_static_paths([str(app.cache_dir / "thumbs")])
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
            scene = tab_scene.layout()

        common = [top["k"], top["model"], top["gallery_key"]]
        # queries are served concurrently (one pool for all query events); each model's calls are
        # serialised by harma.retrieval.Retriever, everything else (other models, search, files) overlaps
        fast = dict(concurrency_limit=app.config.query_concurrency, concurrency_id="queries")
        size_sides(app.config.query_concurrency)  # each of those queries runs its adapted side in SIDES
        tab_text_to_image.wire(app, t2i, common, top["status"], fast)
        tab_image_to_text.wire(app, i2t, common, top["status"], fast)
        tab_embedding_space.wire(app, space, top["model"], top["gallery_key"])
        tab_metrics.wire(app, metrics, top["model"], top["gallery_key"])
        tab_modality_gap.wire(app, gap, top["model"], top["gallery_key"])
        tab_compare.wire(app, compare, common, top["status"], fast)
        tab_scene.wire(app, scene, common, fast)
        controls.wire(app, demo, top, i2t["picker"])
        _follow_the_model(app, demo, top, dict(t2i=t2i, i2t=i2t, space=space, metrics=metrics, compare=compare,
                                               gap=gap, scene=scene))  # scene: its own model handler (tab_scene)
    return demo


def _follow_the_model(app: AppState, demo: gr.Blocks, top: dict, tabs: dict[str, dict]) -> None:
    """Every view follows the model picker: the adapted side's labels name the method, the open tab is
    recomputed for the new model (Text -> image and Image -> text re-run their last query), and the other
    computed tabs are cleared with a note (they recompute when opened or queried)."""
    current = gr.State("t2i")
    for name, ui in tabs.items():
        ui["tab"].select(lambda name=name: name, None, current, api_visibility="private", queue=False)
    tab_modality_gap.follow(app, tabs["gap"], top["model"], top["gallery_key"], current)  # its own handler
    t2i, i2t, space, metrics, compare = (tabs[n] for n in ("t2i", "i2t", "space", "metrics", "compare"))
    labelled = [space["adapted_plot"]]
    adapted_sides = [t2i["adapted_gallery"], i2t["adapted_caps"], compare["adapted_gallery"], compare["adapted_caps"]]
    t2i_out = [t2i["base_gallery"], t2i["adapted_gallery"], t2i["note"]]
    i2t_out = [i2t["preview"], i2t["base_caps"], i2t["adapted_caps"], i2t["note"]]
    space_out = [space["base_plot"], space["adapted_plot"], space["move_plot"], space["gap_table"], space["note"]]
    metrics_out = [metrics["table"], metrics["note"]]
    compare_out = [compare["table"], compare["cls"], compare["queries"], compare["export"], compare["note"],
                   compare["base_gallery"], compare["adapted_gallery"], compare["preview"], compare["base_caps"],
                   compare["adapted_caps"]]  # a selected row's results: cleared (its row is gone)
    reopen = "Open this tab again to compute it for the selected model."

    def follow(tab, model_key, gallery_key, k, query, picked, lines, direction, sort, cls, progress=gr.Progress()):
        label = app.adapted_label(model_key)
        labels = [gr.update(label=label) for _ in labelled]
        t2i_v, i2t_v = follow_queries(app, tab, model_key, gallery_key, k, query, picked, progress)
        t2i_v[1] = gr.update(value=t2i_v[1], label=label)
        i2t_v[2] = gr.update(value=i2t_v[2], label=label)
        space_v = (tab_embedding_space.embedding_view(app, model_key, gallery_key, lines, progress) if tab == "space"
                   else (None, None, None, [], reopen))
        metrics_v = (tab_metrics.metrics_table(app, model_key, gallery_key, progress) if tab == "metrics"
                     else ([], reopen))
        compare_v = (tab_compare.compare_view(app, model_key, gallery_key, direction, sort, cls, progress)
                     if tab == "compare" else (None, gr.update(), [], None, reopen))
        compare_v = [*compare_v, [], gr.update(value=[], label=label), None, [], gr.update(value=[], label=label)]
        return [*labels, *t2i_v, *i2t_v, *space_v, *metrics_v, *compare_v]

    demo.load(lambda model_key: [gr.update(label=app.adapted_label(model_key)) for _ in labelled + adapted_sides],
              top["model"], [*labelled, *adapted_sides], api_visibility="private", queue=False)
    top["model"].change(follow, [current, top["model"], top["gallery_key"], top["k"], t2i["query"], i2t["query"],
                                 space["lines"], compare["direction"], compare["sort"], compare["cls"]],
                        [*labelled, *t2i_out, *i2t_out, *space_out, *metrics_out, *compare_out],
                        api_visibility="private")


def follow_queries(app: AppState, tab: str, model_key: Optional[str], gallery_key: Optional[str], k: Any,
                   query: Optional[str], picked: Any, progress: Any = None) -> tuple[list, list]:
    """After a model switch: the Text -> image outputs (baseline tiles, adapted tiles, note) and the Image ->
    text ones (preview, baseline rows, adapted rows, note). The open tab's last query is answered again by
    the new model; the other tab's results are cleared, with a note saying why (never the previous model's
    tiles and scores under the new model's label)."""
    label = app.adapted_label(model_key)
    cleared = f"Results cleared: the model changed to **{label}**; search again to see its answers."
    t2i_v: list = [[], [], cleared if str(query or "").strip() else ""]
    i2t_v: list = [None, [], [], cleared if picked else ""]
    if tab == "t2i" and str(query or "").strip():
        base, adapted, status = tab_text_to_image.search_text(app, query, k, model_key, gallery_key, progress)
        t2i_v = [base, adapted, f"Re-run for **{label}** after the model switch. "
                 + status.replace(tab_text_to_image.MATCH_NOTE, "").strip()]
    elif tab == "i2t" and picked:
        preview, base, adapted, status = tab_image_to_text.rerun(app, picked, k, model_key, gallery_key, progress)
        i2t_v = [preview, base, adapted, f"Re-run for **{label}** after the model switch. {status}"]
    return t2i_v, i2t_v


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
