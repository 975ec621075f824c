"""harma.projection: seeded, cached UMAP with gap numbers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from harma.gap import modality_gap
from harma.projection import embedding_projection, sample_rows, umap_2d


def test_small_sets_use_pca_and_sampling_is_seeded():
    x = torch.randn(10, 6).numpy()
    assert umap_2d(x).shape == (10, 2)
    assert sample_rows(5, 10, 0) == [0, 1, 2, 3, 4]
    a = sample_rows(100, 10, 3)
    assert a == sample_rows(100, 10, 3) and a == sorted(a) and len(set(a)) == 10 and a != sample_rows(100, 10, 4)


@pytest.mark.slow
def test_projection_is_cached_and_gap_uses_every_embedding(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    cap = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    caption_rows = list(range(20)) + [0, 1, 2, 3]
    t2i = [i % 12 for i in range(24)]
    out = embedding_projection(img, cap, caption_rows=caption_rows, text_to_image=t2i, max_points=10,
                               cache_dir=tmp_path, seed=0)
    assert len(out["img_rows"]) == 10 and len(out["txt_rows"]) == 10 and len(out["xy"]) == 20
    ref = modality_gap(img, cap[torch.tensor(caption_rows)], t2i, seed=0)
    assert out["gap"] == json.loads(json.dumps(ref))
    files = list((tmp_path / "projections").glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr("harma.projection.umap_2d", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert embedding_projection(img, cap, caption_rows=caption_rows, text_to_image=t2i, max_points=10,
                                cache_dir=tmp_path, seed=0) == out
    monkeypatch.undo()
    images_only = embedding_projection(img, None, max_points=10, cache_dir=None, seed=0)
    assert images_only["gap"] == {} and images_only["txt_rows"] == [] and len(images_only["xy"]) == 10
