"""harma.sources: model choices say why they cannot be loaded, without loading anything."""

from __future__ import annotations

import json

from harma import create_model, save_adapters
from harma.presets import PRESETS
from harma.sources import checkpoint_source, discover_sources, preset_source
from tests.conftest import tiny_config


def test_checkpoint_problems_are_named(tmp_path):
    model = create_model(tiny_config())[0]
    good = save_adapters(model, tmp_path / "checkpoints" / "good")
    assert checkpoint_source(good, False).problem is None
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["model"]["base_weights"] = "nowhere/base.safetensors"
    moved = tmp_path / "checkpoints" / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert "base weights `nowhere/base.safetensors` not found" in checkpoint_source(moved, False).problem
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["model"]["model_name"] = cfg["base"]["model_name"] = "No-Such-Model"
    cfg["base"]["model_cfg"] = None
    odd = tmp_path / "checkpoints" / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    assert "unknown open_clip model 'No-Such-Model'" in checkpoint_source(odd, False).problem
    broken = tmp_path / "checkpoints" / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    assert checkpoint_source(broken, False).problem


def test_discovery_lists_presets_and_checkpoint_folders(tmp_path):
    model = create_model(tiny_config())[0]
    save_adapters(model, tmp_path / "checkpoints" / "mine")
    full = create_model(tiny_config(method="full"))[0]
    save_adapters(full, tmp_path / "checkpoints" / "backbone")
    sources = discover_sources(tmp_path, missing=lambda preset, names: f"MISSING {names}")
    keys = list(sources)
    assert keys[: len(PRESETS)] == [f"preset:{n}" for n in PRESETS]
    assert "checkpoint:mine" in keys
    assert not any("backbone" in k for k in keys)  # `full` checkpoints are backbones, not choices
    default = sources["preset:rs-minilm-harma"]
    assert default.problem.startswith("MISSING `checkpoints/")
    assert "train some" in preset_source(PRESETS["clip-vit-b-32-laion"], False, tmp_path).problem
