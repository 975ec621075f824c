"""Chunked retrieval metrics against a brute-force, loop-per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harma.metrics import (
    METRIC_KEYS,
    TIE_RULES,
    expected_ranks,
    format_table,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)


def reference_metrics(sim: torch.Tensor, text_to_image: list[int]) -> dict[str, float]:
    """Brute force: one stable descending argsort per query."""
    s = sim.double().numpy()
    n_img, n_txt = s.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = np.argsort(-s[i], kind="stable")
        pos = np.empty(n_txt, dtype=int)
        pos[order] = np.arange(n_txt)
        i2t.append(min(pos[t] for t in range(n_txt) if text_to_image[t] == i))
    for t in range(n_txt):
        order = np.argsort(-s[:, t], kind="stable")
        t2i.append(int(np.nonzero(order == text_to_image[t])[0][0]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * float(np.mean(ranks < k))
    out["mR"] = float(np.mean(list(out.values())))
    return out


def random_case(n_img: int, caps: list[int], dim: int, seed: int, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    t2i = [i for i, c in enumerate(caps) for _ in range(c)]
    txt = img[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / dim**0.5
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return img @ txt.T, t2i


def assert_close(a: dict, b: dict) -> None:
    assert list(a) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
        assert isinstance(a[key], float)


@pytest.mark.parametrize(
    "n_img,caps_fn,dim,chunk",
    [
        (30, lambda n, g: [5] * n, 16, 7),
        (50, lambda n, g: [5] * n, 8, 1024),
        (40, lambda n, g: g.integers(1, 8, size=n).tolist(), 8, 3),
        (12, lambda n, g: g.integers(1, 4, size=n).tolist(), 4, 1),
    ],
)
def test_matches_reference_random(n_img, caps_fn, dim, chunk):
    caps = caps_fn(n_img, np.random.default_rng(n_img))
    sim, t2i = random_case(n_img, caps, dim, seed=n_img)
    assert_close(retrieval_metrics(sim, t2i, chunk_size=chunk), reference_metrics(sim, t2i))


@pytest.mark.parametrize("levels", [1, 2, 3, 5])
def test_matches_reference_with_many_ties(levels):
    g = torch.Generator().manual_seed(levels)
    n_img, caps = 25, np.random.default_rng(levels).integers(1, 6, size=25).tolist()
    t2i = [i for i, c in enumerate(caps) for _ in range(c)]
    sim = torch.randint(0, levels, (n_img, len(t2i)), generator=g).float()
    expect = reference_metrics(sim, t2i)
    for chunk in (4, 1024):
        assert_close(retrieval_metrics(sim, t2i, chunk_size=chunk, ties="stable"), expect)
    # Integer dtype and rounded floats behave the same way.
    assert_close(retrieval_metrics(sim.long(), t2i, ties="stable"), expect)


def test_rounded_scores_match_reference():
    sim, t2i = random_case(20, [5] * 20, 4, seed=3, noise=3.0)
    sim = torch.round(sim * 4) / 4
    assert_close(retrieval_metrics(sim, t2i, chunk_size=6, ties="stable"), reference_metrics(sim, t2i))


def test_all_equal_scores_rank_by_index():
    # Every score ties, so the stable order is 0, 1, 2, ... in both directions.
    t2i = [0, 0, 1, 2, 2, 2]
    i2t_ranks, t2i_ranks = retrieval_ranks(torch.zeros(3, 6), t2i)
    assert i2t_ranks.tolist() == [0, 2, 3]
    assert t2i_ranks.tolist() == [0, 0, 1, 2, 2, 2]


def test_perfect_retrieval_is_100():
    t2i = torch.arange(7).repeat_interleave(5)
    sim = (torch.arange(7)[:, None] == t2i[None]).float()
    out = retrieval_metrics(sim, t2i)
    assert all(v == 100.0 for v in out.values())


def test_hand_computed_ranks():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # image 0: captions 0, 1
            [0.2, 0.8, 0.7, 0.6],  # image 1: captions 2, 3
            [0.4, 0.9, 0.1, 0.95],  # image 2: caption 4 (extra column)
        ]
    )
    sim = torch.cat([sim, torch.tensor([[0.0], [0.0], [0.3]])], dim=1)
    t2i = [0, 0, 1, 1, 2]
    i2t_ranks, t2i_ranks = retrieval_ranks(sim, t2i)
    # Image 0 row order: c0 (0.9), c2, c3, c1, c4 -> best of {c0, c1} is 0.
    # Image 1 row order: c1 (0.8), c2, c3, c0, c4 -> best of {c2, c3} is 1.
    # Image 2 row order: c3, c1, c0, c4 (0.3), c2 -> c4 has rank 3.
    assert i2t_ranks.tolist() == [0, 1, 3]
    # Columns: c0 -> img0 first; c1 -> img2, img1, img0 -> rank 2; c2 -> img1 first;
    # c3 -> img2, img1 -> rank 1; c4 -> img2 first.
    assert t2i_ranks.tolist() == [0, 2, 0, 1, 0]
    out = retrieval_metrics(sim, t2i)
    assert out["i2t_R@1"] == pytest.approx(100 / 3)
    assert out["i2t_R@5"] == 100.0
    assert out["t2i_R@1"] == pytest.approx(60.0)
    assert out["mR"] == pytest.approx((100 / 3 + 100 + 100 + 60 + 100 + 100) / 6)


def test_recall_at_k():
    assert recall_at_k(torch.tensor([0, 1, 4, 9, 10]), 5) == pytest.approx(60.0)
    with pytest.raises(ValueError):
        recall_at_k(torch.tensor([0]), 0)


@pytest.mark.parametrize(
    "sim,t2i,match",
    [
        (torch.zeros(3), [0, 1, 2], "2-D"),
        (torch.zeros(2, 3), [0, 1], "one entry per caption"),
        (torch.zeros(2, 3), [[0, 1, 1]], "one entry per caption"),
        (torch.zeros(2, 3), [0, 1, 2], r"text_to_image\[2\] = 2"),
        (torch.zeros(2, 3), [0, -1, 1], "out of range"),
        (torch.zeros(3, 3), [0, 0, 2], r"image\(s\) \[1\]"),
        (torch.zeros(2, 2), [0.0, 1.0], "integer"),
        (torch.zeros(0, 0), [], "non-empty"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), [0, 1], "NaN"),
    ],
)
def test_errors(sim, t2i, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, t2i)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(torch.zeros(1, 1), [0], chunk_size=0)


def test_format_table():
    sim, t2i = random_case(10, [5] * 10, 8, seed=0)
    table = format_table(retrieval_metrics(sim, t2i))
    header, values = table.splitlines()
    assert len(header) == len(values)
    assert "i2t R@1" in header and "t2i R@10" in header and "mR" in header
    assert values.count("|") == 2 and all("." in v for v in values.replace("|", " ").split())
    with pytest.raises(ValueError, match="missing"):
        format_table({"mR": 1.0})


# --- tie rules ---------------------------------------------------------------------------------------

def tied_case(seed: int, n_img: int = 12, levels: int = 3):
    """Scores on a few integer levels: many exact ties, among candidates and among ground truths."""
    g = torch.Generator().manual_seed(seed)
    caps = np.random.default_rng(seed).integers(1, 5, size=n_img).tolist()
    t2i = [i for i, c in enumerate(caps) for _ in range(c)]
    return torch.randint(0, levels, (n_img, len(t2i)), generator=g).double(), t2i


def permuted(sim, t2i, seed):
    """The same retrieval problem with images and captions listed in another order."""
    rng = np.random.default_rng(seed)
    pi, pt = rng.permutation(sim.shape[0]), rng.permutation(sim.shape[1])
    new_of_old = np.empty_like(pi)
    new_of_old[pi] = np.arange(len(pi))
    return sim[pi][:, pt], [int(new_of_old[t2i[t]]) for t in pt]


@pytest.mark.parametrize("seed", range(4))
def test_expected_rule_does_not_depend_on_order(seed):
    sim, t2i = tied_case(seed)
    base = retrieval_metrics(sim, t2i)
    changed = False
    for p in range(5):
        psim, pt2i = permuted(sim, t2i, 100 * seed + p)
        assert_close(retrieval_metrics(psim, pt2i, chunk_size=5), base)
        changed |= retrieval_metrics(psim, pt2i, ties="stable") != retrieval_metrics(sim, t2i, ties="stable")
    assert changed  # the stable rule does move with the order on these ties


def brute_force_expected(sim, t2i, k):
    """Mean hit@k over every ordering of the candidates used as the tie-break (exhaustive)."""
    import itertools

    s = sim.tolist()
    n_img, n_txt = len(s), len(s[0])
    i2t, t2i_hits = [], []
    for i in range(n_img):
        hits = []
        for perm in itertools.permutations(range(n_txt)):
            order = sorted(range(n_txt), key=lambda t: (-s[i][t], perm[t]))
            hits.append(any(t2i[t] == i for t in order[:k]))
        i2t.append(np.mean(hits))
    for t in range(n_txt):
        hits = []
        for perm in itertools.permutations(range(n_img)):
            order = sorted(range(n_img), key=lambda j: (-s[j][t], perm[j]))
            hits.append(t2i[t] in order[:k])
        t2i_hits.append(np.mean(hits))
    return 100 * np.mean(i2t), 100 * np.mean(t2i_hits)


def test_expected_rule_matches_exhaustive_orderings():
    from harma.metrics import hit_probability, tie_counts

    sim = torch.tensor([[2.0, 2, 2, 1, 2, 0], [1, 1, 1, 1, 0, 1], [2, 2, 0, 2, 2, 2]])
    t2i = [0, 0, 1, 1, 2, 2]
    i2t_counts, t2i_counts = tie_counts(sim, t2i)
    for k in (1, 2, 3):
        want_i2t, want_t2i = brute_force_expected(sim, t2i, k)
        assert 100 * hit_probability(*i2t_counts, k).mean().item() == pytest.approx(want_i2t, abs=1e-9)
        assert 100 * hit_probability(*t2i_counts, k).mean().item() == pytest.approx(want_t2i, abs=1e-9)


def test_hand_computed_ties():
    from harma.metrics import hit_probability, tie_counts

    # Image 0 ranks four captions equal first; two of them are its own: R@1 = 1 - 2/4, R@2 = 1 - 1/6.
    # Caption 0's image ties with one other image below a third: R@1 = 0, R@2 = 1/2, R@3 = 1.
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.1], [0.9, 0.5, 0.5, 0.1, 0.1], [0.5, 0.2, 0.2, 0.2, 0.9]])
    t2i = [0, 0, 1, 1, 2]
    (above, tied, rel), (t_above, t_tied, _) = tie_counts(sim, t2i)
    assert (above[0].item(), tied[0].item(), rel[0].item()) == (0, 4, 2)
    assert hit_probability(above, tied, rel, 1)[0].item() == pytest.approx(0.5)
    assert hit_probability(above, tied, rel, 2)[0].item() == pytest.approx(5 / 6)
    assert (t_above[0].item(), t_tied[0].item()) == (1, 2)
    ones = torch.ones_like(t_tied)
    assert [hit_probability(t_above, t_tied, ones, k)[0].item() for k in (1, 2, 3)] == pytest.approx([0, 0.5, 1])
    out = retrieval_metrics(sim, t2i)
    # t2i R@1 per caption: 0 (image 1 scores above); 1/2 (image 0 ties image 1); 1/2 (image 1 ties
    # image 0); 0 (two images above); 1 (image 2 alone first).
    assert out["t2i_R@1"] == pytest.approx(100 * (0 + 0.5 + 0.5 + 0 + 1) / 5)


@pytest.mark.parametrize("seed", range(3))
def test_rules_agree_without_ties_and_bound_each_other_with_them(seed):
    sim, t2i = random_case(15, [3] * 15, 8, seed=seed)
    results = [retrieval_metrics(sim, t2i, ties=rule) for rule in TIE_RULES]
    for other in results[1:]:
        assert_close(other, results[0])
    sim, t2i = tied_case(seed)
    got = {rule: retrieval_metrics(sim, t2i, ties=rule) for rule in TIE_RULES}
    for key in METRIC_KEYS:
        lo, hi = got["pessimistic"][key], got["optimistic"][key]
        assert lo - 1e-9 <= got["expected"][key] <= hi + 1e-9
        assert lo - 1e-9 <= got["stable"][key] <= hi + 1e-9
    assert got["pessimistic"]["mR"] < got["optimistic"]["mR"]


def test_unknown_tie_rule():
    with pytest.raises(ValueError, match="ties='random'"):
        retrieval_metrics(torch.zeros(1, 1), [0], ties="random")


def test_expected_ranks_by_hand_and_without_ties():
    # 3 images, 4 captions (image 0 has captions 0 and 1). Caption 2 ties with images 0 and 2 above its
    # own image 1: above 0, tied 3 (with itself) -> expected rank (3 + 1) / 2 = 2.
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.2],
                        [0.3, 0.8, 0.5, 0.1],
                        [0.2, 0.1, 0.5, 0.7]])
    t2i = [0, 0, 1, 2]
    i2t, t2i_rank = expected_ranks(sim, t2i)
    assert t2i_rank.tolist() == [1.0, 2.5, 2.0, 1.0]  # caption 1: one image above, tied with one other
    # image 1: best own caption (2, score 0.5) has caption 1 (0.8) above it; no tie -> rank 2
    # image 0: its own caption 0 scores highest -> rank 1; image 2: caption 3 highest -> rank 1
    assert i2t.tolist() == [1.0, 2.0, 1.0]
    # no ties: the stable ranks + 1
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 12, generator=g)
    t2i = torch.arange(12) % 6
    stable_i2t, stable_t2i = retrieval_ranks(sim, t2i)
    e_i2t, e_t2i = expected_ranks(sim, t2i)
    assert torch.equal(e_i2t, stable_i2t.double() + 1) and torch.equal(e_t2i, stable_t2i.double() + 1)


def test_expected_ranks_do_not_depend_on_order_and_match_the_tie_group_mean():
    # an image whose two own captions tie with two others: group of 4 holding 2 relevant -> first
    # relevant at expected position (4 + 1) / 3; brute force over all orders of the group agrees
    import itertools

    sim = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4, 0.9]])
    t2i = [0, 0, 1, 1, 1]
    i2t, _ = expected_ranks(sim, t2i)
    firsts = [min(p.index(0), p.index(1)) + 1 for p in itertools.permutations(range(4))]
    assert abs(float(i2t[0]) - sum(firsts) / len(firsts)) < 1e-12
    perm = torch.tensor([4, 2, 0, 3, 1])
    i2t_p, t2i_p = expected_ranks(sim[:, perm], torch.tensor(t2i)[perm])
    assert torch.equal(i2t_p, i2t) and torch.equal(t2i_p, expected_ranks(sim, t2i)[1][perm])
