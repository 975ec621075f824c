"""Every error the library raises for a problem a user can fix, under one root.

Front ends (the ``training`` commands, the app) catch :class:`HarmaError` and show its message as
it is: messages name the file, line, field or value at fault. Anything else that escapes the
library is a bug and keeps its traceback. Each class also derives from ``ValueError``, which these
errors were before the root existed, so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class HarmaError(Exception):
    """Root of the library's user-facing errors."""


class ConfigError(HarmaError, ValueError):
    """A configuration value or key is invalid."""


class PresetError(HarmaError, ValueError):
    """A preset or project architecture cannot be used on this machine."""


class ArchError(ConfigError):
    """An open_clip architecture is unknown or cannot be registered."""


class CheckpointError(HarmaError, ValueError):
    """An adapter directory is missing, malformed, or belongs to another base model."""


class BaseWeightsError(HarmaError, ValueError):
    """A base-weights file cannot be read or does not match the model."""


class UnsupportedModelError(HarmaError, ValueError):
    """The open_clip model has no tower structure the adapters can attach to."""


class DatasetError(HarmaError, ValueError):
    """A dataset folder, annotation file or image cannot be used as given.

    Messages name the offending file (and line or entry where relevant), so a caller can show
    them to a user as they are, without a traceback.
    """


class NonFiniteEmbeddingError(HarmaError, ValueError):
    """The model produced NaN or infinite embeddings (e.g. from broken base weights)."""


class IndexFormatError(HarmaError, ValueError):
    """A saved index is missing, malformed or inconsistent."""


class InputError(HarmaError, ValueError):
    """Data handed to a computation cannot be used: too few items, an image without captions, NaN scores."""


class QueryError(HarmaError, ValueError):
    """A retrieval query cannot be answered as asked (empty text, an image out of range, no captions)."""


def unreadable(path: object, e: BaseException) -> str:
    """One line for a file a reader library refused (safetensors, torch, JSON): path, type, first line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{path}: cannot be read ({type(e).__name__}: {first[:200]})"


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name if it has none), for a status line or ``error:``."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
