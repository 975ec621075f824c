"""2-D projections of image and caption embeddings (UMAP, cosine), cached on disk: one model's
(:func:`embedding_projection`) and two models' in one frame (:func:`aligned_projection`).

Two models' maps (issue 34): the baseline gets its own UMAP (cosine, ``n_neighbors=30``, seeded); the
adapted model's UMAP starts from the baseline layout and is then rotated, scaled and shifted onto it
(orthogonal Procrustes over the shared items). The baseline layout depends on the baseline embeddings
only, so it does not change when only the adapted model does. Chosen by map fidelity
(:func:`harma.map_fidelity.map_fidelity`) on the bundled gallery (UCM test, 210 images, 377 distinct
captions): the 2-D change of k-NN modality / scene purity against the original space's was, for
ucm-harma, -0.034 vs -0.047 / +0.082 vs +0.076 (trustworthiness 0.985 / 0.994); ucm-mrs -0.027 vs
-0.026 / +0.067 vs +0.029; ucm-harma-paper -0.040 vs -0.044 / +0.087 vs +0.077; ucm-harma-tuned
-0.064 vs -0.056 / +0.100 vs +0.092. ``n_neighbors=15`` halved the changes (ucm-mrs' modality change
to -0.005), 50 overshot (ucm-mrs -0.059); independent fits without the shared start can place the
clusters differently, and AlignedUMAP (the previous choice) re-lays out the baseline for every adapted
model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .gap import modality_gap
from .io import arrays_key, cached_json

PROJECTION_VERSION = 2
ALIGNED, SEPARATE, PROCRUSTES = "AlignedUMAP", "UMAP + Procrustes", "Procrustes"
MAP_NEIGHBORS = 30  # UMAP n_neighbors of the two-model maps (see the module docstring)


def umap_2d(x: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
            init: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, D) -> (N, 2): UMAP with the cosine metric and a fixed seed, started from ``init`` (an (N, 2)
    layout) when given; PCA below 16 points (too few for a neighbour graph)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 16:
        centred = x - x.mean(0)
        _, _, v = np.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T
    import umap

    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(n_neighbors, len(x) - 1),
                        min_dist=min_dist, random_state=seed,
                        **({"init": np.asarray(init, dtype=np.float32)} if init is not None else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba notices
        return reducer.fit_transform(x)


def sample_rows(n: int, m: int, seed: int) -> list[int]:
    """All of ``range(n)`` if ``n <= m``, else ``m`` sorted rows drawn with ``seed``."""
    if n <= m:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].tolist())


def _cache_path(cache_dir: Optional[Path], prefix: str, arrays: list[np.ndarray], settings: dict) -> Optional[Path]:
    """``<cache_dir>/projections/<prefix><hash>.json``, the hash over the exact rows and the settings."""
    return None if cache_dir is None else Path(cache_dir) / "projections" / f"{prefix}{arrays_key(arrays, settings)}.json"


def embedding_projection(images: torch.Tensor, captions: Optional[torch.Tensor] = None, *,
                         caption_rows: Optional[Sequence[int]] = None,
                         text_to_image: Optional[Sequence[int]] = None, max_points: int = 1000,
                         cache_dir: Optional[Path] = None, seed: int = 0) -> dict:
    """UMAP of a seeded sample (at most ``max_points`` per modality) and modality-gap numbers.

    Args:
        images: (N, D) normalised image embeddings.
        captions: (M, D) normalised embeddings of distinct captions, or None.
        caption_rows: for the gap numbers, row of ``captions`` for each caption of the split
            (e.g. :attr:`harma.retrieval.CaptionPool.caption_to_text`), with ``text_to_image`` its image.
        max_points: per modality, for the plot; the gap numbers use every embedding.
        cache_dir: folder of cached projections (``<cache_dir>/projections/``); None = no cache.

    Returns:
        ``{"xy": [[x, y], ...] (images first), "img_rows", "txt_rows", "gap": {...} or {}}``.
    """
    img_rows = sample_rows(len(images), max_points, seed)
    txt_rows = sample_rows(len(captions), max_points, seed + 1) if captions is not None else []
    x = torch.cat([images[img_rows]] + ([captions[txt_rows]] if txt_rows else [])).float().numpy()
    settings = {"v": PROJECTION_VERSION, "seed": seed, "img": img_rows, "txt": txt_rows,
                "caption_rows": list(caption_rows) if caption_rows is not None else None,
                "text_to_image": list(text_to_image) if text_to_image is not None else None}

    def compute() -> dict:
        xy = umap_2d(x, seed)
        gap = {}
        if captions is not None and caption_rows is not None and text_to_image is not None \
                and len(images) >= 2 and len(caption_rows) >= 2:
            gap = modality_gap(images, captions[torch.as_tensor(list(caption_rows))], list(text_to_image), seed=seed)
        return {"xy": [[float(a), float(b)] for a, b in xy], "img_rows": img_rows, "txt_rows": txt_rows, "gap": gap}

    return cached_json(_cache_path(cache_dir, "", [x], settings), compute)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(0)
    return centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T


def procrustes_onto(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """``moving`` (N, 2) rotated/reflected, scaled and shifted to best match ``fixed`` (least squares)."""
    from scipy.linalg import orthogonal_procrustes

    m0, f0 = moving - moving.mean(0), fixed - fixed.mean(0)
    rotation, scale = orthogonal_procrustes(m0, f0)
    return m0 @ rotation * (scale / max(float((m0 ** 2).sum()), 1e-12)) + fixed.mean(0)


def aligned_2d(base: np.ndarray, adapted: np.ndarray, seed: int = 0, n_neighbors: int = MAP_NEIGHBORS,
               min_dist: float = 0.1, use_umap: bool = True, method: str = SEPARATE,
               base_xy: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Two (N, D) embeddings of the same N items -> two (N, 2) layouts in one frame, and the method.

    ``SEPARATE`` (default): each model's own UMAP (cosine, seeded), the adapted one Procrustes-aligned
    onto the baseline's, which depends on ``base`` alone (``base_xy``: that layout, already computed).
    ``ALIGNED``: umap-learn's ``AlignedUMAP``, each item related to itself (both layouts fitted together).
    Without umap-learn, without ``use_umap`` or below 16 items: each model's PCA, then Procrustes.
    """
    base, adapted = np.asarray(base, dtype=np.float32), np.asarray(adapted, dtype=np.float32)
    umap = None
    if use_umap and len(base) >= 16:
        try:
            import umap
        except ImportError:
            umap = None
    if umap is not None and method == ALIGNED:
        reducer = umap.AlignedUMAP(n_neighbors=min(n_neighbors, len(base) - 1), min_dist=min_dist,
                                   metric="cosine", random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba notices
            reducer.fit([base, adapted], relations=[{i: i for i in range(len(base))}])
        xy_base, xy_adapted = (np.asarray(e) for e in reducer.embeddings_)
        return xy_base, xy_adapted, ALIGNED
    if umap is not None:
        xy_base = np.asarray(base_xy) if base_xy is not None else umap_2d(base, seed, n_neighbors, min_dist)
        start = (xy_base - xy_base.mean(0)) * (10 / max(float(np.abs(xy_base - xy_base.mean(0)).max()), 1e-12))
        return xy_base, procrustes_onto(umap_2d(adapted, seed, n_neighbors, min_dist, init=start), xy_base), SEPARATE
    xy_base = np.asarray(base_xy) if base_xy is not None else _pca_2d(base)
    return xy_base, procrustes_onto(_pca_2d(adapted), xy_base), PROCRUSTES


def aligned_projection(base: tuple[torch.Tensor, Optional[torch.Tensor]],
                       adapted: tuple[torch.Tensor, Optional[torch.Tensor]], *, max_points: int = 1000,
                       cache_dir: Optional[Path] = None, seed: int = 0, use_umap: bool = True) -> dict:
    """Baseline and adapted (images, distinct captions) embeddings of the same gallery in one 2-D frame.

    The same seeded sample of items (at most ``max_points`` per modality) is drawn for both models,
    so point ``i`` is the same image or caption in both layouts.

    Returns:
        ``{"base": [[x, y], ...], "adapted": [...] (images first), "img_rows", "txt_rows", "method"}``.
    """
    n_img = len(base[0])
    img_rows = sample_rows(n_img, max_points, seed)
    txt_rows = sample_rows(len(base[1]), max_points, seed + 1) if base[1] is not None else []

    def stack(emb: tuple[torch.Tensor, Optional[torch.Tensor]]) -> np.ndarray:
        parts = [emb[0][img_rows]] + ([emb[1][txt_rows]] if txt_rows else [])
        return torch.cat(parts).float().numpy()

    xb, xa = stack(base), stack(adapted)
    settings = {"v": PROJECTION_VERSION, "kind": "aligned", "seed": seed, "umap": use_umap, "img": img_rows,
                "txt": txt_rows, "neighbors": MAP_NEIGHBORS}

    base_path = _cache_path(cache_dir, "base-", [xb], settings)  # the baseline layout alone: any adapted model

    def compute() -> dict:
        known = cached_json(base_path, lambda: None) if base_path is not None and base_path.is_file() else None
        xy_b, xy_a, method = aligned_2d(xb, xa, seed, use_umap=use_umap, **({"base_xy": known["xy"]} if
                                        isinstance(known, dict) and known.get("method") == SEPARATE else {}))
        if base_path is not None and method == SEPARATE:
            cached_json(base_path, lambda: {"xy": [[float(a), float(b)] for a, b in xy_b], "method": method})
        return {"base": [[float(a), float(b)] for a, b in xy_b], "adapted": [[float(a), float(b)] for a, b in xy_a],
                "img_rows": img_rows, "txt_rows": txt_rows, "method": method}

    return cached_json(_cache_path(cache_dir, "aligned-", [xb, xa], settings), compute)
