"""Hermetic tests of harma.data beyond the readers: splits and the validation carves, caption cleaning,
datasets, transforms and decoding errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from harma.data import (
    CLIP_MEAN,
    CLIP_STD,
    DatasetError,
    ImageDataset,
    PairDataset,
    RetrievalSplit,
    carve,
    carve_block_split,
    carve_split,
    clean_caption,
    eval_transform,
    load_split,
    open_image,
    train_transform,
)
from tests.test_data import _img, _write

# --------------------------------------------------------------------------- RetrievalSplit / carve_split


def _toy_split(n_images: int = 20) -> RetrievalSplit:
    images = [Path(f"/data/{i}.jpg") for i in range(n_images)]
    t2i = [i for i in range(n_images) for _ in range(1 + i % 3)]
    caps = [f"caption {t} of {i}" for t, i in enumerate(t2i)]
    return RetrievalSplit("toy/train", Path("/data"), images, caps, t2i, labels=[f"c{i % 4}" for i in range(n_images)])


def test_carve_split_disjoint_covering_grouped_deterministic() -> None:
    full = _toy_split()
    train, val = carve_split(full, val_fraction=0.25, seed=3)
    assert val.num_images == 5 and train.num_images == 15
    assert set(train.images).isdisjoint(val.images)
    assert set(train.images) | set(val.images) == set(full.images)
    assert sorted(train.captions + val.captions) == sorted(full.captions)
    for part in (train, val):  # every caption still points at its own image
        for caption, i in zip(part.captions, part.text_to_image):
            assert caption.endswith(f" of {part.images[i].stem}")
            assert part.labels[i] == f"c{int(part.images[i].stem) % 4}"
    again = carve_split(full, val_fraction=0.25, seed=3)
    assert again[1].images == val.images and again[0].captions == train.captions
    assert carve_split(full, val_fraction=0.25, seed=4)[1].images != val.images
    assert train.name == "toy/train:train" and val.name == "toy/train:val"


def test_carve_split_bad_args() -> None:
    with pytest.raises(ValueError):
        carve_split(_toy_split(), val_fraction=1.0)
    with pytest.raises(ValueError):
        carve_split(_toy_split(1))


def _tiled_split(classes: int = 3, per_class: int = 30, labels: bool = False, prefix: bool = False) -> RetrievalSplit:
    """UCM's layout: ``per_class`` consecutive numeric ids per class, listed out of order; with
    ``prefix`` the class is also in the name (``c1_105.jpg``), as in RSICD's ``airport_12.jpg``."""
    ids = [c * 100 + j for c in range(classes) for j in range(1, per_class + 1)]
    ids = ids[::-1][::2] + ids[::-1][1::2]  # file order unrelated to id order
    images = [Path(f"/data/c{(i - 1) // 100}_{i}.jpg" if prefix else f"/data/{i}.jpg") for i in ids]
    t2i = [n for n in range(len(ids)) for _ in range(2)]
    caps = [f"caption of {images[n].stem}" for n in t2i]
    lab = [f"class{(i - 1) // 100}" for i in ids] if labels else None
    return RetrievalSplit("tiled/train", Path("/data"), images, caps, t2i, labels=lab)


def _ids_by_class(split: RetrievalSplit) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p in split.images:
        i = int(p.stem.rsplit("_", 1)[-1])
        out.setdefault((i - 1) // 100, []).append(i)
    return {c: sorted(v) for c, v in out.items()}


@pytest.mark.parametrize("kind", ["numeric", "labels", "prefix"])
def test_block_carve_is_a_contiguous_run_of_ids_per_class(kind: str) -> None:
    full = _tiled_split(labels=kind == "labels", prefix=kind == "prefix")
    train, val = carve_block_split(full, val_fraction=0.1)
    # the first 3 ids of every class: a contiguous block, like UCM's test split (which is the last one)
    assert _ids_by_class(val) == {c: [c * 100 + 1, c * 100 + 2, c * 100 + 3] for c in range(3)}
    assert set(train.images).isdisjoint(val.images) and set(train.images) | set(val.images) == set(full.images)
    for part in (train, val):
        for caption, i in zip(part.captions, part.text_to_image):
            assert caption == f"caption of {part.images[i].stem}"
    assert carve(full, "block", 0.1, seed=5)[1].images == val.images  # deterministic
    assert carve(full, "random", 0.1, 0)[1].images == carve_split(full, 0.1, 0)[1].images


def test_block_carve_errors() -> None:
    named = RetrievalSplit("x", Path("/d"), [Path("/d/a.jpg"), Path("/d/b.jpg")], ["a", "b"], [0, 1])
    with pytest.raises(DatasetError, match=r"a\.jpg.*carve_?.*random"):
        carve_block_split(named)
    one = _tiled_split(classes=2, per_class=1)
    with pytest.raises(ValueError, match="class .* has 1 image"):
        carve_block_split(one)
    with pytest.raises(ValueError, match="carve='nope'"):
        carve(_tiled_split(), "nope")


def test_subset_and_validation() -> None:
    split = _toy_split(4)  # captions per image: 1, 2, 3, 1
    sub = split.subset([3, 1])
    assert sub.images == [Path("/data/3.jpg"), Path("/data/1.jpg")]
    assert sub.text_to_image == [1, 1, 0] and sub.captions[0] == "caption 1 of 1"
    with pytest.raises(DatasetError, match="outside"):
        RetrievalSplit("x", Path("/"), [Path("/a.jpg")], ["c"], [1])
    with pytest.raises(DatasetError, match="not unique"):
        RetrievalSplit("x", Path("/"), [Path("/a.jpg"), Path("/a.jpg")], [], [])


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("There is a piece of farmland .", "there is a piece of farmland"),
        ("  Many   planes, (parked) near a 'long' building!?  ", "many planes parked near a long building"),
        ('a "red" roof*#:;~', "a red roof"),
        ("north-east/south-west road", "north east south west road"),
        ("a <person> walks", "a person walks"),
        ("tab\tand\nnewline", "tab and newline"),
        ("...", ""),
    ],
)
def test_clean_caption(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_clean_caption_max_words() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    assert clean_caption(text).split() == [f"w{i}" for i in range(30)]
    assert clean_caption(text, max_words=3) == "w0 w1 w2"
    assert len(clean_caption(text, max_words=None).split()) == 40


# --------------------------------------------------------------------------- datasets / transforms


def test_pair_and_image_datasets_shapes(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", size=(40, 30))
    Image.new("L", (25, 25), 128).save(tmp_path / "b.png")  # grayscale -> converted to RGB
    _write(tmp_path / "train.csv", "image,caption\na.png,First Caption.\nb.png,second\na.png,third\n")
    split = load_split(tmp_path)
    pairs = PairDataset(split, train_transform(32), caption_fn=clean_caption)
    assert len(pairs) == 3
    image, caption, index = pairs[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert (caption, index) == ("second", 1)
    assert pairs[0][1] == "first caption"
    assert PairDataset(split, None)[0][1] == "First Caption."

    images = ImageDataset(split.images, eval_transform(24))
    assert len(images) == 2
    image, index = images[1]
    assert image.shape == (3, 24, 24) and index == 1


def test_transforms_values() -> None:
    img = Image.new("RGB", (50, 70), (255, 0, 128))
    out = eval_transform(16)(img)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    torch.manual_seed(0)
    for kwargs in ({}, {"rotations": True}, {"randaugment": False, "scale": (1.0, 1.0)}):
        assert train_transform(16, **kwargs)(img).shape == (3, 16, 16)
    for _ in range(8):  # rotations happen before the crop, so the output size never swaps
        assert train_transform((16, 20), rotations=True)(img).shape == (3, 16, 20)


def test_corrupt_image_raises_dataset_error_naming_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        ImageDataset([bad], eval_transform(8))[0]
    truncated = tmp_path / "truncated.png"
    _img(tmp_path / "full.png", size=(64, 64))
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(DatasetError, match="truncated.png"):
        open_image(truncated)
    with pytest.raises(DatasetError, match="gone.png"):
        open_image(tmp_path / "gone.png")


@pytest.mark.parametrize("pixels", [300, 100])  # 256 px image: over the limit (warning) / over 2x (error)
def test_decompression_bomb_refused(tmp_path: Path, monkeypatch, pixels: int) -> None:
    path = _img(tmp_path / "bomb.png", size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    if pixels >= 256:
        assert open_image(path).size == (16, 16)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with pytest.raises(DatasetError, match="bomb.png.*decompression bomb"):
        open_image(path)
