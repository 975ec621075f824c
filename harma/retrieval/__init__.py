"""Retrieval over a gallery: exact and approximate search, cached embeddings, the ``Retriever``.

- :mod:`.index`: :class:`EmbeddingIndex` (normalised vectors + metadata, exact cosine search, save/load)
- :mod:`.ann`: the faiss index used above :data:`~.index.ANN_THRESHOLD` rows
- :mod:`.identity`: what cached embeddings depend on, and the cache keyed by it
- :mod:`.captions`: :class:`CaptionPool`, the distinct captions image-to-text search ranks
- :mod:`.retriever`: :class:`Retriever` (text -> images, image -> captions), what the app calls
- :mod:`.folder`: :func:`build_image_index`, a resumable index of an image folder of any size
- :mod:`.plan`: :func:`plan_index`, which index a collection gets from its size and a memory budget
- :mod:`.archive`, :mod:`.archive_build`: the on-disk, memory-mapped archive index (format 2) for
  millions of rows, :func:`build_archive`, and :func:`load_index` for either format
"""

from __future__ import annotations

from .ann import ANNConfig, ANNIndex
from .archive import ArchiveIndex, load_index
from .archive_build import build_archive
from .captions import CaptionPool
from .folder import build_image_index, effective_shard_size, list_images
from .identity import (
    cache_key,
    cached_index,
    content_fingerprint,
    find_prebuilt,
    model_identity,
    paths_fingerprint,
    texts_fingerprint,
)
from .index import ANN_THRESHOLD, EmbeddingIndex, exact_topk
from .plan import EXACT_BELOW, IndexPlan, plan_index
from .retriever import Hit, Retriever, RetrieverOptions

__all__ = [
    "ANNConfig", "ANNIndex", "ANN_THRESHOLD", "ArchiveIndex", "CaptionPool", "EXACT_BELOW", "EmbeddingIndex", "Hit",
    "IndexPlan", "Retriever", "RetrieverOptions", "build_archive", "build_image_index", "cache_key", "cached_index",
    "content_fingerprint", "effective_shard_size", "exact_topk", "find_prebuilt", "list_images", "load_index",
    "model_identity", "paths_fingerprint", "plan_index", "texts_fingerprint",
]
