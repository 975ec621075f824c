"""A georeferenced raster opened lazily with rasterio: windowed reads as 8-bit RGB, never the whole scene.

- **Bands** are chosen as :mod:`harma.data.images` chooses them: ``bands=(r, g, b)`` (0-based), else
  ``$HARMA_BANDS``, else the first three; a single band is grey.
- **Values.** 8-bit data is used as it is. Anything else gets the percentile stretch of
  :func:`harma.data.images.stretch_to_uint8` (2nd -> 0, 98th -> 255 per band), with the percentiles
  taken once from the scene's decimated overview, not per window, so every chip of a scene is
  stretched alike.
- **No-data.** The raster's own mask (a no-data value, an alpha band, a mask band) where it has one;
  otherwise a pixel whose chosen bands are all exactly 0 (the black collar of an orthophoto). No-data
  pixels read as black; :meth:`Scene.valid_fraction` gives their share of a window.
- **Limits.** Each read (a window, at the size it is decoded to) is held to
  :func:`harma.data.decode_limits.check_size` and the shared decode budget; the scene itself may be
  of any size.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from harma.data.decode_limits import DECODE_BUDGET, check_size, decode_cost
from harma.data.images import STRETCH_PERCENTILES, image_bands
from harma.errors import DatasetError
from harma.io import file_sha256

Window = tuple[int, int, int, int]  # (col_off, row_off, width, height) in pixels
GDAL_CACHE_MB = 256  # GDAL's block cache unless $GDAL_CACHEMAX says otherwise
_cache_set = False
WGS84_A, WGS84_E2 = 6378137.0, 0.00669437999014  # semi-major axis (m), first eccentricity squared


def _rasterio():
    """rasterio, imported when a scene is first opened (the rest of the library does not need GDAL)."""
    try:
        import rasterio
        import rasterio.env
    except ImportError:
        raise DatasetError("scene search needs the rasterio package: pip install 'rasterio>=1.3'") from None
    global _cache_set
    if not _cache_set and "GDAL_CACHEMAX" not in os.environ:
        # GDAL's block cache defaults to 5% of RAM (GBs on a big machine): capped once per process, so that
        # reading a huge scene holds a bounded amount of decoded blocks; $GDAL_CACHEMAX overrides it
        cap = GDAL_CACHE_MB * (1 << 20)
        if (rasterio.env.get_gdal_config("GDAL_CACHEMAX") or 0) > cap:
            rasterio.env.set_gdal_config("GDAL_CACHEMAX", cap)
        _cache_set = True
    return rasterio


def _ground_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Distance in metres between two nearby points on the WGS 84 ellipsoid (local meridional and
    prime-vertical radii at their mean latitude: exact to well under 0.1% for neighbouring pixels)."""
    phi = math.radians((lat1 + lat2) / 2)
    w = 1 - WGS84_E2 * math.sin(phi) ** 2
    meridional, prime_vertical = WGS84_A * (1 - WGS84_E2) / w ** 1.5, WGS84_A / math.sqrt(w)
    dlon = (lon2 - lon1 + 180) % 360 - 180
    return math.hypot(math.radians(lat2 - lat1) * meridional, math.radians(dlon) * prime_vertical * math.cos(phi))


class Scene:
    """One raster file; open with :meth:`Scene.open`. Thread-safe: each thread reads through its own handle."""

    def __init__(self, path: Path, bands: tuple[int, int, int], meta: dict) -> None:
        self.path = path
        self.bands = bands
        self.width: int = meta["width"]
        self.height: int = meta["height"]
        self.count: int = meta["count"]
        self.dtype: str = meta["dtype"]
        self.crs: str = meta["crs"]
        self.transform = meta["transform"]
        self.has_mask: bool = meta["has_mask"]
        self._local = threading.local()

    @classmethod
    def open(cls, path: Union[str, Path], bands: Optional[Sequence[int]] = None) -> "Scene":
        """Open ``path`` (reading only its header).

        Raises:
            DatasetError: one line naming the file for: not found, not a raster, no CRS or no
                geotransform, a raster smaller than 2 x 2, a band choice the raster does not have.
        """
        rasterio = _rasterio()
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: scene file not found")
        chosen = image_bands(bands)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as ds:
                    if ds.count < 1:  # e.g. a container of subdatasets (HDF, NetCDF)
                        raise DatasetError(f"{path}: the raster has no bands (a container of subdatasets? open "
                                           "one of them)")
                    meta = {"width": ds.width, "height": ds.height, "count": ds.count, "dtype": ds.dtypes[0],
                            "crs": ds.crs, "transform": ds.transform,
                            "has_mask": any(rasterio.enums.MaskFlags.all_valid not in f for f in ds.mask_flag_enums)}
        except rasterio.errors.RasterioError as e:
            raise DatasetError(f"{path}: not a raster GDAL can read ({str(e).splitlines()[0][:200]})") from None
        if meta["crs"] is None or meta["transform"].is_identity:
            raise DatasetError(f"{path}: the raster has no coordinate reference system (CRS) or no geotransform; "
                               "scene search needs a georeferenced raster such as a GeoTIFF")
        if meta["width"] < 2 or meta["height"] < 2:
            raise DatasetError(f"{path}: the raster is {meta['width']} x {meta['height']} pixels; a scene needs at "
                               "least 2 x 2")
        if meta["count"] > 1 and max(chosen) >= meta["count"]:
            raise DatasetError(f"{path}: band {max(chosen)} was asked for (bands {chosen}, 0-based) but the raster "
                               f"has {meta['count']} bands; set HARMA_BANDS or bands= (e.g. 2,1,0)")
        crs = meta["crs"]
        meta["crs"] = crs.to_string() if crs.to_epsg() is not None else crs.to_wkt()
        return cls(path, chosen, meta)

    # -- reading ---------------------------------------------------------------------------------------
    def _ds(self):
        ds = getattr(self._local, "ds", None)
        if ds is None or ds.closed:
            ds = self._local.ds = _rasterio().open(self.path)
        return ds

    @property
    def _indexes(self) -> list[int]:
        return [1, 1, 1] if self.count == 1 else [b + 1 for b in self.bands]

    def _read(self, window: Window, out_size: Optional[tuple[int, int]],
              sample: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) raw values and an (h, w) bool validity mask of ``window`` resampled to ``out_size``
        (area average; nearest pixel with ``sample``)."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RioWindow

        col, row, w, h = (int(v) for v in window)
        if w < 1 or h < 1 or col < 0 or row < 0 or col + w > self.width or row + h > self.height:
            raise DatasetError(f"{self.path}: window {window} is outside the {self.width} x {self.height} raster")
        ow, oh = out_size if out_size is not None else (w, h)
        itemsize = np.dtype(self.dtype).itemsize
        # GDAL decodes the window block by block through its bounded block cache and holds only the
        # result: the result and one block are held to the limits, not the window (an overview of a
        # huge scene is a window of the whole scene)
        check_size(f"{self.path} (read at {ow} x {oh})", ow, oh, 3, itemsize)
        if sample:
            resampling = Resampling.nearest
        else:
            resampling = Resampling.nearest if (ow, oh) == (w, h) else Resampling.average
        rw = RioWindow(col, row, w, h)
        try:
            with DECODE_BUDGET.reserve(decode_cost(ow, oh, 3, itemsize)):
                ds = self._ds()
                bh, bw = ds.block_shapes[0]
                check_size(f"{self.path} (one block of {bw} x {bh})", bw, bh, ds.count, itemsize)
                data = ds.read(self._indexes, window=rw, out_shape=(3, oh, ow), resampling=resampling)
                if self.has_mask:
                    valid = ds.dataset_mask(window=rw, out_shape=(oh, ow), resampling=Resampling.nearest) > 0
                else:
                    valid = (data != 0).any(axis=0)
                if data.dtype.kind == "f":  # NaN or infinite samples are no-data whatever the mask says
                    valid &= np.isfinite(data).all(axis=0)
        except _rasterio().errors.RasterioError as e:
            raise DatasetError(f"{self.path}: cannot read window {window} ({str(e).splitlines()[0][:200]})") from None
        return data, valid

    @cached_property
    def _stretch(self) -> Optional[np.ndarray]:
        """Per band (lo, hi) of the percentile stretch, from the overview's valid pixels; None for 8-bit."""
        if self.dtype == "uint8":
            return None
        data, valid = self._read((0, 0, self.width, self.height), self._overview_size(1024))
        out = np.zeros((3, 2))
        for c in range(3):
            x = data[c].astype(np.float64)[valid]
            x = x[np.isfinite(x)]
            if x.size:
                out[c] = np.percentile(x, STRETCH_PERCENTILES)
        return out

    def _to_image(self, data: np.ndarray, valid: np.ndarray) -> Image.Image:
        if self._stretch is None:
            rgb = data.astype(np.uint8)
        else:
            rgb = np.zeros(data.shape, dtype=np.uint8)
            for c, (lo, hi) in enumerate(self._stretch):
                x = data[c].astype(np.float64)
                if hi > lo:
                    x = np.where(np.isfinite(x), x, lo)
                    rgb[c] = np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
        rgb[:, ~valid] = 0
        return Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)), mode="RGB")

    def read_rgb(self, window: Window, out_size: Optional[tuple[int, int]] = None) -> Image.Image:
        """The pixels of ``window`` = (col_off, row_off, width, height) as an 8-bit RGB image, resampled
        (area average) to ``out_size`` = (width, height) when given; no-data is black."""
        return self._to_image(*self._read(window, out_size))

    def valid_fraction(self, window: Window, sample: int = 64) -> float:
        """Share of the window's pixels that are not no-data (from a read of at most ``sample`` px a side)."""
        w, h = int(window[2]), int(window[3])
        s = min(1.0, sample / max(w, h))
        _, valid = self._read(window, (max(1, round(w * s)), max(1, round(h * s))), sample=True)
        return float(valid.mean())

    def valid_mask(self, max_side: int = 2048) -> np.ndarray:
        """(h, w) bool: which pixels of the scene, sampled (nearest) at most ``max_side`` a side, are not
        no-data; one decimated pass over the scene."""
        return self._read((0, 0, self.width, self.height), self._overview_size(max_side), sample=True)[1]

    def _overview_size(self, max_side: int) -> tuple[int, int]:
        s = min(1.0, max_side / max(self.width, self.height))
        return max(1, round(self.width * s)), max(1, round(self.height * s))

    def overview(self, max_side: int = 1024) -> Image.Image:
        """The whole scene downsampled so its longer side is at most ``max_side`` (a decimated read)."""
        return self.read_rgb((0, 0, self.width, self.height), self._overview_size(max_side))

    # -- georeferencing ------------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        """sha256 of the file's bytes (computed once)."""
        return file_sha256(self.path)

    def to_lonlat(self, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
        """Coordinates in the scene's CRS to (lons, lats) in EPSG:4326."""
        from rasterio.warp import transform

        lons, lats = transform(self.crs, "EPSG:4326", list(xs), list(ys))
        return list(lons), list(lats)

    @cached_property
    def pixel_size_m(self) -> tuple[float, float]:
        """(x, y) size of one pixel on the ground in metres, at the scene's centre (the distance on the
        WGS 84 ellipsoid to the neighbouring pixels; right in any CRS, Mercator's scale and degrees included)."""
        c, r = self.width / 2, self.height / 2
        xs, ys = zip(*(self.transform @ p for p in ((c, r), (c + 1, r), (c, r + 1))))
        lons, lats = self.to_lonlat(xs, ys)
        return (_ground_m(lons[0], lats[0], lons[1], lats[1]), _ground_m(lons[0], lats[0], lons[2], lats[2]))

    def __repr__(self) -> str:
        return f"Scene({str(self.path)!r}, {self.width} x {self.height}, {self.crs})"
