"""Torch datasets over a :class:`RetrievalSplit`: caption-level pairs for training, images alone
for encoding a gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from harma.data.images import open_image
from harma.data.split import RetrievalSplit


class PairDataset(Dataset):
    """One item per caption: ``(image, caption, image_index)``.

    Args:
        split: Split to read.
        transform: Applied to the RGB PIL image (e.g. :func:`train_transform`); ``None`` keeps PIL.
        caption_fn: Applied to the raw caption (e.g. :func:`clean_caption`); ``None`` keeps it.
        images: Optional source of decoded images by image index (e.g. an :class:`ImageCache` over
            ``split.images``); default: open the file.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        transform: Callable[[Any], Any] | None,
        caption_fn: Callable[[str], str] | None = None,
        images: Sequence[Any] | None = None,
    ) -> None:
        self.split = split
        self.transform = transform
        self.caption_fn = caption_fn
        self.images = images

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, index: int) -> tuple[Any, str, int]:
        image_index = self.split.text_to_image[index]
        image = self.images[image_index] if self.images is not None else open_image(self.split.images[image_index])
        if self.transform is not None:
            image = self.transform(image)
        caption = self.split.captions[index]
        if self.caption_fn is not None:
            caption = self.caption_fn(caption)
        return image, caption, image_index


class ImageDataset(Dataset):
    """One item per image file: ``(image, index)``.

    Args:
        paths: Image files (e.g. ``split.images``).
        transform: Applied to the RGB PIL image (e.g. :func:`eval_transform`); ``None`` keeps PIL.
        images: Optional source of decoded images by index (e.g. an :class:`ImageCache`).
    """

    def __init__(
        self, paths: Sequence[str | Path], transform: Callable[[Any], Any] | None,
        images: Sequence[Any] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index] if self.images is not None else open_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, index
