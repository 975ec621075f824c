"""Image files on disk: finding them in a folder and opening them safely as 8-bit RGB.

Remote-sensing imagery is often not 8-bit RGB: 16-bit or 32-bit integer and floating-point rasters,
single-band or with more than three bands (GeoTIFF). :func:`open_image` reads them by one documented
rule instead of letting a decoder truncate them silently:

- **Bands.** Multi-band images are reduced to RGB by an explicit band choice, 0-based: the first
  three by default, else ``bands=(r, g, b)`` or the environment variable ``HARMA_BANDS=3,2,1`` (read
  at every call, so it reaches data-loader workers, the CLIs and the app alike). A single band is
  repeated into grey.
- **Values.** 8-bit data is used as it is. Anything else (16/32-bit integers, floats) gets a
  per-image, per-band linear percentile stretch: the band's 2nd percentile maps to 0 and its 98th
  to 255, clipped, the usual quick-look rule for RS data. Non-finite pixels (no-data) become 0.
- **Reader.** Pillow, except for TIFFs it would decode wrongly (more than 8 bits per sample with
  several samples, which Pillow truncates to their high byte, or more than four bands) or cannot
  decode: those go through ``tifffile`` (a PyPI wheel), imported only then.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from harma.errors import DatasetError
from harma.io import hash_files

DEFAULT_BANDS = (0, 1, 2)
STRETCH_PERCENTILES = (2.0, 98.0)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TIFF_BITS, _TIFF_SAMPLES = 258, 277

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def scan_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive suffix), sorted by path.

    Hidden files and folders (names starting with ``.``) are skipped.
    """
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_bands(bands: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """The band choice: ``bands`` if given, else ``$HARMA_BANDS`` (``"3,2,1"``), else the first three."""
    if bands is None:
        raw = os.environ.get("HARMA_BANDS", "").strip()
        if not raw:
            return DEFAULT_BANDS
        try:
            bands = [int(b) for b in raw.replace(" ", "").split(",")]
        except ValueError:
            raise DatasetError(f"HARMA_BANDS={raw!r}: expected three 0-based band numbers, e.g. 3,2,1") from None
    bands = tuple(int(b) for b in bands)
    if len(bands) != 3 or any(b < 0 for b in bands):
        raise DatasetError(f"bands {bands}: expected three 0-based band numbers (red, green, blue), e.g. 3,2,1")
    return bands


def stretch_to_uint8(band: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Linear stretch of one band to 0-255: its ``percentiles`` map to 0 and 255 (clipped); non-finite
    pixels become 0; a constant band becomes 0."""
    x = band.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.uint8)
    lo, hi = np.percentile(x[finite], percentiles)
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.uint8)
    out = np.clip((np.where(finite, x, lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(out * 255).astype(np.uint8)


def to_rgb(pixels: np.ndarray, bands: Sequence[int], name: str) -> Image.Image:
    """An (H, W) or (H, W, C) array of any numeric dtype as an 8-bit RGB image (see the module rule)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise DatasetError(f"{name}: cannot read image (pixel array of shape {pixels.shape}, expected height x width"
                           " x bands)")
    n = pixels.shape[2]
    if n == 1:
        chosen = [0, 0, 0]
    else:
        missing = [b for b in bands if b >= n]
        if missing:
            raise DatasetError(f"{name}: band {missing[0]} was asked for (bands {tuple(bands)}, 0-based) but the "
                               f"image has {n} bands; set HARMA_BANDS (e.g. 2,1,0)")
        chosen = list(bands)
    pixels = pixels[..., chosen]
    if pixels.dtype == np.uint8:
        rgb = pixels
    elif pixels.dtype == np.bool_:
        rgb = pixels.astype(np.uint8) * 255
    elif np.issubdtype(pixels.dtype, np.number) and not np.iscomplexobj(pixels):
        rgb = np.stack([stretch_to_uint8(pixels[..., c]) for c in range(3)], axis=-1)
    else:
        raise DatasetError(f"{name}: cannot read image (pixels of type {pixels.dtype})")
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _needs_tifffile(img: Image.Image) -> bool:
    """A TIFF that Pillow opens but would decode wrongly (several samples of more than 8 bits)."""
    if img.format != "TIFF":
        return False
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS, 8)
    bits = max(bits) if isinstance(bits, (tuple, list)) else bits
    return int(tags.get(_TIFF_SAMPLES, 1)) > 1 and int(bits) > 8


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first image as (H, W) or (H, W, bands), through tifffile."""
    try:
        import tifffile
    except ImportError:
        raise DatasetError(f"{path}: this TIFF (more than 8 bits per sample in several bands, or a layout Pillow "
                           "cannot read) needs the tifffile package: pip install tifffile") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, pixels = series.axes, series.asarray()
    except Exception as e:  # tifffile raises many types (TiffFileError, ValueError, codec errors)
        raise DatasetError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from None
    for i in range(len(axes) - 1, -1, -1):  # drop singleton axes (time, depth, a lone band)
        if axes[i] not in "YX" and pixels.shape[i] == 1:
            pixels, axes = pixels.take(0, axis=i), axes[:i] + axes[i + 1:]
    if "Y" not in axes or "X" not in axes or len(axes) > 3:
        raise DatasetError(f"{path}: cannot read TIFF (axes {axes!r}, shape {pixels.shape}: expected one 2-D "
                           "image with optional bands)")
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
    return pixels.transpose(order)


def open_image(path: str | Path, bands: Optional[Sequence[int]] = None) -> Image.Image:
    """Open an image as 8-bit RGB, turning every failure into a :class:`DatasetError` naming the file.

    16/32-bit and floating-point images are stretched and multi-band images reduced to three bands
    by the rule in this module's docstring. PIL's ``MAX_IMAGE_PIXELS`` limit is kept as configured;
    an image above it (a possible decompression bomb) is refused instead of only warned about.

    Args:
        path: Image file.
        bands: 0-based (red, green, blue) band numbers for multi-band images; default
            ``$HARMA_BANDS`` or the first three.

    Returns:
        The decoded RGB image.
    """
    path = Path(path)
    chosen = image_bands(bands)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if _needs_tifffile(img):
                    return to_rgb(_read_tiff(path), chosen, str(path))
                if img.mode in _HIGH_DEPTH_MODES:
                    return to_rgb(np.asarray(img), chosen, str(path))
                if chosen != DEFAULT_BANDS and img.mode in ("RGB", "RGBA"):
                    return to_rgb(np.asarray(img), chosen, str(path))
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if path.suffix.lower() in (".tif", ".tiff"):  # e.g. more than four bands: tifffile may read it
            return to_rgb(_read_tiff(path), chosen, str(path))
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def verify_images(paths: Sequence[str | Path], cache_dir: Optional[str | Path] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Decode every image once, before work starts that would otherwise stop at the first bad one.

    Args:
        paths: image files (e.g. every image of the train and val splits).
        cache_dir: where to remember that exactly these files (path, size, modification time) and
            this band choice decoded, so the check runs once per dataset; None: always check.
        progress: ``progress(done, total)``.

    Returns:
        How many images were decoded (0 when the cache already vouched for them).

    Raises:
        DatasetError: naming how many images failed and the first five, each with its reason.
    """
    h = hash_files(hashlib.sha256(f"verify-v1|{image_bands()}".encode()), paths)
    marker = Path(cache_dir) / f"verified-{h.hexdigest()[:20]}" if cache_dir is not None else None
    if marker is not None and marker.is_file():
        return 0
    bad: list[str] = []
    for i, p in enumerate(paths):
        try:
            open_image(p)
        except DatasetError as e:
            bad.append(str(e))
        if progress is not None:
            progress(i + 1, len(paths))
    if bad:
        shown = "; ".join(bad[:5])
        raise DatasetError(f"{len(bad)} of {len(paths)} images cannot be read: {shown}"
                           + (" (and more)" if len(bad) > 5 else ""))
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{len(paths)} images decoded\n")
    return len(paths)
