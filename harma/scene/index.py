"""Chip embeddings of a scene, cached on disk and resumable, and the queries answered from them.

The cache entry ``cache_dir/<key>/`` is keyed by the scene file's sha256, the model's identity
(:func:`harma.retrieval.identity.model_identity`), the band choice and the grid. Embeddings are
written in chunks of :data:`CHUNK` chips as they are computed (atomic writes), so a killed build
resumes at its first missing chunk; when all are there they are joined into ``embeddings.safetensors``.
With ``shard=(rank, world_size)`` a process computes only its share of the chunks (every
``world_size``-th), so the processes of a ``torchrun`` job split a scene; a later call without
``shard`` (after a barrier) joins them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from harma.data.images import DECODER_VERSION
from harma.encode import Progress, check_finite_embeddings, eval_mode, model_device, model_lock, unit_rows
from harma.errors import IndexFormatError, QueryError
from harma.io import atomic_write_bytes, atomic_write_json, read_safetensors
from harma.retrieval.identity import cache_key, model_identity
from harma.scene.grid import ChipGrid
from harma.scene.raster import Scene

log = logging.getLogger(__name__)
CHUNK = 256  # chips per cache file while building
EMBEDDINGS_FILE = "embeddings.safetensors"
SCENE_INDEX_VERSION = 1


def _input_size(preprocess: Callable) -> int:
    """The square side the model's preprocessing resizes to (open_clip's Resize), else 224."""
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(max(size))
    return 224


def _save(path: Path, emb: torch.Tensor) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"embeddings": emb.contiguous()}))


def _try_save(path: Path, emb: torch.Tensor) -> bool:
    """Save to the cache; False (with a warning) when the folder cannot be written."""
    try:
        _save(path, emb)
        return True
    except OSError as e:
        log.warning("%s: chip embeddings are not cached (%s)", path.parent, e)
        return False


def top_k(scores: Union[torch.Tensor, np.ndarray, Sequence[float]], k: int) -> list[int]:
    """The ``k`` best chip ids, best first; equal scores by lower id; NaN scores last."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    s = torch.where(torch.isnan(s), torch.full_like(s, -float("inf")), s)
    order = torch.sort(s, descending=True, stable=True).indices
    return [int(i) for i in order[: max(0, int(k))]]


class SceneIndex:
    """L2-normalised chip embeddings ``(N, D)`` of one scene and grid, with the model that made them."""

    def __init__(self, embeddings: torch.Tensor, model: nn.Module, preprocess: Callable, scene: Scene,
                 grid: ChipGrid, cached: bool = False) -> None:
        self.embeddings = embeddings
        self.model, self.preprocess, self.scene, self.grid = model, preprocess, scene, grid
        self.cached = cached  # True when every embedding came from the disk cache

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @staticmethod
    def cache_parts(model: nn.Module, scene: Scene, grid: ChipGrid,
                    checkpoint: Optional[Union[str, Path]] = None) -> dict[str, Any]:
        """What the chip embeddings depend on (the cache key's parts)."""
        return {"kind": f"scene-chips-v{SCENE_INDEX_VERSION}", "scene_sha256": scene.sha256,
                "model": model_identity(model, checkpoint), "bands": list(scene.bands),
                "decoder": DECODER_VERSION, "grid": grid.fingerprint(), "chips": len(grid)}

    @classmethod
    def build(cls, model: nn.Module, preprocess: Callable, scene: Scene, grid: ChipGrid,
              cache_dir: Optional[Union[str, Path]] = None, batch_size: int = 32,
              progress: Optional[Progress] = None, checkpoint: Optional[Union[str, Path]] = None,
              shard: Optional[tuple[int, int]] = None) -> Optional["SceneIndex"]:
        """Embed every chip of ``grid`` (or load them from ``cache_dir``).

        Args:
            model: anything with ``encode_image(x, normalize=True)``; it is not moved.
            preprocess: PIL image -> (3, H, W) tensor (``preprocess_val``); chips are read at its size.
            cache_dir: where to cache and resume; None: compute in memory only.
            progress: ``progress(done, total)`` in chips after every batch (cached chips count as done).
            checkpoint: the adapter folder the model was loaded from (identifies its weights cheaply).
            shard: ``(rank, world_size)``: compute only this process's chunks into the cache and return
                None (needs ``cache_dir``).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / cache_key(cls.cache_parts(model, scene, grid, checkpoint))
            final = folder / EMBEDDINGS_FILE
            if final.is_file() and shard is None:
                try:
                    emb = read_safetensors(final, IndexFormatError)["embeddings"]
                    if emb.shape[0] == len(grid):
                        if progress is not None:
                            progress(len(grid), len(grid))
                        return cls(emb, model, preprocess, scene, grid, cached=True)
                except IndexFormatError:
                    pass  # rebuilt below
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if shard is not None:
                    raise IndexFormatError(f"{folder}: cannot write the shared chip cache ({e.strerror or e})") \
                        from None
                log.warning("%s: chip embeddings are not cached, the folder cannot be written (%s)", folder, e)
                folder = None
        elif shard is not None:
            raise ValueError("shard= needs a cache_dir the processes share")
        n_chunks = (len(grid) + CHUNK - 1) // CHUNK
        mine = range(n_chunks) if shard is None else range(shard[0], n_chunks, shard[1])
        parts: list[Optional[torch.Tensor]] = [None] * n_chunks
        done, all_cached = 0, True
        side = _input_size(preprocess)
        for c in mine:
            path = folder / f"chunk-{c:05d}.safetensors" if folder is not None else None
            chips = grid.chips[c * CHUNK:(c + 1) * CHUNK]
            if path is not None and path.is_file():
                try:
                    emb = read_safetensors(path, IndexFormatError)["embeddings"]
                    if emb.shape[0] == len(chips):
                        parts[c] = emb
                except IndexFormatError:
                    pass
            if parts[c] is None:
                all_cached = False
                parts[c] = cls._embed(model, preprocess, scene, chips, side, batch_size, progress, done, len(grid))
                if path is not None and not _try_save(path, parts[c]) and shard is None:
                    folder = None  # a full disk or a read-only folder: keep going in memory
            done += len(chips)
            if progress is not None:
                progress(done, len(grid))
        if shard is not None:
            return None
        emb = torch.cat(parts) if parts else torch.empty(0, 0)
        if folder is not None and _try_save(folder / EMBEDDINGS_FILE, emb):
            try:
                atomic_write_json(folder / "key.json", cls.cache_parts(model, scene, grid, checkpoint))
                for c in range(n_chunks):
                    (folder / f"chunk-{c:05d}.safetensors").unlink(missing_ok=True)
            except OSError as e:
                log.warning("%s: cannot tidy the chip cache (%s)", folder, e)
        return cls(emb, model, preprocess, scene, grid, cached=all_cached and n_chunks > 0)

    @staticmethod
    def _embed(model: nn.Module, preprocess: Callable, scene: Scene, chips: Sequence, side: int, batch_size: int,
               progress: Optional[Progress], done: int, total: int) -> torch.Tensor:
        dev = model_device(model, None)
        out = []
        with eval_mode(model), torch.inference_mode():
            for b in range(0, len(chips), batch_size):
                batch = chips[b:b + batch_size]
                pixels = torch.stack([preprocess(scene.read_rgb(
                    ch.window, (min(ch.width, side), min(ch.height, side)))) for ch in batch])
                with model_lock(model):  # a visitor's query on the same model takes its turn between batches
                    out.append(unit_rows(model.encode_image(pixels.to(dev), normalize=True)))
                if progress is not None:
                    progress(done + b + len(batch), total)
        emb = torch.cat(out)
        check_finite_embeddings(emb, "chip", [f"chip {c.index} at {c.window}" for c in chips])
        return emb

    # -- queries ---------------------------------------------------------------------------------------
    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.normalize(q.float().reshape(-1), dim=0)
        return self.embeddings @ q

    def text_embedding(self, tokenizer: Callable, text: str) -> torch.Tensor:
        text = (text or "").strip()
        if not text:
            raise QueryError("empty query: type what to look for, e.g. 'a bridge over a river'")
        dev = model_device(self.model, None)
        # thread-safe: the app answers many queries at once, and a fast tokenizer refuses concurrent use
        with model_lock(self.model), model_lock(tokenizer), eval_mode(self.model), torch.inference_mode():
            return unit_rows(self.model.encode_text(tokenizer([text]).to(dev), normalize=True))[0]

    def scores_for_text(self, tokenizer: Callable, text: str) -> torch.Tensor:
        """(N,) cosine similarity of every chip to the text ``text``."""
        return self._scores(self.text_embedding(tokenizer, text))

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise QueryError(f"{what} chip {bad[0]} does not exist: the grid has chips 0 to {len(self) - 1}")
        return ids

    def scores_for_chip(self, i: int) -> torch.Tensor:
        """(N,) cosine similarity of every chip to chip ``i``."""
        (i,) = self._check_ids([i], "example")
        return self._scores(self.embeddings[i])

    def scores_for_image(self, image: Image.Image) -> torch.Tensor:
        """(N,) cosine similarity of every chip to an example image (any PIL image)."""
        dev = model_device(self.model, None)
        pixels = self.preprocess(image.convert("RGB")).unsqueeze(0).to(dev)
        with model_lock(self.model), eval_mode(self.model), torch.inference_mode():
            emb = unit_rows(self.model.encode_image(pixels, normalize=True))[0]
        return self._scores(emb)

    def rocchio(self, text: Optional[str] = None, positive: Sequence[int] = (), negative: Sequence[int] = (),
                alpha: float = 1.0, beta: float = 0.75, gamma: float = 0.25,
                tokenizer: Optional[Callable] = None) -> torch.Tensor:
        """Scores for a query refined by example chips (Rocchio): ``alpha * text + beta * mean(positive)
        - gamma * mean(negative)``, normalised. ``text`` needs ``tokenizer``."""
        pos, neg = self._check_ids(positive, "positive"), self._check_ids(negative, "negative")
        if not (text or "").strip() and not pos:
            raise QueryError("a refined query needs a text or at least one positive example chip")
        q = torch.zeros(self.embeddings.shape[1])
        if (text or "").strip():
            if tokenizer is None:
                raise QueryError("a text query needs the model's tokenizer")
            q += alpha * self.text_embedding(tokenizer, text)
        if pos:
            q += beta * self.embeddings[pos].mean(0)
        if neg:
            q -= gamma * self.embeddings[neg].mean(0)
        if not q.norm() > 0:
            raise QueryError("the refined query cancels out (the same chips are positive and negative)")
        return self._scores(q)
