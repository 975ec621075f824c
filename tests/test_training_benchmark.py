"""``python -m training.benchmark``: the run plan, resuming by result file, aggregation over seeds, the
README table, and one real (tiny) train -> select on val -> evaluate on test run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

import pytest

from harma.metrics import METRIC_KEYS
from tests.test_encode import write_split
from training import benchmark
from training.benchmark import SUITES, BenchmarkError, Method, Suite, aggregate, check_shippable, plan, update_readme
from training.benchmark_tables import markdown

ROOT = Path(__file__).resolve().parents[1]


def _suite(**kw) -> Suite:
    methods = (Method("zeroshot", "zero-shot", train=False, max_seeds=1), Method("a", "method A"),
               Method("b", "method B", ("model.method=mrs",), max_seeds=1))
    return Suite(name="toy", config="training/configs/debug_tiny.yaml", data="", test_split="test",
                 base_checkpoint="", methods=methods, **kw)


def test_plan_orders_by_seed_and_honours_max_seeds():
    runs = plan(_suite(), [3, 1, 2])
    assert [r.name for r in runs] == ["zeroshot-s3", "a-s3", "b-s3", "a-s1", "a-s2"]
    assert [r.name for r in plan(_suite(), [0, 1], ["a"])] == ["a-s0", "a-s1"]
    with pytest.raises(BenchmarkError, match="--methods c"):
        plan(_suite(), [0], ["c"])
    with pytest.raises(BenchmarkError, match="distinct"):
        plan(_suite(), [0, 0])


def test_dry_run_lists_runs_and_skips_finished_ones(tmp_path, capsys):
    done = tmp_path / "ucm" / "runs"
    done.mkdir(parents=True)
    (done / "harma-s0.json").write_text("{}")
    assert benchmark.main(["--suite", "ucm", "--seeds", "0", "1", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "harma-s0         done" in out and "harma-s1         ~" in out and "mrs-s1" not in out
    n_runs = len(plan(SUITES["ucm"], [0, 1]))
    assert f"{n_runs - 1} of {n_runs} runs to go" in out


def _fake_run(results: Path, method: str, seed: int, test_mr: float, val_mr: float,
              minutes: Optional[float] = None) -> None:
    part = lambda mr: {**{k: mr for k in METRIC_KEYS}, "gap": {"centroid_distance": 0.3, "knn_modality_purity": 0.8},
                       "split": "x", "num_images": 10, "num_captions": 50}
    path = results / "toy" / "runs" / f"{method}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    minutes = 10.0 + seed if minutes is None else minutes
    path.write_text(json.dumps({"method": method, "seed": seed, "trained_params": 1234, "train_minutes": minutes,
                                "best_epoch": 2, "val": part(val_mr), "test": part(test_mr)}))


def test_aggregate_means_and_sample_sd_and_the_table(tmp_path):
    _fake_run(tmp_path, "a", 0, 40.0, 50.0)
    _fake_run(tmp_path, "a", 1, 44.0, 52.0)
    _fake_run(tmp_path, "zeroshot", 0, 10.0, 11.0)
    suite = _suite(published=(benchmark.Published("theirs", 55.71, "paper"),))
    res = aggregate(suite, tmp_path)
    assert [r["method"] for r in res["rows"]] == ["zeroshot", "a"] and res["pending"] == ["b"]
    a = res["rows"][1]
    assert a["seeds"] == [0, 1] and a["test_mR"] == 42.0 and a["val_mR"] == 51.0
    assert a["test_mR_sd"] == pytest.approx(statistics.stdev([40.0, 44.0])) and a["train_minutes"] == 10.5
    assert res["rows"][0]["test_mR_sd"] is None
    for seed, minutes in ((0, 50.0), (1, 20.0), (2, 20.0)):  # seed 0 slowed by another run on the same cores
        _fake_run(tmp_path / "slow", "b", seed, 30.0, 40.0, minutes=minutes)
    assert aggregate(suite, tmp_path / "slow")["rows"][0]["train_minutes"] == 20.0  # the median run, not 30
    table = markdown(res)
    assert "| method A | 0, 1 | **42.00 ± 2.83** |" in table and "| 51.00 ± 1.41 |" in table
    assert "| theirs | - | 55.71 |" in table and "`b`" in table

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- toy-table -->\nold\n<!-- /toy-table -->\nend\n")
    assert update_readme(readme, "toy", table)
    assert readme.read_text() == f"intro\n<!-- toy-table -->\n{table}\n<!-- /toy-table -->\nend\n"
    assert not update_readme(readme, "toy", table)
    with pytest.raises(BenchmarkError, match="markers"):
        update_readme(readme, "other", table)


def test_only_a_finished_run_with_the_recorded_curve_ships(tmp_path):
    """An unfinished run (its best/ is an early pick) and a run that is not the one a results JSON
    records are refused with messages; the recorded run ships."""
    run = tmp_path / "ucm-a-s0"
    run.mkdir()
    lines = [{"epoch": 1, "val": {"mR": 20.123456}}, {"epoch": 2, "val": {"mR": 25.0}, "partial": True}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    record = tmp_path / "a-s0.json"
    with pytest.raises(BenchmarkError, match="1 of 2 epochs done"):
        check_shippable(run, 2, record)
    lines[1].pop("partial")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    check_shippable(run, 2, record)  # no record: nothing to compare with
    record.write_text(json.dumps({"val_mR_per_epoch": [20.1235, 25.0]}))
    check_shippable(run, 2, record)
    record.write_text(json.dumps({"val_mR_per_epoch": [20.1235, 24.9]}))
    with pytest.raises(BenchmarkError, match="not the one in .*a-s0.json"):
        check_shippable(run, 2, record)


@pytest.mark.parametrize("suite", ["ucm", "ucm-fixed"])
def test_readme_table_is_generated_from_the_results(suite):
    """results/SUITE.json is the aggregate of results/SUITE/runs/*.json (none yet is an empty table that
    lists every method as pending) and the README shows its table."""
    results = ROOT / "results" / f"{suite}.json"
    if not results.is_file():
        pytest.skip("no benchmark results in this checkout")
    committed = json.loads(results.read_text())
    assert committed == json.loads(json.dumps(aggregate(SUITES[suite], ROOT / "results")))
    block = (ROOT / "README.md").read_text().split(f"<!-- {suite}-table -->\n", 1)[1].split(f"\n<!-- /{suite}-table -->")[0]
    assert block == markdown(committed)


@pytest.mark.slow
def test_one_tiny_run_end_to_end_and_resume(tmp_path, monkeypatch):
    """Train a tiny HarMA, select on the carved val, evaluate val and test, aggregate; a second call
    finds the result file and trains nothing."""
    data = write_split(tmp_path / "data", n_images=12)
    (data / "test.csv").write_text((data / "train.csv").read_text())  # any captioned split will do here
    suite = Suite(name="toy", config="training/configs/debug_tiny.yaml", data=str(data), test_split="test",
                  base_checkpoint="", methods=(Method("harma", "HarMA", ("data.val_split=null", "data.val_fraction=0.25", "run.epochs=1",
                                                                         "run.batch_size=4")),))
    monkeypatch.setitem(SUITES, "toy", suite)
    args = ["--suite", "toy", "--seeds", "0", "--results-dir", str(tmp_path / "res"), "--readme", "",
            "--runs-dir", str(tmp_path / "runs")]
    assert benchmark.main(args) == 0
    run = json.loads((tmp_path / "res" / "toy" / "runs" / "harma-s0.json").read_text())
    assert run["best_epoch"] == 1 and len(run["val_mR_per_epoch"]) == 1 and run["trained_params"] > 0
    assert run["val"]["mR"] == pytest.approx(run["val_mR_per_epoch"][0], abs=1e-3)  # selection = reported val
    assert run["val"]["split"] == "train:val" and run["val"]["carve"]["mode"] == "block"
    assert run["test"]["split"] == "test" and run["test"]["num_images"] == 12
    assert "run.seed=0" in run["command"] and "model.init_seed=0" in run["command"]
    agg = json.loads((tmp_path / "res" / "toy.json").read_text())
    assert agg["rows"][0]["test_mR"] == run["test"]["mR"]

    monkeypatch.setattr(benchmark, "execute", lambda *a: pytest.fail("a finished run was trained again"))
    assert benchmark.main(args) == 0


def test_shipped_checkpoints_match_their_records_and_the_readme():
    """Each shipped checkpoint has one record, naming the weights it scored (their sha256) and the epoch
    it ships: the best on the block carve under the old protocol (its metrics.jsonl shows it), the last
    of the fixed schedule under the fixed one; the README's shipped table is the one the records render."""
    from harma.io import file_sha256
    from training.benchmark_tables import shipped_markdown, shipped_records

    records = shipped_records(ROOT / "results", SUITES.values())
    if not records:
        pytest.skip("no shipped checkpoints recorded in this checkout")
    for record in records:
        ckpt = ROOT / record["checkpoint"]
        meta = json.loads((ckpt / "adapter_config.json").read_text())
        assert meta["extra"]["epoch"] == record["best_epoch"]
        epochs = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if record["suite"] == "ucm-fixed":
            assert meta["extra"]["data"]["carve"] == "none" and not any("val" in e for e in epochs)
            assert record["best_epoch"] == epochs[-1]["epoch"] == len(epochs) == 8 and record["val"] is None
            assert record["weights_sha256"] == file_sha256(ckpt / "adapter_model.safetensors"), ckpt
        else:
            assert meta["extra"]["data"]["carve"] == "block" and meta["extra"]["data"]["val_split"] is None
            assert max(epochs, key=lambda e: e["val"]["mR"])["epoch"] == record["best_epoch"]
    block = (ROOT / "README.md").read_text().split("<!-- ucm-shipped-table -->\n", 1)[1]
    assert block.split("\n<!-- /ucm-shipped-table -->")[0] == shipped_markdown(ROOT / "results", SUITES.values())


def test_a_checkpoint_shipped_again_under_another_protocol_has_one_record(tmp_path):
    """The shipped table lists each checkpoint once, with the protocol of the suite that shipped it last;
    two suites' records for one checkpoint are refused with a message naming both files."""
    from harma import HarmaError
    from training.benchmark_tables import shipped_markdown

    old, new = (Suite(name=n, config="", data="", test_split="test", base_checkpoint="", protocol=f"{n} protocol",
                      methods=(Method("a", "A", ship="ship-a"), Method("b", "B", ship="ship-b"))) for n in ("old", "new"))
    row = {k: 1.0 for k in METRIC_KEYS}
    for suite, name, mr in ((old, "ship-a", 30.0), (old, "ship-b", 31.0), (new, "ship-a", 33.0)):
        (tmp_path / suite.name / "shipped").mkdir(parents=True, exist_ok=True)
        record = {"suite": suite.name, "checkpoint": f"checkpoints/{name}", "seed": 0, "best_epoch": 8,
                  "val": {"mR": 40.0} if suite is old else None, "test": {**row, "mR": mr}, "baseline_test": row}
        (tmp_path / suite.name / "shipped" / f"{name}.json").write_text(json.dumps(record))
    with pytest.raises(HarmaError, match="ship-a has two records, .*old.*ship-a.json and .*new.*ship-a.json"):
        shipped_markdown(tmp_path, [old, new])
    (tmp_path / "old" / "shipped" / "ship-a.json").unlink()
    lines = shipped_markdown(tmp_path, [old, new]).splitlines()
    assert lines[3] == "| `checkpoints/ship-a` | new protocol | 0 | 8 | - | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 33.00 |"
    assert lines[4].startswith("| `checkpoints/ship-b` | old protocol | 0 | 8 | 40.00 |") and len(lines) == 5
