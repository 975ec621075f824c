"""Galleries: the images searched (and their caption pool), from a dataset folder, prebuilt image indexes
(``python -m training.build_index``; :mod:`.indexes`) or uploaded files, and the copy of an image a browser
is shown.

What the app serves (docs/security.md): never a dataset or index folder, only files it made itself under
its cache folder: display copies (``thumbs/``, :func:`displayable`), uploaded galleries (``uploads/``,
in folders named by a keyed hash, bounded in count and bytes and swept after :data:`UPLOAD_TTL_S`) and
CSV exports (``exports/``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

from harma.data import DatasetError, RetrievalSplit, load_split, open_image, scene_names
from harma.data.json_format import json_splits
from harma.data.table_format import csv_splits, jsonl_splits
from harma.data.txt_format import txt_splits
from harma.errors import one_line
from harma.retrieval import CaptionPool
from harma.retrieval.identity import IndexImages

from .common import DEMO, HOW_TO_DATA, AppError, file_names_only, log

SERVED = ("thumbs", "uploads", "exports")  # the only folders (under the cache folder) the app serves files from
SECRET_FILE = "secret"  # per-install random key (never served) that salts upload and thumbnail names
THUMB_SIDE = 256  # longest side of a display copy the app has to re-encode (TIFF, large or odd files)
DIRECT_MAX_BYTES = 8 * 2**20  # a browser-ready image up to this size is linked (or copied), not re-encoded
MAX_UPLOAD_FILES = 100  # images per upload
MAX_UPLOAD_BYTES = 64 * 2**20  # their total size as uploaded (each file is also under launch()'s max_file_size)
UPLOAD_SIDE = 1024  # longest side of a stored uploaded image
UPLOAD_TTL_S = 24 * 3600  # an uploaded gallery unused this long is deleted when the next upload arrives
UPLOADS_MAX_BYTES = 512 * 2**20  # and the least recently used go first while all uploads exceed this
_MAGIC = {".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",), ".png": (b"\x89PNG\r\n\x1a\n",),
          ".gif": (b"GIF87a", b"GIF89a"), ".bmp": (b"BM",), ".webp": (b"RIFF",)}  # browser-ready, by first bytes
_UPLOAD_KEY = re.compile(r"upload:([0-9a-f]{32})")
_warned: set[str] = set()


@dataclass
class Gallery:
    name: str
    split: RetrievalSplit  # or, for an archive index, an indexes.IndexSplit (its rows read when shown)
    pool: Optional[CaptionPool]  # None: no captions (image-to-text and the metrics need them)
    prebuilt: tuple = ()  # EmbeddingIndex(es) or ArchiveIndex(es) from training.build_index over these images
    bundled: bool = False  # the demo gallery shipped in assets/demo (its maps may be shipped too)

    @functools.cached_property
    def classes(self) -> Optional[list[str]]:
        """The scene class of every image by name (:func:`harma.data.scene_names`: labels, file-name
        prefixes, or UCM's numbered blocks named), or None when the file names and annotations carry none
        (e.g. uploads, an archive index)."""
        if self.archive:
            return None
        try:
            return scene_names(self.split)
        except DatasetError:
            return None

    @property
    def images(self) -> Sequence[Path]:
        """The image files by row: a list, or an archive index's rows (``len`` and ``[i]`` only)."""
        return self.split.images

    @property
    def archive(self) -> bool:
        """Whether this is an archive index's gallery (searched on disk; text -> image only)."""
        return isinstance(self.split.images, IndexImages)

    def describe(self) -> str:
        if self.archive:
            return (f"**{self.name}**: {len(self.images):,} images, an archive index searched on disk "
                    f"({self.prebuilt[0].plan.factory_string()}; text → image only)")
        caps = (f", {self.split.num_captions:,} captions ({len(self.pool):,} distinct)" if self.pool
                else " (no captions: text → image only)")
        return f"**{self.name}**: {self.split.num_images:,} images{caps}"


ALL_SPLITS = "all"  # --split all: every split of the dataset folder in one gallery
SPLIT_ORDER = ("train", "val", "test")


def all_splits(path: Path, follow_links: bool = False) -> RetrievalSplit:
    """Every split of the dataset folder (train, val, test, then any other in name order) as one: their
    images and captions one after the other (an image listed by two splits is refused)."""
    found = sorted({name for splits in (json_splits, txt_splits, csv_splits, jsonl_splits) for name in splits(path)},
                   key=lambda n: (SPLIT_ORDER.index(n) if n in SPLIT_ORDER else len(SPLIT_ORDER), n))
    if not found:
        raise AppError(f"`{path.name}` has no annotated splits to show together (`--split all`); {HOW_TO_DATA}")
    parts = [load_split(path, name, allow_missing=True, follow_links=follow_links) for name in found]
    images, captions, t2i, labels = [], [], [], []
    for part in parts:
        t2i += [len(images) + i for i in part.text_to_image]
        images += part.images
        captions += part.captions
        labels = labels + list(part.labels) if labels is not None and part.labels is not None else None
    seen: dict[Path, str] = {}
    for part in parts:
        for p in part.images:
            if p in seen:
                raise AppError(f"{p.name} is in both the {seen[p]} and the {part.name.rsplit('/', 1)[-1]} split of "
                               f"`{path.name}`; show one split (`--split NAME`)")
            seen[p] = part.name.rsplit("/", 1)[-1]
    return RetrievalSplit(f"{path.name}/{'+'.join(found)}", path, images, captions, t2i, labels)


def dataset_gallery(root: str, split: Optional[str] = None, follow_links: bool = False) -> Gallery:
    """Load a split (missing images, and images that resolve outside ``root`` unless ``follow_links``, are
    dropped with a warning); default: the first of test, val, train; ``"all"`` (:data:`ALL_SPLITS`): every
    split together (:func:`all_splits`)."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise AppError(f"dataset folder `{path}` does not exist or is not a folder. {HOW_TO_DATA}")
    if split == ALL_SPLITS:
        try:
            s = all_splits(path, follow_links)
        except DatasetError as e:
            raise AppError(one_line(e)) from None
        pool = CaptionPool.from_captions(s.captions, s.text_to_image) if s.num_captions else None
        return Gallery(s.name, s, pool)
    errors = []
    for name in [split] if split else ["test", "val", "train"]:
        try:
            s = load_split(path, name, allow_missing=True, follow_links=follow_links)
            break
        except DatasetError as e:
            errors.append(e)
    else:
        raise AppError(one_line(errors[-1]))
    pool = CaptionPool.from_captions(s.captions, s.text_to_image) if s.num_captions else None
    if path.resolve() == DEMO.resolve():
        name = ("bundled demo gallery: UCM-Captions test split (USGS public-domain imagery, captions by "
                "Qu et al. 2016; assets/demo/CREDITS.md); `--data DIR` for your own")
        return Gallery(name, s, pool, bundled=True)
    return Gallery(s.name, s, pool)


@functools.lru_cache(maxsize=None)
def install_secret(cache_dir: Path) -> bytes:
    """A random key made once per install and kept in ``cache_dir/secret`` (a folder the app does not
    serve); it salts the names of upload folders and display copies, so knowing a file does not give
    its URL. Without a writable cache folder: a key for this run only."""
    path = cache_dir / SECRET_FILE
    try:
        if not path.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f".{SECRET_FILE}.{os.getpid()}.{threading.get_ident()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # the first writer wins; a concurrent one reads its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        log.warning("no install key in %s (%s): upload and thumbnail names are salted for this run only", cache_dir, e)
        return secrets.token_bytes(32)


def keyed(cache_dir: Path, *parts: Any) -> str:
    """A name for a file or folder the app keeps or serves: an HMAC (the install key) of ``parts`` (one
    ``bytes`` as it is, else their text joined by ``|``), so nobody can derive it from what it depends on."""
    data = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else "|".join(map(str, parts)).encode()
    return hmac.new(install_secret(cache_dir), data, hashlib.sha256).hexdigest()[:32]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:].lstrip(".") or "image"


def sweep_uploads(uploads: Path, keep: Optional[Path] = None, now: Optional[float] = None) -> list[str]:
    """Delete uploaded galleries unused for :data:`UPLOAD_TTL_S` (partial ones after an hour), then the
    least recently used while all of them together exceed :data:`UPLOADS_MAX_BYTES`; never ``keep``.
    Returns the deleted folder names."""
    now = time.time() if now is None else now
    entries = []
    for folder in uploads.iterdir() if uploads.is_dir() else []:
        if not folder.is_dir() or folder == keep:
            continue
        done = folder / ".complete"
        try:
            used = (done if done.is_file() else folder).stat().st_mtime
            size = sum(f.stat().st_size for f in folder.iterdir())
        except OSError:
            continue
        entries.append((used, size, folder, done.is_file()))
    gone, total = [], sum(size for _, size, _, _ in entries)
    for used, size, folder, complete in sorted(entries, key=lambda e: e[0]):
        if now - used > (UPLOAD_TTL_S if complete else 3600) or total > UPLOADS_MAX_BYTES:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
            total -= size
    if gone:
        log.info("deleted %d expired uploaded galleries", len(gone))
    return gone


def _store_upload(src: Path, img: Image.Image, head: bytes, out: Path) -> None:
    """One uploaded image as the gallery keeps it: a JPEG of at most :data:`UPLOAD_SIDE` as uploaded, a
    larger JPEG re-encoded as JPEG, anything else as PNG (exact pixels), longest side <= UPLOAD_SIDE."""
    if head.startswith(_MAGIC[".jpg"]):
        if max(img.size) <= UPLOAD_SIDE:
            shutil.copyfile(src, out.with_suffix(".jpg"))
        else:
            img.thumbnail((UPLOAD_SIDE, UPLOAD_SIDE))
            img.save(out.with_suffix(".jpg"), quality=92)
    else:
        img.thumbnail((UPLOAD_SIDE, UPLOAD_SIDE))
        img.save(out.with_suffix(".png"))


def upload_gallery(files: list, cache_dir: Path) -> tuple[str, Gallery, list[str]]:
    """Store the readable uploaded images in the cache (:func:`_store_upload`), in a folder named by a keyed
    hash of their bytes; returns (key, gallery, skipped files with their reason, file names only)."""
    paths = [Path(str(getattr(f, "name", f))) for f in (files or [])]
    if not paths:
        raise AppError("choose one or more image files first")
    if len(paths) > MAX_UPLOAD_FILES:
        raise AppError(f"{len(paths)} files: upload at most {MAX_UPLOAD_FILES} images at a time, or start the app "
                       "with `--data DIR`")
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > MAX_UPLOAD_BYTES:
        raise AppError(f"{total / 2**20:.1f} MB of files: upload at most {MAX_UPLOAD_BYTES // 2**20} MB at a time, "
                       "or start the app with `--data DIR`")
    good, skipped, h = [], [], hashlib.sha256()
    for p in paths:
        try:
            img = open_image(p)
            data = p.read_bytes()
        except (DatasetError, OSError) as e:  # the reason without the server's upload path
            why = one_line(e).replace(str(p), p.name).split(": ", 1)[-1]
            skipped.append(f"{p.name} ({file_names_only(why)})")
            continue
        good.append((p, img, data[:16]))
        h.update(hashlib.sha256(data).digest())
    if not good:
        raise AppError("none of the uploaded files is a readable image: " + "; ".join(skipped))
    digest = keyed(cache_dir, h.digest())
    uploads = cache_dir / "uploads"
    folder = uploads / digest
    sweep_uploads(uploads, keep=folder)
    if (folder / ".complete").is_file():
        os.utime(folder / ".complete")  # used again: the sweep keeps it longer
    else:
        shutil.rmtree(folder, ignore_errors=True)  # an upload stopped half-way
        tmp = uploads / f".{digest}.{os.getpid()}.{threading.get_ident()}"
        tmp.mkdir(parents=True, exist_ok=True)
        for i, (src, img, head) in enumerate(good):
            _store_upload(src, img, head, tmp / f"{i:04d}-{safe_name(src.stem)[:60]}")
        (tmp / ".complete").touch()
        try:
            tmp.rename(folder)
        except OSError:  # stored meanwhile by a concurrent upload of the same files
            shutil.rmtree(tmp, ignore_errors=True)
    s = load_split(folder, format="image_folder")
    return f"upload:{digest}", Gallery(f"uploaded images ({s.num_images})", s, None), skipped


def uploaded_gallery(key: str, cache_dir: Path) -> Gallery:
    """The gallery of an earlier upload (``upload:KEY``), still in the cache folder."""
    m = _UPLOAD_KEY.fullmatch(key or "")
    folder = cache_dir / "uploads" / (m.group(1) if m else "-")
    if not m or not (folder / ".complete").is_file():
        raise AppError("this uploaded gallery is gone; upload the images again")
    os.utime(folder / ".complete")
    s = load_split(folder, format="image_folder")
    return Gallery(f"uploaded images ({s.num_images})", s, None)


def _browser_ready(path: Path, size: int) -> bool:
    """A file a browser shows as it is: a JPEG, PNG, GIF, BMP or WebP (by its first bytes, matching its
    suffix) of at most :data:`DIRECT_MAX_BYTES`."""
    magic = _MAGIC.get(path.suffix.lower())
    if not magic or size > DIRECT_MAX_BYTES:
        return False
    with path.open("rb") as f:
        head = f.read(16)
    return head.startswith(magic) and (path.suffix.lower() != ".webp" or head[8:12] == b"WEBP")


def displayable(path: Path, cache_dir: Path, side: int = THUMB_SIDE) -> Union[str, Any]:
    """What a browser is given for gallery image ``path``: a file the app made under ``cache_dir/thumbs``,
    never the dataset's own (the app serves no dataset folder). Named by a keyed hash of the image's real
    path, size and modification time (a changed image gets a new copy), then its file name. A browser-ready
    image (:func:`_browser_ready`) is hard-linked there (copied across file systems): no decoding, so a
    map's 1,000 hover thumbnails cost milliseconds; anything else (TIFF, a large file) is decoded and
    written once as a JPEG of at most ``side`` pixels. An uploaded gallery's own files (which the app
    wrote) are given as they are. When the cache folder cannot be written, a PIL image (Gradio keeps it)."""
    path = Path(path)
    if path.is_relative_to(cache_dir / "uploads"):
        if not path.is_file():
            raise AppError("this uploaded gallery is gone (uploads are deleted after a day unused); upload the "
                           "images again")
        return str(path)
    st = path.stat()
    real = os.path.realpath(path)
    direct = _browser_ready(path, st.st_size)
    key = keyed(cache_dir, real, st.st_size, st.st_mtime_ns, side)
    out = cache_dir / "thumbs" / f"{key}-{safe_name(path.name if direct else path.stem + '.jpg')}"
    if out.is_file():
        return str(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}{out.suffix}")
        if direct:
            try:
                os.link(real, tmp)
            except OSError:  # another file system, or a file the app may read but not link
                shutil.copyfile(real, tmp)
        else:
            img = open_image(path)
            img.thumbnail((side, side))
            img.save(tmp, format="JPEG", quality=92)
        os.replace(tmp, out)
        return str(out)
    except OSError as e:
        if str(cache_dir) not in _warned:
            _warned.add(str(cache_dir))
            log.warning("cannot write display copies under %s (%s): images are sent from memory", cache_dir, e)
        img = open_image(path)
        img.thumbnail((side, side))
        return img
