"""Load a retrieval split from a dataset folder, whatever its annotation format.

Formats: HarMA JSON, PE-RSITR txt, csv/tsv, jsonl, and a bare image folder. Image references are
resolved against the dataset folder or its ``images/`` sub-folder, whichever holds them.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable

from harma.data.annotations import Annotations
from harma.data.images import IMAGE_EXTENSIONS, scan_images
from harma.data.json_format import json_splits, read_harma_json
from harma.data.split import RetrievalSplit
from harma.data.table_format import csv_splits, jsonl_splits, read_csv, read_jsonl
from harma.data.txt_format import read_pe_rsitr_txt, txt_splits
from harma.errors import DatasetError

logger = logging.getLogger(__name__)

# Annotated formats in detection order: (split lister, reader, what detection looks for).
_ANNOTATED: dict[str, tuple[Callable, Callable[[Path, str], Annotations], str]] = {
    "harma_json": (json_splits, read_harma_json, "*_<split>.json or <split>.json"),
    "pe_rsitr_txt": (txt_splits, read_pe_rsitr_txt, "<split>_filename.txt + <split>_caps.txt"),
    "csv": (csv_splits, read_csv, "<split>.csv or <split>.tsv"),
    "jsonl": (jsonl_splits, read_jsonl, "<split>.jsonl"),
}
FORMATS = (*_ANNOTATED, "image_folder")
_SAMPLE = 32  # image references probed to choose the image base folder


def _check_root(root: str | Path) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist or is not a folder")
    return path


def detect_format(root: str | Path) -> str:
    """Name the annotation format of a dataset folder from the files it holds.

    Args:
        root: Dataset folder.

    Returns:
        One of ``FORMATS``. An image folder is only reported when no annotation file exists.
    """
    root = _check_root(root)
    for fmt, (splits, _, _) in _ANNOTATED.items():
        if splits(root):
            return fmt
    if scan_images(root):
        return "image_folder"
    looked = "; ".join(f"{desc} ({fmt})" for fmt, (_, _, desc) in _ANNOTATED.items())
    exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
    raise DatasetError(
        f"cannot detect the dataset format of {root}: looked for {looked}; "
        f"or image files ({exts}) for image_folder"
    )


def _detect_for_split(root: Path, split: str) -> str:
    """The first annotated format that has ``split``, else :func:`detect_format`'s answer."""
    for fmt, (splits, _, _) in _ANNOTATED.items():
        if split in splits(root):
            return fmt
    return detect_format(root)


def _image_base(root: Path, refs: list[str]) -> Path:
    """``root`` or ``root/images``: the candidate under which most sampled references exist."""
    candidates = [root] + ([root / "images"] if (root / "images").is_dir() else [])
    step = max(1, len(refs) // _SAMPLE)
    sample = refs[::step][:_SAMPLE]
    hits = [sum((base / ref).exists() for ref in sample) for base in candidates]
    return candidates[hits.index(max(hits))]


def _drop_missing(
    split: RetrievalSplit, refs: list[str], source: str, base: Path, allow_missing: bool
) -> tuple[RetrievalSplit, list[str]]:
    """Raise on missing image files, or drop them and their captions when allowed."""
    missing = [i for i, path in enumerate(split.images) if not path.exists()]
    if not missing:
        return split, refs
    names = ", ".join(refs[i] for i in missing[:5])
    if not allow_missing:
        other = [p for p in (split.root, split.root / "images") if p != base and p.is_dir()]
        tried = f" (also tried {other[0]})" if other else ""
        raise DatasetError(
            f"{len(missing)} of {split.num_images} images listed in {source} are missing "
            f"under {base}{tried}; first: {names}. Pass allow_missing=True to drop them "
            "and their captions."
        )
    gone = set(missing)
    kept = [i for i in range(split.num_images) if i not in gone]
    out = split.subset(kept)
    logger.warning(
        "%s: dropped %d missing images (first: %s, under %s) and their %d captions",
        split.name, len(missing), names, base, split.num_captions - out.num_captions,
    )  # fmt: skip
    return out, [refs[i] for i in kept]


def _check_counts(split: RetrievalSplit, refs: list[str], source: str, expected: int) -> None:
    counts = Counter(split.text_to_image)
    bad = [i for i in range(split.num_images) if counts[i] != expected]
    if bad:
        shown = ", ".join(f"{refs[i]} ({counts[i]})" for i in bad[:5])
        raise DatasetError(
            f"{source}: expected {expected} captions per image, but {len(bad)} of "
            f"{split.num_images} images differ; first: {shown}"
        )


def load_split(
    root: str | Path,
    split: str = "train",
    *,
    format: str | None = None,
    check_images: bool = True,
    allow_missing: bool = False,
    expected_captions_per_image: int | None = None,
    allow_empty: bool = False,
) -> RetrievalSplit:
    """Load one split of a retrieval dataset folder.

    Args:
        root: Dataset folder.
        split: Split name (``train``, ``val``, ``test``...); ignored by ``image_folder``.
        format: One of ``FORMATS``; when ``None``, the first format (in ``FORMATS`` order) that
            has ``split``, else the format :func:`detect_format` finds.
        check_images: Check that every image file exists (no decoding).
        allow_missing: Drop missing images and their captions (with a warning) instead of
            raising. Only used when ``check_images`` is set.
        expected_captions_per_image: When given, every image must have exactly this many. For the
            positional PE-RSITR txt layout it is also how captions are grouped (default 5 there).
        allow_empty: Drop empty or whitespace-only captions (with a warning giving the count)
            instead of raising an error that names the file and line of the first.

    Returns:
        The split, named ``"<folder>/<split>"`` (``"<folder>/all"`` for an image folder), with
        absolute image paths.
    """
    root = _check_root(root)
    fmt = _detect_for_split(root, split) if format is None else format
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "image_folder":
        images = scan_images(root)
        if not images:
            raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        refs = [p.relative_to(root).as_posix() for p in images]
        out = RetrievalSplit(f"{root.name}/all", root, images, [], [])
        source = str(root)
    else:
        if fmt == "pe_rsitr_txt":
            ann = _ANNOTATED[fmt][1](root, split, expected_captions_per_image)
        else:
            ann = _ANNOTATED[fmt][1](root, split)
        dropped = ann.drop_empty_captions(allow_empty)
        if dropped:
            logger.warning("%s: dropped %d empty caption(s) (allow_empty)", ann.source, dropped)
        if not ann.refs:
            raise DatasetError(f"{ann.source}: no images listed")
        base = _image_base(root, ann.refs)
        refs, source = ann.refs, ann.source
        out = RetrievalSplit(
            name=f"{root.name}/{split}",
            root=root,
            images=[base / ref for ref in refs],
            captions=ann.captions,
            text_to_image=ann.text_to_image,
            labels=ann.label_list(),
        )
        if check_images:
            out, refs = _drop_missing(out, refs, source, base, allow_missing)
    if expected_captions_per_image is not None:
        _check_counts(out, refs, source, expected_captions_per_image)
    logger.info("%s (%s): %d images, %d captions", out.name, fmt, out.num_images, out.num_captions)
    return out
