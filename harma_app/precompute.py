"""Ship the Embedding space maps of the default model on the bundled gallery, so a fresh clone or a
Space opens that tab without fitting AlignedUMAP (about half a minute on 2 CPU cores, plus umap's
compile). The map is named by :func:`harma_app.plots.layout_key` (both models' weights, the gallery's
image bytes and captions, the sampling), so the app uses it only for exactly those models and that
gallery; anything else is computed as usual. Run it again after changing the checkpoints or the gallery:

    python -m harma_app.precompute            # writes assets/demo/precomputed/aligned-<key>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from harma.errors import one_line
from harma.io import atomic_write_bytes

from .common import DEMO, PRECOMPUTED, USER_ERRORS, AppError
from .plots import aligned_view, layout_key
from .state import AppConfig, AppState


def precompute(state: AppState, model_key: Optional[str] = None) -> str:
    """Compute the default (or ``model_key``) model's map on the default gallery into :data:`PRECOMPUTED`,
    removing maps of earlier models; returns the file written."""
    gallery = state.gallery(state.default_gallery)
    retrievers = state.retrievers(model_key, state.default_gallery)
    key = layout_key(retrievers, gallery, state.config.umap_points)
    PRECOMPUTED.mkdir(parents=True, exist_ok=True)
    view = aligned_view(retrievers, gallery, state.config.umap_points, state.cache_dir)
    path = PRECOMPUTED / f"aligned-{key}.json"
    atomic_write_bytes(path, json.dumps(view, separators=(",", ":")).encode())
    for old in PRECOMPUTED.glob("aligned-*.json"):
        if old != path:
            old.unlink()
    return str(path)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harma_app.precompute", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="preset or model key (default: the app's default model)")
    args = p.parse_args(argv)
    try:
        config = AppConfig(data=str(DEMO), split="test")
        print(precompute(AppState(config), args.model))
    except (AppError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
