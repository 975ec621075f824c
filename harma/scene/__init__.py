"""Search inside a large georeferenced scene: chips sized in metres, cached chip embeddings, text /
example-chip / image / Rocchio queries, score maps, heatmaps and GeoJSON export (docs/library.md)."""

from harma.scene.geojson import chip_polygon, to_geojson
from harma.scene.grid import DEFAULT_CHIP_M, Chip, ChipGrid, chip_grid
from harma.scene.index import SceneIndex, top_k
from harma.scene.raster import Scene
from harma.scene.render import colorize, heatmap_image, score_map

__all__ = ["Scene", "Chip", "ChipGrid", "chip_grid", "DEFAULT_CHIP_M", "SceneIndex", "top_k", "score_map",
           "heatmap_image", "colorize", "to_geojson", "chip_polygon"]
