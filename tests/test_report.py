"""``python -m training.report``: results JSON and markdown table from evaluation outputs and run folders."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from harma.metrics import METRIC_KEYS
from training.report import main

GAP = {"centroid_distance": 0.5, "uniformity_joint": -2.0, "knn_modality_purity": 0.9, "linear_probe_accuracy": 1.0}


def test_report_collects_rows_and_markdown_round_trips(tmp_path, capsys):
    adapted = {k: 10.0 + i for i, k in enumerate(METRIC_KEYS)}
    base = {k: 1.0 for k in METRIC_KEYS}
    ev = {**adapted, "gap": GAP, "method": "harma", "split": "train:val", "num_images": 9, "num_captions": 45,
          "baseline": {**base, "gap": {**GAP, "centroid_distance": 0.4}}}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(run / "best" / "adapter_model.safetensors"))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch_s": 90.0}) + "\n" + json.dumps({"epoch_s": 30.0}) + "\n")
    out = tmp_path / "new" / "results.json"  # its folder is created
    assert main(["--out", str(out), f"zero-shot={tmp_path / 'eval.json'}:baseline",
                 f"HarMA={tmp_path / 'eval.json'}:{run}"]) == 0
    table = capsys.readouterr().out.strip()
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["trained_params"] == 0 and rows[0]["mR"] == 1.0 and rows[0]["gap"]["centroid_distance"] == 0.4
    assert rows[1]["trained_params"] == 17 and rows[1]["train_minutes"] == 2.0 and rows[1]["mR"] == adapted["mR"]
    assert "| HarMA | 10.00 | 11.00 |" in table and "| 17 | 2 min |" in table
    assert main(["--markdown", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table
    assert main(["--out", str(out), f"x={tmp_path / 'eval.json'}:{tmp_path}"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_update_replaces_rows_by_label_and_keeps_the_others(tmp_path, capsys):
    def evaluation(name, mr):
        metrics = {k: mr for k in METRIC_KEYS}
        (tmp_path / name).write_text(json.dumps({**metrics, "gap": GAP, "baseline": {**metrics, "gap": GAP}}))
        return tmp_path / name

    out = tmp_path / "results.json"
    assert main(["--out", str(out), f"zero-shot={evaluation('a.json', 1.0)}:baseline",
                 f"full={evaluation('b.json', 42.0)}:baseline"]) == 0
    kept = json.loads(out.read_text())["rows"][1]
    (tmp_path / "b.json").unlink()  # the other row's sources are gone
    assert main(["--update", "--out", str(out), f"zero-shot={evaluation('c.json', 2.0)}:baseline",
                 f"new={evaluation('d.json', 3.0)}:baseline"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["zero-shot", "full", "new"]
    assert rows[0]["mR"] == 2.0 and rows[1] == kept and rows[2]["mR"] == 3.0
