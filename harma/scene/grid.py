"""A grid of chips over a scene, sized in metres on the ground.

Chip size and stride are given in metres and turned into pixels with the scene's ground pixel size
(:attr:`Scene.pixel_size_m`); each chip is later resampled to the model's input size. Chips start at
multiples of the stride from the top-left corner, plus one last row and column flush with the
right and bottom edges when the stride does not reach them, so the whole scene is covered. A chip
whose share of valid (not no-data) pixels is under ``min_valid`` is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from harma.errors import DatasetError
from harma.scene.raster import Scene, Window

DEFAULT_CHIP_M = 70.0  # the models were trained on roughly 0.3-1 m imagery: a UCM/RSICD tile covers 60-80 m


@dataclass(frozen=True)
class Chip:
    """One chip: its number in the grid, its pixel window and its bounds (minx, miny, maxx, maxy) in the
    scene's CRS, exactly the scene's affine transform applied to the window's corners."""

    index: int
    col_off: int
    row_off: int
    width: int
    height: int
    bounds: tuple[float, float, float, float]

    @property
    def window(self) -> Window:
        return (self.col_off, self.row_off, self.width, self.height)

    def corners(self, scene: Scene) -> list[tuple[float, float]]:
        """The window's four corners in the scene's CRS: top-left, top-right, bottom-right, bottom-left."""
        c0, r0, c1, r1 = self.col_off, self.row_off, self.col_off + self.width, self.row_off + self.height
        return [scene.transform @ p for p in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]

    def centre_lonlat(self, scene: Scene) -> tuple[float, float]:
        """(lon, lat) in EPSG:4326 of the chip's centre."""
        x, y = scene.transform @ (self.col_off + self.width / 2, self.row_off + self.height / 2)
        lons, lats = scene.to_lonlat([x], [y])
        return lons[0], lats[0]


@dataclass
class ChipGrid:
    chip_m: float
    stride_m: float
    chip_px: tuple[int, int]  # (width, height) of every chip in pixels
    stride_px: tuple[int, int]
    min_valid: float
    chips: list[Chip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chips)

    def fingerprint(self) -> str:
        """A hash of the grid (sizes and every chip's window): part of the embedding cache key."""
        rows = [[self.chip_m, self.stride_m, *self.chip_px, *self.stride_px, self.min_valid]]
        rows += [list(c.window) for c in self.chips]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _offsets(size: int, chip: int, stride: int) -> list[int]:
    starts = list(range(0, size - chip + 1, stride))
    if starts[-1] + chip < size:
        starts.append(size - chip)
    return starts


def _bounds(scene: Scene, col: int, row: int, w: int, h: int) -> tuple[float, float, float, float]:
    xs, ys = zip(*(scene.transform @ p for p in ((col, row), (col + w, row), (col + w, row + h), (col, row + h))))
    return (min(xs), min(ys), max(xs), max(ys))


def _valid_share(mask: np.ndarray, scene: Scene, col: int, row: int, w: int, h: int) -> float:
    """Share of valid cells of ``mask`` (the scene's sampled validity) under the window."""
    sx, sy = mask.shape[1] / scene.width, mask.shape[0] / scene.height
    c0, r0 = int(math.floor(col * sx)), int(math.floor(row * sy))
    c1, r1 = max(c0 + 1, int(math.ceil((col + w) * sx))), max(r0 + 1, int(math.ceil((row + h) * sy)))
    return float(mask[r0:r1, c0:c1].mean())


def chip_grid(scene: Scene, chip_m: float = DEFAULT_CHIP_M, stride_m: Optional[float] = None,
              min_valid: float = 0.5, mask_side: int = 2048) -> ChipGrid:
    """The chips of ``scene``: ``chip_m`` metres a side, every ``stride_m`` metres (default ``chip_m / 2``).

    Chips are skipped by their share of valid pixels in one sampled validity mask of the scene (at most
    ``mask_side`` a side: exact for scenes up to that size).

    Raises:
        DatasetError: for a size or stride that is not a positive number, ``min_valid`` outside [0, 1],
            or a scene smaller than one chip (naming both sizes).
    """
    stride_m = chip_m / 2 if stride_m is None else stride_m
    for name, v in (("chip size", chip_m), ("stride", stride_m)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v == float("inf"):
            raise DatasetError(f"{name} {v!r} m: expected a positive number of metres")
    if not 0.0 <= min_valid <= 1.0:
        raise DatasetError(f"min_valid {min_valid!r}: expected a share between 0 and 1")
    px, py = scene.pixel_size_m
    cw, ch = max(2, round(chip_m / px)), max(2, round(chip_m / py))
    sw, sh = max(1, round(stride_m / px)), max(1, round(stride_m / py))
    if cw > scene.width or ch > scene.height:
        raise DatasetError(
            f"{scene.path}: the scene ({scene.width} x {scene.height} px, about {scene.width * px:.0f} x "
            f"{scene.height * py:.0f} m) is smaller than one {chip_m:g} m chip ({cw} x {ch} px); use a smaller "
            "chip size")
    grid = ChipGrid(float(chip_m), float(stride_m), (cw, ch), (sw, sh), float(min_valid))
    mask = scene.valid_mask(mask_side) if min_valid > 0 else None
    for row in _offsets(scene.height, ch, sh):
        for col in _offsets(scene.width, cw, sw):
            if mask is not None and _valid_share(mask, scene, col, row, cw, ch) < min_valid:
                continue
            grid.chips.append(Chip(len(grid.chips), col, row, cw, ch, _bounds(scene, col, row, cw, ch)))
    if not grid.chips:
        raise DatasetError(f"{scene.path}: no {chip_m:g} m chip of the scene has {min_valid:.0%} valid pixels "
                           "(the rest is no-data); lower min_valid or check the raster's no-data value")
    return grid
