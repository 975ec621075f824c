"""The retrieval split: a gallery of images, their captions and the caption -> image map."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harma.errors import ConfigError, DatasetError


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


CARVES = ("block", "random")
_TRAILING_NUMBER = re.compile(r"^(.*?)[_-]?(\d+)$")


def image_classes(split: RetrievalSplit, class_size: int = 100) -> tuple[list[str], list[int]]:
    """The scene class and the position within it of every image, for carving by class.

    The class is the split's label where the format has one (RSICD ``label_name``); else the file
    name's prefix before a trailing number (``airport_12.jpg`` -> ``airport``); else, for purely
    numeric names, blocks of ``class_size`` consecutive ids (UCM: ``1.jpg``-``100.jpg`` are the first
    class, ``101.jpg``-``200.jpg`` the second, ...). The position is the trailing number (or the
    name), so neighbouring ids are neighbours.

    Returns:
        ``(classes, positions)``: per image a class key and a sort key within the class.
    """
    if class_size < 1:
        raise ConfigError(f"class_size must be >= 1, got {class_size}")
    classes, positions = [], []
    for i, path in enumerate(split.images):
        m = _TRAILING_NUMBER.match(path.stem)
        number = int(m.group(2)) if m else None
        if split.labels is not None:
            cls = split.labels[i]
        elif m and m.group(1):
            cls = m.group(1)
        elif m:
            cls = f"ids {(number - 1) // class_size * class_size + 1}-{((number - 1) // class_size + 1) * class_size}"
        else:
            raise DatasetError(
                f"{split.name}: cannot tell the scene class of {path.name} (no label in the annotations, "
                "no trailing number in the file name); carve the validation split at random instead "
                "(data.carve=random / --carve random)")
        classes.append(cls)
        positions.append(number if number is not None else i)
    return classes, positions


# UC Merced Land Use's 21 classes in id order (Yang & Newsam 2010): ids 1-100 the first, 101-200 the second, ...
UCM_CLASSES = ("agricultural", "airplane", "baseball diamond", "beach", "buildings", "chaparral",
               "dense residential", "forest", "freeway", "golf course", "harbor", "intersection",
               "medium residential", "mobile home park", "overpass", "parking lot", "river", "runway",
               "sparse residential", "storage tanks", "tennis court")
CLASSES_FILE = "classes.txt"  # beside the annotations: one class name a line, for numbered blocks of ids


def scene_names(split: RetrievalSplit, class_size: int = 100) -> list[str]:
    """The scene class of every image by name, for showing (:func:`image_classes` keys it for carving).

    Labels and file-name prefixes are names already. Purely numeric file names are blocks of
    ``class_size`` ids (:func:`image_classes`); block ``k`` (ids ``k*class_size+1`` ...) is named by line
    ``k + 1`` of ``classes.txt`` in the dataset folder when there is one, else by UC Merced's classes
    (:data:`UCM_CLASSES`, alphabetical) when the ids fill exactly its 21 blocks of 100 (1-2100, the
    last block present), else stays ``"ids 1-100"``.

    Raises:
        DatasetError: as :func:`image_classes`; or a ``classes.txt`` with fewer names than blocks.
    """
    classes, positions = image_classes(split, class_size)
    blocks = [(p - 1) // class_size if c.startswith("ids ") else None for c, p in zip(classes, positions)]
    if split.labels is not None or all(b is None for b in blocks):
        return classes
    names_file = Path(split.root) / CLASSES_FILE
    if names_file.is_file():
        try:
            names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{names_file}: cannot read the class names ({e})") from None
        top = max(b for b in blocks if b is not None)
        if top >= len(names):
            raise DatasetError(f"{names_file}: {len(names)} class names, but image ids go up to block {top + 1} "
                               f"(ids {top * class_size + 1}-{(top + 1) * class_size}); one name a line, in id order")
    elif class_size == 100 and max(b for b in blocks if b is not None) == len(UCM_CLASSES) - 1:
        names = list(UCM_CLASSES)
    else:
        return classes
    return [names[b] if b is not None else c for c, b in zip(classes, blocks)]


def carve_block_split(
    split: RetrievalSplit, val_fraction: float = 0.1, class_size: int = 100
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Split by image into (train, val) with the first block of ids of every scene class as val.

    Datasets of tiled scenes (UCM: 100 consecutive ids per class, neighbouring ids often tiles of
    one area) leak through a random carve: near-duplicate neighbours and their templated captions
    land on both sides. UCM's official test split is the last block of ids of each class, with
    training ids on one side of it only. This carve takes each class's first ``round(n *
    val_fraction)`` ids (at least 1, at most n - 1): a block that also has training ids on one side
    only, and that leaves the test block's own neighbours in training, as the official protocol
    does. (Carving the block just before the test block instead takes the test images' nearest
    neighbours out of training and depresses every test number: README "Results".) On UCM train
    (9 per class, 189 images) 81% of its captions occur verbatim in the rest, against 92% for a
    random carve. Deterministic: no seed. Classes are found by :func:`image_classes`.

    Returns:
        ``(train, val)`` named ``"<name>:train"`` and ``"<name>:val"``, in the original image order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    classes, positions = image_classes(split, class_size)
    members: dict[str, list[int]] = {}
    for i, cls in enumerate(classes):
        members.setdefault(cls, []).append(i)
    val: set[int] = set()
    for cls, ids in members.items():
        if len(ids) < 2:
            raise DatasetError(f"{split.name}: class {cls!r} has {len(ids)} image; a block carve needs at "
                             "least 2 per class (or carve at random)")
        ids = sorted(ids, key=lambda i: (positions[i], split.images[i].name))
        n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
        val.update(ids[:n_val])
    train = [i for i in range(split.num_images) if i not in val]
    return (
        split.subset(train, name=f"{split.name}:train"),
        split.subset(sorted(val), name=f"{split.name}:val"),
    )


def carve(
    split: RetrievalSplit, mode: str = "block", val_fraction: float = 0.1, seed: int = 0, class_size: int = 100
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Carve a validation split from ``split``: ``"block"`` (:func:`carve_block_split`, the default;
    ``seed`` unused) or ``"random"`` (:func:`carve_split`, leaky for datasets of tiled scenes such as UCM)."""
    if mode == "block":
        return carve_block_split(split, val_fraction, class_size)
    if mode == "random":
        return carve_split(split, val_fraction, seed)
    raise ConfigError(f"carve={mode!r} is not one of {', '.join(CARVES)}")


def carve_split(
    split: RetrievalSplit, val_fraction: float = 0.1, seed: int = 0
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Split by image into (train, val) at random: all captions of an image stay on one side.

    Deterministic for a given ``seed``; both parts keep the original image order. At least one
    image goes to each side. Leaky for datasets of tiled scenes (UCM), where neighbouring images
    of a class are near-duplicates: prefer :func:`carve_block_split` there.

    Args:
        split: The split to carve.
        val_fraction: Fraction of images for validation, in (0, 1).
        seed: Seed of the shuffle that picks the validation images.

    Returns:
        ``(train, val)``, named ``"<name>:train"`` and ``"<name>:val"``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = split.num_images
    if n < 2:
        raise DatasetError(f"{split.name}: need at least 2 images to carve a split, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return (
        split.subset(train, name=f"{split.name}:train"),
        split.subset(val, name=f"{split.name}:val"),
    )
