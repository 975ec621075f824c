"""The one exception type of the data package."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset folder, annotation file or image cannot be used as given.

    Messages name the offending file (and line or entry where relevant), so a caller can show
    them to a user as they are, without a traceback.
    """
