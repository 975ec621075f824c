"""The weight average (training/ema.py, ``optim.ema_decay``): the recurrence, the swap, resume, the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harma import CheckpointError, create_model
from tests.conftest import perturb_, tiny_config
from tests.test_train_cli import one_epoch_run
from training.config import OptimConfig
from training.ema import WeightEMA
from training.state import read_state


def _model(method: str = "harma"):
    torch.manual_seed(0)
    return create_model(tiny_config(method))[0]


def test_average_follows_the_recurrence_with_warmup_and_touches_only_trained_tensors():
    model = _model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ema = WeightEMA(model, decay=0.9)
    live = model.trainable_state_dict()
    expected = {n: t.clone().double() for n, t in live.items()}
    for step in range(30):
        perturb_(model, seed=step, scale=0.1)  # stands in for an optimiser step
        d = min(0.9, (1 + step) / (10 + step))  # warm-up: 0.1, 0.18, ... until it reaches 0.9
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for n, t in live.items():
            expected[n] = d * expected[n] + (1 - d) * t.double()
    assert ema.updates == 30
    for n in live:
        torch.testing.assert_close(ema.shadow[n].double(), expected[n], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ema.shadow[n], live[n])  # the average lags the live weights
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_applied_swaps_the_average_in_and_the_live_weights_back(tiny_inputs):
    model = _model().eval()
    images, tokens = tiny_inputs
    ema = WeightEMA(model, decay=0.5)
    perturb_(model, seed=1)
    ema.update()
    perturb_(model, seed=2)
    before = {n: t.clone() for n, t in model.trainable_state_dict().items()}
    with torch.no_grad():
        live_out = model.encode_image(images)
        with ema.applied():
            assert all(torch.equal(t, ema.shadow[n]) for n, t in model.trainable_state_dict().items())
            averaged_out = model.encode_image(images)
        after_out = model.encode_image(images)
    assert not torch.allclose(live_out, averaged_out)
    assert torch.equal(live_out, after_out)
    assert all(torch.equal(t, before[n]) for n, t in model.trainable_state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), ema.applied():  # restored on an exception too
        raise RuntimeError("inside")
    assert all(torch.equal(t, before[n]) for n, t in model.trainable_state_dict().items())


def test_state_round_trip_and_mismatch():
    model = _model()
    ema = WeightEMA(model, decay=0.99)
    perturb_(model)
    ema.update()
    other = WeightEMA(_model(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(other.shadow[n], t) for n, t in ema.shadow.items())
    with pytest.raises(CheckpointError, match="weight average"):
        WeightEMA(_model("mrs"), decay=0.99).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_config_rejects_a_decay_outside_0_1(bad):
    with pytest.raises(ValueError, match="optim.ema_decay"):
        OptimConfig(ema_decay=bad)


def test_training_selects_and_saves_the_average(tmp_path, one_thread):
    run = one_epoch_run(tmp_path, "optim.ema_decay=0.8")
    state = read_state(run / "last")
    shadow = state["ema"]["shadow"]
    assert state["ema"]["updates"] == state["global_step"] == 5
    best, live = load_file(str(run / "best" / "adapter_model.safetensors")), \
        load_file(str(run / "last" / "adapters" / "adapter_model.safetensors"))
    # one epoch: best/ holds the average at its end, last/ the live weights to resume from
    assert set(best) == set(shadow) == set(live)
    assert all(torch.equal(best[k], shadow[k]) for k in best)
    assert any(not torch.equal(best[k], live[k]) for k in best)
    meta = json.loads((run / "best" / "adapter_config.json").read_text())
    assert meta["extra"]["ema_decay"] == 0.8
