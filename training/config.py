"""Training configuration: one typed ``TrainConfig``, filled from dataclass defaults <- YAML <- ``key=value``.

Unknown keys are an error at every level; values given as strings on the command line are
converted to the field's type (``run.epochs=3``, ``optim.lr=4e-4``, ``model.pretrained=null``).
The resolved config is written to every run folder as ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from harma.config import ConfigError, ModelConfig, from_dict, to_dict
from harma.data import CARVES
from harma.errors import one_line
from harma.losses import LossConfig

AUGMENTS = ("released", "rotations", "dihedral", "none")
NO_CARVE = "none"  # data.carve: no validation split, the last epoch is the result (docs/results.md#protocol)


@dataclass
class DataConfig:
    root: str = ""  # dataset folder in any supported format, or "synthetic" (generated on the fly)
    format: Optional[str] = None  # force a reader (harma_json, pe_rsitr_txt, csv, jsonl); None = detect
    train_split: str = "train"
    # captions per image: checked for every image when set; it is also how the positional PE-RSITR txt
    # layout groups caption lines (default there: 5, as published), so a caption file with lines
    # missing is refused instead of pairing images with other images' captions
    captions_per_image: Optional[int] = None
    allow_empty: bool = False  # drop empty/whitespace captions (counted in the log) instead of refusing the file
    val_split: Optional[str] = "val"  # model selection split; None = carve val_fraction of train
    val_fraction: float = 0.1  # used when val_split is None
    # how val is carved: block = the first val_fraction of the ids of every scene class, a contiguous
    # block like UCM's test split (deterministic) | random = images drawn with carve_seed (leaks on
    # tiled-scene datasets such as UCM: near-duplicate neighbours land on both sides) | none = no
    # validation at all: train on the whole train split, best/ holds the last epoch (no selection)
    carve: str = "block"
    carve_seed: int = 0  # random carve only
    carve_class_size: int = 100  # block carve, numeric file names without labels: ids per class (UCM: 100)
    clean_captions: bool = True  # released pre_caption: lower-case, strip punctuation
    max_words: int = 30  # released caption cut
    # released: crop (0.5-1) + flip + RandAugment | rotations: released + 90° turns and v-flips |
    # dihedral: the 8 flips/right-angle turns + a light crop (0.8-1), no RandAugment | none
    augment: str = "released"
    num_workers: int = 2
    cache_images: int = 0  # >0: decode train images once, resized to this side, into <out_dir>/.image_cache
    # >0: every batch holds this many scene classes, batch/K captions each (the train split needs class
    # labels, e.g. RSICD's label_name): negatives of the same scene, to learn more than the scene
    label_batches: int = 0
    test_split: Optional[str] = None  # if set, the best checkpoint is evaluated on it at the end (report only)
    synthetic_images: int = 48  # size of the generated dataset when root == "synthetic"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ConfigError(f"data.augment={self.augment!r} is not one of {', '.join(AUGMENTS)}")
        if self.cache_images < 0:
            raise ConfigError("data.cache_images must be >= 0 (0 = off)")
        if self.label_batches < 0:
            raise ConfigError("data.label_batches must be >= 0 (0 = off)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction must be in (0, 1)")
        if self.carve not in (*CARVES, NO_CARVE):
            raise ConfigError(f"data.carve={self.carve!r} is not one of {', '.join((*CARVES, NO_CARVE))}")
        if self.carve == NO_CARVE and self.val_split is not None:
            raise ConfigError(f"data.carve=none (no validation) needs data.val_split=null, got {self.val_split!r}")
        if self.captions_per_image is not None and self.captions_per_image < 1:
            raise ConfigError("data.captions_per_image must be >= 1 (or null)")
        if self.carve_class_size < 1:
            raise ConfigError("data.carve_class_size must be >= 1")
        for name in ("max_words", "synthetic_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0 = decode in the main process), got "
                              f"{self.num_workers!r}")


@dataclass
class OptimConfig:
    lr: float = 4e-4  # released: 4e-4 (CLIP ViT-B-32), 4e-6 (GeoRSCLIP)
    weight_decay: float = 0.04
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    decay_scalars: bool = True  # released: gates and temperature get weight decay too (method.md §3)
    warmup_fraction: float = 0.1  # linear warm-up over this fraction of all steps
    schedule: str = "linear"  # linear (released: warm-up then linear decay to 0) | cosine | constant
    grad_clip: float = 0.0  # max grad norm; 0 = off (released)
    # multiplies lr for the text tower's trainable weights (its adapters, with the MMS adapters when
    # only the text tower uses them; its own weights under `full`); 1 = one rate for all (released)
    text_lr_scale: float = 1.0
    # multiplies lr for the adapters' zero-initialised output projections (MGA up, MMS l2, MRS up;
    # harma.adapters.output_projections), as LoRA+ does for LoRA's B matrices; 1 = one rate (released)
    up_lr_scale: float = 1.0
    # peak rate of the backbone parameters an adapter method trains beside its adapters
    # (model.also_train: norms, biases, convs, proj); None = optim.lr. Full fine-tuning's rate suits
    # backbone weights better than the adapters' (20x higher on the UCM recipe).
    also_train_lr: Optional[float] = None
    # the learned temperature's own peak rate (same warm-up and schedule); None = optim.lr (released).
    # At an adapter method's high rate the temperature falls much faster than under full fine-tuning.
    temperature_lr: Optional[float] = None
    # exponential moving average of the trained weights (timm's ModelEmaV3, with its warm-up): validation,
    # best/ and the test report use the average; 0 = off (released). 0.995 averages about 200 steps.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of linear, cosine, constant")
        for name in ("text_lr_scale", "up_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError("optim.warmup_fraction must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay!r}")
        if self.also_train_lr is not None and not self.also_train_lr >= 0:
            raise ConfigError(f"optim.also_train_lr must be >= 0 (or null for optim.lr), got {self.also_train_lr!r}")
        if self.temperature_lr is not None and not self.temperature_lr >= 0:
            raise ConfigError(f"optim.temperature_lr must be >= 0 (or null for optim.lr), got {self.temperature_lr!r}")


@dataclass
class RunConfig:
    out_dir: str = "runs"  # parent folder of run folders
    name: Optional[str] = None  # run folder name; default: <config stem>-<method>
    epochs: int = 10
    batch_size: int = 214  # per process; the contrastive loss sees batch_size x world_size
    eval_batch_size: int = 128
    seed: int = 3407  # released seed (+ rank for data workers)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    grad_checkpointing: bool = False  # recompute activations: less memory for large backbones
    resume: str = "never"  # never | auto (continue the run folder's last checkpoint) | PATH to a run folder
    max_steps: Optional[int] = None  # stop after this many optimiser steps (smoke tests, benchmarks)
    save_every_steps: int = 0  # also write the resumable checkpoint every N steps (0 = end of epoch only)
    log_every: int = 10  # steps between progress-bar loss updates

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"run.precision={self.precision!r} is not one of auto, fp32, bf16")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("run.epochs and run.batch_size must be >= 1")
        for name in ("eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps must be >= 1 (or null for no cap), got {self.max_steps!r}")
        if self.save_every_steps < 0:
            raise ConfigError(f"run.save_every_steps must be >= 0 (0 = end of epoch only), got "
                              f"{self.save_every_steps!r}")
        if self.name:  # None or "": <config stem>-<method>
            check_run_name(self.name)
        if not self.resume:
            raise ConfigError("run.resume must be never, auto or the path of a run folder, got ''")


def check_run_name(name: str) -> None:
    """A run name is a folder under ``run.out_dir``: plain names, optionally in sub-folders (``tune/ucm-lr3``);
    an absolute path, ``..``, ``.``, a backslash or an empty part would put it elsewhere."""
    if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in name.split("/")):
        raise ConfigError(f"run.name={name!r}: expected a folder name inside run.out_dir (letters, digits, -, _, "
                          "optionally sub/folder), without '..', '.', a leading '/' or a backslash")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _set_override(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError) as e:
        why = getattr(e, "problem", None) or one_line(e)[:200]
        raise ConfigError(f"override {dotted}={raw[:60]}: not a valid YAML value ({why})") from None


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides; returns the validated ``TrainConfig``."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from e
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply to read") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. run.epochs=3)")
        key, raw = item.split("=", 1)
        _set_override(tree, key.strip(), raw)
    return from_dict(TrainConfig, tree)


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
