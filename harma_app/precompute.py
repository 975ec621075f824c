"""Ship what a cold start on the bundled gallery would compute for the default model (or the models
named): each model's and its baseline's embeddings of the images and captions (``embeddings/<key>/``;
encoding them is most of a fresh Space's first answer) and the Embedding space maps
(``aligned-<key>.json``; fitting AlignedUMAP takes about half a minute on 2 CPU cores, plus umap's
compile). Both are named by what they depend on (the models' weights by sha256, the gallery's image
bytes and captions, the map's sampling), so the app uses them only for exactly those models and that
gallery and computes anything else. Each model adds about 0.9 MB, and the whole demo folder must stay
under :data:`~harma_app.common.DEMO_MAX_BYTES`. Run it again after changing the checkpoints or the
gallery:

    python -m harma_app.precompute            # rewrites assets/demo/precomputed/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from harma.errors import one_line
from harma.io import atomic_write_bytes, folder_bytes

from .common import DEMO, DEMO_MAX_BYTES, PRECOMPUTED, SHIPPED, USER_ERRORS, AppError
from .plots import aligned_view, layout_key
from .state import AppConfig, AppState


def precompute(state: AppState, model_keys: Optional[list[str]] = None) -> list[str]:
    """Ship the embeddings and maps of ``model_keys`` (default: the app's default model) on the default
    gallery under :data:`PRECOMPUTED`, removing everything else there; returns what was written.
    Raises :class:`AppError` when the demo folder ends up over :data:`DEMO_MAX_BYTES`."""
    gallery = state.gallery(state.default_gallery)
    texts = gallery.pool.texts if gallery.pool is not None else None
    PRECOMPUTED.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key in model_keys or [state.default_model]:
        retrievers = state.retrievers(key, state.default_gallery)
        written += [folder for r in retrievers for folder in r.ship(SHIPPED, gallery.images, texts)]
        view = aligned_view(retrievers, gallery, state.config.umap_points, state.cache_dir)
        path = PRECOMPUTED / f"aligned-{layout_key(retrievers, gallery, state.config.umap_points)}.json"
        atomic_write_bytes(path, json.dumps(view, separators=(",", ":")).encode())
        written.append(path)
    for old in [*SHIPPED.iterdir(), *PRECOMPUTED.glob("aligned-*.json")]:
        if old not in written:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    size = folder_bytes(PRECOMPUTED.parent)
    if size > DEMO_MAX_BYTES:
        raise AppError(f"{PRECOMPUTED.parent} now takes {size / 2**20:.1f} MiB, over its "
                       f"{DEMO_MAX_BYTES / 2**20:.0f} MiB budget: ship fewer models (--model)")
    return [str(p) for p in dict.fromkeys(written)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harma_app.precompute", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", help="preset names or model keys (default: the app's default model; "
                   "each adds about 0.9 MB to the demo folder's 6 MiB budget)")
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
