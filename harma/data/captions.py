"""Caption normalisation, as HarMA's ``pre_caption`` (``dataset/utils.py`` L33-59, method.md §3)."""

from __future__ import annotations

import re

from harma.errors import ConfigError

_DELETE = re.compile(r"[,.'!?\"()*#:;~]")


def clean_caption(text: str, max_words: int | None = 30) -> str:
    """Normalise a caption the way the released code does for training and evaluation.

    Lower-cases, deletes ``, . ' ! ? " ( ) * # : ; ~``, turns ``-`` and ``/`` into spaces,
    maps ``<person>`` to ``person``, collapses whitespace and keeps the first ``max_words`` words.
    Unlike the released code, a caption that ends up empty is returned as ``""`` (no error).

    Args:
        text: Raw caption.
        max_words: Number of words to keep; ``None`` keeps all.

    Returns:
        The cleaned caption.
    """
    if max_words is not None and max_words < 0:
        raise ConfigError(f"max_words must be >= 0 or None, got {max_words}")
    text = _DELETE.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)
