"""``training/cli.py``, what the ``python -m training.X`` commands share: the device choice, the one-line
error and its exit code; and that no ``training`` module uses another's private names."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from training.cli import CliError, fail, pick_device, run_command
from training.config import DataConfig
from training.evaluate import DEFAULTS
from training.train import main as train_main

TRAINING = Path(__file__).resolve().parents[1] / "training"
TINY = "training/configs/debug_tiny.yaml"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_names(no_cuda):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("auto", local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_clear_error(no_cuda, name):
    with pytest.raises(CliError, match=f"^--device {name}: CUDA is not available on this machine$"):
        pick_device(name)
    with pytest.raises(CliError, match=f"^run.device={name}: CUDA is not available on this machine$"):
        pick_device(name, local_rank=0, option="run.device")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "mps", "CPU", ""])
def test_other_names_are_refused(name):
    with pytest.raises(CliError, match=r"^--device '.*': expected auto, cpu, cuda or cuda:N$"):
        pick_device(name)
    with pytest.raises(CliError, match=r"^run.device='.*': expected auto, cpu, cuda or cuda:N$"):
        pick_device(name, option="run.device")


def test_a_torchrun_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only parsed here: no GPU is touched
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert pick_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert pick_device("cuda:3", local_rank=2) == torch.device("cuda", 3)


def test_train_refuses_cuda_without_a_gpu_in_one_line(no_cuda, tmp_path, capsys):
    assert train_main(["--config", TINY, f"run.out_dir={tmp_path}", "run.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: run.device=cuda: CUDA is not available on this machine"] and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before the run folder was written


def test_fail_and_run_command(capsys):
    assert fail(CliError("first\n  second\n\n")) == 2
    assert capsys.readouterr().err == "error: first second\n"
    assert run_command(lambda: None) == 0 and run_command(lambda: 3) == 3 and run_command(lambda: Path(".")) == 0

    def boom():
        raise KeyError("missing")

    assert run_command(boom, (KeyError,)) == 2
    assert capsys.readouterr().err == "error: 'missing'\n"
    with pytest.raises(KeyError):
        run_command(boom)  # not a user-facing error: a traceback, not a one-liner


def test_evaluate_defaults_are_the_trainers():
    assert set(DEFAULTS) == {"val_fraction", "carve_seed", "carve", "carve_class_size", "clean_captions",
                             "max_words", "captions_per_image", "allow_empty"}
    fields = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    assert DEFAULTS == {k: fields[k] for k in DEFAULTS}


def _first_party(module: str) -> bool:
    return module.split(".")[0] in ("training", "harma")


def test_no_module_imports_another_modules_private_names():
    """Nor reaches into one (``evaluate._load``)."""
    for path in sorted(TRAINING.glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = set()  # names this file binds to first-party modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _first_party(node.module or ""):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
                modules.update(a.asname or a.name for a in node.names if node.module in ("training", "harma"))
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if _first_party(a.name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert not node.attr.startswith("_"), f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}"
