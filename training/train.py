"""Train adapters on a frozen open_clip CLIP: ``python -m training.train --config FILE [key=value ...]``.

Resolves the config (defaults <- YAML <- overrides), trains with the released recipe (method.md §3),
evaluates the validation split after every epoch and keeps the best adapters by validation mR
(never the test split, method.md §7.13). ``run.resume=auto`` continues an interrupted run from its
exact step. Multi-GPU: ``torchrun --nproc_per_node N -m training.train ...``.

Architectures: every ``training/configs/arch/*.json`` (open_clip format: embed_dim, vision_cfg,
text_cfg) is registered under its file stem before the model is built, so a config can name it in
``model.model_name``. Drop your own architecture JSON there.

Exit codes: 0 done; 2 configuration, dataset or checkpoint error (one line on stderr); 3 the loss
became non-finite. Test hook: ``HARMA_TEST_SLOW_STEP_S=0.5`` sleeps after every step.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from harma import ConfigError, HarmaError, create_model
from harma.archs import is_known, register_arch_files
from harma.data import verify_images
from harma.encode import bar_progress
from training.cli import DISK_FULL, CliError, fail, os_error_message, setup_logging
from training.config import TrainConfig, load_config
from training.data import SYNTHETIC, Splits, build_splits, prepare_root
from training.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from training.engine import NonFiniteLossError, StepSettings, resolve_precision
from training.loop import Trainer
from training.rundir import METRICS_NAME, RunError, RunPlan, check_resumable, plan_run, write_config

log = logging.getLogger("training.train")

ARCH_DIR = Path(__file__).parent / "configs" / "arch"
EXIT_ERROR, EXIT_NONFINITE = 2, 3
# CliError: a run.device this machine cannot give (training.cli.pick_device)
_USER_ERRORS = (HarmaError, RunError, CliError)


def register_architectures(directory: Path = ARCH_DIR) -> list[str]:
    """Register each ``*.json`` open_clip architecture in ``directory`` under its file stem (idempotent,
    unlike ``open_clip.add_model_config``, which rescans every bundled config on each call)."""
    return register_arch_files(directory)


def _check_model(cfg: TrainConfig) -> None:
    if cfg.model.method == "zeroshot":
        raise ConfigError("model.method=zeroshot has no trainable parameters; evaluate it instead of training")
    if cfg.model.base_weights and not Path(cfg.model.base_weights).expanduser().exists():
        raise ConfigError(f"model.base_weights={cfg.model.base_weights}: file or checkpoint folder not found")
    if not is_known(cfg.model.model_name):
        raise ConfigError(f"model.model_name={cfg.model.model_name!r} is not an open_clip architecture "
                          f"(nor a JSON in {ARCH_DIR})")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _plan(cfg: TrainConfig, config_path: Optional[str], main: bool) -> RunPlan:
    """The main rank decides (it may repair an interrupted checkpoint swap); everyone gets its answer."""
    plan, error = None, None
    if main:
        try:
            plan = plan_run(cfg, config_path)
            if plan.last is not None:
                plan.saved_config = check_resumable(plan, cfg)
        except _USER_ERRORS as e:  # sent to every rank, so all of them stop with the same message
            error = str(e)
    plan, error = broadcast_object((plan, error))
    if error:
        raise RunError(error)
    return plan


def _verify(splits: Splits, cache_dir: Path, main: bool) -> None:
    paths = list(dict.fromkeys(p for s in (splits.train, splits.val, splits.test) if s is not None for p in s.images))
    with tqdm(total=len(paths), desc="checking images", unit="img", leave=False, disable=not main,
              dynamic_ncols=True) as bar:
        checked = verify_images(paths, cache_dir, progress=bar_progress(bar))
    if checked and main:
        log.info("checked %d images: all decode", checked)


def run(cfg: TrainConfig, config_path: Optional[str]) -> int:
    register_architectures()
    _check_model(cfg)
    try:
        dist = init_distributed(cfg.run.device)
    except (RuntimeError, ValueError) as e:  # e.g. the process group cannot start
        raise ConfigError(f"run.device={cfg.run.device}: {e}") from None
    main = dist.rank == 0
    plan = _plan(cfg, config_path, main)
    try:
        return _train(cfg, plan, dist)
    except OSError as e:  # e.g. a full disk: checkpoints are written whole or not at all, so the last one stands
        fix = "free space" if e.errno in DISK_FULL else "fix that"
        raise RunError(f"run folder {plan.run_dir}: {os_error_message(e)}; the checkpoints already written are "
                       f"kept: {fix}, then continue with run.resume=auto") from None


def _train(cfg: TrainConfig, plan: RunPlan, dist: DistInfo) -> int:
    main = dist.rank == 0
    if plan.by_path:  # keep config.yaml describing where the run really lives
        cfg.run.out_dir, cfg.run.name = str(plan.run_dir.parent), plan.run_dir.name
    root = prepare_root(cfg.data, plan.run_dir, cfg.run.seed, write=False)
    # a real dataset is checked before anything is written, so a typo leaves no run folder behind
    splits = None if cfg.data.root == SYNTHETIC else build_splits(cfg.data, root)
    if splits is not None:  # every image decodes, before the run starts (once per dataset: cached)
        _verify(splits, Path(cfg.run.out_dir).expanduser() / ".image_cache", main)
    if main:
        write_config(plan.run_dir, cfg)
        if plan.last is None:  # run.resume=auto without a checkpoint: start the log afresh
            (plan.run_dir / METRICS_NAME).unlink(missing_ok=True)
        prepare_root(cfg.data, plan.run_dir, cfg.run.seed, write=True)
    barrier()  # config and synthetic data are written by the main rank only
    splits = splits or build_splits(cfg.data, root)
    _seed_all(cfg.run.seed)  # identical model init (random backbone, adapters) on every rank
    model, _, _, tokenizer = create_model(cfg.model, dist.device)
    if cfg.run.grad_checkpointing:
        model.set_grad_checkpointing(True)
    settings = StepSettings(
        device=dist.device,
        autocast_dtype=resolve_precision(cfg.run.precision, dist.device),
        grad_clip=cfg.optim.grad_clip,
        augmented_views=cfg.loss.intra_image > 0 or cfg.loss.intra_text > 0,
        slow_step_s=float(os.environ.get("HARMA_TEST_SLOW_STEP_S", "0") or 0),
    )
    trainer = Trainer(cfg, plan, splits, model, tokenizer, dist, settings)
    if plan.last is not None:
        trainer.resume(plan.last)
    else:
        _seed_all(cfg.run.seed + dist.rank)  # per-rank stream for anything random in the step
    trainer.fit()
    return 0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file, e.g. training/configs/debug_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.epochs=3 optim.lr=1e-4")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    # a CLI configures logging; other ranks only warn
    setup_logging(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                  "%(asctime)s %(message)s", "%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, args.config)
    except (*_USER_ERRORS, OSError) as e:  # OSError: a file that cannot be read before the run folder is known
        return fail(e, EXIT_ERROR)
    except NonFiniteLossError as e:
        return fail(e, EXIT_NONFINITE)
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
