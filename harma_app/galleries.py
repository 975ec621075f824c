"""Galleries: the images searched (and their caption pool), from a dataset folder, prebuilt image indexes
(``python -m training.build_index``) or uploaded files, and the browser-displayable copy of an image."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harma.data import DatasetError, RetrievalSplit, image_classes, load_split, open_image
from harma.errors import IndexFormatError, one_line
from harma.retrieval import CaptionPool, EmbeddingIndex

from .common import DEMO, HOW_TO_DATA, MAX_UPLOADS, AppError


@dataclass
class Gallery:
    name: str
    split: RetrievalSplit
    pool: Optional[CaptionPool]  # None: no captions (image-to-text and the metrics need them)
    prebuilt: tuple = ()  # EmbeddingIndex(es) from training.build_index over these images
    bundled: bool = False  # the demo gallery shipped in assets/demo (its maps may be shipped too)

    @functools.cached_property
    def classes(self) -> Optional[list[str]]:
        """The scene class of every image (:func:`harma.data.image_classes`), or None when the file
        names and annotations carry none (e.g. uploads)."""
        try:
            return image_classes(self.split)[0]
        except DatasetError:
            return None

    @property
    def images(self) -> list[Path]:
        return self.split.images

    def describe(self) -> str:
        caps = (f", {self.split.num_captions:,} captions ({len(self.pool):,} distinct)" if self.pool
                else " (no captions: text → image only)")
        return f"**{self.name}**: {self.split.num_images:,} images{caps}"


def dataset_gallery(root: str, split: Optional[str] = None) -> Gallery:
    """Load a split (missing images are dropped with a warning); default: the first of test, val, train."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise AppError(f"dataset folder `{path}` does not exist or is not a folder. {HOW_TO_DATA}")
    errors = []
    for name in [split] if split else ["test", "val", "train"]:
        try:
            s = load_split(path, name, allow_missing=True)
            break
        except DatasetError as e:
            errors.append(e)
    else:
        raise AppError(one_line(errors[-1]))
    pool = CaptionPool.from_captions(s.captions, s.text_to_image) if s.num_captions else None
    if path.resolve() == DEMO.resolve():
        name = ("bundled demo gallery: UCM-Captions test split (USGS public-domain imagery, captions by "
                "Qu et al. 2016; assets/demo/CREDITS.md); `--data DIR` for your own")
        return Gallery(name, s, pool, bundled=True)
    return Gallery(s.name, s, pool)


def index_gallery(folders: list[str]) -> Gallery:
    """A gallery of the images of prebuilt indexes (all over the same images, e.g. adapted + baseline)."""
    indexes = []
    for folder in folders:
        try:
            indexes.append(EmbeddingIndex.load(Path(folder).expanduser()))
        except IndexFormatError as e:
            raise AppError(f"--index {folder}: {one_line(e)}") from None
    images = indexes[0].image_paths()
    for folder, other in zip(folders[1:], indexes[1:]):
        if other.image_paths() != images:
            raise AppError(f"--index {folder} indexes other images than {folders[0]}")
    if indexes[0].extra.get("kind") != "images":
        raise AppError(f"--index {folders[0]} is not an image index from python -m training.build_index")
    name = Path(folders[0]).name
    split = RetrievalSplit(f"index {name}", Path(indexes[0].extra.get("root") or "."), images, [], [])
    return Gallery(f"index {name}", split, None, tuple(indexes))


def upload_gallery(files: list, cache_dir: Path) -> tuple[str, Gallery, list[str]]:
    """Copy readable uploaded images (as PNG, longest side <= 1024) into the cache; returns (key, gallery, skipped)."""
    paths = [str(getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise AppError("choose one or more image files first")
    if len(paths) > MAX_UPLOADS:
        raise AppError(f"{len(paths)} files: upload at most {MAX_UPLOADS} images, or start the app with `--data DIR`")
    good, skipped, h = [], [], hashlib.sha256()
    for p in paths:
        try:
            img = open_image(p)
        except DatasetError as e:
            skipped.append(f"{Path(p).name} ({one_line(e).split(': ', 1)[-1]})")
            continue
        good.append((Path(p).stem, img))
        h.update(Path(p).read_bytes())
    if not good:
        raise AppError("none of the uploaded files is a readable image: " + "; ".join(skipped))
    key = f"upload:{h.hexdigest()[:16]}"
    folder = cache_dir / "uploads" / key.split(":")[1]
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, (stem, img) in enumerate(good):
            img.thumbnail((1024, 1024))
            img.save(folder / f"{i:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60]}.png")
        (folder / ".complete").touch()
    s = load_split(folder, format="image_folder")
    return key, Gallery(f"uploaded images ({s.num_images})", s, None), skipped


def uploaded_gallery(key: str, cache_dir: Path) -> Gallery:
    """The gallery of an earlier upload (``upload:HASH``), still in the cache folder."""
    folder = cache_dir / "uploads" / key.partition(":")[2]
    if not key.startswith("upload:") or not (folder / ".complete").is_file():
        raise AppError("this uploaded gallery is gone; upload the images again")
    s = load_split(folder, format="image_folder")
    return Gallery(f"uploaded images ({s.num_images})", s, None)


def displayable(path: Path, thumbs: Path) -> str:
    """Browsers do not show TIFF: a JPEG copy (longest side <= 256) is written once under ``thumbs``
    and served instead, so repeated queries cost no image encoding."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return str(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    out = thumbs / (key + ".jpg")
    if not out.is_file():
        img = open_image(path)
        img.thumbnail((256, 256))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.{os.getpid()}.{threading.get_ident()}.jpg")
        img.save(tmp, quality=92)
        os.replace(tmp, out)
    return str(out)
