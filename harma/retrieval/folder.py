"""Embed an image folder of any size into a search index, resumably, in one process or many.

Images are encoded in shards (``shard_size`` images each, :mod:`.shards`). Every finished shard is
written atomically to ``<out>/.shards/`` beside a manifest naming the model; a shard records each of
its images' id, size and modification time, so an interrupted build continues from the finished
shards and encodes again only the images changed, added or removed since. Unreadable images are
skipped and listed in the index (``extra["skipped"]``) instead of stopping a long job.

Three steps: :func:`prepare_build` (what is left to encode), :func:`encode_shards` (any share of
it: the processes of a torchrun job each take theirs) and :func:`merge_shards` (the index, from the
shards in row order: a format-1 :class:`~harma.retrieval.EmbeddingIndex` below
:data:`~harma.retrieval.plan.EXACT_BELOW` images, else the on-disk archive index
:func:`~harma.retrieval.plan_index` picks for the memory budget); the shard folder is then removed.
:func:`build_image_index` runs all three in one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import IMAGE_EXTENSIONS, open_image
from ..encode import eval_mode, model_device, unit_rows
from ..errors import ConfigError, DatasetError
from ..io import INDEX_FILE, read_json
from .archive import ArchiveIndex
from .archive_build import build_archive
from .index import ANN_FILE, EMBEDDINGS_FILE, EmbeddingIndex
from .plan import IndexPlan, plan_index
from .shards import (
    SHARDS,
    ShardSet,
    check_manifest,
    missing_message,
    read_shard,
    reusable,
    say_changes,
    write_shard,
)

MIN_SHARDS, MIN_SHARD_SIZE = 16, 64  # a folder is written in at least 16 pieces (of >= 64 images)
Progress = Callable[[int, int], None]  # (images done, total)
AnyIndex = Union[EmbeddingIndex, ArchiveIndex]


def effective_shard_size(n_images: int, shard_size: int) -> int:
    """Images per shard: at most ``shard_size``, and small enough that a folder is written in at least
    :data:`MIN_SHARDS` pieces, so an interruption loses little work whatever the folder size."""
    return max(1, min(shard_size, max(MIN_SHARD_SIZE, -(-n_images // MIN_SHARDS))))


def list_images(root: Union[str, Path], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    exts = {e.lower() for e in extensions}
    found = [p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _Images(Dataset):
    """``(pixels or None, index)``: a failed decode becomes None plus its reason, not an exception."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int, str]:
        try:
            return self.transform(open_image(self.paths[i])), i, ""
        except DatasetError as e:
            return None, i, str(e)


def _collate(batch: list) -> tuple[Optional[torch.Tensor], list[int], list[tuple[int, str]]]:
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, why) for x, i, why in batch if x is None]
    pixels = torch.stack([x for x, _ in good]) if good else None
    return pixels, [i for _, i in good], bad


def image_shards(images: Sequence[Union[str, Path]], out: Union[str, Path], *, root: Optional[Union[str, Path]] = None,
                 shard_size: int = 4096) -> ShardSet:
    """The shards a build of ``images`` (in index order) into ``out`` writes: ids are paths relative to
    ``root`` when given (portable indexes), else as given; at most ``shard_size`` images a shard
    (:func:`effective_shard_size`). Pure: nothing is read or written."""
    if shard_size < 1:
        raise ConfigError("shard_size must be >= 1")
    out, paths = Path(out), [p if isinstance(p, Path) else Path(p) for p in images]  # no copy of 10^7 paths
    if not paths:
        raise DatasetError(f"no images to index for {out}")
    ids = [p.relative_to(root).as_posix() if root is not None else str(p) for p in paths]
    return ShardSet(out, paths, ids, effective_shard_size(len(paths), shard_size),
                    Path(root) if root is not None else None)


def _remove_index(out: Path) -> None:
    """Delete the shards and the index files a previous build left at ``out`` (``--overwrite``)."""
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    try:
        files = dict(read_json(out / INDEX_FILE, DatasetError).get("files") or {})
    except (DatasetError, AttributeError, TypeError, ValueError):
        files = {}
    for name in [*files, EMBEDDINGS_FILE, ANN_FILE, INDEX_FILE]:
        target = out / str(name)
        if target.parent == out and target.is_file():
            target.unlink()


def prepare_build(shards: ShardSet, identity: dict[str, Any], *, overwrite: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> list[int]:
    """Start or continue a build: the shards still to encode (ascending).

    Refuses an index already at ``shards.out`` (unless ``overwrite``, which discards it and any
    partial build) and a partial build made by another model; records ``identity``. A shard on disk
    is kept when all of its images are unchanged (same id, size and modification time). Under
    torchrun only rank 0 calls this, before any process writes a shard.
    """
    out, say = shards.out, log or (lambda _m: None)
    if overwrite:
        _remove_index(out)
    elif (out / INDEX_FILE).is_file():
        raise FileExistsError(f"{out} already holds an index; pass overwrite=True (--overwrite) to rebuild it")
    check_manifest(out, identity)
    kept = {s for s in range(len(shards)) if shards.finished(s)}
    if kept:
        say(f"resuming: {len(kept)} of {len(shards)} shards already encoded")
    say_changes(say, shards, kept)
    return [s for s in range(len(shards)) if s not in kept]


def encode_shards(model: torch.nn.Module, preprocess: Callable, shards: ShardSet, todo: Sequence[int], *,
                  pending: Optional[Sequence[int]] = None, batch_size: int = 64, num_workers: int = 0,
                  device: Any = None, progress: Optional[Progress] = None,
                  log: Optional[Callable[[str], None]] = None) -> None:
    """Encode shards ``todo`` and write each atomically as it is finished.

    ``pending``: every shard written in this run, by any process (default ``todo``); the others are
    finished, and images encoded before in a shard that is written again are reused by their key.
    ``progress(done, total)`` counts the finished shards' images as done.
    """
    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    say = log or (lambda _m: None)
    pending = set(todo if pending is None else pending)
    kept = {s for s in range(len(shards)) if s not in pending}
    done = sum(len(range(*shards.bounds(s))) for s in kept)
    total = done + sum(len(range(*shards.bounds(s))) for s in todo)
    found = reusable(shards, kept, [k for s in todo for k in shards.keys(s)])
    if progress is not None:
        progress(done, total)
    dev = model_device(model, device)
    shards.folder.mkdir(parents=True, exist_ok=True)
    with eval_mode(model), torch.inference_mode():
        for s in todo:
            lo, _hi = shards.bounds(s)
            keys = shards.keys(s)  # before any decode: a later change is seen next time
            have = {r: found[k] for r, k in enumerate(keys) if k in found}
            wanted = [r for r in range(len(keys)) if r not in have]
            done += len(have)
            loader = DataLoader(_Images([shards.paths[lo + r] for r in wanted], preprocess), batch_size=batch_size,
                                shuffle=False, num_workers=num_workers, collate_fn=_collate)
            for pixels, idx, failed in (loader if wanted else ()):
                if pixels is not None:
                    e = unit_rows(model.encode_image(pixels.to(dev), normalize=True))
                    have.update({wanted[i]: row.cpu() for i, row in zip(idx, e)})
                for i, why in failed:
                    have[wanted[i]] = why
                    say(f"skipped: {why}")
                done += len(idx) + len(failed)
                if progress is not None:
                    progress(done, total)
            write_shard(shards.path(s), keys, have)


def _shard_rows(shards: ShardSet) -> tuple[list[int], list[dict[str, str]], int]:
    """Readable rows per shard, the skipped images (id and reason) and the embedding size."""
    counts, skipped, dim = [], [], 0
    for s in range(len(shards)):
        tensors, reasons, keys = read_shard(shards.path(s), embeddings=False)
        counts.append(len(tensors["rows"]))
        skipped += [{"id": keys[r][0], "reason": why} for r, why in zip(tensors["bad"].tolist(), reasons)]
        if not dim and counts[-1]:
            dim = int(read_shard(shards.path(s))[0]["embeddings"].shape[1])
    return counts, skipped, dim


def merge_shards(shards: ShardSet, *, identity: Optional[dict[str, Any]] = None, memory_gb: float = 8.0,
                 plan: Optional[IndexPlan] = None, log: Optional[Callable[[str], None]] = None,
                 progress: Optional[Progress] = None) -> AnyIndex:
    """Build the index at ``shards.out`` from its finished shards, then remove them.

    Below :data:`~harma.retrieval.plan.EXACT_BELOW` readable images (or when ``plan`` says
    ``"exact"``): a format-1 :class:`EmbeddingIndex` (vectors in RAM). Above: an on-disk archive
    index (:func:`~harma.retrieval.build_archive`) of the kind :func:`~harma.retrieval.plan_index`
    picks for ``memory_gb``, fed shard by shard in row order (never all embeddings at once).
    Unreadable images are skipped and listed in ``extra["skipped"]``. A shard that is missing, or
    was written for images changed since, is a :class:`DatasetError` naming every such shard.
    ``progress(rows added, rows)`` follows the archive's add pass.
    """
    say = log or (lambda _m: None)
    missing = shards.missing()
    if missing:
        raise DatasetError(missing_message(shards, missing))
    counts, skipped, dim = _shard_rows(shards)
    n = sum(counts)
    if not n:
        raise DatasetError(f"none of the {len(shards.paths)} images under {shards.root or shards.out} could be "
                           f"read; first: {skipped[0]['reason']}")
    plan = plan or plan_index(n, dim, memory_gb)
    say(f"index: {plan.factory_string()} ({plan.reason})")
    extra = {"kind": "images", "model": identity or {},
             "root": str(shards.root.resolve()) if shards.root is not None else None, "skipped": skipped}
    if plan.kind == "exact":
        index = _exact_index(shards, extra, say)
    else:
        index = build_archive(shards.out, lambda: _chunks(shards), n, dim, plan, _row_ids(shards),
                              extra=extra, log=say, progress=progress)
    shutil.rmtree(shards.folder, ignore_errors=True)
    return index


def _chunks(shards: ShardSet) -> Iterator[np.ndarray]:
    """The shards' embeddings in row order, one shard at a time (float32, L2-normalised)."""
    for s in range(len(shards)):
        tensors = read_shard(shards.path(s))[0]
        if "embeddings" in tensors:
            yield tensors["embeddings"].float().numpy()


def _row_ids(shards: ShardSet) -> Iterator[str]:
    """The ids of the readable images, in row order."""
    for s in range(len(shards)):
        lo, _hi = shards.bounds(s)
        yield from (shards.ids[lo + r] for r in read_shard(shards.path(s), embeddings=False)[0]["rows"].tolist())


def _exact_index(shards: ShardSet, extra: dict, say: Callable[[str], None]) -> EmbeddingIndex:
    ids = list(_row_ids(shards))
    embs = [torch.from_numpy(e) for e in _chunks(shards)]
    index = EmbeddingIndex(ids, torch.cat(embs), [{"path": i} for i in ids], normalize=False)
    if index.uses_ann:
        say(f"building the approximate-search index ({index.ann_config.kind}) over {len(index):,} images")
        index.build_ann()
    index.save(shards.out, extra=extra)
    return index


def build_image_index(
    model: torch.nn.Module,
    preprocess: Callable,
    images: Sequence[Union[str, Path]],
    out: Union[str, Path],
    *,
    root: Optional[Union[str, Path]] = None,
    identity: Optional[dict[str, Any]] = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    num_workers: int = 0,
    device: Any = None,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    log: Optional[Callable[[str], None]] = None,
    memory_gb: float = 8.0,
    plan: Optional[IndexPlan] = None,
) -> AnyIndex:
    """Encode ``images`` into an index at ``out``, continuing an interrupted build there.

    A finished shard records each of its images' id, size and modification time (ns); on resume a
    shard is kept only when all of these still match, and an image that was encoded before is
    reused by the same key, so images changed, added or removed since the interruption are encoded
    (or dropped) and the rest are not encoded again. A file rewritten with the same size and the
    same modification time is not seen as changed; pass ``overwrite`` after such a change. This is
    :func:`prepare_build`, :func:`encode_shards` and :func:`merge_shards` in one process; a torchrun
    job (``python -m training.build_index``) splits the middle step over its processes.

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_image(x, normalize=True)``).
        preprocess: PIL image -> (3, H, W) tensor (the model's evaluation transform).
        images: the image files, in index order.
        out: the index folder.
        root: ids are paths relative to ``root`` when given (portable indexes), else as given.
        identity: what the embeddings depend on (:func:`harma.retrieval.model_identity`); a partial
            build for a different identity is refused unless ``overwrite``.
        batch_size: images per forward pass.
        shard_size: images per resumable shard, at most (:func:`effective_shard_size` makes it
            smaller for small folders, so that they are resumable too).
        num_workers: DataLoader decoding workers.
        overwrite: discard an existing index or partial build at ``out``.
        progress: ``progress(done, total)`` after every batch (resumed images count as done).
        log: one-line messages (resuming, skipped images, the index chosen).
        memory_gb: RAM budget of the index above the exact-search size (:func:`~harma.retrieval.plan_index`).
        plan: the index to build, instead of the one ``plan_index`` picks (``kind="exact"``: format 1).

    Returns:
        The finished index (also saved at ``out``): an :class:`EmbeddingIndex` below
        :data:`~harma.retrieval.plan.EXACT_BELOW` images, else an :class:`~harma.retrieval.ArchiveIndex`.
    """
    if batch_size < 1 or shard_size < 1:
        raise ConfigError("batch_size and shard_size must be >= 1")
    shards = image_shards(images, out, root=root, shard_size=shard_size)
    todo = prepare_build(shards, identity or {}, overwrite=overwrite, log=log)
    encode_shards(model, preprocess, shards, todo, batch_size=batch_size, num_workers=num_workers, device=device,
                  progress=progress, log=log)
    return merge_shards(shards, identity=identity, memory_gb=memory_gb, plan=plan, log=log)
