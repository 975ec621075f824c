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
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from harma.checkpoint import read_adapter_config, weights_sha256
from harma.config import from_dict
from harma.errors import CheckpointError, ConfigError
from harma.io import CONFIG_NAME
from harma.data import CARVES, RetrievalSplit
from harma.encode import EvalResult, bar_progress, evaluate_split
from harma.metrics import TIE_RULES, format_table
from training.cli import (
    CliError,
    add_runtime_args,
    load_baseline,
    load_model,
    pick_device,
    resolve_checkpoint,
    resolve_split,
    run_command,
    setup_logging,
    write_json,
)
from training.config import DataConfig

DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}
GAP_COLUMNS = ("centroid_distance", "uniformity_joint", "knn_modality_purity", "linear_probe_accuracy")
# Data settings an evaluation takes from the checkpoint's recorded data config, else the trainer's default.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)
            if f.name in ("val_fraction", "carve_seed", "carve", "carve_class_size", "clean_captions", "max_words",
                          "captions_per_image", "allow_empty")}


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
    add_runtime_args(p)
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


def data_defaults(meta: dict[str, Any], where: Any = CONFIG_NAME) -> dict[str, Any]:
    """Data settings the trainer recorded under ``extra.data`` (or ``extra.config.data``), if any;
    a value of the wrong type raises :class:`CheckpointError` naming ``where`` and the field."""
    extra = meta.get("extra") or {}
    data = extra.get("data")
    if not isinstance(data, dict):
        data = (extra.get("config") or {}).get("data") if isinstance(extra.get("config"), dict) else None
    if not isinstance(data, dict):
        return {}
    try:
        from_dict(DataConfig, {k: v for k, v in data.items() if k in DATA_FIELDS}, "extra.data")
        if not isinstance(data.get("root_config", ""), (str, type(None))):
            raise ConfigError(f"extra.data.root_config: expected str, got {data['root_config']!r}")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return data


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

    # the total comes with the first update: images plus distinct captions (equal ones are encoded once)
    with tqdm(total=None, desc=f"encode {label}", unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        return evaluate_split(
            model, split, transform, tokenizer, clean_captions=args.clean_captions, max_words=args.max_words,
            batch_size=args.batch_size, device=device, num_workers=args.num_workers,
            progress=bar_progress(bar), ties=args.ties,
        )


def _row(res: EvalResult, **info: Any) -> dict[str, Any]:
    return {**res.to_dict(), **info}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve inputs, evaluate, print the tables; returns the JSON-ready results."""
    directory, kind = resolve_checkpoint(args.checkpoint)
    meta = read_adapter_config(directory)
    recorded = data_defaults(meta, directory / CONFIG_NAME)
    if recorded and "carve" not in recorded:  # trained before block carving existed: it carved at random
        recorded = {**recorded, "carve": "random"}
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, recorded.get(key, default))
    if args.data is None:
        args.data = recorded_root(recorded)
    if args.carve == "none":  # trained with no validation (data.carve=none): no split of its own to default to
        if args.split is None:
            raise CliError(f"{directory} was trained with no validation split (data.carve=none): pass --split, "
                           "e.g. --split test")
        args.carve = DEFAULTS["carve"]
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
    model, _, transform, tokenizer = load_model(directory, device, args.base_weights)
    label = f"adapted ({' and '.join(off)} adapters off)" if off else "adapted"
    with model.disable_adapters(*off) if off else contextlib.nullcontext():
        adapted = _run(model, split, transform, tokenizer, args, device, label)
    del model
    rows: dict[str, EvalResult] = {}
    out = _row(adapted, checkpoint=directory.as_posix(), method=meta["method"], **info)
    out["checkpoint_kind"] = kind
    sha = weights_sha256(directory)  # which weights these numbers belong to (a re-shipped folder is new)
    if sha:
        out["weights_sha256"] = sha
    if off:
        out["disabled_adapters"] = off
    out["clean_captions"] = bool(args.clean_captions)
    if ":" in args.split:
        out["carve"] = {"mode": args.carve, "val_fraction": args.val_fraction, "seed": args.carve_seed}
    out["ties"] = args.ties
    if args.baseline:
        base_model, _, base_transform, base_tokenizer = load_baseline(meta, device, args.base_weights)
        rows["baseline"] = _run(base_model, split, base_transform, base_tokenizer, args, device, "baseline")
        out["baseline"] = _row(rows["baseline"], checkpoint=None, method="zeroshot", **info)
        del base_model
    rows[label] = adapted
    print(format_table({name: r.metrics for name, r in rows.items()}))
    print(format_gap_table(rows))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(lambda: _evaluate_and_write(args))


def _evaluate_and_write(args: argparse.Namespace) -> None:
    out = evaluate(args)
    if args.json_out:
        print(f"wrote {write_json(args.json_out, out)}")


if __name__ == "__main__":
    sys.exit(main())
