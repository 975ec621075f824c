"""The "Scene search" tab's handlers on the tiny checkpoint and a generated GeoTIFF: a query gives both
heatmaps, both galleries and a GeoJSON file; a click searches by that chip; bad uploads get one message and
the app keeps serving; ``python -m training.build_demo --scene`` bundles a scene with its credit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harma.io import file_sha256
from harma.scene import Scene, SceneIndex, chip_grid
from harma_app import state as app_state
from harma_app import tab_scene
from tests.test_app import tiny_setup
from tests.test_app_concurrency import meeting
from training.build_demo import SCENE_HEADING, main as build_demo_main

rasterio = pytest.importorskip("rasterio")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning

SIDE = 192  # pixels of the generated scene, 1 m each: chips of 64 m give a 5 x 5 grid
PLANT = (128, 128)  # (col, row) of the top-left corner of the planted pattern: exactly chip (4, 4)


def write_scene(path: Path, crs: str = "EPSG:32633", side: int = SIDE) -> Path:
    """A grey-noise RGB GeoTIFF (UTM 33N, 1 m pixels) with a bright checkerboard planted in one chip."""
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    data = rng.integers(90, 130, (3, side, side), dtype=np.uint8)
    c, r = PLANT if side >= PLANT[0] + 64 else (0, 0)
    board = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    data[0, r:r + 64, c:c + 64] = board
    data[1, r:r + 64, c:c + 64] = 255 - board
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs=crs,
                       transform=from_origin(500000.0, 4500000.0, 1.0, 1.0)) as ds:
        ds.write(data)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    config = app_state.AppConfig(data=setup["config"].data, split="train", checkpoint=setup["config"].checkpoint,
                                 cache_dir=str(tmp_path_factory.mktemp("scene-cache")))
    return app_state.AppState(config)


@pytest.fixture(scope="module")
def scene_key(app, tmp_path_factory):
    tif = write_scene(tmp_path_factory.mktemp("scene") / "planted.tif")
    key, base_view, adapted_view, note = tab_scene.use_scene(app, str(tif), "demo")
    assert key.startswith("upload:") and "192 x 192 px" in note and "EPSG:32633" in note, note
    assert base_view == adapted_view and Path(base_view).is_relative_to(app.cache_dir / "thumbs")
    return key


def _served(app, path) -> bool:
    return any(Path(path).is_relative_to(app.cache_dir / name) for name in ("thumbs", "exports"))


def test_a_query_gives_two_heatmaps_two_galleries_and_a_geojson(app, scene_key):
    base_map, adapted_map, base, adapted, geojson, status = tab_scene.search_scene(
        app, scene_key, "a checkerboard", 3, None, 64, progress=None)
    assert status.startswith("Top 3 of 25 chips of 64 m in"), status
    for path in (base_map, adapted_map):
        assert _served(app, path) and Image.open(path).size == (SIDE, SIDE)  # the overview: the scene is small
    assert base_map != adapted_map  # two models, two score maps
    for tiles in (base, adapted):
        assert len(tiles) == 3 and all(_served(app, p) for p, _ in tiles)
        assert [c.split(" · ")[0] for _, c in tiles] == ["#1", "#2", "#3"]
    assert _served(app, geojson) and geojson.endswith(".geojson")
    fc = json.loads(Path(geojson).read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 6
    models = {f["properties"]["model"] for f in fc["features"]}
    assert len(models) == 2 and any(m.startswith("baseline") for m in models)
    for f in fc["features"]:
        assert f["properties"]["query"] == "a checkerboard" and f["geometry"]["type"] == "Polygon"
        lon, lat = f["geometry"]["coordinates"][0][0]
        assert 14.9 < lon < 15.1 and 40.5 < lat < 40.7  # UTM 33N (500000, 4500000): lon/lat order, degrees


def test_the_two_models_score_the_scene_at_once(app, scene_key, monkeypatch):
    """Each side's ranking waits (10 s at most) for the other's: one after the other would break the barrier."""
    meeting(monkeypatch, tab_scene, "top_k")
    *_, base, adapted, _geojson, status = tab_scene.search_scene(app, scene_key, "a red roof", 2, None, 64,
                                                                 progress=None)
    assert len(base) == len(adapted) == 2 and status.startswith("Top 2 of 25 chips"), status


def test_a_click_searches_by_that_chip_and_ranks_it_first(app, scene_key):
    """A click inside the planted checkerboard (view pixels = scene pixels here) searches by its chip, which
    both models rank first with a cosine of 1."""
    *_, base, adapted, geojson, status = tab_scene.search_by_click(app, scene_key, (PLANT[0] + 40, PLANT[1] + 40),
                                                                    4, None, 64, progress=None)
    scene = tab_scene.open_scene(app, scene_key)
    grid = tab_scene._grid(app, scene, 64.0)
    planted = next(c.index for c in grid.chips if (c.col_off, c.row_off) == PLANT)
    for tiles in (base, adapted):
        rank, score = tiles[0][1].split("\n")[0].split(" · ")
        assert rank == "#1" and float(score) == pytest.approx(1.0, abs=1e-3)
        assert tiles[0][1].split("\n")[1].startswith(f"chip {planted} ")
    assert f"chip {planted} (clicked" in status
    assert all(f["properties"]["query"].startswith(f"chip {planted} ") for f in
               json.loads(Path(geojson).read_text())["features"])


def test_bad_input_gets_one_message_and_the_app_keeps_serving(app, scene_key, tmp_path, monkeypatch):
    not_raster = tmp_path / "notes.tif"
    not_raster.write_text("these are field notes, not an image")
    no_crs = tmp_path / "plain.tif"
    Image.new("RGB", (64, 64), "green").save(no_crs)
    for path, words in ((not_raster, "not a raster"), (no_crs, "no coordinate reference system")):
        key, base_view, _, note = tab_scene.use_scene(app, str(path), scene_key)
        assert key == scene_key and note.startswith("⚠️") and words in note, note
        assert "\n" not in note and str(tmp_path) not in note  # one line, no server path
    monkeypatch.setattr(tab_scene, "MAX_SCENE_BYTES", 1000)
    key, _, _, note = tab_scene.use_scene(app, str(write_scene(tmp_path / "big.tif")), scene_key)
    assert key == scene_key and "big.tif is 0.1 MB; upload a scene of at most" in note, note
    assert "python -m training.search_scene" in note
    monkeypatch.undo()
    *_, status = tab_scene.search_scene(app, scene_key, "a checkerboard", 2, None, 500, progress=None)
    assert status.startswith("⚠️") and "chip" in status, status  # a scene smaller than one chip
    *_, status = tab_scene.search_scene(app, scene_key, "   ", 2, None, 64, progress=None)
    assert status.startswith("⚠️ type a query"), status
    *_, status = tab_scene.search_scene(app, "upload:" + "0" * 32, "a checkerboard", 2, None, 64, progress=None)
    assert "upload it again" in status
    *_, base, adapted, _, status = tab_scene.search_scene(app, scene_key, "a checkerboard", 2, None, 64, progress=None)
    assert len(base) == len(adapted) == 2 and status.startswith("Top 2")  # still serving


def test_a_16_bit_bgr_scene_shows_in_true_colour_with_its_band_order(app, tmp_path):
    """A uint16 scene stored B, G, R (as the Landsat one) with a red field: red with the B, G, R order, blue
    as stored; the stretch maps 16-bit values to 8 bits."""
    from rasterio.transform import from_origin

    data = np.full((3, 64, 64), 1000, dtype=np.uint16)
    data[2, :, :32] = 30000  # band 3 = red, on the left half
    path = tmp_path / "bgr.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint16", crs="EPSG:32621",
                       transform=from_origin(300000.0, 7200000.0, 30.0, 30.0)) as ds:
        ds.write(data)
    key, *_ = tab_scene.use_scene(app, str(path), "demo")
    for order, colour in (("B, G, R (e.g. Landsat)", 0), ("R, G, B", 2)):
        _, view, _, note = tab_scene.show_scene(app, key, order)
        assert note.startswith("Scene: bgr.tif (64 x 64 px, EPSG:32621"), note
        pixel = Image.open(view).convert("RGB").getpixel((8, 32))
        assert pixel[colour] > 200 and max(v for c, v in enumerate(pixel) if c != colour) < 60, (order, pixel)


def test_build_demo_bundles_a_scene_with_its_credit(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "CREDITS.md").write_text("# Demo gallery: credits\n\nthe gallery's credit\n")
    tif = write_scene(tmp_path / "scene.tif", side=64)
    for _ in range(2):  # again: replaced, not appended
        assert build_demo_main(["--scene", str(tif), "--out", str(out), "--scene-credit", "CC BY 4.0, someone"]) == 0
    assert [p.name for p in (out / "scene").iterdir()] == ["scene.tif"]
    credits = (out / "CREDITS.md").read_text()
    assert credits.count(SCENE_HEADING) == 1 and "the gallery's credit" in credits and "CC BY 4.0, someone" in credits
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    assert build_demo_main(["--scene", str(bad), "--out", str(out)]) == 2
    assert "not a raster" in capsys.readouterr().err
    assert [p.name for p in (out / "scene").iterdir()] == ["scene.tif"]  # what was bundled stays


def test_the_demo_scene_is_bundled_with_its_credit():
    path = tab_scene.demo_scene_path()
    assert path is not None and path.name == "manila_pasig_bridge_oam.tif"
    credits = (tab_scene.DEMO / "CREDITS.md").read_text()
    assert "CC BY 4.0" in credits and "5b90f92da0d7280005fab355_4310" in credits and "2407.11743" in credits
    shipped = [json.loads(k.read_text()) for k in tab_scene.SHIPPED_SCENE.glob("*/key.json")]
    assert sorted(k["model"]["method"] for k in shipped) == ["harma", "zeroshot"]  # the default model and its baseline
    assert {k["scene_sha256"] for k in shipped} == {file_sha256(path)}
    # made by today's harma.scene (a change to the grid, the decoder or the index format makes them stale:
    # run python -m harma_app.precompute), at the tab's default chip size
    grid = chip_grid(Scene.open(path), chip_m=tab_scene.CHIP_M)
    probe = SceneIndex.cache_parts(torch.nn.Linear(1, 1), Scene.open(path), grid)
    for key in shipped:
        assert {k: key[k] for k in ("kind", "grid", "chips", "decoder", "bands")} == \
            {k: probe[k] for k in ("kind", "grid", "chips", "decoder", "bands")}


def test_uploaded_scenes_expire_like_uploaded_galleries(app, tmp_path):
    """An uploaded scene unused for a day is deleted when the next one arrives (they were never swept)."""
    import os

    from harma_app.galleries import UPLOAD_TTL_S

    first, _, _, _ = tab_scene.use_scene(app, str(write_scene(tmp_path / "a.tif", side=160)), "demo")
    folder = app.cache_dir / "scene" / "uploads" / first.partition(":")[2]
    old = folder.stat().st_mtime - UPLOAD_TTL_S - 60
    os.utime(folder / ".complete", (old, old))
    second, _, _, _ = tab_scene.use_scene(app, str(write_scene(tmp_path / "b.tif", side=176)), "demo")
    assert second != first and not folder.exists()
    assert (app.cache_dir / "scene" / "uploads" / second.partition(":")[2]).is_dir()
