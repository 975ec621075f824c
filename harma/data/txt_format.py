"""PE-RSITR txt annotations: ``<split>_filename.txt`` + ``<split>_caps.txt`` (method.md §4.3).

Two variants: one filename line per image (the caps file has k lines per image, caption line c
belongs to image c // k; a name listed twice is refused with both line numbers, since it would merge
two images' captions), or one filename line per caption (same line count; lines naming the same
file, consecutive or not, are one image). The grouping is by position, so k must be known: a
caption file missing a few lines would otherwise still divide evenly and give every image another
image's captions. k is the format's 5 (UCM, RSICD, RSITMD as published) unless the caller says
otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from harma.data.annotations import Annotations, pick_split_file, read_text
from harma.errors import DatasetError

_NAMES, _CAPS = "_filename.txt", "_caps.txt"
CAPTIONS_PER_IMAGE = 5  # PE-RSITR's files: five caption lines per filename line


def txt_splits(root: Path) -> list[str]:
    """Split names with both a ``_filename.txt`` and a ``_caps.txt`` file in ``root``."""
    return [
        p.name[: -len(_NAMES)]
        for p in sorted(root.glob("*" + _NAMES))
        if (root / (p.name[: -len(_NAMES)] + _CAPS)).is_file()
    ]


def _lines(path: Path) -> list[str]:
    lines = [line.strip() for line in read_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _refuse_repeats(names: list[str], names_path: Path, k: int) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        j = first.setdefault(os.path.normpath(name), i)
        if j != i:
            raise DatasetError(
                f"{names_path}: lines {j + 1} and {i + 1} both name {name!r}; with {k} caption lines per filename "
                "line each line is one image, so a name may appear only once (remove the repeat, with its "
                f"{k} caption lines)")


def read_pe_rsitr_txt(root: Path, split: str, captions_per_image: int | None = None) -> Annotations:
    """Read the PE-RSITR filename/caption pair of ``split`` in ``root``.

    Args:
        root: Dataset folder.
        split: Split name (the file prefix).
        captions_per_image: caption lines per filename line when the files list one filename per
            image (default :data:`CAPTIONS_PER_IMAGE`); equal line counts always mean one filename
            per caption.

    Returns:
        The grouped annotations (no labels in this format).
    """
    names_path = root / (split + _NAMES)
    matches = [names_path] if split in txt_splits(root) else []
    pick_split_file(root, split, "pe_rsitr_txt", matches, txt_splits(root))
    caps_path = root / (split + _CAPS)
    names, caps = _lines(names_path), _lines(caps_path)
    n_f, n_c = len(names), len(caps)
    k = captions_per_image or CAPTIONS_PER_IMAGE
    if n_f == 0 or (n_c != n_f and n_c != k * n_f):
        per = f" ({n_c / n_f:.2f} per filename)" if n_f else ""
        raise DatasetError(
            f"{names_path.name} has {n_f} lines and {caps_path.name} has {n_c} lines{per} in {root}; expected "
            f"{k} caption lines per filename ({k * n_f}) or one filename per caption ({n_f}). A caption file "
            "with lines missing or added would pair images with other images' captions. If the files "
            "really hold another number per image, pass expected_captions_per_image "
            "(data.captions_per_image)"
        )
    blank = next((i for i, name in enumerate(names) if not name), None)
    if blank is not None:
        raise DatasetError(f"{names_path}: line {blank + 1} is empty")
    k = n_c // n_f
    if k > 1:  # one filename line per image: a name listed twice would merge two images' captions
        _refuse_repeats(names, names_path, k)
    ann = Annotations(source=f"{names_path} + {caps_path.name}")
    for c, caption in enumerate(caps):
        ann.add(names[c // k], [caption], where=f"{caps_path}: line {c + 1}")
    return ann
