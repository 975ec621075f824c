"""Embed an image folder of any size into an :class:`~harma.retrieval.EmbeddingIndex`, resumably.

Images are encoded in shards (``shard_size`` images each). Every finished shard is written
atomically to ``<out>/.shards/`` beside a manifest naming the model and the image list, so an
interrupted build continues from the last finished shard. Unreadable images are skipped and
listed in the index (``extra["skipped"]``) instead of stopping a long job. At the end the shards
are concatenated into ``<out>/embeddings.safetensors`` + ``<out>/index.json`` (plus a faiss index
when the gallery is above the approximate-search threshold) and the shard folder is removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import IMAGE_EXTENSIONS, open_image
from ..encode import eval_mode, model_device, unit_rows
from ..errors import ConfigError, DatasetError
from ..io import INDEX_FILE, atomic_write_bytes
from .identity import texts_fingerprint
from .index import EmbeddingIndex

SHARDS = ".shards"
MIN_SHARDS, MIN_SHARD_SIZE = 16, 64  # a folder is written in at least 16 pieces (of >= 64 images)


def effective_shard_size(n_images: int, shard_size: int) -> int:
    """Images per shard: at most ``shard_size``, and small enough that a folder is written in at least
    :data:`MIN_SHARDS` pieces, so an interruption loses little work whatever the folder size."""
    return max(1, min(shard_size, max(MIN_SHARD_SIZE, -(-n_images // MIN_SHARDS))))
MANIFEST = "manifest.json"
Progress = Callable[[int, int], None]  # (images done, total)


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


def _shard_path(out: Path, s: int) -> Path:
    return out / SHARDS / f"shard-{s:06d}.safetensors"


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
) -> EmbeddingIndex:
    """Encode ``images`` into an index at ``out``, continuing an interrupted build there.

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_image(x, normalize=True)``).
        preprocess: PIL image -> (3, H, W) tensor (the model's evaluation transform).
        images: the image files, in index order.
        out: the index folder.
        root: ids are paths relative to ``root`` when given (portable indexes), else as given.
        identity: what the embeddings depend on (:func:`harma.retrieval.model_identity`); a partial
            build for a different identity or image list is refused unless ``overwrite``.
        batch_size: images per forward pass.
        shard_size: images per resumable shard, at most (:func:`effective_shard_size` makes it
            smaller for small folders, so that they are resumable too).
        num_workers: DataLoader decoding workers.
        overwrite: discard an existing index or partial build at ``out``.
        progress: ``progress(done, total)`` after every batch (resumed images count as done).
        log: one-line messages (resuming, skipped images).

    Returns:
        The finished index (also saved at ``out``).
    """
    if batch_size < 1 or shard_size < 1:
        raise ConfigError("batch_size and shard_size must be >= 1")
    out = Path(out)
    paths = [Path(p) for p in images]
    if not paths:
        raise DatasetError(f"no images to index for {out}")
    ids = [p.relative_to(root).as_posix() if root is not None else str(p) for p in paths]
    shard_size = effective_shard_size(len(paths), shard_size)
    identity = identity or {}
    manifest = {"version": 1, "identity": identity, "ids_sha256": texts_fingerprint(ids), "count": len(ids),
                "shard_size": shard_size}
    say = log or (lambda _m: None)
    if overwrite:
        shutil.rmtree(out / SHARDS, ignore_errors=True)
        (out / INDEX_FILE).unlink(missing_ok=True)
    elif (out / INDEX_FILE).is_file():
        raise FileExistsError(f"{out} already holds an index; pass overwrite=True (--overwrite) to rebuild it")
    manifest_path = out / SHARDS / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old != json.loads(json.dumps(manifest, default=str)):
            raise FileExistsError(f"{out} holds a partial build for a different model, image list or shard "
                                  "size; pass overwrite=True (--overwrite) to start again")
    else:
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest_path, json.dumps(manifest, default=str).encode())

    n_shards = (len(paths) + shard_size - 1) // shard_size
    done_shards = [s for s in range(n_shards) if _shard_path(out, s).is_file()]
    if done_shards:
        say(f"resuming: {len(done_shards)} of {n_shards} shards already encoded")
    done = sum(min(shard_size, len(paths) - s * shard_size) for s in done_shards)
    if progress is not None:
        progress(done, len(paths))
    dev = model_device(model, device)
    from safetensors.torch import save

    with eval_mode(model), torch.inference_mode():
        for s in range(n_shards):
            if s in done_shards:
                continue
            lo, hi = s * shard_size, min(len(paths), (s + 1) * shard_size)
            loader = DataLoader(_Images(paths[lo:hi], preprocess), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers, collate_fn=_collate)
            embs, rows, bad = [], [], []
            for pixels, idx, failed in loader:
                if pixels is not None:
                    e = model.encode_image(pixels.to(dev), normalize=True)
                    embs.append(unit_rows(e))
                    rows += [lo + i for i in idx]
                bad += [(lo + i, why) for i, why in failed]
                done += len(idx) + len(failed)
                if progress is not None:
                    progress(done, len(paths))
            for _, why in bad:
                say(f"skipped: {why}")
            tensors = {"rows": torch.tensor(rows, dtype=torch.long),
                       "bad": torch.tensor([r for r, _ in bad], dtype=torch.long)}
            if embs:
                tensors["embeddings"] = torch.cat(embs)
            meta = {"bad_reasons": json.dumps([why for _, why in bad])}
            atomic_write_bytes(_shard_path(out, s), save(tensors, metadata=meta))

    from safetensors import safe_open

    embs, rows, skipped = [], [], []
    for s in range(n_shards):
        with safe_open(str(_shard_path(out, s)), "pt") as f:  # tensors and skip reasons in one read
            reasons = json.loads(f.metadata()["bad_reasons"])
            shard = {k: f.get_tensor(k) for k in f.keys()}
        if "embeddings" in shard:
            embs.append(shard["embeddings"])
        rows += shard["rows"].tolist()
        skipped += [{"id": ids[r], "reason": why} for r, why in zip(shard["bad"].tolist(), reasons)]
    if not rows:
        raise DatasetError(f"none of the {len(paths)} images under {root or out} could be read; "
                           f"first: {skipped[0]['reason']}")
    index = EmbeddingIndex([ids[r] for r in rows], torch.cat(embs), [{"path": ids[r]} for r in rows], normalize=False)
    if index.uses_ann:
        say(f"building the approximate-search index ({index.ann_config.kind}) over {len(index):,} images")
        index.build_ann()
    extra = {"kind": "images", "model": identity, "root": str(Path(root).resolve()) if root is not None else None,
             "skipped": skipped}
    index.save(out, extra=extra)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return index
