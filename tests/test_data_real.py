"""Load the real shared datasets (UCM PE-RSITR txt, RSICD HarMA JSON); skipped when absent.

The folder is ``<repo>/../shared/datasets`` or ``$HARMA_SHARED_DATASETS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harma.data import (
    PairDataset,
    carve_block_split,
    carve_split,
    clean_caption,
    detect_format,
    eval_transform,
    load_split,
)

DATASETS = Path(
    os.environ.get("HARMA_SHARED_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets")
)


def _root(name: str) -> Path:
    root = DATASETS / name
    if not root.is_dir():
        pytest.skip(f"real dataset folder {root} not present")
    return root


@pytest.mark.parametrize(
    ("name", "split", "fmt", "n_images"),
    [("ucm", "train", "pe_rsitr_txt", 1890), ("rsicd", "train", "harma_json", 7173), ("rsicd", "val", "harma_json", 1800)],
)
def test_real_split_counts(name: str, split: str, fmt: str, n_images: int) -> None:
    root = _root(name)
    assert detect_format(root) == fmt
    data = load_split(root, split, expected_captions_per_image=5)  # checks every image exists
    assert (data.num_images, data.num_captions) == (n_images, 5 * n_images)
    assert all(p.is_file() for p in data.images)
    # load_split returns resolved paths; ../shared may be a symlink (it is in some CI layouts)
    assert all(p.is_relative_to((root / "images").resolve()) for p in data.images)
    if (name, split) == ("rsicd", "train"):
        assert data.labels is not None and len(set(data.labels)) > 10


def test_real_ucm_carve_and_read_one_pair() -> None:
    train, val = carve_split(load_split(_root("ucm"), "train"), val_fraction=0.1, seed=0)
    assert (train.num_images, val.num_images) == (1701, 189)
    assert (train.num_captions, val.num_captions) == (1701 * 5, 189 * 5)
    image, caption, index = PairDataset(val, eval_transform(224), caption_fn=clean_caption)[0]
    assert image.shape == (3, 224, 224) and caption == caption.lower() and index == 0


def test_real_ucm_block_carve_is_contiguous_and_leaks_less() -> None:
    """The default carve takes the first 9 ids of every class; it shares fewer verbatim captions with
    train than a random carve does (the leak), and keeps the test block's neighbours in train."""
    root = _root("ucm")
    full = load_split(root, "train")
    train, val = carve_block_split(full, val_fraction=0.1)
    assert (train.num_images, val.num_images) == (1701, 189)
    ids: dict[int, list[int]] = {}
    for p in val.images:
        ids.setdefault((int(p.stem) - 1) // 100, []).append(int(p.stem))
    assert len(ids) == 21 and all(len(v) == 9 for v in ids.values())
    for c, v in ids.items():  # the class's 9 lowest ids
        assert sorted(v) == list(range(100 * c + 1, 100 * c + 10))
    test_blocks: dict[int, list[int]] = {}
    for p in load_split(root, "test").images:
        test_blocks.setdefault((int(p.stem) - 1) // 100, []).append(int(p.stem))
    train_ids = {int(p.stem) for p in train.images}
    assert all(min(b) - 1 in train_ids for b in test_blocks.values())  # the test block's neighbour trains

    def overlap(part, rest) -> float:
        seen = {clean_caption(c) for c in rest.captions}
        return sum(clean_caption(c) in seen for c in part.captions) / part.num_captions

    rand_train, rand_val = carve_split(full, val_fraction=0.1, seed=0)
    block, leaky = overlap(val, train), overlap(rand_val, rand_train)
    assert leaky > 0.9 and block < leaky - 0.08, (block, leaky)


def test_real_missing_split_message() -> None:
    root = _root("rsicd")
    with pytest.raises(ValueError, match="no 'test' split .*found: train, val"):
        load_split(root, "test")
