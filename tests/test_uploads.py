"""Uploaded galleries (issue 36): bounded in count and bytes, stored compactly, in folders whose names
only this install can make, swept when unused; messages name files, not the server's folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from harma_app import galleries
from harma_app import state as app_state
from harma_app import tab_image_to_text as i2t
from harma_app.common import AppError
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning
# the limits (read with defaults, so that these tests fail on their assertions on code without them)
MAX_FILES = getattr(galleries, "MAX_UPLOAD_FILES", 100)
SIDE = getattr(galleries, "UPLOAD_SIDE", 1024)
TTL_S = getattr(galleries, "UPLOAD_TTL_S", 24 * 3600)
SECRET = getattr(galleries, "SECRET_FILE", "secret")


def images(folder: Path, n: int, size=(48, 32), suffix=".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"img{i}{suffix}"
        Image.new("RGB", size, (10 * i % 255, 100, 200)).save(path, quality=90)
        out.append(path)
    return out


def test_count_and_bytes_are_bounded(tmp_path, monkeypatch):
    many = images(tmp_path / "in", MAX_FILES + 1, size=(8, 8))
    with pytest.raises(AppError, match=f"{MAX_FILES + 1} files: upload at most"):
        galleries.upload_gallery([str(p) for p in many], tmp_path / "cache")
    monkeypatch.setattr(galleries, "MAX_UPLOAD_BYTES", 1000, raising=False)
    big = images(tmp_path / "big", 3, size=(200, 200))
    with pytest.raises(AppError, match=r"MB of files: upload at most"):
        galleries.upload_gallery([str(p) for p in big], tmp_path / "cache")
    assert not (tmp_path / "cache" / "uploads").exists()  # nothing was stored


def test_jpeg_stays_jpeg_and_names_are_salted_per_install(tmp_path):
    jpegs = images(tmp_path / "in", 2, size=(300, 200), suffix=".jpg")
    large = images(tmp_path / "large", 1, size=(1500, 900), suffix=".jpg")[0]
    pngs = images(tmp_path / "png", 1)
    files = [str(p) for p in jpegs + [large] + pngs]
    key, gallery, skipped = galleries.upload_gallery(files, tmp_path / "one")
    assert not skipped and gallery.split.num_images == 4
    stored = sorted(gallery.images)
    assert [p.suffix for p in stored] == [".jpg", ".jpg", ".jpg", ".png"]
    assert stored[0].read_bytes() == jpegs[0].read_bytes()  # kept as uploaded: no re-encoding, no growth
    with Image.open(stored[2]) as img:
        assert max(img.size) == SIDE and stored[2].stat().st_size < large.stat().st_size
    # the folder name is a keyed hash: the same files give the same gallery here, another one elsewhere
    assert galleries.upload_gallery(files, tmp_path / "one")[0] == key
    other = galleries.upload_gallery(files, tmp_path / "two")[0]
    assert other != key and len(key.split(":")[1]) == 32
    assert (tmp_path / "one" / SECRET).stat().st_mode & 0o077 == 0
    # only such keys name a gallery: no path out of the uploads folder
    evil = tmp_path / "evil"
    images(evil, 1)
    (evil / ".complete").touch()
    for bad in ("upload:../../evil", "upload:" + "0" * 32, "other"):
        with pytest.raises(AppError, match="gone"):
            galleries.uploaded_gallery(bad, tmp_path / "one" / "x")


def test_old_and_excess_uploads_are_swept_when_a_new_one_arrives(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = galleries.upload_gallery([str(p) for p in images(tmp_path / "a", 1)], cache)[0]
    second = galleries.upload_gallery([str(p) for p in images(tmp_path / "b", 2)], cache)[0]
    old = time.time() - TTL_S - 60
    os.utime(cache / "uploads" / first.split(":")[1] / ".complete", (old, old))
    third = galleries.upload_gallery([str(p) for p in images(tmp_path / "c", 3)], cache)[0]
    left = {p.name for p in (cache / "uploads").iterdir()}
    assert left == {second.split(":")[1], third.split(":")[1]}  # the one unused for a day is gone
    with pytest.raises(AppError, match="gone"):
        galleries.uploaded_gallery(first, cache)
    monkeypatch.setattr(galleries, "UPLOADS_MAX_BYTES", 1, raising=False)  # over the cap: least recently used go
    fourth = galleries.upload_gallery([str(p) for p in images(tmp_path / "d", 1)], cache)[0]
    assert {p.name for p in (cache / "uploads").iterdir()} == {fourth.split(":")[1]}


def test_skipped_files_are_named_without_server_paths(tmp_path):
    deep = tmp_path / "gradio" / "0123456789abcdef"
    good = images(deep, 1)
    junk = deep / "junk.jpg"
    junk.write_bytes(b"\x00" * 10)
    _, gallery, skipped = galleries.upload_gallery([str(good[0]), str(junk)], tmp_path / "cache")
    assert gallery.split.num_images == 1 and len(skipped) == 1
    assert skipped[0].startswith("junk.jpg (cannot read image") and "/" not in skipped[0], skipped


def test_tiff_query_image_gets_a_preview(tmp_path, tmp_path_factory):
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")  # the session's tiny checkpoint and gallery
    state = app_state.AppState(setup["config"])
    tif = tmp_path / "query.tif"
    Image.new("RGB", (700, 350), (200, 30, 30)).save(tif)
    preview, base, adapted, status = i2t.search_image(state, str(tif), 3, None, "data")
    assert "⚠️" not in status and len(base) == 3
    assert isinstance(preview, Image.Image) and preview.size == (512, 256)  # a TIFF: converted for display
    png = tmp_path / "query.png"
    Image.new("RGB", (64, 64)).save(png)
    assert i2t.search_image(state, str(png), 3, None, "data")[0] == str(png)  # a browser shows it as it is
