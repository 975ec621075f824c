"""Decoded images cached once as one memory-mapped uint8 array, so epochs are not bound by JPEG decoding.

The cache file is keyed by the image paths (with size and modification time), the side length,
the band choice of multi-band images (``HARMA_BANDS``) and the decoder's version
(``harma.data.images.DECODER_VERSION``, so pixels an older reader decoded differently are not reused),
built with a temporary file + rename (an interrupted build leaves nothing half-written), and read
with ``mmap_mode="r"`` so DataLoader workers share the pages instead of copying them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from harma.data.images import decode_signature, hash_files, open_image
from harma.errors import DatasetError


def cache_key(paths: Sequence[Union[str, Path]], size: int) -> str:
    h = hashlib.sha256(f"v2|{size}|{decode_signature()}".encode())  # another decoder or band choice: another cache
    return hash_files(h, paths).hexdigest()[:20]


class ImageCache:
    """``size`` x ``size`` RGB copies of ``paths`` (bicubic square resize), indexable as PIL images.

    Args:
        paths: image files, in the order the cache is indexed.
        size: side length of the cached copies (train crops are taken from these).
        cache_dir: folder for the ``.npy`` file; reused across runs with the same images and size.
        progress: optional ``progress(done, total)`` callback while building.
    """

    def __init__(self, paths: Sequence[Union[str, Path]], size: int, cache_dir: Union[str, Path],
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        self.size = size
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / f"images-{size}px-{cache_key(paths, size)}.npy"
        if not self.path.is_file():
            self._build(paths, progress)
        self.array = np.load(self.path, mmap_mode="r")
        if self.array.shape != (len(paths), size, size, 3):
            raise DatasetError(f"{self.path}: cached array has shape {self.array.shape}, expected "
                             f"{(len(paths), size, size, 3)}; delete the file to rebuild it")

    def _build(self, paths: Sequence[Union[str, Path]], progress) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), self.size, self.size, 3))
        try:
            for i, p in enumerate(paths):
                img = open_image(p)
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.BICUBIC)
                arr[i] = np.asarray(img, dtype=np.uint8)
                if progress is not None and ((i + 1) % 64 == 0 or i + 1 == len(paths)):
                    progress(i + 1, len(paths))
            arr.flush()
            del arr
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(np.array(self.array[index]))  # copy out of the read-only map
