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


def test_model_card_says_how_much_of_the_text_tower_trained():
    from training.export import model_card

    def card(**model):
        meta = {"model": model, "base": {"model_name": "X"}, "method": "full", "trainable_params": 1}
        return model_card("bb", meta, {}, [], "fp16")

    assert "text tower locked: not trained" in card(lock_text=True)
    assert "text tower locked except its last 6 blocks" in card(lock_text=True, lock_text_unlocked_layers=6)
    assert "text tower locked" not in card(lock_text=False)


def test_export_errors(tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_continued_backbone_replaces_its_base_in_place(tmp_path):
    """Stage 2 of a backbone (a `full` run whose base weights are the stage-1 `full` checkpoint)
    exports standalone, so it can overwrite the stage-1 folder and still load."""
    from harma import create_model

    stage1 = tmp_path / "checkpoints" / "backbone"
    torch.manual_seed(0)
    first = create_model(tiny_config("full"))[0]
    perturb_(first, seed=1)
    save_adapters(first, stage1, extra={"run": "stage1-run", "epoch": 3, "val": {"mR": 5.853}})
    second = create_model(_with_base(tiny_config("full"), stage1))[0]
    assert second.base_info["base_weights_sha256"]  # it really started from stage 1
    perturb_(second, seed=2)
    run = tmp_path / "run"
    save_adapters(second, run / "best", extra={"epoch": 1})
    assert main(["--run", str(run), "--out", str(stage1)]) == 0
    meta = json.loads((stage1 / "adapter_config.json").read_text())
    assert meta["model"]["base_weights"] is None and meta["base"].get("base_weights_sha256") is None
    assert "run `stage1-run`, epoch 3, val mR 5.85); this checkpoint stores every tensor" in (stage1 / "MODEL_CARD.md").read_text()
    loaded = load_adapters(stage1)[0]
    params = dict(loaded.named_parameters())
    for name, t in second.trainable_state_dict().items():
        assert torch.equal(params[name], t), name


def test_export_keeps_base_that_adapters_need(tmp_path):
    """HarMA adapters store only their own tensors: their base weights stay named."""
    from harma import create_model

    base = tmp_path / "backbone"
    save_adapters(create_model(tiny_config("full"))[0], base)
    model = create_model(_with_base(tiny_config("harma"), base))[0]
    save_adapters(model, tmp_path / "run" / "best")
    assert main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["model"]["base_weights"] == str(base) and meta["base"]["base_weights_sha256"]


def _with_base(cfg, base):
    cfg.base_weights = str(base)
    return cfg


def test_model_card_says_when_the_weights_are_a_moving_average():
    from training.export import model_card

    meta = {"model": {}, "base": {"model_name": "X"}, "method": "harma", "trainable_params": 1,
            "extra": {"epoch": 3, "ema_decay": 0.995}}
    assert "selected epoch: 3 (validation mR, never test); weights: their moving average (optim.ema_decay=0.995)" \
        in model_card("a", meta, {}, [], "fp16")
    meta["extra"].pop("ema_decay")
    assert "moving average" not in model_card("a", meta, {}, [], "fp16")


def test_model_card_of_a_run_with_no_validation_says_nothing_was_selected():
    """A run trained with data.carve=none (the fixed protocol) has no validation metrics to show: its card
    says the weights are the last epoch's and lists the training loss per epoch instead."""
    from training.export import model_card

    meta = {"model": {}, "base": {"model_name": "X"}, "method": "harma", "trainable_params": 1, "extra": {"epoch": 2}}
    rows = [{"epoch": 1, "train": {"loss": 3.12011}, "samples_per_s": 20.0, "epoch_s": 300.0},
            {"epoch": 2, "train": {"loss": 2.51179}, "samples_per_s": 21.0, "epoch_s": 306.0}]
    config = {"data": {"root": "../shared/datasets/ucm", "train_split": "train", "carve": "none"}}
    card = model_card("a", meta, config, rows, "fp16")
    assert "weights after epoch 2, the last of a fixed schedule: nothing was selected" in card
    assert "split `train`, all of it (data.carve=none" in card
    assert "selected" not in card.replace("nothing was selected", "")
    assert "| 1 | 3.1201 | 20.0 | 5.0 |" in card and "| 2 | 2.5118 | 21.0 | 5.1 |" in card
    assert "Validation metrics" not in card and "nan" not in card
    config["data"]["carve"] = "block"
    assert "selected on a block carve" in model_card("a", meta, config, rows, "fp16")
