"""``python -m training.build_demo``: the bundled gallery from a UCM-style split (numeric ids, 100 per class)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from harma.data import load_split
from harma.io import folder_bytes
from harma_app.common import DEMO, DEMO_MAX_BYTES
from training.build_demo import MAX_BYTES, main


def test_builds_a_small_labelled_gallery(tmp_path, capsys):
    data = tmp_path / "ucm"
    (data / "images").mkdir(parents=True)
    ids = [91, 92, 191, 192, 2091]
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(data / "images" / f"{i}.jpg")
    (data / "test_filename.txt").write_text("\n".join(f"{i}.jpg" for i in ids) + "\n")
    (data / "test_caps.txt").write_text("\n".join(f"caption {c} of {i} ." for i in ids for c in range(5)) + "\n")
    out = tmp_path / "demo"
    assert main(["--data", str(data), "--out", str(out), "--side", "64"]) == 0
    assert "MB" in capsys.readouterr().out
    s = load_split(out, "test")
    assert [p.name for p in s.images] == [f"{i}.jpg" for i in ids]
    assert s.labels == ["agricultural", "agricultural", "airplane", "airplane", "tennis court"]
    assert s.captions[:2] == ["caption 0 of 91 .", "caption 1 of 91 ."] and s.num_captions == 25
    assert all(max(Image.open(p).size) == 64 for p in s.images)
    assert "public domain" in (out / "CREDITS.md").read_text()
    assert main(["--data", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_the_committed_demo_folder_is_within_its_budget():
    """The gallery and what harma_app.precompute ships beside it share one 8 MiB budget."""
    assert DEMO_MAX_BYTES == MAX_BYTES == 8 * 2**20
    size = folder_bytes(DEMO)
    assert 0 < size <= DEMO_MAX_BYTES, f"{DEMO} takes {size / 2**20:.2f} MiB"
