"""Training losses: HarMA's contrastive + adaptive (focal) triplet, and PE-RSITR's intra-modal HMMC terms.

Follows the released HarMA code (`models/harma.py` `get_contr_loss`, `weighted_triplet_loss`; method.md §2.2)
and the PE-RSITR HMMC description (method.md §6.2). All features are expected L2-normalised and, under DDP,
already all-gathered by the caller; nothing here renormalises or communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harma.config import ConfigError

REDUCTIONS = ("sum", "mean")
TERMS = ("contrastive", "triplet", "intra_image", "intra_text")


@dataclass
class LossConfig:
    """Weights and options of the loss terms. Defaults reproduce the released HarMA loss."""

    contrastive: float = 1.0  # weight of the cross-modal contrastive term (0 disables)
    triplet: float = 1.0  # weight of the adaptive (focal) triplet term
    intra_image: float = 0.0  # PE-RSITR HMMC: image <-> augmented-image InfoNCE weight
    intra_text: float = 0.0  # PE-RSITR HMMC: text <-> augmented-text InfoNCE weight
    margin: float = 0.2
    gamma: float = 2.0  # focal exponent; weight (1 - exp(-hinge))**gamma, NOT detached (as released)
    triplet_reduction: str = "sum"  # "sum" as released (sum over both directions / 2) or "mean"
    triplet_mask_same_image: bool = False  # released: same-image captions count as negatives
    intra_temperature: float = 0.07  # fixed temperature of the intra-modal terms
    min_temperature: float = 0.0  # clamp for the learnable temperature (0 = no clamp, as released)

    def __post_init__(self) -> None:
        for name in (*TERMS, "margin", "gamma", "min_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.triplet_reduction not in REDUCTIONS:
            raise ConfigError(
                f"loss.triplet_reduction={self.triplet_reduction!r} is not one of {', '.join(REDUCTIONS)}"
            )
        if self.intra_temperature <= 0:
            raise ConfigError(f"loss.intra_temperature must be > 0, got {self.intra_temperature!r}")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise ConfigError(f"loss: at least one of {', '.join(TERMS)} must be > 0")


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected paired (B, D) features, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def contrastive_loss(
    image_features: Tensor, text_features: Tensor, temperature: Union[Tensor, float], image_ids: Optional[Tensor] = None
) -> Tensor:
    """Symmetric InfoNCE with soft multi-positive targets (released `get_contr_loss`).

    Args:
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings; row i is paired with image row i.
        temperature: raw divisor of the logits (0-d tensor, learnable in HarMA; not exponentiated).
        image_ids: optional (B,) image index per pair; pairs sharing an id are all positives, with
            targets normalised by the row sum. None means one positive per row (the diagonal).

    Returns:
        0-d tensor ``(CE_i2t + CE_t2i) / 2``, each a mean over rows.
    """
    _check_pair(image_features, text_features)
    logits = image_features @ text_features.t() / temperature  # (B, B)
    if image_ids is None:
        targets = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
    else:
        ids = image_ids.reshape(-1, 1).to(logits.device)
        pos = (ids == ids.t()).to(logits.dtype)
        targets = pos / pos.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def adaptive_triplet_loss(
    image_features: Tensor,
    text_features: Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    reduction: str = "sum",
    image_ids: Optional[Tensor] = None,
) -> Tensor:
    """Hinge triplet over all negatives, each weighted by ``(1 - exp(-hinge))**gamma`` (released
    `weighted_triplet_loss`, ``max_violation=False``). The weight is not detached, as released.

    Args:
        image_features: (B, D) L2-normalised image embeddings.
        text_features: (B, D) L2-normalised text embeddings, paired row by row.
        margin: triplet margin.
        gamma: focal exponent.
        reduction: "sum" (released: both directions summed over all B*B entries, then / 2) or
            "mean" (the same, divided by the number of unmasked entries per direction).
        image_ids: optional (B,) image index per pair; when given, pairs with the same id are not
            negatives (released code passes None, so same-image captions count as negatives).

    Returns:
        0-d tensor.
    """
    _check_pair(image_features, text_features)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    scores = image_features @ text_features.t()  # (B, B)
    diag = scores.diag().view(-1, 1)
    cost_s = (margin + scores - diag).clamp(min=0)  # image i anchor, caption j negative
    cost_im = (margin + scores - diag.t()).clamp(min=0)  # caption j anchor, image i negative
    mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        ids = image_ids.reshape(-1, 1).to(scores.device)
        mask = mask | (ids == ids.t())
    cost_s = cost_s.masked_fill(mask, 0)
    cost_im = cost_im.masked_fill(mask, 0)
    weighted_s = (1 - torch.exp(-cost_s)) ** gamma * cost_s
    weighted_im = (1 - torch.exp(-cost_im)) ** gamma * cost_im
    loss = (weighted_s.sum() + weighted_im.sum()) / 2
    if reduction == "mean":
        loss = loss / (~mask).sum().clamp(min=1)
    return loss


def intra_modal_loss(features: Tensor, features_aug: Tensor, temperature: Union[Tensor, float]) -> Tensor:
    """Symmetric InfoNCE between a batch and its augmented copy (PE-RSITR HMMC ``L_v`` / ``L_t``).

    Args:
        features: (B, D) L2-normalised embeddings.
        features_aug: (B, D) L2-normalised embeddings of the augmented views; row i is the positive of row i.
        temperature: divisor of the logits.

    Returns:
        0-d tensor ``(CE(F F_aug^T / t) + CE(F_aug F^T / t)) / 2`` with diagonal targets.
    """
    _check_pair(features, features_aug)
    logits = features @ features_aug.t() / temperature  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class HarmaLoss(nn.Module):
    """Weighted sum of the enabled loss terms; ``forward`` returns each weighted term by name."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        temperature: Union[Tensor, float],
        image_ids: Optional[Tensor] = None,
        image_features_aug: Optional[Tensor] = None,
        text_features_aug: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Compute the enabled terms (weight > 0), each already multiplied by its weight.

        Args:
            image_features: (B, D) L2-normalised image embeddings (global batch under DDP).
            text_features: (B, D) L2-normalised text embeddings, paired row by row.
            temperature: learnable divisor of the contrastive logits; clamped at ``cfg.min_temperature`` if > 0.
            image_ids: optional (B,) image index per pair (soft contrastive targets, triplet masking).
            image_features_aug: (B, D) augmented image views; required when ``cfg.intra_image > 0``.
            text_features_aug: (B, D) augmented text views; required when ``cfg.intra_text > 0``.

        Returns:
            Dict with a subset of the keys "contrastive", "triplet", "intra_image", "intra_text";
            the total loss is ``sum(d.values())``.
        """
        cfg = self.cfg
        out: dict[str, Tensor] = {}
        if cfg.contrastive > 0:
            temp = torch.as_tensor(temperature, dtype=image_features.dtype, device=image_features.device)
            if cfg.min_temperature > 0:
                temp = torch.clamp(temp, min=cfg.min_temperature)
            out["contrastive"] = cfg.contrastive * contrastive_loss(image_features, text_features, temp, image_ids)
        if cfg.triplet > 0:
            ids = image_ids if cfg.triplet_mask_same_image else None
            trip = adaptive_triplet_loss(
                image_features, text_features, cfg.margin, cfg.gamma, cfg.triplet_reduction, ids
            )
            out["triplet"] = cfg.triplet * trip
        for name, base, aug in (
            ("intra_image", image_features, image_features_aug),
            ("intra_text", text_features, text_features_aug),
        ):
            weight = getattr(cfg, name)
            if weight <= 0:
                continue
            if aug is None:
                raise ValueError(
                    f"loss.{name}={weight} needs augmented features ({name.split('_')[1]}_features_aug); "
                    "the method must produce augmented views (method 'mrs')"
                )
            out[name] = weight * intra_modal_loss(base, aug, cfg.intra_temperature)
        return out
