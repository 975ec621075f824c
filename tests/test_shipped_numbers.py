"""Every shipped UCM checkpoint still scores what its record says (issue 38): each
``results/<suite>/shipped/*.json`` (one per checkpoint, from the suite that shipped it) is re-run
with the command it records (``training.evaluate`` on UCM's test split, the stored fp16 weights
computed in fp32 on the CPU, ties at their expected rank, as recorded) and compared with its
numbers, and the zero-shot backbone with the records' baseline. A re-shipped checkpoint that drifts
from its README row fails here.

Opt-in (marker ``shipped``, deselected by pyproject's addopts): five evaluations of UCM test take about
two minutes on 2 CPU cores. ``python -m pytest -q -m shipped`` runs it; it skips without the dataset.

Tolerance: on the machine that recorded them the numbers come back to the last digit. Elsewhere only
the order of floating-point sums changes (other BLAS kernels or thread counts), which can swap two
nearly equal scores: one image query moves an i2t R@K by 100/210 = 0.48, one caption query a t2i R@K
by 100/1050 = 0.095, and mR by a sixth of that. Each R@K may move by one image query (0.5) and mR by
0.1; a re-trained or re-exported checkpoint moves them by far more (fp16 rounding alone moved one
row's test mR by 0.05, a rerun on another machine by 0.8).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from harma.metrics import METRIC_KEYS
from training import evaluate as evaluate_cli

ROOT = Path(__file__).resolve().parents[1]
UCM = ROOT.parent / "shared" / "datasets" / "ucm"
RECORDS = sorted((ROOT / "results").glob("*/shipped/*.json"))
R_AT_K_TOL, MR_TOL = 0.5, 0.1

pytestmark = [pytest.mark.slow, pytest.mark.shipped,
              pytest.mark.skipif(not (UCM / "test_caps.txt").is_file(), reason=f"no UCM-Captions at {UCM}")]


def _close(got: dict, want: dict, what: str) -> None:
    assert got["num_images"] == want["num_images"] and got["num_captions"] == want["num_captions"], what
    assert got.get("ties", "expected") == want.get("ties", "expected"), what
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=MR_TOL if k == "mR" else R_AT_K_TOL), f"{what}: {k}"


def _rerun(record: dict, baseline: bool) -> dict:
    """The record's own command (``python -m training.evaluate ...``), on this checkout's dataset folder."""
    argv = shlex.split(record["command"])[3:]
    argv[argv.index("--data") + 1] = str(UCM)
    if not baseline:
        argv.remove("--baseline")
    args = evaluate_cli.build_parser().parse_args([*argv, "--device", "cpu", "--num-workers", "1"])
    args.checkpoint = str(ROOT / args.checkpoint)
    return evaluate_cli.evaluate(args)


def test_there_are_records_to_check():
    assert len(RECORDS) >= 4 and all(json.loads(p.read_text())["command"].startswith("python -m training.evaluate ")
                                     for p in RECORDS)


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_a_shipped_checkpoint_scores_its_recorded_numbers(path):
    record = json.loads(path.read_text())
    baseline = path == RECORDS[0]  # the backbone is the same for every record: check it once
    result = _rerun(record, baseline)
    _close(result, record["test"], record["checkpoint"])
    if baseline:
        _close(result["baseline"], record["baseline_test"], "zero-shot backbone")
