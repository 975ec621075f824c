"""The README's UCM table is the one ``python -m training.report`` renders from ``results/ucm.json``,
and that file's rows are the evaluation outputs in ``results/ucm/`` (no number is typed by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harma.metrics import METRIC_KEYS
from training.report import markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_the_results_json():
    results = ROOT / "results" / "ucm.json"
    if not results.is_file():
        pytest.skip("no results/ucm.json in this checkout")
    data = json.loads(results.read_text())
    assert markdown(data) in (ROOT / "README.md").read_text()
    evals = {p.stem: json.loads(p.read_text()) for p in (ROOT / "results" / "ucm").glob("*.json")}
    for row in data["rows"]:
        source = evals[row["eval"]]
        ref = source["baseline"] if row["method"] == "zeroshot" else source
        assert {k: row[k] for k in METRIC_KEYS} == {k: ref[k] for k in METRIC_KEYS}, row["label"]
