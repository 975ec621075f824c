"""``benchmarks/gpu.sh`` / ``python -m benchmarks.gpu``: the one-command GPU run, checked on the CPU with
``--dry-run`` (tiny model, 2 steps, 2 synthetic images, UCM runs only planned)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import Budget, main, ucm_order

ROOT = Path(__file__).resolve().parent.parent


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_dry_run_writes_every_stage_with_finite_numbers(tmp_path):
    out, copies = tmp_path / "gpu.json", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out),
                           "--results-dir", str(tmp_path / "results"), "--copy-to", str(copies)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["command"].startswith("python -m benchmarks.gpu --dry-run")
    assert {"torch", "cuda", "device", "started_utc", "wall_s"} <= set(report)
    assert set(report["train"]) == {"harma/fp32", "mrs/fp32", "full/fp32"}
    for r in report["train"].values():
        assert _finite(r["samples_per_s"]) and _finite(r["step_s"]) and r["batch"] == 2, r
        assert math.isfinite(r["loss"])
    # full fine-tuning trains every weight; the adapters a small share of them
    t = report["train"]
    assert t["full/fp32"]["trainable_params"] > 20 * t["harma/fp32"]["trainable_params"] > 0
    assert len(report["embed"]) == 2 and any(k.startswith("rs-minilm-harma") for k in report["embed"])
    for r in report["embed"].values():
        assert _finite(r["images_per_s"]) and _finite(r["files_per_s"]) and r["files"] == 2, r
    # an empty results folder: every ucm-fixed run of seeds 0-4 is planned, the headline pair seed by seed first
    assert report["ucm"]["planned"][:3] == ["harma-s0", "full-s0", "harma-s1"] and not report["ucm"]["done"]
    assert "| train harma/fp32 |" in proc.stdout
    log = out.with_suffix(".log").read_text()
    assert "wrote" in log and "harma/fp32" in log
    assert json.loads((copies / "gpu.json").read_text()) == report and (copies / "gpu.log").is_file()


def test_ucm_order_puts_the_paired_runs_first_and_skips_recorded_ones(tmp_path):
    runs = tmp_path / "ucm-fixed" / "runs"
    runs.mkdir(parents=True)
    every = ucm_order(tmp_path)
    assert every[:10] == [(m, s) for s in range(5) for m in ("harma", "full")]  # the protocol's five seeds
    assert sorted(every[10:]) == [("harma_paper", 0), ("harma_tuned", 0), ("mrs", 0), ("zeroshot", 0)]
    (runs / "harma-s0.json").write_text("{}")
    (runs / "full-s1.json").write_text("{}")
    rest = ucm_order(tmp_path)
    assert rest[:3] == [("full", 0), ("harma", 1), ("harma", 2)] and len(rest) == len(every) - 2


def test_budget_counts_down():
    b = Budget(100)
    assert 99 < b.left() <= 100 and b.allows(50) and not b.allows(101)


@pytest.mark.parametrize("argv, words", [
    (["--device", "cpu"], "use --dry-run on a CPU"),
    (["--dry-run", "--steps", "0"], "--steps 0: must be at least 1"),
    (["--dry-run", "--budget-s", "nan"], "--budget-s nan: must be a positive number"),
])
def test_bad_settings_are_one_error_line(argv, words, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_shell_scripts_parse():
    for name in ("gpu.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], check=True)


def test_ucm_stage_runs_what_the_budget_allows_and_keeps_each_record(tmp_path, monkeypatch):
    import benchmarks.gpu as gpu

    (tmp_path / "ucm").mkdir()
    (tmp_path / "ucm" / "train_caps.txt").write_text("x\n")
    made, clock = [], [0.0]

    def fake_run(cmd, timeout):  # what training.benchmark writes for one run, in 100 s
        clock[0] += 100
        method, seed = cmd[cmd.index("--methods") + 1], cmd[cmd.index("--seeds") + 1]
        assert cmd[cmd.index("--suite") + 1] == "ucm-fixed"  # the protocol fixed in advance
        made.append(f"{method}-s{seed}")
        path = tmp_path / "res" / "ucm-fixed" / "runs" / f"{made[-1]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"test": {"mR": 40.0 + len(made)}, "val": None}))  # no validation
        return 0

    monkeypatch.setattr(gpu, "_run_group", fake_run)
    monkeypatch.setattr(gpu, "minilm_weights", lambda: "real")
    args = gpu.build_parser().parse_args(["--ucm", str(tmp_path / "ucm"), "--results-dir", str(tmp_path / "res"),
                                          "--ucm-run-s", "100"])
    monkeypatch.setattr(gpu.time, "monotonic", lambda: clock[0])
    budget = Budget(250)  # room for two runs of 100 s
    out = gpu.ucm_stage(args, budget)
    assert made == ["harma-s0", "full-s0"] and list(out["done"]) == made
    assert out["done"]["full-s0"]["test_mR"] == 42.0 and out["done"]["harma-s0"]["record"]["test"]["mR"] == 41.0
    assert out["done"]["full-s0"]["val_mR"] is None
    assert out["skipped"] and "left for another call" in out["note"]


def test_ucm_stage_says_what_it_lacks(tmp_path, monkeypatch):
    import benchmarks.gpu as gpu

    monkeypatch.setattr(gpu, "minilm_weights", lambda: "random")
    args = gpu.build_parser().parse_args(["--ucm", str(tmp_path / "none"), "--results-dir", str(tmp_path)])
    out = gpu.ucm_stage(args, Budget(500))
    assert out["note"].startswith("skipped: needs the UCM dataset") and "MiniLM" in out["note"] and not out["done"]
