"""Chips as GeoJSON (RFC 7946): a FeatureCollection in EPSG:4326, lon/lat order, one Polygon per chip."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from harma.errors import QueryError
from harma.scene.grid import ChipGrid
from harma.scene.raster import Scene


def _ring_area(ring: Sequence[Sequence[float]]) -> float:
    """Signed area (shoelace): positive for a counter-clockwise ring."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def chip_polygon(scene: Scene, grid: ChipGrid, i: int) -> list[list[float]]:
    """Chip ``i``'s exterior ring in (lon, lat): its four corners, counter-clockwise, closed."""
    corners = grid.chips[i].corners(scene)
    lons, lats = scene.to_lonlat([x for x, _ in corners], [y for _, y in corners])
    ring = [[float(lon), float(lat)] for lon, lat in zip(lons, lats)]
    ring.append(list(ring[0]))
    return ring if _ring_area(ring) > 0 else ring[::-1]


def to_geojson(scene: Scene, grid: ChipGrid, chip_ids: Sequence[int], scores, model: str, query: str) -> dict[str, Any]:
    """The chips ``chip_ids`` (best first, e.g. from :func:`top_k`) as a FeatureCollection; ``scores`` holds
    every chip's score (indexed by chip id). Each feature's properties: rank (1-based), score, model,
    query, chip (the id), plus the chip's pixel window for reference."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    features = []
    for rank, i in enumerate(chip_ids, start=1):
        i = int(i)
        if not 0 <= i < len(grid) or i >= len(s):
            raise QueryError(f"chip {i} does not exist: the grid has chips 0 to {len(grid) - 1}")
        chip = grid.chips[i]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [chip_polygon(scene, grid, i)]},
            "properties": {"rank": rank, "score": float(s[i]), "model": str(model), "query": str(query),
                           "chip": i, "window": list(chip.window)},
        })
    return {"type": "FeatureCollection", "features": features}
