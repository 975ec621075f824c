"""harma.gap_ci: RMG, centroid distance and k-NN scene purity with bootstrap intervals."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from harma.errors import InputError
from harma.gap_ci import gap_with_intervals


def _unit(x):
    return F.normalize(x.double(), dim=-1)


def _rmg_brute(img, txt, t2i):
    img, txt = _unit(img), _unit(txt)

    def d(a, b):
        return (1 - float(a @ b)) / 2

    m = sum(d(img[i], txt[t]) for t, i in enumerate(t2i)) / len(t2i)
    di = [d(img[i], img[j]) for i, j in itertools.permutations(range(len(img)), 2)]
    dt = [d(txt[s], txt[t]) for s, t in itertools.permutations(range(len(txt)), 2)]
    return m / ((sum(di) / len(di) + sum(dt) / len(dt)) / 2 + m)


def test_rmg_matches_the_formula_and_its_limits():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    t2i = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    out = gap_with_intervals(img, txt, t2i, n_boot=50)
    assert out["relative_modality_gap"].value == pytest.approx(_rmg_brute(img, txt, t2i), abs=1e-12)
    # a caption on its image: no gap at all
    same = gap_with_intervals(img, img.clone(), range(7), n_boot=20)
    assert same["relative_modality_gap"].value == pytest.approx(0, abs=1e-12)
    assert same["centroid_distance"].value == pytest.approx(0, abs=1e-12)
    # two separate regions (images around e1, captions around e2): RMG near 1/2 or above
    e = torch.eye(8, dtype=torch.double)
    far = gap_with_intervals(e[0] + 0.1 * torch.randn(30, 8, generator=g, dtype=torch.double),
                             e[1] + 0.1 * torch.randn(30, 8, generator=g, dtype=torch.double), range(30), n_boot=50)
    assert far["relative_modality_gap"].value > 0.45 and far["centroid_distance"].value > 1.2


def test_intervals_are_seeded_contain_the_value_and_ignore_order():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(40, 6, generator=g), torch.randn(80, 6, generator=g)
    t2i = torch.arange(80) % 40
    a = gap_with_intervals(img, txt, t2i, n_boot=100, seed=3)
    assert a == gap_with_intervals(img, txt, t2i, n_boot=100, seed=3)
    for est in a.values():
        assert est.low <= est.value <= est.high and est.low < est.high
    # values do not depend on the order of the images or the captions
    p_img, p_txt = torch.randperm(40, generator=g), torch.randperm(80, generator=g)
    new_index = torch.empty(40, dtype=torch.long)
    new_index[p_img] = torch.arange(40)
    b = gap_with_intervals(img[p_img], txt[p_txt], new_index[t2i[p_txt]], n_boot=100, seed=3)
    for name in a:
        assert b[name].value == pytest.approx(a[name].value, abs=1e-12)


def test_scene_purity_sees_clusters_and_chance():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 16, generator=g) * 3
    classes = [f"c{i % 4}" for i in range(40)]
    img = centres[torch.arange(40) % 4] + 0.1 * torch.randn(40, 16, generator=g)
    txt = img.repeat(2, 1) + 0.1 * torch.randn(80, 16, generator=g)
    t2i = list(range(40)) * 2
    out = gap_with_intervals(img, txt, t2i, classes, k=5, n_boot=50)
    assert out["knn_scene_purity"].value == pytest.approx(1.0)
    assert out["knn_scene_chance"].value == pytest.approx(4 * 30 * 29 / (120 * 119))
    noise = gap_with_intervals(torch.randn(40, 16, generator=g), torch.randn(80, 16, generator=g), t2i, classes,
                               k=5, n_boot=50)
    assert abs(noise["knn_scene_purity"].value - noise["knn_scene_chance"].value) < 0.12


def test_bad_input_is_named():
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(InputError, match="every image a caption"):
        gap_with_intervals(img, txt, [0, 0, 1])
    with pytest.raises(InputError, match="2 classes for 3 images"):
        gap_with_intervals(img, txt, [0, 1, 2], ["a", "b"])
