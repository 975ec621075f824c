"""Where a checkpoint was adapted, as the app's model picker and status line say it (issue 38): the
dataset recorded in adapter_config.json, the backbone's own training data, and a note when the gallery
comes from another dataset than the adapters'."""

from __future__ import annotations

from pathlib import Path

import pytest

from harma.data import RetrievalSplit
from harma.sources import ModelSource, dataset_key, discover_sources, trained_on
from harma_app.controls import adaptation_note, gallery_dataset
from harma_app.galleries import Gallery

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder, key", [("../shared/datasets/ucm", "ucm"), ("/data/UCM_Captions/", "ucm"),
                                         ("UCMerced", "ucm"), ("RSICD", "rsicd"), ("my-tiles 2", "mytiles2")])
def test_dataset_key_reduces_folder_names(folder, key):
    assert dataset_key(folder) == key


def test_trained_on_reads_what_training_recorded():
    assert trained_on({"extra": {"data": {"root": "/abs/x/rsicd", "root_config": "../d/RSICD"}}}) == "rsicd"
    assert trained_on({"extra": {"data": {"root": "/abs/ucm"}}}) == "ucm"
    assert trained_on({"extra": {"data": {"root_config": "synthetic"}}}) is None
    assert trained_on({"extra": {}}) is None and trained_on({}) is None


def test_the_picker_says_where_each_shipped_checkpoint_was_adapted():
    sources = discover_sources(ROOT)
    shipped = [s for s in sources.values() if s.adapters is not None and s.adapters.parent == ROOT / "checkpoints"]
    assert shipped and any(s.key == "preset:rs-minilm-harma" for s in shipped)
    for s in shipped:
        assert (s.adapted_on, s.backbone_on) == ("ucm", "rsicd"), s
        assert s.label.endswith(" · adapted on UCM-Captions, backbone trained on RSICD"), s.label
    assert sources["checkpoint:ucm-mrs"].label.startswith("ucm-mrs (mrs on RS-ViT-S16-MiniLM)")  # the browser tests' name


def _gallery(root: Path, name: str = "ucm/test", bundled: bool = False) -> Gallery:
    return Gallery(name, RetrievalSplit(name, root, [], [], []), None, bundled=bundled)


def test_a_note_when_the_gallery_is_not_from_the_adaptation_data(tmp_path):
    ucm = ModelSource("checkpoint:x", "x", tmp_path, adapted_on="ucm")
    assert gallery_dataset(_gallery(tmp_path / "demo", bundled=True)) == "ucm"  # the demo: UCM-Captions' test split
    assert adaptation_note(ucm, _gallery(tmp_path / "demo", bundled=True)) is None
    assert adaptation_note(ucm, _gallery(tmp_path / "UCM_Captions")) is None
    note = adaptation_note(ucm, _gallery(tmp_path / "rsicd", "rsicd/val"))
    assert note.startswith("This model was adapted on UCM-Captions and this gallery is from RSICD:")
    assert "below the baseline" in note and str(tmp_path) not in note
    uploads = _gallery(tmp_path / "up", "uploaded images (3)")
    assert gallery_dataset(uploads) is None
    assert "this gallery is not recognised as UCM-Captions" in adaptation_note(ucm, uploads)
    assert adaptation_note(ModelSource("checkpoint:y", "y", tmp_path), _gallery(tmp_path / "rsicd")) is None
