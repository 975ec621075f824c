"""The archive index ("format 2"): millions of vectors searched from disk, memory-mapped.

The layout of LAION-5B's index (autofaiss, then clip-retrieval): a faiss IVF index whose inverted
lists live in one file on disk (``faiss.contrib.ondisk``) and are memory-mapped when loaded, so a
served index costs the pages the queries touch, not the collection's size. A folder holds

- ``index.json``: format 2, count, dim, the :class:`~harma.retrieval.plan.IndexPlan`, the search
  parameters (``nprobe``, ``rerank``) with the recall@10 measured for them at build time, file sizes,
  and ``extra`` (model identity, image root, ...);
- ``ivf.faiss`` + ``lists.ivfdata``: the IVF index and its lists (found next to it, so the folder can
  be moved);
- ``sq8.faiss`` + ``refine.sq8`` (``ivf_pq`` only): an 8-bit scalar quantiser and every row's code in
  row order; the candidates of the PQ search are re-ranked by their decoded vectors;
- ``ids.bin`` + ``ids.offsets``: the row ids (:mod:`.archive_store`).

:func:`harma.retrieval.build_archive` writes one; :func:`load_index` opens either format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data.readers import LINKS_HINT, follow_links_setting, name_outside, outside_root
from ..errors import ConfigError, IndexFormatError
from ..io import INDEX_FILE, atomic_write_json, read_json
from .ann import _faiss
from .archive_store import REFINE_FILE, IdStore, RefineCodes, SQ8Decoder
from .index import ARCHIVE_FORMAT, INDEX_VERSION, EmbeddingIndex
from .plan import HNSW_M, IndexPlan

ARCHIVE_VERSION = ARCHIVE_FORMAT  # 2
IVF_FILE = "ivf.faiss"
LISTS_FILE = "lists.ivfdata"
SQ_FILE = "sq8.faiss"


def read_meta(path: Path) -> dict:
    """``path/index.json`` as a dict (:class:`IndexFormatError` naming the file otherwise)."""
    meta = read_json(path / INDEX_FILE, IndexFormatError)
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{path / INDEX_FILE}: expected a JSON object")
    return meta


def _read_faiss(path: Path, flags: int = 0) -> Any:
    faiss = _faiss()
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing (part of the archive index in {path.parent})")
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise IndexFormatError(f"{path}: not a readable faiss index ({first})") from None


class ArchiveIndex:
    """A format-2 index, memory-mapped; search returns ``(scores, rows)`` like
    :meth:`EmbeddingIndex.search`. Open with :meth:`load` (or :func:`load_index`).

    Attributes:
        dim: vector dimension. plan: how it was built. extra: what the builder recorded.
        nprobe, rerank: search parameters (settable; :meth:`save_search_params` stores them).
        search_info: the ``search`` section of ``index.json`` (measured recall@10 at build time).
    """

    def __init__(self, path: Path, meta: dict, index: Any, ids: IdStore, sq: Any = None,
                 refine: Optional[RefineCodes] = None) -> None:
        self.path, self.meta = path, meta
        self.count, self.dim = int(meta["count"]), int(meta["dim"])
        self.plan = IndexPlan.from_dict(meta["plan"])
        self.extra: dict = meta.get("extra") or {}
        self.search_info: dict = dict(meta.get("search") or {})
        self._index, self._ids, self._refine = index, ids, refine
        self._decode = SQ8Decoder(sq) if sq is not None else None
        self._ivf = _faiss().extract_index_ivf(index)
        self._nprobe = self._rerank = 0
        self.nprobe = int(self.search_info.get("nprobe") or self.plan.nprobe or 1)
        self.rerank = int(self.search_info.get("rerank") or self.plan.rerank or 0)

    @classmethod
    def load(cls, path: Union[str, Path], *, nprobe: Optional[int] = None,
             rerank: Optional[int] = None) -> "ArchiveIndex":
        """Open the index in folder ``path``: lists and ids memory-mapped, nothing read in full.
        Missing, truncated or foreign files raise :class:`IndexFormatError` naming the file."""
        faiss = _faiss()
        path = Path(path)
        meta = read_meta(path)
        if meta.get("format_version") != ARCHIVE_VERSION:
            raise IndexFormatError(f"{path / INDEX_FILE}: index format {meta.get('format_version')!r}, expected "
                                   f"{ARCHIVE_VERSION} (an archive index); open any index with "
                                   "harma.retrieval.load_index")
        try:
            count, dim = int(meta["count"]), int(meta["dim"])
            IndexPlan.from_dict(meta["plan"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{path / INDEX_FILE}: malformed count, dim or plan ({e})") from None
        sizes = meta.get("files") or {}
        if not isinstance(sizes, dict):
            raise IndexFormatError(f"{path / INDEX_FILE}: 'files' must be an object of file sizes")
        for name, size in sizes.items():
            f = path / name
            if not f.is_file():
                raise IndexFormatError(f"{f}: missing (part of the archive index in {path})")
            if f.stat().st_size != size:
                raise IndexFormatError(f"{f}: {f.stat().st_size} bytes, {INDEX_FILE} says {size} "
                                       "(truncated, or from another build)")
        if not (path / LISTS_FILE).is_file():
            raise IndexFormatError(f"{path / LISTS_FILE}: missing (the inverted lists of the archive index)")
        # OnDiskInvertedLists maps lists.ivfdata itself (read-only), found next to ivf.faiss (SAME_DIR);
        # faiss.IO_FLAG_MMAP is not added: it skips the lists' data, and searching then crashes (faiss 1.15.1)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        index = _read_faiss(path / IVF_FILE, flags)
        if int(index.ntotal) != count or int(index.d) != dim:
            raise IndexFormatError(f"{path / IVF_FILE}: {index.ntotal:,} vectors of dimension {index.d}, "
                                   f"{INDEX_FILE} says {count:,} of {dim}")
        sq = refine = None
        if meta["plan"].get("refine") == "sq8":
            sq = _read_faiss(path / SQ_FILE)
            if int(sq.d) != dim:
                raise IndexFormatError(f"{path / SQ_FILE}: dimension {sq.d}, {INDEX_FILE} says {dim}")
            refine = RefineCodes(path / REFINE_FILE, count, int(sq.sa_code_size()))
        out = cls(path, meta, index, IdStore(path, count), sq, refine)
        if nprobe is not None:
            out.nprobe = nprobe
        if rerank is not None:
            out.rerank = rerank
        return out

    def __len__(self) -> int:
        return self.count

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ConfigError(f"nprobe must be >= 1, got {value}")
        self._nprobe = min(value, int(self._ivf.nlist))
        self._ivf.nprobe = self._nprobe
        quantizer = _faiss().downcast_index(self._ivf.quantizer)
        if hasattr(quantizer, "hnsw"):  # the graph's beam must hold the nprobe lists asked for
            quantizer.hnsw.efSearch = max(2 * HNSW_M, 2 * self._nprobe)

    @property
    def rerank(self) -> int:
        return self._rerank

    @rerank.setter
    def rerank(self, value: int) -> None:
        value = int(value)
        if value < 0:
            raise ConfigError(f"rerank must be >= 0, got {value}")
        self._rerank = value

    def search(self, query: Union[torch.Tensor, np.ndarray], k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` rows most similar to each query (cosine), best first.

        Args:
            query: (D,) or (Q, D); normalised here.
            k: results per query, capped at the index size.

        Returns:
            ``(scores, rows)``, each (k,) or (Q, k); float32 scores, int64 rows. ``ivf_flat`` scores
            are exact inner products; ``ivf_pq`` scores are those of the SQ8-decoded vectors (the
            re-ranking stage; without it, PQ estimates). Fewer than ``k`` found (tiny ``nprobe``)
            are dropped from the right, as in :class:`~harma.retrieval.ANNIndex`.
        """
        q = torch.as_tensor(query).detach().float().cpu()
        single = q.dim() == 1
        q = q[None] if single else q
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query must be ({self.dim},) or (Q, {self.dim}), got shape {tuple(q.shape)}")
        x = np.ascontiguousarray(F.normalize(q, dim=-1).numpy(), dtype=np.float32)
        k = max(0, min(int(k), self.count))
        if k == 0:
            scores, rows = np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
        elif self._refine is not None and self.rerank > 0:
            scores, rows = self._reranked(x, k)
        else:
            scores, rows = self._index.search(x, k)
        keep = int((rows >= 0).all(axis=0).sum()) if (rows < 0).any() else rows.shape[1]
        top = torch.from_numpy(np.ascontiguousarray(scores[:, :keep])).float()
        order = torch.from_numpy(np.ascontiguousarray(rows[:, :keep])).long()
        return (top[0], order[0]) if single else (top, order)

    def _reranked(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ search for ``rerank`` candidates, then exact inner products with their SQ8-decoded vectors."""
        _, cand = self._index.search(x, max(self.rerank, k))
        scores = np.full((len(x), k), -np.inf, np.float32)
        rows = np.full((len(x), k), -1, np.int64)
        for i, c in enumerate(cand):
            c = np.unique(c[c >= 0])  # sorted: the reads go forward through the file
            if not len(c):
                continue
            # einsum, not BLAS: a (1024, 512) matrix-vector product through numpy's BLAS took 8 ms in a
            # process that also runs faiss's and torch's threads, against 0.09 ms here (measured)
            s = np.einsum("ij,j->i", self._decode(self._refine.read(c)), x[i])
            top = np.argsort(-s, kind="stable")[:k]
            scores[i, : len(top)], rows[i, : len(top)] = s[top], c[top]
        return scores, rows

    def id(self, row: int) -> str:
        """The id of ``row`` (e.g. an image path relative to the image root)."""
        return self._ids.get(row)

    def ids_of(self, rows: Sequence[int]) -> list[str]:
        """The ids of ``rows`` (any iterable of ints, a tensor or an array)."""
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self._ids.get(r) for r in rows]

    def image_path(self, row: int, follow_links: Optional[bool] = None) -> Path:
        """The image file of ``row``: its id under the recorded image ``root`` (the id itself without
        one). As :meth:`EmbeddingIndex.image_paths`, but checked for this row only: an id resolving
        outside the root (``../``, absolute, a symlink), or an index without a root, raises
        :class:`IndexFormatError` unless ``follow_links`` (default ``$HARMA_FOLLOW_LINKS``)."""
        root = self.extra.get("root")
        rid = self.id(row)
        path = Path(root) / rid if root else Path(rid)
        if follow_links_setting(follow_links):
            return path
        if not root:
            raise IndexFormatError(f"this image index records no image root, so nothing keeps its {self.count} "
                                   "image paths inside one folder; rebuild it with python -m training.build_index "
                                   f"(which records one). {LINKS_HINT}")
        if outside_root([path], root):
            raise IndexFormatError(f"image {row} of {self.path / INDEX_FILE} resolves outside the index's image "
                                   f"root {root} (a ../ or absolute id, or a symlink): "
                                   f"{name_outside([rid], [path], [0])}. {LINKS_HINT}")
        return path

    def save_search_params(self) -> None:
        """Write the current ``nprobe`` and ``rerank`` into ``index.json`` (atomically). The recall
        measured at build time stays recorded with the parameters it was measured for
        (``search.measured_with``)."""
        meta = read_meta(self.path)
        search = dict(meta.get("search") or {})
        search.update(nprobe=self.nprobe, rerank=self.rerank)
        meta["search"] = search
        atomic_write_json(self.path / INDEX_FILE, meta)
        self.meta, self.search_info = meta, search

    def close(self) -> None:
        """Release the open file of the re-ranking codes (the maps go with the object)."""
        if self._refine is not None:
            self._refine.close()


def load_index(path: Union[str, Path], **kwargs: Any) -> Union[EmbeddingIndex, ArchiveIndex]:
    """Open the index in folder ``path``: an :class:`EmbeddingIndex` (format 1) or an
    :class:`ArchiveIndex` (format 2), by ``index.json``'s ``format_version``; ``kwargs`` go to
    that class's ``load``."""
    path = Path(path)
    version = read_meta(path).get("format_version")
    if version == INDEX_VERSION:
        return EmbeddingIndex.load(path, **kwargs)
    if version == ARCHIVE_VERSION:
        return ArchiveIndex.load(path, **kwargs)
    raise IndexFormatError(f"{path / INDEX_FILE}: index format {version!r}, expected {INDEX_VERSION} or "
                           f"{ARCHIVE_VERSION}")
