"""Image-text retrieval metrics: R@1/5/10 in both directions and their mean (mR).

Follows the HarMA evaluation (``Retrieval.py`` L124-234, method.md §4.1) except for ties. Retrieval
sets have many exactly tied scores (UCM's test split holds 377 distinct captions among 1,050, and
identical captions have identical embeddings), and any fixed tie-break makes R@K depend on the order
of the items in the annotation file. The default rule, ``ties="expected"``, scores each query by the
expected hit over all orderings of its tied candidates (McSherry & Najork, ECIR 2008), which no
reordering of the files can change. ``"stable"`` (the earlier rule: equal scores in file order),
``"optimistic"`` and ``"pessimistic"`` (ties resolved for / against the ground truth) remain available.
Everything is computed by counting, chunk by chunk, so a 10k x 50k similarity matrix never needs a
second full-size matrix.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .errors import InputError

KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS) + ("mR",)
TIE_RULES = ("expected", "stable", "optimistic", "pessimistic")


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
        raise InputError(f"sim must be non-empty, got shape {tuple(sim.shape)}")
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
        raise InputError(f"image(s) {missing} have no caption in text_to_image")
    return t2i


def _check_finite(block: torch.Tensor) -> None:
    if block.is_floating_point() and not torch.isfinite(block).all():
        raise InputError("sim contains NaN or infinite values")


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


def tie_counts(
    sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int], chunk_size: int = 1024
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per query, where its best-scored ground truth sits among the candidates, ties included.

    For every query, with ``s`` the best score of its ground truth(s): ``above`` candidates score
    more than ``s``, ``tied`` candidates score exactly ``s`` (the ground truth itself included), and
    ``relevant`` of those tied candidates are ground truths (always 1 for a caption query). These
    three numbers decide R@K under every tie rule, and none of them depends on the order of the
    images or captions.

    Args:
        sim: (N_img, N_txt) similarity matrix.
        text_to_image: (N_txt,) index of each caption's image; every image needs >= 1 caption.
        chunk_size: rows/columns processed at once (memory is about ``chunk_size * N``).

    Returns:
        ``((above, tied, relevant) per image query, (above, tied, relevant) per caption query)``,
        long tensors of shapes (N_img,) and (N_txt,).
    """
    t2i = _check_inputs(sim, text_to_image, chunk_size)
    n_img, n_txt = sim.shape
    dev = sim.device

    above_t = torch.empty(n_txt, dtype=torch.long, device=dev)
    tied_t = torch.empty(n_txt, dtype=torch.long, device=dev)
    for c0 in range(0, n_txt, chunk_size):
        block = sim[:, c0 : c0 + chunk_size]  # (N_img, C)
        _check_finite(block)
        gt = block.gather(0, t2i[c0 : c0 + chunk_size][None])  # (1, C)
        above_t[c0 : c0 + chunk_size] = (block > gt).sum(0, dtype=torch.int32).long()
        tied_t[c0 : c0 + chunk_size] = (block == gt).sum(0, dtype=torch.int32).long()

    above_i = torch.empty(n_img, dtype=torch.long, device=dev)
    tied_i = torch.empty(n_img, dtype=torch.long, device=dev)
    rel_i = torch.empty(n_img, dtype=torch.long, device=dev)
    for r0 in range(0, n_img, chunk_size):
        rows = sim[r0 : r0 + chunk_size]  # (C, N_txt)
        own = t2i[None, :] == torch.arange(r0, r0 + rows.shape[0], device=dev)[:, None]
        best = rows.masked_fill(~own, float("-inf")).amax(1, keepdim=True)  # best own-caption score
        eq = rows == best
        above_i[r0 : r0 + chunk_size] = (rows > best).sum(1, dtype=torch.int32).long()
        tied_i[r0 : r0 + chunk_size] = eq.sum(1, dtype=torch.int32).long()
        rel_i[r0 : r0 + chunk_size] = (eq & own).sum(1, dtype=torch.int32).long()
    return (above_i, tied_i, rel_i), (above_t, tied_t, torch.ones_like(tied_t))


def hit_probability(above: torch.Tensor, tied: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """Probability that a query finds a ground truth in its top ``k`` when tied scores are ordered
    at random: the ``k - above`` places left for the tied group are filled by a uniform draw from it,
    and the query misses only if none of them is relevant (hypergeometric; McSherry & Najork 2008).

    Args:
        above, tied, relevant: per-query counts from :func:`tie_counts`.
        k: cut-off, >= 1.

    Returns:
        (N,) float64 probabilities in [0, 1].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    slots = (k - above).clamp(min=0)
    n, r = tied.double(), relevant.double()
    miss = torch.ones_like(n)
    for j in range(k):  # P(no relevant among `slots` draws) = prod_j (n - r - j) / (n - j), j < slots
        take = j < slots
        miss = torch.where(take, miss * ((n - r - j).clamp(min=0) / (n - j).clamp(min=1)), miss)
    return 1.0 - miss


def expected_ranks(
    sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int], chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based rank of every query's first ground truth, expected over random orders of tied scores.

    A tied group of ``t`` candidates holding ``r`` ground truths puts the first of them at expected
    position ``(t + 1) / (r + 1)`` of the group, so the expected rank is ``above + (t + 1) / (r + 1)``:
    the per-query number behind the tie-aware R@K, and like it independent of the order of the
    images and captions. With no ties it is the plain rank (``retrieval_ranks + 1``).

    Returns:
        ``(per image query, per caption query)``: float64 tensors of shapes (N_img,) and (N_txt,).
    """
    out = []
    for above, tied, relevant in tie_counts(sim, text_to_image, chunk_size):
        out.append(above.double() + (tied.double() + 1) / (relevant.double() + 1))
    return out[0], out[1]


def _recalls(counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ties: str) -> list[float]:
    above, tied, relevant = counts
    out = []
    for k in KS:
        if ties == "expected":
            hit = hit_probability(above, tied, relevant, k)
        elif ties == "optimistic":
            hit = (above < k).double()
        else:  # pessimistic: the relevant ones of the tied group come last
            hit = (above + tied - relevant < k).double()
        out.append(100.0 * hit.mean().item())
    return out


def retrieval_metrics(
    sim: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    chunk_size: int = 1024,
    ties: str = "expected",
) -> dict[str, float]:
    """R@1/5/10 for image->text and text->image retrieval, and their mean mR.

    i2t: an image counts as retrieved at K if any of its captions is in the top K. t2i: a caption's
    single ground-truth image must be in the top K. Values are percentages, not rounded.

    Args:
        sim: (N_img, N_txt) image-text similarity matrix (any real dtype, any device).
        text_to_image: (N_txt,) index of each caption's image; every image needs >= 1 caption.
        chunk_size: rows/columns processed at once, bounding extra memory.
        ties: how exactly equal scores are ordered. ``"expected"`` (default): the expected R@K over
            all orderings of tied candidates, independent of file order. ``"stable"``: equal
            scores keep file order (the candidate with the smaller index first).
            ``"optimistic"`` / ``"pessimistic"``: ties resolved for / against the ground truth,
            the bounds of every other rule. Without ties all four agree.

    Returns:
        Dict with keys ``i2t_R@1 i2t_R@5 i2t_R@10 t2i_R@1 t2i_R@5 t2i_R@10 mR``.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties={ties!r} is not one of {', '.join(TIE_RULES)}")
    out: dict[str, float] = {}
    if ties == "stable":
        i2t_ranks, t2i_ranks = retrieval_ranks(sim, text_to_image, chunk_size)
        out.update({f"i2t_R@{k}": recall_at_k(i2t_ranks, k) for k in KS})
        out.update({f"t2i_R@{k}": recall_at_k(t2i_ranks, k) for k in KS})
    else:
        i2t_counts, t2i_counts = tie_counts(sim, text_to_image, chunk_size)
        out.update(zip((f"i2t_R@{k}" for k in KS), _recalls(i2t_counts, ties)))
        out.update(zip((f"t2i_R@{k}" for k in KS), _recalls(t2i_counts, ties)))
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
