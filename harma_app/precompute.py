"""Ship what a cold start on the bundled gallery would compute for the default model: both models'
embeddings of its images and captions (``embeddings/<key>/``, encoding them is most of a fresh
Space's first answer) and the Embedding space maps (``aligned-<key>.json``; fitting AlignedUMAP takes
about half a minute on 2 CPU cores, plus umap's compile). Both are named by what they depend on
(both models' weights by sha256, the gallery's image bytes and captions, the map's sampling), so the
app uses them only for exactly those models and that gallery; anything else is computed as usual.
Run it again after changing the checkpoints or the gallery:

    python -m harma_app.precompute            # writes assets/demo/precomputed/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import Optional

from harma.errors import one_line
from harma.io import atomic_write_bytes

from .common import DEMO, PRECOMPUTED, SHIPPED, USER_ERRORS, AppError
from .plots import aligned_view, layout_key
from .state import AppConfig, AppState


def precompute(state: AppState, model_key: Optional[str] = None) -> list[str]:
    """Ship the default (or ``model_key``) model's embeddings and maps on the default gallery under
    :data:`PRECOMPUTED`, removing those of earlier models; returns the files and folders written."""
    gallery = state.gallery(state.default_gallery)
    retrievers = state.retrievers(model_key, state.default_gallery)
    texts = gallery.pool.texts if gallery.pool is not None else None
    PRECOMPUTED.mkdir(parents=True, exist_ok=True)
    written = [folder for r in retrievers for folder in r.ship(SHIPPED, gallery.images, texts)]
    for old in SHIPPED.iterdir():
        if old not in written:
            shutil.rmtree(old)
    key = layout_key(retrievers, gallery, state.config.umap_points)
    view = aligned_view(retrievers, gallery, state.config.umap_points, state.cache_dir)
    path = PRECOMPUTED / f"aligned-{key}.json"
    atomic_write_bytes(path, json.dumps(view, separators=(",", ":")).encode())
    for old in PRECOMPUTED.glob("aligned-*.json"):
        if old != path:
            old.unlink()
    return [str(p) for p in written + [path]]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harma_app.precompute", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="preset or model key (default: the app's default model)")
    args = p.parse_args(argv)
    try:
        config = AppConfig(data=str(DEMO), split="test")
        print("\n".join(precompute(AppState(config), args.model)))
    except (AppError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
