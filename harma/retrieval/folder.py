"""Embed an image folder of any size into an :class:`~harma.retrieval.EmbeddingIndex`, resumably.

Images are encoded in shards (``shard_size`` images each). Every finished shard is written
atomically to ``<out>/.shards/`` beside a manifest naming the model; a shard records each of its
images' id, size and modification time, so an interrupted build continues from the finished shards
and encodes again only the images changed, added or removed since. Unreadable images are skipped and
listed in the index (``extra["skipped"]``) instead of stopping a long job. At the end the shards
are concatenated into ``<out>/embeddings.safetensors`` + ``<out>/index.json`` (plus a faiss index
when the gallery is above the approximate-search threshold) and the shard folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import IMAGE_EXTENSIONS, open_image
from ..encode import eval_mode, model_device, unit_rows
from ..errors import ConfigError, DatasetError
from ..io import INDEX_FILE, atomic_write_bytes, read_json
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


def _file_key(image_id: str, path: Path) -> tuple:
    """What a stored embedding of ``path`` is valid for: its id, size and modification time (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return (image_id, -1, -1)  # gone since it was listed: its decode fails and it is skipped
    return (image_id, st.st_size, st.st_mtime_ns)


def _shard_keys(path: Path) -> Optional[list[tuple]]:
    """The per-image keys a shard was written for; ``None`` for an unreadable shard or one written
    before shards were keyed by content (it is encoded again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = (f.metadata() or {}).get("keys")
        return [tuple(k) for k in json.loads(keys)] if keys else None
    except (SafetensorError, OSError, ValueError, TypeError):
        return None


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # tensors and skip reasons in one read
        reasons = json.loads(f.metadata()["bad_reasons"])
        return {k: f.get_tensor(k) for k in f.keys()}, reasons


def _reusable(out: Path, fresh: set[int], keys: list[tuple]) -> dict[tuple, Union[torch.Tensor, str]]:
    """Key -> embedding (or skip reason) of every image in the shards on disk that are not kept as
    they are (``fresh``): a partial build of an image list that has changed since keeps what is valid."""
    found: dict[tuple, Union[torch.Tensor, str]] = {}
    wanted = set(keys)
    for path in sorted((out / SHARDS).glob("shard-*.safetensors")):
        s = int(path.stem.split("-")[1]) if path.stem.split("-")[1].isdigit() else -1
        if s in fresh:
            continue
        old = _shard_keys(path)
        if not old or not wanted.intersection(old):
            continue
        shard, reasons = _read_shard(path)
        for j, r in enumerate(shard["rows"].tolist()):
            found[old[r]] = shard["embeddings"][j]
        for r, why in zip(shard["bad"].tolist(), reasons):
            found[old[r]] = why
    return found


def _check_manifest(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a partial build at ``out`` made by another model; record this build's identity."""
    path = out / SHARDS / MANIFEST
    manifest = json.loads(json.dumps({"version": 2, "identity": identity}, default=str))
    if path.is_file():
        try:
            old = read_json(path, DatasetError)
        except DatasetError:
            old = None
        if not isinstance(old, dict) or old.get("identity") != manifest["identity"]:
            raise FileExistsError(f"{out} holds a partial build for a different model (or an unreadable "
                                  f"{SHARDS}/{MANIFEST}); pass overwrite=True (--overwrite) to start again")
        if old == manifest:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(manifest).encode())


def _say_changes(say: Callable[[str], None], out: Path, keys: list[tuple], found: dict) -> None:
    old = {k[0]: k for p in (out / SHARDS).glob("shard-*.safetensors") for k in _shard_keys(p) or ()}
    changed = sum(1 for k in keys if k[0] in old and old[k[0]] != k)
    removed = len(old.keys() - {k[0] for k in keys})
    if changed or removed or found:
        say(f"since the interrupted build: {changed} images changed (encoded again), {removed} removed; "
            f"{sum(1 for k in keys if k in found)} encoded before are reused")


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

    A finished shard records each of its images' id, size and modification time (ns); on resume a
    shard is kept only when all of these still match, and an image that was encoded before is
    reused by the same key, so images changed, added or removed since the interruption are encoded
    (or dropped) and the rest are not encoded again. A file rewritten with the same size and the
    same modification time is not seen as changed; pass ``overwrite`` after such a change.

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
    keys = [_file_key(i, p) for i, p in zip(ids, paths)]  # before any decode: a later change is seen next time
    shard_size = effective_shard_size(len(paths), shard_size)
    say = log or (lambda _m: None)
    if overwrite:
        shutil.rmtree(out / SHARDS, ignore_errors=True)
        (out / INDEX_FILE).unlink(missing_ok=True)
    elif (out / INDEX_FILE).is_file():
        raise FileExistsError(f"{out} already holds an index; pass overwrite=True (--overwrite) to rebuild it")
    _check_manifest(out, identity or {})

    n_shards = (len(paths) + shard_size - 1) // shard_size
    bounds = [(s * shard_size, min(len(paths), (s + 1) * shard_size)) for s in range(n_shards)]
    done_shards = {s for s, (lo, hi) in enumerate(bounds) if _shard_keys(_shard_path(out, s)) == keys[lo:hi]}
    found = _reusable(out, done_shards, keys)
    if done_shards:
        say(f"resuming: {len(done_shards)} of {n_shards} shards already encoded")
    _say_changes(say, out, keys, found)
    done = sum(hi - lo for s, (lo, hi) in enumerate(bounds) if s in done_shards)
    if progress is not None:
        progress(done, len(paths))
    dev = model_device(model, device)
    from safetensors.torch import save

    with eval_mode(model), torch.inference_mode():
        for s, (lo, hi) in enumerate(bounds):
            if s in done_shards:
                continue
            have = {r: found[keys[lo + r]] for r in range(hi - lo) if keys[lo + r] in found}
            todo = [r for r in range(hi - lo) if r not in have]
            done += len(have)
            loader = DataLoader(_Images([paths[lo + r] for r in todo], preprocess), batch_size=batch_size,
                                shuffle=False, num_workers=num_workers, collate_fn=_collate)
            for pixels, idx, failed in (loader if todo else ()):
                if pixels is not None:
                    e = unit_rows(model.encode_image(pixels.to(dev), normalize=True))
                    have.update({todo[i]: row for i, row in zip(idx, e)})
                for i, why in failed:
                    have[todo[i]] = why
                    say(f"skipped: {why}")
                done += len(idx) + len(failed)
                if progress is not None:
                    progress(done, len(paths))
            rows = [r for r in sorted(have) if not isinstance(have[r], str)]
            bad = [r for r in sorted(have) if isinstance(have[r], str)]
            tensors = {"rows": torch.tensor(rows, dtype=torch.long), "bad": torch.tensor(bad, dtype=torch.long)}
            if rows:
                tensors["embeddings"] = torch.stack([have[r] for r in rows])
            meta = {"bad_reasons": json.dumps([have[r] for r in bad]), "keys": json.dumps(keys[lo:hi])}
            atomic_write_bytes(_shard_path(out, s), save(tensors, metadata=meta))

    embs, rows, skipped = [], [], []
    for s, (lo, _hi) in enumerate(bounds):
        shard, reasons = _read_shard(_shard_path(out, s))
        if "embeddings" in shard:
            embs.append(shard["embeddings"])
        rows += [lo + r for r in shard["rows"].tolist()]
        skipped += [{"id": ids[lo + r], "reason": why} for r, why in zip(shard["bad"].tolist(), reasons)]
    if not rows:
        raise DatasetError(f"none of the {len(paths)} images under {root or out} could be read; "
                           f"first: {skipped[0]['reason']}")
    index = EmbeddingIndex([ids[r] for r in rows], torch.cat(embs), [{"path": ids[r]} for r in rows], normalize=False)
    if index.uses_ann:
        say(f"building the approximate-search index ({index.ann_config.kind}) over {len(index):,} images")
        index.build_ann()
    extra = {"kind": "images", "model": identity or {}, "root": str(Path(root).resolve()) if root is not None else None,
             "skipped": skipped}
    index.save(out, extra=extra)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return index
