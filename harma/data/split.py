"""The retrieval split: a gallery of images, their captions and the caption -> image map."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harma.data.errors import DatasetError


@dataclass
class RetrievalSplit:
    """Images and captions of one split; caption ``t`` describes image ``text_to_image[t]``."""

    name: str  # e.g. "rsicd/val"
    root: Path  # dataset folder
    images: list[Path]  # absolute paths, unique, deterministic order
    captions: list[str]  # raw captions; empty for a caption-less gallery
    text_to_image: list[int]  # caption index -> image index
    labels: list[str] | None = None  # per-image class name, when the format has one

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.images = [p if isinstance(p, Path) else Path(p) for p in self.images]
        n = len(self.images)
        if len(self.captions) != len(self.text_to_image):
            raise DatasetError(
                f"{self.name}: {len(self.captions)} captions but "
                f"{len(self.text_to_image)} text_to_image entries"
            )
        bad = next((t for t in self.text_to_image if not 0 <= t < n), None)
        if bad is not None:
            raise DatasetError(f"{self.name}: text_to_image holds {bad}, outside 0..{n - 1}")
        if self.labels is not None and len(self.labels) != n:
            raise DatasetError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if len(set(self.images)) != n:
            raise DatasetError(f"{self.name}: image paths are not unique")

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_to_texts(self) -> list[list[int]]:
        """Caption indices of every image, in caption order."""
        out: list[list[int]] = [[] for _ in self.images]
        for t, i in enumerate(self.text_to_image):
            out[i].append(t)
        return out

    def subset(self, image_indices: Sequence[int], name: str | None = None) -> RetrievalSplit:
        """Keep the given images (in the given order) and their captions (in original order).

        Args:
            image_indices: Unique indices into ``images``.
            name: Name of the new split; defaults to this split's name.

        Returns:
            A new split whose ``text_to_image`` points into the kept images.
        """
        index = {int(i): new for new, i in enumerate(image_indices)}
        if len(index) != len(image_indices):
            raise ValueError("subset: image_indices contains duplicates")
        if any(not 0 <= i < self.num_images for i in index):
            raise ValueError(f"subset: image index out of range 0..{self.num_images - 1}")
        kept = [t for t, i in enumerate(self.text_to_image) if i in index]
        return RetrievalSplit(
            name=self.name if name is None else name,
            root=self.root,
            images=[self.images[i] for i in index],
            captions=[self.captions[t] for t in kept],
            text_to_image=[index[self.text_to_image[t]] for t in kept],
            labels=None if self.labels is None else [self.labels[i] for i in index],
        )


def carve_split(
    split: RetrievalSplit, val_fraction: float = 0.1, seed: int = 0
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Split by image into (train, val): all captions of an image stay on one side.

    Used for datasets without a validation file (UCM). Deterministic for a given ``seed``; both
    parts keep the original image order. At least one image goes to each side.

    Args:
        split: The split to carve.
        val_fraction: Fraction of images for validation, in (0, 1).
        seed: Seed of the shuffle that picks the validation images.

    Returns:
        ``(train, val)``, named ``"<name>:train"`` and ``"<name>:val"``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = split.num_images
    if n < 2:
        raise ValueError(f"{split.name}: need at least 2 images to carve a split, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return (
        split.subset(train, name=f"{split.name}:train"),
        split.subset(val, name=f"{split.name}:val"),
    )
