"""Hermetic tests of harma.data's readers: every annotation format and every error path (splits, captions
and datasets: test_data_splits.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from harma.data import (
    DatasetError,
    RetrievalSplit,
    detect_format,
    load_split,
)


def _img(path: Path, size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (200, 30, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _grouped(split: RetrievalSplit) -> dict[str, list[str]]:
    """image file name -> its captions, to compare loaded splits against expectations."""
    return {split.images[i].name: [split.captions[t] for t in ts] for i, ts in enumerate(split.image_to_texts())}


# --------------------------------------------------------------------------- harma_json


def test_json_per_caption_grouped_in_first_appearance_order(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.jpg"):
        _img(tmp_path / "images" / name)
    entries = [
        {"image": "images/b.jpg", "caption": "b one", "image_id": 0, "label_name": "beach"},
        {"image": "images/a.jpg", "caption": "a one", "image_id": 1, "label_name": "airport"},
        {"image": "images/b.jpg", "caption": "b two", "image_id": 0, "label_name": "beach"},
    ]
    _write(tmp_path / "ds_train.json", json.dumps(entries))
    assert detect_format(tmp_path) == "harma_json"
    split = load_split(tmp_path, "train")
    assert split.name == f"{tmp_path.name}/train"
    assert split.images == [tmp_path / "images" / "b.jpg", tmp_path / "images" / "a.jpg"]
    assert all(p.is_absolute() for p in split.images)
    assert split.captions == ["b one", "a one", "b two"]
    assert split.text_to_image == [0, 1, 0]
    assert split.labels == ["beach", "airport"]
    assert split.image_to_texts() == [[0, 2], [1]]


def test_json_per_image_and_mixed_shapes(tmp_path: Path) -> None:
    for name in ("x.jpg", "y.jpg"):
        _img(tmp_path / "images" / name)
    entries = [
        {"image": "images/x.jpg", "caption": ["x1", "x2"]},
        {"image": "images/y.jpg", "caption": "y1"},
        {"image": "images/x.jpg", "caption": "x3"},
    ]
    _write(tmp_path / "val.json", json.dumps(entries))
    split = load_split(tmp_path, "val")
    assert _grouped(split) == {"x.jpg": ["x1", "x2", "x3"], "y.jpg": ["y1"]}
    assert split.labels is None
    assert split.num_images == 2 and split.num_captions == 4


def test_json_image_paths_relative_to_images_subfolder(tmp_path: Path) -> None:
    # HarMA's paths are relative to an image root; here that root is root/images.
    _img(tmp_path / "images" / "test" / "p.tif")
    _write(tmp_path / "rsitmd_test.json", json.dumps([{"image": "test/p.tif", "caption": ["c"]}]))
    split = load_split(tmp_path, "test")
    assert split.images == [tmp_path / "images" / "test" / "p.tif"]


def test_json_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "d_train.json", '[\n  {"image": "a.jpg",\n   "caption": oops}\n]')
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "column" in msg


@pytest.mark.parametrize(
    ("entry", "field"),
    [({"caption": "c"}, "'image'"), ({"image": "a.jpg"}, "'caption'"), ({"image": "a.jpg", "caption": 3}, "caption")],
)
def test_json_bad_entry_names_file_and_index(tmp_path: Path, entry: dict, field: str) -> None:
    _img(tmp_path / "a.jpg")
    path = _write(tmp_path / "d_train.json", json.dumps([{"image": "a.jpg", "caption": "ok"}, entry]))
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert str(path) in msg and "entry 1" in msg and field in msg


def test_json_top_level_not_a_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.json", json.dumps({"image": "a.jpg"}))
    with pytest.raises(DatasetError, match="expected a JSON list") as err:
        load_split(tmp_path, "train")
    assert str(path) in str(err.value)


def test_missing_split_lists_existing_ones(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg")
    for s in ("train", "val"):
        _write(tmp_path / f"rsicd_{s}.json", json.dumps([{"image": "a.jpg", "caption": "c"}]))
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "test")
    assert f"no 'test' split in {tmp_path}" in str(err.value)
    assert "found: train, val" in str(err.value)


def test_ambiguous_split_files(tmp_path: Path) -> None:
    for ds in ("rsicd", "rsitmd"):
        _write(tmp_path / f"{ds}_train.json", "[]")
    with pytest.raises(DatasetError, match="ambiguous.*rsicd_train.json.*rsitmd_train.json"):
        load_split(tmp_path, "train")


# --------------------------------------------------------------------------- pe_rsitr_txt


def test_txt_one_line_per_image(tmp_path: Path) -> None:
    for name in ("1.jpg", "2.jpg"):
        _img(tmp_path / "images" / name)
    _write(tmp_path / "train_filename.txt", "1.jpg\n2.jpg\n")
    _write(tmp_path / "train_caps.txt", "\n".join(f"cap {i}" for i in range(6)) + "\n\n")
    assert detect_format(tmp_path) == "pe_rsitr_txt"
    split = load_split(tmp_path, "train", expected_captions_per_image=3)
    assert split.images == [tmp_path / "images" / "1.jpg", tmp_path / "images" / "2.jpg"]
    assert split.captions == [f"cap {i}" for i in range(6)]
    assert split.text_to_image == [0, 0, 0, 1, 1, 1]
    assert split.labels is None


def test_txt_one_line_per_caption_with_reappearing_name(tmp_path: Path) -> None:
    for name in ("a.tif", "b.tif"):
        _img(tmp_path / name)  # images directly in root this time
    _write(tmp_path / "test_filename.txt", "a.tif\na.tif\nb.tif\nb.tif\na.tif\n")
    _write(tmp_path / "test_caps.txt", "a1\na2\nb1\nb2\na3\n")
    split = load_split(tmp_path, "test")
    assert split.images == [tmp_path / "a.tif", tmp_path / "b.tif"]
    assert split.text_to_image == [0, 0, 1, 1, 0]
    assert _grouped(split) == {"a.tif": ["a1", "a2", "a3"], "b.tif": ["b1", "b2"]}


def test_txt_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    _write(tmp_path / "train_filename.txt", "1.jpg\n2.jpg\n")
    _write(tmp_path / "train_caps.txt", "a\nb\nc\n")
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "train_filename.txt has 2 lines" in msg and "train_caps.txt has 3 lines" in msg


def test_txt_caption_file_with_lines_missing_is_refused(tmp_path: Path) -> None:
    """20 images x 5 captions with the first 20 caption lines deleted still divides (4 per image);
    the reader must not pair every image with another image's captions."""
    names = [f"{i}.jpg" for i in range(1, 21)]
    for name in names:
        _img(tmp_path / name)
    _write(tmp_path / "train_filename.txt", "\n".join(names) + "\n")
    caps = [f"caption {c} of {name}" for name in names for c in range(5)]
    _write(tmp_path / "train_caps.txt", "\n".join(caps) + "\n")
    assert _grouped(load_split(tmp_path, "train"))["1.jpg"] == [f"caption {c} of 1.jpg" for c in range(5)]
    _write(tmp_path / "train_caps.txt", "\n".join(caps[20:]) + "\n")
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "train_caps.txt has 80 lines (4.00 per filename)" in msg and "5 caption lines per filename" in msg
    split = load_split(tmp_path, "train", expected_captions_per_image=4)  # said explicitly: accepted
    assert split.num_captions == 80 and split.text_to_image[:5] == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("fmt", ["txt", "json", "csv", "jsonl"])
def test_empty_caption_is_named_by_file_and_line_or_dropped(tmp_path: Path, caplog, fmt: str) -> None:
    for name in ("1.jpg", "2.jpg"):
        _img(tmp_path / name)
    caps = {"1.jpg": ["a b", "   "], "2.jpg": ["e f", "g h"]}
    if fmt == "txt":
        _write(tmp_path / "train_filename.txt", "1.jpg\n1.jpg\n2.jpg\n2.jpg\n")
        _write(tmp_path / "train_caps.txt", "a b\n   \ne f\ng h\n")
        where = "train_caps.txt: line 2"
    elif fmt == "json":
        _write(tmp_path / "dataset_train.json", json.dumps([{"image": k, "caption": v} for k, v in caps.items()]))
        where = "dataset_train.json: entry 0, caption 1"
    elif fmt == "csv":
        rows = ["image,caption"] + [f"{k},{c}" for k, v in caps.items() for c in v]
        _write(tmp_path / "train.csv", "\n".join(rows) + "\n")
        where = "train.csv: line 3"
    else:
        lines = [json.dumps({"image": k, "caption": c}) for k, v in caps.items() for c in v]
        _write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
        where = "train.jsonl: line 2"
    with pytest.raises(DatasetError, match=f"{where}: empty caption") as err:
        load_split(tmp_path, "train")
    assert "allow_empty" in str(err.value)
    with caplog.at_level(logging.WARNING):
        split = load_split(tmp_path, "train", allow_empty=True)
    assert split.num_captions == 3 and _grouped(split) == {"1.jpg": ["a b"], "2.jpg": ["e f", "g h"]}
    assert "dropped 1 empty caption" in caplog.text


def test_image_left_without_captions_is_dropped_with_them(tmp_path: Path) -> None:
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _img(tmp_path / name)
    rows = ["image,caption", "1.jpg,a", "2.jpg,", "3.jpg,c"]
    _write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    split = load_split(tmp_path, "train", allow_empty=True)
    assert [p.name for p in split.images] == ["1.jpg", "3.jpg"] and split.text_to_image == [0, 1]


def test_txt_missing_split(tmp_path: Path) -> None:
    _write(tmp_path / "train_filename.txt", "1.jpg\n")
    _write(tmp_path / "train_caps.txt", "a\n")
    with pytest.raises(DatasetError, match="no 'val' split .*found: train"):
        load_split(tmp_path, "val")


# --------------------------------------------------------------------------- csv / jsonl


@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_comma_and_tab(tmp_path: Path, sep: str) -> None:
    for name in ("p.png", "q.png"):
        _img(tmp_path / "imgs" / name)
    rows = [["filepath", "title", "label_name"], ["imgs/p.png", "a red, square", "red"], ["imgs/q.png", "q1", "blue"]]
    rows.append(["imgs/p.png", "p again", "red"])
    if sep == ",":
        text = "\n".join(",".join(f'"{c}"' if "," in c else c for c in r) for r in rows) + "\n"
    else:
        text = "\n".join("\t".join(r) for r in rows) + "\n"
    _write(tmp_path / "train.csv", text)
    assert detect_format(tmp_path) == "csv"
    split = load_split(tmp_path)
    assert split.images == [tmp_path / "imgs" / "p.png", tmp_path / "imgs" / "q.png"]
    assert split.captions == ["a red, square", "q1", "p again"]
    assert split.text_to_image == [0, 1, 0]
    assert split.labels == ["red", "blue"]


def test_csv_missing_column_names_file_and_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "image,words\na.jpg,hello\n")
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path)
    assert str(path) in str(err.value) and "caption / text / title" in str(err.value) and "words" in str(err.value)


def test_csv_short_row_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "caption,image\nfine,a.jpg\nbroken\n")
    with pytest.raises(DatasetError, match="line 3") as err:
        load_split(tmp_path)
    assert str(path) in str(err.value)


def test_jsonl(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        _img(tmp_path / name)
    lines = [{"image": "a.jpg", "text": "a1"}, {"path": "b.jpg", "caption": "b1"}, {"image": "a.jpg", "caption": "a2"}]
    _write(tmp_path / "val.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert detect_format(tmp_path) == "jsonl"
    split = load_split(tmp_path, "val")
    assert split.images == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert split.captions == ["a1", "b1", "a2"]
    assert split.text_to_image == [0, 1, 0]


def test_jsonl_errors_name_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "val.jsonl", '{"image": "a.jpg", "caption": "c"}\n{"image": "a.jpg"\n')
    with pytest.raises(DatasetError, match="line 2, column") as err:
        load_split(tmp_path, "val")
    assert str(path) in str(err.value)
    _write(path, '{"image": "a.jpg", "caption": "c"}\n\n{"image": "b.jpg"}\n')
    with pytest.raises(DatasetError, match="line 3: missing field 'caption'"):
        load_split(tmp_path, "val")


# --------------------------------------------------------------------------- image_folder / detection


def test_image_folder_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    for rel in ("b/2.PNG", "a/1.jpg", "a/z.TIF", "c.webp", "d.jpeg", "e.bmp", ".hidden/x.jpg"):
        _img(tmp_path / rel)
    _write(tmp_path / "notes.md", "not an image")
    assert detect_format(tmp_path) == "image_folder"
    split = load_split(tmp_path, "whatever")
    rel = [p.relative_to(tmp_path).as_posix() for p in split.images]
    assert rel == ["a/1.jpg", "a/z.TIF", "b/2.PNG", "c.webp", "d.jpeg", "e.bmp"]
    assert split.captions == [] and split.text_to_image == []


def test_annotations_win_over_image_folder_and_format_override(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg")
    _write(tmp_path / "train.jsonl", json.dumps({"image": "a.jpg", "caption": "c"}) + "\n")
    assert detect_format(tmp_path) == "jsonl"
    assert load_split(tmp_path, format="image_folder").captions == []
    with pytest.raises(DatasetError, match="unknown dataset format 'coco'"):
        load_split(tmp_path, format="coco")


def test_split_aware_detection_and_empty_annotations(tmp_path: Path) -> None:
    # A stray JSON file must not hide the txt annotations of the requested split.
    _img(tmp_path / "1.jpg")
    _write(tmp_path / "dataset_info.json", "{}")
    _write(tmp_path / "train_filename.txt", "1.jpg\n")
    _write(tmp_path / "train_caps.txt", "one\n")
    assert detect_format(tmp_path) == "harma_json"
    assert load_split(tmp_path).captions == ["one"]
    path = _write(tmp_path / "x_val.json", "[]")
    with pytest.raises(DatasetError, match="no images listed") as err:
        load_split(tmp_path, "val")
    assert str(path) in str(err.value)


def test_detect_empty_folder_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        detect_format(tmp_path)
    msg = str(err.value)
    for expected in (str(tmp_path), "_filename.txt", ".json", ".csv", ".jsonl", "image_folder"):
        assert expected in msg
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(tmp_path / "nope")


# --------------------------------------------------------------------------- missing images / counts


def _json_dataset(tmp_path: Path, present: list[str], listed: list[str], per_image: int = 2) -> Path:
    for name in present:
        _img(tmp_path / "images" / name)
    entries = [{"image": f"images/{n}", "caption": f"{n} {k}"} for n in listed for k in range(per_image)]
    return _write(tmp_path / "d_train.json", json.dumps(entries))


def test_missing_images_error_counts_names_first_five_and_hints(tmp_path: Path) -> None:
    listed = [f"{i}.jpg" for i in range(8)]
    path = _json_dataset(tmp_path, present=listed[:1], listed=listed)
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path)
    msg = str(err.value)
    assert "7 of 8 images" in msg and str(path) in msg and str(tmp_path) in msg
    assert "allow_missing=True" in msg
    assert all(f"images/{i}.jpg" in msg for i in range(1, 6)) and "images/6.jpg" not in msg
    # existence is not checked when asked not to
    assert load_split(tmp_path, check_images=False).num_images == 8


def test_allow_missing_drops_exactly_missing_images_and_captions(tmp_path: Path, caplog) -> None:
    _json_dataset(tmp_path, present=["a.jpg", "c.jpg"], listed=["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    with caplog.at_level(logging.WARNING, logger="harma.data"):
        split = load_split(tmp_path, allow_missing=True)
    assert [p.name for p in split.images] == ["a.jpg", "c.jpg"]
    assert split.captions == ["a.jpg 0", "a.jpg 1", "c.jpg 0", "c.jpg 1"]
    assert split.text_to_image == [0, 0, 1, 1]
    assert "dropped 2 missing images" in caplog.text and "4 captions" in caplog.text


def test_expected_captions_per_image_violation(tmp_path: Path) -> None:
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        _img(tmp_path / name)
    _write(tmp_path / "test_filename.txt", "1.jpg\n1.jpg\n2.jpg\n3.jpg\n3.jpg\n3.jpg\n")
    _write(tmp_path / "test_caps.txt", "a\nb\nc\nd\ne\nf\n")
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path, "test", expected_captions_per_image=2)
    msg = str(err.value)
    assert "test_filename.txt" in msg and "2 of 3 images" in msg and "2.jpg (1)" in msg and "3.jpg (3)" in msg
