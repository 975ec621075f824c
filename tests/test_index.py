"""``harma.retrieval``: exact search against brute force, save/load, the embedding cache, the Retriever."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harma import create_model, save_adapters
from harma.data import load_split, write_synthetic_dataset
from harma.encode import encode_images, encode_texts
from harma.errors import DatasetError, IndexFormatError, QueryError
from harma.retrieval import (
    CaptionPool,
    EmbeddingIndex,
    Retriever,
    RetrieverOptions,
    cached_index,
    model_identity,
    paths_fingerprint,
)
from harma.retrieval.retriever import model_lock
from tests.conftest import perturb_, tiny_config


def _random_index(n=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g) * 3  # deliberately not normalised
    return EmbeddingIndex([f"id{i}" for i in range(n)], emb, [{"i": i} for i in range(n)]), emb


def test_search_matches_brute_force_cosine():
    index, raw = _random_index()
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(7, 16, generator=g)
    cos = F.cosine_similarity(queries[:, None, :], raw[None, :, :], dim=-1)  # (Q, N)
    scores, rows = index.search(queries, k=10)
    assert rows.shape == scores.shape == (7, 10)
    assert torch.equal(rows, torch.argsort(cos, dim=1, descending=True)[:, :10])
    assert torch.allclose(scores, cos.gather(1, rows), atol=1e-5)
    s1, r1 = index.search(queries[3], k=5)  # a single (D,) query gives 1-D results
    assert r1.shape == (5,) and torch.equal(r1, rows[3, :5]) and torch.allclose(s1, scores[3, :5])
    assert index.search(queries[0], k=500)[1].shape == (50,)  # k capped at the index size
    assert index.search(queries[0], k=0)[1].shape == (0,)


def test_search_ties_keep_index_order_and_bad_shapes_raise():
    index = EmbeddingIndex(["a", "b", "c"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert index.search(torch.tensor([1.0, 0.0]), 3)[1].tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="query must be"):
        index.search(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="ids"):
        EmbeddingIndex(["a"], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingIndex(["a"], torch.tensor([[float("nan"), 1.0]]))


def test_save_load_round_trip(tmp_path):
    index, _ = _random_index()
    index.metadata[0]["caption"] = "ünïcode ✓"
    index.save(tmp_path / "idx")
    back = EmbeddingIndex.load(tmp_path / "idx")
    assert back.ids == index.ids and back.metadata == index.metadata
    assert torch.equal(back.embeddings, index.embeddings)
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(len(index)))

    # an embeddings file that does not match its JSON (e.g. an interrupted rewrite) is refused
    other, _ = _random_index(seed=5)
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "embeddings.safetensors", tmp_path / "idx" / "embeddings.safetensors")
    with pytest.raises(IndexFormatError, match="does not match"):
        EmbeddingIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="cannot read"):
        EmbeddingIndex.load(tmp_path / "missing")


def test_cached_index_rebuilds_a_corrupt_entry(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return _random_index()[0]

    a, hit = cached_index(tmp_path, {"x": 1}, build)
    assert not hit and len(calls) == 1
    b, hit = cached_index(tmp_path, {"x": 1}, build)
    assert hit and len(calls) == 1 and torch.equal(a.embeddings, b.embeddings)
    entry = next(p for p in tmp_path.iterdir() if p.is_dir())
    (entry / "index.json").write_text("{broken")
    _, hit = cached_index(tmp_path, {"x": 1}, build)
    assert not hit and len(calls) == 2
    _, hit = cached_index(tmp_path, {"x": 2}, build)  # another key: another entry
    assert not hit and len(calls) == 3
    _, hit = cached_index(None, {"x": 1}, build)  # no cache folder: always built
    assert not hit and len(calls) == 4


def test_caption_pool_dedupes_and_matches_whole_words():
    caps = ["An airplane is stopped at the airport .", "an airplane is stopped at the airport",
            "Many boats at the harbor .", "A plane."]
    pool = CaptionPool.from_captions(caps, [0, 1, 1, 2])
    assert pool.texts == ["an airplane is stopped at the airport", "many boats at the harbor", "a plane"]
    assert pool.images == [[0, 1], [1], [2]] and pool.caption_to_text == [0, 0, 1, 2]
    assert pool.raw[0] == caps[0] and pool.metadata()[1] == {"caption": caps[2], "images": [1]}
    assert pool.images_matching("Airplane is stopped!") == {0, 1}
    assert pool.images_matching("an airplane is stopped at the airport") == {0, 1}  # exact match
    assert pool.images_matching("plane") == {2}  # whole words: "airplane" does not contain "plane"
    assert pool.images_matching("  ?! ") == set()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("index")
    root = write_synthetic_dataset(tmp / "data", n_images=12, captions_per_image=2, image_size=32)
    split = load_split(root, "train")
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model(tiny_config())
    perturb_(model)
    ckpt = save_adapters(model, tmp / "adapters")
    return dict(tmp=tmp, split=split, model=model, preprocess=preprocess, tokenizer=tokenizer, ckpt=ckpt)


def _build(t, cache, paths=None, checkpoint="default", model=None, progress=None, shipped=None):
    pool = CaptionPool.from_captions(t["split"].captions, t["split"].text_to_image)
    options = RetrieverOptions(checkpoint=t["ckpt"] if checkpoint == "default" else checkpoint, cache_dir=cache,
                               batch_size=8, shipped_dir=shipped)
    return Retriever.build(model or t["model"], t["preprocess"], t["tokenizer"], paths or t["split"].images,
                           pool, options, progress=progress)


def test_retriever_results_sorted_and_equal_to_brute_force(tiny):
    t = tiny
    r = _build(t, None)
    hits = r.search_text("a red square on a grey field", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.metadata["path"] == h.id for h in hits)
    img = encode_images(t["model"], t["split"].images, t["preprocess"])
    txt = encode_texts(t["model"], ["a red square on a grey field"], t["tokenizer"])[0]
    expected = torch.argsort(img @ txt, descending=True)[:5].tolist()
    assert [h.index for h in hits] == expected

    pil = Image.open(t["split"].images[3])
    caps = r.search_image(pil, k=4)
    assert len(caps) == 4 and [c.score for c in caps] == sorted((c.score for c in caps), reverse=True)
    assert {"caption", "images"} <= set(caps[0].metadata)
    # the stored gallery embedding ranks captions like a freshly encoded image
    assert [c.index for c in r.search_gallery_image(3, k=4)] == [c.index for c in caps]
    with pytest.raises(QueryError, match="empty"):  # a user's mistake: the app shows it as a message
        r.search_text(" ... ", 3)
    no_caps = Retriever(r.model, r.preprocess, r.tokenizer, r.images)
    with pytest.raises(QueryError, match="no captions"):
        no_caps.search_image(pil, 3)


def test_cache_hits_and_invalidates(tiny, tmp_path):
    t, cache = tiny, tmp_path / "cache"
    seen = []
    first = _build(t, cache, progress=lambda stage, done, total: seen.append(stage))
    assert first.from_cache == {"images": False, "captions": False} and {"images", "captions"} <= set(seen)
    seen.clear()
    again = _build(t, cache, progress=lambda stage, done, total: seen.append(stage))
    assert again.from_cache == {"images": True, "captions": True} and seen == []
    assert torch.equal(again.images.embeddings, first.images.embeddings)

    # a copy of the same checkpoint elsewhere is the same model (keyed by the weights' sha256)
    shutil.copytree(t["ckpt"], tmp_path / "copy")
    assert _build(t, cache, checkpoint=tmp_path / "copy").from_cache["images"]

    # other adapter weights: miss
    other, _, _, _ = create_model(tiny_config())
    other.load_state_dict(t["model"].state_dict())
    perturb_(other, seed=7)
    other_ckpt = save_adapters(other, tmp_path / "other")
    changed = _build(t, cache, checkpoint=other_ckpt, model=other)
    assert changed.from_cache == {"images": False, "captions": False}
    assert not torch.allclose(changed.images.embeddings, first.images.embeddings)

    # the image set changes: a file is touched, or an image is removed
    paths = list(t["split"].images)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _build(t, cache).from_cache == {"images": False, "captions": True}
    assert _build(t, cache, paths=paths[1:]).from_cache["images"] is False
    assert _build(t, cache).from_cache["images"] is True  # the touched set is cached now
    json.loads(next(cache.iterdir()).joinpath("index.json").read_text())  # entries are plain JSON


def test_cache_misses_for_another_band_choice(tiny, tmp_path, monkeypatch):
    """Embeddings depend on how images decode: another HARMA_BANDS is another cache entry (it was a hit)."""
    t, cache = tiny, tmp_path / "cache"
    first = _build(t, cache)
    monkeypatch.setenv("HARMA_BANDS", "2,1,0")
    swapped = _build(t, cache)
    assert swapped.from_cache["images"] is False and swapped.from_cache["captions"] is True
    assert not torch.allclose(swapped.images.embeddings, first.images.embeddings)


def test_shipped_embeddings_are_keyed_by_content(tiny, tmp_path):
    """Embeddings shipped beside a gallery serve a copy of it anywhere (other folder, other times),
    are never used for changed bytes or another model, and carry no path of the machine that wrote them."""
    t, shipped = tiny, tmp_path / "shipped"
    built = _build(t, None)
    texts = CaptionPool.from_captions(t["split"].captions, t["split"].text_to_image).texts
    written = built.ship(shipped, t["split"].images, texts)
    assert len(written) == 2 and str(t["tmp"]) not in "".join(p.joinpath("index.json").read_text() for p in written)

    copy = tmp_path / "copy"  # the gallery in another checkout: new paths, new modification times
    paths = []
    for i, src in enumerate(t["split"].images):
        paths.append(copy / f"{i:03d}{src.suffix}")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(src.read_bytes())
    seen = []
    hit = _build(t, None, paths=paths, shipped=shipped, progress=lambda *a: seen.append(a))
    assert hit.from_cache == {"images": True, "captions": True} and seen == []
    assert torch.equal(hit.images.embeddings, built.images.embeddings)
    assert torch.equal(hit.captions.embeddings, built.captions.embeddings)
    assert hit.images.ids == [str(p) for p in paths] and hit.search_text("a red square", 3)[0].id in hit.images.ids
    assert hit.captions.metadata == built.captions.metadata

    # one changed image, or another model: encoded, not served the shipped vectors
    paths[0].write_bytes(t["split"].images[1].read_bytes())
    assert _build(t, None, paths=paths, shipped=shipped).from_cache == {"images": False, "captions": True}
    other, _, _, _ = create_model(tiny_config())
    other.load_state_dict(t["model"].state_dict())
    perturb_(other, seed=3)
    assert _build(t, None, checkpoint=save_adapters(other, tmp_path / "other"), model=other,
                  shipped=shipped).from_cache == {"images": False, "captions": False}
    with pytest.raises(DatasetError, match="built on"):
        built.ship(shipped, paths[1:], texts)


def test_model_identity(tiny):
    t = tiny
    ident = model_identity(t["model"], t["ckpt"])
    assert ident["model_name"] and ident["method"] == "harma" and len(ident["adapters_sha256"]) == 64
    assert "weights_sha256" in ident  # random backbone: identified by its weights
    assert model_identity(t["model"])["adapters_sha256"].startswith("state:")
    zs, _, _, _ = create_model(tiny_config("zeroshot"))
    assert model_identity(zs)["adapters_sha256"] == "none"
    assert paths_fingerprint(t["split"].images) != paths_fingerprint(t["split"].images[::-1])


def test_another_model_encodes_while_one_model_is_busy(tiny):
    """Each model has its own lock (the app's baseline and adapted models encode a query at once); retrievers
    over the same model share it."""
    import threading

    t = tiny
    other, _, _, _ = create_model(tiny_config())
    busy = Retriever(t["model"], t["preprocess"], t["tokenizer"], images=None)
    free = Retriever(other, t["preprocess"], t["tokenizer"], images=None)
    assert model_lock(t["model"]) is model_lock(busy.model) and model_lock(other) is not model_lock(t["model"])
    done = {}
    with model_lock(t["model"]):  # the first model is busy
        waiting = threading.Thread(target=lambda: done.__setitem__("busy", busy.encode_text("a red square")))
        waiting.start()
        free_thread = threading.Thread(target=lambda: done.__setitem__("free", free.encode_text("a red square")))
        free_thread.start()
        free_thread.join(30)
        assert "free" in done and "busy" not in done  # the other model answered; the busy one still waits
    waiting.join(30)
    assert done["busy"].shape == done["free"].shape


def test_concurrent_text_queries_are_batched_and_equal_to_single_ones(tiny, tmp_path):
    """Queries that arrive while the model is busy are encoded in one forward pass, with the same
    embeddings as one at a time."""
    import threading

    r = _build(tiny, tmp_path / "cache")
    queries = [f"a red square number {i}" for i in range(6)]
    alone = [r.encode_text(q) for q in queries]
    calls = []
    real = r.model.encode_text

    def counting(tokens, *a, **k):
        calls.append(tokens.shape[0])
        return real(tokens, *a, **k)

    r.model.encode_text = counting
    out = [None] * len(queries)
    try:
        with model_lock(r.model):  # the model is busy: every query waits
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, r.encode_text(queries[i])))
                       for i in range(len(queries))]
            for t in threads:
                t.start()
            while len(r._pending) < len(queries):
                threading.Event().wait(0.01)
        for t in threads:
            t.join(30)
    finally:
        del r.model.encode_text
    assert calls == [len(queries)]
    for got, ref in zip(out, alone):
        assert torch.allclose(got, ref, atol=1e-5)
