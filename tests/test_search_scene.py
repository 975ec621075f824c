"""``python -m training.search_scene`` called in process as ``main([...])`` on small generated GeoTIFFs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from rasterio.transform import from_origin

from benchmarks.scene import FIXTURE, SHARED_SCENES, hit_at, same_windows
from harma.scene import Scene, SceneIndex, chip_grid, top_k
from tests.test_evaluate_cli import setup  # noqa: F401  (module fixture: tiny checkpoint + base weights)
from tests.test_scene import write_scene
from training.search_scene import main

QUERY = "a bridge over a river"


def write_tif(path, width=96, height=96, crs="EPSG:32633", px=1.0, seed=0, nodata=None, fill=None):
    """A random 3-band uint8 GeoTIFF, ``px`` metres a pixel, with a bright square planted in it (or all ``fill``)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (3, height, width), dtype=np.uint8)
    data[:, 8:24, 40:56] = 250
    if fill is not None:
        data[:] = fill
    return write_scene(path, data, crs=crs, transform=from_origin(500000.0, 4500000.0, px, px), nodata=nodata)


def _args(s, scene, tmp_path, *extra):
    return ["--checkpoint", str(s["adapters"]), "--scene", str(scene), "--query", QUERY,
            "--chip-m", "32", "--stride-m", "16", "--device", "cpu", "--batch-size", "8",
            "--cache-dir", str(tmp_path / "cache"), *extra]


def test_prints_top_chips_and_writes_geojson_matching_the_library(setup, tmp_path, capsys):  # noqa: F811
    s = setup
    scene_path = write_tif(tmp_path / "scene.tif")
    out = tmp_path / "hits" / "hits.geojson"
    assert main(_args(s, scene_path, tmp_path, "--top-k", "3", "--geojson", str(out))) == 0
    printed = capsys.readouterr().out
    scene = Scene.open(scene_path)
    grid = chip_grid(scene, chip_m=32.0, stride_m=16.0)
    index = SceneIndex.build(s["model"], s["transform"], scene, grid, cache_dir=None, checkpoint=s["adapters"])
    scores = index.scores_for_text(s["tokenizer"], QUERY)
    want = top_k(scores, 3)
    rows = [line.split() for line in printed.splitlines() if re.fullmatch(r"\s*\d+\s+-?[\d.]+\s+\d+\s+\S+\s+\S+", line)]
    assert [int(r[0]) for r in rows] == [1, 2, 3] and [int(r[2]) for r in rows] == want
    for r, i in zip(rows, want):
        assert float(r[1]) == pytest.approx(float(scores[i]), abs=1e-4)
        lon, lat = grid.chips[i].centre_lonlat(scene)
        assert (float(r[3]), float(r[4])) == pytest.approx((lon, lat), abs=1e-6)
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 3
    props = [f["properties"] for f in fc["features"]]
    assert [p["rank"] for p in props] == [1, 2, 3] and [p["chip"] for p in props] == want
    assert all(p["query"] == QUERY for p in props) and all(str(s["adapters"]) in p["model"] for p in props)
    lon0, lat0 = fc["features"][0]["geometry"]["coordinates"][0][0]
    assert 10 < lon0 < 20 and 40 < lat0 < 41  # UTM 33N near (15 E, 40.6 N), lon/lat order

    # a later query reuses the cached chip embeddings: nothing new is written to the cache
    cached = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert cached and main(_args(s, scene_path, tmp_path, "--query", "dense buildings", "--top-k", "2")) == 0
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    # the zero-shot backbone ranks with other embeddings, cached beside the adapted ones
    assert main(_args(s, scene_path, tmp_path, "--baseline", "--top-k", "3", "--geojson", str(out))) == 0
    base = json.loads(out.read_text())["features"]
    assert [f["properties"]["score"] for f in base] != [p["score"] for p in props]
    assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file()]) > len(cached)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "embedding chips" not in line]  # the progress bar, if it started
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("case, needle", [
    ("text", "scene.tif"), ("no_crs", "CRS"), ("all_nodata", "no-data"), ("one_pixel", "1 x 1"), ("small", "chip"), ("missing", "no such file"),
    ("coarse", "--chip-m 32: a chip would be about 3 px"),
])
def test_bad_scenes_give_one_error_line(setup, tmp_path, capsys, case, needle):  # noqa: F811
    path = tmp_path / "scene.tif"
    if case == "text":
        path.write_text("not a raster")
    elif case == "no_crs":
        write_tif(path, crs=None)
    elif case == "all_nodata":
        write_tif(path, nodata=0, fill=0)
    elif case == "one_pixel":
        write_tif(path, width=1, height=1)
    elif case == "coarse":
        write_tif(path, px=10.0)  # 10 m pixels: a 32 m chip is 3 px
    elif case == "small":
        write_tif(path, width=20, height=20)  # 20 m < one 32 m chip
    assert main(_args(setup, path, tmp_path)) == 2
    assert needle.lower() in _one_error(capsys).lower()


@pytest.mark.parametrize("extra, needle", [
    (["--top-k", "0"], "--top-k"), (["--chip-m", "-5"], "--chip-m"), (["--stride-m", "nan"], "--stride-m"),
    (["--bands", "2,1"], "--bands"), (["--batch-size", "0"], "--batch-size"), (["--query", "  "], "--query"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_give_one_error_line(setup, tmp_path, capsys, extra, needle):  # noqa: F811
    path = write_tif(tmp_path / "scene.tif", width=40, height=40)
    assert main(_args(setup, path, tmp_path, *extra)) == 2
    assert needle in _one_error(capsys)


def test_benchmark_chip_labels_fit_the_manila_grid():
    """benchmarks/fixtures/manila_chips.json names chips of the 70 m / 35 m grid of the scene it was made on."""
    labels = json.loads(FIXTURE.read_text())
    path = SHARED_SCENES / labels["scene"]
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    scene = Scene.open(path)
    assert scene.sha256 == labels["sha256"]
    grid = chip_grid(scene, chip_m=labels["grid"]["chip_m"], stride_m=labels["grid"]["stride_m"])
    assert len(grid) == labels["num_chips"] and same_windows(grid, labels["windows"])
    assert not same_windows(grid, [[c + 20, r, w, h] for c, r, w, h in labels["windows"]])
    for q, ids in labels["queries"].items():
        assert ids and all(0 <= i < len(grid) for i in ids + labels["partial"][q])
        assert not set(ids) & set(labels["partial"][q]), q
    assert hit_at(np.arange(10.0), {9}, 5) == (1, 0.2) and hit_at(np.arange(10.0), {0}, 5) == (0, 0.0)
