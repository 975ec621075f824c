"""Exact top-k and faiss approximate search behind EmbeddingIndex."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harma.retrieval import EmbeddingIndex, exact_topk
from harma.retrieval.ann import ANNConfig, ANNIndex, default_nlist, recall_at_k


def clustered(n: int, d: int = 32, centers: int = 50, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centers, d, generator=g), dim=-1)
    x = c[torch.randint(0, centers, (n,), generator=g)] + noise * torch.randn(n, d, generator=g) / d**0.5
    return F.normalize(x, dim=-1)


def test_exact_topk_equals_a_stable_full_sort_including_boundary_ties():
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 4, (300, 8), generator=g).float()  # many exactly equal scores
    q = torch.randint(0, 4, (7, 8), generator=g).float()
    for k in (1, 5, 37, 300):
        top, order = exact_topk(q, rows, k)
        full = q @ rows.T
        ref = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(order, ref)
        assert torch.equal(top, full.gather(1, ref))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_against_exact_search(kind):
    x, q = clustered(6000), clustered(100, seed=1)
    ann = ANNIndex(x, ANNConfig(kind=kind, nprobe=16))
    approx_scores, approx = ann.search(q, 10)
    _, exact = exact_topk(q, x, 10)
    assert recall_at_k(approx, exact) >= 0.9
    assert torch.allclose(approx_scores, (q @ x.T).gather(1, approx), atol=1e-5)  # true cosines
    assert (approx_scores[:, :-1] >= approx_scores[:, 1:] - 1e-6).all()  # best first


def test_auto_backend_switches_at_the_threshold_and_saved_faiss_index_is_reused(tmp_path):
    x = clustered(3000)
    small = EmbeddingIndex(range(3000), x, ann_threshold=3001)
    big = EmbeddingIndex(range(3000), x, ann_threshold=3000, ann=ANNConfig(nprobe=8))
    assert not small.uses_ann and big.uses_ann
    q = clustered(20, seed=2)
    _, approx = big.search(q, 10)
    _, exact = big.search(q, 10, exact=True)
    assert torch.equal(exact, small.search(q, 10)[1])
    assert recall_at_k(approx, exact) >= 0.85
    big.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "ann.faiss").is_file()
    loaded = EmbeddingIndex.load(tmp_path / "idx", ann_threshold=3000)
    assert loaded.ann_config.nprobe == 8 and loaded._ann_file is not None
    assert torch.equal(loaded.search(q, 10)[1], approx)  # the same faiss index, read back


def test_ann_config_and_backend_errors():
    with pytest.raises(ValueError, match="kind"):
        ANNConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        ANNConfig(nprobe=0)
    with pytest.raises(ValueError, match="backend"):
        EmbeddingIndex(["a"], torch.ones(1, 4), backend="fast")
    assert default_nlist(1_000_000) == 4096 and default_nlist(100_000) == 1024 and default_nlist(10) == 1
