"""HarMA on an open_clip CLIP whose text tower is a HF BERT (e.g. MiniLM): adapters on layer.output.dense."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import open_clip  # noqa: E402

from harma import HarmaModel, ModelConfig, UnsupportedModelError, register_model_config  # noqa: E402
from harma.adapters import GatedMLP  # noqa: E402
from harma.inject import adapter_wrappers  # noqa: E402
from tests.conftest import perturb_  # noqa: E402

WORDS = ["planes", "parked", "airport", "river", "green", "farmland", "many", "a", "at", "an"]


@pytest.fixture(scope="module")
def hf_arch(tmp_path_factory):
    """A 2-layer, 48-wide BERT config + vocabulary written locally (no hub), registered as an arch."""
    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 5 + len(WORDS),
        "max_position_embeddings": 64, "type_vocab_size": 2}))
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    name = "harma-test-hf"
    register_model_config(name, {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"hf_model_name": str(d), "hf_tokenizer_name": str(d), "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 16}})
    return name


def _build(name, method="harma", **model):
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained_hf=False)
    ref = open_clip.create_model(name, pretrained_hf=False)
    ref.load_state_dict(clip.state_dict())
    cfg = ModelConfig(model_name=name, method=method, mrs={"bottleneck": 8, "shared_dim": 8},
                      harma={"bottleneck": 16, "attn_heads": 4, "mms_dim": 8, "mms_heads": 2, **model.pop("harma", {})},
                      **model)
    return ref.eval(), HarmaModel(clip, cfg).eval()


def test_adapters_attach_to_bert_mlp_output(hf_arch):
    ref, model = _build(hf_arch)
    assert model.targeted_modules[-2:] == [f"text.transformer.encoder.layer.{i}.output.dense" for i in range(2)]
    layer = model.clip.text.transformer.encoder.layer[0]
    assert isinstance(layer.output.dense, GatedMLP) and layer.output.dense.adapter.mms is model.mms[0]
    assert len(model.mms) == 2  # one MMS per text layer in text_only mode


def test_identity_then_change_then_unload(hf_arch):
    ref, model = _build(hf_arch)
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base_t = ref.encode_text(tokens, normalize=True)
        assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-5)
        assert torch.allclose(model.encode_image(images), ref.encode_image(images, normalize=True), atol=1e-5)
        perturb_(model)
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        plain = model.unload()
        assert torch.allclose(plain.encode_text(tokens, normalize=True), base_t, atol=1e-6)


def test_attn_seam_on_bert_attention_output(hf_arch):
    """harma.attn_seam on BERT: the attention sub-layer's output projection, attention.output.dense."""
    ref, model = _build(hf_arch, harma={"attn_seam": ["text"], "attn_seam_bottleneck": 8})
    assert model.targeted_modules[-4:] == [name for i in range(2) for name in (
        f"text.transformer.encoder.layer.{i}.output.dense", f"text.transformer.encoder.layer.{i}.attention.output.dense")]
    seam = model.clip.text.transformer.encoder.layer[1].attention.output.dense
    assert isinstance(seam, GatedMLP) and seam.adapter.down.in_features == 48 and seam.adapter.mms is None
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    with torch.no_grad():
        base_t = ref.encode_text(tokens, normalize=True)
        assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-5)
        perturb_(seam)
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        with model.disable_adapters("text"):
            assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-6)
        plain = model.unload()
        assert isinstance(plain.text.transformer.encoder.layer[1].attention.output.dense, torch.nn.Linear)
        assert torch.allclose(plain.encode_text(tokens, normalize=True), base_t, atol=1e-6)


def test_mrs_on_bert_layers(hf_arch):
    """PE-RSITR's adapter reads the post-attention stream: BertOutput's input_tensor."""
    from harma.adapters import ParallelAdapterBertOutput

    ref, model = _build(hf_arch, method="mrs")
    layers = model.clip.text.transformer.encoder.layer
    assert all(isinstance(l.output, ParallelAdapterBertOutput) and l.output.adapter is model.mrs for l in layers)
    assert model.mrs.down["text"].in_features == 48
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    with torch.no_grad():
        base_t = ref.encode_text(tokens, normalize=True)
        assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-5)  # zero-init identity
        with model.augmented():  # token dropout on the embeddings' output
            assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        perturb_(model)
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        plain = model.unload()
        assert torch.allclose(plain.encode_text(tokens, normalize=True), base_t, atol=1e-6)


def test_hf_tower_refuses_double_injection(hf_arch):
    _, model = _build(hf_arch, method="mrs")
    with pytest.raises(UnsupportedModelError, match="already has adapters"):
        HarmaModel(model.clip, ModelConfig(model_name=hf_arch, method="mrs", mrs={"bottleneck": 8, "shared_dim": 8}))


def test_text_padding_mask_on_bert(hf_arch):
    """BERT's own attention and mean pooling already ignore padding; with the mask the adapters do too."""
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    moved = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = HarmaModel(open_clip.create_model(hf_arch, pretrained_hf=False), ModelConfig(
            model_name=hf_arch, method="harma", harma={"bottleneck": 16, "attn_heads": 4, "mms_dim": 8,
                                                      "mms_heads": 2, "text_padding_mask": flag})).eval()
        perturb_(model, scale=0.5)  # BERT's post-LN damps small adapter changes
        words = model.clip.text.transformer.embeddings.word_embeddings
        pad = model.clip.text.config.pad_token_id
        assert (tokens == pad).any()
        with torch.no_grad():
            before = model.encode_text(tokens)
            words.weight[pad].add_(torch.randn(words.weight.shape[1]))
            moved[flag] = (model.encode_text(tokens) - before).abs().max().item()
    assert moved[False] > 1e-3 and moved[True] < 1e-6


@pytest.mark.parametrize("method", ["harma", "mrs"])
def test_disable_text_adapters_on_bert(hf_arch, method):
    ref, model = _build(hf_arch, method)
    perturb_(model)
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    with torch.no_grad():
        base_t = ref.encode_text(tokens, normalize=True)
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        with model.disable_adapters("text"):
            assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-6)


@pytest.mark.parametrize("method", ["harma", "mrs", "full"])
def test_backbone_dropout_off_in_training(hf_arch, method):
    """model.backbone_dropout=false: BERT's dropout (outputs and attention) is off in train mode, so
    text features are deterministic; the MRS adapter keeps its own dropout; eval() still works."""
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    for dropout in (True, False):
        ref, model = _build(hf_arch, method, backbone_dropout=dropout)
        perturb_(model)
        model.train()
        with torch.no_grad():
            a, b = model.encode_text(tokens), model.encode_text(tokens)
        assert torch.allclose(a, b) is (method != "mrs" and not dropout)  # MRS: its adapter dropout still varies
        if method == "mrs":
            assert model.mrs.dropout.training
            with torch.no_grad():  # without adapters only the backbone's dropout is left
                with model.disable_adapters("text"):
                    a, b = model.encode_text(tokens), model.encode_text(tokens)
            assert torch.allclose(a, b) is (not dropout)
        assert model.clip.visual.training  # non-dropout modules keep train mode
        # adapters inside a module that owns a dropout layer (HarMA's, in BertOutput) keep train mode
        assert all(w.training and all(m.training for m in w.adapter.modules()) for _, w in adapter_wrappers(model.clip))
        model.eval()
        assert not any(m.training for m in model.modules())


def test_also_train_on_bert(hf_arch):
    """model.also_train on a HF text tower: BERT's LayerNorms and every linear bias (the wrapped
    output.dense's too) train; disable_adapters("text") gives the base text features back."""
    ref, model = _build(hf_arch, also_train=("norms", "biases"))
    names = {n for n in model.trainable_state_dict() if n.startswith("clip.text.")}
    for i in range(2):
        layer = f"clip.text.transformer.encoder.layer.{i}."
        assert {layer + "output.LayerNorm.weight", layer + "attention.output.LayerNorm.bias",
                layer + "output.dense.base_layer.bias", layer + "attention.self.query.bias"} <= names
        assert layer + "output.dense.base_layer.weight" not in names
    assert "clip.text.transformer.embeddings.LayerNorm.weight" in names
    tokens = open_clip.get_tokenizer(hf_arch)(["many planes parked at an airport", "a river"])
    perturb_(model)
    with torch.no_grad():
        base_t = ref.encode_text(tokens, normalize=True)
        assert not torch.allclose(model.encode_text(tokens), base_t, atol=1e-4)
        with model.disable_adapters("text"):
            assert torch.allclose(model.encode_text(tokens), base_t, atol=1e-6)


def test_also_train_proj_on_bert_takes_the_hf_head(hf_arch):
    """model.also_train=[proj] on a HF text tower: its linear head (hf_proj_type: linear) and the
    ViT's proj, nothing of the BERT layers."""
    _, model = _build(hf_arch, also_train=("proj",))
    backbone = {n for n in model.trainable_state_dict() if not any(k in n for k in ("adapter", "mms", "gate", "temperature"))}
    assert backbone == {"clip.visual.proj", "clip.text.proj.weight"}
