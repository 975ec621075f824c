"""Per-pixel score maps over a scene and heatmaps blended over its overview."""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from harma.errors import InputError
from harma.scene.grid import ChipGrid
from harma.scene.raster import Scene

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis' endpoints and midpoints), interpolated
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _as_array(scores: Union[torch.Tensor, np.ndarray, Sequence[float]], n: int) -> np.ndarray:
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if s.shape != (n,):
        raise InputError(f"scores of shape {s.shape} for a grid of {n} chips: expected one score per chip")
    return s


def score_map(scene: Scene, grid: ChipGrid, scores, max_side: int = 512) -> np.ndarray:
    """An (H', W') float map of the scene (longer side at most ``max_side``): each cell the mean score of
    the chips that cover it (overlapping chips averaged); NaN where no chip does."""
    s = _as_array(scores, len(grid))
    scale = min(1.0, max_side / max(scene.width, scene.height))
    w, h = max(1, round(scene.width * scale)), max(1, round(scene.height * scale))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for chip, v in zip(grid.chips, s):
        if not np.isfinite(v):
            continue
        c0, r0 = int(math.floor(chip.col_off * scale)), int(math.floor(chip.row_off * scale))
        c1 = max(c0 + 1, int(math.ceil((chip.col_off + chip.width) * scale)))
        r1 = max(r0 + 1, int(math.ceil((chip.row_off + chip.height) * scale)))
        total[r0:r1, c0:c1] += v
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as (..., 3) uint8 colours on the module's ramp."""
    x = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    return np.round(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def heatmap_image(scene: Scene, smap: np.ndarray, max_side: int = 1024, alpha: float = 0.5) -> Image.Image:
    """The scene's overview with ``smap`` (from :func:`score_map`) blended over it: scores stretched from
    the map's lowest (dark blue) to its highest (yellow); cells without a chip show the scene alone."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha {alpha!r}: expected a number between 0 and 1")
    base = scene.overview(max_side)
    smap = np.asarray(smap, dtype=np.float64)
    finite = np.isfinite(smap)
    if smap.ndim != 2 or not finite.any():
        return base
    lo, hi = smap[finite].min(), smap[finite].max()
    norm = (smap - lo) / (hi - lo) if hi > lo else np.full(smap.shape, 0.5)
    norm = np.where(finite, norm, np.nan).astype(np.float32)
    big = np.asarray(Image.fromarray(norm, mode="F").resize(base.size, Image.NEAREST))
    cover = np.isfinite(big)
    rgb = np.asarray(base, dtype=np.float64)
    blend = rgb * (1 - alpha) + colorize(big).astype(np.float64) * alpha
    out = np.where(cover[..., None], blend, rgb)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")
