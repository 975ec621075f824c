"""Modality-gap diagnostics for image and text embeddings (docs/method.md §5.4).

Centroid gap and cone effect follow Liang et al., "Mind the Gap" (NeurIPS 2022); alignment and
uniformity follow Wang & Isola (ICML 2020); the linear probe follows Fahim et al. (2024). All
numbers are computed in the original (L2-normalised) embedding space, never on a 2-D projection.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

_CHUNK = 1024  # rows of a pairwise block processed at once


def _as_embeddings(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] == 0:
        raise InputError(f"{name} needs at least 2 non-empty embeddings, got {tuple(x.shape)}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return F.normalize(x, dim=-1)


def _mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of unit vectors, exactly: (|sum x|^2 - n) / (n (n - 1))."""
    n = x.shape[0]
    s = x.double().sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def _uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t |u - v|^2) over distinct pairs; |u - v|^2 = 2 - 2 cos for unit vectors."""
    n = x.shape[0]
    parts = []
    for r0 in range(0, n, _CHUNK):
        logits = -t * (2.0 - 2.0 * (x[r0 : r0 + _CHUNK] @ x.T))  # (C, n)
        rows = torch.arange(r0, min(r0 + _CHUNK, n), device=x.device)
        logits[rows - r0, rows] = -math.inf  # drop self-pairs
        parts.append(torch.logsumexp(logits.flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0)) - math.log(n * (n - 1))


def knn_same_label(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) fraction of each unit row's k cosine nearest neighbours (not itself) sharing its label."""
    n = x.shape[0]
    same = []
    for r0 in range(0, n, _CHUNK):
        sims = x[r0 : r0 + _CHUNK] @ x.T  # (C, n)
        rows = torch.arange(r0, min(r0 + _CHUNK, n), device=x.device)
        sims[rows - r0, rows] = -math.inf
        nn = sims.topk(k, dim=1).indices  # (C, k)
        same.append((labels[nn] == labels[rows, None]).float().mean(1))
    return torch.cat(same)


def _knn_purity(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean fraction of each point's k cosine nearest neighbours (not itself) sharing its label."""
    return float(knn_same_label(x, labels, k).mean())


def _linear_probe(x: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Held-out accuracy of a logistic regression predicting modality (seeded 50/50 split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    xs, ys = x.cpu().double().numpy(), labels.cpu().numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(
        xs, ys, test_size=0.5, stratify=ys, random_state=seed
    )
    clf = LogisticRegression(max_iter=1000).fit(x_tr, y_tr)
    return float(clf.score(x_te, y_te))


def _check_pairs(
    text_to_image: torch.Tensor | Sequence[int], n_img: int, n_txt: int
) -> torch.Tensor:
    t2i = torch.as_tensor(text_to_image)
    if t2i.dim() != 1 or t2i.numel() != n_txt:
        raise ValueError(
            f"text_to_image must be 1-D with one entry per caption ({n_txt}), "
            f"got shape {tuple(t2i.shape)}"
        )
    if t2i.is_floating_point() or t2i.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer indices, got dtype {t2i.dtype}")
    if ((t2i < 0) | (t2i >= n_img)).any():
        raise ValueError(f"text_to_image has indices outside [0, {n_img})")
    return t2i.long()


def canonical_order(
    image_keys: Sequence[str], caption_keys: Sequence[str], text_to_image: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """Row orders of a split's images and captions that depend on their content, not on their order.

    :func:`modality_gap` samples rows by position (the balanced sample of k-NN purity and the probe's
    split, and uniformity beyond ``max_points``), so the same split listed in another order gives other
    numbers. Passing the rows in this order removes that: images sort by key (e.g. their path), captions
    by (key, their image's sorted position). Captions equal in both are interchangeable.

    Returns:
        ``(image_order, caption_order, text_to_image)``: index lists to take the rows with, and each
        reordered caption's image in the reordered images.
    """
    if len(caption_keys) != len(text_to_image):
        raise ValueError(f"{len(caption_keys)} caption keys for {len(text_to_image)} text_to_image entries")
    image_order = sorted(range(len(image_keys)), key=image_keys.__getitem__)
    position = {old: new for new, old in enumerate(image_order)}
    caption_order = sorted(range(len(caption_keys)), key=lambda t: (caption_keys[t], position[text_to_image[t]]))
    return image_order, caption_order, [position[text_to_image[t]] for t in caption_order]


def modality_gap(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int] | None = None,
    *,
    k: int = 10,
    max_points: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Scalar diagnostics of how far apart, and how clustered, the two modalities are.

    Embeddings are L2-normalised here, so raw encoder outputs can be passed. Centroids, mean
    cosines and alignment use every point. Uniformity uses a seeded sample of at most
    ``max_points`` per modality (the joint value uses the union of both samples, so it reflects
    the modalities' relative sizes). k-NN purity and the linear probe use a class-balanced
    sample: ``min(N_img, N_txt, max_points)`` points from each modality, so chance is about 0.5.
    The samples are taken by row position: for numbers that do not depend on the order of a file,
    pass the rows in :func:`canonical_order`.

    Args:
        image_emb: (N_img, D) image embeddings, N_img >= 2.
        text_emb: (N_txt, D) text embeddings, N_txt >= 2.
        text_to_image: optional (N_txt,) index of each caption's image; enables ``alignment``.
        k: neighbours for k-NN purity (capped at the balanced sample size minus one).
        max_points: per-modality cap on the sample used for pairwise quantities.
        seed: seed for sub-sampling and the probe's train/test split.

    Returns:
        Dict of floats: ``centroid_distance``, ``centroid_cosine``, ``alignment`` (only with
        ``text_to_image``), ``uniformity_image``, ``uniformity_text``, ``uniformity_joint``,
        ``mean_cosine_image``, ``mean_cosine_text``, ``knn_modality_purity``,
        ``knn_purity_chance``, ``linear_probe_accuracy``.
    """
    img = _as_embeddings(image_emb, "image_emb")
    txt = _as_embeddings(text_emb, "text_emb").to(img.device)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding dims differ: image {img.shape[1]} vs text {txt.shape[1]}")
    if k < 1 or max_points < 2:
        raise ValueError(f"need k >= 1 and max_points >= 2, got k={k}, max_points={max_points}")

    out: dict[str, float] = {}
    mu_img, mu_txt = img.double().mean(0), txt.double().mean(0)
    out["centroid_distance"] = float((mu_img - mu_txt).norm())
    out["centroid_cosine"] = float(F.cosine_similarity(mu_img, mu_txt, dim=0))
    if text_to_image is not None:
        t2i = _check_pairs(text_to_image, img.shape[0], txt.shape[0]).to(img.device)
        out["alignment"] = float((img[t2i].double() - txt.double()).pow(2).sum(1).mean())

    # The balanced sample is a prefix of each modality's seeded permutation.
    gen = torch.Generator().manual_seed(seed)
    perm_img = torch.randperm(img.shape[0], generator=gen)[:max_points].to(img.device)
    perm_txt = torch.randperm(txt.shape[0], generator=gen)[:max_points].to(img.device)
    img_s, txt_s = img[perm_img], txt[perm_txt]
    out["uniformity_image"] = _uniformity(img_s)
    out["uniformity_text"] = _uniformity(txt_s)
    out["uniformity_joint"] = _uniformity(torch.cat([img_s, txt_s]))
    out["mean_cosine_image"] = _mean_cosine(img)
    out["mean_cosine_text"] = _mean_cosine(txt)

    m = min(img_s.shape[0], txt_s.shape[0])
    both = torch.cat([img_s[:m], txt_s[:m]])  # (2m, D)
    labels = torch.cat([torch.zeros(m), torch.ones(m)]).long().to(img.device)
    out["knn_modality_purity"] = _knn_purity(both, labels, min(k, 2 * m - 1))
    out["knn_purity_chance"] = (m - 1) / (2 * m - 1)
    out["linear_probe_accuracy"] = _linear_probe(both, labels, seed)
    return out
