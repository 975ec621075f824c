"""What cached embeddings depend on, and the on-disk caches keyed by it.

Cached embeddings are keyed by the backbone, the adapter weights and the image files (path, size,
mtime) or caption texts, so a changed checkpoint or image set is never served stale. Shipped
embeddings (read-only, e.g. a demo gallery's, committed beside it) are keyed by content instead,
the image bytes, so they stay valid in any checkout or clone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import IndexFormatError
from ..io import INDEX_FILE, WEIGHTS_NAME, file_sha256, hash_files
from .index import INDEX_VERSION, EmbeddingIndex

log = logging.getLogger(__name__)


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


def content_fingerprint(paths: Sequence[Union[str, Path]]) -> str:
    """Hash of the files' bytes, in order (names, places and times ignored): the same images anywhere.
    Reads every file, so it is used only for shipped embeddings, never for the cache of a large gallery."""
    h = hashlib.sha256(b"content-v1")
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256(b"texts-v1")
    for t in texts:
        h.update(t.encode() + b"\x00")
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """Folder name of a cache entry: a short hash of ``parts`` (JSON, sorted keys)."""
    return _sha({"index_version": INDEX_VERSION, **parts})[:32]


_write_failures: dict[str, str] = {}  # cache folder -> why writing there failed (caching off there)
_write_lock = threading.Lock()


def cache_problem(cache_dir: Optional[Union[str, Path]]) -> Optional[str]:
    """Why :func:`cached_index` stopped writing to ``cache_dir`` in this process (None while it writes):
    a front end shows it once, e.g. in a status line."""
    return None if cache_dir is None else _write_failures.get(str(Path(cache_dir).absolute()))


def cached_index(cache_dir: Optional[Union[str, Path]], parts: dict[str, Any],
                 build: Callable[[], EmbeddingIndex]) -> tuple[EmbeddingIndex, bool]:
    """Load the index cached under ``cache_dir/<cache_key(parts)>``, or build and save it.

    Returns:
        ``(index, hit)``; ``hit`` is True when it came from disk. With ``cache_dir=None`` it is
        always built. An unreadable entry is rebuilt (with a warning). When the entry cannot be
        written (a full disk, a read-only folder) the built index is returned all the same, the
        failure is logged once and caching to ``cache_dir`` stays off in this process
        (:func:`cache_problem` says why).
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
    folder = str(Path(cache_dir).absolute())
    if folder not in _write_failures:
        try:
            index.save(path, extra={**index.extra, "key": parts})
        except OSError as e:
            with _write_lock:
                first = folder not in _write_failures
                _write_failures[folder] = (f"embeddings are not cached: cannot write to the cache folder "
                                           f"({e.strerror or type(e).__name__}); they are kept in memory only")
            if first:
                log.warning("%s: %s (%s)", folder, _write_failures[folder], e)
    return index, False


SAMPLED_IDS = 64  # rows whose ids two archive indexes must share to count as indexes of the same images


class IndexImages:
    """The image files of an archive index's rows (:class:`~.archive.ArchiveIndex`), resolved one at a time
    when a row is shown (``index.image_path``: root/id, refused outside the root unless ``follow_links``):
    a gallery of ten million images without a ten-million-item list. ``len`` and ``[i]`` only; iterating
    is refused, so that nothing walks (or stats, or hashes) every file of an archive by accident."""

    def __init__(self, index: Any, follow_links: Optional[bool] = None) -> None:
        self.index = index
        self.follow_links = follow_links

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Path:
        n = len(self.index)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range 0..{n - 1}")
        return self.index.image_path(i % n, follow_links=self.follow_links)

    def __iter__(self) -> Iterator[Path]:
        raise TypeError(f"the {len(self):,} images of an archive index are read one row at a time, not iterated")

    def covers(self, other: Any) -> bool:
        """Whether archive index ``other`` holds the same rows as this one's: the same count, image root and
        ids at :data:`SAMPLED_IDS` evenly spaced rows (a sample, so that comparing two 10M-row indexes reads
        a few pages, not every id)."""
        mine = self.index
        if other is mine:
            return True
        n = len(mine)
        if len(other) != n or other.extra.get("root") != mine.extra.get("root"):
            return False
        rows = sorted({round(j * (n - 1) / max(SAMPLED_IDS - 1, 1)) for j in range(SAMPLED_IDS)})
        return other.ids_of(rows) == mine.ids_of(rows)


def no_index_message(count: int, identity: dict[str, Any]) -> str:
    """What to say when none of the given indexes was built by the model ``identity`` (the app does not
    encode that many images itself)."""
    none = identity.get("adapters_sha256") == "none"
    return (f"no index of these {count:,} images was built with this model ({'no adapters' if none else 'adapters'}); "
            "build one with python -m training.build_index" + (" --baseline" if none else ""))


def find_prebuilt(indexes: Sequence[Any], identity: dict[str, Any],
                  paths: Union[Sequence[Path], IndexImages]) -> Optional[Any]:
    """The first of ``indexes`` built by the model ``identity`` describes over exactly ``paths``: for a
    list of paths, an :class:`EmbeddingIndex` naming those files; for an archive's :class:`IndexImages`, an
    archive index holding the same rows (:meth:`IndexImages.covers`; no path is resolved)."""
    want = json.loads(json.dumps(identity, default=str))
    lazy = isinstance(paths, IndexImages)
    for index in indexes:
        if index.extra.get("model") != want or len(index) != len(paths):
            continue
        if lazy:
            if not isinstance(index, EmbeddingIndex) and paths.covers(index):
                return index
        # a comparison only: the paths were checked (harma.data.readers.outside_root) when the gallery was made
        elif isinstance(index, EmbeddingIndex) and index.image_paths(follow_links=True) == list(paths):
            return index
    return None


def shipped_index(folder: Optional[Union[str, Path]], parts: dict[str, Any], ids: Sequence[str],
                  metadata: Sequence[dict]) -> Optional[EmbeddingIndex]:
    """The embeddings saved by :func:`ship_index` under ``folder/<cache_key(parts)>``, with this
    checkout's ``ids`` and ``metadata``; None when there are none (or they do not fit, with a warning)."""
    if folder is None:
        return None
    path = Path(folder) / cache_key(parts)
    if not (path / INDEX_FILE).is_file():
        return None
    try:
        saved = EmbeddingIndex.load(path)
    except IndexFormatError as e:
        log.warning("ignoring shipped embeddings: %s", e)
        return None
    if len(saved) != len(ids):
        log.warning("ignoring shipped embeddings %s: %d rows for %d items", path, len(saved), len(ids))
        return None
    return EmbeddingIndex(list(ids), saved.embeddings, list(metadata), normalize=False)


def ship_index(folder: Union[str, Path], parts: dict[str, Any], index: EmbeddingIndex) -> Path:
    """Save ``index``'s vectors under ``folder/<cache_key(parts)>`` for :func:`shipped_index`: rows
    numbered, no paths or metadata (they belong to the checkout that reads them)."""
    rows = EmbeddingIndex([str(i) for i in range(len(index))], index.embeddings, normalize=False)
    return rows.save(Path(folder) / cache_key(parts), extra={"key": parts})
