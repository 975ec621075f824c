"""Base weights from local files: formats, prefixes, strict mismatch report."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from harma import BaseWeightsError, ModelConfig, build_clip, load_base_weights
from tests.conftest import TINY_NAME


@pytest.fixture
def source():
    torch.manual_seed(7)
    return open_clip.create_model(TINY_NAME)


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "wrapped", "prefixed"])
def test_formats_load_exactly(fmt, source, tmp_path):
    sd = source.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    elif fmt == "prefixed":
        torch.save({f"model.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    torch.manual_seed(99)
    target = open_clip.create_model(TINY_NAME)
    report = load_base_weights(target, path)
    assert report.loaded == len(sd) and len(report.sha256) == 64
    assert all(torch.equal(v, sd[k]) for k, v in target.state_dict().items())


def test_mismatch_is_reported_with_keys(source, tmp_path):
    sd = source.state_dict()
    sd.pop("text_projection")
    sd["visual.extra.weight"] = torch.zeros(1)
    sd["token_embedding.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(BaseWeightsError) as e:
        load_base_weights(open_clip.create_model(TINY_NAME), path)
    msg = str(e.value)
    assert "1 missing: text_projection" in msg
    assert "1 unexpected: visual.extra.weight" in msg
    assert "token_embedding.weight: file (10, 64)" in msg


def test_unsafe_or_missing_files(tmp_path):
    with pytest.raises(BaseWeightsError, match="not found"):
        load_base_weights(open_clip.create_model(TINY_NAME), tmp_path / "nope.pt")
    pickled = tmp_path / "obj.pt"
    torch.save({"fn": print}, pickled)  # arbitrary objects are refused by weights_only=True
    with pytest.raises(BaseWeightsError, match="weights-only"):
        load_base_weights(open_clip.create_model(TINY_NAME), pickled)


def test_build_clip_records_file_hash(source, tmp_path):
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    clip, info = build_clip(ModelConfig(model_name=TINY_NAME, base_weights=str(path)))
    assert info["base_weights_sha256"] == load_base_weights(clip, path).sha256
    assert info["model_cfg"]["embed_dim"] == 32
