"""TIFFs are read by their real layout (harma.data.images): every layout (contiguous, band-interleaved
"planar") x compression x band count x bit depth decodes to exactly the chosen bands, never to band 0
in grey (issue 36: an 8-bit planar compressed TIFF of 3, 4 or 6 bands read as band 0, HARMA_BANDS ignored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import harma.data.images as images_module
from harma.data import DatasetError, open_image
from harma.data.cache import ImageCache, cache_key
from harma.data.images import stretch_to_uint8

try:  # the codecs tifffile needs for LZW and JPEG (optional; without it Pillow writes what it can)
    import imagecodecs  # noqa: F401
    HAVE_CODECS = True
except ImportError:
    HAVE_CODECS = False

TIFFFILE_CODECS = {"none": None, "zlib": "zlib", "lzma": "lzma", "lzw": "lzw", "jpeg": "jpeg"}
PILLOW_CODECS = {"none": None, "zlib": "tiff_adobe_deflate", "lzw": "tiff_lzw", "jpeg": "jpeg"}
CHOICES = {3: (2, 1, 0), 4: (3, 1, 0), 6: (5, 3, 1)}  # a HARMA_BANDS choice per band count


def _data(bands: int, bits: int, lossy: bool) -> np.ndarray:
    """(H, W, bands): random samples, or for JPEG smooth gradients, one direction per band."""
    dtype = np.uint8 if bits == 8 else np.uint16
    if not lossy:
        rng = np.random.default_rng(bands * 100 + bits)
        return rng.integers(0, 2 ** bits, (6, 8, bands), dtype=np.uint64).astype(dtype)
    y, x = np.mgrid[0:16, 0:16].astype(float)
    planes = [(x * np.cos(b) + y * np.sin(b)) for b in range(bands)]
    return np.stack([(p - p.min()) / (np.ptp(p) or 1) * 200 + 20 for p in planes], axis=-1).astype(dtype)


def _write(path: Path, data: np.ndarray, layout: str, compression: str, photometric: str) -> None:
    bands = data.shape[-1]
    if compression in ("none", "zlib", "lzma") or HAVE_CODECS:
        kw = dict(photometric=photometric, compression=TIFFFILE_CODECS[compression])
        if bands > 1:
            kw["planarconfig"] = "separate" if layout == "planar" else "contig"
        if photometric == "rgb" and bands > 3:
            kw["extrasamples"] = [0] * (bands - 3)  # unspecified extra bands (e.g. near infrared)
        arr = np.moveaxis(data, -1, 0) if layout == "planar" else data
        tifffile.imwrite(path, arr[0] if bands == 1 and layout == "planar" else arr.squeeze(-1) if bands == 1 else arr,
                         **kw)
        return
    mode = {(1, "minisblack"): "L", (3, "rgb"): "RGB"}.get((bands, photometric))
    if layout != "contig" or mode is None or (data.dtype != np.uint8 and (bands > 1 or compression == "jpeg")):
        pytest.skip(f"writing a {layout} {compression} TIFF of {bands} bands needs imagecodecs")
    img = Image.fromarray(data[..., 0] if bands == 1 else data)  # uint16 grey becomes I;16
    img.save(path, compression=PILLOW_CODECS[compression])


def _expected(data: np.ndarray, chosen: tuple[int, ...]) -> np.ndarray:
    picked = [0, 0, 0] if data.shape[-1] == 1 else list(chosen)
    if data.dtype == np.uint8:
        return data[..., picked]
    return np.stack([stretch_to_uint8(data[..., b]) for b in picked], axis=-1)


CASES = [(photometric, layout, compression, bands, bits)
         for photometric in ("minisblack", "rgb") for layout in ("contig", "planar")
         for compression in ("none", "zlib", "lzma", "lzw", "jpeg") for bands in (1, 3, 4, 6) for bits in (8, 16)
         if not (photometric == "rgb" and bands < 3)  # RGB has three bands or more
         and not (layout == "planar" and bands == 1)  # one band has no interleaving
         and not (compression == "jpeg" and bits != 8)  # baseline JPEG is 8-bit
         and not (compression == "jpeg" and layout == "contig" and bands > 3)]  # no such JPEG-in-TIFF


@pytest.mark.parametrize("photometric,layout,compression,bands,bits", CASES)
def test_every_layout_decodes_to_the_chosen_bands(tmp_path: Path, monkeypatch, photometric: str, layout: str,
                                                  compression: str, bands: int, bits: int):
    lossy = compression == "jpeg"
    data = _data(bands, bits, lossy)
    path = tmp_path / "x.tif"
    _write(path, data, layout, compression, photometric)
    monkeypatch.delenv("HARMA_BANDS", raising=False)
    for chosen in [(0, 1, 2)] + ([CHOICES[bands]] if bands in CHOICES else []):
        if chosen != (0, 1, 2):
            monkeypatch.setenv("HARMA_BANDS", ",".join(map(str, chosen)))
        rgb = np.asarray(open_image(path))
        want = _expected(data, chosen)
        assert rgb.shape == want.shape and rgb.dtype == np.uint8
        if not lossy:
            assert (rgb == want).all(), f"bands {chosen}: decoded {rgb[0, :3].tolist()} expected {want[0, :3].tolist()}"
            continue
        err = np.abs(rgb.astype(int) - want.astype(int)).mean(axis=(0, 1))
        assert (err < 8).all(), f"bands {chosen}: mean error per channel {err}"
        if bands > 1:  # each channel is its own band, not band 0 repeated
            assert not (rgb[..., 0] == rgb[..., 1]).all() and not (rgb[..., 1] == rgb[..., 2]).all()


def test_planar_grey_bands_whose_codec_is_missing_are_refused_not_misread(tmp_path: Path, monkeypatch):
    """Without imagecodecs tifffile cannot decode e.g. LZW; Pillow would read such a file as band 0 in grey,
    so the image is refused with that advice."""
    data = _data(6, 8, lossy=False)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(data, -1, 0), photometric="minisblack",
                     planarconfig="separate", compression="zlib")

    def no_codec(self, *a, **k):
        raise KeyError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_codec)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", no_codec)
    with pytest.raises(DatasetError, match=r"p\.tif: .*pip install imagecodecs"):
        open_image(tmp_path / "p.tif")


def test_grey_with_alpha_and_palette_tiffs_still_read_by_pillow(tmp_path: Path):
    grey = _data(1, 8, lossy=False)[..., 0]
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(tmp_path / "la.tif",
                                                                                    compression="tiff_lzw")
    assert (np.asarray(open_image(tmp_path / "la.tif")) == grey[..., None]).all()
    pal = Image.fromarray(grey % 4).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(tmp_path / "p.tif", compression="tiff_adobe_deflate")
    assert (np.asarray(open_image(tmp_path / "p.tif")) == np.asarray(pal.convert("RGB"))).all()


def test_image_cache_holds_the_bands_of_a_planar_tiff_and_is_keyed_by_the_decoder(tmp_path: Path, monkeypatch):
    data = np.ascontiguousarray(_data(3, 8, lossy=False)[:, :6])  # 6 x 6: cached without resizing
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, np.moveaxis(data, -1, 0), photometric="minisblack", planarconfig="separate",
                     compression="zlib")
    cache = ImageCache([path], 6, tmp_path / "cache")
    assert (np.asarray(cache[0]) == data).all()  # the three bands, not band 0 in grey
    key = cache_key([path], 6)
    monkeypatch.setattr(images_module, "DECODER_VERSION", 1)  # pixels an older reader decoded are not reused
    assert cache_key([path], 6) != key
