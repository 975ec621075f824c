from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from harma.config import ConfigError, from_dict
from harma.losses import (
    HarmaLoss,
    LossConfig,
    adaptive_triplet_loss,
    contrastive_loss,
    intra_modal_loss,
)

DEVICE = torch.device(os.environ.get("HARMA_TEST_DEVICE", "cpu"))
E = math.e


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, device=DEVICE)


def focal(c: float, gamma: float = 2.0) -> float:
    return (1 - math.exp(-c)) ** gamma * c


def random_pair(b: int = 6, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(DEVICE)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(DEVICE)
    return img, txt


# Image rows are the standard basis, so S = I @ T.T has column j equal to T_j:
# S = [[.6, 0, 0], [.8, 1, .8], [0, 0, .6]], diag = (.6, 1, .6). With margin .2, only the
# caption-anchored hinges C_im[1,0] = .2 + .8 - .6 and C_im[1,2] = .2 + .8 - .6 are positive (0.4).
TRIPLET_IMG = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
TRIPLET_TXT = [[0.6, 0.8, 0], [0, 1, 0], [0, 0.8, 0.6]]


# ---------------------------------------------------------------- contrastive


def test_contrastive_identity_hand_value():
    eye = t([[1, 0], [0, 1]])
    loss = contrastive_loss(eye, eye, torch.tensor(1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(1 + 1 / E))
    # temperature is a raw divisor: tau = 0.5 doubles the logits
    loss_half = contrastive_loss(eye, eye, torch.tensor(0.5, dtype=torch.float64))
    assert loss_half.item() == pytest.approx(math.log(1 + E**-2))


def test_contrastive_unique_ids_matches_cross_entropy():
    img, txt = random_pair()
    tau = 0.07
    logits = img @ txt.T / tau
    labels = torch.arange(len(img), device=DEVICE)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    ids = torch.tensor([3, 1, 4, 5, 9, 2], device=DEVICE)  # unique ids == no ids
    assert torch.allclose(contrastive_loss(img, txt, tau), expected)
    assert torch.allclose(contrastive_loss(img, txt, tau, image_ids=ids), expected)


def test_contrastive_multi_positive_soft_targets():
    # S = I (tau = 1); captions 0 and 1 share image id 0, so rows 0 and 1 have targets (.5, .5, 0):
    # row 0: logsumexp(1, 0, 0) - (.5 * 1 + .5 * 0) = log(e + 2) - .5; same for row 1; row 2: log(e + 2) - 1.
    # S is symmetric, so t2i == i2t.
    eye = t([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    ids = torch.tensor([0, 0, 1], device=DEVICE)
    loss = contrastive_loss(eye, eye, torch.tensor(1.0, dtype=torch.float64), image_ids=ids)
    assert loss.item() == pytest.approx(math.log(E + 2) - 2 / 3)
    assert contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(E + 2) - 1)  # one-hot targets


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("transpose", [False, True])
def test_triplet_hand_value_sum_and_mean(transpose):
    img, txt = t(TRIPLET_IMG), t(TRIPLET_TXT)
    if transpose:  # S -> S.T swaps the two directions (C_s <-> C_im); the value must not change
        img, txt = txt, img
    total = 2 * focal(0.4)
    assert adaptive_triplet_loss(img, txt).item() == pytest.approx(total / 2)
    assert adaptive_triplet_loss(img, txt, reduction="mean").item() == pytest.approx(total / 2 / 6)


def test_triplet_mask_same_image():
    img, txt = t(TRIPLET_IMG), t(TRIPLET_TXT)
    ids = torch.tensor([0, 0, 1], device=DEVICE)  # masks pairs (0,1), (1,0): drops C_im[1,0]
    assert adaptive_triplet_loss(img, txt, image_ids=ids).item() == pytest.approx(focal(0.4) / 2)
    mean = adaptive_triplet_loss(img, txt, reduction="mean", image_ids=ids)
    assert mean.item() == pytest.approx(focal(0.4) / 2 / 4)  # 9 - 3 diagonal - 2 same-image entries


def test_triplet_zero_when_margin_satisfied_and_margin_scales():
    eye = t([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert adaptive_triplet_loss(eye, eye).item() == 0.0
    # margin 1.5: every off-diagonal hinge is 0.5, six per direction, (6 + 6) / 2
    assert adaptive_triplet_loss(eye, eye, margin=1.5).item() == pytest.approx(6 * focal(0.5))


def test_triplet_gamma_zero_is_plain_hinge():
    img, txt = random_pair(seed=1)
    s = img @ txt.T
    d = s.diag().view(-1, 1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=DEVICE)
    hinge = ((0.2 + s - d).clamp(min=0)[off].sum() + (0.2 + s - d.T).clamp(min=0)[off].sum()) / 2
    assert torch.allclose(adaptive_triplet_loss(img, txt, gamma=0.0), hinge)


def test_triplet_focal_weight_not_detached():
    img, txt = random_pair(seed=2)
    img.requires_grad_(True)
    adaptive_triplet_loss(img, txt, margin=0.5).backward()
    grad = img.grad.clone()
    img.grad = None
    s = img @ txt.T
    d = s.diag().view(-1, 1)
    off = ~torch.eye(len(s), dtype=torch.bool, device=DEVICE)
    cs, cim = (0.5 + s - d).clamp(min=0) * off, (0.5 + s - d.T).clamp(min=0) * off
    detached = ((1 - torch.exp(-cs.detach())) ** 2 * cs).sum() + ((1 - torch.exp(-cim.detach())) ** 2 * cim).sum()
    (detached / 2).backward()
    assert torch.isfinite(grad).all()
    assert not torch.allclose(grad, img.grad)


def test_triplet_rejects_unknown_reduction():
    img, txt = random_pair()
    with pytest.raises(ValueError, match="reduction"):
        adaptive_triplet_loss(img, txt, reduction="max")


# ---------------------------------------------------------------- intra-modal


def test_intra_modal_hand_value_and_symmetry():
    eye = t([[1, 0], [0, 1]])
    assert intra_modal_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 1 / E))
    a, b = random_pair(seed=3)
    labels = torch.arange(len(a), device=DEVICE)
    logits = a @ b.T / 0.07
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(intra_modal_loss(a, b, 0.07), expected)
    assert torch.allclose(intra_modal_loss(b, a, 0.07), expected)


# ---------------------------------------------------------------- HarmaLoss


def _aug(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device), dim=-1)


def test_harma_loss_keys():
    img, txt = random_pair()
    temp = torch.tensor(0.07, dtype=torch.float64)
    assert set(HarmaLoss(LossConfig())(img, txt, temp)) == {"contrastive", "triplet"}
    assert set(HarmaLoss(LossConfig(contrastive=0.0))(img, txt, temp)) == {"triplet"}
    cfg = LossConfig(intra_image=1.0, intra_text=0.5)
    out = HarmaLoss(cfg)(img, txt, temp, image_features_aug=_aug(img, 1), text_features_aug=_aug(txt, 2))
    assert set(out) == {"contrastive", "triplet", "intra_image", "intra_text"}


def test_harma_loss_weights_scale_linearly():
    img, txt = random_pair()
    ids = torch.tensor([0, 0, 1, 2, 3, 3], device=DEVICE)
    temp = torch.tensor(0.07, dtype=torch.float64)
    augs = dict(image_features_aug=_aug(img, 1), text_features_aug=_aug(txt, 2))
    unit = HarmaLoss(LossConfig(intra_image=1.0, intra_text=1.0))(img, txt, temp, ids, **augs)
    weights = dict(contrastive=2.5, triplet=0.5, intra_image=3.0, intra_text=0.25)
    scaled = HarmaLoss(LossConfig(**weights))(img, txt, temp, ids, **augs)
    for k, w in weights.items():
        assert torch.allclose(scaled[k], w * unit[k])
    assert torch.allclose(unit["contrastive"], contrastive_loss(img, txt, temp, ids))
    assert torch.allclose(unit["triplet"], adaptive_triplet_loss(img, txt))  # ids unused by default
    masked = HarmaLoss(LossConfig(triplet_mask_same_image=True))(img, txt, temp, ids)
    assert torch.allclose(masked["triplet"], adaptive_triplet_loss(img, txt, image_ids=ids))


def test_harma_loss_gradients_reach_temperature():
    img, txt = random_pair()
    img.requires_grad_(True)
    temp = torch.nn.Parameter(torch.tensor(0.07, dtype=torch.float64, device=DEVICE))
    out = HarmaLoss(LossConfig())(img, txt, temp, torch.tensor([0, 0, 1, 1, 2, 3], device=DEVICE))
    sum(out.values()).backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert torch.isfinite(temp.grad) and temp.grad != 0


def test_harma_loss_min_temperature_clamp():
    img, txt = random_pair()
    temp = torch.nn.Parameter(torch.tensor(0.001, dtype=torch.float64, device=DEVICE))
    out = HarmaLoss(LossConfig(triplet=0.0, min_temperature=0.05))(img, txt, temp)
    assert torch.allclose(out["contrastive"], contrastive_loss(img, txt, 0.05))
    out["contrastive"].backward()
    assert temp.grad == 0  # clamped: no gradient below the floor
    unclamped = HarmaLoss(LossConfig(triplet=0.0))(img, txt, temp)["contrastive"]
    assert not torch.allclose(unclamped, out["contrastive"])


@pytest.mark.parametrize("field", ["intra_image", "intra_text"])
def test_harma_loss_missing_aug_raises(field):
    img, txt = random_pair()
    with pytest.raises(ValueError, match="augmented.*mrs"):
        HarmaLoss(LossConfig(**{field: 1.0}))(img, txt, 0.07, image_features_aug=img if field == "intra_text" else None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(triplet=-1.0), "triplet"),
        (dict(intra_text=-0.1), "intra_text"),
        (dict(triplet_reduction="max"), "triplet_reduction"),
        (dict(intra_temperature=0.0), "intra_temperature"),
        (dict(contrastive=0.0, triplet=0.0), "at least one"),
    ],
)
def test_loss_config_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LossConfig(**kwargs)


def test_loss_config_from_dict():
    cfg = from_dict(LossConfig, {"triplet_reduction": "mean", "intra_image": 0.5}, "loss")
    assert cfg.triplet_reduction == "mean" and cfg.intra_image == 0.5
    with pytest.raises(ConfigError, match="loss.tripplet"):
        from_dict(LossConfig, {"tripplet": 1.0}, "loss")
