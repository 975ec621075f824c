"""Adapter-only checkpoints: exact round trip, shared modules once, refusal on another base."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from harma import CheckpointError, HarmaModel, load_adapter_weights, load_adapters, save_adapters
from harma.io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import TINY_NAME, perturb_, tiny_config


def _model(method="harma", seed=0, **harma):
    torch.manual_seed(seed)
    return HarmaModel(open_clip.create_model(TINY_NAME), tiny_config(method, **harma)).eval()


@pytest.mark.parametrize("method,kw", [("harma", {"share_mode": "text_only"}), ("harma", {"share_mode": "shared"}),
                                       ("harma", {"attn_seam": ["image", "text"]}), ("mrs", {}), ("full", {})])
def test_save_load_reproduces_embeddings_exactly(method, kw, tmp_path, tiny_inputs):
    model = _model(method, **kw)
    perturb_(model)
    images, tokens = tiny_inputs
    with torch.no_grad():
        before_i, before_t = model.encode_image(images), model.encode_text(tokens)
    save_adapters(model, tmp_path / "ad")
    # Same base weights (seed 0), adapters freshly initialised from another seed, then loaded.
    other = _model(method, seed=0, **kw)
    perturb_(other, seed=123)
    with torch.no_grad():
        assert not torch.equal(other.encode_text(tokens), before_t)
    load_adapter_weights(other, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(other.encode_image(images), before_i)
        assert torch.equal(other.encode_text(tokens), before_t)


def test_only_trainable_tensors_saved_and_shared_once(tmp_path):
    model = _model("harma", share_mode="shared")
    save_adapters(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == set(model.trainable_state_dict())
    assert sum(t.numel() for t in tensors.values()) == model.num_parameters(trainable_only=True)
    mms_keys = [k for k in tensors if ".mms." in k or k.startswith("mms.")]
    assert mms_keys and all(k.startswith("mms.") for k in mms_keys)  # canonical name, stored once
    assert not any(k.endswith(("c_fc.weight", "c_proj.weight")) for k in tensors)  # no frozen backbone


def test_config_json_describes_model(tmp_path):
    model = _model("harma")
    save_adapters(model, tmp_path, extra={"val_mR": 12.5})
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["method"] == "harma"
    assert meta["base"]["model_name"] == TINY_NAME
    assert meta["model"]["harma"]["share_mode"] == "text_only"
    assert meta["trainable_params"] == model.num_parameters(trainable_only=True)
    assert {"harma", "open_clip", "torch"} <= set(meta["versions"])
    assert meta["extra"] == {"val_mR": 12.5}


def test_load_adapters_rebuilds_from_directory(tmp_path, tiny_inputs):
    model = _model("harma")
    model.base_info["model_cfg"] = open_clip.get_model_config(TINY_NAME)
    perturb_(model)
    save_adapters(model, tmp_path)
    images, _ = tiny_inputs
    loaded, _, preprocess_val, tokenizer = load_adapters(tmp_path)
    loaded.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=True)  # same base weights
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(images), model.encode_image(images))
    assert callable(preprocess_val) and tokenizer(["x"]).shape == (1, 77)


def test_refuses_other_base_model(tmp_path):
    model = _model("harma")
    save_adapters(model, tmp_path)
    other = _model("harma")
    other.base_info = {"model_name": "ViT-B-32", "pretrained": "openai"}
    with pytest.raises(CheckpointError, match=f"need base model {TINY_NAME}"):
        load_adapter_weights(other, tmp_path)
    with pytest.raises(CheckpointError, match="method 'harma'"):
        load_adapter_weights(_model("mrs"), tmp_path)


def test_refuses_different_adapter_shapes(tmp_path):
    save_adapters(_model("harma"), tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        load_adapter_weights(_model("harma", bottleneck=8), tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapters(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"method": "harma",\n oops}')
    with pytest.raises(CheckpointError, match="line 2"):
        load_adapters(tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = _model("harma")
    save_adapters(model, tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    import harma.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fsync", boom)
    perturb_(model)
    with pytest.raises(OSError):
        save_adapters(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_random_backbone_checkpoint_rebuilds_exactly(tmp_path, tiny_inputs):
    """create_model is seeded by init_seed, so a run on a random backbone evaluates identically later."""
    from harma import ModelConfig, create_model

    cfg = ModelConfig(model_name=TINY_NAME, method="harma", init_seed=5,
                      harma={"bottleneck": 16, "attn_heads": 4, "mms_dim": 8, "mms_heads": 2})
    torch.manual_seed(123)
    model = create_model(cfg)[0].eval()
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # building drew nothing from the caller's RNG
    perturb_(model)
    save_adapters(model, tmp_path)
    images, tokens = tiny_inputs
    loaded = load_adapters(tmp_path)[0].eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    other = create_model(ModelConfig(model_name=TINY_NAME, method="zeroshot", init_seed=6))[0]
    assert not torch.equal(other.clip.visual.conv1.weight, model.clip.visual.conv1.weight)


def test_checkpoint_finds_its_base_weights_from_any_working_directory(tmp_path, monkeypatch, tiny_inputs):
    """Base weights recorded by a relative path are found relative to the checkpoint folder, or as
    a sibling with the recorded sha256, so a checkpoint loads outside the repository root."""
    from safetensors.torch import save_file

    from tests.conftest import tiny_config

    repo = tmp_path / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    save_file(open_clip.create_model(TINY_NAME).state_dict(), str(repo / "checkpoints" / "base.safetensors"))
    monkeypatch.chdir(repo)
    cfg = tiny_config()
    cfg.base_weights = "checkpoints/base.safetensors"  # relative to the repository root, as shipped
    from harma import create_model

    model = create_model(cfg)[0]
    perturb_(model)
    save_adapters(model, "checkpoints/adapters")
    meta = json.loads((repo / "checkpoints" / "adapters" / CONFIG_NAME).read_text())
    assert meta["base"]["base_weights_relative"] == "../base.safetensors"
    ref = model.encode_image(tiny_inputs[0], normalize=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_adapters(repo / "checkpoints" / "adapters")[0]
    assert torch.allclose(loaded.encode_image(tiny_inputs[0], normalize=True), ref, atol=1e-6)

    del meta["base"]["base_weights_relative"]  # a checkpoint from before: found by its sha256 beside it
    (repo / "checkpoints" / "adapters" / CONFIG_NAME).write_text(json.dumps(meta))
    (repo / "checkpoints" / "other.safetensors").write_bytes(b"not these")
    loaded = load_adapters(repo / "checkpoints" / "adapters")[0]
    assert torch.allclose(loaded.encode_image(tiny_inputs[0], normalize=True), ref, atol=1e-6)

    (repo / "checkpoints" / "base.safetensors").rename(repo / "moved.safetensors")
    with pytest.raises(CheckpointError, match="not found on this machine"):
        load_adapters(repo / "checkpoints" / "adapters")
