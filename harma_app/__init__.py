"""The HarMA demo app (``python app.py``): remote-sensing image-text retrieval, the frozen backbone (baseline)
next to the adapted model, in Gradio.

Ranking, caching and metrics live in the library (``harma.retrieval``, ``harma.metrics``, ``harma.gap``); this
package wires them to Gradio. Importing it loads no model, builds no UI and makes no network call.

Modules: :mod:`.common` (paths, limits, user-facing errors), :mod:`.state` (configuration, model sources and
loading, the shared :class:`~.state.AppState`), :mod:`.galleries`, :mod:`.indexes` (``--index`` galleries, archive
indexes searched on disk), :mod:`.plots` (UMAP figure), one module per tab (:mod:`.tab_text_to_image`,
:mod:`.tab_image_to_text`, :mod:`.tab_embedding_space`, :mod:`.tab_metrics`),
:mod:`.controls` (model, top k, status line, gallery source) and :mod:`.blocks` (assembly and launch).
Handlers are plain functions of an :class:`~.state.AppState` first, so they can be called directly.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls (the app runs offline)

from .blocks import build_demo, launch_options, main  # noqa: E402
from .state import AppConfig, AppState, parse_args  # noqa: E402

__all__ = ["AppConfig", "AppState", "build_demo", "launch_options", "main", "parse_args"]
