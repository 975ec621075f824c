"""Modality-gap diagnostics on synthetic embeddings with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from harma.gap import canonical_order, modality_gap

KEYS = [
    "centroid_distance",
    "centroid_cosine",
    "uniformity_image",
    "uniformity_text",
    "uniformity_joint",
    "mean_cosine_image",
    "mean_cosine_text",
    "knn_modality_purity",
    "knn_purity_chance",
    "linear_probe_accuracy",
]


def gaussian(n: int, dim: int, seed: int, center: torch.Tensor | None = None, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, dim, generator=g)
    return x if center is None else x + center


def test_separated_clusters():
    dim = 32
    c = torch.zeros(dim)
    c[0] = 1.0
    img = gaussian(300, dim, 0, center=c, scale=0.05)
    txt = gaussian(400, dim, 1, center=-c, scale=0.05)
    out = modality_gap(img, txt)
    assert sorted(out) == sorted(KEYS)
    assert all(isinstance(v, float) for v in out.values())
    assert out["centroid_distance"] > 1.8  # antipodal clusters: close to 2
    assert out["centroid_cosine"] < -0.9
    assert out["knn_modality_purity"] == pytest.approx(1.0)
    assert out["linear_probe_accuracy"] == pytest.approx(1.0)
    assert out["knn_purity_chance"] == pytest.approx(299 / 599)  # balanced: 300 per modality
    assert out["mean_cosine_image"] > 0.9 and out["mean_cosine_text"] > 0.9  # cone effect
    # Each modality is tight, but together they spread out.
    assert out["uniformity_joint"] < out["uniformity_image"]


def test_same_distribution_is_mixed():
    img, txt = gaussian(500, 16, 0), gaussian(500, 16, 1)
    out = modality_gap(img, txt, k=10)
    assert out["centroid_distance"] < 0.15
    assert abs(out["knn_modality_purity"] - out["knn_purity_chance"]) < 0.05
    assert abs(out["linear_probe_accuracy"] - 0.5) < 0.1
    assert abs(out["mean_cosine_image"]) < 0.02
    assert out["uniformity_image"] == pytest.approx(out["uniformity_text"], abs=0.05)


def test_alignment():
    img = gaussian(10, 8, 0)
    t2i = torch.arange(10).repeat_interleave(3)
    out = modality_gap(img, 2.5 * img[t2i], t2i)  # scaling is undone by normalisation
    assert out["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert "alignment" not in modality_gap(img, img)

    # Orthogonal pairs: |x - y|^2 = 2.
    eye = torch.eye(4)
    out = modality_gap(eye[:2], eye[2:], [0, 1])
    assert out["alignment"] == pytest.approx(2.0)


def test_uniformity_collapsed_and_spread():
    collapsed = torch.ones(20, 8)
    spread = gaussian(200, 8, 0)
    out = modality_gap(collapsed, spread)
    assert out["uniformity_image"] == pytest.approx(0.0, abs=1e-5)
    assert out["mean_cosine_image"] == pytest.approx(1.0)
    assert out["uniformity_text"] < -1.0  # random directions: about log E exp(-4 + 4 cos)


def test_uniformity_matches_brute_force():
    x = torch.nn.functional.normalize(gaussian(30, 5, 3), dim=-1)
    d2 = torch.cdist(x.double(), x.double()).pow(2)
    off = ~torch.eye(30, dtype=torch.bool)
    expect = float(torch.exp(-2 * d2[off]).mean().log())
    cos = (x @ x.T)[off].mean()
    out = modality_gap(x, x.flip(0))
    assert out["uniformity_image"] == pytest.approx(expect, abs=1e-5)
    assert out["mean_cosine_image"] == pytest.approx(float(cos), abs=1e-6)


def test_centroid_2d_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean (0.5, 0.5)
    txt = torch.tensor([[-2.0, 0.0], [0.0, -3.0]])  # normalised mean (-0.5, -0.5)
    out = modality_gap(img, txt)
    assert out["centroid_distance"] == pytest.approx(math.sqrt(2.0))
    assert out["centroid_cosine"] == pytest.approx(-1.0)
    assert out["mean_cosine_image"] == pytest.approx(0.0)
    assert out["knn_purity_chance"] == pytest.approx(1 / 3)


def test_deterministic_and_seeded_subsample():
    img, txt = gaussian(300, 16, 0), gaussian(200, 16, 1) + 0.3
    a = modality_gap(img, txt, max_points=100, seed=7)
    b = modality_gap(img, txt, max_points=100, seed=7)
    c = modality_gap(img, txt, max_points=100, seed=8)
    assert a == b
    assert a["uniformity_image"] != c["uniformity_image"]
    assert a["knn_purity_chance"] == pytest.approx(99 / 199)
    # Full-set quantities do not depend on the sample.
    assert a["centroid_distance"] == c["centroid_distance"]


def test_canonical_order_makes_the_sampled_numbers_ignore_row_order():
    """A split of 30 images with 5 captions each (a few repeated across images, as UCM's are), given
    in two orders: taken as given, the balanced sample and the probe's split differ; in canonical
    order every number is the same."""
    img, txt = gaussian(30, 16, 0), gaussian(150, 16, 1) + 0.2
    names = [f"{i:02d}.jpg" for i in range(30)]
    t2i = [t // 5 for t in range(150)]
    texts = [f"text {t}" if t % 7 else "a shared caption" for t in range(150)]
    txt[[t for t in range(150) if texts[t] == "a shared caption"]] = txt[0].clone()  # equal texts, equal rows
    g = torch.Generator().manual_seed(3)
    pi, pt = torch.randperm(30, generator=g), torch.randperm(150, generator=g)
    where = {int(old): new for new, old in enumerate(pi)}
    shuffled = (img[pi], txt[pt], [where[t2i[t]] for t in pt], [names[i] for i in pi], [texts[t] for t in pt])

    def gap(im, tx, t2i_, canonical=None):
        if canonical is None:
            return modality_gap(im, tx, t2i_, max_points=20)
        io, to, t2i_ = canonical_order(*canonical, t2i_)
        return modality_gap(im[io], tx[to], t2i_, max_points=20)

    a, b = gap(img, txt, t2i, (names, texts)), gap(*shuffled[:3], shuffled[3:])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k
    as_given = gap(img, txt, t2i), gap(*shuffled[:3])
    assert as_given[0]["knn_modality_purity"] != as_given[1]["knn_modality_purity"]
    assert as_given[0]["uniformity_text"] != as_given[1]["uniformity_text"]
    io, to, new_t2i = canonical_order(["b", "a"], ["y", "x", "x"], [0, 1, 0])
    assert (io, to, new_t2i) == ([1, 0], [1, 2, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="2 caption keys for 3"):
        canonical_order(["a"], ["x", "y"], [0, 0, 0])


def test_k_is_capped_for_tiny_inputs():
    out = modality_gap(gaussian(3, 4, 0), gaussian(2, 4, 1), k=50)
    assert 0.0 <= out["knn_modality_purity"] <= 1.0


@pytest.mark.parametrize(
    "img,txt,t2i,match",
    [
        (torch.randn(5, 8), torch.randn(5, 6), None, "dims differ"),
        (torch.randn(0, 8), torch.randn(5, 8), None, "at least 2"),
        (torch.randn(5, 8), torch.randn(1, 8), None, "at least 2"),
        (torch.randn(8), torch.randn(5, 8), None, "2-D"),
        (torch.full((3, 4), float("nan")), torch.randn(3, 4), None, "NaN"),
        (torch.randn(3, 4), torch.randn(4, 4), [0, 1, 2], "one entry per caption"),
        (torch.randn(3, 4), torch.randn(3, 4), [0, 1, 3], "outside"),
    ],
)
def test_errors(img, txt, t2i, match):
    with pytest.raises(ValueError, match=match):
        modality_gap(img, txt, t2i)
