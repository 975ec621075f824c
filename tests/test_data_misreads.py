"""Annotation files that used to be misread silently: a filename listed twice in the one-per-image
PE-RSITR txt layout, an unbalanced quote (or malformed quoting, or an unquoted delimiter) in a
csv/tsv caption, and two labels for one image. Each is refused with the file and the line(s); the
well-defined cases (repeats in the per-caption layout, rows of one image spread over a file, quoted
captions holding commas) keep loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harma.data import DatasetError, load_split


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _load(root: Path, split: str = "train", **kw):
    return load_split(root, split, check_images=False, **kw)


def _grouped(split) -> dict[str, list[str]]:
    return {split.images[i].name: [split.captions[t] for t in ts] for i, ts in enumerate(split.image_to_texts())}


# --------------------------------------------------------------------------- PE-RSITR txt


@pytest.mark.parametrize("repeat", ["2.jpg", "./2.jpg"])
def test_txt_name_listed_twice_in_the_per_image_layout_is_refused(tmp_path: Path, repeat: str) -> None:
    """4 filename lines x 5 captions where line 4 repeats line 2: the reader merged them into one
    image with 10 captions; now both line numbers are named."""
    _write(tmp_path / "train_filename.txt", f"1.jpg\n2.jpg\n3.jpg\n{repeat}\n")
    _write(tmp_path / "train_caps.txt", "".join(f"caption {c}\n" for c in range(20)))
    with pytest.raises(DatasetError) as err:
        _load(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "train_filename.txt") in msg and "lines 2 and 4" in msg and repeat in msg


def test_txt_per_caption_layout_still_groups_repeated_names(tmp_path: Path) -> None:
    _write(tmp_path / "train_filename.txt", "a.jpg\na.jpg\nb.jpg\na.jpg\n")
    _write(tmp_path / "train_caps.txt", "a1\na2\nb1\na3\n")
    assert _grouped(_load(tmp_path)) == {"a.jpg": ["a1", "a2", "a3"], "b.jpg": ["b1"]}
    _write(tmp_path / "train_filename.txt", "a.jpg\nb.jpg\n")  # per image, k=2, no repeat: fine
    assert _grouped(_load(tmp_path, expected_captions_per_image=2)) == {"a.jpg": ["a1", "a2"], "b.jpg": ["b1", "a3"]}


# --------------------------------------------------------------------------- csv / tsv quoting


def _table(tmp_path: Path, sep: str, rows: list[str]) -> Path:
    name = "train.tsv" if sep == "\t" else "train.csv"
    return _write(tmp_path / name, "\n".join([f"image{sep}caption"] + rows) + "\n")


@pytest.mark.parametrize("sep", [",", "\t"])
@pytest.mark.parametrize("closed_at", [None, 7])
def test_csv_unbalanced_quote_is_refused_at_the_line_it_opens(tmp_path: Path, sep: str, closed_at) -> None:
    """12 rows; row 4 (file line 5) opens a quote it never closes, so it swallowed the rows after it
    (to the end, or to a later row that holds a quote) into one caption: 12 images read as 8 or 9."""
    rows = [f"{i}.jpg{sep}a plane number {i}" for i in range(1, 13)]
    rows[3] = f'4.jpg{sep}"a plane number 4'
    if closed_at is not None:
        rows[closed_at - 2] = f'{closed_at - 1}.jpg{sep}a plane" number x'
    path = _table(tmp_path, sep, rows)
    with pytest.raises(DatasetError) as err:
        _load(tmp_path)
    msg = str(err.value)
    assert f"{path}: line 5: a quoted field opens here" in msg and "unbalanced" in msg


@pytest.mark.parametrize("row, why", [
    ('2.jpg,"a plane" on a runway', "line 3: a quoted field opens here"),  # was read as 'a plane on a runway'
    ("2.jpg,a plane, on a runway", "line 3: 3 fields, expected 2"),  # was cut to 'a plane'
])
def test_csv_malformed_quoting_and_unquoted_comma_are_refused(tmp_path: Path, row: str, why: str) -> None:
    path = _table(tmp_path, ",", ["1.jpg,one", row, "3.jpg,three"])
    with pytest.raises(DatasetError, match="line 3") as err:
        _load(tmp_path)
    assert f"{path}: {why}" in str(err.value)


def test_csv_valid_quoting_keeps_working(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", 'image,caption,label_name\r\n1.jpg,"a plane, on a runway",air\r\n'
           '2.jpg,"the ""big"" one",sea\r\n\r\n3.jpg,a \'quoted\' word and a "mid" quote,sea,\r\n')
    split = _load(tmp_path)
    assert split.captions == ["a plane, on a runway", 'the "big" one', 'a \'quoted\' word and a "mid" quote']
    assert split.labels == ["air", "sea", "sea"]


# --------------------------------------------------------------------------- duplicates, labels


def test_rows_of_one_image_merge_in_file_order_in_every_table_format(tmp_path: Path) -> None:
    rows = [("x.jpg", "x1"), ("y.jpg", "y1"), ("./x.jpg", "x2")]
    _write(tmp_path / "train.csv", "image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    _write(tmp_path / "train.jsonl", "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    _write(tmp_path / "data_train.json", json.dumps([{"image": i, "caption": [c]} for i, c in rows]))
    for fmt in ("csv", "jsonl", "harma_json"):
        assert _grouped(_load(tmp_path, format=fmt)) == {"x.jpg": ["x1", "x2"], "y.jpg": ["y1"]}, fmt


def test_two_labels_for_one_image_are_refused_naming_both_places(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", "image,caption,label_name\nx.jpg,x1,beach\ny.jpg,y1,port\nx.jpg,x2,desert\n"
           "z.jpg,z1,\n")
    with pytest.raises(DatasetError) as err:
        _load(tmp_path, format="csv")
    msg = str(err.value)
    assert f"{tmp_path / 'train.csv'}: line 4: image 'x.jpg' has label 'desert'" in msg
    assert f"{tmp_path / 'train.csv'}: line 2 gives it 'beach'" in msg
    entries = [{"image": "x.jpg", "caption": "x1", "label_name": "beach"},
               {"image": "x.jpg", "caption": "x2", "label_name": "desert"}]
    _write(tmp_path / "data_train.json", json.dumps(entries))
    with pytest.raises(DatasetError, match=r"entry 1: image 'x.jpg' has label 'desert', but .*entry 0 gives it 'beach'"):
        _load(tmp_path, format="harma_json")
    entries[1]["label_name"] = "beach"  # the same label twice, or a row without one: fine
    entries.append({"image": "x.jpg", "caption": "x3"})
    _write(tmp_path / "data_train.json", json.dumps(entries))
    assert _load(tmp_path, format="harma_json").labels == ["beach"]
