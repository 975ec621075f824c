"""Exponential moving average of the trained weights (``optim.ema_decay``), as timm's ``ModelEmaV3``.

Only the model's trainable tensors are averaged (the adapters, or every weight under ``full``);
the frozen backbone is shared, so the average costs one copy of what a checkpoint stores. The
live weights keep training; validation, ``best/`` and the final test use the averaged ones
(:meth:`WeightEMA.applied`). The average is part of ``last/state.pt``, so a resumed run continues it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harma import CheckpointError, HarmaModel


class WeightEMA:
    """``shadow <- d * shadow + (1 - d) * weight`` after every optimiser step.

    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (timm's warm-up), so early epochs
    are not dominated by the initial weights.
    """

    def __init__(self, model: HarmaModel, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay, self.updates = float(decay), 0
        self._live = model.trainable_state_dict()  # detached views: copying into them writes the parameters
        self.shadow = {n: t.clone() for n, t in self._live.items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for name, live in self._live.items():
            self.shadow[name].lerp_(live, weight)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights in for the block's duration; the live ones come back after."""
        backup = {n: t.clone() for n, t in self._live.items()}
        for name, live in self._live.items():
            live.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, live in self._live.items():
                live.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow", {})
        if set(shadow) != set(self.shadow) or any(shadow[n].shape != t.shape for n, t in self.shadow.items()):
            raise CheckpointError("the saved weight average does not match the model's trainable tensors")
        for name, t in self.shadow.items():
            t.copy_(shadow[name])
        self.updates = int(state["updates"])
