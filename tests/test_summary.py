"""`python -m harma.summary` prints the PEFT-style line without downloading anything."""

from __future__ import annotations

import runpy
import sys

import pytest

from harma.summary import main



def test_summary_line_for_released_vit_b_32(capsys):
    assert main(["--model", "ViT-B-32", "--method", "harma"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("trainable params: 5,934,397 of ")
    total = int(line.split(" of ")[1].split(" ")[0].replace(",", ""))
    assert total == 151_277_313 + 5_934_397  # open_clip ViT-B-32 + adapters (shared modules once)
    assert line.endswith(f"({100 * 5_934_397 / total:.4f}%)")


def test_summary_verbose_groups_and_errors(capsys):
    assert main(["--model", "ViT-B-32", "--method", "mrs", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 161,089 of " in out and "mrs" in out
    assert main(["--model", "not-a-model"]) == 2
    assert "unknown open_clip model" in capsys.readouterr().err


def test_summary_also_train_counts_vit_b_32_norms_and_biases(capsys):
    # ViT-B-32 by hand: LayerNorms 2x(768 ln_pre + 24x768 + 768 ln_post) + 2x(24x512 + 512 ln_final)
    # = 65,536; biases per image block 2304 + 768 + 3072 + 768, per text block 1536 + 512 + 2048 + 512
    # (conv1 has none) = 12 x 6912 + 12 x 4608 = 138,240.
    for kinds, extra in ((["norms"], 65_536), (["biases"], 138_240), (["norms", "biases"], 203_776)):
        assert main(["--model", "ViT-B-32", "--method", "harma", "--also-train", *kinds]) == 0
        assert capsys.readouterr().out.startswith(f"trainable params: {5_934_397 + extra:,} of 157,211,710")
    assert main(["--model", "ViT-B-32", "--method", "full", "--also-train", "norms"]) == 2
    assert "adapter methods" in capsys.readouterr().err


def test_summary_runs_as_module_offline(monkeypatch, capsys):
    """``python -m harma.summary`` (its ``__main__``), with the hub offline: counts need no download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["harma.summary", "--model", "ViT-B-32", "--method", "harma"])
    monkeypatch.delitem(sys.modules, "harma.summary")  # run as a fresh __main__, as -m does
    with pytest.raises(SystemExit) as done:
        runpy.run_module("harma.summary", run_name="__main__", alter_sys=True)
    assert done.value.code in (0, None)
    assert capsys.readouterr().out.startswith("trainable params: 5,934,397 of 157,211,710")
