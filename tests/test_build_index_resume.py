"""A resumed ``build_image_index`` is keyed by content: an image changed, added or removed since the
interruption is encoded again (or dropped), the others are reused, never encoded twice; the result
equals a fresh build's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from harma import create_model
from harma.retrieval import build_image_index, list_images
from tests.conftest import tiny_config


class Stop(Exception):
    pass


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread: the tiny model on a busy 2-core box is many times slower with more."""


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, transform, _ = create_model(tiny_config())
    return model, transform


def _save(path, seed):
    """A 16x16 BMP: any pixels give the same file size, so only the modification time tells a change."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _folder(root, n=8):
    root.mkdir()
    for i in range(n):
        _save(root / f"img{i}.bmp", i)
    return root


def _counting(model, monkeypatch):
    encoded = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x, **kw: (encoded.append(len(x)), original(x, **kw))[1])
    return encoded


def _build(tiny, images, out, **kw):
    model, transform = tiny
    return build_image_index(model, transform, list_images(images), out, root=images, identity={"m": 1},
                             batch_size=2, shard_size=2, **kw)


def _interrupt_after_two_shards(tiny, images, out):
    def stop(done, total):
        if done > 4:
            raise Stop

    with pytest.raises(Stop):
        _build(tiny, images, out, progress=stop)
    assert len(list((out / ".shards").glob("shard-*"))) == 2


def test_an_image_changed_since_the_interruption_is_encoded_again(tiny, tmp_path, monkeypatch):
    images = _folder(tmp_path / "imgs")
    before = _build(tiny, images, tmp_path / "before")
    _interrupt_after_two_shards(tiny, images, tmp_path / "part")
    changed = images / "img1.bmp"  # in the first, finished shard
    old = changed.stat()
    _save(changed, 99)
    os.utime(changed, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))  # rewritten a second later
    assert changed.stat().st_size == old.st_size
    encoded, messages = _counting(tiny[0], monkeypatch), []
    resumed = _build(tiny, images, tmp_path / "part", log=messages.append)
    n_encoded = sum(encoded)
    fresh = _build(tiny, images, tmp_path / "fresh")
    assert resumed.ids == fresh.ids == before.ids
    assert not torch.allclose(resumed.embeddings[1], before.embeddings[1], atol=1e-3)  # the stale one is gone
    assert torch.allclose(resumed.embeddings, fresh.embeddings, atol=1e-5)
    assert n_encoded == 1 + 4  # the changed image and the two shards never written; nothing else
    assert any("1 images changed" in m for m in messages), messages


def test_images_added_and_removed_since_the_interruption(tiny, tmp_path, monkeypatch):
    """Removing img2 and adding img0_5 shifts every shard; what was encoded is reused by content."""
    images = _folder(tmp_path / "imgs")
    _interrupt_after_two_shards(tiny, images, tmp_path / "part")  # img0..img3 encoded
    (images / "img2.bmp").unlink()
    _save(images / "img0_5.bmp", 50)
    encoded, messages = _counting(tiny[0], monkeypatch), []
    resumed = _build(tiny, images, tmp_path / "part", log=messages.append)
    assert sum(encoded) == 1 + 4  # img0_5 and img4..img7; img0, img1, img3 reused
    assert any("1 removed" in m and "3 encoded before are reused" in m for m in messages), messages
    fresh = _build(tiny, images, tmp_path / "fresh")
    assert resumed.ids == fresh.ids and "img2.bmp" not in resumed.ids and "img0_5.bmp" in resumed.ids
    assert torch.allclose(resumed.embeddings, fresh.embeddings, atol=1e-5)


def test_an_unreadable_manifest_is_a_clear_refusal(tiny, tmp_path):
    images = _folder(tmp_path / "imgs", n=2)
    (tmp_path / "out" / ".shards").mkdir(parents=True)
    (tmp_path / "out" / ".shards" / "manifest.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="unreadable .*overwrite"):
        _build(tiny, images, tmp_path / "out")
    assert len(_build(tiny, images, tmp_path / "out", overwrite=True)) == 2
