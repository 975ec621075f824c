"""harma.projection: seeded, cached UMAP with gap numbers, and both models' maps in one frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harma.gap import modality_gap
from harma.projection import (
    ALIGNED,
    MAP_NEIGHBORS,
    PROCRUSTES,
    SEPARATE,
    aligned_2d,
    aligned_projection,
    embedding_projection,
    procrustes_onto,
    sample_rows,
    umap_2d,
)


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


def test_procrustes_recovers_a_rotated_scaled_shifted_layout():
    g = np.random.default_rng(0)
    fixed = g.normal(size=(30, 2))
    angle = 1.1
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert np.abs(procrustes_onto(fixed @ rotation * 2.5 + 7, fixed) - fixed).max() < 1e-9


def test_aligned_projection_same_items_in_one_frame_and_cached(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(12, 8, generator=g), torch.randn(20, 8, generator=g)
    out = aligned_projection((img, cap), (img.clone(), cap.clone()), max_points=10, cache_dir=tmp_path,
                             use_umap=False)
    assert out["method"] == PROCRUSTES and len(out["img_rows"]) == 10 and len(out["txt_rows"]) == 10
    assert np.allclose(out["base"], out["adapted"])  # the same embeddings give the same map
    moved = aligned_projection((img, cap), (img, cap + 0.3 * torch.randn(20, 8, generator=g)), max_points=10,
                               cache_dir=tmp_path, use_umap=False)
    assert moved["img_rows"] == out["img_rows"] and moved["txt_rows"] == out["txt_rows"]  # same sample
    assert not np.allclose(moved["base"], moved["adapted"])
    monkeypatch.setattr("harma.projection.aligned_2d",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert aligned_projection((img, cap), (img.clone(), cap.clone()), max_points=10, cache_dir=tmp_path,
                              use_umap=False) == out
    assert len(list((tmp_path / "projections").glob("aligned-*.json"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", [SEPARATE, ALIGNED])
def test_umap_maps_of_a_barely_changed_model(method):
    """UMAP proper (numba-compiled on first use, about 20 s). AlignedUMAP keeps items in place when the
    model barely moves the embeddings; each model's own UMAP (the default) keeps the baseline map the
    baseline's UMAP alone, whatever the adapted model, and the adapted map in the baseline's frame (a
    second fit, even started from the baseline layout, may move whole clusters: why the app reports map
    fidelity, not single points' moves)."""
    g = np.random.default_rng(1)
    centres = g.normal(size=(5, 32)) * 3
    base = (centres[np.arange(100) % 5] + g.normal(size=(100, 32))).astype(np.float32)
    xy_b, xy_a, got = aligned_2d(base, base + 0.01 * g.normal(size=base.shape).astype(np.float32), method=method,
                                 n_neighbors=15 if method == ALIGNED else MAP_NEIGHBORS)
    assert got == method and xy_b.shape == xy_a.shape == (100, 2)
    spread = np.linalg.norm(xy_b - xy_b.mean(0), axis=1).mean()
    if method == ALIGNED:
        assert np.linalg.norm(xy_a - xy_b, axis=1).mean() < 0.25 * spread
        return
    assert np.allclose(xy_b, umap_2d(base, 0, MAP_NEIGHBORS))
    assert np.allclose(xy_a.mean(0), xy_b.mean(0), atol=1e-4)  # Procrustes: the same frame
