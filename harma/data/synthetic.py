"""A tiny, learnable retrieval dataset of coloured shapes, for smoke tests and demos without downloads.

Each image is one coloured shape (4 colours x 3 shapes, two sizes, four quadrants) on a noisy grey
field; its captions name the colour and shape, and most also the size or position, so a model can
learn to retrieve it. Written in the csv format ``load_split`` reads: ``train.csv`` and ``val.csv``
(columns image, caption, label_name) with the PNGs under ``images/``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harma.errors import DatasetError
from harma.io import read_json

COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (230, 205, 40)}
SHAPES = {"square": "square", "circle": "round", "triangle": "triangular"}  # name -> adjective
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATES = (
    "a {color} {shape} on a grey field",
    "there is a {color} {adj} object",
    "a {size} {color} {shape} in the {where} of the image",
    "one {color} {shape} seen from above",
    "the {where} part shows a {size} {adj} {color} shape",
    "a grey noisy background with a {color} {shape}",
    "a {size} {color} {shape}",
)
_VERSION = 1  # bump when the generator changes, so old folders are rewritten


def _draw(rng: np.random.Generator, size: int, color: str, shape: str, large: bool, quadrant: int) -> Image.Image:
    noise = rng.normal(128, 14, (size, size, 3))
    img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
    side = size * rng.uniform(0.36, 0.46) if large else size * rng.uniform(0.18, 0.26)
    half = size / 2  # the shape lies inside its quadrant, at a random offset
    x0 = (quadrant % 2) * half + rng.uniform(0, max(half - side, 0))
    y0 = (quadrant // 2) * half + rng.uniform(0, max(half - side, 0))
    box = (x0, y0, x0 + side, y0 + side)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return img


def _captions(rng: np.random.Generator, n: int, **words: str) -> list[str]:
    order = rng.permutation(len(TEMPLATES))  # a different choice of templates per image
    return [TEMPLATES[order[k % len(TEMPLATES)]].format(**words) for k in range(n)]


def _complete(root: Path, params: dict) -> bool:
    """Whether ``root`` holds every file of a dataset written with ``params``."""
    try:
        if read_json(root / "synthetic.json", DatasetError) != params:
            return False
        for split in ("train", "val"):
            with open(root / f"{split}.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            if len(rows) != params[f"{split}_images"] * params["captions_per_image"]:
                return False
            if not all((root / r["image"]).is_file() for r in rows):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def write_synthetic_dataset(
    root: str | Path,
    n_images: int = 48,
    captions_per_image: int = 5,
    image_size: int = 64,
    val_images: int | None = None,
    seed: int = 0,
) -> Path:
    """Write (or reuse) a synthetic coloured-shapes dataset and return its folder.

    Args:
        root: Dataset folder (created if needed).
        n_images: Training images.
        captions_per_image: Captions per image (templated sentences naming colour and shape).
        image_size: Side of the square PNGs, in pixels.
        val_images: Validation images, disjoint from training; default ``n_images // 4`` (at least 1).
        seed: Seed of everything random; the same arguments give byte-identical files.

    Returns:
        ``Path(root)``. If it already holds a complete dataset written with the same arguments
        (recorded in ``synthetic.json``), nothing is written.
    """
    val_images = max(1, n_images // 4) if val_images is None else val_images
    if n_images < 1 or val_images < 1 or captions_per_image < 1 or image_size < 16:
        raise ValueError("need n_images, val_images, captions_per_image >= 1 and image_size >= 16")
    root = Path(root)
    params = {"version": _VERSION, "train_images": n_images, "val_images": val_images,
              "captions_per_image": captions_per_image, "image_size": image_size, "seed": seed}
    if _complete(root, params):
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "synthetic.json").unlink(missing_ok=True)  # written last: marks the folder complete
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    total = n_images + val_images
    # balanced classes, shuffled; train and val come from one stream, so they never share an image
    labels = [classes[i] for i in rng.permutation(np.arange(total) % len(classes))]
    for split, indices in (("train", range(n_images)), ("val", range(n_images, total))):
        rows = []
        for k, i in enumerate(indices):
            color, shape = labels[i]
            large, quadrant = bool(rng.integers(2)), int(rng.integers(4))
            ref = f"images/{split}_{k:04d}.png"
            _draw(rng, image_size, color, shape, large, quadrant).save(root / ref)
            words = dict(color=color, shape=shape, adj=SHAPES[shape], size="large" if large else "small",
                         where=QUADRANTS[quadrant])
            rows += [(ref, cap, f"{color} {shape}") for cap in _captions(rng, captions_per_image, **words)]
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("image", "caption", "label_name"))
            writer.writerows(rows)
    (root / "synthetic.json").write_text(json.dumps(params, indent=1) + "\n")
    return root
