"""Where a checkpoint was adapted, as the app's model picker and status line say it (issue 38): the
dataset recorded in adapter_config.json, the backbone's own training data, and a note when the gallery
comes from another dataset than the adapters'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harma.data import RetrievalSplit
from harma.io import file_sha256
from harma.metrics import METRIC_KEYS
from harma.sources import ModelSource, dataset_key, discover_sources, trained_on
from harma_app.controls import adaptation_note, gallery_dataset
from harma_app.galleries import Gallery
from training import benchmark
from training.benchmark_tables import transfer_markdown

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


def test_the_transfer_table_is_in_the_readme_and_every_model_card():
    """results/rsicd/transfer/*.json covers every shipped checkpoint (the weights shipped now), and the
    README and each model card show the table they render (python -m training.benchmark --transfer)."""
    table = transfer_markdown(ROOT / "results", ROOT)
    records = [json.loads(p.read_text()) for p in (ROOT / "results" / "rsicd" / "transfer").glob("*.json")]
    shipped = {f"checkpoints/{p.parent.name}" for p in (ROOT / "checkpoints").glob("*/adapter_config.json")}
    assert {r["checkpoint"] for r in records} == shipped
    for r in records:  # each row scored the weights shipped now, not an earlier checkpoint of the same name
        assert r["weights_sha256"] == file_sha256(ROOT / r["checkpoint"] / "adapter_model.safetensors"), r["checkpoint"]
    for path in [ROOT / "README.md", *sorted((ROOT / "checkpoints").glob("*/MODEL_CARD.md"))]:
        block = path.read_text().split("<!-- rsicd-transfer-table -->\n", 1)[1].split("\n<!-- /rsicd-transfer-table -->")[0]
        assert block == table, path
    assert table.splitlines()[2].startswith("| `checkpoints/rs-backbone` | - (the backbone alone")
    assert all("| UCM-Captions |" in line for line in table.splitlines()[3:])


def test_transfer_rewrites_only_the_marked_files(tmp_path, monkeypatch):
    results = tmp_path / "results" / "rsicd" / "transfer"
    results.mkdir(parents=True)
    row = {k: 1.0 for k in METRIC_KEYS}
    (results / "a.json").write_text(json.dumps({**row, "mR": 2.5, "checkpoint": "checkpoints/a", "method": "harma"}))
    (results / "b.json").write_text(json.dumps({**row, "mR": 9.0, "checkpoint": "checkpoints/b", "method": "full"}))
    (tmp_path / "checkpoints" / "a").mkdir(parents=True)
    shutil.copy(ROOT / "checkpoints" / "ucm-mrs" / "adapter_config.json", tmp_path / "checkpoints" / "a")
    (tmp_path / "checkpoints" / "a" / "MODEL_CARD.md").write_text("card\n<!-- rsicd-transfer-table -->\n<!-- /rsicd-transfer-table -->\n")
    (tmp_path / "checkpoints" / "b").mkdir()
    (tmp_path / "checkpoints" / "b" / "MODEL_CARD.md").write_text("no markers\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- rsicd-transfer-table -->\nold\n<!-- /rsicd-transfer-table -->\ny\n")
    monkeypatch.setattr(benchmark, "ROOT", tmp_path)
    assert benchmark.main(["--transfer", "--results-dir", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    table = transfer_markdown(tmp_path / "results", tmp_path)
    assert table.splitlines()[2].startswith("| `checkpoints/b` | - (the backbone alone")
    assert table.splitlines()[3] == "| `checkpoints/a` | UCM-Captions | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 2.50 |"
    assert readme.read_text() == f"x\n<!-- rsicd-transfer-table -->\n{table}\n<!-- /rsicd-transfer-table -->\ny\n"
    assert table in (tmp_path / "checkpoints" / "a" / "MODEL_CARD.md").read_text()
    assert (tmp_path / "checkpoints" / "b" / "MODEL_CARD.md").read_text() == "no markers\n"
