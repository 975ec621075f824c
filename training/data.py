"""Training data from a ``DataConfig``: the train/val(/test) splits, transforms and the train loader.

Model selection uses a validation split, never the test split (method.md §7.13): a named one
(RSITMD/RSICD ``val``) or, for datasets without one (UCM), a carve of train: by default a contiguous
block of ids per scene class, as UCM's test split is made (``data.carve``); ``data.carve=none``
selects nothing: no validation, the whole train split trains and the last epoch is the result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from harma.config import to_dict
from harma.data import (
    CLIP_MEAN,
    CLIP_STD,
    DatasetError,
    PairDataset,
    RetrievalSplit,
    carve,
    clean_caption,
    eval_transform,
    load_split,
    train_transform,
)
from harma.data.synthetic import write_synthetic_dataset
from harma.errors import ConfigError
from training.config import NO_CARVE, DataConfig
from training.sampler import ResumableBatchSampler, SeededDataset

SYNTHETIC = "synthetic"


@dataclass
class Splits:
    """The splits of one run and where they came from (stored with the best checkpoint)."""

    train: RetrievalSplit
    val: Optional[RetrievalSplit]  # None with data.carve=none: no validation, the last epoch is kept
    test: Optional[RetrievalSplit]
    root: Path

    def info(self, cfg: DataConfig) -> dict[str, Any]:
        """JSON-ready provenance: the data config with the resolved dataset folder, and the sizes;
        enough for ``training.evaluate`` to rebuild exactly these splits."""
        return {**to_dict(cfg), "root": str(self.root.resolve()), "root_config": cfg.root,
                "sizes": {name: [s.num_images, s.num_captions] for name, s in
                          (("train", self.train), ("val", self.val), ("test", self.test)) if s is not None}}


def prepare_root(cfg: DataConfig, run_dir: Path, seed: int, write: bool) -> Path:
    """The dataset folder; for ``root: synthetic`` a generated dataset under ``<run_dir>/synthetic``.

    Args:
        cfg: data section.
        run_dir: the run folder (synthetic data lives there, so a run is self-contained).
        seed: generation seed of the synthetic images.
        write: generate the synthetic dataset if missing (main rank only; others wait at a barrier).
    """
    if cfg.root != SYNTHETIC:
        if not cfg.root:
            raise DatasetError("data.root is empty: set it to a dataset folder or to 'synthetic'")
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"data.root={cfg.root}: no such folder")
        return root
    root = run_dir / SYNTHETIC
    if write:  # a no-op when the folder already holds this exact dataset (e.g. on resume)
        write_synthetic_dataset(root, n_images=cfg.synthetic_images, seed=seed)
    return root


def _load(root: Path, cfg: DataConfig, split: str, role: str) -> RetrievalSplit:
    try:
        out = load_split(root, split, format=cfg.format, expected_captions_per_image=cfg.captions_per_image,
                         allow_empty=cfg.allow_empty)
    except DatasetError as e:
        hint = " (or data.val_split=null to carve a validation split from train)" if role == "val" else ""
        raise DatasetError(f"data.{role}_split={split!r}: {e}{hint}") from None
    if out.num_captions == 0:
        raise DatasetError(f"data.{role}_split={split!r}: {out.name} has no captions; "
                           "training needs image-caption pairs")
    return out


def build_splits(cfg: DataConfig, root: Path) -> Splits:
    """Load train, val (named or carved from train) and the optional test split."""
    train = _load(root, cfg, cfg.train_split, "train")
    if cfg.val_split is None and cfg.carve == NO_CARVE:
        val = None
    elif cfg.val_split is None:
        try:
            train, val = carve(train, cfg.carve, cfg.val_fraction, cfg.carve_seed, cfg.carve_class_size)
        except (ConfigError, DatasetError) as e:
            raise DatasetError(f"data.carve={cfg.carve}: {e}") from None
    else:
        if cfg.val_split == cfg.train_split:
            raise DatasetError(f"data.val_split equals data.train_split ({cfg.train_split!r}); "
                               "use data.val_split=null to carve a disjoint validation split")
        val = _load(root, cfg, cfg.val_split, "val")
    test = _load(root, cfg, cfg.test_split, "test") if cfg.test_split else None
    return Splits(train=train, val=val, test=test, root=root)


def image_spec(clip: torch.nn.Module) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) of an open_clip model's image tower (as ``harma.create_model``)."""
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size, tuple(pp.get("mean", CLIP_MEAN)), tuple(pp.get("std", CLIP_STD))


def build_transforms(augment: str, clip: torch.nn.Module) -> tuple[Callable, Callable]:
    """(train transform, eval transform) for ``data.augment``: released | rotations | dihedral | none."""
    size, mean, std = image_spec(clip)
    evaluate = eval_transform(size, mean, std)
    if augment == "none":
        return evaluate, evaluate
    if augment == "dihedral":
        return train_transform(size, mean, std, scale=(0.8, 1.0), randaugment=False, rotations=True), evaluate
    return train_transform(size, mean, std, rotations=augment == "rotations"), evaluate


def caption_fn(cfg: DataConfig) -> Optional[Callable[[str], str]]:
    """The released ``pre_caption`` (lower-case, no punctuation, ``max_words``), or None (raw)."""
    return functools.partial(clean_caption, max_words=cfg.max_words) if cfg.clean_captions else None


class Collate:
    """Stack images, tokenise captions (in the worker, off the training process), keep image ids and
    caption (sample) ids. With ``tokenize=False`` (text features cached) tokens are an empty tensor."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], tokenize: bool = True) -> None:
        self.tokenizer, self.tokenize = tokenizer, tokenize

    def __call__(self, batch: list[tuple[torch.Tensor, str, int, int]]) -> tuple[torch.Tensor, ...]:
        images, captions, ids, caption_ids = zip(*batch)
        tokens = self.tokenizer(list(captions)) if self.tokenize else torch.empty(0, dtype=torch.long)
        return (torch.stack(images), tokens, torch.tensor(ids, dtype=torch.long),
                torch.tensor(caption_ids, dtype=torch.long))


def _label_groups(split: RetrievalSplit, per_batch: int, global_batch: int) -> dict[str, Any]:
    """Sampler arguments for ``data.label_batches``: the class of each caption's image."""
    if not per_batch:
        return {}
    if split.labels is None:
        raise DatasetError(f"{split.name}: data.label_batches={per_batch} needs a class label per image, "
                           "and this split has none (e.g. HarMA JSON label_name, a CSV label_name column)")
    if global_batch % per_batch:
        raise DatasetError(f"data.label_batches={per_batch} must divide the global batch {global_batch}")
    names = {name: i for i, name in enumerate(sorted(set(split.labels)))}
    if len(names) < per_batch:
        raise DatasetError(f"{split.name}: data.label_batches={per_batch} but the split has only {len(names)} classes")
    return {"groups": [names[split.labels[i]] for i in split.text_to_image], "groups_per_batch": per_batch}


def build_train_loader(split: RetrievalSplit, transform: Callable, tokenizer: Callable, cfg: DataConfig, *,
                       batch_size: int, world_size: int, rank: int, seed: int, pin_memory: bool = False,
                       images: Optional[Any] = None, tokenize: bool = True) -> tuple[DataLoader, ResumableBatchSampler]:
    """The train loader and its sampler (call ``sampler.set_epoch(epoch, start_step)`` per epoch).

    Yields ``(images (B,3,H,W), tokens (B,L), image_ids (B,), caption_ids (B,))``; ``image_ids``
    index the train split's images and are the soft-target ids of the contrastive loss;
    ``caption_ids`` index its captions. ``images``: an optional decoded-image source
    (:class:`harma.data.ImageCache`); ``tokenize=False`` when text features are cached.
    """
    dataset = SeededDataset(PairDataset(split, transform, caption_fn(cfg), images=images), seed)
    sampler = ResumableBatchSampler(len(dataset), batch_size, world_size=world_size, rank=rank, seed=seed,
                                    **_label_groups(split, cfg.label_batches, batch_size * world_size))
    if sampler.steps_per_epoch == 0:
        raise DatasetError(f"{split.name}: {len(dataset)} training pairs are fewer than one global batch "
                           f"({batch_size} x {world_size} processes); lower run.batch_size")
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=Collate(tokenizer, tokenize),
        pin_memory=pin_memory,
        # own generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed + rank),
    )
    return loader, sampler
