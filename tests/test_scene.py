"""``harma.scene``: lazy rasters, chip grids in metres, cached chip embeddings, score maps, GeoJSON."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.warp import transform as warp

from harma import create_model
from harma.encode import model_lock
from harma.errors import DatasetError, QueryError
from harma.scene import Scene, SceneIndex, chip_grid, heatmap_image, score_map, to_geojson, top_k
from harma.scene import index as scene_index
from tests.conftest import SHARED_DATASETS, tiny_config

UTM = "EPSG:32633"


def write_scene(path, pixels, crs=UTM, transform=None, nodata=None):
    """``pixels`` (bands, h, w) as a GeoTIFF; default: 1 m pixels at a non-round UTM origin."""
    pixels = np.asarray(pixels)
    transform = transform if transform is not None else from_origin(500123.25, 4649876.5, 1.0, 1.0)
    profile = dict(driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=pixels.shape[0],
                   dtype=pixels.dtype, transform=transform)
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(pixels)
    return path


def noise(h, w, seed=0, bands=3, dtype=np.uint8, lo=30, hi=220):
    return np.random.default_rng(seed).integers(lo, hi, size=(bands, h, w)).astype(dtype)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model(tiny_config())
    return model, preprocess, tokenizer


def test_chip_bounds_are_the_affine_transform_exactly_and_cover_the_scene(tmp_path):
    scene = Scene.open(write_scene(tmp_path / "s.tif", noise(150, 200)))
    assert (scene.width, scene.height, scene.crs) == (200, 150, UTM)
    px, py = scene.pixel_size_m
    assert px == pytest.approx(1.0, rel=0.002) and py == pytest.approx(1.0, rel=0.002)  # 1 m pixels on the ground
    grid = chip_grid(scene, chip_m=40.0)
    assert grid.stride_m == 20.0 and grid.chip_px == (round(40 / px), round(40 / py))
    for chip in grid.chips:
        c0, r0, c1, r1 = chip.col_off, chip.row_off, chip.col_off + chip.width, chip.row_off + chip.height
        x0, y0 = scene.transform @ (c0, r1)
        x1, y1 = scene.transform @ (c1, r0)
        assert chip.bounds == (x0, y0, x1, y1)  # exact, not approximate
    assert max(c.col_off + c.width for c in grid.chips) == 200  # flush with the right and bottom edges
    assert max(c.row_off + c.height for c in grid.chips) == 150
    assert [c.index for c in grid.chips] == list(range(len(grid)))
    lon, lat = grid.chips[0].centre_lonlat(scene)
    assert 14 < lon < 16 and 41 < lat < 43  # UTM 33N, near its central meridian


@pytest.mark.parametrize("crs,transform", [
    ("EPSG:3395", from_origin(13467532.0, 1632019.875, 0.5, 0.5)),  # World Mercator, as the Manila tile
    (UTM, None),
    ("EPSG:4326", from_origin(120.98, 14.6, 5e-6, 5e-6)),  # about 0.5 m in degrees
])
def test_geojson_is_rfc7946_and_round_trips_to_the_raster_crs(tmp_path, crs, transform):
    scene = Scene.open(write_scene(tmp_path / "s.tif", noise(120, 160), crs=crs, transform=transform))
    grid = chip_grid(scene, chip_m=30.0)
    scores = torch.linspace(0, 1, len(grid))
    ids = top_k(scores, 4)
    fc = json.loads(json.dumps(to_geojson(scene, grid, ids, scores, model="tiny", query="a bridge"), allow_nan=False))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 4
    assert "crs" not in fc  # RFC 7946: always WGS 84 lon/lat, no crs member
    for rank, (feature, i) in enumerate(zip(fc["features"], ids), start=1):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["properties"] == {"rank": rank, "score": pytest.approx(float(scores[i])), "model": "tiny",
                                         "query": "a bridge", "chip": i, "window": list(grid.chips[i].window)}
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed
        area = 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
        assert area > 0  # counter-clockwise exterior
        lons, lats = zip(*ring[:4])
        assert all(-180 <= lon <= 180 for lon in lons) and all(-90 <= lat <= 90 for lat in lats)
        assert 100 < np.mean(lons) < 130 if crs != UTM else 14 < np.mean(lons) < 16  # lon first, then lat
        xs, ys = warp("EPSG:4326", crs, list(lons), list(lats))  # back to the raster's CRS
        corners = grid.chips[i].corners(scene)
        per_degree = 1.0 if crs == "EPSG:4326" else 111_320.0  # CRS units in one degree (metres at most)
        for x, y in zip(xs, ys):  # each ring vertex lands on one of the chip's corners
            err = min(max(abs(x - cx), abs(y - cy)) for cx, cy in corners) / per_degree
            assert err < 1e-7


def test_a_planted_pattern_is_found_by_its_own_chip_and_by_an_image_of_it(tmp_path, tiny, one_thread):
    model, preprocess, _ = tiny
    pixels = noise(96, 128, seed=3)
    yy, xx = np.mgrid[0:32, 0:32]
    pattern = np.stack([((xx // 8 + yy // 8) % 2) * 255, np.zeros((32, 32)), 255 - ((xx // 8 + yy // 8) % 2) * 255])
    pixels[:, 32:64, 64:96] = pattern.astype(np.uint8)  # a red/blue checkerboard in one chip of the grid
    scene = Scene.open(write_scene(tmp_path / "s.tif", pixels))
    grid = chip_grid(scene, chip_m=32.0 * scene.pixel_size_m[0], stride_m=32.0 * scene.pixel_size_m[0])
    assert grid.chip_px == (32, 32) and len(grid) == 12
    planted = next(c.index for c in grid.chips if (c.col_off, c.row_off) == (64, 32))
    idx = SceneIndex.build(model, preprocess, scene, grid, batch_size=5)
    assert idx.embeddings.shape == (12, 32)
    assert torch.allclose(idx.embeddings.norm(dim=1), torch.ones(12), atol=1e-5)
    assert top_k(idx.scores_for_chip(planted), 1) == [planted]
    from PIL import Image
    assert top_k(idx.scores_for_image(Image.fromarray(pattern.transpose(1, 2, 0).astype(np.uint8))), 1) == [planted]
    # Rocchio: the planted chip as the only positive example ranks it first
    assert top_k(idx.rocchio(positive=[planted], negative=[0]), 1) == [planted]


def test_a_scene_query_waits_while_its_model_or_tokenizer_is_busy(tmp_path, tiny, one_thread):
    """The app answers many queries at once, over retrievers and scene indexes sharing one model: a scene
    query takes the model's and the tokenizer's lock (``harma.encode.model_lock``) like every other caller."""
    model, preprocess, tokenizer = tiny
    scene = Scene.open(write_scene(tmp_path / "s.tif", noise(64, 64)))
    side = 32.0 * scene.pixel_size_m[0]
    idx = SceneIndex.build(model, preprocess, scene, chip_grid(scene, chip_m=side, stride_m=side))
    for busy in (model, tokenizer):
        done = {}
        with model_lock(busy):
            query = threading.Thread(
                target=lambda: done.__setitem__("scores", idx.scores_for_text(tokenizer, "a roof")))
            query.start()
            query.join(1.0)
            assert "scores" not in done  # still waiting its turn
        query.join(30)
        assert done["scores"].shape == (len(idx),)


def test_no_data_chips_are_skipped(tmp_path):
    pixels = noise(64, 128)
    pixels[:, :, :64] = 0  # left half no-data
    explicit = Scene.open(write_scene(tmp_path / "a.tif", pixels, nodata=0))
    implicit = Scene.open(write_scene(tmp_path / "b.tif", pixels))  # no no-data value: black is no-data
    for scene in (explicit, implicit):
        assert scene.valid_fraction((0, 0, 128, 64)) == pytest.approx(0.5, abs=0.02)
        grid = chip_grid(scene, chip_m=32 * scene.pixel_size_m[0], stride_m=32 * scene.pixel_size_m[0])
        assert {c.col_off for c in grid.chips} == {64, 96}
        assert len(chip_grid(scene, chip_m=32 * scene.pixel_size_m[0], min_valid=0.0)) > len(grid)
    uint16 = noise(64, 64, dtype=np.uint16, lo=100, hi=4000)
    uint16[:, :32] = 9999
    scene = Scene.open(write_scene(tmp_path / "c.tif", uint16, nodata=9999))  # a non-zero no-data value
    assert scene.valid_fraction((0, 0, 64, 64)) == pytest.approx(0.5, abs=0.02)
    assert np.asarray(scene.read_rgb((0, 0, 64, 32))).max() == 0  # no-data reads black


def test_16_bit_bgr_raster_displays_in_true_colour_with_a_band_order(tmp_path, monkeypatch):
    bgr = np.full((3, 40, 60), 7000, dtype=np.uint16)
    bgr += np.random.default_rng(0).integers(0, 50, size=bgr.shape).astype(np.uint16)
    bgr[2, :, :30] = 12000  # band 3 (red) high in the left half: a red field
    path = write_scene(tmp_path / "bgr.tif", bgr)
    as_is = np.asarray(Scene.open(path).read_rgb((0, 0, 60, 40)))
    true = np.asarray(Scene.open(path, bands=(2, 1, 0)).read_rgb((0, 0, 60, 40)))
    assert as_is[:, :20, 2].mean() > 200 and as_is[:, :20, 0].mean() < 150  # B,G,R read as RGB: blue
    assert true[:, :20, 0].mean() > 200 and true[:, :20, 2].mean() < 150  # with bands 2,1,0: red
    monkeypatch.setenv("HARMA_BANDS", "2,1,0")
    assert np.array_equal(np.asarray(Scene.open(path).read_rgb((0, 0, 60, 40))), true)
    # one stretch for the whole scene: a window shows the same colours as the overview
    window = np.asarray(Scene.open(path, bands=(2, 1, 0)).read_rgb((0, 0, 10, 10)))
    assert np.array_equal(window, true[:10, :10])
    assert Scene.open(path, bands=(2, 1, 0)).overview(max_side=30).size == (30, 20)
    with pytest.raises(DatasetError, match="band 5 was asked for"):
        Scene.open(path, bands=(5, 1, 0))


def test_bad_input_gets_one_clear_dataset_error(tmp_path):
    (tmp_path / "text.tif").write_text("not a raster")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        nocrs = write_scene(tmp_path / "nocrs.tif", noise(20, 20), crs=None, transform=rasterio.Affine.identity())
    cases = [
        (tmp_path / "text.tif", "not a raster"),
        (nocrs, "no coordinate reference system"),
        (write_scene(tmp_path / "one.tif", noise(1, 1)), "1 x 1 pixels"),
        (tmp_path / "missing.tif", "not found"),
    ]
    for path, message in cases:
        with pytest.raises(DatasetError, match=message) as e:
            Scene.open(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    small = Scene.open(write_scene(tmp_path / "small.tif", noise(20, 30)))
    with pytest.raises(DatasetError, match="smaller than one 70 m chip"):
        chip_grid(small, chip_m=70.0)
    with pytest.raises(DatasetError, match="chip size"):
        chip_grid(small, chip_m=0)
    black = Scene.open(write_scene(tmp_path / "black.tif", np.zeros((3, 40, 40), np.uint8)))
    with pytest.raises(DatasetError, match="no 10 m chip of the scene has 50% valid pixels"):
        chip_grid(black, chip_m=10.0)


def test_chip_embeddings_are_cached_and_resume_after_a_kill(tmp_path, tiny, monkeypatch, one_thread):
    model, preprocess, tokenizer = tiny
    scene = Scene.open(write_scene(tmp_path / "s.tif", noise(64, 96)))
    grid = chip_grid(scene, chip_m=32 * scene.pixel_size_m[0])
    monkeypatch.setattr(scene_index, "CHUNK", 4)
    calls, die = [], [True]
    real = SceneIndex._embed

    def dies_on_third_chunk(*args, **kwargs):
        calls.append(len(args[3]))
        if die[0] and len(calls) == 3:
            raise Killed  # the process dies mid-build
        return real(*args, **kwargs)

    monkeypatch.setattr(SceneIndex, "_embed", staticmethod(dies_on_third_chunk))
    with pytest.raises(Killed):
        SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "cache")
    calls.clear()
    die[0] = False
    done = []
    idx = SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "cache",
                           progress=lambda d, t: done.append((d, t)))
    assert sum(calls) == len(grid) - 8 and done[-1] == (len(grid), len(grid))  # two chunks were kept
    fresh = SceneIndex.build(model, preprocess, scene, grid)
    assert torch.allclose(idx.embeddings, fresh.embeddings, atol=1e-6)
    calls.clear()
    again = SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "cache")
    assert again.cached and calls == [] and torch.equal(again.embeddings, idx.embeddings)
    other_grid = chip_grid(scene, chip_m=48 * scene.pixel_size_m[0])
    assert not SceneIndex.build(model, preprocess, scene, other_grid, cache_dir=tmp_path / "cache").cached
    # processes of a torchrun job split the chunks, then one joins them
    for rank in (0, 1):
        assert SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "dist", shard=(rank, 2)) is None
    calls.clear()
    joined = SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "dist")
    assert calls == [] and torch.allclose(joined.embeddings, fresh.embeddings, atol=1e-6)
    (tmp_path / "a-file").write_text("")  # a cache folder that cannot be made: computed in memory all the same
    unwritable = SceneIndex.build(model, preprocess, scene, grid, cache_dir=tmp_path / "a-file")
    assert torch.allclose(unwritable.embeddings, fresh.embeddings, atol=1e-6)
    scores = idx.scores_for_text(tokenizer, "a red field")
    assert scores.shape == (len(grid),) and scores.abs().max() <= 1.0 + 1e-5
    with pytest.raises(QueryError, match="empty query"):
        idx.scores_for_text(tokenizer, "  ")
    with pytest.raises(QueryError, match="does not exist"):
        idx.scores_for_chip(len(grid))


def test_top_k_score_map_and_heatmap(tmp_path):
    assert top_k(torch.tensor([0.5, 0.9, 0.9, float("nan"), 0.1]), 4) == [1, 2, 0, 4]
    scene = Scene.open(write_scene(tmp_path / "s.tif", noise(40, 80)))
    grid = chip_grid(scene, chip_m=40 * scene.pixel_size_m[0], stride_m=20 * scene.pixel_size_m[0], min_valid=0)
    assert [c.col_off for c in grid.chips] == [0, 20, 40] and grid.chip_px == (40, 40)
    smap = score_map(scene, grid, [1.0, 3.0, 5.0], max_side=80)
    assert smap.shape == (40, 80)
    assert smap[0, 10] == 1.0 and smap[0, 30] == 2.0 and smap[0, 50] == 4.0 and smap[0, 70] == 5.0  # overlaps averaged
    part = chip_grid(scene, chip_m=40 * scene.pixel_size_m[0], stride_m=40 * scene.pixel_size_m[0], min_valid=0)
    half = score_map(scene, type(part)(**{**part.__dict__, "chips": part.chips[:1]}), [1.0], max_side=40)
    assert half.shape == (20, 40) and np.isnan(half[:, 20:]).all() and (half[:, :20] == 1.0).all()
    image = heatmap_image(scene, smap, max_side=64)
    assert image.size == (64, 32) and image.mode == "RGB"
    base, blended = np.asarray(scene.overview(40)), np.asarray(heatmap_image(scene, half, max_side=40))
    assert np.array_equal(blended[:, 20:], base[:, 20:]) and not np.array_equal(blended[:, :20], base[:, :20])
    floats = noise(20, 20).astype(np.float32)
    floats[:, :, :10] = np.nan  # float rasters: NaN is no-data
    assert Scene.open(write_scene(tmp_path / "f.tif", floats)).valid_fraction((0, 0, 20, 20)) == 0.5


@pytest.mark.skipif(not (SHARED_DATASETS / "scenes").is_dir(), reason="no shared scenes on this machine")
def test_real_manila_tile_grid_skips_the_no_data_wedge():
    scene = Scene.open(SHARED_DATASETS / "scenes" / "manila_pasig_bridge_oam.tif")
    assert (scene.width, scene.height, scene.crs) == (2048, 2048, "EPSG:3395")
    assert scene.pixel_size_m[0] == pytest.approx(0.0968, rel=0.01)  # 0.10 m in Mercator, 0.097 m on the ground
    grid = chip_grid(scene, chip_m=70.0)
    everything = chip_grid(scene, chip_m=70.0, min_valid=0.0)
    assert len(everything) == 25 and len(grid) == 23
    assert (0, 0) not in {(c.col_off, c.row_off) for c in grid.chips}  # the black top-left wedge
    assert scene.valid_fraction((0, 0, 700, 700)) < 0.5
    lon, lat = grid.chips[0].centre_lonlat(scene)
    assert 120.9 < lon < 121.1 and 14.5 < lat < 14.7
