"""Ship what a cold start on the bundled gallery would compute for every shipped model (or the models
named): each model's and its baseline's embeddings of the images and captions (``embeddings/<key>/``;
encoding them is most of a fresh Space's first answer) and the Embedding space maps
(``aligned-<key>.json``; fitting AlignedUMAP takes about half a minute on 2 CPU cores, plus umap's
compile). Both are named by what they depend on (the models' weights by sha256, the gallery's image
bytes and captions, the map's sampling), so the app uses them only for exactly those models and that
gallery and computes anything else. It also ships the Embedding
space tab's numbers table (``gap/<key>.json``: its bootstrap intervals and the sklearn import take
about a second on a first open). Each model adds about 0.9 MB, and the whole demo folder must stay
under :data:`~harma_app.common.DEMO_MAX_BYTES` (8 MiB). Run it again after changing the checkpoints, the
gallery or the maps:

    python -m harma_app.precompute             # rewrites assets/demo/precomputed/ for every shipped model
    python -m harma_app.precompute --examples  # example queries that each get a check mark on the demo gallery
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from harma.data import RetrievalSplit, clean_caption, load_split
from harma.errors import one_line
from harma.io import atomic_write_bytes, folder_bytes
from harma.retrieval import CaptionPool

from .common import ASSETS, DEMO, DEMO_MAX_BYTES, PRECOMPUTED, SHIPPED, USER_ERRORS, AppError
from .plots import aligned_view, layout_key
from .state import AppConfig, AppState
from .tab_embedding_space import ship_gap_rows
from .tab_scene import ship_scene
from .tab_text_to_image import load_examples


def ship_model(state: AppState, key: str) -> list[Path]:
    """Ship one model's (and its baseline's) embeddings and its map on the default gallery; returns the files."""
    gallery = state.gallery(state.default_gallery)
    texts = gallery.pool.texts if gallery.pool is not None else None
    retrievers = state.retrievers(key, state.default_gallery)
    written = [folder for r in retrievers for folder in r.ship(SHIPPED, gallery.images, texts)]
    view = aligned_view(retrievers, gallery, state.config.umap_points, state.cache_dir)
    path = PRECOMPUTED / f"aligned-{layout_key(retrievers, gallery, state.config.umap_points)}.json"
    atomic_write_bytes(path, json.dumps(view, separators=(",", ":")).encode())
    gap = ship_gap_rows(gallery, retrievers, gallery.classes, PRECOMPUTED)  # the Embedding tab's numbers table
    return [*written, path, *([gap] if gap else [])]


def finish(written: list[Path]) -> list[str]:
    """Remove what was shipped before and not now; refuse a demo folder over its budget."""
    for old in [*SHIPPED.iterdir(), *PRECOMPUTED.glob("aligned-*.json"), *PRECOMPUTED.glob("gap/*.json")]:
        if old not in written:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    size = folder_bytes(PRECOMPUTED.parent)
    if size > DEMO_MAX_BYTES:
        raise AppError(f"{PRECOMPUTED.parent} now takes {size / 2**20:.1f} MiB, over its "
                       f"{DEMO_MAX_BYTES / 2**20:.0f} MiB budget: ship fewer models (--model)")
    return [str(p) for p in dict.fromkeys(written)]


def precompute(state: AppState, model_keys: Optional[list[str]] = None) -> list[str]:
    """Ship the embeddings and maps of ``model_keys`` (default: every model this checkout can load, i.e.
    every shipped checkpoint) on the default gallery under :data:`PRECOMPUTED`, removing everything else
    there; returns what was written. Raises :class:`AppError` when the demo folder ends up over
    :data:`DEMO_MAX_BYTES`."""
    keys = model_keys or [k for k, s in state.sources.items() if s.problem is None]
    PRECOMPUTED.mkdir(parents=True, exist_ok=True)
    SHIPPED.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for key in keys:
        written += ship_model(state, state.model_key(key))
    return finish(written)


DANGLING = {"a", "an", "the", "of", "on", "in", "at", "with", "and", "some", "to", "is", "are", "there", "by", "its"}


def choose_examples(split: RetrievalSplit, queries: list[str]) -> list[str]:
    """``queries`` with each one that matches no ground-truth caption of ``split`` (whole-word phrase,
    :meth:`CaptionPool.images_matching`, the ✓ rule) replaced by the opening words of a caption (3 or
    more, not ending in a word like "on") closest to it: the most words shared, the fewest added, then
    matching the most images, then the shortest; a phrase inside another example, or holding one, is
    left out. So every example gets a ✓ on ``split``."""
    pool = CaptionPool.from_captions(split.captions, split.text_to_image)
    cleaned = list(dict.fromkeys(clean_caption(c, None) for c in split.captions))
    out: list[str] = []
    for q in queries:
        if pool.images_matching(q):
            out.append(q)
            continue
        words = set(clean_caption(q, None).split())
        others = [f" {clean_caption(o, None)} " for o in [*out, *queries] if o != q]
        phrases = {" ".join(t.split()[:j]) for t in cleaned for j in range(3, len(t.split()) + 1)}
        phrases = {p for p in phrases if p.split()[-1] not in DANGLING
                   and not any(f" {p} " in o or o in f" {p} " for o in others)}

        def score(phrase: str) -> tuple:
            w = phrase.split()
            closeness = len(words & set(w)) - 0.25 * len(set(w) - words)
            return -closeness, -len(pool.images_matching(phrase)), len(w), phrase

        out.append(min(phrases, key=score))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harma_app.precompute", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", help="preset names or model keys (default: every model the checkout can "
                   "load; each adds about 0.9 MB to the demo folder's 8 MiB budget)")
    p.add_argument("--examples", action="store_true", help="instead: rewrite assets/examples.json so that every "
                   "example query matches ground-truth captions of the demo gallery (its ✓ rule)")
    args = p.parse_args(argv)
    try:
        if args.examples:
            path = ASSETS / "examples.json"
            queries = choose_examples(load_split(DEMO, "test"), load_examples())
            atomic_write_bytes(path, (json.dumps({"queries": queries}, indent=2, ensure_ascii=False) + "\n").encode())
            print("\n".join(queries))
            return 0
        config = AppConfig(data=str(DEMO), split="test")
        state = AppState(config)
        print("\n".join(precompute(state, args.model)))
        print("\n".join(map(str, ship_scene(state, PRECOMPUTED / "scene"))))  # Scene search: the default model only
    except (AppError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
