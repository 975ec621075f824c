"""Seconds to each tab's first answer on a fresh clone, for every shipped checkpoint (issue 34 item 5: at most 2 s).

    python -m benchmarks.first_answer            # every model the checkout can load
    python -m benchmarks.first_answer --model ucm-mrs

A fresh clone: the bundled demo gallery and an empty cache folder, so every answer comes from what
``python -m harma_app.precompute`` shipped in ``assets/demo/precomputed/`` (or is computed). Each tab of each
model is timed as the first thing a new app state does (its own empty cache folder): loading both models,
the shipped embeddings and maps, and the tab's own numbers. The process is warmed once (imports, one model
load), as a running server would be; that first answer is the first row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

from harma_app import (tab_compare, tab_embedding_space, tab_image_to_text, tab_metrics, tab_modality_gap,
                       tab_text_to_image)
from harma_app.common import DEMO
from harma_app.state import AppConfig, AppState

QUERY = "a baseball diamond"
TABS: dict[str, Callable[[AppState, str], Any]] = {
    "Text → image": lambda app, m: tab_text_to_image.search_text(app, QUERY, 8, m, "data", None),
    "Image → text": lambda app, m: tab_image_to_text.pick_image(app, 0, 8, m, "data", None),
    "Embedding space": lambda app, m: tab_embedding_space.embedding_view(app, m, "data", False, None),
    "Metrics": lambda app, m: tab_metrics.metrics_table(app, m, "data", None),
    "Compare": lambda app, m: tab_compare.compare_view(app, m, "data", next(iter(tab_compare.DIRECTIONS)),
                                                       tab_compare.SORTS[0], tab_compare.ALL, None),
    "Modality gap": lambda app, m: tab_modality_gap.modality_gap_view(app, m, "data", None),
}


def fresh_state(cache: str) -> AppState:
    return AppState(AppConfig(data=str(DEMO), split="test", cache_dir=cache))


def first_answers(models: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """One row per model: seconds to each tab's first answer on a fresh state (:data:`TABS`)."""
    with tempfile.TemporaryDirectory() as warm:
        app = fresh_state(warm)
        keys = [app.model_key(m) for m in models] if models else [k for k, s in app.sources.items() if not s.problem]
        t0 = time.perf_counter()
        TABS["Text → image"](app, keys[0])  # the process's first answer: first model load, lazy imports
        rows: list[dict[str, Any]] = [{"model": f"(process's first) {keys[0].split(':')[-1]}",
                                       "Text → image": round(time.perf_counter() - t0, 2)}]
    for key in keys:
        row: dict[str, Any] = {"model": key}
        for tab, answer in TABS.items():
            with tempfile.TemporaryDirectory() as cache:
                app = fresh_state(cache)
                t0 = time.perf_counter()
                answer(app, key)
                row[tab] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.first_answer", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", help="model names or keys (default: every model the checkout can load)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = first_answers(args.model)
    print("seconds to the first answer, fresh cache, demo gallery")
    print(f"{'model':34}" + "".join(f"{t:>16}" for t in TABS))
    for row in rows:
        print(f"{row['model'][:34]:34}" + "".join(f"{row[t]:>16.2f}" if t in row else f"{'':>16}" for t in TABS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
