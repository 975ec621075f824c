"""Load a retrieval split from a dataset folder, whatever its annotation format.

Formats: HarMA JSON, PE-RSITR txt, csv/tsv, jsonl, and a bare image folder. Image references are
resolved against the dataset folder or its ``images/`` sub-folder, whichever holds them.

A dataset folder is trusted to name images inside itself only: a reference that resolves outside it
(``../``, an absolute path, a symlink to elsewhere) is refused, or skipped with a count and the first
names, unless the caller opts in with ``follow_links=True`` (default: ``$HARMA_FOLLOW_LINKS``), e.g.
for an ``images/`` folder that links to an image store (docs/security.md).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from harma.data.annotations import Annotations
from harma.data.images import IMAGE_EXTENSIONS, scan_images
from harma.data.json_format import json_splits, read_harma_json
from harma.data.split import RetrievalSplit
from harma.data.table_format import csv_splits, jsonl_splits, read_csv, read_jsonl
from harma.data.txt_format import read_pe_rsitr_txt, txt_splits
from harma.config import FALSE, TRUE
from harma.errors import ConfigError, DatasetError

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
FOLLOW_LINKS_ENV = "HARMA_FOLLOW_LINKS"
LINKS_HINT = ("If the links are intended (e.g. an images/ folder linking to an image store), opt in: "
              "python app.py --follow-links, HARMA_FOLLOW_LINKS=1 for the commands, or follow_links=True.")


def follow_links_setting(follow_links: Optional[bool] = None) -> bool:
    """``follow_links`` if given, else ``$HARMA_FOLLOW_LINKS`` (``1``/``0``), else False."""
    if follow_links is not None:
        return bool(follow_links)
    raw = os.environ.get(FOLLOW_LINKS_ENV, "").strip().lower()
    if raw in ("", *FALSE):  # the config parser's words for a boolean
        return False
    if raw in TRUE:
        return True
    raise ConfigError(f"{FOLLOW_LINKS_ENV}={raw!r}: expected 1 (follow links out of a dataset folder) or 0")


def outside_root(paths: Sequence[str | Path], root: str | Path) -> list[int]:
    """Positions of ``paths`` that resolve (``..``, absolute references, symlinks) outside ``root``."""
    real = os.path.realpath(root)
    prefix = real if real.endswith(os.sep) else real + os.sep
    return [i for i, p in enumerate(paths) if not os.path.realpath(p).startswith(prefix)]


def name_outside(refs: Sequence[str], paths: Sequence[str | Path], positions: Sequence[int]) -> str:
    """The first five of ``positions`` as ``ref -> where it leads``, for a message."""
    return ", ".join(f"{refs[i]} -> {os.path.realpath(paths[i])}" for i in positions[:5])


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


def _drop_outside(
    split: RetrievalSplit, refs: list[str], source: str, allow_missing: bool
) -> tuple[RetrievalSplit, list[str]]:
    """Refuse images that resolve outside the dataset folder, or drop them (and their captions) when
    missing images may be dropped; refused all the same when none would be left."""
    bad = outside_root(split.images, split.root)
    if not bad:
        return split, refs
    what = (f"{len(bad)} of {split.num_images} images listed in {source} resolve outside the dataset folder "
            f"{split.root} (a ../ or absolute reference, or a symlink); first: {name_outside(refs, split.images, bad)}")
    if not allow_missing or len(bad) == split.num_images:
        raise DatasetError(f"{what}. {LINKS_HINT}")
    gone = set(bad)
    kept = [i for i in range(split.num_images) if i not in gone]
    out = split.subset(kept)
    logger.warning("%s: skipped %s, and their %d captions. %s", split.name, what,
                   split.num_captions - out.num_captions, LINKS_HINT)
    return out, [refs[i] for i in kept]


def _scan(root: Path, follow_links: bool) -> list[Path]:
    """:func:`scan_images`, without (and warning about) files that resolve outside ``root``."""
    images = scan_images(root)
    bad = [] if follow_links else outside_root(images, root)
    if bad:
        refs = [p.relative_to(root).as_posix() for p in images]
        what = (f"{len(bad)} of {len(images)} image files under {root} resolve outside it (symlinks); "
                f"first: {name_outside(refs, images, bad)}")
        if len(bad) == len(images):
            raise DatasetError(f"{what}. {LINKS_HINT}")
        logger.warning("skipped %s. %s", what, LINKS_HINT)
        gone = set(bad)
        images = [p for i, p in enumerate(images) if i not in gone]
    return images


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
    follow_links: Optional[bool] = None,
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
        follow_links: Accept images that resolve outside ``root`` (``../`` or absolute references,
            symlinks to elsewhere); default ``$HARMA_FOLLOW_LINKS``, else False: listed ones are
            refused (dropped with a warning under ``allow_missing``), scanned ones skipped with a
            warning.

    Returns:
        The split, named ``"<folder>/<split>"`` (``"<folder>/all"`` for an image folder), with
        absolute image paths.
    """
    root = _check_root(root)
    follow = follow_links_setting(follow_links)
    fmt = _detect_for_split(root, split) if format is None else format
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "image_folder":
        images = _scan(root, follow)
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
        if not follow:
            out, refs = _drop_outside(out, refs, source, allow_missing)
        if check_images:
            out, refs = _drop_missing(out, refs, source, base, allow_missing)
    if expected_captions_per_image is not None:
        _check_counts(out, refs, source, expected_captions_per_image)
    logger.info("%s (%s): %d images, %d captions", out.name, fmt, out.num_images, out.num_captions)
    return out
