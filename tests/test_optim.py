"""Optimiser groups and the lr schedule (training/optim.py), against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.config import OptimConfig
from training.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # total 10, warm-up 2: steps 0, 1 warm up; decay over the 8 steps 2..9; 0 at 10 and after
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 9: 0.125, 10: 0.0, 12: 0.0}),
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0, 12: 0.0}),
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0}),
    ],
)
def test_lr_factor_key_steps(schedule, expected):
    for step, value in expected.items():
        assert lr_factor(step, 10, 2, schedule) == pytest.approx(value, abs=1e-12), (schedule, step)


def test_lr_factor_without_warmup_and_released_example():
    assert lr_factor(0, 4, 0, "linear") == 1.0
    assert lr_factor(3, 4, 0, "linear") == 0.25
    # RSITMD-vit released run: 40 real steps/epoch x 50 epochs, warm-up int(0.1 * 2000)
    assert lr_factor(200, 2000, 200, "linear") == 1.0
    assert lr_factor(1999, 2000, 200, "linear") == pytest.approx(1 / 1800)


@pytest.mark.parametrize("bad", [dict(schedule="step"), dict(total=0), dict(warmup=11), dict(warmup=-1)])
def test_lr_factor_rejects_bad_arguments(bad):
    args = dict(step=0, total=10, warmup=2, schedule="linear") | bad
    with pytest.raises(ValueError):
        lr_factor(**args)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)  # weight: decay, bias: no_decay
        self.norm = nn.LayerNorm(3)  # weight and bias: no_decay
        self.gate = nn.Parameter(torch.tensor(0.6))  # 0-d: scalars
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("decay_scalars", [True, False])
def test_param_groups(decay_scalars):
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.04, decay_scalars=decay_scalars))}
    assert set(groups) == {"decay", "no_decay", "scalars"}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert ids["decay"] == {id(model.linear.weight)}
    assert ids["no_decay"] == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    assert ids["scalars"] == {id(model.gate)}
    assert groups["decay"]["weight_decay"] == 0.04 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["scalars"]["weight_decay"] == (0.04 if decay_scalars else 0.0)


def test_param_groups_skip_empty_and_frozen():
    model = nn.Linear(3, 3, bias=False)
    assert [g["name"] for g in param_groups(model, OptimConfig())] == ["decay"]
    model.requires_grad_(False)
    assert param_groups(model, OptimConfig()) == []
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, OptimConfig())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_scheduler_drives_adamw_lr(schedule):
    cfg = OptimConfig(lr=1e-3, warmup_fraction=0.25, schedule=schedule)
    model = Toy()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    total = 8  # warm-up int(0.25 * 8) = 2
    sched = build_scheduler(opt, cfg, total)
    for step in range(total + 2):
        want = 1e-3 * lr_factor(step, total, 2, schedule)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(want, abs=1e-15), (step, group["name"])
        opt.step()
        sched.step()


@pytest.mark.parametrize("share_mode", ["text_only", "shared"])
def test_text_lr_scale_groups_the_text_side(share_mode):
    """optim.text_lr_scale: the text tower's adapters (and the MMS adapters when only the text tower
    calls them) get lr x scale, through the schedule; image adapters and the temperature keep lr."""
    import open_clip

    from harma import HarmaModel
    from tests.conftest import TINY_NAME, tiny_config

    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("harma", share_mode=share_mode))
    cfg = OptimConfig(lr=1e-3, text_lr_scale=3.0, warmup_fraction=0.0)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    text = set().union(*(v for k, v in by_group.items() if k.startswith("text_")))
    rest = set().union(*(v for k, v in by_group.items() if not k.startswith("text_")))
    assert text and all(n.startswith("clip.transformer.") or (share_mode == "text_only" and n.startswith("mms."))
                        for n in text)
    assert any(n.startswith("mms.") for n in text) == (share_mode == "text_only")
    assert "temperature" in rest and any(n.startswith("clip.visual.") for n in rest)
    assert not any(n.startswith("clip.transformer.") for n in rest)
    assert any(n.endswith(".gate") for n in by_group["text_scalars"])
    sched = build_scheduler(opt, cfg, total_steps=4)
    opt.step()
    sched.step()  # linear decay: factor 0.75 at step 1
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decay"] == pytest.approx(0.75e-3) and lrs["text_decay"] == pytest.approx(2.25e-3)
    assert [g["name"] for g in param_groups(model, OptimConfig())] == ["decay", "no_decay", "scalars"]


def test_temperature_lr_gives_the_temperature_its_own_rate():
    """optim.temperature_lr: the learned temperature alone gets that peak rate, through the same
    schedule and with the scalars' weight decay; everything else keeps optim.lr."""
    import open_clip

    from harma import ConfigError, HarmaModel
    from tests.conftest import TINY_NAME, tiny_config

    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("harma"))
    cfg = OptimConfig(lr=1e-3, temperature_lr=5e-5, warmup_fraction=0.0, weight_decay=0.04)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p for p in groups["temperature"]["params"]] == [model.temperature]
    assert model.temperature not in groups["scalars"]["params"] and groups["scalars"]["params"]  # the gates
    assert groups["temperature"]["weight_decay"] == 0.04
    sched = build_scheduler(opt, cfg, total_steps=4)
    opt.step()
    sched.step()  # linear decay: factor 0.75 at step 1
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["temperature"] == pytest.approx(0.75 * 5e-5) and lrs["scalars"] == pytest.approx(0.75e-3)
    assert "temperature" not in [g["name"] for g in param_groups(model, OptimConfig())]
    with pytest.raises(ConfigError, match="temperature_lr"):
        OptimConfig(temperature_lr=-1e-4)


@pytest.mark.parametrize("method", ["harma", "mrs"])
def test_up_lr_scale_gives_the_zero_initialised_projections_their_own_rate(method):
    """optim.up_lr_scale (LoRA+): exactly the adapters' zero-initialised output projections get lr x
    scale; with text_lr_scale too, the text tower's get both factors."""
    import open_clip

    from harma import HarmaModel
    from tests.conftest import TINY_NAME, tiny_config

    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config(method))
    zero = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and not p.any()}
    assert zero  # the adapters start as the identity through these
    cfg = OptimConfig(lr=1e-3, up_lr_scale=4.0, text_lr_scale=2.0, warmup_fraction=0.0, weight_decay=0.04)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    up = {names[id(p)] for k, g in groups.items() if "up_" in k for p in g["params"]}
    assert {n for n in up if n.endswith("weight")} == zero
    assert all(n.rsplit(".", 1)[0] + ".weight" in zero for n in up)  # and their biases, nothing else
    expected = {"decay": 1e-3, "up_decay": 4e-3, "text_decay": 2e-3, "text_up_decay": 8e-3, "up_no_decay": 4e-3}
    if method == "mrs":  # one adapter serves both towers; it is not inside the text tower
        expected = {k: v for k, v in expected.items() if not k.startswith("text_")}
        assert not any(k.startswith("text_") for k in groups)  # so text_lr_scale leaves it alone
    for name, lr in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr), name
    assert groups["up_decay"]["weight_decay"] == 0.04 and groups["up_no_decay"]["weight_decay"] == 0.0
    assert [g["name"] for g in param_groups(model, OptimConfig())] == ["decay", "no_decay", "scalars"]


def test_lr_scales_must_be_positive():
    from harma import ConfigError

    for key in ("text_lr_scale", "up_lr_scale"):
        with pytest.raises(ConfigError, match=key):
            OptimConfig(**{key: 0})


def test_also_train_lr_gives_the_backbone_parameters_their_own_rate():
    """optim.also_train_lr: exactly the backbone parameters model.also_train chose get that rate (and
    no text scale); adapters, gates and the temperature keep theirs."""
    import dataclasses

    import open_clip

    from harma import ConfigError, HarmaModel
    from tests.conftest import TINY_NAME, tiny_config

    model = HarmaModel(open_clip.create_model(TINY_NAME),
                       dataclasses.replace(tiny_config("harma"), also_train=("norms", "convs")))
    cfg = OptimConfig(lr=1e-3, also_train_lr=2e-5, text_lr_scale=3.0, warmup_fraction=0.0, weight_decay=0.04)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    also = {id(p) for k in ("also_decay", "also_no_decay") for p in groups[k]["params"]}
    assert also == {id(p) for p in model.also_trained_parameters} and also
    assert groups["also_decay"]["lr"] == groups["also_no_decay"]["lr"] == pytest.approx(2e-5)
    assert groups["also_decay"]["weight_decay"] == 0.04 and groups["also_no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == pytest.approx(1e-3) and groups["text_decay"]["lr"] == pytest.approx(3e-3)
    assert not also & {id(p) for k, g in groups.items() if not k.startswith("also_") for p in g["params"]}
    without = {g["name"] for g in param_groups(model, OptimConfig())}
    assert without == {"decay", "no_decay", "scalars"}  # None: they train at optim.lr, as before
    with pytest.raises(ConfigError, match="also_train_lr"):
        OptimConfig(also_train_lr=-1.0)
