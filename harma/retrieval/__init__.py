"""Retrieval over a gallery: exact and approximate search, cached embeddings, the ``Retriever``.

- :mod:`.index`: :class:`EmbeddingIndex` (normalised vectors + metadata, exact cosine search, save/load)
- :mod:`.ann`: the faiss index used above :data:`~.index.ANN_THRESHOLD` rows
- :mod:`.identity`: what cached embeddings depend on, and the cache keyed by it
- :mod:`.captions`: :class:`CaptionPool`, the distinct captions image-to-text search ranks
- :mod:`.retriever`: :class:`Retriever` (text -> images, image -> captions), what the app calls
- :mod:`.folder`: :func:`build_image_index`, a resumable index of an image folder of any size
"""

from __future__ import annotations

from .ann import ANNConfig, ANNIndex
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
from .retriever import Hit, Retriever, RetrieverOptions

__all__ = [
    "ANNConfig", "ANNIndex", "ANN_THRESHOLD", "CaptionPool", "EmbeddingIndex", "Hit", "Retriever",
    "RetrieverOptions", "build_image_index", "cache_key", "cached_index", "content_fingerprint", "effective_shard_size",
    "exact_topk", "find_prebuilt", "list_images", "model_identity", "paths_fingerprint", "texts_fingerprint",
]
