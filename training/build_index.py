"""Embed an image folder of any size into a search index the app and the library load.

    python -m training.build_index --checkpoint checkpoints/ucm-harma --images /data/archive --out indexes/archive

Images are encoded in resumable shards: run the same command again after an interruption. Each
finished shard records its images' size and modification time, so images changed, added or removed
since are encoded again (or dropped) and the others are reused. The result is
``OUT/embeddings.safetensors`` + ``OUT/index.json`` (ids = paths relative to ``--images``), plus
``OUT/ann.faiss`` above the approximate-search threshold. Load it with
``harma.retrieval.EmbeddingIndex.load(OUT)`` or ``python app.py --index OUT``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from harma.checkpoint import read_adapter_config
from harma.retrieval import build_image_index, list_images, model_identity
from training.cli import (
    CliError,
    add_runtime_args,
    load_baseline,
    load_model,
    pick_device,
    resolve_checkpoint,
    run_command,
    setup_logging,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.build_index", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="adapter directory, or a run folder (best/, else last/)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--baseline", action="store_true",
                   help="index with the checkpoint's backbone without adapters (zero-shot)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=4096, help="images per resumable shard, at most (small folders use smaller shards so they resume too)")
    add_runtime_args(p)
    p.add_argument("--overwrite", action="store_true", help="discard an existing index or partial build at --out")
    return p


def run(args: argparse.Namespace) -> Path:
    from tqdm import tqdm

    if args.batch_size < 1 or args.shard_size < 1 or args.num_workers < 0:
        raise CliError("--batch-size and --shard-size must be >= 1 and --num-workers >= 0")
    directory, kind = resolve_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    images = list_images(args.images)
    if not images:
        raise CliError(f"--images {args.images}: no image files found (looked for .jpg .jpeg .png .tif .tiff .bmp .webp)")
    if args.baseline:
        model, _, preprocess, _ = load_baseline(read_adapter_config(directory), device, args.base_weights)
        checkpoint = None
    else:
        model, _, preprocess, _ = load_model(directory, device, args.base_weights)
        checkpoint = directory
    label = "baseline (no adapters)" if args.baseline else f"{directory} ({kind})"
    print(f"model: {label}; {len(images):,} images under {args.images}", flush=True)
    start = time.perf_counter()
    with tqdm(total=len(images), desc="embedding images", unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        index = build_image_index(
            model, preprocess, images, args.out, root=args.images, identity=model_identity(model, checkpoint),
            batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.num_workers,
            device=device, overwrite=args.overwrite, progress=lambda done, _t: bar.update(done - bar.n),
            log=lambda msg: tqdm.write(msg, file=sys.stderr))
    skipped = len(images) - len(index)
    print(f"wrote {args.out}: {len(index):,} images x {index.dim} dims"
          + (f", {skipped} unreadable skipped (listed in index.json)" if skipped else "")
          + (", with a faiss index" if index.uses_ann else "") + f" in {time.perf_counter() - start:.1f}s")
    return Path(args.out)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(lambda: run(args))  # FileExistsError (an index already at --out) is an OSError


if __name__ == "__main__":
    sys.exit(main())
