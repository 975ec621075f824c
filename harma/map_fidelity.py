"""How faithful a 2-D map of image and caption embeddings is to the original space.

The same k-NN numbers as :mod:`harma.gap` and :mod:`harma.gap_ci`, computed twice on the same points:
with cosine neighbours in the original (L2-normalised) space, and with Euclidean neighbours on the
2-D layout. If a map is faithful, both agree, and a before -> after change of the 2-D numbers has the
sign and size of the original-space change.

- **k-NN modality purity** (:func:`harma.gap.modality_gap`'s definition): on a class-balanced sample
  (the same seeded sample as there: ``min(N_img, N_txt, max_points)`` points of each modality), the
  share of each point's k nearest neighbours of its own modality. Chance is about 0.5.
- **k-NN scene purity** (:func:`harma.gap_ci.gap_with_intervals`'s definition): over all images and
  captions together, the share of each point's k nearest neighbours of the same scene class.
- **Trustworthiness** (Venna & Kaski 2001, :func:`sklearn.manifold.trustworthiness`): whether a
  point's 2-D neighbours are also near it in the original space (cosine); 1 = no false neighbours.

Rows are first put in an order given by their content (the embedding values, then the layout), so
the numbers do not depend on the order the rows come in.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .gap import knn_same_label

TRUST_MAX_POINTS = 4000  # trustworthiness ranks all pairs (n x n): a seeded sample above this


def _content_order(emb: torch.Tensor, xy: np.ndarray) -> np.ndarray:
    """Row order sorted by the embedding values, then the layout (ties: identical rows)."""
    keys = np.concatenate([emb.double().numpy(), xy.astype(np.float64)], axis=1)
    return np.lexsort(keys.T[::-1])  # lexsort's primary key is the last one


def _knn_same_label_2d(xy: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(N,) share of each point's k Euclidean nearest neighbours on the layout (not itself) sharing its label."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k).fit(xy).kneighbors(return_distance=False)  # self excluded
    return (labels[nn] == labels[:, None]).mean(1)


def _check(emb: torch.Tensor, xy: np.ndarray, name: str) -> tuple[torch.Tensor, np.ndarray]:
    emb = torch.as_tensor(emb).detach().cpu().float()
    xy = np.asarray(xy, dtype=np.float64)
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise InputError(f"{name}: need (N, D) embeddings with N >= 2, got shape {tuple(emb.shape)}")
    if xy.shape != (emb.shape[0], 2):
        raise InputError(f"{name}: the layout must be ({emb.shape[0]}, 2), one 2-D point per row, got {xy.shape}")
    if not torch.isfinite(emb).all() or not np.isfinite(xy).all():
        raise InputError(f"{name}: embeddings or layout contain NaN or infinite values")
    return F.normalize(emb, dim=-1), xy


def _labels(image_classes: Sequence, caption_classes: Sequence, n: int, m: int) -> np.ndarray:
    if len(image_classes) != n or len(caption_classes) != m:
        raise InputError(f"{len(image_classes)} image classes for {n} images and "
                         f"{len(caption_classes)} caption classes for {m} captions: need one each")
    names = sorted({str(c) for c in [*image_classes, *caption_classes]})
    index = {c: i for i, c in enumerate(names)}
    return np.array([index[str(c)] for c in [*image_classes, *caption_classes]], dtype=np.int64)


def map_fidelity(images: torch.Tensor, captions: torch.Tensor, xy_images: np.ndarray, xy_captions: np.ndarray,
                 image_classes: Optional[Sequence] = None, caption_classes: Optional[Sequence] = None,
                 k: int = 10, *, max_points: int = 5000, seed: int = 0) -> dict:
    """k-NN modality and scene purity in the original space and on the 2-D layout, and trustworthiness.

    Args:
        images, captions: (N, D) / (M, D) embeddings (normalised here).
        xy_images, xy_captions: (N, 2) / (M, 2) their 2-D layout, row for row.
        image_classes, caption_classes: one scene class per image / caption, or None (no scene purity).
        k: neighbours, as in :func:`harma.gap.modality_gap` (capped at what the point count allows).
        max_points: per-modality cap of the balanced sample, as in :func:`harma.gap.modality_gap`.
        seed: the sample's seed, as there.

    Returns:
        ``knn_modality_purity``, ``knn_modality_purity_2d``, ``knn_purity_chance``, ``knn_scene_purity``,
        ``knn_scene_purity_2d``, ``knn_scene_chance`` (the three None without classes),
        ``trustworthiness`` and ``k``.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    img, xy_img = _check(images, xy_images, "images")
    txt, xy_txt = _check(captions, xy_captions, "captions")
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"embedding dims differ: images {img.shape[1]} vs captions {txt.shape[1]}")
    n, m = img.shape[0], txt.shape[0]
    labels = None
    if image_classes is not None or caption_classes is not None:
        if image_classes is None or caption_classes is None:
            raise InputError("scene purity needs classes for both images and captions")
        labels = _labels(image_classes, caption_classes, n, m)
    oi, ot = _content_order(img, xy_img), _content_order(txt, xy_txt)
    img, xy_img, txt, xy_txt = img[torch.as_tensor(oi)], xy_img[oi], txt[torch.as_tensor(ot)], xy_txt[ot]
    if labels is not None:
        labels = np.concatenate([labels[:n][oi], labels[n:][ot]])

    # harma.gap.modality_gap's balanced sample: a prefix of each modality's seeded permutation
    gen = torch.Generator().manual_seed(seed)
    perm_img = torch.randperm(n, generator=gen)[:max_points]
    perm_txt = torch.randperm(m, generator=gen)[:max_points]
    s = min(len(perm_img), len(perm_txt))
    rows_img, rows_txt = perm_img[:s], perm_txt[:s]
    modality = torch.cat([torch.zeros(s), torch.ones(s)]).long()
    kk = min(k, 2 * s - 1)
    out: dict = {"k": k}
    out["knn_modality_purity"] = float(knn_same_label(torch.cat([img[rows_img], txt[rows_txt]]), modality, kk).mean())
    xy_both = np.concatenate([xy_img[rows_img.numpy()], xy_txt[rows_txt.numpy()]])
    out["knn_modality_purity_2d"] = float(_knn_same_label_2d(xy_both, modality.numpy(), kk).mean())
    out["knn_purity_chance"] = (s - 1) / (2 * s - 1)

    joint, xy_joint = torch.cat([img, txt]), np.concatenate([xy_img, xy_txt])
    out["knn_scene_purity"] = out["knn_scene_purity_2d"] = out["knn_scene_chance"] = None
    if labels is not None:
        kj = min(k, n + m - 1)
        out["knn_scene_purity"] = float(knn_same_label(joint, torch.as_tensor(labels), kj).mean())
        out["knn_scene_purity_2d"] = float(_knn_same_label_2d(xy_joint, labels, kj).mean())
        counts = np.bincount(labels).astype(np.float64)
        out["knn_scene_chance"] = float((counts * (counts - 1)).sum() / ((n + m) * (n + m - 1)))
    out["trustworthiness"] = _trustworthiness(joint, xy_joint, k, seed)
    return out


def _trustworthiness(joint: torch.Tensor, xy: np.ndarray, k: int, seed: int) -> Optional[float]:
    """sklearn's trustworthiness (cosine in the original space) of all points, or of a seeded sample of
    :data:`TRUST_MAX_POINTS`; None below 4 points (it needs k < n / 2)."""
    from sklearn.manifold import trustworthiness

    n = joint.shape[0]
    if n > TRUST_MAX_POINTS:
        rows = np.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:TRUST_MAX_POINTS].numpy())
        joint, xy, n = joint[torch.as_tensor(rows)], xy[rows], TRUST_MAX_POINTS
    kk = min(k, (n - 1) // 2)
    if kk < 1:
        return None
    return float(trustworthiness(joint.double().numpy(), xy, n_neighbors=kk, metric="cosine"))
