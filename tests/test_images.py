"""Reading remote-sensing rasters: 16/32-bit and float images stretched to 8 bits, multi-band images
reduced to RGB by an explicit band choice, and clear errors (harma.data.images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from harma.data import DatasetError, open_image
from harma.data.images import stretch_to_uint8


def _scene(h: int = 48, w: int = 40, bands: int = 3, seed: int = 0) -> np.ndarray:
    """An 8-bit scene with structure (gradients + noise), one distinct pattern per band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * (3 + b) + y * (5 - b) + rng.integers(0, 40, (h, w))) % 256 for b in range(bands)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_stretched_not_white(tmp_path: Path, suffix: str):
    grey = _scene(bands=1)[..., 0]
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # the same picture in 16 bits
    assert Image.open(path).mode == "I;16"
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # Pillow alone: near white
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (48, 40, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert rgb.std() > 40 and _corr(rgb[..., 0], grey) > 0.98


def test_float_and_32_bit_integer_rasters(tmp_path: Path):
    grey = _scene(bands=1)[..., 0].astype(np.float32)
    reflectance = grey / 255 * 0.4 - 0.05  # float reflectance, some negative
    reflectance[0, :5] = np.nan  # no-data
    tifffile.imwrite(tmp_path / "f.tif", reflectance)
    tifffile.imwrite(tmp_path / "i.tif", (grey.astype(np.int32) * 1000 - 50000))
    for name in ("f.tif", "i.tif"):
        rgb = np.asarray(open_image(tmp_path / name))[..., 0]
        keep = np.isfinite(reflectance)
        assert rgb.std() > 40 and _corr(rgb[keep], grey[keep]) > 0.98, name
    assert (np.asarray(open_image(tmp_path / "f.tif"))[0, :5] == 0).all()


@pytest.mark.parametrize("planar", [False, True])
def test_multi_band_16_bit_uses_the_chosen_bands(tmp_path: Path, monkeypatch, planar: bool):
    scene = _scene(bands=4)
    data = scene.astype(np.uint16) * 16  # 12-bit sensor values
    path = tmp_path / "m.tif"
    if planar:
        tifffile.imwrite(path, np.moveaxis(data, -1, 0), planarconfig="separate", photometric="minisblack")
    else:
        tifffile.imwrite(path, data, photometric="rgb", extrasamples=[0])
    rgb = np.asarray(open_image(path))
    assert rgb.std() > 40
    for c in range(3):  # default: bands 0, 1, 2, each stretched on its own
        assert (rgb[..., c] == stretch_to_uint8(data[..., c])).all()
    monkeypatch.setenv("HARMA_BANDS", "3,2,1")
    rgb = np.asarray(open_image(path))
    assert [(rgb[..., c] == stretch_to_uint8(data[..., b])).all() for c, b in enumerate((3, 2, 1))] == [True] * 3
    assert (np.asarray(open_image(path, bands=(2, 1, 0)))[..., 0] == stretch_to_uint8(data[..., 2])).all()
    monkeypatch.setenv("HARMA_BANDS", "4,2,1")
    with pytest.raises(DatasetError, match=r"m\.tif: band 4 .* has 4 bands"):
        open_image(path)
    monkeypatch.setenv("HARMA_BANDS", "red")
    with pytest.raises(DatasetError, match="HARMA_BANDS"):
        open_image(path)


def test_16_bit_rgb_tiff_is_not_truncated(tmp_path: Path):
    data = _scene(bands=3).astype(np.uint16) * 16
    tifffile.imwrite(tmp_path / "rgb16.tif", data, photometric="rgb")
    assert np.asarray(Image.open(tmp_path / "rgb16.tif").convert("RGB")).max() < 16  # Pillow: high byte only
    rgb = np.asarray(open_image(tmp_path / "rgb16.tif"))
    assert rgb.max() == 255 and all(_corr(rgb[..., c], data[..., c]) > 0.98 for c in range(3))


def test_many_bands_and_eight_bit_images(tmp_path: Path):
    scene = _scene(bands=6)
    tifffile.imwrite(tmp_path / "six.tif", np.moveaxis(scene, -1, 0), planarconfig="separate", photometric="minisblack")
    assert (np.asarray(open_image(tmp_path / "six.tif", bands=(5, 4, 3))) == scene[..., [5, 4, 3]]).all()
    Image.fromarray(scene[..., :3]).save(tmp_path / "rgb.png")  # 8-bit RGB: as it is, no stretch
    assert (np.asarray(open_image(tmp_path / "rgb.png")) == scene[..., :3]).all()
    assert (np.asarray(open_image(tmp_path / "rgb.png", bands=(2, 1, 0))) == scene[..., [2, 1, 0]]).all()


def test_constant_band_and_stretch_rule():
    assert (stretch_to_uint8(np.full((4, 4), 7.0)) == 0).all()
    x = np.arange(101, dtype=np.float64)  # percentiles 2 and 98 are 2 and 98
    out = stretch_to_uint8(x)
    assert out[0] == 0 and out[2] == 0 and out[98] == 255 and out[100] == 255 and out[50] == 128


def test_image_cache_is_keyed_by_the_band_choice(tmp_path: Path, monkeypatch):
    from harma.data import ImageCache

    scene = _scene(bands=4)
    tifffile.imwrite(tmp_path / "m.tif", scene, photometric="rgb", extrasamples=[0])
    first = ImageCache([tmp_path / "m.tif"], 16, tmp_path / "cache")
    monkeypatch.setenv("HARMA_BANDS", "3,2,1")
    swapped = ImageCache([tmp_path / "m.tif"], 16, tmp_path / "cache")
    assert first.path != swapped.path
    assert not (np.asarray(first[0]) == np.asarray(swapped[0])).all()


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(_scene()).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short: the header reads, the pixels do not
    return path


def test_verify_images_names_bad_files_and_remembers_good_datasets(tmp_path: Path):
    from harma.data import verify_images

    good = [tmp_path / f"{i}.png" for i in range(3)]
    for p in good:
        Image.fromarray(_scene()).save(p)
    bad = _truncated_jpeg(tmp_path / "cut.jpg")
    Image.open(bad)  # opening alone succeeds: only decoding finds it
    with pytest.raises(DatasetError, match=r"1 of 4 images cannot be read: .*cut\.jpg"):
        verify_images([*good, bad], tmp_path / "cache")
    assert verify_images(good, tmp_path / "cache") == 3
    assert verify_images(good, tmp_path / "cache") == 0  # remembered
    Image.fromarray(_scene(seed=1)).save(good[0])
    os.utime(good[0], ns=(1, 1))
    assert verify_images(good, tmp_path / "cache") == 3  # a changed file is checked again


def test_training_stops_on_a_corrupt_image_before_the_run_starts(tmp_path: Path, capsys):
    from tests.test_encode import write_split
    from training.train import main

    data = write_split(tmp_path / "data", n_images=12)
    _truncated_jpeg(data / "images" / "im05.png")  # JPEG bytes cut short, behind a .png name
    code = main(["--config", "training/configs/debug_tiny.yaml", f"data.root={data}", "data.val_split=null",
                 "data.val_fraction=0.25", f"run.out_dir={tmp_path / 'runs'}", "run.name=x"])
    assert code == 2
    err = capsys.readouterr().err
    assert "images cannot be read" in err and "im05.png" in err
    assert not (tmp_path / "runs" / "x").exists()
