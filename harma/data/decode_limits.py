"""Limits on decoding images, the same for every reader (Pillow and tifffile), checked before any pixel is decoded.

- **Pixels.** An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (height x width; Pillow's
  default 89,478,485, about 9459 x 9459) is refused as a possible decompression bomb, whatever reads
  it. ``None`` turns the check off, as it does in Pillow.
- **Decoded size.** An image whose decoded pixels (height x width x bands x bytes per sample) would
  take more than ``MAX_BYTES_PER_PIXEL`` (4) bytes per allowed pixel (358 MB by default: what Pillow
  itself holds for an RGBA or 32-bit image at its pixel limit) is refused too, so many bands or wide
  samples cannot multiply the pixel limit.
- **Memory in flight.** The decodes running at once in one process (the app's concurrent queries and
  uploads, or a thread pool) share a budget of ``HARMA_DECODE_MB`` megabytes (default 1024) of decoded
  pixels, each reserved before it starts (its decoded array plus its 8-bit RGB copy). A decode that
  does not fit waits for others to finish, in arrival order; one larger than the whole budget runs
  alone. :func:`set_decode_budget` overrides the variable from code.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from PIL import Image

from harma.config import from_dict
from harma.errors import ConfigError, DatasetError

DECODE_MB_VARIABLE = "HARMA_DECODE_MB"
DEFAULT_DECODE_MB = 1024
MAX_BYTES_PER_PIXEL = 4
RGB_BYTES_PER_PIXEL = 4  # the 8-bit RGB result as Pillow stores it (one padding byte per pixel)
MB = 1 << 20


@dataclass
class _DecodeSettings:
    decode_mb: int = DEFAULT_DECODE_MB


_override_mb: Optional[int] = None


def set_decode_budget(mb: Optional[int]) -> None:
    """Set the process-wide budget of decoded megabytes in flight; None: back to ``$HARMA_DECODE_MB``."""
    global _override_mb
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
        raise ConfigError(f"decode budget {mb!r}: expected a whole number of megabytes, at least 1")
    _override_mb = mb


def decode_budget_mb() -> int:
    """The budget in megabytes: :func:`set_decode_budget`'s, else ``$HARMA_DECODE_MB``, else 1024.

    Raises:
        ConfigError: naming the variable when it is not a whole number of at least 1.
    """
    if _override_mb is not None:
        return _override_mb
    raw = os.environ.get(DECODE_MB_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_DECODE_MB
    try:
        mb = from_dict(_DecodeSettings, {"decode_mb": raw}).decode_mb
    except ConfigError as e:
        raise ConfigError(f"{DECODE_MB_VARIABLE}={raw!r}: {e}; expected a whole number of megabytes, e.g. 1024") \
            from None
    if mb < 1:
        raise ConfigError(f"{DECODE_MB_VARIABLE}={raw!r}: expected a whole number of megabytes, at least 1")
    return mb


def check_size(name: str, width: int, height: int, bands: int = 1, bytes_per_sample: int = 1) -> None:
    """Refuse, before decoding, an image over the pixel limit or the decoded-size limit (module docstring).

    Raises:
        DatasetError: naming the file, its size and the limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    pixels = int(width) * int(height)
    if pixels > limit:
        raise DatasetError(f"{name}: refused as a possible decompression bomb ({width} x {height} = {pixels} pixels, "
                           f"over the limit of {limit}, PIL.Image.MAX_IMAGE_PIXELS)")
    nbytes = pixels * int(bands) * int(bytes_per_sample)
    if nbytes > MAX_BYTES_PER_PIXEL * limit:
        raise DatasetError(f"{name}: refused as a possible decompression bomb ({width} x {height} x {bands} bands of "
                           f"{bytes_per_sample} byte(s) = {nbytes} bytes decoded, over the limit of "
                           f"{MAX_BYTES_PER_PIXEL * limit}, {MAX_BYTES_PER_PIXEL} x PIL.Image.MAX_IMAGE_PIXELS)")


def decode_cost(width: int, height: int, bands: int = 1, bytes_per_sample: int = 1) -> int:
    """Bytes a decode holds at its peak: the decoded pixels plus the 8-bit RGB result."""
    return int(width) * int(height) * (int(bands) * int(bytes_per_sample) + RGB_BYTES_PER_PIXEL)


class DecodeBudget:
    """Bytes of decoding in flight, bounded: :meth:`reserve` waits (first come, first served) until
    ``nbytes`` fit under the budget, or until nothing else is in flight when they never would."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        self.in_flight = 0
        self.peak = 0  # the most bytes ever in flight at once (for tests and diagnostics)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        budget = decode_budget_mb() * MB  # read first: a bad setting raises before anything waits
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while self._queue[0] != ticket or (self.in_flight and self.in_flight + nbytes > budget):
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit too
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= nbytes
                self._cond.notify_all()


DECODE_BUDGET = DecodeBudget()
