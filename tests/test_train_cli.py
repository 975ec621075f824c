"""``python -m training.train`` end to end on the baby config: outputs, resume after SIGKILL, NaN stop, errors.

Runs use ``training/configs/debug_tiny.yaml`` (tiny random CLIP, synthetic data) shrunk further
with overrides. Subprocesses and in-process runs use one torch thread: on a busy 2-core box,
OpenMP oversubscription makes the tiny model 10-50x slower.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training.config import load_config
from training.state import read_state
from training.train import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "configs" / "debug_tiny.yaml")
SMALL = ["data.synthetic_images=8", "run.batch_size=8", "run.epochs=2"]  # 40 pairs: 5 steps/epoch, 10 in all


def _cli(out: Path, *overrides: str, slow: float = 0.0, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if slow:
        env["HARMA_TEST_SLOW_STEP_S"] = str(slow)
    cmd = [sys.executable, "-m", "training.train", "--config", TINY, f"run.out_dir={out}", *SMALL, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    return _finish(proc)


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _global_step(run: Path) -> int:
    try:
        return int(read_state(run / "last")["global_step"])
    except Exception:  # not written yet, or mid-swap
        return -1


def _adapters(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_tiny_run_writes_the_run_folder(tmp_path, one_thread, capsys):
    # the synthetic data has no test split: its val split stands in, to exercise the final report
    argv = ["--config", TINY, f"run.out_dir={tmp_path}", "data.synthetic_images=16", "data.test_split=val"]
    assert main(argv) == 0
    run = tmp_path / "debug_tiny-harma"
    assert "best epoch" in capsys.readouterr().out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["model_name"] == "harma-tiny" and cfg["data"]["synthetic_images"] == 16
    lines = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("mR" in r["val"] for r in lines)
    # the temperature the loss used, learned from the config's start value (released: learnable)
    assert lines[-1]["temperature"] > 0 and lines[-1]["temperature"] != cfg["model"]["temperature_init"]
    assert lines[-1]["step"] == 2 * (16 * 5 // 8)
    for folder in (run / "best", run / "last" / "adapters"):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    # only the adapter parameters are stored: exactly the model's trainable tensors
    from harma import ModelConfig, create_model
    from harma.config import from_dict

    torch.manual_seed(0)
    model = create_model(from_dict(ModelConfig, cfg["model"], "model"))[0]
    saved = _adapters(run / "last" / "adapters")
    assert set(saved) == set(model.trainable_state_dict())
    assert sum(t.numel() for t in saved.values()) == model.num_parameters(trainable_only=True) < 20_000
    state = read_state(run / "last")
    assert state["global_step"] == lines[-1]["step"] and state["epoch"] == 2 and state["evaluated"]
    best = max(lines, key=lambda r: r["val"]["mR"])
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["best_epoch"] == best["epoch"] and report["metrics"]["mR"] == pytest.approx(best["val"]["mR"])
    # the same folder again: refused without resume; resume=auto on a finished run trains nothing
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "run.resume=auto" in err
    assert main(argv + ["run.resume=auto"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    # with optim.ema_decay the validation metrics compared below come from the average, so they
    # only match if the resumed run continues the average the killed one saved; the raw adapters,
    # optimizer, schedule, data order and random state are compared as a run without it has them
    extra = ["optim.ema_decay=0.8"]
    reference = _cli(tmp_path / "a", "run.save_every_steps=1", *extra, wait=False)  # uninterrupted, alongside
    proc = _cli(tmp_path / "b", "run.save_every_steps=1", *extra, slow=0.4, wait=False)
    run_b = tmp_path / "b" / "debug_tiny-harma"
    deadline = time.time() + 90
    while _global_step(run_b) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = _global_step(run_b)
    assert proc.returncode == -signal.SIGKILL and 3 <= killed_at < 10, killed_at
    _finish(reference)
    _cli(tmp_path / "b", "run.save_every_steps=1", *extra, "run.resume=auto")
    run_a = tmp_path / "a" / "debug_tiny-harma"
    final_a, final_b = _adapters(run_a / "last" / "adapters"), _adapters(run_b / "last" / "adapters")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    metrics = [[yaml.safe_load(x)["val"] for x in (r / "metrics.jsonl").read_text().splitlines()]
               for r in (run_a, run_b)]
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]
    best_a, best_b = _adapters(run_a / "best"), _adapters(run_b / "best")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path, one_thread, capsys):
    code = main(["--config", TINY, f"run.out_dir={tmp_path}", *SMALL, "optim.lr=1e30", "optim.warmup_fraction=0",
                 "run.save_every_steps=1"])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss at global step" in err
    failed = int(err.split("global step ")[1].split()[0])
    run = tmp_path / "debug_tiny-harma"
    state = read_state(run / "last")  # the checkpoint before the failing step, untouched
    assert state["global_step"] == failed - 1
    assert all(torch.isfinite(t).all() for t in _adapters(run / "last" / "adapters").values())


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    assert main(["--config", TINY, f"run.out_dir={tmp_path}", "run.bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "run.bogus_key" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)  # unknown keys, bad values and wrong types raise ConfigError
    assert cfg.run.epochs >= 1 and cfg.model.model_name


def test_missing_val_split_lists_the_available_ones(tmp_path, one_thread, capsys):
    assert main(["--config", TINY, f"run.out_dir={tmp_path}", *SMALL, "data.val_split=dev"]) == 2
    err = capsys.readouterr().err
    assert "'dev'" in err and "train" in err and "val_split=null" in err


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path, one_thread):
    """torchrun (gloo, CPU) with 2 x 4 per rank trains the same adapters as 1 process with 8: same
    batches (rank shards of one global batch), same per-sample augmentation, exact gathered gradient."""
    assert main(["--config", TINY, f"run.out_dir={tmp_path / 'one'}", *SMALL]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", TINY, f"run.out_dir={tmp_path / 'two'}", *SMALL, "run.batch_size=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _adapters(tmp_path / "one" / "debug_tiny-harma" / "last" / "adapters")
    two = _adapters(tmp_path / "two" / "debug_tiny-harma" / "last" / "adapters")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    assert any(t.abs().max() > 1e-3 for t in one.values())  # the adapters did move


def test_locked_text_uses_cached_features_and_image_cache(tmp_path, one_thread):
    """full + lock_text: text features computed once, images decoded once; only the image side is saved."""
    out = tmp_path / "runs"
    code = main(["--config", TINY, f"run.out_dir={out}", "run.name=locked", "model.method=full",
                 "model.lock_text=true", "data.cache_images=40", "loss.min_temperature=0.5", *SMALL])
    assert code == 0
    caches = list((out / ".image_cache").glob("images-40px-*.npy"))
    assert len(caches) == 1
    assert len(list((out / ".text_cache").glob("text-*.safetensors"))) == 2  # train and val captions
    saved = load_file(str(out / "locked" / "last" / "adapters" / "adapter_model.safetensors"))
    assert saved and not any(k.startswith(("clip.transformer.", "clip.token_embedding")) for k in saved)
    assert any(k.startswith("clip.visual.") for k in saved)
    lines = [json.loads(x) for x in (out / "locked" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "mR" in lines[0]["val"]
    assert [r["temperature"] for r in lines] == [0.5, 0.5]  # the learned value (from 0.07) is held at the floor


def one_epoch_run(out: Path, *overrides: str) -> Path:
    """Train the baby config for one epoch (5 steps) in-process; returns the run folder."""
    assert main(["--config", TINY, f"run.out_dir={out}", *SMALL, "run.epochs=1", *overrides]) == 0
    return out / "debug_tiny-harma"


def test_resume_refuses_a_changed_setting_and_a_foreign_state(tmp_path, one_thread, capsys):
    run = one_epoch_run(tmp_path)
    resume = ["--config", TINY, f"run.out_dir={tmp_path}", *SMALL, "run.epochs=2", "run.resume=auto"]
    assert main(resume + ["optim.lr=2e-3"]) == 2
    assert "optim.lr: 0.001 -> 0.002" in capsys.readouterr().err
    state = read_state(run / "last")
    torch.save({**state, "config_hash": "0" * 64}, run / "last" / "state.pt")  # a state from another run
    assert main(resume) != 0
    assert "config hash mismatch" in capsys.readouterr().err


def test_run_from_before_an_option_existed_resumes_at_its_default(tmp_path, one_thread):
    from training.rundir import config_hash

    run = one_epoch_run(tmp_path)
    # what the code before optim.ema_decay wrote: no such key, and a hash over every key
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["optim"]["ema_decay"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    state = read_state(run / "last")
    torch.save({**state, "config_hash": config_hash(saved, legacy=True)}, run / "last" / "state.pt")
    assert main(["--config", TINY, f"run.out_dir={tmp_path}", *SMALL, "run.epochs=2", "run.resume=auto"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["ema_decay"] == 0.0  # rewritten in full
