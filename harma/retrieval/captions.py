"""The distinct captions of a split, as image-to-text search ranks them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..data import clean_caption


@dataclass
class CaptionPool:
    """The distinct (cleaned) captions of a split: what image-to-text search ranks.

    ``texts[j]`` is encoded; ``raw[j]`` is its first spelling in the split; ``images[j]`` the images
    it describes; ``caption_to_text[t]`` maps caption ``t`` of the split to its pool entry.
    """

    texts: list[str]
    raw: list[str]
    images: list[list[int]]
    caption_to_text: list[int] = field(default_factory=list)

    @classmethod
    def from_captions(cls, captions: Sequence[str], text_to_image: Sequence[int], max_words: Optional[int] = 30,
                      clean: bool = True) -> "CaptionPool":
        """De-duplicate captions after :func:`harma.data.clean_caption` (as evaluation encodes them)."""
        where: dict[str, int] = {}
        pool = cls([], [], [], [])
        for caption, image in zip(captions, text_to_image):
            text = clean_caption(caption, max_words) if clean else caption
            j = where.setdefault(text, len(pool.texts))
            if j == len(pool.texts):
                pool.texts.append(text)
                pool.raw.append(caption)
                pool.images.append([])
            if image not in pool.images[j]:
                pool.images[j].append(int(image))
            pool.caption_to_text.append(j)
        return pool

    def __len__(self) -> int:
        return len(self.texts)

    def metadata(self) -> list[dict]:
        return [{"caption": r, "images": imgs} for r, imgs in zip(self.raw, self.images)]

    def images_matching(self, query: str) -> set[int]:
        """Images with a ground-truth caption that contains the query as a whole-word phrase.

        Both sides are normalised with :func:`harma.data.clean_caption` (lower case, punctuation
        removed), so an exact match counts too: "An airplane is stopped at the airport ." matches
        the query "airplane is stopped".
        """
        q = clean_caption(query, None)
        if not q:
            return set()
        needle = f" {q} "
        return {i for text, imgs in zip(self.texts, self.images) if needle in f" {text} " for i in imgs}
