"""What the ``python -m training.X`` commands share.

- the error report: a user-facing problem is one ``error:`` line on stderr and exit code 2
  (:class:`CliError`, :data:`USER_ERRORS`, :func:`fail`, :func:`run_command`);
- the device: ``auto | cpu | cuda | cuda:N`` to a ``torch.device`` (:func:`pick_device`), for the
  ``--device`` flag and the trainer's ``run.device``;
- checkpoints: an adapter directory or a run folder to the adapters to load
  (:func:`resolve_checkpoint`), the adapted model (:func:`load_model`) and its backbone without
  adapters (:func:`load_baseline`);
- a dataset split by name or carved from another (:func:`resolve_split`), and JSON results files
  (:func:`write_json`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harma import ModelConfig, create_model, load_adapters
from harma.config import from_dict
from harma.data import RetrievalSplit, carve, load_split
from harma.errors import CheckpointError, ConfigError, HarmaError, one_line
from harma.io import CONFIG_NAME, atomic_write_json
from training.state import find_best

EXIT_ERROR = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # OSError numbers of a full disk or an exhausted quota
DEVICES = "auto, cpu, cuda or cuda:N"


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


USER_ERRORS = (CliError, HarmaError, OSError)  # a command's own, the library's, unreadable files; the rest are bugs


def fail(e: BaseException, code: int = EXIT_ERROR) -> int:
    """Print a user-facing error as one ``error:`` line on stderr; returns the exit code, ``code`` (2).

    An error raised in a DataLoader worker reaches the main process with the worker's whole traceback
    in its message; only the worker's own message is printed."""
    print(f"error: {worker_message(str(e)) or one_line(e)}", file=sys.stderr)
    return code


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def worker_message(text: str) -> Optional[str]:
    """The original message inside the text of an exception that PyTorch re-raised from a DataLoader
    worker (``Caught X in DataLoader worker process N. Original Traceback ... X: message``), on one
    line; None for any other text."""
    if WORKER_TRACEBACK not in text:
        return None
    lines = text.split(WORKER_TRACEBACK, 1)[1].splitlines()
    # the frames are indented ("  File ...", "    code"); the exception (type: message) follows the last one
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
    message = " ".join(line.strip() for line in lines[last_frame + 1:] if line.strip())
    return re.sub(r"^[\w.]+: ", "", message, count=1) or None


def os_error_message(e: OSError) -> str:
    """An ``OSError`` in words: a full disk (``ENOSPC``, ``EDQUOT``) says so and names the file when known."""
    if e.errno in DISK_FULL:
        return "the disk is full" + (f" (writing {e.filename})" if e.filename else "") + f": {e.strerror}"
    return one_line(e)


def run_command(body: Callable[[], Any], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """A command's ``main``: ``body()``'s exit code when it returns an int, else 0; 2 after one
    ``error:`` line when it raises one of ``errors``."""
    try:
        code = body()
    except errors as e:
        return fail(e)
    return code if isinstance(code, int) else 0


def setup_logging(level: int = logging.WARNING, fmt: str = "%(levelname)s %(name)s: %(message)s",
                  datefmt: Optional[str] = None) -> None:
    """Configure the root logger, unless something (a test, a calling program) already did."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=fmt, datefmt=datefmt)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--base-weights`` and ``--num-workers``, for the commands that run a model."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--base-weights", help="local path of the base-weights file, if it moved")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding workers")


def pick_device(name: str, local_rank: Optional[int] = None, option: str = "--device") -> torch.device:
    """The device ``auto | cpu | cuda | cuda:N`` names.

    ``auto`` is CUDA when this machine has it, else the CPU. With ``local_rank`` (a torchrun
    process) ``auto`` and ``cuda`` mean that rank's GPU, ``cuda:local_rank``. Raises
    :class:`CliError` naming ``option`` (``--device``, or a config key such as ``run.device``)
    for any other name, and for CUDA on a machine without it.
    """
    sep = " " if option.startswith("-") else "="  # --device cuda, run.device=cuda
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CliError(f"{option}{sep}{name!r}: expected {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"{option}{sep}{name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Adapter directory to load and what it is: ``"adapter directory"``, ``"best"`` or ``"last"``.

    A run folder gives its ``best/`` (put back first if a kill interrupted its save). It gives
    ``last/adapters`` only when no epoch was ever validated, and says so; a run whose log records
    validated epochs but has no ``best/`` is an error, never a silent fall-back to other weights.
    """
    path = Path(path)
    if not path.exists():
        raise CliError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CliError(f"checkpoint {path} is not a folder (expected an adapter directory or a run folder)")
    if (path / CONFIG_NAME).is_file():
        return path, "adapter directory"
    best = find_best(path)
    if best is not None:
        return best, "best"
    log = path / "metrics.jsonl"
    validated = log.is_file() and any('"val"' in line for line in log.read_text().splitlines())
    last = path / "last" / "adapters"
    if validated:
        raise CliError(f"checkpoint {path}: its metrics.jsonl records validated epochs but best/ is missing; "
                       f"pass {last} to evaluate the last weights instead")
    if (last / CONFIG_NAME).is_file():
        print(f"note: {path} has no best/ (no epoch validated yet): evaluating {last}", file=sys.stderr)
        return last, "last"
    raise CliError(f"checkpoint {path}: no {CONFIG_NAME} in it, in {path / 'best'} or in "
                   f"{last} (is this an adapter directory or a run folder?)")


def load_model(directory: Path, device: torch.device, base_weights: Optional[str]):
    """``harma.load_adapters(directory)``; a file it cannot read becomes a :class:`CheckpointError`
    naming the folder (the library's own errors, corrupt weights included, already name the file)."""
    try:
        return load_adapters(directory, device=device, base_weights=base_weights)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot build the model: {e}") from None


def load_baseline(meta: dict, device: torch.device, base_weights: Optional[str]):
    """The original backbone of a checkpoint (pretrained tag / base weights) with no adapters;
    ``meta`` is its adapter config."""
    cfg: ModelConfig = from_dict(ModelConfig, meta["model"], "model")
    cfg.method = "zeroshot"
    if base_weights is not None:
        cfg.base_weights = base_weights
    return create_model(cfg, device)


def resolve_split(root: str | Path, spec: str, val_fraction: float, seed: int, mode: str = "block",
                  class_size: int = 100, **load: Any) -> RetrievalSplit:
    """Load ``spec`` (a split name, or ``NAME:val`` / ``NAME:train`` carved from split NAME by ``mode``);
    ``load`` goes to :func:`harma.data.load_split` (``expected_captions_per_image``, ``allow_empty``)."""
    if ":" not in spec:
        return load_split(root, spec, **load)
    base, part = spec.split(":", 1)
    if not base or part not in ("train", "val"):
        raise CliError(f"--split {spec!r}: expected NAME, NAME:val or NAME:train (e.g. train:val)")
    try:
        train, val = carve(load_split(root, base, **load), mode, val_fraction, seed, class_size)
    except ConfigError as e:  # a bad fraction or carve name (too few images is a DatasetError, as it is)
        raise CliError(f"--split {spec}: {e}") from None
    return val if part == "val" else train


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats in it (and in nested dicts) as None: valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    return obj


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` (via :func:`json_safe`) to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json_safe(obj), indent)
    return path
