"""Embedding throughput of ``training.build_index`` with 1 and 2 processes (torchrun, gloo) on the CPU.

    python -m benchmarks.embed_scale                       # the default model over assets/demo/images
    python -m benchmarks.embed_scale --images /data/chips --processes 1 2 4

Each run is the real command in a child process, into a fresh folder: ``python -m
training.build_index`` for 1 process, ``python -m torch.distributed.run --standalone
--nproc_per_node N -m training.build_index`` for N. The seconds are the ones the command prints
(rank 0: from the loaded model to the written index, so they include the wait for the slowest rank
and the merge, not the interpreter and model start-up, which are given apart as ``wall_s``).
torchrun gives each process one OpenMP thread unless ``OMP_NUM_THREADS`` is set; the 1-process run
keeps torch's default (all cores), so on a 2-core machine both use the two cores. On a machine that
other jobs share, one process of several OpenMP threads slows down far more than several processes
of one thread (its threads wait for each other): ``--threads 1`` (``OMP_NUM_THREADS`` for every run)
compares process counts alone. Prints one JSON line; the embeddings of every run are compared with
the first run's (largest difference).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "ucm-harma"
DEFAULT_IMAGES = ROOT / "assets" / "demo" / "images"
DONE = re.compile(r"wrote .*: ([\d,]+) images x (\d+) dims.* in ([\d.]+)s")


def run_build(processes: int, args: argparse.Namespace, out: Path) -> dict:
    """One build with ``processes`` processes; its seconds (as printed), images/s and wall time."""
    command = ["-m", "training.build_index", "--checkpoint", str(args.checkpoint), "--images", str(args.images),
               "--out", str(out), "--device", "cpu", "--batch-size", str(args.batch_size),
               "--shard-size", str(args.shard_size), "--num-workers", str(args.num_workers)]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    found = DONE.search(proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{processes}-process build failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    images, seconds = int(found.group(1).replace(",", "")), float(found.group(3))
    return {"processes": processes, "images": images, "seconds": seconds,
            "images_per_s": round(images / seconds, 2), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.embed_scale", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="adapter folder (default ucm-harma)")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="image folder (default the demo gallery)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to run (default 1 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=16,
                   help="images per shard (default 16: the 210 demo images make 14 shards, an even split, as an "
                        "archive's thousands of shards are)")
    p.add_argument("--num-workers", type=int, default=0, help="decoding workers per process (default 0)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process (default: torch's for 1 "
                                               "process, 1 each under torchrun)")
    args = p.parse_args(argv)
    from harma.retrieval import load_index

    runs, first = [], None
    with tempfile.TemporaryDirectory(prefix="embed-scale-") as tmp:
        for n in args.processes:
            runs.append(run_build(n, args, Path(tmp) / f"p{n}"))
            embeddings = load_index(Path(tmp) / f"p{n}").embeddings
            first = embeddings if first is None else first
            runs[-1]["max_abs_diff_vs_first"] = float((embeddings - first).abs().max())
    base = runs[0]["images_per_s"]
    for r in runs:
        r["speedup"] = round(r["images_per_s"] / base, 2)
    print(json.dumps({"benchmark": "embed_scale", "checkpoint": str(args.checkpoint), "images": str(args.images),
                      "cpus": os.cpu_count(), "threads": args.threads,
                      "torch_threads_1_process": args.threads or torch.get_num_threads(),
                      "batch_size": args.batch_size, "shard_size": args.shard_size, "num_workers": args.num_workers,
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
