"""The protocol fixed in advance (docs/results.md#protocol): ``data.carve=none`` trains on the whole train
split with no validation and keeps the last epoch; suite ``ucm-fixed`` runs it; the report gives mean ± sd
per method and the HarMA - full difference paired by seed with its 95% t-interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harma.errors import ConfigError
from harma.metrics import METRIC_KEYS
from tests.test_encode import write_split
from training import benchmark
from training import evaluate as evaluate_cli
from training.benchmark import SUITES, Method, Suite, check_shippable, plan
from training.benchmark_results import aggregate, paired_difference
from training.benchmark_tables import markdown
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
T_975_4DF = 2.7764451051977987  # Student t, two-sided 95%, 4 degrees of freedom (any statistics table)


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 35.0, 1: 34.0, 2: 36.5, 3: 33.0, 4: 35.5, 7: 99.0}  # seed 7: no partner, left out
    b = {0: 37.0, 1: 36.5, 2: 36.0, 3: 36.0, 4: 37.5}
    p = paired_difference(a, b)
    diffs = [-2.0, -2.5, 0.5, -3.0, -2.0]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["differences"] == diffs
    assert p["mean"] == pytest.approx(mean) and p["sd"] == pytest.approx(sd)
    half = T_975_4DF * sd / math.sqrt(5)
    assert p["interval"] == pytest.approx([mean - half, mean + half])
    one = paired_difference({0: 1.0}, {0: 3.0})
    assert one["mean"] == -2.0 and one["interval"] is None and one["sd"] is None
    assert paired_difference({0: 1.0}, {1: 1.0})["mean"] is None


def _run_json(results: Path, suite: str, method: str, seed: int, test_mr: float) -> None:
    test = {**{k: test_mr for k in METRIC_KEYS}, "gap": {"centroid_distance": 0.3}, "split": "test",
            "num_images": 10, "num_captions": 50}
    path = results / suite / "runs" / f"{method}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": method, "seed": seed, "trained_params": 1234, "train_minutes": 10.0,
                                "best_epoch": 8, "val": None, "test": test}))


def test_report_of_synthetic_runs_without_validation(tmp_path):
    """Mean ± sd per method, '-' for the val column, and the paired line with its interval."""
    suite = Suite(name="toy", config="training/configs/debug_tiny.yaml", data="", test_split="test",
                  base_checkpoint="", methods=(Method("a", "method A"), Method("b", "method B"), Method("c", "method C")),
                  overrides=("data.carve=none",), paired=(("a", "b"),))
    for seed, (x, y) in enumerate([(35.0, 37.0), (34.0, 36.5), (36.5, 36.0)]):
        _run_json(tmp_path, "toy", "a", seed, x)
        _run_json(tmp_path, "toy", "b", seed, y)
    res = aggregate(suite, tmp_path)
    a = res["rows"][0]
    assert a["test_mR"] == pytest.approx(35.1666667) and a["val_mR"] is None and a["val_mR_sd"] is None
    assert res["pending"] == ["c"] and res["overrides"] == ["data.carve=none"] and res["protocol"]["val"] is None
    p = res["paired"][0]
    assert p["differences"] == [-2.0, -2.5, 0.5] and p["interval"][0] < p["mean"] < p["interval"][1]
    table = markdown(res)
    assert "| method A | 0, 1, 2 | **35.17 ± 1.26** |" in table and "| - | 0.300 |" in table
    lo, hi = p["interval"]
    assert (f"method A minus method B, test mR paired by seed (0, 1, 2): **{p['mean']:+.2f}** ± {p['sd']:.2f} "
            f"(sd of the 3 differences), 95% interval [{lo:+.2f}, {hi:+.2f}] (t, 2 df).") in table


def test_the_fixed_suite_is_the_protocol_written_down():
    """docs/results.md#protocol: no carve; five seeds for harma and full, one for every other method."""
    suite = SUITES["ucm-fixed"]
    assert suite.overrides == ("data.carve=none",) and suite.paired == (("harma", "full"),)
    cfg = load_config(ROOT / suite.config, [*suite.overrides])
    assert cfg.run.epochs == 8 and cfg.data.val_split is None and cfg.data.carve == "none"
    runs = [r.name for r in plan(suite, [0, 1, 2, 3, 4])]
    assert len(runs) == 14 and {f"{m}-s{s}" for m in ("harma", "full") for s in range(5)} <= set(runs)
    assert [m.key for m in suite.methods] == [m.key for m in SUITES["ucm"].methods]
    with pytest.raises(ConfigError, match="data.carve=none .* needs data.val_split=null"):
        load_config(ROOT / "training/configs/debug_tiny.yaml", ["data.carve=none"])


@pytest.mark.slow
def test_one_tiny_run_without_validation_keeps_the_last_epoch(tmp_path, monkeypatch, capsys):
    """Train a tiny HarMA for 2 epochs with data.carve=none: best/ is epoch 2 of the whole train split,
    the run JSON has no val and records the loss curve, which is what shipping checks it by."""
    data = write_split(tmp_path / "data", n_images=12)
    (data / "test.csv").write_text((data / "train.csv").read_text())  # any captioned split will do here
    suite = Suite(name="toy", config="training/configs/debug_tiny.yaml", data=str(data), test_split="test",
                  base_checkpoint="", overrides=("data.val_split=null", "data.carve=none"),
                  methods=(Method("harma", "HarMA", ("run.epochs=2", "run.batch_size=12")),))
    monkeypatch.setitem(SUITES, "toy", suite)
    assert benchmark.main(["--suite", "toy", "--seeds", "0", "--results-dir", str(tmp_path / "res"), "--readme", "",
                           "--runs-dir", str(tmp_path / "runs")]) == 0
    record_path = tmp_path / "res" / "toy" / "runs" / "harma-s0.json"
    run = json.loads(record_path.read_text())
    assert run["best_epoch"] == 2 and run["val"] is None and run["val_mR_per_epoch"] == []
    assert len(run["train_loss_per_epoch"]) == 2 and run["selection"] == "last epoch (none)"
    assert run["carve"] == {"mode": "none"} and run["machine"]["device"] and run["test"]["num_images"] == 12
    assert "data.carve=none" in run["command"]
    run_dir = tmp_path / "runs" / "toy-harma-s0"
    meta = json.loads((run_dir / "best" / "adapter_config.json").read_text())
    assert meta["extra"]["selection"] == "last epoch" and meta["extra"]["data"]["sizes"]["train"][0] == 12
    assert "val" not in meta["extra"]
    check_shippable(run_dir, 2, record_path)
    record_path.write_text(json.dumps({**run, "train_loss_per_epoch": [1.0, 0.5]}))
    with pytest.raises(benchmark.BenchmarkError, match="training loss per epoch"):
        check_shippable(run_dir, 2, record_path)
    # such a checkpoint has no split of its own to evaluate on by default
    assert evaluate_cli.main(["--checkpoint", str(run_dir), "--data", str(data)]) == 2
    assert "no validation split (data.carve=none): pass --split" in capsys.readouterr().err
