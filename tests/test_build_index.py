"""``python -m training.build_index`` and the resumable library builder behind it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from harma.encode import encode_images
from harma.retrieval import EmbeddingIndex, build_image_index, effective_shard_size, list_images, model_identity
from tests.test_evaluate_cli import setup  # noqa: F401  (module fixture: tiny checkpoint + base weights)
from training.build_index import main


def write_folder(root, n=7, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_indexes_a_nested_folder_and_skips_unreadable_files(setup, tmp_path, capsys):  # noqa: F811
    images = write_folder(tmp_path / "archive")
    out = tmp_path / "index"
    args = ["--checkpoint", str(setup["adapters"]), "--images", str(images), "--out", str(out),
            "--batch-size", "2", "--shard-size", "3", "--num-workers", "0"]
    assert main(args) == 0
    assert "1 unreadable skipped" in capsys.readouterr().out
    index = EmbeddingIndex.load(out)
    files = [p for p in list_images(images) if p.name != "broken.jpg"]
    assert index.ids == [p.relative_to(images).as_posix() for p in files]
    assert len(index) == 7 and not (out / ".shards").exists()
    ref = encode_images(setup["model"], files, setup["transform"], batch_size=4)
    assert torch.allclose(index.embeddings, ref, atol=1e-5)
    extra = json.loads((out / "index.json").read_text())["extra"]
    assert extra["model"] == json.loads(json.dumps(model_identity(setup["model"], setup["adapters"])))
    assert [s["id"] for s in extra["skipped"]] == ["a/broken.jpg"] and "cannot read image" in extra["skipped"][0]["reason"]
    # an existing index is not overwritten silently
    assert main(args) == 2
    assert "already holds an index" in capsys.readouterr().err
    # the zero-shot backbone gives a different index, with --overwrite
    assert main(args + ["--baseline", "--overwrite"]) == 0
    base = EmbeddingIndex.load(out)
    assert base.ids == index.ids and not torch.allclose(base.embeddings, index.embeddings, atol=1e-3)


def test_interrupted_build_resumes_from_finished_shards(setup, tmp_path):  # noqa: F811
    images = write_folder(tmp_path / "archive")
    files = list_images(images)
    model, transform = setup["model"], setup["transform"]
    ident = model_identity(model, setup["adapters"])
    full = build_image_index(model, transform, files, tmp_path / "full", root=images, identity=ident, shard_size=3)

    class Stop(Exception):
        pass

    def stop_after_first_shard(done, total):
        if done > 3:
            raise Stop

    with pytest.raises(Stop):
        build_image_index(model, transform, files, tmp_path / "part", root=images, identity=ident,
                          shard_size=3, progress=stop_after_first_shard)
    assert sorted(p.name for p in (tmp_path / "part" / ".shards").iterdir()) == ["manifest.json", "shard-000000.safetensors"]
    with pytest.raises(FileExistsError, match="different model"):
        build_image_index(model, transform, files, tmp_path / "part", root=images, identity={"other": 1}, shard_size=3)
    seen, messages = [], []
    resumed = build_image_index(model, transform, files, tmp_path / "part", root=images, identity=ident,
                                shard_size=3, progress=lambda d, t: seen.append(d), log=messages.append)
    assert seen[0] == 3 and "resuming: 1 of 3 shards" in messages[0]
    assert resumed.ids == full.ids and torch.equal(resumed.embeddings, full.embeddings)


def test_missing_or_empty_image_folder_is_a_clear_error(setup, tmp_path, capsys):  # noqa: F811
    base = ["--checkpoint", str(setup["adapters"]), "--out", str(tmp_path / "o")]
    assert main(base + ["--images", str(tmp_path / "nowhere")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--images", str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_default_shard_size_still_resumes_a_small_folder(setup, tmp_path):  # noqa: F811
    """A 300-image folder under the default 4096-image shard size is written in pieces, so an
    interruption keeps what was encoded (it used to keep only the manifest)."""

    assert effective_shard_size(1890, 4096) == 119 and effective_shard_size(10**6, 4096) == 4096
    assert effective_shard_size(8, 3) == 3 and effective_shard_size(300, 4096) == 64
    rng = np.random.default_rng(0)
    (tmp_path / "many").mkdir()
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "many" / f"{i:03d}.png")
    files = list_images(tmp_path / "many")
    model, transform = setup["model"], setup["transform"]

    class Stop(Exception):
        pass

    def stop_late(done, total):
        if done > 200:
            raise Stop

    with pytest.raises(Stop):
        build_image_index(model, transform, files, tmp_path / "idx", root=tmp_path / "many", batch_size=32,
                          progress=stop_late)
    assert len(list((tmp_path / "idx" / ".shards").glob("shard-*"))) == 3
    seen = []
    index = build_image_index(model, transform, files, tmp_path / "idx", root=tmp_path / "many", batch_size=32,
                              progress=lambda d, t: seen.append(d))
    assert seen[0] == 192 and len(index) == 300
