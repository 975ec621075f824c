"""Flat caption tables: ``<split>.csv`` / ``<split>.tsv`` and ``<split>.jsonl``.

One row per caption with an image column (``image``/``filepath``/``path``) and a caption column
(``caption``/``text``/``title``); rows that share an image are its captions. The csv delimiter is
a tab when the header holds one, else a comma. An optional ``label_name`` column gives labels.
Rows (records) naming the same image, anywhere in the file, are merged into its captions, in file
order; two different labels for one image are refused, naming both lines.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harma.data.annotations import Annotations, pick_split_file, read_text
from harma.data.json_format import record_captions, record_image
from harma.errors import DatasetError
from harma.io import parse_json

IMAGE_KEYS = ("image", "filepath", "path")
CAPTION_KEYS = ("caption", "text", "title")
LABEL_KEY = "label_name"
CSV_SUFFIXES = (".csv", ".tsv")


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in suffixes]


def csv_splits(root: Path) -> list[str]:
    """Split names of the csv/tsv files in ``root``."""
    return [p.stem for p in _files(root, CSV_SUFFIXES)]


def jsonl_splits(root: Path) -> list[str]:
    """Split names of the jsonl files in ``root``."""
    return [p.stem for p in _files(root, (".jsonl",))]


def _column(header: list[str], keys: tuple[str, ...], path: Path) -> int:
    for key in keys:
        if key in header:
            return header.index(key)
    raise DatasetError(
        f"{path}: no column named {' / '.join(keys)}; header has: {', '.join(header)}"
    )


def _quote_problem(path: Path, start: int, end: int, detail: str) -> DatasetError:
    span = f" and runs to line {end}" if end > start else ""
    return DatasetError(
        f"{path}: line {start}: a quoted field opens here{span}: {detail}. Is a quote unbalanced? A caption "
        'that starts with a quote must end with one, and a quote inside a quoted caption is written twice ("")')


def read_csv(root: Path, split: str) -> Annotations:
    """Read ``<split>.csv`` (or ``.tsv``) in ``root``.

    Every row must be one physical line: a quoted field that runs over a line break (what one
    unbalanced quote does to the rows after it), malformed quoting and a row with more non-empty
    fields than the header are refused, naming the line where the row (and so the quote) starts.

    Args:
        root: Dataset folder.
        split: Split name (the file stem).

    Returns:
        The grouped annotations.
    """
    files = _files(root, CSV_SUFFIXES)
    path = pick_split_file(root, split, "csv", [p for p in files if p.stem == split], csv_splits(root))
    text = read_text(path)
    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if "\t" in first else ",", strict=True)
    rows, start = [], 1
    try:
        for row in reader:
            if reader.line_num > start:
                raise _quote_problem(path, start, reader.line_num, "a caption cannot hold a line break")
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise _quote_problem(path, start, reader.line_num, str(e)) from None
    if not rows:
        raise DatasetError(f"{path}: empty file, expected a header row")
    header = [h.strip().lower() for h in rows[0][1]]
    i_img, i_cap = _column(header, IMAGE_KEYS, path), _column(header, CAPTION_KEYS, path)
    i_lab = header.index(LABEL_KEY) if LABEL_KEY in header else None
    ann = Annotations(source=str(path))
    for lineno, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}: line {lineno}"
        if len(row) <= max(i_img, i_cap) or any(cell.strip() for cell in row[len(header):]):
            sep = "tab" if reader.dialect.delimiter == "\t" else "comma"
            raise DatasetError(f"{where}: {len(row)} fields, expected {len(header)} (a caption holding a {sep} "
                               "must be quoted)")
        image = row[i_img].strip()
        if not image:
            raise DatasetError(f"{where}: empty {header[i_img]!r}")
        label = row[i_lab].strip() if i_lab is not None and i_lab < len(row) else None
        ann.add(image, [row[i_cap].strip()], label or None, where=where)
    return ann


def read_jsonl(root: Path, split: str) -> Annotations:
    """Read ``<split>.jsonl`` in ``root``: one JSON object per line.

    Args:
        root: Dataset folder.
        split: Split name (the file stem).

    Returns:
        The grouped annotations.
    """
    files = _files(root, (".jsonl",))
    path = pick_split_file(root, split, "jsonl", [p for p in files if p.stem == split], jsonl_splits(root))
    ann = Annotations(source=str(path))
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        record = parse_json(line, DatasetError, path, line=lineno)
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
        image = record_image(record, IMAGE_KEYS, where)
        captions = record_captions(record, CAPTION_KEYS, where)
        label = record.get(LABEL_KEY)
        ann.add(image, captions, None if label is None else str(label), where=where)
    return ann
