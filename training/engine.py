"""One optimisation step and one training epoch: plain arguments, no config objects.

The step follows the released loop (``Retrieval.py`` L63-112) with its bugs fixed: the loss is
computed once (method.md §7.11) on the all-gathered global batch, which also works on a single
process (§7.12), and the lr schedule is stepped after every optimiser step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from training.distributed import gather_features, gather_tensor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops without touching the last good checkpoint."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        self.step, self.terms = step, terms
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at global step {step} in term(s) {', '.join(bad)} ({shown}); "
                         "training stopped, the last checkpoint is the one before this step "
                         "(lower optim.lr or set optim.grad_clip)")


@dataclass
class StepSettings:
    """How a step runs: device, autocast, clipping, extra forward passes, test hooks."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype] = None  # torch.bfloat16 for bf16 autocast; None = fp32
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    augmented_views: bool = False  # PE-RSITR intra-modal terms need dropout-augmented features
    text_features: Optional[torch.Tensor] = None  # (N_captions, D) cached features of a frozen text tower
    slow_step_s: float = 0.0  # test hook (HARMA_TEST_SLOW_STEP_S): sleep after every step


@dataclass
class EpochResult:
    """Running totals of one epoch; saved in mid-epoch checkpoints so a resumed epoch reports
    averages over all its steps, not only those after the resume."""

    steps: int = 0  # optimiser steps done in this epoch (= batches consumed)
    samples: int = 0  # global samples (all ranks)
    seconds: float = 0.0  # training time, evaluation excluded
    lr: float = 0.0  # lr used by the last step
    sums: dict[str, float] = field(default_factory=dict)  # per-term sums over the steps
    stopped: bool = False  # max_steps reached

    @property
    def loss(self) -> dict[str, float]:
        """Mean of each term (and ``"loss"``) over the epoch's steps."""
        return {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_state(self) -> dict:
        return {"steps": self.steps, "samples": self.samples, "seconds": self.seconds, "lr": self.lr,
                "sums": dict(self.sums)}

    @classmethod
    def from_state(cls, state: dict) -> "EpochResult":
        return cls(steps=int(state["steps"]), samples=int(state["samples"]), seconds=float(state["seconds"]),
                   lr=float(state["lr"]), sums={k: float(v) for k, v in state["sums"].items()})


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere (released: fp32 everywhere)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: nn.Module, batch: tuple[torch.Tensor, ...], loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               settings: StepSettings, global_step: int) -> dict[str, float]:
    """Forward, gather, loss (once), backward, clip, optimiser and scheduler step.

    Args:
        model: the (possibly DDP-wrapped) ``HarmaModel``.
        batch: ``(images, tokens, image_ids, caption_ids)`` from the train loader.
        global_step: number of steps done before this one (for error messages).

    Returns:
        Each weighted loss term and ``"loss"`` (their sum) as floats.

    Raises:
        NonFiniteLossError: before the backward pass, so the parameters are left as they were.
    """
    images, tokens, image_ids, caption_ids = (t.to(settings.device, non_blocking=True) for t in batch)
    cached = settings.text_features[caption_ids] if settings.text_features is not None else None
    with _autocast(settings.device, settings.autocast_dtype):
        out = model(images, tokens, augmented_views=settings.augmented_views, text_features=cached)
    # Loss in fp32 on the global batch: every rank sees all B*world pairs (released all-gather).
    feats = {k: gather_features(v.float()) for k, v in out.items() if k.endswith(("_features", "_features_aug"))}
    terms = loss_fn(**feats, temperature=out["temperature"].float(), image_ids=gather_tensor(image_ids))
    total = torch.stack(list(terms.values())).sum()
    values = torch.stack([*terms.values(), total]).detach().float().cpu().tolist()  # one sync per step
    logged = dict(zip([*terms, "loss"], values))
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(global_step + 1, logged)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if settings.grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    optimizer.step()
    scheduler.step()
    return logged


def train_one_epoch(model: nn.Module, loader: Iterable, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, settings: StepSettings, *,
                    epoch: int, global_step: int, global_batch: int, max_steps: Optional[int] = None,
                    result: Optional[EpochResult] = None,
                    after_step: Optional[Callable[[int, EpochResult], None]] = None, progress: bool = True,
                    log_every: int = 10) -> EpochResult:
    """Run the loader's remaining batches (it may start mid-epoch), or until ``max_steps``.

    Args:
        epoch: 0-based epoch (for the progress bar).
        global_step: steps done before this call; the step counter continues from it.
        global_batch: samples per step over all ranks (for samples/s).
        max_steps: stop once the global step count reaches it.
        result: totals of the steps this epoch ran before a resume; continued in place.
        after_step: called as ``after_step(global_step, result)`` after every step (checkpoints).
        progress: show a tqdm bar (main rank only).
        log_every: steps between progress-bar updates of the loss terms.

    Returns:
        The epoch's running totals (``result`` if given).
    """
    model.train()
    result = result if result is not None else EpochResult()
    result.stopped = max_steps is not None and global_step >= max_steps
    if result.stopped:
        return result
    sums = defaultdict(float, result.sums)
    seconds_before, start = result.seconds, time.perf_counter()
    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}", disable=not progress,  # type: ignore[arg-type]
               dynamic_ncols=True, leave=False)
    for batch in bar:
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves it after)
        logged = train_step(model, batch, loss_fn, optimizer, scheduler, settings, global_step)
        global_step += 1
        for k, v in logged.items():
            sums[k] += v
        result.steps, result.samples, result.sums = result.steps + 1, result.samples + global_batch, dict(sums)
        result.lr = lr
        result.seconds = seconds_before + time.perf_counter() - start
        if after_step is not None:
            after_step(global_step, result)
        if settings.slow_step_s > 0:
            time.sleep(settings.slow_step_s)
        if progress and (result.steps % max(log_every, 1) == 0 or result.steps == 1):
            bar.set_postfix({**{k: f"{v:.4g}" for k, v in logged.items()}, "lr": f"{result.lr:.2e}",
                             "samples/s": f"{result.samples_per_s:.1f}"}, refresh=False)
        if max_steps is not None and global_step >= max_steps:
            result.stopped = True
            break
    bar.close()
    return result
