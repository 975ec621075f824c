"""The resumable embedding shards of an image-folder build (``<out>/.shards/``) and their bookkeeping.

A build's image list is sorted, so the shard bounds (``size`` images each) are the same in every
process that lists the same folder: the processes of a ``torchrun`` job can each encode their share
of the shards into one folder without talking to each other, and a later merge reads them in row
order. A shard file records, per image, the key its embedding is valid for (id, size, modification
time), so a shard is kept only while all of its images are unchanged. Beside the shards:
``manifest.json`` (the model identity the embeddings depend on) and ``ranks.json`` (which process
was given which shards in the last run, to name them when some are missing).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..errors import DatasetError
from ..io import atomic_write_bytes, read_json

SHARDS = ".shards"
MANIFEST = "manifest.json"
RANKS = "ranks.json"
Key = tuple  # (id, size, mtime_ns) of one image: what its stored embedding is valid for


def file_key(image_id: str, path: Path) -> Key:
    """What a stored embedding of ``path`` is valid for: its id, size and modification time (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return (image_id, -1, -1)  # gone since it was listed: its decode fails and it is skipped
    return (image_id, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one build: ``paths`` (in index order), their ``ids``, ``size`` images per shard.

    Shard ``s`` holds images ``[s * size, min(n, (s + 1) * size))``; it lives at :meth:`path`.
    """

    out: Path
    paths: Sequence[Path]
    ids: Sequence[str]
    size: int
    root: Optional[Path] = None

    def __len__(self) -> int:
        return -(-len(self.paths) // self.size)

    @property
    def folder(self) -> Path:
        return self.out / SHARDS

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.size, min(len(self.paths), (s + 1) * self.size)

    def path(self, s: int) -> Path:
        return self.folder / f"shard-{s:06d}.safetensors"

    def keys(self, s: int) -> list[Key]:
        """The keys of shard ``s``'s images as they are on disk now (a stat per image, no read)."""
        lo, hi = self.bounds(s)
        return [file_key(self.ids[i], self.paths[i]) for i in range(lo, hi)]

    def fingerprint(self) -> str:
        """Hash of the image list (ids in order): the processes of a job must all list the same images."""
        digest = hashlib.sha256(f"{len(self.ids)}:{self.size}".encode())
        for i in self.ids:
            digest.update(i.encode() + b"\0")
        return digest.hexdigest()

    def finished(self, s: int) -> bool:
        """Whether shard ``s`` is on disk and was written for its images as they are now."""
        return stored_keys(self.path(s)) == self.keys(s)

    def missing(self) -> list[int]:
        """The shards not written yet, or written for images that have changed since (ascending)."""
        return [s for s in range(len(self)) if not self.finished(s)]


def stored_keys(path: Path) -> Optional[list[Key]]:
    """The per-image keys a shard was written for; ``None`` for a missing or unreadable shard, or one
    written before shards were keyed by content (it is encoded again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = (f.metadata() or {}).get("keys")
        return [tuple(k) for k in json.loads(keys)] if keys else None
    except (SafetensorError, OSError, ValueError, TypeError):
        return None


def read_shard(path: Path, embeddings: bool = True) -> tuple[dict[str, torch.Tensor], list[str], list[Key]]:
    """A shard's tensors (``rows``, ``bad`` and, if asked and any, ``embeddings``), the skip reasons of
    its ``bad`` rows and its keys, in one open (a shard replaced meanwhile is read whole or not at all)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = [k for k in f.keys() if embeddings or k != "embeddings"]
        tensors = {k: f.get_tensor(k) for k in names}
    return tensors, json.loads(meta["bad_reasons"]), [tuple(k) for k in json.loads(meta["keys"])]


def write_shard(path: Path, keys: list[Key], have: dict[int, Union[torch.Tensor, str]]) -> None:
    """Shard file for ``keys``: ``have`` maps a row to its embedding, or to why it was skipped."""
    from safetensors.torch import save

    rows = [r for r in sorted(have) if not isinstance(have[r], str)]
    bad = [r for r in sorted(have) if isinstance(have[r], str)]
    tensors = {"rows": torch.tensor(rows, dtype=torch.long), "bad": torch.tensor(bad, dtype=torch.long)}
    if rows:
        tensors["embeddings"] = torch.stack([have[r] for r in rows])
    meta = {"bad_reasons": json.dumps([have[r] for r in bad]), "keys": json.dumps(keys)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _number(path: Path) -> int:
    digits = path.stem.split("-")[1]
    return int(digits) if digits.isdigit() else -1


def reusable(shards: ShardSet, kept: set[int], wanted: Sequence[Key]) -> dict[Key, Union[torch.Tensor, str]]:
    """Key -> embedding (or skip reason) of every ``wanted`` image held by a shard on disk that is not
    kept as it is (``kept``): a partial build of an image list that has changed since keeps what is
    still valid, wherever it was stored."""
    found: dict[Key, Union[torch.Tensor, str]] = {}
    wanted = set(wanted)
    for path in sorted(shards.folder.glob("shard-*.safetensors")):
        old = stored_keys(path) if _number(path) not in kept else None
        if not old or not wanted.intersection(old):
            continue
        try:
            shard, reasons, old = read_shard(path)
        except (OSError, ValueError, KeyError):
            continue  # replaced or damaged meanwhile: its images are encoded again
        for j, r in enumerate(shard["rows"].tolist()):
            if old[r] in wanted:
                found[old[r]] = shard["embeddings"][j]
        for r, why in zip(shard["bad"].tolist(), reasons):
            if old[r] in wanted:
                found[old[r]] = why
    return found


def say_changes(say: Callable[[str], None], shards: ShardSet, kept: set[int]) -> None:
    """One line on what changed since an interrupted build. Only the shard files not ``kept`` as they
    are and the images outside kept shards are looked at (a kept shard's images are unchanged), so a
    plain resume holds no per-image table of the whole archive."""
    old: dict[str, Key] = {}  # id -> key, of the images in shard files that are not kept
    for path in shards.folder.glob("shard-*.safetensors"):
        if _number(path) not in kept:
            old.update((k[0], k) for k in stored_keys(path) or ())
    if not old:
        return
    changed = reused = 0
    for s in range(len(shards)):
        if s in kept:
            continue
        for k in shards.keys(s):
            before = old.pop(k[0], None)
            changed += before is not None and before != k
            reused += before == k
    removed = len(old)  # ids stored that are in no shard of the list now
    if changed or removed or reused:
        say(f"since the interrupted build: {changed} images changed (encoded again), {removed} removed; "
            f"{reused} encoded before are reused")


def check_manifest(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a partial build at ``out`` made by another model; record this build's identity.

    Every process of a job calls it (rank 0 first): on a shared folder the others find rank 0's
    manifest, on a machine of its own a process writes the same one."""
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


def manifest_identity(out: Path) -> dict[str, Any]:
    """The model identity recorded by the build whose shards are in ``out`` (for a merge without the model)."""
    path = out / SHARDS / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no shards to merge here (no manifest): build the shards first")
    data = read_json(path, DatasetError)
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        raise DatasetError(f"{path}: not a shard manifest (no 'identity' object)")
    return data["identity"]


def assign(todo: Sequence[int], world: int) -> list[list[int]]:
    """The shards each of ``world`` processes encodes: every ``world``-th shard still to do.

    Round robin over the shards still missing rather than fixed blocks: neighbouring shards (one
    folder of large tiles, one slow disk) are spread over all processes, and a resumed run shares a
    killed process's leftovers out among all processes instead of leaving all but one idle."""
    return [list(todo[r::world]) for r in range(world)]


def record_assignment(shards: ShardSet, parts: list[list[int]]) -> None:
    """``ranks.json``: which process was given which shards in this run (read to name missing ones)."""
    shards.folder.mkdir(parents=True, exist_ok=True)
    record = {"world": len(parts), "shards": parts, "size": shards.size, "images": len(shards.paths)}
    atomic_write_bytes(shards.folder / RANKS, json.dumps(record).encode())


def recorded_size(out: Path) -> Optional[int]:
    """The images per shard of the build whose shards are in ``out`` (``ranks.json``, else the first
    shard's length), so that a later merge cuts the list as the build did; ``None`` if unknown."""
    try:
        size = json.loads((out / SHARDS / RANKS).read_text())["size"]
        if isinstance(size, int) and size > 0:
            return size
    except (OSError, ValueError, KeyError, TypeError):
        pass
    first = stored_keys(out / SHARDS / "shard-000000.safetensors")
    return len(first) if first else None


def _short(numbers: Sequence[int], most: int = 20) -> str:
    shown = ", ".join(str(s) for s in numbers[:most])
    return shown + (f", ... ({len(numbers) - most} more)" if len(numbers) > most else "")


def missing_message(shards: ShardSet, missing: Sequence[int]) -> str:
    """Why a merge cannot start: how many shards are missing, which, and which processes had them."""
    text = (f"{shards.out}: {len(missing)} of {len(shards)} shards are not encoded (or their images changed "
            f"since): shard {_short(missing)}")
    try:
        last = json.loads((shards.folder / RANKS).read_text())
        parts, world, gone = last["shards"], int(last["world"]), set(missing)
        owners = [(r, [s for s in part if s in gone]) for r, part in enumerate(parts)]
        named = "; ".join(f"rank {r} of {world}: {_short(ss)}" for r, ss in owners if ss)
        if named:
            text += f" (in the last run {named})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return text + ("; run the same build command again: it encodes only these, keeping the finished shards "
                   "(on machines without a shared folder, copy every machine's .shards/shard-*.safetensors "
                   "here first)")
