"""Find things inside a large georeferenced scene: the chips that best match a text query.

    python -m training.search_scene --checkpoint checkpoints/ucm-harma --scene ortho.tif \\
        --query "a bridge over a river" --top-k 10 --geojson hits.geojson

The scene is cut into a grid of chips sized in metres on the ground (``--chip-m``, ``--stride-m``),
read in windows (never whole), each chip resampled to the model's input. Chip embeddings are cached
under ``--cache-dir`` (default ``.cache/scene``), keyed by the file's hash, the model and the grid: a
later query, or the app, reuses them at once, and a killed run resumes where it stopped. Prints the
top chips (rank, score, centre lon/lat) and writes them as an RFC 7946 GeoJSON FeatureCollection.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from harma.checkpoint import read_adapter_config
from harma.retrieval.identity import cache_key
from harma.scene import Scene, SceneIndex, chip_grid, to_geojson, top_k
from harma.scene.index import EMBEDDINGS_FILE
from training.cli import (
    CliError,
    load_baseline,
    load_model,
    pick_device,
    resolve_checkpoint,
    run_command,
    setup_logging,
    write_json,
)
from training.distributed import barrier, cleanup, init_distributed

DEFAULT_CACHE = Path(".cache") / "scene"
MIN_CHIP_PX = 16  # chips with fewer pixels a side than this show nothing a model can recognise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.search_scene", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="adapter directory, or a run folder (best/, else last/)")
    p.add_argument("--scene", required=True, help="georeferenced raster (GeoTIFF) of any size")
    p.add_argument("--query", required=True, help="what to look for, in words")
    p.add_argument("--top-k", type=int, default=10, help="chips to print and export (default 10)")
    p.add_argument("--chip-m", type=float, default=70.0, help="chip side on the ground, metres (default 70)")
    p.add_argument("--stride-m", type=float, help="step between chips, metres (default half of --chip-m)")
    p.add_argument("--min-valid", type=float, default=0.5,
                   help="skip chips with less than this share of valid (not no-data) pixels (default 0.5)")
    p.add_argument("--bands", help="0-based band numbers shown as R,G,B, e.g. 2,1,0 for a B,G,R scene "
                                   "(default $HARMA_BANDS, else the first three)")
    p.add_argument("--geojson", help="write the top chips here as a GeoJSON FeatureCollection (EPSG:4326)")
    p.add_argument("--baseline", action="store_true",
                   help="search with the checkpoint's backbone without adapters (zero-shot)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"chip-embedding cache (default {DEFAULT_CACHE})")
    p.add_argument("--batch-size", type=int, default=32, help="chips per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--base-weights", help="local path of the base-weights file, if it moved")
    return p


def parse_bands(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"2,1,0"`` to ``(2, 1, 0)``; None for None. Three non-negative integers, else a :class:`CliError`."""
    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3 or min(bands) < 0:
        raise CliError(f"--bands {text!r}: expected three 0-based band numbers, e.g. 2,1,0")
    return bands


def check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers with the flag named, before anything is loaded."""
    if args.top_k < 1:
        raise CliError(f"--top-k {args.top_k}: must be >= 1")
    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size}: must be >= 1")
    for flag, value in (("--chip-m", args.chip_m), ("--stride-m", args.stride_m)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CliError(f"{flag} {value}: must be a positive number of metres")
    if not 0.0 <= args.min_valid <= 1.0:
        raise CliError(f"--min-valid {args.min_valid}: must be between 0 and 1")
    if not args.query.strip():
        raise CliError("--query is empty: say what to look for, e.g. --query 'a bridge over a river'")


def check_chip_size(scene: Scene, chip_m: float) -> None:
    """Refuse chips of fewer than :data:`MIN_CHIP_PX` pixels a side (a 70 m chip on a 30 m Landsat scene is
    2 px: millions of chips that show nothing), naming the smallest ``--chip-m`` that works."""
    px = max(scene.pixel_size_m)
    if chip_m / px < MIN_CHIP_PX:
        raise CliError(f"--chip-m {chip_m:g}: a chip would be about {chip_m / px:.0f} px a side on this scene "
                       f"({px:.3g} m pixels); use --chip-m {math.ceil(MIN_CHIP_PX * px):g} or more")


def run(args: argparse.Namespace) -> list[dict]:
    check_args(args)
    bands = parse_bands(args.bands)
    directory, kind = resolve_checkpoint(args.checkpoint)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None)
    if not Path(args.scene).is_file():
        raise CliError(f"--scene {args.scene}: no such file (or not a file)")
    scene = Scene.open(args.scene, bands=bands)
    check_chip_size(scene, args.chip_m)
    grid = chip_grid(scene, chip_m=args.chip_m, stride_m=args.stride_m, min_valid=args.min_valid)
    if not grid.chips:
        raise CliError(f"--scene {args.scene}: every {args.chip_m:g} m chip is mostly no-data (under --min-valid "
                       f"{args.min_valid:g} valid pixels): nothing to search")
    if world > 1:
        init_distributed(args.device)
    try:
        return search(args, directory, kind, device, scene, grid, rank, world)
    finally:
        cleanup()


def cached(model, scene: Scene, grid, cache_dir: str, checkpoint: Optional[Path]) -> bool:
    """Whether ``cache_dir`` already holds this scene's, grid's and model's joined chip embeddings (a shard
    build would compute them again: the joined file replaces the chunks)."""
    parts = SceneIndex.cache_parts(model, scene, grid, checkpoint)
    return (Path(cache_dir) / cache_key(parts) / EMBEDDINGS_FILE).is_file()


def search(args: argparse.Namespace, directory: Path, kind: str, device, scene: Scene, grid, rank: int,
           world: int) -> list[dict]:
    """Embed (or load) the chips, score the query, print the top chips and write the GeoJSON. Under
    torchrun each process embeds every ``world``-th chunk of chips into the shared cache and rank 0
    joins them and answers."""
    from tqdm import tqdm

    if args.baseline:
        model, _, preprocess, tokenizer = load_baseline(read_adapter_config(directory), device, args.base_weights)
        checkpoint, label = None, f"{directory} baseline (no adapters)"
    else:
        model, _, preprocess, tokenizer = load_model(directory, device, args.base_weights)
        checkpoint, label = directory, str(directory)
    if rank == 0:
        print(f"model: {'baseline (no adapters)' if args.baseline else f'{directory} ({kind})'}; scene {args.scene}: "
              f"{scene.width:,} x {scene.height:,} px, {scene.crs}; {len(grid.chips):,} chips of {grid.chip_m:g} m "
              f"({grid.chip_px[0]} x {grid.chip_px[1]} px), stride {grid.stride_m:g} m"
              + (f"; {world} processes" if world > 1 else ""), flush=True)
    start = time.perf_counter()
    with tqdm(total=len(grid.chips), desc="embedding chips", unit="chip", file=sys.stderr, dynamic_ncols=True,
              disable=rank != 0) as bar:
        build = dict(cache_dir=args.cache_dir, batch_size=args.batch_size, checkpoint=checkpoint,
                     progress=lambda done, _t: bar.update(done - bar.n))
        if world > 1 and not cached(model, scene, grid, args.cache_dir, checkpoint):
            SceneIndex.build(model, preprocess, scene, grid, shard=(rank, world), **build)
            barrier()
        index = SceneIndex.build(model, preprocess, scene, grid, **build) if rank == 0 else None
    barrier()
    if index is None:
        return []
    how = "loaded from the cache" if index.cached and world == 1 else "embedded"
    print(f"{len(index):,} chips {how} ({args.cache_dir}) in {time.perf_counter() - start:.1f}s")
    scores = index.scores_for_text(tokenizer, args.query)
    ids = top_k(scores, min(args.top_k, len(index)))
    rows = []
    for rank_, i in enumerate(ids, 1):
        lon, lat = grid.chips[i].centre_lonlat(scene)
        rows.append(dict(rank=rank_, chip=i, score=float(scores[i]), lon=lon, lat=lat))
    print(f"top {len(rows)} chips for {args.query!r} (centre lon/lat, EPSG:4326):")
    print(f"{'rank':>4}  {'score':>7}  {'chip':>6}  {'lon':>12}  {'lat':>11}")
    for r in rows:
        print(f"{r['rank']:>4}  {r['score']:7.4f}  {r['chip']:>6}  {r['lon']:12.7f}  {r['lat']:11.7f}")
    if args.geojson:
        out = write_json(args.geojson, to_geojson(scene, grid, ids, scores, model=label, query=args.query))
        print(f"wrote {out}: {len(ids)} chips as a GeoJSON FeatureCollection (EPSG:4326)")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
