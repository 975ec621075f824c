"""Weights that cannot give a meaningful result are refused with one ``error:`` line and exit 2:
non-finite adapter weights or embeddings, and a ``pretrained`` file that is a code-running pickle."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from harma.io import WEIGHTS_NAME
from tests.test_evaluate_cli import _args, setup  # noqa: F401  (the module fixture)
from training.build_index import main as build_index_main
from training.evaluate import main as evaluate_main
from training.export import main as export_main
from training.train import main as train_main


class _Payload:
    """Unpickling this runs ``os.system`` (a file appears): what a refusal must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_error_line(err: str) -> str:
    """The single ``error:`` line (progress bars may share stderr), and no traceback."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_nan_adapter_weights_are_named(setup, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in setup["adapters"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / WEIGHTS_NAME))
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(bad / WEIGHTS_NAME))
    assert evaluate_main(_args(bad, setup["data"], tmp_path / "o.json", "--split", "train")) == 2
    assert f"tensor {name} holds NaN" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_nan_embeddings_are_named(setup, tmp_path, capsys):  # noqa: F811
    base = load_file(str(setup["base"]))
    key = next(k for k in base if k.startswith("visual.") and base[k].is_floating_point() and base[k].dim() == 2)
    base[key] = torch.full_like(base[key], float("inf"))
    save_file(base, str(tmp_path / "inf.safetensors"))
    inf = tmp_path / "inf.safetensors"
    cfg = json.loads((setup["adapters"] / "adapter_config.json").read_text())
    cfg["base"]["base_weights"] = cfg["model"]["base_weights"] = str(inf)
    cfg["base"]["base_weights_sha256"] = hashlib.sha256(inf.read_bytes()).hexdigest()
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / WEIGHTS_NAME).write_bytes((setup["adapters"] / WEIGHTS_NAME).read_bytes())
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    assert evaluate_main(_args(ckpt, setup["data"], tmp_path / "o.json", "--split", "train")) == 2
    assert "NaN or infinite image embeddings" in _one_error_line(capsys.readouterr().err)


def test_pickled_pretrained_is_refused_without_running_it(setup, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "pwned"
    payload = tmp_path / "weights.pt"
    payload.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}))
    code = train_main(["--config", "training/configs/debug_tiny.yaml", f"model.pretrained={payload}",
                       f"run.out_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert f"model.pretrained={payload}: cannot be loaded" in _one_error_line(capsys.readouterr().err)

    cfg = json.loads((setup["adapters"] / "adapter_config.json").read_text())
    cfg["model"]["pretrained"] = cfg["base"]["pretrained"] = str(payload)
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / WEIGHTS_NAME).write_bytes((setup["adapters"] / WEIGHTS_NAME).read_bytes())
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    assert evaluate_main(_args(ckpt, setup["data"], tmp_path / "o.json", "--split", "train")) == 2
    assert "cannot be loaded" in _one_error_line(capsys.readouterr().err)
    assert build_index_main(["--checkpoint", str(ckpt), "--images", str(setup["data"]), "--out",
                             str(tmp_path / "index"), "--num-workers", "0"]) == 2
    assert "cannot be loaded" in _one_error_line(capsys.readouterr().err)
    assert export_main(["--run", str(ckpt), "--out", str(tmp_path / "exported")]) == 2
    assert "cannot be loaded" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()
