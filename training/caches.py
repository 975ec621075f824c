"""Speed-ups that change no result: decoded train images cached on disk, and the features of a
frozen text tower computed once per run instead of every step and every validation.

Text features are only cached when ``HarmaModel.text_is_frozen`` (method ``full`` with
``model.lock_text``): the tower has no trainable weight and stays in eval mode, so its output is
the same every time.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from harma import HarmaModel
from harma.data import ImageCache, RetrievalSplit
from harma.encode import encode_texts
from harma.inject import text_tower_parameters
from harma.io import atomic_write_bytes
from training.config import TrainConfig
from training.distributed import barrier

log = logging.getLogger("training.train")


def image_cache(cfg: TrainConfig, split: RetrievalSplit, main: bool) -> Optional[ImageCache]:
    """``data.cache_images`` > 0: the train split's images decoded once into ``<out_dir>/.image_cache``
    (built by the main rank, then opened by all)."""
    size = cfg.data.cache_images
    if size <= 0:
        return None
    folder = Path(cfg.run.out_dir) / ".image_cache"
    if main:
        with tqdm(total=split.num_images, desc="caching images", leave=False, dynamic_ncols=True) as bar:
            cache = ImageCache(split.images, size, folder, progress=lambda d, _t: bar.update(d - bar.n))
        log.info("image cache: %s (%d images at %d px)", cache.path, len(cache), size)
    barrier()
    return cache if main else ImageCache(split.images, size, folder)


def text_features(model: HarmaModel, split: RetrievalSplit, tokenizer: Callable, caption_fn: Optional[Callable],
                  batch_size: int, device: Any, desc: str, cache_dir: Optional[Path] = None) -> Optional[torch.Tensor]:
    """Normalised features of every caption of ``split`` on ``device``, or None if the text tower trains.

    With ``cache_dir`` the features are also kept on disk, keyed by the text tower's weights and
    the exact captions, so a resumed or repeated run does not encode them again.
    """
    if not model.text_is_frozen:
        return None
    captions = [caption_fn(c) for c in split.captions] if caption_fn else list(split.captions)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"text-{_text_key(model, captions)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            return load_file(str(path))["features"].to(device)
    with tqdm(total=len(captions), desc=f"text features ({desc})", leave=False, dynamic_ncols=True) as bar:
        feats = encode_texts(model, captions, tokenizer, batch_size=batch_size, device=device,
                             progress=lambda d, _t: bar.update(d - bar.n))
    if path is not None:
        from safetensors.torch import save

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"features": feats.contiguous()}))
    return feats.to(device)


def _text_key(model: HarmaModel, captions: list[str]) -> str:
    """Hash of the frozen text tower's weights and the captions (what the features depend on).

    Every weight byte is hashed (about 0.2 s for MiniLM's 90 MB), not the base model's name or
    file: runs on different image-tower weights with the same locked text tower share the features.
    """
    h = hashlib.sha256(model.config.model_name.encode())
    for p in text_tower_parameters(model.clip):
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    h.update("\n".join(captions).encode())
    return h.hexdigest()[:20]
