"""``Retriever``: a model paired with a gallery's image index (and caption index), answering text ->
images and image -> captions queries; what the app calls.

The image index is an :class:`EmbeddingIndex` (vectors in memory) or, for an archive of millions of
images, a prebuilt :class:`~.archive.ArchiveIndex` searched as it lies on disk: the model then encodes
only the queries, and the gallery's files are an :class:`~.identity.IndexImages` (one path per shown row)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import clean_caption
from ..data.images import decode_signature
from ..encode import encode_images, encode_texts, eval_mode, model_device, model_lock
from ..errors import DatasetError, IndexFormatError, QueryError
from .captions import CaptionPool
from .identity import (
    IndexImages,
    cached_index,
    content_fingerprint,
    find_prebuilt,
    model_identity,
    no_index_message,
    paths_fingerprint,
    ship_index,
    shipped_index,
    texts_fingerprint,
)
from .index import EmbeddingIndex

StageProgress = Callable[[str, int, int], None]  # (stage, done, total); stage is "images" or "captions"
PathLike = Union[str, Path]


@dataclass
class RetrieverOptions:
    """How :meth:`Retriever.build` gets its embeddings."""

    checkpoint: Optional[PathLike] = None  # adapter directory the model was loaded from (part of the cache key)
    cache_dir: Optional[PathLike] = None  # folder of cached indexes; None: no caching
    shipped_dir: Optional[PathLike] = None  # read-only embeddings keyed by content (Retriever.ship), tried first
    prebuilt: Sequence[Any] = ()  # indexes from build_image_index (EmbeddingIndex or ArchiveIndex); one by this
    # model over these images is used
    max_encode: Optional[int] = None  # refuse to encode more images than this when no index has them
    batch_size: int = 64  # images per batch (captions: 4x)
    num_workers: int = 0  # image decoding workers
    clean_queries: bool = True  # normalise text queries with clean_caption (30 words), as captions were


@dataclass(frozen=True)
class Hit:
    """One search result: 1-based rank, cosine score, row of the index, its id and metadata."""

    rank: int
    score: float
    index: int
    id: str
    metadata: dict


def shipped_keys(identity: dict, image_paths: Sequence[PathLike], texts: Optional[Sequence[str]]) -> dict:
    """What shipped image and caption embeddings are keyed by: the model identity, the images' bytes
    (:func:`~.identity.content_fingerprint`) and the caption texts."""
    keys = {"images": {"kind": "shipped-images", "model": identity, "content": content_fingerprint(image_paths)}}
    if texts is not None:
        keys["captions"] = {"kind": "shipped-captions", "model": identity, "texts": texts_fingerprint(texts)}
    return keys


def _hits(index: Any, scores: torch.Tensor, rows: torch.Tensor) -> list[Hit]:
    """Hits of one query; an archive index's ids are read for these rows only (it has no metadata), and a
    row of -1 (an approximate index that found fewer than k) is left out."""
    found = [(s, i) for s, i in zip(scores.tolist(), rows.tolist()) if i >= 0]
    if isinstance(index, EmbeddingIndex):
        return [Hit(r + 1, float(s), i, index.ids[i], index.metadata[i]) for r, (s, i) in enumerate(found)]
    ids = index.ids_of([i for _, i in found])
    return [Hit(r + 1, float(s), i, name, {}) for r, ((s, i), name) in enumerate(zip(found, ids))]


class Retriever:
    """A model (with its preprocessing and tokenizer) paired with an image index and, optionally, a
    caption index: text -> images and image -> captions.

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_image``/``encode_text``).
        preprocess: PIL image -> (3, H, W) tensor (the model's evaluation transform).
        tokenizer: list of strings -> (B, L) token ids.
        images: the gallery index: an :class:`EmbeddingIndex` or an archive index (``search`` and ``ids_of``).
        captions: the caption index (e.g. a :class:`CaptionPool`'s texts); ``None`` disables
            :meth:`search_image`.
        clean_queries: normalise text queries with :func:`harma.data.clean_caption` (30 words), as
            the captions were for training and evaluation.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, images: Any,
                 captions: Optional[EmbeddingIndex] = None, *, clean_queries: bool = True) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.images = images
        self.captions = captions
        self.clean_queries = clean_queries
        self.from_cache: dict[str, bool] = {}
        self.identity: Optional[dict] = None  # what the embeddings depend on (model_identity), set by build
        self._pending: list[dict] = []  # text queries waiting for the model (see encode_text)
        self._pending_lock = threading.Lock()

    @classmethod
    def build(cls, model: nn.Module, preprocess: Callable, tokenizer: Callable,
              image_paths: Union[Sequence[PathLike], IndexImages],
              captions: Union[CaptionPool, Sequence[str], None] = None, options: Optional[RetrieverOptions] = None,
              progress: Optional[StageProgress] = None) -> "Retriever":
        """Encode the gallery images and the captions, or load them: from a prebuilt index, the shipped
        embeddings (``options.shipped_dir``), or the cache (``options.cache_dir``), in that order.

        Args:
            image_paths: the gallery's images (index metadata: ``{"path": ...}``), or an archive index's
                :class:`IndexImages`: then only a prebuilt index of those rows by this model is used (an
                archive is never encoded here; no other index raises :class:`IndexFormatError`).
            captions: a :class:`CaptionPool` (metadata: its captions and images) or plain texts;
                ``None``: no image-to-text search.
            options: caching, batching and limits (:class:`RetrieverOptions`).
            progress: ``progress(stage, done, total)`` while encoding.
        """
        opts = options or RetrieverOptions()
        archive = isinstance(image_paths, IndexImages)
        paths = image_paths if archive else [Path(p) for p in image_paths]
        if not len(paths):
            raise DatasetError("the gallery has no images")
        ident = model_identity(model, opts.checkpoint)
        match = find_prebuilt(opts.prebuilt, ident, paths)
        if match is None and archive:
            raise IndexFormatError(no_index_message(len(paths), ident))

        def stage(name: str):
            return None if progress is None else (lambda done, total: progress(name, done, total))

        def build_images() -> EmbeddingIndex:
            if opts.max_encode is not None and len(paths) > opts.max_encode:
                raise IndexFormatError(no_index_message(len(paths), ident))
            emb = encode_images(model, paths, preprocess, batch_size=opts.batch_size, num_workers=opts.num_workers,
                                progress=stage("images"))
            return EmbeddingIndex([str(p) for p in paths], emb.reshape(len(paths), -1), [{"path": str(p)} for p in paths])

        pool = captions if isinstance(captions, CaptionPool) else None
        texts = None if captions is None else list(pool.texts if pool is not None else captions)
        if texts is not None and not texts:
            raise DatasetError("captions were given but the list is empty (pass None for no captions)")
        shipped = shipped_keys(ident, paths, texts) if opts.shipped_dir is not None and not archive else {}
        if match is None and shipped:
            match = shipped_index(opts.shipped_dir, shipped["images"], [str(p) for p in paths],
                                  [{"path": str(p)} for p in paths])
        if match is not None:
            images, hit_i = match, True
        else:
            images, hit_i = cached_index(opts.cache_dir, {"kind": "images", "model": ident,
                                                          "images": paths_fingerprint(paths),
                                                          "decode": decode_signature()}, build_images)
        out_captions, hit_c = None, None
        if texts is not None:
            ids = [str(j) for j in range(len(texts))]
            meta = pool.metadata() if pool is not None else [{"caption": t} for t in texts]

            def build_captions() -> EmbeddingIndex:
                emb = encode_texts(model, texts, tokenizer, batch_size=4 * opts.batch_size, progress=stage("captions"))
                return EmbeddingIndex(ids, emb.reshape(len(texts), -1), meta)

            out_captions = shipped_index(opts.shipped_dir, shipped["captions"], ids, meta) if shipped else None
            hit_c = out_captions is not None
            if out_captions is None:
                out_captions, hit_c = cached_index(opts.cache_dir, {"kind": "captions", "model": ident,
                                                                    "texts": texts_fingerprint(texts)}, build_captions)
        retriever = cls(model, preprocess, tokenizer, images, out_captions, clean_queries=opts.clean_queries)
        retriever.from_cache = {"images": hit_i} if hit_c is None else {"images": hit_i, "captions": hit_c}
        retriever.identity = ident
        return retriever

    def ship(self, folder: PathLike, image_paths: Sequence[PathLike],
             texts: Optional[Sequence[str]] = None) -> list[Path]:
        """Save this retriever's embeddings under ``folder``, keyed by content (:func:`shipped_keys`), for
        :attr:`RetrieverOptions.shipped_dir`: ``image_paths`` and ``texts`` are what it was built on."""
        if len(image_paths) != len(self.images) or (texts is not None and (
                self.captions is None or len(texts) != len(self.captions))):
            raise DatasetError("ship() needs the image paths and caption texts this retriever was built on")
        keys = shipped_keys(self.identity or model_identity(self.model), image_paths, texts)
        written = [ship_index(folder, keys["images"], self.images)]
        if texts is not None:
            written.append(ship_index(folder, keys["captions"], self.captions))
        return written

    # -- encoding one query ----------------------------------------------------------------------
    # Queries may come from many threads at once (a web app). Hugging Face fast tokenizers refuse
    # concurrent use ("Already borrowed") and a module's forward is not meant to run twice at once:
    # each model and each tokenizer has its own lock (``model_lock``; retrievers sharing a model share
    # it), and text queries that arrive while the model is busy are encoded together in one forward
    # pass (the first waiting thread encodes for all of them). Two different models (the app's
    # baseline and adapted) encode at the same time.
    def encode_text(self, query: str) -> torch.Tensor:
        """(D,) normalised embedding of one text query (thread-safe; concurrent queries are batched)."""
        text = clean_caption(query, 30) if self.clean_queries else query.strip()
        if not text:
            raise QueryError("the query is empty (after removing punctuation)")
        request = {"text": text}
        with self._pending_lock:
            self._pending.append(request)
        with model_lock(self.model), model_lock(self.tokenizer):
            if "embedding" not in request:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                embs = encode_texts(self.model, [r["text"] for r in batch], self.tokenizer)
                for r, e in zip(batch, embs):
                    r["embedding"] = e
        return request["embedding"]

    def encode_image(self, image: Any) -> torch.Tensor:
        """(D,) normalised embedding of one RGB PIL image (thread-safe)."""
        pixels = self.preprocess(image.convert("RGB"))[None].to(model_device(self.model, None))
        with model_lock(self.model), eval_mode(self.model), torch.inference_mode():
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
            raise QueryError(f"gallery image {index} is out of range 0..{len(self.images) - 1}")
        if not isinstance(self.images, EmbeddingIndex):
            raise QueryError("an archive index keeps no vectors in memory to rank captions for one of its images")
        return self._rank_captions(self.images.embeddings[index], k)

    def _rank_captions(self, emb: torch.Tensor, k: int) -> list[Hit]:
        if self.captions is None or len(self.captions) == 0:
            raise QueryError("this gallery has no captions to rank")
        return _hits(self.captions, *self.captions.search(emb, k))
