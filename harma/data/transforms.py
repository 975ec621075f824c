"""Image transforms of the released recipe (``dataset/__init__.py`` L15-57, method.md §3).

RandAugment is torchvision's, set to approximate the released ``RandomAugment(2, 7)``: 11
magnitude bins make magnitude 7 mean 7/10 of the range (rotate ±21°, shear ±0.21, as released) and
the fill is grey (128). Its op list differs slightly from the released one.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = int | tuple[int, int]


class RandomRightAngleRotation:
    """Rotate by 0, 90, 180 or 270 degrees, uniformly (aerial images have no "up")."""

    _PIL = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        k = random.randrange(4)
        if k == 0:
            return img
        if isinstance(img, torch.Tensor):
            return torch.rot90(img, k, dims=(-2, -1))
        return img.transpose(self._PIL[k])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _size(image_size: Size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def train_transform(
    image_size: Size,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    randaugment: bool = True,
    rotations: bool = False,
) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform: random resized crop, flips, RandAugment, normalisation.

    Args:
        image_size: Output side (or ``(h, w)``).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        scale: Area range of ``RandomResizedCrop``.
        randaugment: Add RandAugment(2 ops, magnitude 7 of 10).
        rotations: Add random right-angle rotations and vertical flips (not in the release).

    Returns:
        A callable mapping an RGB PIL image to a normalised (3, H, W) tensor.
    """
    steps: list[Callable] = []
    if rotations:  # before the crop, so a non-square output size is kept
        steps += [RandomRightAngleRotation(), T.RandomVerticalFlip()]
    steps += [
        T.RandomResizedCrop(_size(image_size), scale=scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
    ]
    if randaugment:
        steps.append(T.RandAugment(num_ops=2, magnitude=7, num_magnitude_bins=11, fill=[128] * 3))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(
    image_size: Size,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation transform: bicubic resize to a square (no crop, as released), normalisation.

    Args:
        image_size: Output side (or ``(h, w)``).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.

    Returns:
        A callable mapping an RGB PIL image to a normalised (3, H, W) tensor.
    """
    return T.Compose(
        [
            T.Resize(_size(image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
