"""The history page's UCM table (random carve, before the held-out protocol) is the one
``python -m training.report`` renders from ``results/history/ucm-random-carve/ucm.json``, and that file's
rows are the evaluation outputs beside it (no number is typed by hand). The current table is checked
by ``tests/test_training_benchmark.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harma.metrics import METRIC_KEYS
from training.report import markdown

ROOT = Path(__file__).resolve().parents[1]
HISTORY = ROOT / "results" / "history" / "ucm-random-carve"


def test_history_table_matches_its_results_json():
    results = HISTORY / "ucm.json"
    if not results.is_file():
        pytest.skip("no history results in this checkout")
    data = json.loads(results.read_text())
    assert markdown(data) in (ROOT / "docs" / "results-history.md").read_text()
    evals = {p.stem: json.loads(p.read_text()) for p in HISTORY.glob("*.json") if p.name != "ucm.json"}
    for row in data["rows"]:
        source = evals[row["eval"]]
        ref = source["baseline"] if row["method"] == "zeroshot" else source
        assert {k: row[k] for k in METRIC_KEYS} == {k: ref[k] for k in METRIC_KEYS}, row["label"]
