"""Before/after numbers with bootstrap confidence intervals: how far apart the modalities are, and how
well the joint space groups scenes.

- **Centroid distance**: ‖mean image − mean caption‖ (Liang et al., "Mind the Gap", NeurIPS 2022).
- **Relative Modality Gap** (Schrodi et al., "Two Effects, One Trigger", ICLR 2025): with the cosine
  dissimilarity d(a, b) = (1 − cos(a, b)) / 2, RMG = m / ((d_img + d_txt) / 2 + m), where m is the mean
  d of matched image-caption pairs and d_img, d_txt the mean d between distinct images and between
  distinct captions. Scale-free in [0, 1): near 0 when a caption sits on its image, about 1/2 or more
  when the modalities occupy separate regions. Every (image, own caption) pair counts, so an image
  with five captions gives five matched pairs; with one caption per image this is the paper's formula.
- **k-NN scene purity**: the share of each point's k nearest neighbours (cosine, images and captions
  together) that show the same scene class; a caption has its image's class. Chance is the
  probability that two random points share a class. It is what "semantic clustering" means here.

Intervals are percentile bootstrap intervals over images, seeded: a resample draws images with
replacement and carries each drawn image's captions. Per-point quantities (a point's mean
dissimilarity to the others, its neighbours) are computed once on the full set and averaged with the
resample's weights, so a resample costs a matrix product, not a new neighbour search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .gap import knn_same_label


@dataclass(frozen=True)
class Estimate:
    """A number and its bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _mean_dissimilarity_to_others(x: torch.Tensor) -> torch.Tensor:
    """(N,) mean of d(x_i, x_j) over j != i, for unit rows: (1 - (x_i . sum(x) - 1) / (N - 1)) / 2."""
    x = x.double()
    return (1 - (x @ x.sum(0) - 1) / (x.shape[0] - 1)) / 2


def _weighted(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B,) weighted means of ``values`` (N,) under each row of weights ``w`` (B, N)."""
    return (w @ values) / w.sum(1)


def gap_with_intervals(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Sequence[int],
                       classes: Optional[Sequence[str]] = None, *, k: int = 10, n_boot: int = 200,
                       level: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
    """Centroid distance, RMG and (with ``classes``, one per image) k-NN scene purity and its chance
    level, each with a ``level`` bootstrap interval over ``n_boot`` seeded resamples of the images.

    Embeddings are L2-normalised here. Raises :class:`~harma.errors.InputError` for fewer than two
    images or captions, an image without captions, or a caption pointing at no image.
    """
    img = F.normalize(torch.as_tensor(image_emb).double(), dim=-1)
    txt = F.normalize(torch.as_tensor(text_emb).double(), dim=-1)
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    n, t = img.shape[0], txt.shape[0]
    if n < 2 or t < 2 or t2i.numel() != t:
        raise InputError(f"need >= 2 images and >= 2 captions with one image index each (got {n}, {t}, {t2i.numel()})")
    if ((t2i < 0) | (t2i >= n)).any() or torch.bincount(t2i, minlength=n).eq(0).any():
        raise InputError("every caption needs an image in range and every image a caption")
    if not 0 < level < 1 or n_boot < 1:
        raise InputError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")

    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=gen)
    w = torch.zeros(n_boot + 1, n, dtype=torch.double)
    w[0] = 1.0  # row 0: the full set (the point estimate)
    w[1:].scatter_add_(1, draws, torch.ones(n_boot, n, dtype=torch.double))
    wc = w[:, t2i]  # a caption weighs what its image does

    values: dict[str, torch.Tensor] = {}
    mean_img, mean_txt = (w @ img) / w.sum(1, keepdim=True), (wc @ txt) / wc.sum(1, keepdim=True)
    values["centroid_distance"] = (mean_img - mean_txt).norm(dim=1)
    matched = _weighted(wc, (1 - (img[t2i] * txt).sum(1)) / 2)
    intra = (_weighted(w, _mean_dissimilarity_to_others(img)) + _weighted(wc, _mean_dissimilarity_to_others(txt))) / 2
    values["relative_modality_gap"] = matched / (intra + matched)
    if classes is not None:
        if len(classes) != n:
            raise InputError(f"{len(classes)} classes for {n} images")
        names = sorted(set(classes))
        cls = torch.tensor([names.index(c) for c in classes])
        labels = torch.cat([cls, cls[t2i]])
        joint = torch.cat([img, txt]).float()
        same = knn_same_label(joint, labels, min(k, n + t - 1)).double()
        values["knn_scene_purity"] = _weighted(torch.cat([w, wc], 1), same)
        counts = torch.bincount(labels).double()
        chance = float((counts * (counts - 1)).sum() / ((n + t) * (n + t - 1)))
        values["knn_scene_chance"] = torch.full((n_boot + 1,), chance, dtype=torch.double)

    lo, hi = (1 - level) / 2, (1 + level) / 2
    return {name: Estimate(float(v[0]), float(v[1:].quantile(lo)), float(v[1:].quantile(hi)))
            for name, v in values.items()}
