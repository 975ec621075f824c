"""`python -m training.oracle`: scene-class and text-space reference rows for a split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harma.data import RetrievalSplit, write_synthetic_dataset
from tests.conftest import TINY_NAME
from training.cli import CliError
from training.oracle import class_labels, class_only, main, text_space


def _split(names: list[str], caps_per_image: int = 2) -> RetrievalSplit:
    images = [Path(f"/data/images/{n}") for n in names]
    t2i = [i for i in range(len(names)) for _ in range(caps_per_image)]
    return RetrievalSplit("toy/val", Path("/data"), images, [f"c{t}" for t in range(len(t2i))], t2i)


def test_labels_from_aid_style_names_or_a_clear_error():
    assert class_labels(_split(["airport_1.jpg", "bare_land_12.jpg"])) == ["airport", "bare_land"]
    with pytest.raises(CliError, match="00001.jpg is not named CLASS_N"):
        class_labels(_split(["airport_1.jpg", "00001.jpg"]))


def test_class_only_is_perfect_with_one_image_per_class_and_random_within_a_class():
    one_each = _split(["a_1.jpg", "b_1.jpg", "c_1.jpg"])
    assert all(v == 100.0 for v in class_only(one_each, class_labels(one_each)).values())
    # 20 images of one class, 1 caption each: t2i R@1 is a 1-in-20 guess (5% in expectation)
    same = _split([f"a_{i}.jpg" for i in range(20)], caps_per_image=1)
    r = class_only(same, class_labels(same), seeds=50)
    assert 2.0 < r["t2i_R@1"] < 8.0 and 40.0 < r["t2i_R@10"] < 60.0


def test_text_space_rows():
    split = _split(["a_1.jpg", "a_2.jpg", "b_1.jpg"])  # 2 captions each; images 0 and 1 share a class
    text = torch.eye(6)[[0, 1, 2, 3, 4, 5]]  # every caption its own direction
    rows = text_space(text, split, class_labels(split))
    assert rows["own captions (text space)"]["mR"] == 100.0
    centroid = rows["class centroid (text space)"]
    # the two class-a images get one embedding and all 4 class-a captions tie; ties go to the smaller
    # index, so image 1 ranks image 0's caption first and image 1's captions find image 0 first
    assert centroid["i2t_R@1"] == pytest.approx(100 * 2 / 3) and centroid["t2i_R@1"] == pytest.approx(100 * 4 / 6)
    assert centroid["i2t_R@5"] == 100.0 and centroid["t2i_R@5"] == 100.0


def test_cli_on_a_dataset_with_labels(tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "syn", n_images=8, val_images=12, image_size=16)
    out = tmp_path / "oracle.json"
    assert main(["--data", str(data), "--split", "val", "--model", TINY_NAME, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scene class only" in printed and "own captions (text space)" in printed
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"scene class only", "class centroid (text space)", "own captions (text space)"}
    assert all(0.0 <= v <= 100.0 for row in rows.values() for v in row.values())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--no-text"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
