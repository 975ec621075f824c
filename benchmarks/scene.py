"""Benchmark section ``scene``: search inside a georeferenced scene (``harma.scene``), on the real models.

- **demo scene** (the bundled Manila orthophoto, else ``../shared/datasets/scenes``): seconds to embed
  every chip from an empty cache, per model (the zero-shot baseline and the default adapted
  ``checkpoints/ucm-harma``), seconds to load them back from the cache, and the p50 of a cached text
  query to both models' heatmaps (scores, score map, heatmap image, for each of the two models);
- **hit@5** on the demo scene for three queries against the chip labels in ``fixtures/manila_chips.json``
  (70 m chips, 35 m stride: the chips that show each thing), per model;
- **large scene**: a generated 20,000 x 20,000 tiled, JPEG-compressed GeoTIFF (0.5 m, UTM), indexed in a
  child process whose peak memory above its resting size (model loaded, scene open) is measured
  (``VmHWM`` reset through ``/proc/self/clear_refs``, else ``ru_maxrss``). The full 70 m grid has about
  80,000 chips, hours on 2 cores: an evenly spread sample of ``LARGE_CHIPS`` chips is embedded
  (their reads span the whole file) and chips/s, with the full grid's projected time, are printed.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harma.checkpoint import read_adapter_config
from harma.scene import Scene, SceneIndex, chip_grid, heatmap_image, score_map, top_k
from training.cli import load_baseline, load_model

from .sections import ROOT, Skip

MANILA = "manila_pasig_bridge_oam.tif"
SHARED_SCENES = ROOT.parent / "shared" / "datasets" / "scenes"
ADAPTED = ROOT / "checkpoints" / "ucm-harma"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "manila_chips.json"
CHIP_M, STRIDE_M = 70.0, 35.0
OTHER_QUERIES = ["a river", "trees", "a road", "a railway", "a football field", "an airport", "a harbour"]
LARGE_SIDE, LARGE_PX_M, LARGE_CHIPS, LARGE_TILE = 20_000, 0.5, 256, 512
MAX_EXTRA_MB = 500


def demo_scene() -> Path:
    """The bundled demo scene when the app ships one (assets/demo/), else the shared copy."""
    bundled = sorted((ROOT / "assets" / "demo").rglob("manila*.tif"))
    if bundled:
        return bundled[0]
    if (SHARED_SCENES / MANILA).is_file():
        return SHARED_SCENES / MANILA
    raise Skip(f"the demo scene is neither under assets/demo/ nor at {SHARED_SCENES / MANILA}")


def models(device: torch.device) -> list[tuple[str, Any, Any, Any, Any]]:
    """(name, model, preprocess, tokenizer, checkpoint) for the baseline and the default adapted model."""
    if not (ADAPTED / "adapter_config.json").is_file():
        raise Skip(f"the default model's checkpoint {ADAPTED} is missing")
    base, _, pre_b, tok_b = load_baseline(read_adapter_config(ADAPTED), device, None)
    adapted, _, pre_a, tok_a = load_model(ADAPTED, device, None)
    return [("baseline", base.eval(), pre_b, tok_b, None), ("ucm-harma", adapted.eval(), pre_a, tok_a, ADAPTED)]


def hit_at(scores: torch.Tensor, relevant: set[int], k: int = 5) -> tuple[int, float]:
    """(1 if a relevant chip is in the top k else 0, precision at k)."""
    got = [i for i in top_k(scores, k) if i in relevant]
    return int(bool(got)), len(got) / k


def same_windows(grid, windows: list, tolerance: int = 8) -> bool:
    """Whether ``grid`` has the chips ``windows`` lists, within ``tolerance`` pixels (rounding of the
    ground pixel size may move a chip by a pixel or two without changing what it shows)."""
    return len(grid.chips) == len(windows) and all(
        max(abs(a - b) for a, b in zip(c.window, w)) <= tolerance for c, w in zip(grid.chips, windows))


def scene(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    if quick:
        raise Skip("not in --quick (real models, a 20,000 x 20,000 scene)")
    path = demo_scene()
    labels = json.loads(FIXTURE.read_text())
    sc = Scene.open(path)
    if sc.sha256 != labels["sha256"]:
        raise Skip(f"{path} is not the scene {FIXTURE.name} labels (sha256 differs)")
    grid = chip_grid(sc, chip_m=CHIP_M, stride_m=STRIDE_M)
    if not same_windows(grid, labels["windows"]):
        raise Skip(f"{FIXTURE.name} was labelled on another grid ({labels['num_chips']} chips) than the one "
                   f"harma.scene.chip_grid makes now ({len(grid.chips)} chips): label the chips again")
    rows: list[dict] = []
    partial = labels.get("partial", {})
    sets = {(q, False): set(ids) for q, ids in labels["queries"].items()}
    sets.update({(q, True): set(ids) | set(partial.get(q, ())) for q, ids in labels["queries"].items()})
    indexes, hits = {}, {(q, p): {"what": f"hit@5 / P@5: {q!r}" + (" (labels + partial)" if p else ""),
                                  "chips labelled": len(ids)} for (q, p), ids in sets.items()}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as cache:
        for name, model, pre, tok, ckpt in models(device):
            t0 = time.perf_counter()
            SceneIndex.build(model, pre, sc, grid, cache_dir=cache, checkpoint=ckpt)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            idx = SceneIndex.build(model, pre, sc, grid, cache_dir=cache, checkpoint=ckpt)
            cached = time.perf_counter() - t0
            indexes[name] = (idx, tok)
            rows.append({"what": f"demo scene, {name}: embed all chips", "chips": len(grid.chips),
                         "first embed s": first, "from cache s": cached})
            for (q, p), relevant in sets.items():
                hit, prec = hit_at(idx.scores_for_text(tok, q), relevant)
                hits[q, p][name] = f"{hit} / {prec:.1f}"
        text, maps = [], []
        for q in [*labels["queries"], *OTHER_QUERIES] * 2:
            for idx, tok in indexes.values():
                t0 = time.perf_counter()
                scores = idx.scores_for_text(tok, q)
                t1 = time.perf_counter()
                heatmap_image(sc, score_map(sc, grid, scores))
                text.append(t1 - t0)
                maps.append(time.perf_counter() - t1)
        both = [text[i] + maps[i] + text[i + 1] + maps[i + 1] for i in range(0, len(text), 2)]
        rows.append({"what": "cached query -> both models' heatmaps", "queries": len(both),
                     "p50 ms": 1000 * statistics.median(both), "max ms": 1000 * max(both),
                     "text scores p50 ms (one model)": 1000 * statistics.median(text),
                     "score map + heatmap p50 ms (one model)": 1000 * statistics.median(maps)})
    rows += list(hits.values())
    rows.append(large_scene(device))
    return rows


# -- the generated large scene ---------------------------------------------------------------------------
def write_large(path: Path, side: int = LARGE_SIDE, tile: int = LARGE_TILE) -> None:
    """A ``side`` x ``side`` RGB GeoTIFF written tile by tile (JPEG, 512-px tiles): smooth fields with noise."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:tile, 0:tile] / tile
    textures = []
    for k in range(8):
        f = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(2 * np.pi * (f[c] * xx + k * yy) + c) for c in range(3)])
        textures.append(np.clip(120 + 60 * base + rng.normal(0, 12, base.shape), 1, 255).astype(np.uint8))
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(400000.0, 4600000.0, LARGE_PX_M, LARGE_PX_M), tiled=True,
                   blockxsize=tile, blockysize=tile, compress="jpeg", photometric="ycbcr", BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, side, tile):
            for c in range(0, side, tile):
                w, h = min(tile, side - c), min(tile, side - r)
                dst.write(textures[(r // tile * 7 + c // tile) % 8][:, :h, :w], window=Window(c, r, w, h))


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def index_large(path: str, device: str, n_chips: int) -> dict:
    """In a child process: open the scene, grid it, embed ``n_chips`` spread over it; memory and speed."""
    torch.set_grad_enabled(False)
    model, _, pre, _ = load_model(ADAPTED, torch.device(device), None)
    sc = Scene.open(path)
    t0 = time.perf_counter()
    grid = chip_grid(sc, chip_m=CHIP_M, stride_m=STRIDE_M, min_valid=0.0)
    grid_s = time.perf_counter() - t0
    step = max(1, len(grid.chips) // n_chips)
    sample = [dataclasses.replace(c, index=j) for j, c in enumerate(grid.chips[::step][:n_chips])]
    sub = dataclasses.replace(grid, chips=sample)
    rest, _ = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        SceneIndex.build(model, pre, sc, sub, cache_dir=cache, checkpoint=ADAPTED)
        secs = time.perf_counter() - t0
    _, peak = _rss_mb()
    return {"full grid chips": len(grid.chips), "grid s": grid_s, "chips": len(sample), "embed s": secs,
            "chips/s": len(sample) / secs, "full grid h (projected)": len(grid.chips) / (len(sample) / secs) / 3600,
            "rest MB": rest, "extra peak MB": peak - rest}


def large_scene(device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.tif"
        t0 = time.perf_counter()
        write_large(path)
        written = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        code = ("import json, sys; from benchmarks.scene import index_large; "
                f"print(json.dumps(index_large({str(path)!r}, {str(device)!r}, {LARGE_CHIPS})))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the large-scene child failed: {proc.stderr.strip()[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"what": f"generated {LARGE_SIDE:,} x {LARGE_SIDE:,} GeoTIFF ({size_mb:.0f} MB, written in {written:.0f} s)",
            **res, f"under {MAX_EXTRA_MB} MB": res["extra peak MB"] < MAX_EXTRA_MB}
