"""Benchmark sections on the app's modality-gap views, for every shipped checkpoint (checkpoints/*: each adapter
folder against the backbone it adapts, the baseline):

- ``fidelity``: how faithful the Embedding tab's 2-D maps are (:func:`harma.map_fidelity.map_fidelity`): k-NN
  modality and scene purity on the original embeddings and on the map, trustworthiness, and whether the
  baseline -> adapted change on the map has the original change's sign; on the bundled demo gallery
  (assets/demo) and the full UCM test split.
- ``gapfig``: seconds the "Modality gap" tab takes on UCM train (1,680 images, 8,400 captions) from the
  embedding cache: its numbers for both models (first time and from the in-memory cache) and its figures.

The maps come from the app's own projection (:func:`harma_app.plots.aligned_view`, with the maps shipped for
the demo gallery), so the numbers are those of the maps the app shows. Embeddings and maps are cached in
``.cache/bench-fidelity`` (the first run encodes each gallery with each model and lays out its maps).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from harma.gap_figures import gap_figures
from harma.map_fidelity import map_fidelity
from harma_app.common import DEMO, PRECOMPUTED
from harma_app.galleries import Gallery
from harma_app.plots import aligned_view
from harma_app.state import AppConfig, AppState
from harma_app.tab_modality_gap import FIGURES_DIR, modality_gap_view

from .sections import ROOT, Skip

CACHE = ROOT / ".cache" / "bench-fidelity"
KEYS = (("knn_modality_purity", "mod"), ("knn_scene_purity", "scene"))


def _models(app: AppState, quick: bool) -> list[str]:
    """The model choices backed by a shipped adapter folder under checkpoints/ (the default first)."""
    shipped = [k for k, s in app.sources.items() if s.problem is None and s.adapters is not None
               and Path(s.adapters).resolve().parent == (ROOT / "checkpoints").resolve()]
    shipped.sort(key=lambda k: k != app.default_model)
    if not shipped:
        raise Skip("no shipped checkpoint can be loaded here (checkpoints/README.md)")
    return shipped[:1] if quick else shipped


def _galleries(data: str, quick: bool) -> Iterator[tuple[str, AppState]]:
    if (DEMO / "test.csv").is_file():
        yield "demo (assets/demo)", AppState(AppConfig(data=str(DEMO), cache_dir=str(CACHE)))
    if not quick and Path(data).is_dir():
        yield "UCM test", AppState(AppConfig(data=data, split="test", cache_dir=str(CACHE)))


def _fidelity(view: dict, gallery: Gallery, r, which: str) -> dict:
    """map_fidelity of one model's map, on the mapped sample (a caption has its first image's class)."""
    n, img_rows, txt_rows = len(view["img_rows"]), view["img_rows"], view["txt_rows"]
    classes = gallery.classes
    cls_i = [classes[i] for i in img_rows] if classes else None
    cls_t = [classes[gallery.pool.images[j][0]] for j in txt_rows] if classes else None
    xy = np.asarray(view[which], dtype=np.float64)
    return map_fidelity(r.images.embeddings[img_rows], r.captions.embeddings[txt_rows], xy[:n], xy[n:], cls_i, cls_t)


def _row(gallery: str, model: str, view: dict, fid: dict, base: Optional[dict] = None) -> dict:
    row: dict[str, Any] = {"gallery": gallery, "model": model, "map": view["method"],
                           "points": f"{len(view['img_rows'])}+{len(view['txt_rows'])}"}
    for key, short in KEYS:
        if fid[key] is not None:
            row[f"{short}"], row[f"{short} 2-D"] = fid[key], fid[key + "_2d"]
    row["trust"] = fid["trustworthiness"]
    if base is not None:
        for key, short in KEYS:
            if fid[key] is None:
                continue
            orig, flat = fid[key] - base[key], fid[key + "_2d"] - base[key + "_2d"]
            row[f"Δ{short}"], row[f"Δ{short} 2-D"] = orig, flat
            row[f"{short} sign"] = "same" if (orig > 0) == (flat > 0) or abs(orig) < 0.005 else "OPPOSITE"
    return row


def fidelity(device: torch.device, quick: bool, data: str, **_: Any) -> list[dict]:
    """Map fidelity of the baseline and each shipped checkpoint's map, demo gallery and UCM test split."""
    rows: list[dict] = []
    for name, app in _galleries(data, quick):
        gallery = app.gallery("data")
        if gallery.pool is None:
            continue
        last_base = None
        for key in _models(app, quick):
            t0 = time.perf_counter()
            pair = app.retrievers(key, "data")
            view = aligned_view(pair, gallery, app.config.umap_points, app.cache_dir,
                                PRECOMPUTED if gallery.bundled else None)
            fid = [_fidelity(view, gallery, r, which) for r, which in zip(pair, ("base", "adapted"))]
            base_row = _row(name, "baseline (zero-shot)", view, fid[0])
            if base_row != last_base:  # the baseline map depends on the baseline model only (printed once)
                rows.append(base_row)
                last_base = base_row
            rows.append({**_row(name, Path(app.sources[key].adapters).name, view, fid[1], fid[0]),
                         "s": time.perf_counter() - t0})
    if not rows:
        raise Skip("neither the demo gallery (assets/demo) nor UCM-Captions (--data) is here")
    return rows


def gap_figures_time(device: torch.device, quick: bool, data: str, **_: Any) -> list[dict]:
    """Seconds for the "Modality gap" tab on UCM train from the embedding cache (the demo gallery in --quick):
    the numbers of both models computed, the tab opened the first time (numbers and figures, nothing of the
    tab cached) and again (from memory)."""
    if quick:
        config = AppConfig(data=str(DEMO), cache_dir=str(CACHE))
    elif Path(data).is_dir():
        config = AppConfig(data=data, split="train", cache_dir=str(CACHE))
    else:
        raise Skip(f"UCM-Captions not found at {data} (pass --data)")
    app = AppState(config)
    gallery = app.gallery("data")
    if gallery.pool is None:
        raise Skip(f"{gallery.name} has no captions")
    split, rows = gallery.split, []
    for key in _models(app, True):
        pair = app.retrievers(key, "data")  # encodes the split the first time, then from the embedding cache
        caps = torch.tensor(gallery.pool.caption_to_text)
        t0 = time.perf_counter()
        for r in pair:
            gap_figures(r.images.embeddings, r.captions.embeddings[caps], split.text_to_image, gallery.classes)
        numbers = time.perf_counter() - t0
        shutil.rmtree(app.cache_dir / FIGURES_DIR, ignore_errors=True)
        t1 = time.perf_counter()
        *figs, note = modality_gap_view(app, key, "data", None)
        first = time.perf_counter() - t1
        if figs[0] is None:
            raise Skip(f"the tab answered with a message: {note}")
        t2 = time.perf_counter()
        modality_gap_view(app, key, "data", None)
        again = time.perf_counter() - t2
        rows.append({"gallery": "demo (assets/demo)" if quick else "UCM train", "images": split.num_images,
                     "captions": split.num_captions, "model": Path(app.sources[key].adapters).name, "numbers, both models s": numbers, "tab first open s": first,
                     "tab again s": again})
    return rows
