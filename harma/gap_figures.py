"""The numbers behind the modality-gap literature's figures, in the original embedding space.

For one model's image and caption embeddings of a split (:func:`gap_figures`):

- **Matched vs unmatched cosine** (Liang et al., "Mind the Gap", NeurIPS 2022, Fig. 1-style): histograms of
  the cosine of every caption with its own image and with every other image. A gap shows as both
  histograms sitting far below 1; alignment pushes the matched one right, away from the unmatched one.
- **Dimensions that carry the gap** (Schrodi et al., "Two Effects, One Trigger", ICLR 2025): with
  ``delta = mean image - mean caption``, the squared centroid distance is ``sum_d delta_d ** 2``; each
  dimension's term, largest first. A gap carried by a few dimensions shows as a steep cumulative curve.
- **R@1 under a shift along the gap** (Liang et al. 2022, Fig. 3-style): every image embedding moved to
  ``normalize(x - lam * delta)``: ``lam = 1`` puts the image centroid on the caption centroid (before
  re-normalising), ``lam = 0`` is the model as it is. R@1 both ways at each ``lam``.
- **Caption share of an image's neighbours, per scene class**: for each image, the share of its k cosine
  nearest neighbours among all images and captions (not itself) that are captions, averaged per class.
  Near 0: images cluster with images (a gap); the captions' share of all points is what mixing would give.

Everything comes from one image-caption similarity matrix per model: a shift needs no new product,
because ``t . normalize(x - lam delta) = (t . x - lam t . delta) / |x - lam delta|``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

LAMBDAS = tuple(round(-1.0 + 0.25 * i, 2) for i in range(13))  # -1 .. 2 in steps of 0.25
BINS = 40
TOP_DIMS = 10


def _check(images: torch.Tensor, captions: torch.Tensor, text_to_image: Sequence[int]) -> tuple:
    img = torch.as_tensor(images).detach().cpu().float()
    txt = torch.as_tensor(captions).detach().cpu().float()
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise InputError(f"need (N, D) images and (M, D) captions of one width, got {tuple(img.shape)} "
                         f"and {tuple(txt.shape)}")
    if img.shape[0] < 2 or txt.shape[0] < 2:
        raise InputError(f"need at least 2 images and 2 captions, got {img.shape[0]} and {txt.shape[0]}")
    if not torch.isfinite(img).all() or not torch.isfinite(txt).all():
        raise InputError("the embeddings contain NaN or infinite values")
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    if t2i.numel() != txt.shape[0] or ((t2i < 0) | (t2i >= img.shape[0])).any():
        raise InputError(f"text_to_image needs one image index in [0, {img.shape[0]}) per caption "
                         f"({txt.shape[0]}), got {t2i.numel()} entries")
    if torch.bincount(t2i, minlength=img.shape[0]).eq(0).any():
        raise InputError("every image needs at least one caption")
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), t2i


def cosine_histograms(sim: torch.Tensor, text_to_image: torch.Tensor, bins: int = BINS) -> dict:
    """Densities of matched (a caption and its image) and unmatched (every other pair) cosines of
    ``sim`` (N_img, N_txt) on ``bins`` equal bins over their range, and the two means."""
    matched = sim[text_to_image, torch.arange(sim.shape[1])]
    lo, hi = float(sim.min()), float(sim.max())
    hi = hi if hi > lo else lo + 1e-6
    width = (hi - lo) / bins
    every = torch.histc(sim, bins=bins, min=lo, max=hi).double()
    own = torch.histc(matched, bins=bins, min=lo, max=hi).double()
    n_other = sim.numel() - matched.numel()

    def density(counts: torch.Tensor) -> list[float]:
        return (counts / max(float(counts.sum()) * width, 1e-300)).tolist()

    return {"edges": [lo + width * i for i in range(bins + 1)], "matched": density(own),
            "unmatched": density((every - own).clamp_min(0)),
            "matched_mean": float(matched.double().mean()),
            "unmatched_mean": (float(sim.double().sum() - matched.double().sum()) / n_other) if n_other else None}


def gap_dimensions(img: torch.Tensor, txt: torch.Tensor, top: int = TOP_DIMS) -> dict:
    """Each dimension's term ``delta_d ** 2`` of the squared centroid distance, largest first: the
    ``top`` dimensions and their shares, and the cumulative sum over all dimensions sorted that way."""
    delta = img.double().mean(0) - txt.double().mean(0)
    terms = delta.pow(2)
    order = terms.argsort(descending=True, stable=True)
    total = float(terms.sum())
    cumulative = terms[order].cumsum(0)
    dims_for = {f"dims_for_{p}": int((cumulative < p / 100 * total).sum()) + 1 for p in (50, 90)}
    return {"top_dims": order[:top].tolist(), "top_terms": terms[order[:top]].tolist(),
            "top_shares": (terms[order[:top]] / max(total, 1e-300)).tolist(),
            "cumulative": cumulative.tolist(), "squared_distance": total, **dims_for}


def top1_hits(sim: torch.Tensor, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and per caption query, the probability that the top-1 result is a ground truth, equal
    scores ordered at random (as :func:`harma.metrics.retrieval_metrics` with ``ties="expected"``, k = 1)."""
    n, m = sim.shape
    cols = torch.arange(m)
    gt = sim[text_to_image, cols]  # (M,) each caption with its image
    col_max = sim.amax(0)
    t2i_hit = torch.zeros(m, dtype=torch.float64)
    top = (gt >= col_max).nonzero().flatten()  # captions whose image scores the most (maybe tied)
    if top.numel():
        t2i_hit[top] = 1.0 / (sim[:, top] == col_max[top]).sum(0).double()
    row_max = sim.amax(1)
    own_best = torch.full((n,), -float("inf")).scatter_reduce(0, text_to_image, gt, reduce="amax")
    i2t_hit = torch.zeros(n, dtype=torch.float64)
    top = (own_best >= row_max).nonzero().flatten()
    if top.numel():
        at_max = sim[top] == row_max[top, None]  # (H, M)
        own = text_to_image[None, :] == top[:, None]
        i2t_hit[top] = (at_max & own).sum(1).double() / at_max.sum(1).double()
    return i2t_hit, t2i_hit


def shift_curve(img: torch.Tensor, txt: torch.Tensor, sim: torch.Tensor, text_to_image: torch.Tensor,
                lambdas: Sequence[float] = LAMBDAS) -> dict:
    """R@1 (percent, ties at their expected rank) both ways as every image moves to
    ``normalize(x - lam * delta)``, ``delta`` the centroid difference; ``sim`` is ``img @ txt.T``."""
    delta = img.double().mean(0) - txt.double().mean(0)
    t_delta = (txt.double() @ delta).float()[None, :]  # (1, M)
    x_delta = (img.double() @ delta).float()  # (N,)
    dd = float(delta @ delta)
    out = {"lambdas": [float(v) for v in lambdas], "i2t_R@1": [], "t2i_R@1": []}
    shifted = torch.empty_like(sim)
    for lam in lambdas:
        norm = (1 - 2 * lam * x_delta + lam * lam * dd).clamp_min(1e-12).sqrt()  # |x - lam delta|, (N,)
        torch.sub(sim, t_delta, alpha=lam, out=shifted).div_(norm[:, None])
        i2t, t2i = top1_hits(shifted, text_to_image)
        out["i2t_R@1"].append(100.0 * float(i2t.mean()))
        out["t2i_R@1"].append(100.0 * float(t2i.mean()))
    return out


def caption_share_by_class(img: torch.Tensor, sim: torch.Tensor, classes: Optional[Sequence[str]],
                           k: int = 10) -> dict:
    """Per scene class (and ``"all"``): the mean share of an image's k cosine nearest neighbours among all
    images and captions (not itself) that are captions; ``chance``: the captions' share of the points."""
    n, m = sim.shape
    kk = min(k, n + m - 1)
    within = img @ img.T
    within.fill_diagonal_(-float("inf"))
    nearest = torch.cat([within, sim], 1).topk(kk, dim=1).indices  # (N, kk), columns >= n are captions
    share = (nearest >= n).float().mean(1).double()
    out = {"k": kk, "chance": m / (n + m - 1), "all": float(share.mean()), "classes": [], "shares": [],
           "counts": []}
    if classes is not None:
        if len(classes) != n:
            raise InputError(f"{len(classes)} classes for {n} images")
        names = sorted({str(c) for c in classes})
        cls = torch.tensor([names.index(str(c)) for c in classes])
        for i, name in enumerate(names):
            rows = cls == i
            out["classes"].append(name)
            out["shares"].append(float(share[rows].mean()))
            out["counts"].append(int(rows.sum()))
    return out


def gap_figures(images: torch.Tensor, captions: torch.Tensor, text_to_image: Sequence[int],
                classes: Optional[Sequence[str]] = None, *, k: int = 10, lambdas: Sequence[float] = LAMBDAS,
                bins: int = BINS, top: int = TOP_DIMS) -> dict:
    """The four figures' numbers for one model (see the module docstring), JSON-ready.

    Args:
        images: (N, D) image embeddings; captions: (M, D) embeddings of every caption of the split.
        text_to_image: (M,) each caption's image; every image needs a caption.
        classes: one scene class per image, or None (the per-class figure then has only ``"all"``).

    Returns:
        ``{"histogram": ..., "dimensions": ..., "shift": ..., "neighbours": ...}``: the outputs of
        :func:`cosine_histograms`, :func:`gap_dimensions`, :func:`shift_curve` and :func:`caption_share_by_class`.
    """
    img, txt, t2i = _check(images, captions, text_to_image)
    sim = img @ txt.T  # (N, M), computed once
    return {"histogram": cosine_histograms(sim, t2i, bins), "dimensions": gap_dimensions(img, txt, top),
            "shift": shift_curve(img, txt, sim, t2i, lambdas),
            "neighbours": caption_share_by_class(img, sim, classes, k)}
