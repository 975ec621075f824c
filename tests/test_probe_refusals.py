"""The training commands on the inputs of the issue-36 probe: one ``error:`` line naming the setting,
exit code 2, never a traceback, a silent misread or a file written outside the run folder.

Called in process as ``main([...])``; the two that train or encode use the tiny model and a
handful of images (seconds).
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

import harma.checkpoint
import training.export
import training.state
from harma import create_model, save_adapters
from harma.errors import DatasetError
from harma.io import CONFIG_NAME
from tests.conftest import tiny_config
from training.build_index import main as build_index_main
from training.config import config_to_yaml, load_config
from training.evaluate import main as evaluate_main
from training.export import main as export_main
from training.rundir import plan_run
from training.state import read_state
from training.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "configs" / "debug_tiny.yaml")
SMALL = ["data.synthetic_images=8", "run.batch_size=8"]


def _one_error_line(err: str) -> str:
    """The single ``error:`` line (progress bars may share stderr), and no traceback."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


# -- malformed adapter folders: evaluate, build_index and export ----------------------------------
ADAPTER_CONFIGS = {
    "null": ("null", "expected a JSON object, got null"),
    "base_null": (json.dumps({"method": "harma", "model": {}, "base": None}), "field 'base' must be an object"),
    "harma_string": (json.dumps({"method": "harma", "model": {"harma": "x"}, "base": {}}), "model.harma"),
    "nested_100k": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("command", ["evaluate", "build_index", "export"])
@pytest.mark.parametrize("case", sorted(ADAPTER_CONFIGS))
def test_malformed_adapter_folder_is_one_error_line(tmp_path, capsys, command, case):
    text, expect = ADAPTER_CONFIGS[case]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CONFIG_NAME).write_text(text)
    _png(tmp_path / "images" / "a.png")
    argv = {"evaluate": (evaluate_main, ["--checkpoint", str(ckpt), "--data", str(tmp_path), "--num-workers", "0"]),
            "build_index": (build_index_main, ["--checkpoint", str(ckpt), "--images", str(tmp_path / "images"),
                                               "--out", str(tmp_path / "index"), "--num-workers", "0"]),
            "export": (export_main, ["--run", str(ckpt), "--out", str(tmp_path / "out")])}
    main, args = argv[command]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(ckpt / CONFIG_NAME) in line and expect in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "index" / "index.json").exists()


# -- training settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, expect", [
    ("optim.lr=nan", "optim.lr: expected a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: expected a finite number, got inf"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas must both be in [0, 1)"),
    ("run.log_every=0", "run.log_every must be >= 1"),
    ("run.name=../../../x", "run.name='../../../x'"),
    ("run.name={tmp}/abs", "run.name='{tmp}/abs'"),
    ("run.epochs=true", "run.epochs: expected a number"),
    ("optim.lr=[1", "override optim.lr=[1: not a valid YAML value"),
])
def test_invalid_training_setting_is_one_error_line(tmp_path, capsys, override, expect):
    out = tmp_path / "a" / "b" / "runs"  # run.name=../../../x would be tmp_path/x
    override, expect = override.format(tmp=tmp_path), expect.format(tmp=tmp_path)
    assert train_main(["--config", TINY, f"run.out_dir={out}", *SMALL, "run.epochs=1", override]) == 2
    assert expect in _one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())  # nothing written anywhere


@pytest.mark.parametrize("content, expect", [
    ("model: [1, 2]\n", "model: expected a section (a mapping of keys), got list"),
    ("optim: {lr: .nan}\n", "optim.lr: expected a finite number"),
    # PyYAML uses several frames per level, so this many levels pass Python's recursion limit
    ("run: " + "[" * sys.getrecursionlimit() + "]" * sys.getrecursionlimit() + "\n", "nested too deeply"),
])
def test_invalid_training_config_file_is_one_error_line(tmp_path, capsys, content, expect):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert train_main(["--config", str(config), f"run.out_dir={tmp_path / 'runs'}"]) == 2
    assert expect in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def _fake_run(tmp_path: Path, config: str, state: bool = True, metrics: bool = True) -> Path:
    """A run folder as training leaves it, without training: config.yaml, metrics.jsonl, best/, last/."""
    run = tmp_path / "runs" / "debug_tiny-harma"
    (run / "best").mkdir(parents=True)
    (run / "last" / "adapters").mkdir(parents=True)
    (run / "config.yaml").write_text(config)
    if metrics:
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val": {"mR": 1.0}}) + "\n")
    if state:
        torch.save({"version": 1}, run / "last" / "state.pt")
    return run


@pytest.mark.parametrize("junk", [b"{unclosed: [\n", b"- a list\n- not a config\n", b"\xff\xfe junk\n"])
def test_junk_config_yaml_on_resume_is_one_error_line(tmp_path, capsys, junk):
    run = _fake_run(tmp_path, "")
    (run / "config.yaml").write_bytes(junk)
    argv = ["--config", TINY, f"run.out_dir={tmp_path / 'runs'}", *SMALL, "run.resume=auto"]
    assert train_main(argv) == 2
    assert str(run / "config.yaml") in _one_error_line(capsys.readouterr().err)
    assert (run / "config.yaml").read_bytes() == junk  # left for the user to restore


def test_resume_without_last_state_is_refused_when_the_run_got_further(tmp_path, capsys):
    config = config_to_yaml(load_config(TINY, [f"run.out_dir={tmp_path / 'runs'}", *SMALL]))
    run = _fake_run(tmp_path, config, state=False)
    before = (run / "metrics.jsonl").read_text()
    assert train_main(["--config", TINY, f"run.out_dir={tmp_path / 'runs'}", *SMALL, "run.resume=auto"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(run) in line and "no last/state.pt" in line and "1 epoch(s) in metrics.jsonl" in line
    assert (run / "metrics.jsonl").read_text() == before and (run / "best").is_dir()  # nothing replaced


def test_resume_before_the_first_checkpoint_says_it_starts_afresh(tmp_path, caplog):
    run = tmp_path / "runs" / "debug_tiny-harma"
    (run / "best").mkdir(parents=True)  # killed between writing best/ and the first last/
    (run / "config.yaml").write_text("run: {}\n")
    cfg = load_config(TINY, [f"run.out_dir={tmp_path / 'runs'}", "run.resume=auto"])
    with caplog.at_level(logging.WARNING, logger="training.train"):
        plan = plan_run(cfg, TINY)
    assert plan.last is None and plan.run_dir == run
    assert f"{run} has no last/state.pt (it holds best/, config.yaml)" in caplog.text
    assert "starts from scratch" in caplog.text


# -- full disk ------------------------------------------------------------------------------------
def _enospc_on_call(monkeypatch, module, n: int) -> None:
    """``module.atomic_write_bytes`` raises ENOSPC at its ``n``-th call (the disk fills up then)."""
    real, calls = module.atomic_write_bytes, []

    def write(path, data):
        calls.append(path)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(module, "atomic_write_bytes", write)


def test_training_on_a_full_disk_is_one_error_line_and_resumable(tmp_path, one_thread, capsys, monkeypatch):
    _enospc_on_call(monkeypatch, training.state, 2)  # the second state.pt: after step 2
    argv = ["--config", TINY, f"run.out_dir={tmp_path}", *SMALL, "run.save_every_steps=1"]
    assert train_main(argv) == 2
    run = tmp_path / "debug_tiny-harma"
    line = _one_error_line(capsys.readouterr().err)
    assert f"run folder {run}" in line and "the disk is full" in line and "run.resume=auto" in line
    assert read_state(run / "last")["global_step"] == 1  # the checkpoint after step 1, whole
    assert not (run / ".last.tmp").exists()
    plan = plan_run(load_config(TINY, [*argv[2:], "run.resume=auto"]), TINY)
    assert plan.last == run / "last"  # run.resume=auto continues from it


@pytest.fixture
def exportable(tmp_path):
    torch.manual_seed(0)
    return save_adapters(create_model(tiny_config())[0], tmp_path / "run" / "best", extra={"epoch": 1}).parent


def test_export_on_a_full_disk_leaves_the_previous_export(tmp_path, exportable, capsys, monkeypatch):
    out = tmp_path / "checkpoints" / "ucm-x"
    assert export_main(["--run", str(exportable), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "MODEL_CARD.md" in before
    _enospc_on_call(monkeypatch, harma.checkpoint, 1)  # the weights of the new export
    assert export_main(["--run", str(exportable), "--out", str(out), "--dtype", "fp16"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {out}" in line and "the disk is full" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["ucm-x"]  # no temporary folder left


def test_export_on_a_full_disk_writes_nothing(tmp_path, exportable, capsys, monkeypatch):
    _enospc_on_call(monkeypatch, training.export, 1)  # the model card, after the weights
    out = tmp_path / "out"
    assert export_main(["--run", str(exportable), "--out", str(out)]) == 2
    assert "the disk is full" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# -- a DataLoader worker's error ------------------------------------------------------------------
def test_worker_error_is_the_workers_own_message(tmp_path, capsys):
    data = tmp_path / "data"
    rows = ["image,caption"]
    for i in range(4):
        _png(data / "images" / f"im{i}.png", seed=i)
        rows += [f"images/im{i}.png,a picture number {i} variant {c}" for c in range(2)]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    (data / "images" / "im2.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    ckpt = save_adapters(create_model(tiny_config())[0], tmp_path / "adapters")
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--split", "train", "--num-workers", "2",
            "--batch-size", "2"]
    assert evaluate_main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {data / 'images' / 'im2.png'}: cannot read image")
    assert "DataLoader worker" not in line and "File " not in line


def test_worker_message_is_taken_from_the_reraised_text():
    from training.cli import worker_message  # new in issue 36; imported here so the other tests run on older code

    try:
        raise DatasetError("x.jpg: cannot read image\n(second line)")
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(DatasetError) as e:
        wrapped.reraise()
    assert worker_message(str(e.value)) == "x.jpg: cannot read image (second line)"
    assert worker_message("plain message") is None
