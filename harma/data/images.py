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
- **Reader.** Chosen by the file's real layout (TIFF tags: samples per pixel, bits, photometric).
  Pillow reads every non-TIFF, and the TIFFs it decodes exactly: one sample (grey, palette, bilevel,
  16/32-bit, float), grey + alpha, colour spaces it converts to RGB (YCbCr, CMYK, CIELab), and
  8-bit RGB when only its first three bands are asked for. Every other TIFF (several grey samples,
  RGB with extra samples, more than 8 bits per sample, more than four bands, contiguous or
  band-interleaved/planar, any compression), and a TIFF Pillow cannot open, goes through ``tifffile``
  (a PyPI wheel), imported only then. Pillow would misread those: truncate wide samples to their
  high byte, drop extra bands, or read a compressed planar image as its band 0 in grey. tifffile
  decodes zlib/deflate, LZMA and PackBits itself; for LZW, JPEG and other codecs in such a layout
  it needs ``imagecodecs``, and without it the image is refused with that advice, never misread.
- **Limits.** Every reader checks the image's size from its header before decoding, and
  concurrent decodes share a memory budget: :mod:`harma.data.decode_limits` (``PIL.Image.MAX_IMAGE_PIXELS``,
  ``HARMA_DECODE_MB``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from harma.data.decode_limits import DECODE_BUDGET, check_size, decode_cost
from harma.errors import DatasetError, HarmaError
from harma.io import hash_files

# What open_image makes of a file: bumped whenever it may decode a file differently or refuse one it read
# (2: TIFFs routed by layout, size limits), so caches of decoded pixels and verify marks start afresh.
DECODER_VERSION = 2
DEFAULT_BANDS = (0, 1, 2)
STRETCH_PERCENTILES = (2.0, 98.0)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TIFF_BITS, _TIFF_PHOTOMETRIC, _TIFF_SAMPLES, _TIFF_EXTRA_SAMPLES = 258, 262, 277, 338
_GREY, _RGB = {0, 1}, 2  # photometric: min-is-white / min-is-black, RGB
_COLOUR_SPACES = (5, 6, 8, 9, 10)  # CMYK, YCbCr, CIELab, ICCLab, ITULab: Pillow converts these to RGB
_ALPHA = {1, 2}  # extra samples: associated, unassociated alpha
_TIFF_TILE_SIZE = (322, 323)  # tile width, tile length

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


def decode_signature() -> str:
    """What decides the pixels :func:`open_image` makes of a file besides its bytes (the decoder version
    and the band choice): every cache of decoded pixels, embeddings or verify marks keys on it."""
    return f"decoder-{DECODER_VERSION}|bands-{','.join(map(str, image_bands()))}"


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


def _tiff_layout(img: Image.Image) -> tuple[int, int, Optional[int], tuple]:
    """(samples per pixel, widest bits per sample, photometric, extra samples) from a TIFF's tags."""
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS, 1)
    bits = max(bits) if isinstance(bits, (tuple, list)) else bits
    extra = tags.get(_TIFF_EXTRA_SAMPLES, ())
    extra = tuple(extra) if isinstance(extra, (tuple, list)) else (extra,)
    return int(tags.get(_TIFF_SAMPLES, 1)), int(bits), tags.get(_TIFF_PHOTOMETRIC), extra


def _pillow_reads(img: Image.Image, chosen: tuple[int, ...]) -> bool:
    """Whether Pillow decodes this image to exactly the samples asked for (the module's reader rule).

    Every non-TIFF, and the TIFFs of one sample, of grey + alpha, of a colour space Pillow converts
    (YCbCr, CMYK, CIELab) or of 8-bit RGB when only its first three bands are asked for. Not the
    others: Pillow truncates wider samples to their high byte, drops extra samples, and reads a
    compressed band-interleaved (planar) image of several grey samples as its band 0 alone.
    """
    if img.format != "TIFF":
        return True
    samples, bits, photometric, extra = _tiff_layout(img)
    if samples == 1 or (photometric in _COLOUR_SPACES and bits <= 8):
        return True
    if samples == 2 and photometric in _GREY and set(extra) <= _ALPHA and extra:
        return True
    return photometric == _RGB and bits == 8 and max(chosen) < 3


def _pillow_cost(img: Image.Image) -> tuple[int, int]:
    """(bands, bytes per band) that Pillow holds while decoding ``img`` (4 bytes a pixel for most modes)."""
    if img.mode in ("1", "L", "P"):
        return 1, 1
    return (1, 2) if img.mode.startswith("I;16") else (1, 4)


def _image_axes(axes: str, shape: tuple[int, ...], name: str) -> tuple[str, tuple[int, ...]]:
    """``axes`` and ``shape`` without singleton axes, checked to be one 2-D image with optional bands."""
    kept = [(a, n) for a, n in zip(axes, shape) if a in "YX" or n != 1]
    axes, shape = "".join(a for a, _ in kept), tuple(n for _, n in kept)
    if "Y" not in axes or "X" not in axes or len(axes) > 3:
        raise DatasetError(f"{name}: cannot read TIFF (axes {axes!r}, shape {shape}: expected one 2-D image with "
                           "optional bands)")
    return axes, shape


def _read_tiff(path: Path, chosen: tuple[int, ...]) -> Image.Image:
    """A TIFF's first image as RGB through tifffile, its size checked from the header before decoding."""
    name = str(path)
    try:
        import tifffile
    except ImportError:
        raise DatasetError(f"{path}: this TIFF (its layout is one Pillow reads wrongly or not at all) needs the "
                           "tifffile package: pip install tifffile") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = _image_axes(series.axes, series.shape, name)
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            bands = int(np.prod([n for a, n in zip(axes, shape) if a not in "YX"]))  # 1 for an empty product
            itemsize = series.dtype.itemsize
            check_size(name, width, height, bands, itemsize)
            page = series.keyframe
            if page.is_tiled:  # each tile is decoded whole: a huge tile of a small image is a bomb too
                check_size(f"{name} (one tile)", page.tilewidth, page.tilelength * max(page.tiledepth, 1), bands,
                           itemsize)
            with DECODE_BUDGET.reserve(decode_cost(width, height, bands, itemsize)):
                pixels = series.asarray().reshape(shape)
                order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
                return to_rgb(pixels.transpose(order), chosen, name)
    except HarmaError:
        raise
    except Exception as e:  # tifffile raises many types (TiffFileError, ValueError, codec errors)
        if "imagecodecs" in str(e):  # LZW, JPEG, ... : tifffile decodes only zlib, LZMA and PackBits itself
            raise DatasetError(f"{path}: this TIFF's compression needs the imagecodecs package in this layout "
                               f"(Pillow cannot read it correctly): pip install imagecodecs ({e})") from None
        raise DatasetError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from None


def open_image(path: str | Path, bands: Optional[Sequence[int]] = None) -> Image.Image:
    """Open an image as 8-bit RGB, turning every failure into a :class:`DatasetError` naming the file.

    16/32-bit and floating-point images are stretched and multi-band images reduced to three bands
    by the rule in this module's docstring. Every reader is held to the limits of
    :mod:`harma.data.decode_limits` before it decodes: an image over PIL's ``MAX_IMAGE_PIXELS`` (a
    possible decompression bomb) is refused, not only warned about, and concurrent decodes share
    the ``HARMA_DECODE_MB`` budget.

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
        with warnings.catch_warnings():  # only around the header read: the filters are process-wide
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if not _pillow_reads(img, chosen):
                return _read_tiff(path, chosen)
            check_size(str(path), *img.size, *_pillow_cost(img))  # the limit, whatever the filters in other threads
            tile = [getattr(img, "tag_v2", {}).get(t) for t in _TIFF_TILE_SIZE] if img.format == "TIFF" else []
            if all(isinstance(t, int) for t in tile) and tile:  # each tile is decoded whole
                check_size(f"{path} (one tile)", *tile, *_pillow_cost(img))
            with DECODE_BUDGET.reserve(decode_cost(*img.size, *_pillow_cost(img))):
                if img.mode in _HIGH_DEPTH_MODES:
                    return to_rgb(np.asarray(img), chosen, str(path))
                if chosen != DEFAULT_BANDS and img.mode in ("RGB", "RGBA"):
                    return to_rgb(np.asarray(img), chosen, str(path))
                return img.convert("RGB")
    except HarmaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if path.suffix.lower() in (".tif", ".tiff"):  # e.g. more than four bands: tifffile may read it
            return _read_tiff(path, chosen)
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def decode_failures(paths: Sequence[str | Path],
                    progress: Optional[Callable[[int, int], None]] = None) -> list[tuple[int, DatasetError]]:
    """Decode every image once with :func:`open_image`: ``(index, error)`` of each that cannot be read,
    in order. ``progress(done, total)`` after each image."""
    bad: list[tuple[int, DatasetError]] = []
    for i, p in enumerate(paths):
        try:
            open_image(p)
        except DatasetError as e:
            bad.append((i, e))
        if progress is not None:
            progress(i + 1, len(paths))
    return bad


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
    h = hash_files(hashlib.sha256(f"verify-v2|{decode_signature()}".encode()), paths)
    marker = Path(cache_dir) / f"verified-{h.hexdigest()[:20]}" if cache_dir is not None else None
    if marker is not None and marker.is_file():
        return 0
    bad = [str(e) for _, e in decode_failures(paths, progress)]
    if bad:
        shown = "; ".join(bad[:5])
        raise DatasetError(f"{len(bad)} of {len(paths)} images cannot be read: {shown}"
                           + (" (and more)" if len(bad) > 5 else ""))
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{len(paths)} images decoded\n")
    return len(paths)
