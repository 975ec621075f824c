"""Map fidelity: the k-NN numbers of harma.gap / harma.gap_ci on the original space and on a 2-D layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harma.errors import HarmaError
from harma.gap import modality_gap
from harma.gap_ci import gap_with_intervals
from harma.map_fidelity import map_fidelity


def _clusters(n_img=60, per_image=2, dim=8, seed=0):
    """Images near e0, captions near e1, each of 3 scene classes offset along e2..e4; a caption sits
    by its image. Returns embeddings, the layout (first two coordinates), classes and text_to_image."""
    g = torch.Generator().manual_seed(seed)
    classes = [i % 3 for i in range(n_img)]
    centre = torch.zeros(3, dim)
    centre[torch.arange(3), 2 + torch.arange(3)] = 0.6
    img = torch.zeros(n_img, dim)
    img[:, 0] = 1.0
    img += centre[classes] + 0.05 * torch.randn(n_img, dim, generator=g)
    t2i = [i for i in range(n_img) for _ in range(per_image)]
    txt = torch.zeros(len(t2i), dim)
    txt[:, 1] = 1.0
    txt += centre[[classes[i] for i in t2i]] + 0.05 * torch.randn(len(t2i), dim, generator=g)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img, txt, classes, t2i


def _layout(img, txt):
    """The first two coordinates plus the scene offsets folded into the plane (keeps classes apart)."""
    def xy(x):
        return torch.stack([x[:, 0] + x[:, 2] - x[:, 4], x[:, 1] + x[:, 3] - x[:, 4]], 1).numpy().astype(np.float64)
    return xy(img), xy(txt)


def test_faithful_layout_gives_the_original_purities():
    img, txt, classes, t2i = _clusters()
    xy_img, xy_txt = _layout(img, txt)
    out = map_fidelity(img, txt, xy_img, xy_txt, classes, [classes[i] for i in t2i], k=10)
    assert out["knn_modality_purity"] == pytest.approx(1.0)
    assert out["knn_modality_purity_2d"] == pytest.approx(out["knn_modality_purity"])
    assert out["knn_scene_purity"] == pytest.approx(1.0)
    assert out["knn_scene_purity_2d"] == pytest.approx(out["knn_scene_purity"])
    # the original-space numbers are harma.gap's and harma.gap_ci's (same sample, same k)
    equal = txt[::2]  # one caption per image: the balanced sample is everything
    ref = modality_gap(img, equal, k=10)["knn_modality_purity"]
    assert map_fidelity(img, equal, xy_img, xy_txt[::2])["knn_modality_purity"] == pytest.approx(ref)
    ci = gap_with_intervals(img, txt, t2i, [str(c) for c in classes], k=10, n_boot=2)
    assert out["knn_scene_purity"] == pytest.approx(ci["knn_scene_purity"].value)
    assert out["knn_scene_chance"] == pytest.approx(ci["knn_scene_chance"].value)


def test_shuffled_layout_gives_chance():
    img, txt, classes, t2i = _clusters(n_img=150, per_image=1)
    xy_img, xy_txt = _layout(img, txt)
    xy = np.concatenate([xy_img, xy_txt])[np.random.default_rng(0).permutation(300)]
    cap_classes = [classes[i] for i in t2i]
    out = map_fidelity(img, txt, xy[:150], xy[150:], classes, cap_classes)
    assert out["knn_modality_purity"] == pytest.approx(1.0)
    assert abs(out["knn_modality_purity_2d"] - out["knn_purity_chance"]) < 0.06
    assert abs(out["knn_scene_purity_2d"] - out["knn_scene_chance"]) < 0.06
    assert out["trustworthiness"] < 0.7


def test_isometric_layout_is_trustworthy_and_row_order_does_not_matter():
    """Unit vectors on a great circle laid out on the unit circle: the same neighbour ranks."""
    theta = torch.linspace(0, 1.5 * math.pi, 80)
    emb = torch.zeros(80, 6)
    emb[:, 0], emb[:, 1] = theta.cos(), theta.sin()
    xy = emb[:, :2].double().numpy()
    img, txt, xy_img, xy_txt = emb[::2], emb[1::2], xy[::2], xy[1::2]
    out = map_fidelity(img, txt, xy_img, xy_txt, k=5)
    assert out["trustworthiness"] == pytest.approx(1.0, abs=1e-3)  # ties of equal spacing
    assert out["knn_scene_purity"] is None and out["knn_scene_purity_2d"] is None
    assert out["knn_modality_purity_2d"] == pytest.approx(out["knn_modality_purity"])
    # unequal modality sizes (a sampled balance) and a shuffled row order give the same numbers
    img, txt, classes, t2i = _clusters(n_img=40, per_image=3)
    xy_img, xy_txt = _layout(img, txt)
    xy_txt = xy_txt + np.random.default_rng(1).normal(0, 0.3, xy_txt.shape)
    cap = [classes[i] for i in t2i]
    a = map_fidelity(img, txt, xy_img, xy_txt, classes, cap, k=7)
    pi, pt = torch.randperm(40, generator=torch.Generator().manual_seed(3)), torch.randperm(120)
    b = map_fidelity(img[pi], txt[pt], xy_img[pi.numpy()], xy_txt[pt.numpy()],
                     [classes[i] for i in pi], [cap[i] for i in pt], k=7)
    assert a == b


def test_bad_input_is_a_message():
    img, txt, _, _ = _clusters(n_img=10, per_image=1)
    xy_img, xy_txt = _layout(img, txt)
    with pytest.raises(HarmaError, match=r"captions: the layout must be \(10, 2\)"):
        map_fidelity(img, txt, xy_img, xy_txt[:5])
    with pytest.raises(HarmaError, match="image classes"):
        map_fidelity(img, txt, xy_img, xy_txt, [0] * 9, [0] * 10)
    with pytest.raises(HarmaError, match="NaN"):
        map_fidelity(img, txt, xy_img * np.nan, xy_txt)
