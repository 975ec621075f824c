"""Evaluate saved adapters (and optionally the zero-shot backbone) on one retrieval split.

    python -m training.evaluate --checkpoint runs/ucm-harma --data /data/ucm --split train:val \\
        --json runs/ucm-harma/eval_val.json --baseline

``--checkpoint`` is an adapter directory or a run folder (``RUN/best/``, else ``RUN/last/adapters/``).
``--split NAME`` loads that split; ``--split train:val`` / ``train:train`` carves a validation split
from train as the trainer does for datasets without a val file (by default the carve the checkpoint
was trained with). R@K counts tied scores by their expected rank (``--ties``). Protocol: method.md
§0.7, §4.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from harma import BaseWeightsError, CheckpointError, ConfigError, ModelConfig, create_model, load_adapters
from harma.checkpoint import CONFIG_NAME, atomic_write_bytes, read_adapter_config
from harma.config import from_dict
from harma.data import CARVES, DatasetError, RetrievalSplit, carve, load_split
from harma.encode import EvalResult, NonFiniteEmbeddingError, bar_progress, evaluate_split
from harma.metrics import TIE_RULES, format_table
from training.state import find_best

GAP_COLUMNS = ("centroid_distance", "uniformity_joint", "knn_modality_purity", "linear_probe_accuracy")
DEFAULTS = {"val_fraction": 0.1, "carve_seed": 0, "carve": "block", "carve_class_size": 100,
            "clean_captions": True, "max_words": 30, "captions_per_image": None, "allow_empty": False}


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


USER_ERRORS = (CliError, DatasetError, CheckpointError, BaseWeightsError, ConfigError, NonFiniteEmbeddingError, OSError)


def fail(e: BaseException) -> int:
    """Print a user-facing error as one ``error:`` line on stderr; returns exit code 2."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="adapter directory, or a run folder (uses best/, else last/adapters/)")
    p.add_argument("--data", help="dataset folder (default: the one recorded in the checkpoint)")
    p.add_argument("--split", help="split name, or train:val / train:train to carve val from train "
                   "(default: the checkpoint's validation split)")
    p.add_argument("--json", dest="json_out", help="write the results here (atomically)")
    p.add_argument("--baseline", action="store_true", help="also evaluate the backbone without adapters (zero-shot)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (captions: twice this)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--base-weights", help="local path of the base-weights file, if it moved")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--no-clean-captions", dest="clean_captions", action="store_false", default=None,
                   help="score raw captions (default: cleaned as in the released code)")
    p.add_argument("--val-fraction", type=float, help="fraction of train images carved as val (default 0.1)")
    p.add_argument("--carve-seed", type=int, help="seed of the val carving (default 0)")
    p.add_argument("--carve", choices=CARVES, help="how train:val is carved: block (a contiguous run of ids per "
                   "class, like UCM's test split) or random (leaky on tiled scenes); default: the checkpoint's")
    p.add_argument("--captions-per-image", type=int,
                   help="captions per image to expect (PE-RSITR txt groups its lines by it; default: 5 there)")
    p.add_argument("--allow-empty", action="store_true", default=None,
                   help="drop empty captions instead of refusing the file")
    p.add_argument("--ties", choices=TIE_RULES, default="expected",
                   help="how tied scores rank: expected (default; independent of file order), stable (file "
                   "order), optimistic / pessimistic (the bounds)")
    p.add_argument("--disable-adapters", action="append", choices=("image", "text"), default=[], metavar="TOWER",
                   help="ablation: bypass this tower's adapters (image or text; repeat for both)")
    return p


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


def data_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """Data settings the trainer recorded under ``extra.data`` (or ``extra.config.data``), if any."""
    extra = meta.get("extra") or {}
    data = extra.get("data")
    if not isinstance(data, dict):
        data = (extra.get("config") or {}).get("data") if isinstance(extra.get("config"), dict) else None
    return data if isinstance(data, dict) else {}


def recorded_root(recorded: dict[str, Any]) -> str:
    """The dataset folder a checkpoint was trained on: the resolved path the trainer recorded, or,
    where that is not on this machine (a checkpoint trained elsewhere), the path as configured,
    relative to the working directory (``../shared/datasets/ucm`` from a checkout)."""
    root, configured = recorded.get("root"), recorded.get("root_config")
    if not root or root == "synthetic":
        raise CliError("--data is required (the checkpoint records no dataset folder)")
    for candidate in (root, configured):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    raise CliError(f"the checkpoint was trained on {root}" + (f" (configured as {configured})" if configured else "")
                   + ", which is not on this machine; pass --data DIR")


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
    except DatasetError:
        raise
    except ValueError as e:  # bad fraction, too few images
        raise CliError(f"--split {spec}: {e}") from None
    return val if part == "val" else train


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine")
    return device


def format_gap_table(rows: dict[str, EvalResult]) -> str:
    """The headline modality-gap numbers, one line per row, 4 decimals."""
    label = max(len(n) for n in rows)
    width = max(len(c) for c in GAP_COLUMNS)
    lines = [f"{'':<{label}} | " + " ".join(c.rjust(width) for c in GAP_COLUMNS)]
    for name, res in rows.items():
        cells = [f"{res.gap[c]:.4f}" if c in res.gap else "-" for c in GAP_COLUMNS]
        lines.append(f"{name:<{label}} | " + " ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def _run(model: torch.nn.Module, split: RetrievalSplit, transform, tokenizer, args: argparse.Namespace,
         device: torch.device, label: str) -> EvalResult:
    from tqdm import tqdm

    total = split.num_images + split.num_captions
    with tqdm(total=total, desc=f"encode {label}", unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        return evaluate_split(
            model, split, transform, tokenizer, clean_captions=args.clean_captions, max_words=args.max_words,
            batch_size=args.batch_size, device=device, num_workers=args.num_workers,
            progress=bar_progress(bar), ties=args.ties,
        )


def _load(directory: Path, device: torch.device, base_weights: Optional[str]):
    try:
        return load_adapters(directory, device=device, base_weights=base_weights)
    except (CheckpointError, BaseWeightsError, ConfigError):
        raise
    except (ValueError, OSError) as e:  # e.g. an open_clip model name this install does not know
        raise CheckpointError(f"{directory}: cannot build the model: {e}") from None
    except Exception as e:  # safetensors' own error type for a corrupt weights file
        if type(e).__name__ == "SafetensorError":
            raise CheckpointError(f"{directory}: unreadable weights file: {e}") from None
        raise


def _baseline(meta: dict, device: torch.device, base_weights: Optional[str]):
    """The original backbone (pretrained tag / base weights) with no adapters."""
    cfg: ModelConfig = from_dict(ModelConfig, meta["model"], "model")
    cfg.method = "zeroshot"
    if base_weights is not None:
        cfg.base_weights = base_weights
    return create_model(cfg, device)


def _row(res: EvalResult, **info: Any) -> dict[str, Any]:
    return {**res.to_dict(), **info}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve inputs, evaluate, print the tables; returns the JSON-ready results."""
    directory, kind = resolve_checkpoint(args.checkpoint)
    meta = read_adapter_config(directory)
    recorded = data_defaults(meta)
    if recorded and "carve" not in recorded:  # trained before block carving existed: it carved at random
        recorded = {**recorded, "carve": "random"}
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, recorded.get(key, default))
    if args.data is None:
        args.data = recorded_root(recorded)
    if args.split is None:
        val = recorded.get("val_split", "val") if recorded else "val"
        args.split = val if val else f"{recorded.get('train_split', 'train')}:val"
    if args.batch_size < 1 or args.num_workers < 0:
        raise CliError("--batch-size must be >= 1 and --num-workers >= 0")
    device = pick_device(args.device)

    print(f"checkpoint: {directory} ({kind}; method {meta['method']})", flush=True)
    split = resolve_split(args.data, args.split, args.val_fraction, args.carve_seed, args.carve,
                          args.carve_class_size, expected_captions_per_image=args.captions_per_image,
                          allow_empty=args.allow_empty)
    if split.num_captions == 0:
        raise CliError(f"{split.name}: the split has no captions, so retrieval cannot be evaluated")
    print(f"split: {split.name} ({split.num_images} images, {split.num_captions} captions)", flush=True)

    # Paths as given (relative to where the command ran), so results files committed from a
    # checkout hold no machine-specific absolute paths.
    info = {"data": Path(args.data).as_posix(), "split": args.split}
    off = sorted(set(args.disable_adapters))
    if off and meta["method"] not in ("harma", "mrs"):
        raise CliError(f"--disable-adapters: a {meta['method']!r} checkpoint has no adapters to disable")
    model, _, transform, tokenizer = _load(directory, device, args.base_weights)
    label = f"adapted ({' and '.join(off)} adapters off)" if off else "adapted"
    with model.disable_adapters(*off) if off else contextlib.nullcontext():
        adapted = _run(model, split, transform, tokenizer, args, device, label)
    del model
    rows: dict[str, EvalResult] = {}
    out = _row(adapted, checkpoint=directory.as_posix(), method=meta["method"], **info)
    out["checkpoint_kind"] = kind
    if off:
        out["disabled_adapters"] = off
    out["clean_captions"] = bool(args.clean_captions)
    if ":" in args.split:
        out["carve"] = {"mode": args.carve, "val_fraction": args.val_fraction, "seed": args.carve_seed}
    out["ties"] = args.ties
    if args.baseline:
        base_model, _, base_transform, base_tokenizer = _baseline(meta, device, args.base_weights)
        rows["baseline"] = _run(base_model, split, base_transform, base_tokenizer, args, device, "baseline")
        out["baseline"] = _row(rows["baseline"], checkpoint=None, method="zeroshot", **info)
        del base_model
    rows[label] = adapted
    print(format_table({name: r.metrics for name, r in rows.items()}))
    print(format_gap_table(rows))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = evaluate(args)
        if args.json_out:
            path = Path(args.json_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, (json.dumps(_json_safe(out), indent=2) + "\n").encode())
            print(f"wrote {path}")
    except USER_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
