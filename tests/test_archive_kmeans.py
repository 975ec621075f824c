"""The two-level k-means behind large archive indexes, on skewed collections (a few large scenes, many rare)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from harma.errors import ConfigError
from harma.retrieval.archive_build import TWO_LEVEL_FROM, _centroids, split_lists


def test_split_lists_is_proportional_within_bounds_and_exact():
    sizes = np.array([1000, 5, 1, 300, 2, 0])
    alloc = split_lists(sizes, 64)
    assert alloc.sum() == 64
    assert (alloc[sizes > 0] >= 1).all() and (alloc <= sizes).all() and alloc[-1] == 0
    assert alloc[0] > alloc[3] > alloc[1]  # larger clusters get more lists
    assert split_lists(np.array([3, 3, 3]), 9).tolist() == [3, 3, 3]  # every point its own centroid
    with pytest.raises(ConfigError):
        split_lists(np.array([2, 2]), 5)  # more lists than points


@pytest.fixture
def one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # 32 small k-means: threads only wait for each other on a shared CPU
    yield
    faiss.omp_set_num_threads(threads)


def test_two_level_centroids_of_a_skewed_sample(one_thread):
    """Twenty large scenes and fifty rare, isolated images: faiss.contrib's rebalancing gives a small
    first-level cluster 0 centroids and its k-means then fails (checked with faiss 1.x); here every
    cluster gets at least one and there are exactly nlist of them."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((20, 16)).astype(np.float32)[rng.integers(0, 20, 5_950)]
    big += 0.05 * rng.standard_normal(big.shape).astype(np.float32)
    x = np.concatenate([big, rng.standard_normal((50, 16)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = _centroids(x, TWO_LEVEL_FROM, seed=0)
    assert c.shape == (TWO_LEVEL_FROM, 16) and np.isfinite(c).all()
    assert len(np.unique(c.round(5), axis=0)) == TWO_LEVEL_FROM  # no centroid twice
