"""Injection into open_clip models: identity at init, targets, removal, counts on real architectures."""

from __future__ import annotations

import open_clip
import pytest
import torch

from harma import HarmaModel, ModelConfig, UnsupportedModelError, remove_adapters
from harma.adapters import GatedMLP, ParallelAdapterBlock
from tests.conftest import TINY_NAME, perturb_, tiny_config


def _pair(method, device, **harma):
    torch.manual_seed(0)
    base = open_clip.create_model(TINY_NAME).to(device).eval()
    ref = open_clip.create_model(TINY_NAME).to(device).eval()
    ref.load_state_dict(base.state_dict())
    return ref, HarmaModel(base, tiny_config(method, **harma)).eval()


@pytest.mark.parametrize("method,share", [("harma", "text_only"), ("harma", "shared"), ("harma", "none"),
                                          ("mrs", None), ("full", None), ("zeroshot", None)])
def test_identity_at_init(method, share, device, tiny_inputs):
    ref, model = _pair(method, device, **({"share_mode": share} if share else {}))
    images, tokens = tiny_inputs
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), ref.encode_image(images, normalize=True), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), ref.encode_text(tokens, normalize=True), atol=1e-5)


def test_targets_and_sharing(device):
    _, model = _pair("harma", device, share_mode="text_only")
    assert model.targeted_modules == [f"visual.transformer.resblocks.{i}.mlp" for i in range(2)] + [
        f"transformer.resblocks.{i}.mlp" for i in range(2)]
    image_mlp = model.clip.visual.transformer.resblocks[0].mlp
    text_mlp = model.clip.transformer.resblocks[0].mlp
    assert isinstance(image_mlp, GatedMLP) and image_mlp.adapter.mms is None  # as released
    assert text_mlp.adapter.mms is model.mms[0]
    _, shared = _pair("harma", device, share_mode="shared")
    assert shared.clip.visual.transformer.resblocks[1].mlp.adapter.mms is shared.mms[1]
    assert shared.clip.transformer.resblocks[1].mlp.adapter.mms is shared.mms[1]
    _, none = _pair("harma", device, share_mode="none")
    assert none.mms is None


def test_per_tower_bottleneck(device, tiny_inputs):
    _, model = _pair("harma", device, image_bottleneck=24, text_bottleneck=8)
    image_mga = model.clip.visual.transformer.resblocks[0].mlp.adapter
    text_mga = model.clip.transformer.resblocks[0].mlp.adapter
    assert image_mga.down.out_features == image_mga.up.in_features == 24
    assert text_mga.down.out_features == 8
    assert model.mms[0].l1.in_features == 8  # text_only: the MMS runs inside the text MGAs
    images, tokens = tiny_inputs
    with torch.no_grad():  # shapes agree end to end
        model.encode_image(images), model.encode_text(tokens)
    _, plain = _pair("harma", device, image_bottleneck=None)
    assert plain.clip.visual.transformer.resblocks[0].mlp.adapter.down.out_features == 16  # falls back


def test_attn_seam_adapts_the_attention_output(device, tiny_inputs):
    """harma.attn_seam: a second MGA (no MMS) on the attention output (open_clip's ls_1) of each block."""
    ref, model = _pair("harma", device, attn_seam=["text"], attn_seam_bottleneck=8)
    assert model.targeted_modules == [f"visual.transformer.resblocks.{i}.mlp" for i in range(2)] + [
        name for i in range(2) for name in (f"transformer.resblocks.{i}.mlp", f"transformer.resblocks.{i}.ls_1")]
    seam = model.clip.transformer.resblocks[0].ls_1
    assert isinstance(seam, GatedMLP) and seam.adapter.mms is None and seam.adapter.down.out_features == 8
    assert isinstance(model.clip.visual.transformer.resblocks[0].ls_1, torch.nn.Identity)
    images, tokens = tiny_inputs
    base_t = ref.encode_text(tokens, normalize=True)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-5)  # zero-initialised
        perturb_(seam)  # this one adapter alone moves the text embedding
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        assert torch.allclose(model.encode_image(images), ref.encode_image(images, normalize=True), atol=1e-5)
    n_seam = sum(p.numel() for b in model.clip.transformer.resblocks for p in b.ls_1.parameters())
    _, plain = _pair("harma", device)
    assert model.num_parameters(trainable_only=True) == plain.num_parameters(trainable_only=True) + n_seam
    base_keys = set(ref.state_dict())
    unloaded = model.unload()
    assert isinstance(unloaded.transformer.resblocks[0].ls_1, torch.nn.Identity)
    assert set(unloaded.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.allclose(unloaded.encode_text(tokens, normalize=True), base_t, atol=1e-6)


def test_layer_and_tower_selection(device):
    _, model = _pair("harma", device, towers=["image"], layers=[-1])
    assert model.targeted_modules == ["visual.transformer.resblocks.1.mlp"]
    with pytest.raises(UnsupportedModelError, match="out of range"):
        _pair("harma", device, layers=[5])


def test_mrs_wraps_blocks_with_one_shared_adapter(device):
    _, model = _pair("mrs", device)
    blocks = list(model.clip.visual.transformer.resblocks) + list(model.clip.transformer.resblocks)
    assert all(isinstance(b, ParallelAdapterBlock) for b in blocks)
    assert all(b.adapter is model.mrs for b in blocks)


def test_adapter_names_do_not_leak_into_base_keys(device):
    ref, model = _pair("harma", device)
    base_keys = set(ref.state_dict())
    plain = model.unload()
    assert set(plain.state_dict()) == base_keys
    assert remove_adapters(plain) == 0


@pytest.mark.parametrize("method", ["harma", "mrs"])
def test_unload_restores_outputs_after_training(method, device, tiny_inputs):
    ref, model = _pair(method, device)
    perturb_(model)
    images, tokens = tiny_inputs
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(tokens), ref.encode_text(tokens, normalize=True), atol=1e-4)
        plain = model.unload()
        assert torch.allclose(plain.encode_text(tokens, normalize=True), ref.encode_text(tokens, normalize=True), atol=1e-6)


def test_double_injection_refused(device):
    _, model = _pair("harma", device)
    with pytest.raises(UnsupportedModelError, match="already has adapters"):
        HarmaModel(model.clip, tiny_config("harma"))


def test_unsupported_text_tower_is_a_clear_error():
    class NotClip(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="transformer towers"):
        HarmaModel(NotClip(), ModelConfig(method="harma"))


def _meta(name, method="harma", share="text_only"):
    clip = open_clip.create_model(name, device="meta")
    return HarmaModel(clip, ModelConfig(model_name=name, method=method, harma={"share_mode": share}))


@pytest.mark.parametrize("share", ["text_only", "shared"])
def test_vit_b_32_released_parameter_count(share):
    """method.md §1.6: 12 image MGAs + 12 text MGAs + 12 MMS + 24 block gates + temperature."""
    model = _meta("ViT-B-32", share=share)
    assert model.num_parameters(trainable_only=True) == 5_934_397
    assert model.trainable_summary().startswith("trainable params: 5,934,397 of ")


def test_vit_b_32_mrs_parameter_count():
    assert _meta("ViT-B-32", "mrs").num_parameters(trainable_only=True) == 161_088 + 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu"])
def test_other_architectures(name):
    cfg = open_clip.get_model_config(name)
    model = _meta(name)
    v, t = cfg["vision_cfg"]["width"], cfg["text_cfg"]["width"]
    lv, lt = cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"]
    mha128 = 4 * 128 * 128 + 4 * 128
    mga = lambda d: (d * 128 + 128) + (128 * d + d) + mha128 + 1  # noqa: E731
    expected = lv * mga(v) + lt * mga(t) + lt * 33_217 + lv + lt + 1
    assert model.num_parameters(trainable_only=True) == expected
    assert len(model.targeted_modules) == lv + lt


@pytest.mark.parametrize("harma,match", [
    ({"image_bottleneck": 20, "attn_heads": 8}, "image_bottleneck \\(20\\) must be divisible"),
    ({"text_bottleneck": 0}, "text_bottleneck must be >= 1"),
    ({"share_mode": "shared", "image_bottleneck": 192}, "bottlenecks must match"),
    ({"towers": ["image"], "attn_seam": ["text"]}, "harma.attn_seam lists 'text', which harma.towers does not adapt"),
    ({"attn_seam": ["audio"]}, "harma.attn_seam"),
    ({"attn_seam": ["text", "text"]}, "lists a tower twice"),
    ({"attn_seam": ["text"], "attn_seam_bottleneck": 12}, "attn_seam_bottleneck \\(12\\) must be divisible"),
])
def test_per_tower_bottleneck_errors(harma, match):
    from harma import ConfigError

    with pytest.raises(ConfigError, match=match):
        ModelConfig(method="harma", harma=harma)


def _pad_changes_text(model, tokens, embedding):
    """How far text features move when the padding token's (frozen) embedding row changes."""
    with torch.no_grad():
        before = model.encode_text(tokens)
        saved = embedding.weight[0].clone()
        embedding.weight[0].add_(torch.randn(embedding.weight.shape[1]))  # not a constant: LN removes that
        after = model.encode_text(tokens)
        embedding.weight[0].copy_(saved)
    return (after - before).abs().max().item()


@pytest.mark.parametrize("share", ["text_only", "shared"])
def test_text_padding_mask_makes_padding_invisible(share, device, tiny_inputs):
    _, tokens = tiny_inputs
    assert (tokens == 0).any(dim=1).all()  # every caption is padded to the context length
    _, released = _pair("harma", device, share_mode=share)
    _, masked = _pair("harma", device, share_mode=share, text_padding_mask=True)
    perturb_(released)
    perturb_(masked)
    # frozen CLIP attention is causal and pools at EOT, so only the adapters' attention can see padding
    assert _pad_changes_text(released, tokens, released.clip.token_embedding) > 1e-3
    assert _pad_changes_text(masked, tokens, masked.clip.token_embedding) < 1e-6
    released.train()
    masked.train()  # the training path (no fused attention) agrees
    assert _pad_changes_text(masked, tokens, masked.clip.token_embedding) < 1e-6


def test_text_padding_mask_survives_copy_and_refuses_checkpointing(device, tiny_inputs):
    import copy

    from harma.config import ConfigError

    images, tokens = tiny_inputs
    _, model = _pair("harma", device, text_padding_mask=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin.encode_text(tokens), model.encode_text(tokens))
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model.set_grad_checkpointing(True)
    model.unload()  # the hook goes with the adapters
    assert not model.clip.token_embedding._forward_pre_hooks


@pytest.mark.parametrize("method", ["harma", "mrs"])
def test_disable_adapters_per_tower(method, device, tiny_inputs):
    ref, model = _pair(method, device)
    perturb_(model)
    images, tokens = tiny_inputs
    with torch.no_grad():
        base_i, base_t = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        adapted_i, adapted_t = model.encode_image(images), model.encode_text(tokens)
        assert not torch.allclose(adapted_i, base_i, atol=1e-4) and not torch.allclose(adapted_t, base_t, atol=1e-4)
        with model.disable_adapters("text"):
            assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-6)
            assert torch.equal(model.encode_image(images), adapted_i)
        with model.disable_adapters("image"):
            assert torch.allclose(model.encode_image(images), base_i, atol=1e-6)
            assert torch.equal(model.encode_text(tokens), adapted_t)
        with model.disable_adapters():
            assert torch.allclose(model.encode_image(images), base_i, atol=1e-6)
        assert torch.equal(model.encode_text(tokens), adapted_t)  # back on after the context
    with pytest.raises(ValueError, match="unknown tower"):
        with model.disable_adapters("audio"):
            pass


def test_text_padding_mask_without_text_adapters(device, tiny_inputs):
    """Image-only adapters have nothing to mask: the flag is accepted and hooks nothing."""
    _, tokens = tiny_inputs
    ref, model = _pair("harma", device, towers=("image",), text_padding_mask=True)
    assert not model.clip.token_embedding._forward_pre_hooks
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), ref.encode_text(tokens, normalize=True), atol=1e-6)
