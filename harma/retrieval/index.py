"""Exact cosine search over a gallery and its on-disk form (:class:`EmbeddingIndex`).

Follows the usual retrieval-demo pattern (clip-retrieval): embed the gallery once, store
L2-normalised float32 vectors with JSON metadata, and rank a query by inner product. Exact search
(one matmul) is fast enough for galleries up to ~10^5 vectors on a CPU; above that a faiss index
(:mod:`harma.retrieval.ann`) is built and saved beside the vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.readers import LINKS_HINT, follow_links_setting, name_outside, outside_root
from ..errors import ConfigError, IndexFormatError
from ..io import INDEX_FILE, atomic_write_bytes, parse_json
from .ann import ANNConfig, ANNIndex

log = logging.getLogger(__name__)

INDEX_VERSION = 1
ARCHIVE_FORMAT = 2  # harma.retrieval.archive's on-disk index, which this class does not read
EMBEDDINGS_FILE = "embeddings.safetensors"
ANN_FILE = "ann.faiss"
BACKENDS = ("auto", "exact", "ann")
# Above this many rows ``backend="auto"`` searches with faiss: exact search reads every vector per
# query (about 10 ms per 10^5 x 512 floats on a 2-core CPU; see benchmarks/).
ANN_THRESHOLD = 100_000


def exact_topk(query: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of (Q, D) queries against (N, D) rows, best first.

    ``torch.topk`` (not a full sort) picks the candidates; among equal scores the lower row index
    comes first, including ties at the k-th place, so the result equals a stable full sort.
    """
    scores = query @ rows.T  # (Q, N)
    if k == 0:
        return scores[:, :0], torch.empty(scores.shape[0], 0, dtype=torch.long)
    kth = scores.topk(k, dim=1).values[:, -1:]  # (Q, 1)
    top = torch.empty(scores.shape[0], k)
    order = torch.empty(scores.shape[0], k, dtype=torch.long)
    for r in range(scores.shape[0]):
        cand = (scores[r] >= kth[r]).nonzero().squeeze(1)  # ascending row index; k or more (ties)
        s = scores[r, cand]
        pick = torch.sort(s, descending=True, stable=True).indices[:k]
        top[r], order[r] = s[pick], cand[pick]
    return top, order


class EmbeddingIndex:
    """L2-normalised embeddings with an id and a metadata dict per row; exact cosine search.

    Args:
        ids: one string per row (e.g. an image path).
        embeddings: (N, D) tensor; rows are L2-normalised here and stored as float32 on the CPU.
        metadata: optional JSON-serialisable dict per row (path, caption, image indices, ...).
        normalize: L2-normalise the rows; ``False`` keeps them bit for bit (already normalised).
    """

    def __init__(self, ids: Sequence[Any], embeddings: torch.Tensor, metadata: Optional[Sequence[dict]] = None,
                 normalize: bool = True, *, backend: str = "auto", ann: Optional[ANNConfig] = None,
                 ann_threshold: int = ANN_THRESHOLD) -> None:
        emb = torch.as_tensor(embeddings).detach()
        if emb.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embeddings")
        metadata = [{} for _ in ids] if metadata is None else [dict(m) for m in metadata]
        if len(metadata) != len(ids):
            raise ValueError(f"{len(metadata)} metadata entries for {len(ids)} ids")
        emb = emb.float().cpu()
        if not torch.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.ids = [str(i) for i in ids]
        self.embeddings = (F.normalize(emb, dim=-1) if normalize else emb).contiguous()  # (N, D)
        self.metadata = metadata
        self.backend = backend
        self.ann_config = ann or ANNConfig()
        self.ann_threshold = int(ann_threshold)
        self._ann: Optional[ANNIndex] = None
        self._ann_file: Optional[Path] = None  # a saved faiss index, read on first use
        self.extra: dict = {}  # what ``save(extra=...)`` recorded (model identity, image root, ...)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def uses_ann(self) -> bool:
        """Whether :meth:`search` goes through faiss: ``backend="ann"``, or ``"auto"`` at or above
        ``ann_threshold`` rows."""
        return self.backend == "ann" or (self.backend == "auto" and len(self) >= self.ann_threshold)

    def build_ann(self) -> ANNIndex:
        """The faiss index over the rows (built, or read from the saved file, once)."""
        if self._ann is None:
            if self._ann_file is not None and self._ann_file.is_file():
                self._ann = ANNIndex.load(self._ann_file, self.ann_config)
            else:
                self._ann = ANNIndex(self.embeddings.numpy(), self.ann_config)
        return self._ann

    def search(self, query: torch.Tensor, k: int = 10, exact: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` rows with the highest cosine similarity to each query.

        Args:
            query: (D,) or (Q, D); normalised here, so raw encoder outputs may be passed.
            k: results per query, capped at the index size.
            exact: force exact (True) or approximate (False) search; default: :attr:`uses_ann`.

        Returns:
            ``(scores, indices)``, each (k,) for a (D,) query or (Q, k) for a batch, best first.
            Exact search keeps index order among equal scores (as :mod:`harma.metrics` breaks ties).
        """
        q = torch.as_tensor(query).detach().float().cpu()
        single = q.dim() == 1
        q = q[None] if single else q
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query must be ({self.dim},) or (Q, {self.dim}), got shape {tuple(q.shape)}")
        k = max(0, min(int(k), len(self)))
        q = F.normalize(q, dim=-1)
        use_ann = self.uses_ann if exact is None else not exact
        top, order = self.build_ann().search(q, k) if use_ann and k else exact_topk(q, self.embeddings, k)
        return (top[0], order[0]) if single else (top, order)

    def save(self, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
        """Write ``path/embeddings.safetensors``, the faiss index if one was built (``ann.faiss``),
        then ``path/index.json`` (ids, metadata, checksums), each atomically."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        blob = save({"embeddings": self.embeddings})
        sha = hashlib.sha256(blob).hexdigest()
        meta = {"format_version": INDEX_VERSION, "count": len(self), "dim": self.dim,
                "embeddings_sha256": sha, "ids": self.ids, "metadata": self.metadata, "extra": extra or {}}
        atomic_write_bytes(path / EMBEDDINGS_FILE, blob)
        if self._ann is not None:
            self._ann.save(path / ANN_FILE)
            meta["ann"] = {"file": ANN_FILE, "embeddings_sha256": sha, "config": dataclasses.asdict(self.ann_config)}
        atomic_write_bytes(path / INDEX_FILE, json.dumps(meta, default=str).encode())
        self.extra = json.loads(json.dumps(extra or {}, default=str))
        return path

    def image_paths(self, follow_links: Optional[bool] = None) -> list[Path]:
        """Image files of an image index: ids resolved against the recorded ``root`` (as written by
        :func:`harma.retrieval.build_image_index`), or the ids themselves without one.

        Args:
            follow_links: accept ids that resolve outside the root (``../`` or absolute ids, symlinks to
                elsewhere) and an index that records no root; default ``$HARMA_FOLLOW_LINKS``, else
                False: such an index raises :class:`IndexFormatError` (an index names files inside its
                image folder only, docs/security.md).
        """
        root = self.extra.get("root")
        paths = [Path(root) / i for i in self.ids] if root else [Path(i) for i in self.ids]
        if follow_links_setting(follow_links):
            return paths
        if not root:
            raise IndexFormatError(f"this image index records no image root, so nothing keeps its {len(paths)} "
                                   "image paths inside one folder; rebuild it with python -m training.build_index "
                                   f"(which records one). {LINKS_HINT}")
        bad = outside_root(paths, root)
        if bad:
            raise IndexFormatError(f"{len(bad)} of {len(paths)} images in {INDEX_FILE} resolve outside the index's "
                                   f"image root {root} (a ../ or absolute id, or a symlink); first: "
                                   f"{name_outside(self.ids, paths, bad)}. {LINKS_HINT}")
        return paths

    @classmethod
    def load(cls, path: Union[str, Path], **kwargs: Any) -> "EmbeddingIndex":
        """Read an index written by :meth:`save`; raises :class:`IndexFormatError` if it is inconsistent.

        ``kwargs`` (``backend``, ``ann``, ``ann_threshold``) are passed to the constructor; a saved
        faiss index is used when its checksum matches the embeddings.
        """
        from safetensors.torch import load

        path = Path(path)
        try:
            text = (path / INDEX_FILE).read_bytes()
            meta = parse_json(text, IndexFormatError, path / INDEX_FILE)
            if isinstance(meta, dict) and meta.get("format_version") == ARCHIVE_FORMAT:
                raise IndexFormatError(f"{path}: an archive index (format {ARCHIVE_FORMAT}, memory-mapped); open it "
                                       "with harma.retrieval.load_index (or ArchiveIndex.load)")
            blob = (path / EMBEDDINGS_FILE).read_bytes()
        except OSError as e:
            raise IndexFormatError(f"{path}: cannot read the index ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise IndexFormatError(f"{path / INDEX_FILE}: expected a JSON object")
        if meta.get("format_version") != INDEX_VERSION:
            raise IndexFormatError(f"{path}: index format {meta.get('format_version')!r}, expected {INDEX_VERSION}")
        if hashlib.sha256(blob).hexdigest() != meta.get("embeddings_sha256"):
            raise IndexFormatError(f"{path}: {EMBEDDINGS_FILE} does not match {INDEX_FILE} (interrupted write?)")
        emb = load(blob)["embeddings"]
        if tuple(emb.shape) != (meta["count"], meta["dim"]):
            raise IndexFormatError(f"{path}: embeddings have shape {tuple(emb.shape)}, "
                                   f"index says {(meta['count'], meta['dim'])}")
        index = cls(meta["ids"], emb, meta["metadata"], normalize=False, **kwargs)
        index.extra = meta.get("extra") or {}
        ann = meta.get("ann")
        if ann and ann.get("embeddings_sha256") == meta["embeddings_sha256"] and (path / ANN_FILE).is_file():
            index._ann_file = path / ANN_FILE  # read lazily: exact-only users never pay for it
            if "ann" not in kwargs:
                index.ann_config = ANNConfig(**ann.get("config", {}))
        return index
