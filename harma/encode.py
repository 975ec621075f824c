"""Batched encoding of images and captions, and full-matrix evaluation of one retrieval split.

Follows the HarMA evaluation (method.md §0.7, §4.1): every image and every caption of the split is
encoded once, the full image x caption cosine matrix is scored with R@1/5/10 in both directions,
and the modality-gap diagnostics of :mod:`harma.gap` are computed on the same embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .data import ImageDataset, RetrievalSplit, clean_caption
from .data.images import decode_failures, decode_signature
from .errors import DatasetError, NonFiniteEmbeddingError, one_line
from .gap import canonical_order, modality_gap
from .io import atomic_write_bytes, hash_files
from .metrics import retrieval_metrics

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (done, total)


def unreadable_images(paths: Sequence[Union[str, Path]], cache_dir: Optional[Union[str, Path]] = None,
                      progress: Optional[Progress] = None) -> list[tuple[int, str]]:
    """``(index, reason)`` of every image :func:`harma.data.open_image` cannot decode, in order: the
    images :func:`~harma.retrieval.build_image_index` skips, found before encoding so that a gallery can
    leave them out (with their captions) instead of stopping at the first.

    Args:
        paths: image files.
        cache_dir: where to remember the answer for exactly these files (path, size, modification
            time) and this band choice, so a gallery is decoded once; None, or a folder that cannot be
            written: check every time.
        progress: ``progress(done, total)``.
    """
    memo = None
    if cache_dir is not None:
        key = hash_files(hashlib.sha256(f"unreadable-v2|{decode_signature()}".encode()), paths).hexdigest()[:24]
        memo = Path(cache_dir) / f"unreadable-{key}.json"
        try:
            return [(int(i), str(why)) for i, why in json.loads(memo.read_text())]
        except (OSError, ValueError, TypeError):
            pass  # not checked yet (or an unreadable memo): check
    bad = [(i, one_line(e)) for i, e in decode_failures(paths, progress)]
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(memo, json.dumps(bad).encode())
        except OSError as e:
            log.warning("cannot remember the image check in %s: %s", memo.parent, e)
    return bad


def check_finite_embeddings(emb: torch.Tensor, kind: str, names: Sequence[Any]) -> None:
    """Raise :class:`NonFiniteEmbeddingError` naming the first item whose embedding is not finite."""
    bad = ~torch.isfinite(emb).all(dim=-1)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise NonFiniteEmbeddingError(
            f"the model gives NaN or infinite {kind} embeddings for {int(bad.sum())} of {len(bad)} items "
            f"(first: {names[first]}); check the weights it was built from")


def bar_progress(bar: Any) -> Progress:
    """A :data:`Progress` callback driving a tqdm bar (its total follows the callback's)."""

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return update


Device = Union[str, torch.device, None]

# one lock per model and per tokenizer, for as long as the object lives (model_lock)
_LOCKS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()
_SHARED_LOCK = threading.RLock()


def model_lock(obj: Any) -> "contextlib.AbstractContextManager[bool]":
    """The lock serialising calls into ``obj`` (a model or a tokenizer), one per object for its lifetime.

    Every retriever, scene index and :func:`encode_images` / :func:`encode_texts` batch over the same model
    takes the same lock, so a gallery being encoded and a visitor's query take turns batch by batch, and a
    fast tokenizer (which refuses concurrent use: "Already borrowed") is never called twice at once. Calls
    into different models run at once. The lock is reentrant: a holder may call the encoders."""
    with _LOCKS_LOCK:
        try:
            lock = _LOCKS.get(obj)
            if lock is None:
                lock = _LOCKS[obj] = threading.RLock()
        except TypeError:  # not weakly referable or not hashable: the one shared lock
            lock = _SHARED_LOCK
        return lock


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag is restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module, device: Device) -> torch.device:
    """``device`` if given, else the device of the model's first parameter (CPU for none)."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def encode_images(
    model: nn.Module,
    images: Sequence[Union[str, Path]],
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 128,
    device: Device = None,
    num_workers: int = 0,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """L2-normalised embeddings of image files, in order.

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_image(x, normalize=True)``).
        images: image file paths.
        transform: PIL image -> (3, H, W) tensor, e.g. the ``preprocess_val`` of ``create_model``.
        batch_size: images per forward pass.
        device: where to run; default: the model's device. The model is not moved.
        num_workers: DataLoader worker processes decoding images.
        progress: called as ``progress(done, total)`` after every batch.

    Returns:
        (N, D) float32 tensor on the CPU.
    """
    _check_batch_size(batch_size)
    dev = model_device(model, device)
    loader = DataLoader(ImageDataset(images, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    out: list[torch.Tensor] = []
    done, total = 0, len(images)
    with eval_mode(model), torch.inference_mode():
        for pixels, _ in loader:
            with model_lock(model):
                emb = model.encode_image(pixels.to(dev, non_blocking=True), normalize=True)
            out.append(unit_rows(emb))
            done += pixels.shape[0]
            if progress is not None:
                progress(done, total)
    return torch.cat(out) if out else torch.empty(0, 0)


def encode_texts(
    model: nn.Module,
    captions: Sequence[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int = 256,
    device: Device = None,
    progress: Optional[Progress] = None,
) -> torch.Tensor:
    """L2-normalised embeddings of captions, in order (captions are used as given).

    Args:
        model: a :class:`harma.HarmaModel` (anything with ``encode_text(tokens, normalize=True)``).
        captions: the texts.
        tokenizer: list of strings -> (B, L) token ids, e.g. ``open_clip.get_tokenizer(name)``.
        batch_size: captions per forward pass.
        device: where to run; default: the model's device.
        progress: called as ``progress(done, total)`` after every batch.

    Returns:
        (N, D) float32 tensor on the CPU.
    """
    _check_batch_size(batch_size)
    dev = model_device(model, device)
    captions = list(captions)
    out: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for b0 in range(0, len(captions), batch_size):
            with model_lock(model), model_lock(tokenizer):
                emb = model.encode_text(tokenizer(captions[b0 : b0 + batch_size]).to(dev), normalize=True)
            out.append(unit_rows(emb))
            if progress is not None:
                progress(min(b0 + batch_size, len(captions)), len(captions))
    return torch.cat(out) if out else torch.empty(0, 0)


def unit_rows(emb: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 rows on the CPU (re-normalised in fp32, in case the model ran in half)."""
    return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()


@dataclass
class EvalResult:
    """Retrieval metrics (percentages) and modality-gap diagnostics of one split."""

    metrics: dict[str, float]  # i2t_R@1/5/10, t2i_R@1/5/10, mR
    gap: dict[str, float]  # harma.gap.modality_gap keys; empty when not computed
    num_images: int
    num_captions: int

    def to_dict(self) -> dict[str, Any]:
        """The 7 metric keys at top level, the gap numbers under ``"gap"``, and the counts."""
        return {**self.metrics, "gap": dict(self.gap), "num_images": self.num_images,
                "num_captions": self.num_captions}


def evaluate_split(
    model: nn.Module,
    split: RetrievalSplit,
    transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    clean_captions: bool = True,
    max_words: Optional[int] = 30,
    batch_size: int = 128,
    device: Device = None,
    num_workers: int = 0,
    progress: Optional[Progress] = None,
    gap: bool = True,
    text_embeddings: Optional[torch.Tensor] = None,
    ties: str = "expected",
) -> EvalResult:
    """Encode a whole split and score the full image x caption similarity matrix.

    Args:
        model: a :class:`harma.HarmaModel`.
        split: images, captions and the caption -> image map (e.g. 5 captions per image).
        transform: evaluation image transform.
        tokenizer: the model's tokenizer.
        clean_captions: normalise captions with :func:`harma.data.clean_caption` first (the
            released protocol does this for evaluation too).
        max_words: caption word limit used when cleaning.
        batch_size: images per batch; captions are encoded in batches twice this size.
        device: where to run; default: the model's device.
        num_workers: DataLoader workers for image decoding.
        progress: ``progress(done, total)`` over images then captions (total = both counts).
        gap: also compute :func:`harma.gap.modality_gap` (needs >= 2 images and captions).
        text_embeddings: precomputed normalised caption embeddings (N_txt, D) to use instead of
            encoding the captions (a frozen text tower's features are the same every epoch).
        ties: tie rule of the R@K metrics (:func:`harma.metrics.retrieval_metrics`).

    Identical captions (after cleaning) are encoded and scored once, so they tie exactly whatever
    their batch or their position in the file; with the default ``ties="expected"`` the metrics do
    not depend on the order of the images or captions, and the gap numbers take the rows in
    :func:`harma.gap.canonical_order`, so neither do they.

    Returns:
        An :class:`EvalResult`.
    """
    if split.num_captions == 0:
        raise DatasetError(f"{split.name}: the split has no captions, so retrieval cannot be evaluated")
    if split.num_images == 0:
        raise DatasetError(f"{split.name}: the split has no images")
    captions = [clean_caption(c, max_words) for c in split.captions] if clean_captions else list(split.captions)
    slot: dict[str, int] = {}  # distinct text -> its row among the distinct captions
    inverse = torch.tensor([slot.setdefault(c, len(slot)) for c in captions], dtype=torch.long)
    distinct = list(slot)
    n_img, total = split.num_images, split.num_images + len(distinct)

    def img_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(done, total)

    def txt_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(n_img + done, total)

    img = encode_images(model, split.images, transform, batch_size=batch_size, device=device,
                        num_workers=num_workers, progress=img_progress)
    if text_embeddings is not None:
        if text_embeddings.shape[0] != split.num_captions:
            raise ValueError(f"{split.name}: {text_embeddings.shape[0]} text embeddings for {split.num_captions} captions")
        first_rows = torch.zeros(len(distinct), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(captions)), reduce="amin", include_self=False)
        txt = text_embeddings.float().cpu()[first_rows]
    else:
        txt = encode_texts(model, distinct, tokenizer, batch_size=2 * batch_size, device=device,
                           progress=txt_progress)
    check_finite_embeddings(img, "image", [p.name for p in split.images])
    check_finite_embeddings(txt, "caption", distinct)
    sim = (img @ txt.T)[:, inverse]  # (N_img, N_txt) cosine similarities; equal texts, equal columns
    txt = txt[inverse]
    metrics = retrieval_metrics(sim, split.text_to_image, ties=ties)
    diag = {}
    if gap:  # rows in an order set by paths and texts, so the sampled numbers ignore the file's order
        img_order, txt_order, t2i = canonical_order([str(p) for p in split.images], captions, split.text_to_image)
        diag = modality_gap(img[img_order], txt[txt_order], t2i)
    return EvalResult(metrics=metrics, gap=diag, num_images=split.num_images, num_captions=split.num_captions)
