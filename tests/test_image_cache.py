"""The decoded-image cache: same pixels as decoding + resizing, reused, rebuilt when files change."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harma.data import DatasetError, ImageCache, ImageDataset, PairDataset, load_split


def _images(root, n=5, size=20):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_cache_matches_decoding_and_is_reused(tmp_path):
    paths = _images(tmp_path)
    calls = []
    cache = ImageCache(paths, 16, tmp_path / "cache", progress=lambda d, t: calls.append((d, t)))
    assert len(cache) == 5 and calls[-1] == (5, 5)
    expected = np.asarray(Image.open(paths[2]).convert("RGB").resize((16, 16), Image.BICUBIC))
    assert np.array_equal(np.asarray(cache[2]), expected)
    again = ImageCache(paths, 16, tmp_path / "cache", progress=lambda d, t: pytest.fail("rebuilt"))
    assert again.path == cache.path
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary files left


def test_cache_key_changes_with_files(tmp_path):
    paths = _images(tmp_path)
    first = ImageCache(paths, 16, tmp_path / "cache").path
    Image.new("RGB", (20, 24), "red").save(paths[0])
    assert ImageCache(paths, 16, tmp_path / "cache").path != first


def test_datasets_read_from_cache(tmp_path):
    _images(tmp_path, n=3)  # writes images/0.png .. 2.png
    (tmp_path / "train.csv").write_text("image,caption\n" + "".join(f"images/{i}.png,cap {i}\n" for i in range(3)))
    split = load_split(tmp_path, "train")
    cache = ImageCache(split.images, 8, tmp_path / "cache")
    img, cap, idx = PairDataset(split, None, images=cache)[1]
    assert img.size == (8, 8) and cap == "cap 1" and idx == 1
    assert ImageDataset(split.images, None, images=cache)[2][0].size == (8, 8)


def test_corrupt_image_fails_build_cleanly(tmp_path):
    paths = _images(tmp_path, n=2)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="1.png"):
        ImageCache(paths, 8, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())
