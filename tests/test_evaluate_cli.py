"""``python -m training.evaluate`` called in process as ``main([...])`` on a synthetic csv split.

The tiny backbone is saved as a base-weights file and recorded in the config, so the CLI's rebuilt
model has exactly the backbone of the in-process reference (open_clip has no offline pretrained tag).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from harma import create_model, save_adapters
from harma.data import carve_block_split, carve_split, load_split
from harma.encode import evaluate_split
from harma.io import file_sha256
from harma.metrics import METRIC_KEYS
from tests.conftest import TINY_NAME, perturb_, tiny_config
from tests.test_encode import write_split
from training.evaluate import main

pytestmark = pytest.mark.slow  # command-line runs of a trained tiny model, seconds each

ROW_KEYS = set(METRIC_KEYS) | {"gap", "num_images", "num_captions", "checkpoint", "data", "split", "method"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset folder, base-weights file, a perturbed HarMA adapter dir, and the reference models."""
    tmp = tmp_path_factory.mktemp("evalcli")
    data = write_split(tmp / "data", n_images=10)
    torch.manual_seed(0)
    base = tmp / "base.safetensors"
    save_file(open_clip.create_model(TINY_NAME).state_dict(), str(base))
    cfg = dataclasses.replace(tiny_config(), base_weights=str(base))
    model, _, transform, tokenizer = create_model(cfg)
    perturb_(model)
    adapters = save_adapters(model, tmp / "adapters")
    zeroshot = create_model(dataclasses.replace(cfg, method="zeroshot"))[0]
    return dict(tmp=tmp, data=data, base=base, cfg=cfg, model=model, zeroshot=zeroshot,
                adapters=adapters, transform=transform, tokenizer=tokenizer)


def _args(checkpoint, data, out, *extra):
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--json", str(out), "--num-workers", "0",
            "--batch-size", "4", *extra]


def _reference(model, split, s):
    return evaluate_split(model, split, s["transform"], s["tokenizer"], batch_size=4).to_dict()


def _assert_row_equal(row, ref):
    for k in METRIC_KEYS:
        assert row[k] == pytest.approx(ref[k], abs=1e-9), k
    assert row["num_images"] == ref["num_images"] and row["num_captions"] == ref["num_captions"]
    assert row["gap"].keys() == ref["gap"].keys()
    for k, v in ref["gap"].items():
        assert row["gap"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_adapter_dir_with_baseline(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "sub" / "eval.json"
    assert main(_args(s["adapters"], s["data"], out, "--split", "train", "--baseline")) == 0
    res = json.loads(out.read_text())
    assert ROW_KEYS <= set(res) and ROW_KEYS <= set(res["baseline"])
    assert res["method"] == "harma" and res["baseline"]["method"] == "zeroshot"
    assert res["split"] == "train" and res["num_images"] == 10 and res["num_captions"] == 50
    assert Path(res["checkpoint"]).resolve() == s["adapters"].resolve()
    assert res["weights_sha256"] == file_sha256(s["adapters"] / "adapter_model.safetensors")  # which weights scored
    for k in ("centroid_distance", "uniformity_joint", "knn_modality_purity", "linear_probe_accuracy"):
        assert isinstance(res["gap"][k], float)

    split = load_split(s["data"], "train")
    _assert_row_equal(res, _reference(s["model"], split, s))
    _assert_row_equal(res["baseline"], _reference(s["zeroshot"], split, s))
    assert res["gap"]["centroid_distance"] != pytest.approx(res["baseline"]["gap"]["centroid_distance"])

    printed = capsys.readouterr().out
    assert "adapter directory" in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if "i2t R@1" in line)
    assert lines[header + 1].startswith("baseline") and lines[header + 2].startswith("adapted")
    assert any("linear_probe_accuracy" in line for line in lines)


def test_results_record_paths_as_given(setup, tmp_path, monkeypatch):
    """Relative inputs stay relative in the JSON, so committed results hold no machine paths."""
    s = setup
    monkeypatch.chdir(s["tmp"])
    out = tmp_path / "rel.json"
    assert main(_args(s["adapters"].relative_to(s["tmp"]), "data", out, "--split", "train")) == 0
    res = json.loads(out.read_text())
    assert res["checkpoint"] == s["adapters"].relative_to(s["tmp"]).as_posix() and res["data"] == "data"


def test_run_folder_best_then_last_and_carved_split(setup, tmp_path, capsys):
    s = setup
    run = tmp_path / "run"
    save_adapters(s["model"], run / "last" / "adapters")
    (run / "last" / "state.pt").write_bytes(b"")
    out = tmp_path / "last.json"
    assert main(_args(run, s["data"], out, "--split", "train:val", "--val-fraction", "0.3", "--carve-seed", "1")) == 0
    res = json.loads(out.read_text())
    assert Path(res["checkpoint"]).resolve() == (run / "last" / "adapters").resolve()
    assert "(last;" in capsys.readouterr().out
    _, val = carve_block_split(load_split(s["data"], "train"), 0.3)  # no recorded carve: block
    assert res["num_images"] == val.num_images == 3 and res["split"] == "train:val"
    assert res["carve"] == {"mode": "block", "val_fraction": 0.3, "seed": 1} and res["ties"] == "expected"
    _assert_row_equal(res, _reference(s["model"], val, s))

    save_adapters(s["model"], run / "best")
    assert main(_args(run, s["data"], out, "--split", "train:train")) == 0  # default carving 0.1 / seed 0
    res = json.loads(out.read_text())
    assert Path(res["checkpoint"]).resolve() == (run / "best").resolve()
    assert "(best;" in capsys.readouterr().out
    assert res["num_images"] == 9 and "baseline" not in res


def test_full_method_baseline_is_original_backbone(setup, tmp_path):
    """A ``full`` checkpoint carries a changed backbone; the baseline row must not use it."""
    s = setup
    full, _, _, _ = create_model(dataclasses.replace(s["cfg"], method="full"))
    perturb_(full, seed=3)
    ckpt = save_adapters(full, tmp_path / "full")
    out = tmp_path / "full.json"
    assert main(_args(ckpt, s["data"], out, "--split", "train", "--baseline")) == 0
    res = json.loads(out.read_text())
    split = load_split(s["data"], "train")
    _assert_row_equal(res, _reference(full, split, s))
    _assert_row_equal(res["baseline"], _reference(s["zeroshot"], split, s))


def test_recorded_data_defaults(setup, tmp_path):
    """``extra.data`` written by the trainer supplies dataset, split and carving when flags are absent."""
    s = setup
    ckpt = save_adapters(s["model"], tmp_path / "ad", extra={"data": {
        "root": str(s["data"]), "val_split": None, "train_split": "train", "val_fraction": 0.3, "carve_seed": 1}})
    out = tmp_path / "o.json"
    assert main(["--checkpoint", str(ckpt), "--json", str(out), "--num-workers", "0"]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "train:val" and res["num_images"] == 3
    # recorded by a trainer from before block carving: the random carve it used
    assert res["carve"] == {"mode": "random", "val_fraction": 0.3, "seed": 1}
    _, val = carve_split(load_split(s["data"], "train"), 0.3, 1)
    _assert_row_equal(res, _reference(s["model"], val, s))
    assert main(["--checkpoint", str(ckpt), "--json", str(out), "--num-workers", "0", "--val-fraction", "0.5"]) == 0
    assert json.loads(out.read_text())["num_images"] == 5  # the flag wins


@pytest.mark.parametrize("case", ["missing_ckpt", "not_adapter_dir", "bad_json", "missing_data", "unknown_split",
                                  "bad_split_form", "missing_base_weights", "bad_base_weights", "no_data"])
def test_bad_inputs_exit_2_with_one_line(setup, tmp_path, capsys, case):
    s = setup
    ckpt, data, split, extra = s["adapters"], s["data"], "train", []
    if case == "missing_ckpt":
        ckpt, expect = tmp_path / "nope", "does not exist"
    elif case == "not_adapter_dir":
        ckpt, expect = tmp_path, "adapter_config.json"
    elif case == "bad_json":
        ckpt = tmp_path / "ad"
        ckpt.mkdir()
        (ckpt / "adapter_config.json").write_text("{broken")
        expect = "invalid JSON"
    elif case == "missing_data":
        data, expect = tmp_path / "nodata", "does not exist"
    elif case == "unknown_split":
        split, expect = "test", "test"
    elif case == "bad_split_form":
        split, expect = "train:holdout", "train:val"
    elif case == "missing_base_weights":
        extra, expect = ["--base-weights", str(tmp_path / "gone.safetensors")], "not found"
    elif case == "bad_base_weights":
        bad = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(1)}, str(bad))
        extra, expect = ["--base-weights", str(bad)], "bad.safetensors"
    else:  # no --data and nothing recorded
        argv = ["--checkpoint", str(ckpt), "--split", "train"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--data is required" in err and "Traceback" not in err
        return
    assert main(_args(ckpt, data, tmp_path / "o.json", "--split", split, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expect in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_disable_adapters_ablation(setup, tmp_path):
    """``--disable-adapters text`` scores the model with its text tower's adapters bypassed."""
    s = setup
    out = tmp_path / "abl.json"
    assert main(_args(s["adapters"], s["data"], out, "--split", "train", "--disable-adapters", "text")) == 0
    res = json.loads(out.read_text())
    assert res["disabled_adapters"] == ["text"]
    split = load_split(s["data"], "train")
    with s["model"].disable_adapters("text"):
        _assert_row_equal(res, _reference(s["model"], split, s))
    both = tmp_path / "both.json"
    assert main(_args(s["adapters"], s["data"], both, "--split", "train",
                      "--disable-adapters", "text", "--disable-adapters", "image")) == 0
    _assert_row_equal(json.loads(both.read_text()), _reference(s["zeroshot"], split, s))  # all off = the backbone


def test_disable_adapters_needs_adapters(setup, tmp_path, capsys):
    s = setup
    full, _, _, _ = create_model(dataclasses.replace(s["cfg"], method="full"))
    ckpt = save_adapters(full, tmp_path / "full")
    assert main(_args(ckpt, s["data"], tmp_path / "x.json", "--split", "train", "--disable-adapters", "image")) == 2
    assert "has no adapters to disable" in capsys.readouterr().err


def test_recorded_root_falls_back_to_the_configured_path(tmp_path, monkeypatch):
    """A checkpoint trained on another machine records a resolved path that is not here; the path
    as configured (relative to the working directory) is used instead, and neither is a clear error."""
    from training.cli import CliError
    from training.evaluate import recorded_root

    (tmp_path / "here" / "ucm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    elsewhere = str(tmp_path / "elsewhere" / "ucm")
    assert recorded_root({"root": str(tmp_path / "here" / "ucm"), "root_config": "x"}) == str(tmp_path / "here" / "ucm")
    assert recorded_root({"root": elsewhere, "root_config": "ucm"}) == "ucm"
    with pytest.raises(CliError, match="trained on .*elsewhere/ucm \\(configured as data/ucm\\).*pass --data"):
        recorded_root({"root": elsewhere, "root_config": "data/ucm"})
    for recorded in ({}, {"root": "synthetic"}):
        with pytest.raises(CliError, match="--data is required"):
            recorded_root(recorded)


def _write_templated(root: Path, order: list[int]) -> Path:
    """A csv split whose captions repeat across images (as UCM's do), listed in the given image order."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    rows = ["image,caption"]
    for i in order:
        captions = [f"scene {i % 3} with trees", f"scene {i % 3}", f"picture {i}", "an aerial view"]
        rows += [f"images/{i}.png,{c}" for c in (captions if order[0] == 0 else captions[::-1])]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_metrics_do_not_depend_on_file_order(setup, tmp_path):
    """The same split with images and captions listed in reverse: the same numbers (default tie rule);
    the stable rule, which ranks tied captions in file order, moves."""
    s = setup
    forward = _write_templated(tmp_path / "fwd", list(range(8)))
    backward = _write_templated(tmp_path / "bwd", list(range(8))[::-1])
    got = {}
    for name, data in (("fwd", forward), ("bwd", backward)):
        for ties in ("expected", "stable"):
            out = tmp_path / f"{name}-{ties}.json"
            assert main(_args(s["adapters"], data, out, "--split", "train", "--baseline", "--ties", ties)) == 0
            got[name, ties] = json.loads(out.read_text())
    for row in (lambda r: r, lambda r: r["baseline"]):
        for k in METRIC_KEYS:
            assert row(got["fwd", "expected"])[k] == pytest.approx(row(got["bwd", "expected"])[k], abs=1e-9), k
        fwd_gap, bwd_gap = row(got["fwd", "expected"])["gap"], row(got["bwd", "expected"])["gap"]
        assert set(fwd_gap) >= {"knn_modality_purity", "linear_probe_accuracy", "uniformity_text"}
        for k in fwd_gap:  # the sampled ones (k-NN purity, probe, uniformity) too
            assert fwd_gap[k] == pytest.approx(bwd_gap[k], abs=1e-6), k
    assert got["fwd", "expected"]["ties"] == "expected"
    assert any(got["fwd", "stable"][k] != got["bwd", "stable"][k] for k in METRIC_KEYS)


def test_misaligned_caption_file_is_an_error_not_a_score(setup, tmp_path, capsys):
    """A PE-RSITR caption file missing its first lines used to be read as 4 captions per image."""
    from PIL import Image

    root = tmp_path / "txt"
    (root / "images").mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(1, 11)]
    for n in names:
        Image.new("RGB", (24, 24), (10 * len(n), 20, 30)).save(root / "images" / n)
    (root / "test_filename.txt").write_text("\n".join(names) + "\n")
    captions = [f"caption {c} of {n}" for n in names for c in range(5)]
    (root / "test_caps.txt").write_text("\n".join(captions[10:]) + "\n")  # 10 lines short: 4.00 per image
    assert main(_args(setup["adapters"], root, tmp_path / "o.json", "--split", "test")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "test_caps.txt has 40 lines" in err and err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()
