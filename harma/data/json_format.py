"""HarMA JSON annotations (``data/finetune/*.json``, method.md §4.2).

Entries are per caption (``caption`` a string, several entries per ``image``) or per image
(``caption`` a list); both shapes may be mixed. Entries are grouped by ``image`` in first-appearance
order; ``image_id`` (a contiguous re-index in the released code) is not needed for that. Entries
naming the same image, of either shape and wherever they are, are merged (captions in file order);
two different ``label_name`` values for one image are refused, naming both entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harma.data.annotations import Annotations, pick_split_file, read_text
from harma.errors import DatasetError
from harma.io import parse_json


def json_splits(root: Path) -> list[str]:
    """Split names of ``*_<split>.json`` / ``<split>.json`` files in ``root``."""
    return [p.stem.rsplit("_", 1)[-1] for p in sorted(root.glob("*.json")) if p.is_file()]


def find_json(root: Path, split: str) -> Path:
    """The JSON file of ``split``: ``<split>.json`` or ``*_<split>.json``."""
    matches = [
        p
        for p in sorted(root.glob("*.json"))
        if p.is_file() and (p.stem == split or p.stem.endswith("_" + split))
    ]
    return pick_split_file(root, split, "harma_json", matches, json_splits(root))


def load_json(path: Path) -> Any:
    """Parse a JSON file, reporting syntax errors with line and column."""
    return parse_json(read_text(path), DatasetError, path)


def record_captions(record: dict, keys: tuple[str, ...], where: str) -> list[str]:
    """The caption(s) of one record: a string or a list of strings under the first present key."""
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise DatasetError(f"{where}: missing field {' / '.join(map(repr, keys))}")
    value = record[key]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    raise DatasetError(
        f"{where}: field {key!r} must be a string or a list of strings, "
        f"got {type(value).__name__}"
    )


def record_image(record: dict, keys: tuple[str, ...], where: str) -> str:
    """The image reference of one record: a non-empty string under the first present key."""
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise DatasetError(f"{where}: missing field {' / '.join(map(repr, keys))}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def read_harma_json(root: Path, split: str) -> Annotations:
    """Read the HarMA JSON file of ``split`` in ``root``.

    Args:
        root: Dataset folder.
        split: Split name (``train``, ``val``, ``test``...).

    Returns:
        The grouped annotations; ``label_name`` becomes the image label when present.
    """
    path = find_json(root, split)
    data = load_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    ann = Annotations(source=str(path))
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        image = record_image(entry, ("image",), where)
        captions = record_captions(entry, ("caption",), where)
        label = entry.get("label_name")
        ann.add(image, captions, None if label is None else str(label), where=where)
    return ann
