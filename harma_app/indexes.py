"""Galleries of prebuilt image indexes (``python app.py --index FOLDER ...``, from ``python -m
training.build_index``): a format-1 index (every vector and path in memory, as any gallery) or an archive
index (format 2, :class:`harma.retrieval.ArchiveIndex`: millions of rows searched as they lie on disk).

An archive's gallery holds no list of its images: :class:`harma.retrieval.identity.IndexImages` resolves a
row's file when a tile shows it (refused outside the index's image root unless ``--follow-links``), so
loading a 10-million-row archive makes no per-row Python object. It answers text -> image only; the tabs
that need every embedding or captions say so (:func:`needs_every_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harma.data import RetrievalSplit
from harma.data.readers import LINKS_HINT, follow_links_setting
from harma.errors import IndexFormatError, QueryError, one_line
from harma.io import INDEX_FILE
from harma.retrieval import EmbeddingIndex, load_index
from harma.retrieval.identity import IndexImages

from .common import AppError
from .galleries import Gallery


@dataclass
class IndexSplit:
    """What an archive gallery has in place of a :class:`RetrievalSplit`: a name, the image root and its
    rows (:class:`IndexImages`), no captions."""

    name: str
    root: Path
    images: IndexImages
    captions: tuple = ()
    text_to_image: tuple = ()
    labels: None = None

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return 0


class MissingSide:
    """The side (baseline or adapted) of an archive gallery that none of the given indexes was built by:
    the app never encodes an archive's images, so a search on this side says what to build instead."""

    images = captions = identity = None

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.from_cache: dict[str, bool] = {}

    def search_text(self, query: str, k: int = 10) -> list:
        raise QueryError(self.problem)


def index_gallery(folders: list[str], follow_links: bool = False) -> Gallery:
    """A gallery of the images of prebuilt indexes (all over the same images, e.g. adapted + baseline),
    each read with :func:`harma.retrieval.load_index` (format 1 or an archive); an index naming files
    outside its image root is refused unless ``follow_links`` (an archive's rows: when shown)."""
    indexes = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not (path / INDEX_FILE).is_file():
            raise AppError(f"--index {folder}: cannot read the index: no {INDEX_FILE} in `{path.name}` (an index "
                           "folder from python -m training.build_index)")
        try:
            indexes.append(load_index(path))
        except IndexFormatError as e:
            raise AppError(f"--index {folder}: {one_line(e)}") from None
    if indexes[0].extra.get("kind") != "images":
        raise AppError(f"--index {folders[0]} is not an image index from python -m training.build_index")
    archive = [not isinstance(index, EmbeddingIndex) for index in indexes]
    if any(archive) and not all(archive):
        raise AppError(f"--index {folders[archive.index(not archive[0])]} indexes other images than {folders[0]}")
    name = Path(folders[0]).name
    root = indexes[0].extra.get("root")
    if all(archive):
        if not root and not follow_links_setting(follow_links):
            raise AppError(f"--index {folders[0]}: this archive index records no image root, so nothing keeps its "
                           f"image paths inside one folder; rebuild it with python -m training.build_index. {LINKS_HINT}")
        rows = IndexImages(indexes[0], follow_links)
        for folder, index in zip(folders[1:], indexes[1:]):
            if not rows.covers(index):
                raise AppError(f"--index {folder} indexes other images than {folders[0]}")
        split = IndexSplit(f"index {name}", Path(root or "."), rows)
        return Gallery(f"index {name}", split, None, tuple(indexes))
    images = None
    for folder, index in zip(folders, indexes):
        try:
            paths = index.image_paths(follow_links=follow_links)
        except IndexFormatError as e:
            raise AppError(f"--index {folder}: {one_line(e)}") from None
        if images is not None and paths != images:
            raise AppError(f"--index {folder} indexes other images than {folders[0]}")
        images = paths
    split = RetrievalSplit(f"index {name}", Path(root or "."), images, [], [])
    return Gallery(f"index {name}", split, None, tuple(indexes))


def needs_every_embedding(gallery: Gallery, what: str, why: Optional[str] = None) -> None:
    """Refuse ``what`` (a tab's name) on an archive gallery with a plain message: it would need every
    embedding in memory (or captions), which an archive index keeps on disk and does not have."""
    if gallery.archive:
        raise AppError(f"**{what}** is not available for an archive index ({gallery.name}, "
                       f"{len(gallery.images):,} images searched on disk): it needs "
                       f"{why or 'every embedding in memory and captions'}. Text → image searches it; start the "
                       "app with `--data DIR` (or a smaller index) for this tab.")
