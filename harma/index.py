"""Exact cosine search over a gallery, an on-disk embedding cache, and the ``Retriever`` the app calls.

Follows the usual retrieval-demo pattern (ecosystem.md §5.1, clip-retrieval): embed the gallery once,
store L2-normalised float32 vectors with JSON metadata, and rank a query by inner product. Exact
search (one matmul) is fast enough for galleries up to ~10^5 vectors on a CPU. Cached embeddings are
keyed by the backbone, the adapter weights and the image files (path, size, mtime), so a changed
checkpoint or image set is never served stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ann import ANNConfig, ANNIndex
from .checkpoint import WEIGHTS_NAME, atomic_write_bytes
from .data import clean_caption
from .data.images import hash_files
from .encode import _device, _eval_mode, encode_images, encode_texts
from .weights import file_sha256

log = logging.getLogger(__name__)

INDEX_VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.json"
ANN_FILE = "ann.faiss"
BACKENDS = ("auto", "exact", "ann")
# Above this many rows ``backend="auto"`` searches with faiss: exact search reads every vector per
# query (about 10 ms per 10^5 x 512 floats on a 2-core CPU; see benchmarks/).
ANN_THRESHOLD = 100_000
StageProgress = Callable[[str, int, int], None]  # (stage, done, total); stage is "images" or "captions"


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


class IndexFormatError(ValueError):
    """A saved index is missing, malformed or inconsistent."""


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
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
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

    def image_paths(self) -> list[Path]:
        """Image files of an image index: ids resolved against the recorded ``root`` (as written by
        :func:`harma.indexing.build_image_index`), or the ids themselves without one."""
        root = self.extra.get("root")
        return [Path(root) / i for i in self.ids] if root else [Path(i) for i in self.ids]

    @classmethod
    def load(cls, path: Union[str, Path], **kwargs: Any) -> "EmbeddingIndex":
        """Read an index written by :meth:`save`; raises :class:`IndexFormatError` if it is inconsistent.

        ``kwargs`` (``backend``, ``ann``, ``ann_threshold``) are passed to the constructor; a saved
        faiss index is used when its checksum matches the embeddings.
        """
        from safetensors.torch import load

        path = Path(path)
        try:
            meta = json.loads((path / INDEX_FILE).read_text())
            blob = (path / EMBEDDINGS_FILE).read_bytes()
        except (OSError, json.JSONDecodeError) as e:
            raise IndexFormatError(f"{path}: cannot read the index ({type(e).__name__}: {e})") from None
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


# -- cache keys ----------------------------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensors_sha(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_identity(model: nn.Module, checkpoint: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """What the embeddings of ``model`` depend on: backbone identity and adapter weights.

    The backbone is ``model.base_info`` (open_clip name, pretrained tag, base-weights sha256, and a
    hash of the architecture, which fixes the preprocessing). A randomly initialised backbone (no tag,
    no base weights) is identified by a hash of its weights. Adapters are the sha256 of
    ``checkpoint/adapter_model.safetensors``, ``"none"`` for a model with nothing trained, or a hash
    of the trainable tensors for an adapted model that was not loaded from a checkpoint.
    """
    info = dict(getattr(model, "base_info", None) or {})
    ident: dict[str, Any] = {k: info.get(k) for k in ("model_name", "pretrained", "base_weights_sha256")}
    ident["model_cfg_sha256"] = _sha(info.get("model_cfg"))
    config = getattr(model, "config", None)
    ident["method"] = getattr(config, "method", None)
    if not ident["pretrained"] and not ident["base_weights_sha256"]:
        ident["weights_sha256"] = _tensors_sha(sorted(model.state_dict().items()))
    if checkpoint is not None:
        ident["adapters_sha256"] = file_sha256(Path(checkpoint) / WEIGHTS_NAME)
    else:
        trainable = getattr(model, "trainable_state_dict", lambda: {})()
        ident["adapters_sha256"] = "none" if ident["method"] in (None, "zeroshot") or not trainable \
            else "state:" + _tensors_sha(sorted(trainable.items()))
    return ident


def paths_fingerprint(paths: Sequence[Union[str, Path]]) -> str:
    """Hash of the resolved paths, sizes and modification times (no file is read)."""
    return hash_files(hashlib.sha256(b"paths-v1"), paths).hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256(b"texts-v1")
    for t in texts:
        h.update(t.encode() + b"\x00")
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """Folder name of a cache entry: a short hash of ``parts`` (JSON, sorted keys)."""
    return _sha({"index_version": INDEX_VERSION, **parts})[:32]


def cached_index(cache_dir: Optional[Union[str, Path]], parts: dict[str, Any],
                 build: Callable[[], EmbeddingIndex]) -> tuple[EmbeddingIndex, bool]:
    """Load the index cached under ``cache_dir/<cache_key(parts)>``, or build and save it.

    Returns:
        ``(index, hit)``; ``hit`` is True when it came from disk. With ``cache_dir=None`` it is
        always built. An unreadable entry is rebuilt (with a warning).
    """
    if cache_dir is None:
        return build(), False
    path = Path(cache_dir) / cache_key(parts)
    if (path / INDEX_FILE).is_file():
        try:
            return EmbeddingIndex.load(path), True
        except IndexFormatError as e:
            log.warning("rebuilding the embedding cache: %s", e)
    index = build()
    index.save(path, extra={"key": parts})
    return index, False


def find_prebuilt(indexes: Sequence[EmbeddingIndex], identity: dict[str, Any],
                  paths: Sequence[Path]) -> Optional[EmbeddingIndex]:
    """The first of ``indexes`` built by the model ``identity`` describes over exactly ``paths``."""
    want = json.loads(json.dumps(identity, default=str))
    for index in indexes:
        if index.extra.get("model") == want and len(index) == len(paths) and index.image_paths() == list(paths):
            return index
    return None


# -- captions ------------------------------------------------------------------------------------
@dataclass
class CaptionPool:
    """The distinct (cleaned) captions of a split: what image-to-text search ranks.

    ``texts[j]`` is encoded; ``raw[j]`` is its first spelling in the split; ``images[j]`` the images
    it describes; ``caption_to_text[t]`` maps caption ``t`` of the split to its pool entry.
    """

    texts: list[str]
    raw: list[str]
    images: list[list[int]]
    caption_to_text: list[int] = field(default_factory=list)

    @classmethod
    def from_captions(cls, captions: Sequence[str], text_to_image: Sequence[int], max_words: Optional[int] = 30,
                      clean: bool = True) -> "CaptionPool":
        """De-duplicate captions after :func:`harma.data.clean_caption` (as evaluation encodes them)."""
        where: dict[str, int] = {}
        pool = cls([], [], [], [])
        for caption, image in zip(captions, text_to_image):
            text = clean_caption(caption, max_words) if clean else caption
            j = where.setdefault(text, len(pool.texts))
            if j == len(pool.texts):
                pool.texts.append(text)
                pool.raw.append(caption)
                pool.images.append([])
            if image not in pool.images[j]:
                pool.images[j].append(int(image))
            pool.caption_to_text.append(j)
        return pool

    def __len__(self) -> int:
        return len(self.texts)

    def metadata(self) -> list[dict]:
        return [{"caption": r, "images": imgs} for r, imgs in zip(self.raw, self.images)]

    def images_matching(self, query: str) -> set[int]:
        """Images with a ground-truth caption that contains the query as a whole-word phrase.

        Both sides are normalised with :func:`harma.data.clean_caption` (lower case, punctuation
        removed), so an exact match counts too: "An airplane is stopped at the airport ." matches
        the query "airplane is stopped".
        """
        q = clean_caption(query, None)
        if not q:
            return set()
        needle = f" {q} "
        return {i for text, imgs in zip(self.texts, self.images) if needle in f" {text} " for i in imgs}


# -- retriever -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row of the index, its id and metadata."""

    rank: int
    score: float
    index: int
    id: str
    metadata: dict


def _hits(index: EmbeddingIndex, scores: torch.Tensor, rows: torch.Tensor) -> list[Hit]:
    return [Hit(r + 1, float(s), int(i), index.ids[int(i)], index.metadata[int(i)])
            for r, (s, i) in enumerate(zip(scores.tolist(), rows.tolist()))]


class Retriever:
    """A model (with its preprocessing and tokenizer) paired with an image index and, optionally, a
    caption index: text -> images and image -> captions.

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_image``/``encode_text``).
        preprocess: PIL image -> (3, H, W) tensor (the model's evaluation transform).
        tokenizer: list of strings -> (B, L) token ids.
        images: the gallery index.
        captions: the caption index (e.g. a :class:`CaptionPool`'s texts); ``None`` disables
            :meth:`search_image`.
        clean_queries: normalise text queries with :func:`harma.data.clean_caption` (30 words), as
            the captions were for training and evaluation.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, images: EmbeddingIndex,
                 captions: Optional[EmbeddingIndex] = None, *, clean_queries: bool = True) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.images = images
        self.captions = captions
        self.clean_queries = clean_queries
        self.from_cache: dict[str, bool] = {}
        self._pending: list[dict] = []  # text queries waiting for the model (see encode_text)
        self._pending_lock = threading.Lock()

    @classmethod
    def build(cls, model: nn.Module, preprocess: Callable, tokenizer: Callable, image_paths: Sequence[Union[str, Path]],
              captions: Optional[Sequence[str]] = None, *, checkpoint: Optional[Union[str, Path]] = None,
              cache_dir: Optional[Union[str, Path]] = None, progress: Optional[StageProgress] = None,
              image_metadata: Optional[Sequence[dict]] = None, caption_metadata: Optional[Sequence[dict]] = None,
              batch_size: int = 64, num_workers: int = 0, clean_queries: bool = True,
              prebuilt: Sequence[EmbeddingIndex] = (), max_encode: Optional[int] = None) -> "Retriever":
        """Encode (or load from ``cache_dir``) the gallery images and the captions, as given.

        Args:
            checkpoint: the adapter directory ``model`` was loaded from (part of the cache key).
            cache_dir: folder of cached indexes; ``None`` disables caching.
            progress: ``progress(stage, done, total)`` while encoding.
            prebuilt: image indexes written by :func:`harma.indexing.build_image_index`; one built
                by this model over these images is used as is.
            max_encode: refuse (``ValueError``) to encode more images than this when neither a
                prebuilt index nor the cache has them.
        """
        paths = [Path(p) for p in image_paths]
        if not paths:
            raise ValueError("the gallery has no images")
        ident = model_identity(model, checkpoint)
        meta = image_metadata if image_metadata is not None else [{"path": str(p)} for p in paths]
        match = find_prebuilt(prebuilt, ident, paths)

        def stage(name: str):
            return None if progress is None else (lambda done, total: progress(name, done, total))

        def build_images() -> EmbeddingIndex:
            if max_encode is not None and len(paths) > max_encode:
                raise ValueError(f"no index of these {len(paths):,} images was built with this model "
                                 f"({'no adapters' if ident['adapters_sha256'] == 'none' else 'adapters'}); "
                                 "build one with python -m training.build_index"
                                 + (" --baseline" if ident["adapters_sha256"] == "none" else ""))
            emb = encode_images(model, paths, preprocess, batch_size=batch_size, num_workers=num_workers,
                                progress=stage("images"))
            return EmbeddingIndex([str(p) for p in paths], emb.reshape(len(paths), -1), meta)

        if match is not None:
            images, hit_i = match, True
        else:
            images, hit_i = cached_index(cache_dir, {"kind": "images", "model": ident,
                                                     "images": paths_fingerprint(paths)}, build_images)
        out_captions, hit_c = None, None
        if captions is not None:
            texts = list(captions)
            if not texts:
                raise ValueError("captions were given but the list is empty (pass None for no captions)")

            def build_captions() -> EmbeddingIndex:
                emb = encode_texts(model, texts, tokenizer, batch_size=4 * batch_size, progress=stage("captions"))
                meta_c = caption_metadata if caption_metadata is not None else [{"caption": t} for t in texts]
                return EmbeddingIndex([str(j) for j in range(len(texts))], emb.reshape(len(texts), -1), meta_c)

            out_captions, hit_c = cached_index(cache_dir, {"kind": "captions", "model": ident,
                                                           "texts": texts_fingerprint(texts)}, build_captions)
        retriever = cls(model, preprocess, tokenizer, images, out_captions, clean_queries=clean_queries)
        retriever.from_cache = {"images": hit_i} if hit_c is None else {"images": hit_i, "captions": hit_c}
        return retriever

    # -- encoding one query ----------------------------------------------------------------------
    # Queries may come from many threads at once (a web app). Hugging Face fast tokenizers refuse
    # concurrent use ("Already borrowed"), two retrievers often share one tokenizer and model, and on
    # a CPU parallel forward passes only compete for the same cores: one process-wide lock makes the
    # model calls thread-safe, and text queries that arrive while the model is busy are encoded
    # together in one forward pass (the first waiting thread encodes for all of them).
    _model_lock = threading.Lock()

    def encode_text(self, query: str) -> torch.Tensor:
        """(D,) normalised embedding of one text query (thread-safe; concurrent queries are batched)."""
        text = clean_caption(query, 30) if self.clean_queries else query.strip()
        if not text:
            raise ValueError("the query is empty (after removing punctuation)")
        request = {"text": text}
        with self._pending_lock:
            self._pending.append(request)
        with Retriever._model_lock:
            if "embedding" not in request:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                embs = encode_texts(self.model, [r["text"] for r in batch], self.tokenizer)
                for r, e in zip(batch, embs):
                    r["embedding"] = e
        return request["embedding"]

    def encode_image(self, image: Any) -> torch.Tensor:
        """(D,) normalised embedding of one RGB PIL image (thread-safe)."""
        pixels = self.preprocess(image.convert("RGB"))[None].to(_device(self.model, None))
        with Retriever._model_lock, _eval_mode(self.model), torch.inference_mode():
            emb = self.model.encode_image(pixels, normalize=True)
        return F.normalize(emb.float(), dim=-1)[0].cpu()

    # -- search ----------------------------------------------------------------------------------
    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """Gallery images ranked by cosine similarity to the text ``query``."""
        return _hits(self.images, *self.images.search(self.encode_text(query), k))

    def search_image(self, image: Any, k: int = 10) -> list[Hit]:
        """Captions ranked by cosine similarity to a PIL ``image``."""
        return self._rank_captions(self.encode_image(image), k)

    def search_gallery_image(self, index: int, k: int = 10) -> list[Hit]:
        """Captions ranked for gallery image ``index``, from its stored embedding (no re-encoding)."""
        if not 0 <= index < len(self.images):
            raise ValueError(f"gallery image {index} is out of range 0..{len(self.images) - 1}")
        return self._rank_captions(self.images.embeddings[index], k)

    def _rank_captions(self, emb: torch.Tensor, k: int) -> list[Hit]:
        if self.captions is None or len(self.captions) == 0:
            raise ValueError("this gallery has no captions to rank")
        return _hits(self.captions, *self.captions.search(emb, k))
