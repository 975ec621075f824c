"""Optimiser and learning-rate schedule of the released recipe (method.md §3).

AdamW with decoupled weight decay, no decay for biases and norm weights, and a LambdaLR stepped
once per optimiser step: linear warm-up from 0, then linear decay to 0 (or cosine / constant).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harma import HarmaModel
from harma.adapters import output_projections
from harma.inject import text_tower_parameters
from training.config import OptimConfig

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based; the value ``LambdaLR`` uses).

    Warm-up rises linearly from 0 at step 0 to 1 at step ``warmup``. After it, ``linear`` (released)
    decays linearly to 0 at ``total``, ``cosine`` follows a half cosine to 0 at ``total`` and
    ``constant`` stays at 1. Steps at or past ``total`` give 0 (1 for ``constant``).

    ``total`` must be the number of optimiser steps that really run, ``epochs * len(loader)``.
    The released code used ``epochs * ceil(N / B)`` while its ``drop_last`` loader runs
    ``floor(N / B)`` steps, so its lr never reached 0 (method.md §7.16); the caller fixes that by
    passing the real count.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if total < 1 or not 0 <= warmup <= total:
        raise ValueError(f"need total >= 1 and 0 <= warmup <= total, got total={total}, warmup={warmup}")
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if step >= total:
        return 0.0
    progress = (step - warmup) / (total - warmup)  # in [0, 1); total > warmup here
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split the trainable parameters into AdamW groups, each named by its ``"name"`` key.

    - ``decay``: matrices and other >= 2-D tensors, weight decay ``cfg.weight_decay``.
    - ``no_decay``: 1-D tensors (biases, LayerNorm weights, embedding-like vectors), no decay. The
      released code matches names containing ``bias``/``norm``; the shape rule covers the same
      tensors without relying on names (method.md §7.5).
    - ``scalars``: 0-d tensors (the adapter gates and the temperature). Released: they are decayed
      (method.md §7.14), kept here with ``cfg.decay_scalars=True``; ``False`` turns that off.

    With ``cfg.text_lr_scale != 1`` the text tower's parameters (:func:`text_parameter_ids`) go to
    ``text_decay`` / ``text_no_decay`` / ``text_scalars`` groups whose ``lr`` is scaled. With
    ``cfg.up_lr_scale != 1`` the adapters' zero-initialised output projections
    (:func:`harma.adapters.output_projections`) go to ``up_decay`` / ``up_no_decay`` groups
    (``text_up_...`` in the text tower) whose ``lr`` is scaled by it (LoRA+); both scales multiply.

    With ``cfg.also_train_lr`` set, the backbone parameters an adapter method trains beside its
    adapters (``model.also_train``) go to ``also_decay`` / ``also_no_decay`` groups with that ``lr``
    (no other scale applies to them).

    With ``cfg.temperature_lr`` set, a :class:`harma.HarmaModel`'s learned temperature goes to a
    ``temperature`` group of its own with that ``lr`` (decayed like the other scalars).

    Empty groups are left out. Frozen parameters (``requires_grad=False``) are never included.
    """
    text = text_parameter_ids(model) if cfg.text_lr_scale != 1.0 else set()
    up = {id(p) for p in output_projections(model)} if cfg.up_lr_scale != 1.0 else set()
    temperature = getattr(model, "temperature", None) if cfg.temperature_lr is not None else None
    also = {id(p) for p in getattr(model, "also_trained_parameters", [])} if cfg.also_train_lr is not None else set()
    buckets: dict[str, list[nn.Parameter]] = {}
    lr: dict[str, float] = {}  # groups whose rate is not optim.lr
    for _, p in model.named_parameters():  # de-duplicates shared parameters
        if not p.requires_grad:
            continue
        kind = "scalars" if p.ndim == 0 else "no_decay" if p.ndim < 2 else "decay"
        if p is temperature:
            key, rate = "temperature", cfg.temperature_lr
        elif id(p) in also:
            key, rate = "also_" + kind, cfg.also_train_lr
        else:
            in_text, is_up = id(p) in text, id(p) in up
            key = ("text_" if in_text else "") + ("up_" if is_up else "") + kind
            scale = (cfg.text_lr_scale if in_text else 1.0) * (cfg.up_lr_scale if is_up else 1.0)
            rate = cfg.lr * scale if scale != 1.0 else None
        buckets.setdefault(key, []).append(p)
        if rate is not None:
            lr[key] = rate
    scalar_decay = cfg.weight_decay if cfg.decay_scalars else 0.0
    decay = {"decay": cfg.weight_decay, "no_decay": 0.0, "scalars": scalar_decay, "temperature": scalar_decay}
    kinds = ("decay", "no_decay", "scalars")
    order = [pre + k for pre in ("", "up_", "text_", "text_up_", "also_") for k in kinds] + ["temperature"]  # base "decay" first: the CLI logs its lr
    return [{"name": k, "params": buckets[k], "weight_decay": decay[_kind(k)],
             **({"lr": lr[k]} if k in lr else {})} for k in order if k in buckets]


def _kind(group: str) -> str:
    """``decay`` / ``no_decay`` / ``scalars`` / ``temperature`` of a group name such as ``text_up_decay``."""
    for prefix in ("text_", "up_", "also_"):
        group = group.removeprefix(prefix)
    return group


def text_parameter_ids(model: nn.Module) -> set[int]:
    """``id``s of a :class:`harma.HarmaModel`'s text-side parameters: the text tower's, adapters
    wrapped inside it included, and so the MMS adapters when ``share_mode`` gives them to the text
    tower alone (not when both towers call them, nor the MRS-Adapter, which serves both). Empty for
    other modules."""
    if not isinstance(model, HarmaModel):
        return set()
    ids = {id(p) for p in text_tower_parameters(model.clip)}  # the text wrappers hold the MMS adapters they call
    if model.mms is not None and model.config.harma.share_mode != "text_only":
        ids -= {id(p) for p in model.mms.parameters()}  # shared by both towers: the base rate
    if model.mrs is not None:  # one MRS-Adapter serves both towers (the text blocks' wrappers hold it too)
        ids -= {id(p) for p in model.mrs.parameters()}
    return ids


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups` (equivalent to the released transformers AdamW)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (method 'zeroshot' cannot be trained)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` following :func:`lr_factor`; call ``.step()`` after every optimiser step.

    ``total_steps`` = ``epochs * len(train_loader)`` (the real count, see :func:`lr_factor`); the
    warm-up is ``int(cfg.warmup_fraction * total_steps)`` steps, as released.
    """
    warmup = int(cfg.warmup_fraction * total_steps)
    lr_factor(0, total_steps, warmup, cfg.schedule)  # validate now rather than at the first step

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
