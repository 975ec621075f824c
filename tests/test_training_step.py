"""PEFT's 'only the adapters moved' check, on a few real optimisation steps of the tiny model."""

from __future__ import annotations

import open_clip
import pytest
import torch

from harma import HarmaLoss, HarmaModel, LossConfig
from tests.conftest import TINY_NAME, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("method", ["harma", "mrs", "full"])
def test_only_trainable_parameters_change(method, tiny_inputs):
    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config(method)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(model.trainable_state_dict())
    loss_fn = HarmaLoss(LossConfig(intra_image=1.0 if method == "mrs" else 0.0))
    # Adam: nested zero-inits give the inner adapter weights ~1e-10 gradients in the first steps,
    # which plain SGD cannot move in fp32; Adam's normalised step does (and is what training uses).
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, tokens = tiny_inputs
    for _ in range(4):
        out = model(images, tokens, augmented_views=method == "mrs")
        out.pop("text_features_aug", None)
        losses = loss_fn(**out, image_ids=torch.arange(4))
        opt.zero_grad()
        sum(losses.values()).backward()
        for n, p in model.named_parameters():
            if n not in trainable:
                assert p.grad is None, f"gradient reached frozen {n}"
        opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable
    if method == "full":
        assert len(changed) >= 0.9 * len(trainable)
    else:
        assert changed == trainable, f"trainable but unchanged: {sorted(trainable - changed)[:5]}"


def test_zeroshot_has_nothing_to_train():
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("zeroshot"))
    assert model.num_parameters(trainable_only=True) == 0
    assert not any(p.requires_grad for p in model.parameters())


def test_augmented_views_differ_only_inside_context(tiny_inputs):
    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("mrs")).eval()
    images, tokens = tiny_inputs
    with torch.no_grad():
        plain = model.encode_text(tokens)
        with model.augmented():
            aug = model.encode_text(tokens)
        again = model.encode_text(tokens)
    assert not torch.allclose(plain, aug) and torch.equal(plain, again)


def test_lock_text_trains_only_the_image_side(tiny_inputs):
    from harma import ModelConfig
    from harma.inject import text_tower_parameters, text_tower_parts

    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), ModelConfig(model_name=TINY_NAME, method="full",
                                                                      lock_text=True)).train()
    text_ids = {id(p) for p in text_tower_parameters(model.clip)}
    assert {id(model.clip.positional_embedding), id(model.clip.text_projection)} <= text_ids
    assert text_ids and not any(p.requires_grad for p in model.clip.parameters() if id(p) in text_ids)
    assert all(p.requires_grad for p in model.clip.visual.parameters())
    assert model.text_is_frozen and all(not m.training for part in text_tower_parts(model.clip) for m in part.modules())
    images, tokens = tiny_inputs
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.encode_text(tokens))
    n_text = sum(p.numel() for p in text_tower_parameters(model.clip))
    assert model.num_parameters(True) == model.num_parameters() - n_text - 1  # minus text and logit_scale


def test_lock_text_only_for_full():
    from harma import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="lock_text"):
        ModelConfig(method="harma", lock_text=True)


def test_lock_text_unlocked_layers_train_the_top_blocks_and_head(tiny_inputs):
    """open_clip's --lock-text-unlocked-layers: the last N text blocks and the final norm and
    projection after them train; the embeddings and the blocks below stay frozen and unchanged."""
    from harma import HarmaLoss, LossConfig, ModelConfig

    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), ModelConfig(
        model_name=TINY_NAME, method="full", lock_text=True, lock_text_unlocked_layers=1)).train()
    trainable = set(model.trainable_state_dict())
    text = {n for n in trainable if not n.startswith(("clip.visual.", "temperature"))}
    assert text == {n for n, _ in model.named_parameters()
                    if n.startswith(("clip.transformer.resblocks.1.", "clip.ln_final.", "clip.text_projection"))}
    assert not model.text_is_frozen  # the trainer must not cache text features
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, tokens = tiny_inputs
    for _ in range(2):
        loss = sum(HarmaLoss(LossConfig())(**model(images, tokens), image_ids=torch.arange(4)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "clip.transformer.resblocks.1.mlp.c_fc.weight" in changed and "clip.text_projection" in changed
    assert changed <= trainable  # token/positional embeddings and block 0 did not move


def test_lock_text_unlocked_layers_errors():
    from harma import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="needs model.lock_text=true"):
        ModelConfig(method="full", lock_text_unlocked_layers=2)
    with pytest.raises(ConfigError, match=">= 0"):
        ModelConfig(method="full", lock_text=True, lock_text_unlocked_layers=-1)
    from harma.inject import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="lock_text_unlocked_layers=3: the text tower has 2 blocks"):
        HarmaModel(open_clip.create_model(TINY_NAME), ModelConfig(model_name=TINY_NAME, method="full",
                                                                  lock_text=True, lock_text_unlocked_layers=3))


def test_cached_text_features_equal_encoding_in_train_mode(tiny_inputs):
    """The trainer's text cache is exact: a locked text tower gives the same features in train mode."""
    from harma import ModelConfig
    from harma.encode import encode_texts

    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), ModelConfig(model_name=TINY_NAME, method="full",
                                                                      lock_text=True))
    images, tokens = tiny_inputs
    captions = ["many planes parked at an airport", "a river crosses green farmland", "dense residential area",
                "a stadium"]
    cache = encode_texts(model, captions, open_clip.get_tokenizer(TINY_NAME))
    model.train()
    live = model(images, tokens)["text_features"]
    cached = model(images, None, text_features=cache)["text_features"]
    assert torch.allclose(live, cached, atol=1e-6)


def test_patch_dropout_drops_tokens_in_training_only(tiny_inputs):
    """model.patch_dropout: random patch subsets while training; evaluation sees every patch, so the
    evaluated model equals the same weights built without it."""
    import dataclasses

    from harma import create_model

    images, _ = tiny_inputs
    with_pd = create_model(dataclasses.replace(tiny_config("full"), patch_dropout=0.5))[0]
    plain = create_model(tiny_config("full"))[0]
    assert type(with_pd.clip.visual.patch_dropout).__name__ == "PatchDropout"
    with torch.no_grad():
        assert torch.equal(with_pd.eval().encode_image(images), plain.eval().encode_image(images))
        with_pd.train()
        torch.manual_seed(0)
        a = with_pd.encode_image(images)
        b = with_pd.encode_image(images)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain.encode_image(images))


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_patch_dropout_range(value):
    from harma import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="patch_dropout"):
        ModelConfig(patch_dropout=value)


def test_patch_dropout_needs_a_vit():
    from harma import ModelConfig, create_model, register_model_config
    from tests.conftest import TINY_ARCH

    resnet_tower = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}  # open_clip's ModifiedResNet
    register_model_config("harma-test-tiny-rn", {**TINY_ARCH, "vision_cfg": resnet_tower})
    with pytest.raises(ValueError, match="patch_dropout=0.5 needs a ViT image tower.*ModifiedResNet"):
        create_model(ModelConfig(model_name="harma-test-tiny-rn", method="full", patch_dropout=0.5))
