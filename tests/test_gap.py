"""Modality-gap diagnostics on synthetic embeddings with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from harma.gap import modality_gap

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
