"""model.also_train: backbone LayerNorms and/or biases trained beside the adapters (PEFT modules_to_save, BitFit)."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

from harma import ConfigError, HarmaModel
from harma.checkpoint import load_adapter_weights, save_adapters
from harma.inject import adapter_wrappers
from tests.conftest import TINY_NAME, perturb_, tiny_config

# The tiny open_clip CLIP's LayerNorms and biased layers, by parameter-name suffix (an oracle
# independent of the module-type rule the library uses).
NORM_SUFFIXES = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "ln_pre.weight", "ln_pre.bias",
                 "ln_post.weight", "ln_post.bias", "ln_final.weight", "ln_final.bias")
BIAS_SUFFIXES = ("attn.in_proj_bias", "attn.out_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias",
                 "mlp.base_layer.c_fc.bias", "mlp.base_layer.c_proj.bias")
CONV_NAMES = ("visual.conv1.weight",)
PROJ_NAMES = ("visual.proj", "clip.text_projection")
ADAPTER_NAMES = ("adapter", "mms", "mrs", "gate", "temperature")


def _pair(method="harma", also_train=("norms", "biases"), device="cpu"):
    torch.manual_seed(0)
    base = open_clip.create_model(TINY_NAME).to(device).eval()
    ref = open_clip.create_model(TINY_NAME).to(device).eval()
    ref.load_state_dict(base.state_dict())
    cfg = dataclasses.replace(tiny_config(method), also_train=also_train)
    return ref, HarmaModel(base, cfg).eval()


def _backbone_trainable(model):
    return {n for n in model.trainable_state_dict() if not any(k in n for k in ADAPTER_NAMES)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["harma", "mrs"])
@pytest.mark.parametrize("also_train", [(), ("norms",), ("biases",), ("norms", "biases"), ("convs",), ("proj",),
                                        ("norms", "biases", "convs", "proj")])
def test_selects_backbone_parameters_by_module_type(method, also_train):
    _, model = _pair(method, also_train)
    _, plain = _pair(method, ())
    backbone = {n for n, _ in model.named_parameters() if not any(k in n for k in ADAPTER_NAMES)}
    expected = {n for n in backbone if ("norms" in also_train and n.endswith(NORM_SUFFIXES))
                or ("biases" in also_train and n.endswith(BIAS_SUFFIXES))
                or ("convs" in also_train and n.endswith(CONV_NAMES)) or ("proj" in also_train and n.endswith(PROJ_NAMES))}
    assert _backbone_trainable(model) == expected
    assert bool(expected) == bool(also_train)
    extra = sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert model.num_parameters(True) == plain.num_parameters(True) + extra
    # every other backbone weight stays frozen, and gradients reach the chosen ones
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in backbone - expected)
    if also_train:
        images = torch.randn(2, 3, 32, 32)
        tokens = open_clip.get_tokenizer(TINY_NAME)(["a river", "planes parked at an airport"])
        out = model.train()(images, tokens)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        params = dict(model.named_parameters())
        assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in expected)


def test_checkpoint_round_trip_restores_trained_backbone_parameters(tmp_path, tiny_inputs):
    _, model = _pair()
    perturb_(model)
    images, tokens = tiny_inputs
    with torch.no_grad():
        before_i, before_t = model.encode_image(images), model.encode_text(tokens)
    save_adapters(model, tmp_path / "ad")
    _, other = _pair()
    load_adapter_weights(other, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(other.encode_image(images), before_i)
        assert torch.equal(other.encode_text(tokens), before_t)
    # an adapter-only model cannot load them, and the error names the backbone keys it does not expect
    _, plain = _pair(also_train=())
    with pytest.raises(Exception, match="unexpected.*ln_"):
        load_adapter_weights(plain, tmp_path / "ad")


@pytest.mark.slow
def test_disable_adapters_and_unload_give_base_features(tiny_inputs):
    ref, model = _pair()
    perturb_(model)
    images, tokens = tiny_inputs
    with torch.no_grad():
        base_i, base_t = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        adapted_i, adapted_t = model.encode_image(images), model.encode_text(tokens)
        # the adapters alone would not restore the base: the trained norms and biases must go too
        for _, w in adapter_wrappers(model.clip):
            w.enabled = False
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        for _, w in adapter_wrappers(model.clip):
            w.enabled = True
        with model.disable_adapters("text"):
            assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-6)
            assert torch.equal(model.encode_image(images), adapted_i)
        with model.disable_adapters("image"):
            assert torch.allclose(model.encode_image(images), base_i, atol=1e-6)
            assert torch.equal(model.encode_text(tokens), adapted_t)
        assert torch.equal(model.encode_text(tokens), adapted_t) and torch.equal(model.encode_image(images), adapted_i)
        clip = model.unload()
        assert torch.allclose(clip.encode_image(images, normalize=True), base_i, atol=1e-6)
        assert torch.allclose(clip.encode_text(tokens, normalize=True), base_t, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(also_train=("norm",)), "model.also_train='norm' is not one of norms, biases, convs, proj"),
    (dict(also_train=("norms", "norms")), "lists an entry twice"),
    (dict(method="full", also_train=("norms",)), "adapter methods"),
    (dict(method="zeroshot", also_train=("biases",)), "adapter methods"),
])
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(tiny_config("harma"), **change)


def test_backbone_without_such_parameters_is_a_clear_error():
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_NAME)
    for m in clip.modules():  # a backbone with no LayerNorm at all
        for name, child in list(m.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(m, name, torch.nn.Identity())
    cfg = dataclasses.replace(tiny_config("harma"), also_train=("norms",))
    with pytest.raises(ConfigError, match="also_train='norms'.*has no such parameters"):
        HarmaModel(clip, cfg)
