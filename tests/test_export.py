"""`python -m training.export`: a run's best/ re-saved (optionally fp16) with a model card."""

from __future__ import annotations

import json
import stat

import open_clip
import torch
from safetensors.torch import load_file

from harma import HarmaModel, load_adapters, save_adapters
from tests.conftest import TINY_NAME, perturb_, tiny_config
from training.export import main


def test_export_run_to_fp16_with_card(tmp_path, tiny_inputs):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("harma"))
    model.base_info["model_cfg"] = open_clip.get_model_config(TINY_NAME)
    perturb_(model)
    save_adapters(model, run / "best", extra={"epoch": 2})
    (run / "config.yaml").write_text("data:\n  root: ../shared/datasets/ucm\n  train_split: train\n  val_split: null\n")
    row = {"epoch": 2, "val": {"mR": 42.5, "i2t_R@1": 10.0}, "val_gap": {"centroid_distance": 0.5}, "samples_per_s": 9.0}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "checkpoints" / "ucm-test"
    assert main(["--run", str(run), "--out", str(out), "--dtype", "fp16"]) == 0
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert set(tensors) == set(model.trainable_state_dict())
    card = (out / "MODEL_CARD.md").read_text()
    assert "not CLIP-pretrained" in card and "UC Merced" in card and "| 2 | 10.00 |" in card and "42.50" in card
    assert stat.S_IMODE((out / "adapter_config.json").stat().st_mode) == 0o644
    loaded = load_adapters(out)[0]
    params = dict(loaded.named_parameters())
    for name, t in model.trainable_state_dict().items():  # fp16 rounding only
        assert torch.allclose(params[name], t, atol=1e-3, rtol=1e-3)


def test_export_errors(tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
