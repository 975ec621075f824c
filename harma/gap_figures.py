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

Everything comes from one similarity matrix per model, of the images and the split's distinct caption rows
(a split repeats many captions; each repeat still counts as a caption of its own), and a shift needs no new
product, because ``t . normalize(x - lam delta) = (t . x - lam t . delta) / |x - lam delta|``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

LAMBDAS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # denser between "as trained" (0) and "centroids met" (1)
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


def cosine_histograms(sim: torch.Tensor, copies: torch.Tensor, matched: torch.Tensor, bins: int = BINS) -> dict:
    """Densities of matched (each caption with its image, ``matched``) and unmatched (every other pair)
    cosines on ``bins`` equal bins over their range, and the two means; ``sim`` (N, D) scores the images
    against the distinct caption rows, row ``d`` standing for ``copies[d]`` captions."""
    lo, hi = float(sim.min()), float(sim.max())
    hi = hi if hi > lo else lo + 1e-6
    width = (hi - lo) / bins
    where = ((sim - lo) / width).long().clamp_(0, bins - 1)  # the last bin holds hi, as torch.histc
    every = torch.bincount(where.flatten(), weights=copies.expand_as(sim).flatten(), minlength=bins)
    own = torch.histc(matched, bins=bins, min=lo, max=hi).double()
    n_pairs, n_matched = float(copies.sum()) * sim.shape[0], matched.numel()
    total = float((sim.double() @ copies).sum())

    def density(counts: torch.Tensor) -> list[float]:
        return (counts / max(float(counts.sum()) * width, 1e-300)).tolist()

    return {"edges": [lo + width * i for i in range(bins + 1)], "matched": density(own),
            "unmatched": density((every - own).clamp_min(0)),
            "matched_mean": float(matched.double().mean()),
            "unmatched_mean": (total - float(matched.double().sum())) / (n_pairs - n_matched)
            if n_pairs > n_matched else None}


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


def top1_hits(sim: torch.Tensor, text_to_image: torch.Tensor, inverse: torch.Tensor,
              copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and per caption query, the probability that the top-1 result is a ground truth, equal
    scores ordered at random (as :func:`harma.metrics.retrieval_metrics` with ``ties="expected"``, k = 1).

    ``sim`` (N, D) scores the images against the D distinct caption rows; caption ``t`` of the split is
    row ``inverse[t]``, and row ``d`` stands for ``copies[d]`` captions of the split (all of them candidates
    of an image query, so repeated captions tie)."""
    n = sim.shape[0]
    gt = sim[text_to_image, inverse]  # (M,) each caption with its image
    col_max = sim.amax(0)  # (D,)
    hit = gt >= col_max[inverse]  # captions whose image scores the most (maybe tied with other images)
    tied_images = torch.ones(sim.shape[1], dtype=torch.float64)
    cols = inverse[hit].unique()
    if cols.numel():
        tied_images[cols] = (sim[:, cols] == col_max[cols]).sum(0).double()
    t2i_hit = hit.double() / tied_images[inverse]
    row_max = sim.amax(1)  # (N,)
    own = torch.zeros(n, dtype=torch.float64).scatter_add_(0, text_to_image, (gt == row_max[text_to_image]).double())
    i2t_hit = torch.zeros(n, dtype=torch.float64)
    top = (own > 0).nonzero().flatten()  # images whose best caption is one of theirs (maybe tied)
    if top.numel():
        at_max = (sim[top] == row_max[top, None]).double() @ copies  # captions of the split at the top score
        i2t_hit[top] = own[top] / at_max
    return i2t_hit, t2i_hit


def shift_curve(img: torch.Tensor, txt: torch.Tensor, distinct: torch.Tensor, sim: torch.Tensor,
                inverse: torch.Tensor, copies: torch.Tensor, text_to_image: torch.Tensor,
                lambdas: Sequence[float] = LAMBDAS) -> dict:
    """R@1 (percent, ties at their expected rank) both ways as every image moves to
    ``normalize(x - lam * delta)``, ``delta`` the centroid difference of ``img`` and every caption ``txt``;
    ``sim`` = ``img @ distinct.T`` (repeated caption rows scored once, see :func:`top1_hits`)."""
    delta = img.double().mean(0) - txt.double().mean(0)
    t_delta = (distinct.double() @ delta).float()[None, :]  # (1, D)
    x_delta = (img.double() @ delta).float()  # (N,)
    dd = float(delta @ delta)
    out = {"lambdas": [float(v) for v in lambdas], "i2t_R@1": [], "t2i_R@1": []}
    shifted = torch.empty_like(sim)
    for lam in lambdas:
        norm = (1 - 2 * lam * x_delta + lam * lam * dd).clamp_min(1e-12).sqrt()  # |x - lam delta|, (N,)
        torch.sub(sim, t_delta, alpha=lam, out=shifted).div_(norm[:, None])
        i2t, t2i = top1_hits(shifted, text_to_image, inverse, copies)
        out["i2t_R@1"].append(100.0 * float(i2t.mean()))
        out["t2i_R@1"].append(100.0 * float(t2i.mean()))
    return out


def caption_share_by_class(img: torch.Tensor, sim: torch.Tensor, copies: torch.Tensor,
                           classes: Optional[Sequence[str]], k: int = 10) -> dict:
    """Per scene class (and ``"all"``): the mean share of an image's k cosine nearest neighbours among all
    images and captions (not itself) that are captions; ``chance``: the captions' share of the points.
    ``sim`` (N, D) scores the distinct caption rows, row ``d`` standing for ``copies[d]`` captions."""
    n, m = sim.shape[0], int(copies.sum())
    kk = min(k, n + m - 1)
    within = img @ img.T
    within.fill_diagonal_(-float("inf"))
    near_img = within.topk(min(kk, n - 1), dim=1).values  # the k nearest of each kind hold the k nearest
    near_cap = sim.topk(min(kk, sim.shape[1]), dim=1)
    values = torch.cat([near_img, near_cap.values], 1)
    weight = torch.cat([torch.ones_like(near_img, dtype=torch.float64), copies[near_cap.indices]], 1)
    is_caption = torch.cat([torch.zeros_like(near_img, dtype=torch.bool),
                            torch.ones_like(near_cap.values, dtype=torch.bool)], 1)
    order = values.argsort(dim=1, descending=True, stable=True)  # ties: images first (arbitrary, as topk)
    weight, is_caption = weight.gather(1, order), is_caption.gather(1, order)
    before = weight.cumsum(1) - weight
    taken = (kk - before).clamp(min=0).minimum(weight)  # how many of each candidate's copies are among the k
    share = (taken * is_caption).sum(1) / kk
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
    distinct, inverse = torch.unique(txt, dim=0, return_inverse=True)  # a split repeats many captions
    copies = torch.bincount(inverse, minlength=distinct.shape[0]).double()
    sim = img @ distinct.T  # (N, D), computed once
    matched = sim[t2i, inverse]
    return {"histogram": cosine_histograms(sim, copies, matched, bins), "dimensions": gap_dimensions(img, txt, top),
            "shift": shift_curve(img, txt, distinct, sim, inverse, copies, t2i, lambdas),
            "neighbours": caption_share_by_class(img, sim, copies, classes, k)}
