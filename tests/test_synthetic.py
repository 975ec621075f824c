"""The synthetic coloured-shapes dataset (harma/data/synthetic.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from harma.data import load_split, open_image, write_synthetic_dataset
from harma.data.synthetic import COLORS, SHAPES


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_and_disjoint_splits(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", n_images=12, captions_per_image=5, image_size=32)
    train = load_split(root, "train", expected_captions_per_image=5)
    val = load_split(root, "val", expected_captions_per_image=5)
    assert (train.num_images, train.num_captions) == (12, 60)
    assert (val.num_images, val.num_captions) == (3, 15)  # default n_images // 4
    assert not set(train.images) & set(val.images)
    img = open_image(train.images[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    # balanced classes: 12 train images cover all 4 colours x 3 shapes across the two splits
    assert len(set(train.labels) | set(val.labels)) == len(COLORS) * len(SHAPES)


def test_captions_name_colour_and_shape(tmp_path):
    root = write_synthetic_dataset(tmp_path, n_images=16, val_images=4, image_size=32)
    for split in ("train", "val"):
        data = load_split(root, split)
        for caption, image in zip(data.captions, data.text_to_image):
            color, shape = data.labels[image].split()
            assert color in caption.split(), (caption, color)
            assert shape in caption or SHAPES[shape] in caption, (caption, shape)
            assert not any(other in caption.split() for other in COLORS if other != color)


def test_colour_is_in_the_pixels(tmp_path):
    root = write_synthetic_dataset(tmp_path, n_images=8, val_images=1, image_size=48)
    data = load_split(root, "train")
    for path, label in zip(data.images, data.labels):
        pixels = np.asarray(open_image(path), dtype=float).reshape(-1, 3)
        target = np.array(COLORS[label.split()[0]], dtype=float)
        assert (np.abs(pixels - target).max(axis=1) <= 25).sum() >= 20, label  # the shape is there


def test_deterministic_and_idempotent(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n_images=6, image_size=32, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", n_images=6, image_size=32, seed=5)
    assert _files(a) == _files(b)
    c = write_synthetic_dataset(tmp_path / "c", n_images=6, image_size=32, seed=6)
    assert _files(a) != _files(c)

    stamp = os.stat(a / "train.csv").st_mtime_ns
    os.utime(a / "images" / "train_0000.png", ns=(1, 1))  # a rewrite would refresh this
    assert write_synthetic_dataset(a, n_images=6, image_size=32, seed=5) == a
    assert os.stat(a / "train.csv").st_mtime_ns == stamp
    assert os.stat(a / "images" / "train_0000.png").st_mtime_ns == 1

    (a / "images" / "val_0000.png").unlink()  # incomplete: written again, identically
    write_synthetic_dataset(a, n_images=6, image_size=32, seed=5)
    assert _files(a) == _files(b)
    write_synthetic_dataset(a, n_images=8, image_size=32, seed=5)  # new parameters: rewritten
    assert load_split(a, "train").num_images == 8


def test_rejects_empty(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, n_images=0)
