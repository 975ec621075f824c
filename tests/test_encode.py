"""Batched encoding and split evaluation on a tiny random CLIP and a synthetic csv split."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from harma import HarmaModel
from harma.data import RetrievalSplit, clean_caption, eval_transform, load_split
from harma.encode import EvalResult, encode_images, encode_texts, evaluate_split
from harma.errors import DatasetError
from harma.metrics import METRIC_KEYS, retrieval_metrics
from tests.conftest import TINY_NAME, perturb_, tiny_config

WORDS = ["Airport", "river", "farmland", "stadium", "beach", "forest", "harbor", "bridge", "Dense", "park"]


def write_split(root: Path, n_images: int = 9, caps_per_image: int = 5, seed: int = 0) -> Path:
    """Tiny PNGs of different sizes + ``train.csv`` (image,caption), 5 captions per image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n_images):
        side = int(rng.integers(20, 48))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"im{i:02d}.png")
        for c in range(caps_per_image):
            words = rng.choice(WORDS, size=4)
            rows.append(f"images/im{i:02d}.png,\"{' '.join(words)}, number {c}!\"")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> RetrievalSplit:
    return load_split(write_split(tmp_path_factory.mktemp("synthetic")), "train")


@pytest.fixture
def model(device) -> HarmaModel:
    torch.manual_seed(0)
    m = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config()).to(device)
    perturb_(m)
    return m


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(TINY_NAME)


TRANSFORM = eval_transform(32)


def test_encode_images_shape_norm_and_progress(model, split):
    calls = []
    emb = encode_images(model, split.images, TRANSFORM, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert emb.shape == (split.num_images, 32)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(split.num_images), atol=1e-5)
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_encode_texts_shape_and_norm(model, split, tokenizer):
    emb = encode_texts(model, split.captions, tokenizer, batch_size=16)
    assert emb.shape == (split.num_captions, 32)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(split.num_captions), atol=1e-5)


class OneCallerAtATime:
    """A tokenizer that refuses concurrent use, as a Hugging Face fast tokenizer does ("Already borrowed")."""

    def __init__(self, tokenizer):
        self.tokenizer, self.inside, self.guard = tokenizer, 0, threading.Lock()

    def __call__(self, texts):
        with self.guard:
            self.inside += 1
            clash = self.inside > 1
        try:
            if clash:
                raise RuntimeError("Already borrowed")
            time.sleep(0.002)  # long enough for a second caller to arrive
            return self.tokenizer(texts)
        finally:
            with self.guard:
                self.inside -= 1


def test_two_threads_encoding_with_one_model_take_turns(model, split, tokenizer):
    """The app encodes a gallery while visitors' queries arrive on the same model: the encoders take the
    model's and the tokenizer's lock batch by batch, so the two never call the tokenizer at once, and each
    gets the embeddings it gets alone."""
    shy = OneCallerAtATime(tokenizer)
    alone = encode_texts(model, split.captions, shy, batch_size=2)
    out, errors = {}, []

    def encode(name):
        try:
            out[name] = encode_texts(model, split.captions, shy, batch_size=2)
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=encode, args=(name,)) for name in ("gallery", "queries")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(torch.allclose(out[name], alone, atol=1e-6) for name in ("gallery", "queries"))


@pytest.mark.slow
def test_batch_size_invariance(model, split, tokenizer):
    a = encode_images(model, split.images, TRANSFORM, batch_size=2)
    b = encode_images(model, split.images, TRANSFORM, batch_size=7)
    assert torch.allclose(a, b, atol=1e-5)
    captions = split.captions[:15]
    ta = encode_texts(model, captions, tokenizer, batch_size=2)
    tb = encode_texts(model, captions, tokenizer, batch_size=7)
    assert torch.allclose(ta, tb, atol=1e-5)


def test_matches_direct_forward(model, split, tokenizer, device):
    emb = encode_images(model, split.images[:3], TRANSFORM)
    from harma.data import open_image

    pixels = torch.stack([TRANSFORM(open_image(p)) for p in split.images[:3]]).to(device)
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(pixels).cpu()
    assert torch.allclose(emb, direct, atol=1e-5)


def test_model_mode_restored(model, split, tokenizer):
    model.train()
    model.clip.visual.eval()  # a mixed state must come back exactly, not as a blanket train()
    before = {n: m.training for n, m in model.named_modules()}
    encode_images(model, split.images[:2], TRANSFORM)
    encode_texts(model, split.captions[:2], tokenizer)
    evaluate_split(model, split, TRANSFORM, tokenizer, gap=False)
    assert {n: m.training for n, m in model.named_modules()} == before
    model.eval()
    evaluate_split(model, split, TRANSFORM, tokenizer, gap=False)
    assert not any(m.training for m in model.modules())


@pytest.mark.slow
def test_evaluate_split_matches_manual_similarity(model, split, tokenizer):
    calls = []
    res = evaluate_split(model, split, TRANSFORM, tokenizer, batch_size=4,
                         progress=lambda d, t: calls.append((d, t)))
    assert isinstance(res, EvalResult)
    assert set(res.metrics) == set(METRIC_KEYS)
    assert res.num_images == 9 and res.num_captions == 45
    assert calls[-1] == (54, 54) and all(t == 54 for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    img = encode_images(model, split.images, TRANSFORM)
    txt = encode_texts(model, [clean_caption(c, 30) for c in split.captions], tokenizer)
    expected = retrieval_metrics(img @ txt.T, split.text_to_image)
    assert res.metrics == pytest.approx(expected, abs=1e-9)

    for key in ("centroid_distance", "uniformity_joint", "knn_modality_purity", "linear_probe_accuracy", "alignment"):
        assert key in res.gap

    d = res.to_dict()
    assert set(d) == set(METRIC_KEYS) | {"gap", "num_images", "num_captions"}
    assert d["gap"] == res.gap and d["num_captions"] == 45


def test_clean_captions_flag(model, split, tokenizer):
    raw = evaluate_split(model, split, TRANSFORM, tokenizer, clean_captions=False, gap=False)
    txt = encode_texts(model, split.captions, tokenizer)
    img = encode_images(model, split.images, TRANSFORM)
    assert raw.metrics == pytest.approx(retrieval_metrics(img @ txt.T, split.text_to_image), abs=1e-9)
    assert raw.gap == {} and raw.to_dict()["gap"] == {}


def test_split_without_captions_raises(model, split, tokenizer):
    gallery = RetrievalSplit("g/all", split.root, split.images, [], [])
    with pytest.raises(DatasetError, match="no captions"):
        evaluate_split(model, gallery, TRANSFORM, tokenizer)


def test_bad_batch_size(model, split):
    with pytest.raises(ValueError, match="batch_size"):
        encode_images(model, split.images, TRANSFORM, batch_size=0)
