"""Every image decode is held to one pixel limit before it decodes, and concurrent decodes to one memory
budget (issue 36: a 0.87 MB 6-band zlib TIFF of 11,000 x 11,000 went through tifffile unchecked; three at
once took +3.5 GB). Tiny images stand in for bombs: the limits are lowered, not the images enlarged."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from harma.data import DatasetError, open_image
from harma.errors import HarmaError


def _zeros_tiff(path: Path, h: int, w: int, bands: int = 6, planar: bool = True, **kw) -> Path:
    """An all-zero zlib TIFF: a few hundred bytes on disk whatever its size once decoded."""
    if bands == 1:
        tifffile.imwrite(path, np.zeros((h, w), np.uint8), photometric="minisblack", compression="zlib", **kw)
        return path
    data = np.zeros((bands, h, w) if planar else (h, w, bands), np.uint8)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate" if planar else "contig",
                     compression="zlib", **kw)
    return path


class _Spy:
    """Wraps a decoder: counts calls, the most running at once, and whether one path ran alone."""

    def __init__(self, monkeypatch, owner, name: str, delay: float = 0.0, path_of=lambda self: None):
        self.calls, self.active, self.peak, self.overlaps = 0, set(), 0, {}
        lock, original = threading.Lock(), getattr(owner, name)

        def wrapped(this, *a, **k):
            key = (path_of(this), threading.get_ident())
            with lock:
                self.calls += 1
                self.active.add(key)
                self.peak = max(self.peak, len(self.active))
                for other in self.active:
                    self.overlaps.setdefault(other[0], set()).update(o[0] for o in self.active if o != other)
            try:
                time.sleep(delay)
                return original(this, *a, **k)
            finally:
                with lock:
                    self.active.discard(key)

        monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("planar", [True, False])
def test_tifffile_bombs_are_refused_before_decoding(tmp_path: Path, monkeypatch, planar: bool):
    """The issue's bomb (6 zlib bands), planar or not (Pillow cannot open the contiguous one, so
    tifffile reads both): refused from the header, the pixels never decoded."""
    path = _zeros_tiff(tmp_path / "bomb.tif", 110, 110, planar=planar)
    assert path.stat().st_size < 2000
    spy = _Spy(monkeypatch, tifffile.TiffFile, "asarray")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 110 * 110 - 1)
    with pytest.raises(DatasetError, match=r"bomb\.tif: refused as a possible decompression bomb"):
        open_image(path)
    assert spy.calls == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2 * 110 * 110)  # within both limits (6 bytes a pixel < 2 x 4): read
    assert open_image(path).size == (110, 110) and spy.calls == 1


def test_many_bands_cannot_multiply_the_pixel_limit(tmp_path: Path, monkeypatch):
    """Within the pixel limit, but 50 bands: more bytes decoded than 4 per allowed pixel."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    wide = _zeros_tiff(tmp_path / "wide.tif", 20, 20, bands=50)  # 400 pixels x 50 bytes = 20,000 > 4,000
    with pytest.raises(DatasetError, match=r"wide\.tif: refused as a possible decompression bomb.*50 bands"):
        open_image(wide)
    assert open_image(_zeros_tiff(tmp_path / "six.tif", 20, 20, bands=6)).size == (20, 20)


@pytest.mark.parametrize("bands", [1, 6])
def test_a_huge_tile_of_a_small_image_is_refused(tmp_path: Path, monkeypatch, bands: int):
    """Each tile is decoded whole, so its size is checked too (Pillow reads the 1-band file, tifffile the other)."""
    path = _zeros_tiff(tmp_path / "tiled.tif", 16, 16, bands=bands, tile=(512, 512))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(DatasetError, match=r"tiled\.tif \(one tile\): refused as a possible decompression bomb"):
        open_image(path)


def _decode_all(paths: list[Path], workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        assert all(img.mode == "RGB" for img in pool.map(open_image, paths))


def test_concurrent_tifffile_decodes_share_the_memory_budget(tmp_path: Path, monkeypatch):
    """HARMA_DECODE_MB=1: 200 x 200 x 6 bands (+ the RGB copy) is 0.4 MB, so two decodes fit at once, not three;
    a 2 MB one (400 x 400 x 6 bands) runs alone."""
    monkeypatch.setenv("HARMA_DECODE_MB", "1")
    small = [_zeros_tiff(tmp_path / f"s{i}.tif", 200, 200, planar=False) for i in range(6)]
    big = _zeros_tiff(tmp_path / "big.tif", 400, 400, planar=False)
    spy = _Spy(monkeypatch, tifffile.TiffFile, "asarray", delay=0.05, path_of=lambda tif: Path(tif.filename).name)
    _decode_all(small[:3] + [big] + small[3:])
    assert spy.calls == 7
    assert spy.peak == 2, f"at most two 0.4 MB decodes fit in 1 MB; {spy.peak} ran at once"
    assert not spy.overlaps.get("big.tif"), f"the decode larger than the budget overlapped {spy.overlaps['big.tif']}"


def test_concurrent_pillow_decodes_share_the_memory_budget(tmp_path: Path, monkeypatch):
    """The same budget for Pillow: a 256 x 256 PNG costs 0.5 MB (4 bytes a pixel decoded, 4 for RGB): two in 1 MB."""
    monkeypatch.setenv("HARMA_DECODE_MB", "1")
    paths = []
    for i in range(6):
        Image.new("RGB", (256, 256), (i, 0, 0)).save(tmp_path / f"p{i}.png")
        paths.append(tmp_path / f"p{i}.png")
    spy = _Spy(monkeypatch, ImageFile.ImageFile, "load", delay=0.05)
    _decode_all(paths)
    assert 6 <= spy.calls and spy.peak <= 2, f"{spy.peak} Pillow decodes ran at once"


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5"])
def test_a_bad_decode_budget_names_the_variable(tmp_path: Path, monkeypatch, value: str):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setenv("HARMA_DECODE_MB", value)
    with pytest.raises(HarmaError, match=f"HARMA_DECODE_MB={value!r}"):
        open_image(tmp_path / "a.png")


def test_budget_admits_in_arrival_order_and_can_be_set_from_code(monkeypatch):
    """A decode larger than the budget is not starved by later small ones; set_decode_budget overrides the variable."""
    # the module is new: imported here, so that on the old code the tests above fail for their own reason
    from harma.data.decode_limits import MB, DecodeBudget, decode_budget_mb, set_decode_budget

    monkeypatch.setenv("HARMA_DECODE_MB", "3")
    set_decode_budget(2)
    try:
        assert decode_budget_mb() == 2
        with pytest.raises(HarmaError, match="at least 1"):
            set_decode_budget(0)
    finally:
        set_decode_budget(None)
    assert decode_budget_mb() == 3
    budget, order, started = DecodeBudget(), [], threading.Event()

    def take(name: str, nbytes: int, hold: float) -> None:
        with budget.reserve(nbytes):
            order.append(name)
            started.set()
            time.sleep(hold)

    first = threading.Thread(target=take, args=("small-1", 2 * MB, 0.1))
    first.start()
    started.wait()
    late = []
    for name, nbytes in (("big", 5 * MB), ("small-2", 1 * MB)):
        late.append(threading.Thread(target=take, args=(name, nbytes, 0.0)))
        late[-1].start()
        time.sleep(0.02)
    for t in [first, *late]:
        t.join()
    assert order == ["small-1", "big", "small-2"] and budget.in_flight == 0 and budget.peak == 5 * MB
