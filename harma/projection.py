"""2-D projections of image and caption embeddings (UMAP, cosine), cached on disk.

umap-learn is imported lazily (about 13 s the first time, numba) and only when a projection is not
already cached; a projection is keyed by a hash of the exact embedding rows and the settings.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write_bytes
from .gap import modality_gap

PROJECTION_VERSION = 1


def umap_2d(x: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """(N, D) -> (N, 2): UMAP with the cosine metric and a fixed seed; PCA below 16 points (too few
    for a neighbour graph)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 16:
        centred = x - x.mean(0)
        _, _, v = np.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T
    import umap

    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(n_neighbors, len(x) - 1),
                        min_dist=min_dist, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba notices
        return reducer.fit_transform(x)


def sample_rows(n: int, m: int, seed: int) -> list[int]:
    """All of ``range(n)`` if ``n <= m``, else ``m`` sorted rows drawn with ``seed``."""
    if n <= m:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].tolist())


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
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(x.tobytes())
        h.update(json.dumps({"v": PROJECTION_VERSION, "seed": seed, "img": img_rows, "txt": txt_rows,
                             "caption_rows": list(caption_rows) if caption_rows is not None else None,
                             "text_to_image": list(text_to_image) if text_to_image is not None else None}).encode())
        path = Path(cache_dir) / "projections" / f"{h.hexdigest()[:32]}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                pass
    xy = umap_2d(x, seed)
    gap = {}
    if captions is not None and caption_rows is not None and text_to_image is not None \
            and len(images) >= 2 and len(caption_rows) >= 2:
        gap = modality_gap(images, captions[torch.as_tensor(list(caption_rows))], list(text_to_image), seed=seed)
    out = {"xy": [[float(a), float(b)] for a, b in xy], "img_rows": img_rows, "txt_rows": txt_rows, "gap": gap}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(out).encode())
    return out
