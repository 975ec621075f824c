"""The epoch loop of ``training.train``: data, optimiser, DDP, per-epoch validation, checkpoints, resume.

Selection is on the validation split only (method.md §7.13), or none at all with ``data.carve=none``
(``best/`` is then the last epoch); the optional test split is scored once, with ``best/``, after
training (report only).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from harma import CheckpointError, HarmaLoss, HarmaModel, load_adapter_weights
from harma.config import to_dict
from harma.data import RetrievalSplit
from harma.encode import bar_progress, evaluate_split
from harma.io import atomic_write_json
from training.caches import image_cache, text_features
from training.config import TrainConfig
from training.data import Splits, build_train_loader, build_transforms, caption_fn
from training.distributed import DistInfo, barrier
from training.ema import WeightEMA
from training.engine import EpochResult, StepSettings, train_one_epoch
from training.optim import build_optimizer, build_scheduler
from training.rundir import RunPlan, append_metrics, config_hash, trim_metrics
from training.state import capture_rng, read_state, restore_rng, write_adapters_dir, write_last

log = logging.getLogger("training.train")


def _gather_rng(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective: all ranks must call it)."""
    if world_size == 1:
        return [capture_rng()]
    import torch.distributed as dist

    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, capture_rng())
    return states


class Trainer:
    """Owns one run: call :meth:`resume` (optional), then :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, splits: Splits, model: HarmaModel, tokenizer: Any,
                 dist: DistInfo, settings: StepSettings) -> None:
        self.cfg, self.plan, self.run_dir, self.dist, self.settings = cfg, plan, plan.run_dir, dist, settings
        self.main = dist.rank == 0
        self.model, self.tokenizer, self.splits = model, tokenizer, splits
        self.train_tf, self.eval_tf = build_transforms(cfg.data.augment, model.clip)
        # Frozen text tower (full + lock_text): its features never change, so compute them once.
        fn, bs, folder = caption_fn(cfg.data), 2 * cfg.run.eval_batch_size, Path(cfg.run.out_dir) / ".text_cache"
        settings.text_features = text_features(model, splits.train, tokenizer, fn, bs, dist.device, "train", folder)
        self.val_text = (text_features(model, splits.val, tokenizer, fn, bs, dist.device, "val", folder)
                         if splits.val is not None else None)
        self.loader, self.sampler = build_train_loader(
            self.splits.train, self.train_tf, tokenizer, cfg.data, batch_size=cfg.run.batch_size,
            world_size=dist.world_size, rank=dist.rank, seed=cfg.run.seed, pin_memory=dist.device.type == "cuda",
            images=image_cache(cfg, splits.train, self.main), tokenize=settings.text_features is None)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.run.epochs * self.steps_per_epoch
        if cfg.run.max_steps is not None:  # a capped run still warms up and decays over its own length
            self.total_steps = max(1, min(self.total_steps, cfg.run.max_steps))
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.loss_fn = HarmaLoss(cfg.loss)
        self.ema = WeightEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.net: nn.Module = self._wrap(model)
        self.epoch, self.global_step, self.partial = 0, 0, EpochResult()
        self.best_mr: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.evaluated = True  # whether the state's latest steps have been validated
        self.config_hash = config_hash(to_dict(cfg))

    def _wrap(self, model: HarmaModel) -> nn.Module:
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.dist.device.type == "cuda"
        # The temperature only feeds the contrastive term; without it DDP must allow unused params.
        return DistributedDataParallel(model, device_ids=[self.dist.device.index] if cuda else None,
                                       find_unused_parameters=self.cfg.loss.contrastive == 0)

    # -- resume --------------------------------------------------------------------------------
    def resume(self, last: Path) -> None:
        state = read_state(last)
        # a state written before config_hash skipped default values carries the hash of its config.yaml in full
        legacy = config_hash(self.plan.saved_config, legacy=True) if self.plan.saved_config is not None else None
        if state.get("config_hash") not in (self.config_hash, legacy):
            raise CheckpointError(f"{last}/state.pt was written by a different config (config hash mismatch)")
        load_adapter_weights(self.model, last / "adapters")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.partial = EpochResult.from_state(state["epoch_progress"])
        self.best_mr, self.best_epoch = state.get("best_mr"), state.get("best_epoch")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.evaluated = bool(state["evaluated"])
        if self.partial.steps > self.steps_per_epoch:
            raise CheckpointError(f"{last}: {self.partial.steps} steps into an epoch of {self.steps_per_epoch}")
        rng = state["rng"]
        if len(rng) != self.dist.world_size:
            log.warning("resuming %d processes from a %d-process run: RNG streams are not continued exactly",
                        self.dist.world_size, len(rng))
        restore_rng(rng[self.dist.rank % len(rng)])
        if self.main:
            trim_metrics(self.run_dir, self.epoch)
            log.info("resuming %s at epoch %d, step %d of the epoch (global step %d)",
                     self.run_dir, self.epoch + 1, self.partial.steps, self.global_step)

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, m = self.cfg, self.model
        precision = "bf16" if self.settings.autocast_dtype is not None else "fp32"
        if self.main:
            capped = " (run.max_steps)" if self.total_steps < cfg.run.epochs * self.steps_per_epoch else ""
            val = self.splits.val
            val_txt = f"val {val.num_images} images / {val.num_captions} captions" if val is not None else \
                "no validation (data.carve=none: best/ is the last epoch)"
            log.info("%s | world %d | device %s | precision %s | train %d images / %d pairs | %s"
                     " | %d steps/epoch x %d epochs, %d steps scheduled%s", m.trainable_summary(),
                     self.dist.world_size, self.dist.device, precision, self.splits.train.num_images,
                     self.splits.train.num_captions, val_txt, self.steps_per_epoch, cfg.run.epochs,
                     self.total_steps, capped)
        while self.epoch < cfg.run.epochs:
            out_of_steps = self.global_step >= self.total_steps
            if out_of_steps and self.evaluated:
                break
            result = self.partial
            if not out_of_steps and result.steps < self.steps_per_epoch:
                # a checkpoint written after the epoch's last step but before its evaluation
                # (save_every_steps) resumes straight into the evaluation below
                self.sampler.set_epoch(self.epoch, result.steps)
                result = train_one_epoch(
                    self.net, self.loader, self.loss_fn, self.optimizer, self.scheduler, self.settings,
                    epoch=self.epoch, global_step=self.global_step, global_batch=self.sampler.global_batch,
                    max_steps=self.total_steps, result=result, after_step=self._after_step,
                    progress=self.main, log_every=cfg.run.log_every)
            self._end_of_epoch(result)
            if result.steps < self.steps_per_epoch:  # stopped by run.max_steps
                break
        barrier()
        if self.main:
            self._finish()

    def _after_step(self, global_step: int, result: EpochResult) -> None:
        self.global_step, self.partial, self.evaluated = global_step, result, False
        if self.ema is not None:
            self.ema.update()
        every = self.cfg.run.save_every_steps
        if every > 0 and global_step % every == 0:
            self._save_last(self.epoch, result)

    def _end_of_epoch(self, result: EpochResult) -> None:
        complete = result.steps >= self.steps_per_epoch
        record = self._validate(result, complete) if self.main else None
        if complete:
            self.epoch, self.partial = self.epoch + 1, EpochResult()
        self.evaluated = True
        self._save_last(self.epoch, self.partial)
        if self.main:
            append_metrics(self.run_dir, record)
        barrier()

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The weights to validate and select: their moving average with ``optim.ema_decay``, else as trained."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _validate(self, result: EpochResult, complete: bool) -> dict[str, Any]:
        """Main rank: validate, write ``best/`` when val mR improves, log; returns the metrics record.
        Without a validation split (``data.carve=none``) every complete epoch's weights go to ``best/``,
        so it holds the last epoch: nothing is selected."""
        with self._averaged():
            record = {"epoch": self.epoch + 1, "step": self.global_step, **({} if complete else {"partial": True}),
                      "train": result.loss, "lr": result.lr, "samples_per_s": round(result.samples_per_s, 2),
                      "epoch_s": round(result.seconds, 2), "temperature": self._temperature()}
            extra = {"epoch": self.epoch + 1, "step": self.global_step, "partial_epoch": not complete,
                     "data": self.splits.info(self.cfg.data), "run": self.run_dir.name,
                     # the run seed, for the record; a random backbone is rebuilt from model.init_seed
                     "seed": self.cfg.run.seed, **({"ema_decay": self.ema.decay} if self.ema is not None else {})}
            if self.splits.val is None:
                if complete:
                    self.best_epoch = self.epoch + 1
                    write_adapters_dir(self.model, self.run_dir / "best", extra={**extra, "selection": "last epoch"})
                log.info("epoch %d | step %d | loss %.4f | no validation | %.1f samples/s", self.epoch + 1,
                         self.global_step, result.loss.get("loss", float("nan")), result.samples_per_s)
                return record
            val = self._evaluate(self.splits.val, "val", self.val_text)
            record.update(val=val.metrics, val_gap=val.gap)
            mr = val.metrics["mR"]
            if self.best_mr is None or mr > self.best_mr:
                self.best_mr, self.best_epoch = mr, self.epoch + 1
                write_adapters_dir(self.model, self.run_dir / "best", extra={**extra, "val": val.metrics})
            log.info("epoch %d | step %d | loss %.4f | val mR %.2f (best %.2f, epoch %d) | %.1f samples/s",
                     self.epoch + 1, self.global_step, result.loss.get("loss", float("nan")), mr,
                     self.best_mr, self.best_epoch, result.samples_per_s)
        return record

    def _temperature(self) -> float:
        """The contrastive loss's temperature as it uses it: the learned value, held at the loss's floor."""
        return round(max(float(self.model.temperature.detach()), self.cfg.loss.min_temperature), 6)

    def _save_last(self, epoch: int, progress: EpochResult) -> None:
        rng = _gather_rng(self.dist.world_size)  # collective: before the main-rank check
        if not self.main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": epoch, "global_step": self.global_step, "epoch_progress": progress.to_state(),
                 "best_mr": self.best_mr, "best_epoch": self.best_epoch, "rng": rng,
                 "evaluated": self.evaluated, "config_hash": self.config_hash, "world_size": self.dist.world_size}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        write_last(self.model, self.run_dir / "last", state,
                   extra={"epoch": epoch, "step_in_epoch": progress.steps, "global_step": self.global_step})

    def _evaluate(self, split: RetrievalSplit, name: str, text_embeddings: Optional[torch.Tensor] = None):
        d = self.cfg.data
        with tqdm(total=split.num_images + split.num_captions, desc=name, leave=False, dynamic_ncols=True) as bar:
            return evaluate_split(self.model, split, self.eval_tf, self.tokenizer, clean_captions=d.clean_captions,
                                  max_words=d.max_words, batch_size=self.cfg.run.eval_batch_size,
                                  device=self.dist.device, num_workers=d.num_workers,
                                  progress=bar_progress(bar),
                                  text_embeddings=text_embeddings)

    def _finish(self) -> None:
        best = self.run_dir / "best"
        if self.cfg.data.test_split and self.splits.test is not None and best.is_dir():
            load_adapter_weights(self.model, best)  # the selected adapters; training is over
            test = self._evaluate(self.splits.test, "test")
            report = {"split": self.cfg.data.test_split, "best_epoch": self.best_epoch, "metrics": test.metrics,
                      "gap": test.gap, "note": "report only: selection used the validation split"
                      if self.splits.val is not None else "report only: the last epoch, nothing selected"}
            atomic_write_json(self.run_dir / "test_metrics.json", report, 2)
            log.info("test (%s) with best/: mR %.2f", self.cfg.data.test_split, test.metrics["mR"])
        best_txt = "no evaluation"
        if self.splits.val is None and self.best_epoch is not None:
            best_txt = f"no validation, best/ is the last epoch ({self.best_epoch})"
        elif self.best_mr is not None:
            best_txt = f"best epoch {self.best_epoch} (val mR {self.best_mr:.2f})"
        print(f"done: {best_txt}; {self.global_step} steps; run folder {self.run_dir}", flush=True)
