"""Image-text retrieval metrics: R@1/5/10 in both directions and their mean (mR).

Follows the HarMA evaluation (``Retrieval.py`` L124-234, method.md §4.1), with ties broken by a
stable descending sort instead of numpy's unstable ``argsort``. Ranks are computed by counting,
chunk by chunk, so a 10k x 50k similarity matrix never needs a second full-size matrix.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS) + ("mR",)


def _check_inputs(
    sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int], chunk_size: int
) -> torch.Tensor:
    """Validate ``sim`` and return ``text_to_image`` as a long tensor on ``sim.device``."""
    if not isinstance(sim, torch.Tensor):
        raise ValueError(f"sim must be a torch.Tensor, got {type(sim).__name__}")
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D (N_img, N_txt), got shape {tuple(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise ValueError(f"sim must hold real numbers, got dtype {sim.dtype}")
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"sim must be non-empty, got shape {tuple(sim.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    t2i = torch.as_tensor(text_to_image, device=sim.device)
    if t2i.dim() != 1 or t2i.numel() != n_txt:
        raise ValueError(
            f"text_to_image must be 1-D with one entry per caption ({n_txt}), "
            f"got shape {tuple(t2i.shape)}"
        )
    if t2i.is_floating_point() or t2i.is_complex() or t2i.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer indices, got dtype {t2i.dtype}")
    t2i = t2i.long()
    bad = (t2i < 0) | (t2i >= n_img)
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"text_to_image[{t}] = {int(t2i[t])} is out of range for {n_img} images"
        )
    counts = torch.bincount(t2i, minlength=n_img)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"image(s) {missing} have no caption in text_to_image")
    return t2i


def _check_finite(block: torch.Tensor) -> None:
    if block.is_floating_point() and not torch.isfinite(block).all():
        raise ValueError("sim contains NaN or infinite values")


def _count_before(
    scores: torch.Tensor, gt: torch.Tensor, idx: torch.Tensor, gt_idx: torch.Tensor, dim: int
) -> torch.Tensor:
    """Per query, #scores > gt plus #scores == gt at a smaller index (stable descending rank)."""
    # int32 bool-sums are markedly faster on CPU than the default int64.
    above = (scores > gt).sum(dim, dtype=torch.int32)
    tied = scores == gt
    if (tied.sum(dim, dtype=torch.int32) > 1).any():  # ties beyond the ground truth itself
        above += (tied & (idx < gt_idx)).sum(dim, dtype=torch.int32)
    return above.long()


def retrieval_ranks(
    sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int], chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the ground truth for every image and every caption query.

    The rank of a candidate is the number of candidates scored strictly higher plus the number
    scored equally with a smaller index, i.e. its position in a *stable* descending sort. For an
    image query (i2t) it is the best rank among the image's ground-truth captions.

    Args:
        sim: (N_img, N_txt) similarity matrix.
        text_to_image: (N_txt,) index of each caption's image; every image needs >= 1 caption.
        chunk_size: rows/columns processed at once (memory is about ``chunk_size * N``).

    Returns:
        ``(i2t_ranks, t2i_ranks)``, long tensors of shapes (N_img,) and (N_txt,).
    """
    t2i = _check_inputs(sim, text_to_image, chunk_size)
    n_img, n_txt = sim.shape
    img_idx = torch.arange(n_img, device=sim.device)
    txt_idx = torch.arange(n_txt, device=sim.device)

    # t2i: column t, ground truth at row t2i[t].
    t2i_ranks = torch.empty(n_txt, dtype=torch.long, device=sim.device)
    for c0 in range(0, n_txt, chunk_size):
        block = sim[:, c0 : c0 + chunk_size]  # (N_img, C)
        _check_finite(block)
        gt_row = t2i[c0 : c0 + chunk_size]
        gt = block.gather(0, gt_row[None])  # (1, C)
        ranks = _count_before(block, gt, img_idx[:, None], gt_row[None], 0)
        t2i_ranks[c0 : c0 + chunk_size] = ranks

    # i2t: rank of caption t within its image's row, then the minimum over the image's captions.
    i2t_ranks = torch.full((n_img,), n_txt, dtype=torch.long, device=sim.device)
    for c0 in range(0, n_txt, chunk_size):
        cols = txt_idx[c0 : c0 + chunk_size]
        rows = sim[t2i[cols]]  # (C, N_txt): the row of each caption's image
        gt = rows.gather(1, cols[:, None])  # (C, 1)
        ranks = _count_before(rows, gt, txt_idx[None], cols[:, None], 1)
        i2t_ranks.scatter_reduce_(0, t2i[cols], ranks, reduce="amin")
    return i2t_ranks, t2i_ranks


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Percentage (0-100) of queries whose 0-based ground-truth rank is below ``k``.

    Args:
        ranks: (N,) 0-based ranks, e.g. from :func:`retrieval_ranks`.
        k: cut-off, >= 1.

    Returns:
        R@k as a float percentage.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ranks.numel() == 0:
        raise ValueError("ranks is empty")
    return 100.0 * (ranks < k).sum().item() / ranks.numel()


def retrieval_metrics(
    sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int], chunk_size: int = 1024
) -> dict[str, float]:
    """R@1/5/10 for image->text and text->image retrieval, and their mean mR.

    i2t: an image counts as retrieved at K if any of its captions is in the top K (best rank
    among its ground truths). t2i: a caption's single ground-truth image must be in the top K.
    Ties are broken as a stable descending sort would: of two equal scores, the candidate with
    the smaller index ranks first. Values are percentages, not rounded.

    Args:
        sim: (N_img, N_txt) image-text similarity matrix (any real dtype, any device).
        text_to_image: (N_txt,) index of each caption's image; every image needs >= 1 caption.
        chunk_size: rows/columns processed at once, bounding extra memory.

    Returns:
        Dict with keys ``i2t_R@1 i2t_R@5 i2t_R@10 t2i_R@1 t2i_R@5 t2i_R@10 mR``.
    """
    i2t_ranks, t2i_ranks = retrieval_ranks(sim, text_to_image, chunk_size)
    out = {f"i2t_R@{k}": recall_at_k(i2t_ranks, k) for k in KS}
    out.update({f"t2i_R@{k}": recall_at_k(t2i_ranks, k) for k in KS})
    out["mR"] = sum(out.values()) / len(out)
    return out


def format_table(metrics: Mapping[str, float] | Mapping[str, Mapping[str, float]]) -> str:
    """Render retrieval metrics as a small aligned text table with 2 decimals.

    Args:
        metrics: dict with (at least) the keys returned by :func:`retrieval_metrics`, or a dict
            of such dicts keyed by row name (e.g. ``{"baseline": ..., "adapted": ...}``), which
            adds a leading row-name column.

    Returns:
        A header line and one line of values per row, grouped as i2t | t2i | mR.
    """
    if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
        rows = dict(metrics)
    else:
        rows = {"": metrics}
    for name, row in rows.items():
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            where = f"metrics[{name!r}]" if name else "metrics"
            raise ValueError(f"{where} is missing keys {missing}")
    groups = [[f"{d}_R@{k}" for k in KS] for d in ("i2t", "t2i")] + [["mR"]]
    width = 8
    label = max(len(str(n)) for n in rows)
    lead = (lambda text: f"{text:<{label}} | ") if label else (lambda text: "")
    header = lead("") + " | ".join(" ".join(k.replace("_", " ").rjust(width) for k in g) for g in groups)
    lines = [header]
    for name, row in rows.items():
        values = " | ".join(" ".join(f"{float(row[k]):.2f}".rjust(width) for k in g) for g in groups)
        lines.append(lead(str(name)) + values)
    return "\n".join(lines)
