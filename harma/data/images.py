"""Image files on disk: finding them in a folder and opening them safely as RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from harma.data.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def scan_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive suffix), sorted by path.

    Hidden files and folders (names starting with ``.``) are skipped.
    """
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def open_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, turning every failure into a :class:`DatasetError` naming the file.

    PIL's ``MAX_IMAGE_PIXELS`` limit is kept as configured; an image above it (a possible
    decompression bomb) is refused instead of only warned about.

    Args:
        path: Image file.

    Returns:
        The decoded RGB image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
