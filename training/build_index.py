"""Embed an image folder of any size into a search index the app and the library load.

    python -m training.build_index --checkpoint checkpoints/ucm-harma --images /data/archive --out indexes/archive
    torchrun --nproc_per_node 4 -m training.build_index --checkpoint ... --images /data/archive --out indexes/archive

Images are encoded in resumable shards: run the same command again after an interruption. Each
finished shard records its images' size and modification time, so images changed, added or removed
since are encoded again (or dropped) and the others are reused. Under ``torchrun`` (one machine or
several, through its rendezvous) the processes share out the shards still to encode, every
N-th to each, and rank 0 builds the index once all are written; ``--no-merge`` stops after the
shards and ``--merge-only`` builds the index from them later (no model is loaded). Below 100,000
images the result is ``OUT/embeddings.safetensors`` + ``OUT/index.json`` (exact search); above, an
on-disk archive index of the kind ``--memory-gb`` allows (ids = paths relative to ``--images``).
Load either with ``harma.retrieval.load_index(OUT)`` or ``python app.py --index OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from harma.checkpoint import read_adapter_config
from harma.errors import HarmaError
from harma.io import INDEX_FILE
from harma.retrieval import ArchiveIndex, list_images, model_identity
from harma.retrieval.folder import encode_shards, image_shards, merge_shards, prepare_build
from harma.retrieval.shards import assign, check_manifest, manifest_identity, record_assignment, recorded_size
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
from training.distributed import cleanup, init_distributed

# A rank that finishes its shards waits at a barrier for the slowest; torch's default (30 min for
# gloo) is too short when machines differ in speed, so the job's own steps use a group with this one.
WAIT = timedelta(days=7)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.build_index", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="adapter directory, or a run folder (best/, else last/); "
                                        "not needed with --merge-only")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--baseline", action="store_true",
                   help="index with the checkpoint's backbone without adapters (zero-shot)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=4096,
                   help="images per resumable shard, at most (small folders use smaller shards so they resume too)")
    p.add_argument("--memory-gb", type=float, default=8.0,
                   help="RAM budget of an index above 100,000 images (default 8): IVF-Flat while its vectors "
                        "fit, else IVF-PQ with an SQ8 re-rank (as autofaiss's max_index_memory_usage)")
    p.add_argument("--merge-only", action="store_true",
                   help="build the index from the shards already in OUT/.shards; encodes nothing")
    p.add_argument("--no-merge", action="store_true",
                   help="encode this run's shards and stop (machines without a shared folder: copy the shards "
                        "together, then --merge-only)")
    add_runtime_args(p)
    p.add_argument("--overwrite", action="store_true", help="discard an existing index or partial build at --out")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers and flag combinations, naming the flag, before anything is loaded."""
    if args.batch_size < 1 or args.shard_size < 1 or args.num_workers < 0:
        raise CliError("--batch-size and --shard-size must be >= 1 and --num-workers >= 0")
    if not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
        raise CliError(f"--memory-gb {args.memory_gb}: must be a positive number of GB")
    if args.merge_only and (args.no_merge or args.overwrite):
        raise CliError("--merge-only cannot be combined with --no-merge or --overwrite")
    if not args.merge_only and not args.checkpoint:
        raise CliError("--checkpoint is required (except with --merge-only)")


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without one) and the two steps the ranks
    take together: rank 0's decision sent to all, and waiting until every rank has written its shards."""

    def __init__(self) -> None:
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.group = dist.new_group(backend="gloo", timeout=WAIT) if self.world > 1 else None

    def broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def say(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.world == 1 else (lambda msg: log(f"[rank {self.rank}] {msg}"))


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _summary(index: Any, n_images: int, out: str, seconds: float) -> str:
    skipped = n_images - len(index)
    kind = (index.plan.factory_string() if isinstance(index, ArchiveIndex)
            else "exact search" + (", with a faiss index" if index.uses_ann else ""))
    return (f"wrote {out}: {len(index):,} images x {index.dim} dims"
            + (f", {skipped} unreadable skipped (listed in index.json)" if skipped else "")
            + f" ({kind}) in {seconds:.1f}s")


def merge_only(args: argparse.Namespace, shards: Any) -> Path:
    """``--merge-only``: the index from the shards on disk, with the identity they were written for."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise CliError("--merge-only runs in one process: python -m training.build_index --merge-only ...")
    if (Path(args.out) / INDEX_FILE).is_file():
        raise CliError(f"--out {args.out} already holds an index: nothing to merge")
    size = recorded_size(Path(args.out))  # the build's shard size, whatever --shard-size says now
    shards = dataclasses.replace(shards, size=size) if size else shards
    print(f"merging the shards of {len(shards.paths):,} images in {args.out}", flush=True)
    return merge(args, shards, manifest_identity(Path(args.out)), time.perf_counter())


def merge(args: argparse.Namespace, shards: Any, identity: dict, start: float) -> Path:
    """The index from the finished shards (the plan's kind and reason printed), with a progress bar
    over an archive index's add pass."""
    from tqdm import tqdm

    bars: list = []  # made on the archive's first progress call: an exact index has no add pass

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="adding to the index", unit="row", file=sys.stderr,
                             dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        index = merge_shards(shards, identity=identity, memory_gb=args.memory_gb, progress=progress,
                             log=lambda msg: tqdm.write(msg, file=sys.stdout))
    finally:
        for bar in bars:
            bar.close()
    print(_summary(index, len(shards.paths), args.out, time.perf_counter() - start), flush=True)
    return Path(args.out)


def build(args: argparse.Namespace, shards: Any, ranks: Ranks, device: Any) -> Optional[Path]:
    """Rank 0 decides what is left to encode, every rank encodes its share, rank 0 merges."""
    from tqdm import tqdm

    directory, kind = resolve_checkpoint(args.checkpoint)
    if args.baseline:
        model, _, preprocess, _ = load_baseline(read_adapter_config(directory), device, args.base_weights)
        checkpoint = None
    else:
        model, _, preprocess, _ = load_model(directory, device, args.base_weights)
        checkpoint = directory
    identity = _normal(model_identity(model, checkpoint))
    rank, world = ranks.rank, ranks.world
    say = ranks.say(lambda msg: tqdm.write(msg, file=sys.stderr))
    if rank == 0:
        label = "baseline (no adapters)" if args.baseline else f"{directory} ({kind})"
        print(f"model: {label}; {len(shards.paths):,} images under {args.images}"
              + (f"; {world} processes" if world > 1 else ""), flush=True)
    start = time.perf_counter()
    todo, problem = None, None
    if rank == 0:
        try:
            todo = prepare_build(shards, identity, overwrite=args.overwrite, log=say)
        except (HarmaError, OSError) as e:
            if world == 1:
                raise
            problem = e
    todo, stop, first, listing = ranks.broadcast(
        (todo, str(problem) if problem else None, identity, shards.fingerprint()))
    if problem is not None:
        raise problem
    if stop is not None:
        raise CliError(f"rank 0 stopped: {stop}")
    if first != identity:
        raise CliError(f"rank {rank} loaded a different model than rank 0 ({args.checkpoint}): every machine "
                       "must hold the same checkpoint and base weights")
    if listing != shards.fingerprint():
        raise CliError(f"rank {rank} lists other images under {args.images} than rank 0: every machine must see "
                       "the same image folder")
    if rank > 0:
        check_manifest(shards.out, identity)  # rank 0's on a shared folder; written here on a disk of its own
    parts = assign(todo, world)
    if rank == 0:
        record_assignment(shards, parts)
    mine = parts[rank]
    if world > 1 or len(mine) < len(shards):
        say(f"encoding {len(mine)} of {len(shards)} shards" + (f": {', '.join(map(str, mine[:20]))}"
                                                            + (", ..." if len(mine) > 20 else "") if mine else ""))
    desc = "embedding images" + (f" (rank 0's share; {world} processes)" if world > 1 else "")
    with tqdm(desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, disable=rank != 0) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        encode_shards(model, preprocess, shards, mine, pending=todo, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=device, progress=progress, log=say)
    ranks.barrier()
    if rank != 0:
        return None
    if args.no_merge:
        print(f"shards written to {shards.folder} in {time.perf_counter() - start:.1f}s; build the index with "
              f"--merge-only once every machine's shards are there", flush=True)
        return None
    return merge(args, shards, identity, start)


def run(args: argparse.Namespace) -> Optional[Path]:
    check_args(args)
    images = list_images(args.images)
    if not images:
        raise CliError(f"--images {args.images}: no image files found "
                       "(looked for .jpg .jpeg .png .tif .tiff .bmp .webp)")
    shards = image_shards(images, args.out, root=args.images, shard_size=args.shard_size)
    if args.merge_only:
        return merge_only(args, shards)
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None)
    if world > 1:
        init_distributed(args.device)
    try:
        return build(args, shards, Ranks(), device)
    finally:
        cleanup()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(lambda: run(args))  # FileExistsError (an index already at --out) is an OSError


if __name__ == "__main__":
    sys.exit(main())
