"""Format-independent annotations: captions grouped by image reference, and split-file lookup.

Every format reader fills an :class:`Annotations`; ``load_split`` then resolves the references to
image files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from harma.errors import DatasetError


@dataclass
class Annotations:
    """Images (as references relative to the dataset folder) in first-appearance order.

    Entries that name the same image (after ``os.path.normpath``: ``./a.jpg`` is ``a.jpg``) are merged:
    their captions are that image's, in file order, wherever the entries are. Two different labels
    for one image are refused, naming both places.
    """

    source: str  # annotation file(s), for messages
    refs: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    text_to_image: list[int] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # per caption: file and line/entry, for messages
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _label_at: dict[int, str] = field(default_factory=dict, repr=False)  # image -> where its label came from

    def add(self, ref: str, captions: Sequence[str], label: str | None = None, where: str | None = None) -> int:
        """Append captions to image ``ref`` (created on first sight); return its index.

        ``where`` names the file and line (or entry) the captions come from, for messages."""
        place = where or self.source
        idx = self._index.get(ref)
        if idx is None:  # first sight of this spelling: normalise ("./a.jpg" is "a.jpg")
            key = os.path.normpath(ref)
            idx = self._index.get(key)
            if idx is None:
                idx = self._index[key] = len(self.refs)
                self.refs.append(key)
                self.labels.append(None)
            self._index[ref] = idx
        if label is not None:
            if self.labels[idx] is None:
                self.labels[idx], self._label_at[idx] = label, place
            elif self.labels[idx] != label:
                raise DatasetError(f"{place}: image {ref!r} has label {label!r}, but "
                                   f"{self._label_at[idx]} gives it {self.labels[idx]!r}")
        self.captions.extend(captions)
        self.text_to_image.extend([idx] * len(captions))
        self.where.extend([place] if len(captions) == 1 else [f"{place}, caption {j}" for j in range(len(captions))])
        return idx

    def drop_empty_captions(self, allow_empty: bool) -> int:
        """Refuse (default) or drop captions that are empty or only whitespace; returns how many were
        dropped. Images left without a caption are dropped with them."""
        empty = [t for t, c in enumerate(self.captions) if not c.strip()]
        if not empty:
            return 0
        if not allow_empty:
            raise DatasetError(f"{self.where[empty[0]]}: empty caption ({len(empty)} empty in {self.source}); "
                               "fix the file, or pass allow_empty=True (data.allow_empty=true) to drop them")
        keep = [t for t in range(len(self.captions)) if self.captions[t].strip()]
        used = sorted({self.text_to_image[t] for t in keep})
        new_index = {old: new for new, old in enumerate(used)}
        self.captions = [self.captions[t] for t in keep]
        self.where = [self.where[t] for t in keep]
        self.text_to_image = [new_index[self.text_to_image[t]] for t in keep]
        self.refs = [self.refs[i] for i in used]
        self.labels = [self.labels[i] for i in used]
        self._index = {ref: i for i, ref in enumerate(self.refs)}
        self._label_at = {new_index[i]: w for i, w in self._label_at.items() if i in new_index}
        return len(empty)

    def label_list(self) -> list[str] | None:
        """Per-image labels when every image has one, else ``None``."""
        if not self.labels or any(label is None for label in self.labels):
            return None
        return [str(label) for label in self.labels]


def read_text(path: Path) -> str:
    """Read a UTF-8 text file (a leading BOM is dropped) or raise :class:`DatasetError`."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None


def pick_split_file(
    root: Path, split: str, fmt: str, matches: Sequence[Path], available: Sequence[str]
) -> Path:
    """Return the single annotation file of ``split``, or explain what exists instead.

    Args:
        root: Dataset folder.
        split: Requested split name.
        fmt: Format name, for messages.
        matches: Files of that format that belong to ``split``.
        available: Split names that do exist in ``root`` for this format.

    Returns:
        The one matching file.
    """
    if not matches:
        found = ", ".join(sorted(set(available))) or "none"
        raise DatasetError(f"no {split!r} split in {root} (format {fmt}); found: {found}")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DatasetError(
            f"{split!r} split in {root} is ambiguous ({names}); keep one file per split "
            "or pass a more specific split name"
        )
    return matches[0]
