"""Chunked retrieval metrics against a brute-force, loop-per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harma.metrics import METRIC_KEYS, format_table, recall_at_k, retrieval_metrics, retrieval_ranks


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
        assert_close(retrieval_metrics(sim, t2i, chunk_size=chunk), expect)
    # Integer dtype and rounded floats behave the same way.
    assert_close(retrieval_metrics(sim.long(), t2i), expect)


def test_rounded_scores_match_reference():
    sim, t2i = random_case(20, [5] * 20, 4, seed=3, noise=3.0)
    sim = torch.round(sim * 4) / 4
    assert_close(retrieval_metrics(sim, t2i, chunk_size=6), reference_metrics(sim, t2i))


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
