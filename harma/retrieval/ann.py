"""Approximate nearest-neighbour search with faiss, for galleries too large for one exact matmul.

Exact search reads every vector per query: 10^6 x 512 float32 is 2 GB of memory traffic, about
0.1-0.3 s on a 2-core CPU. An inverted file (IVF, Jégou et al. 2011) clusters the vectors with
k-means and scans only the ``nprobe`` clusters nearest the query; HNSW (Malkov & Yashunin 2018) walks
a proximity graph instead (better recall per probe, slower to build). Both come from faiss
(``faiss-cpu``), imported lazily so the library imports without it. Inner product on L2-normalised
vectors is cosine similarity, as in :class:`harma.retrieval.EmbeddingIndex`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import ConfigError
from ..io import atomic_write_bytes

KINDS = ("ivf", "hnsw")


@dataclass
class ANNConfig:
    """How an approximate index is built and searched.

    Attributes:
        kind: ``ivf`` (k-means inverted file, flat vectors) or ``hnsw`` (graph, flat vectors).
        nlist: IVF clusters; ``None`` = :func:`default_nlist` (4,096 for 10^6 vectors).
        nprobe: IVF clusters scanned per query (more = higher recall, slower).
        train_size: vectors sampled (seeded) to train the IVF k-means (at least 39 per cluster).
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width.
        seed: sampling and k-means seed.
    """

    kind: str = "ivf"
    nlist: Optional[int] = None
    nprobe: int = 24
    train_size: int = 65_536
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ann kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("nprobe", "train_size", "hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ann {name} must be >= 1, got {getattr(self, name)!r}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"ann nlist must be >= 1, got {self.nlist!r}")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise ImportError("approximate search needs faiss: pip install faiss-cpu") from None
    return faiss


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) clusters (the low end of faiss's 4-16 sqrt(n) guideline), a power of two, at
    least 1 and at most n / 39 (k-means wants ~39 training points per centroid): 4,096 for 10^6."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(target, n // 39)))


def _as_float32(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class ANNIndex:
    """A faiss index over L2-normalised rows; ``search`` returns ``(scores, indices)`` like exact search.

    Args:
        embeddings: (N, D) L2-normalised vectors (not copied when already float32 and contiguous).
        config: :class:`ANNConfig`.
    """

    def __init__(self, embeddings: Union[torch.Tensor, np.ndarray], config: Optional[ANNConfig] = None,
                 _index: Any = None) -> None:
        self.config = config or ANNConfig()
        faiss = _faiss()
        if _index is not None:
            self.index = _index
        else:
            x = _as_float32(embeddings)
            n, d = x.shape
            if n == 0:
                raise ValueError("cannot build an approximate index over 0 vectors")
            cfg = self.config
            if cfg.kind == "ivf":
                nlist = min(cfg.nlist or default_nlist(n), n)
                quantizer = faiss.IndexFlatIP(d)
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(cfg.seed)
                m = max(cfg.train_size, 39 * nlist)  # enough points for every centroid
                sample = x if n <= m else x[np.sort(rng.choice(n, m, replace=False))]
                index.cp.seed = cfg.seed
                index.train(sample)
                index.add(x)
            else:
                index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = cfg.ef_construction
                index.add(x)
            self.index = index
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(self.index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = min(self.config.nprobe, ivf.nlist)
        elif hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = self.config.ef_search

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def memory_bytes(self) -> int:
        """Memory of the index: stored vectors plus ids and centroids (IVF) or graph links (HNSW)."""
        n, d = int(self.index.ntotal), int(self.index.d)
        if hasattr(self.index, "hnsw"):
            return n * (4 * d + 4 * 2 * self.config.hnsw_m + 8)  # level-0 links dominate the graph
        nlist = int(getattr(self.index, "nlist", 0))
        return n * (4 * d + 8) + nlist * 4 * d

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) normalised queries -> ``(scores, indices)``, each (Q, k), best first.

        Fewer than ``k`` neighbours found (tiny probes) are dropped from the right; faiss marks
        them with index -1.
        """
        q = _as_float32(query)
        k = max(0, min(int(k), len(self)))
        if k == 0:
            return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
        scores, rows = self.index.search(q, k)
        keep = int((rows >= 0).all(axis=0).sum()) if (rows < 0).any() else k
        return torch.from_numpy(scores[:, :keep]).float(), torch.from_numpy(rows[:, :keep]).long()

    def save(self, path: Union[str, Path]) -> None:
        """Write the faiss index atomically."""
        atomic_write_bytes(Path(path), _faiss().serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: Union[str, Path], config: Optional[ANNConfig] = None) -> "ANNIndex":
        faiss = _faiss()
        blob = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        return cls(None, config, _index=faiss.deserialize_index(blob))


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k also returns.

    Args:
        approx: (Q, k') row indices from approximate search (k' <= k; -1 entries never match).
        exact: (Q, k) row indices from exact search.
    """
    if exact.numel() == 0:
        return 1.0
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return float(sum(hits) / exact.numel())
