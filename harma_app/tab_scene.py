"""The "Scene search" tab: where in a large georeferenced scene (the bundled demo orthophoto, or an uploaded
GeoTIFF) both models look for a query: their heatmaps side by side, their top-k chips, a click on a heatmap
to search by that chip, and the hits as GeoJSON. Chip embeddings: :class:`harma.scene.SceneIndex`, cached
under the cache folder's ``scene/`` (the demo scene's for the default model shipped in
``assets/demo/precomputed/scene/``). A page is shown only files the app wrote: heatmaps and chips in
``thumbs/``, GeoJSON in ``exports/``; an uploaded scene is kept in ``scene/uploads/``, never served."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from harma.io import atomic_write_bytes, file_sha256
from harma.retrieval.identity import cache_key
from harma.scene import Scene, SceneIndex, chip_grid, heatmap_image, score_map, to_geojson, top_k

from .common import DEMO, MAX_QUERY_CHARS, PRECOMPUTED, USER_ERRORS, AppError, both_sides, clamp_k, fail, progress_cb
from .galleries import keyed, safe_name, sweep_uploads
from .state import AppState

DEMO_SCENE_DIR = DEMO / "scene"  # python -m training.build_demo --scene FILE
SHIPPED_SCENE = PRECOMPUTED / "scene"  # the demo scene's chip embeddings (python -m harma_app.precompute)
DEMO_KEY = "demo"
MAX_SCENE_BYTES = 25 * 2**20  # an uploaded scene (also launch()'s max_file_size); larger: training.search_scene
MAX_SCENE_CHIPS = 3000  # chips the app embeds for one scene and grid (about 5 min per model on 2 CPU cores)
VIEW_SIDE = 1024  # longest side of a heatmap as shown
CHIP_SIDE = 192  # longest side of a chip tile
CHIP_M = 70.0  # default chip side in metres (the models saw roughly 0.3-1 m imagery, 256 px)
EXAMPLES = ["a bridge over a river", "many cars in a parking lot", "dense buildings", "trees beside a road"]
NOTE = ("Chips are squares of the given side on the ground, overlapping by half; each is resized to the model's "
        "input. A heatmap is every chip's cosine score, averaged where chips overlap (brighter = closer to the "
        "query). **Click a heatmap** to search by the chip under the pointer. The GeoJSON holds both models' "
        "top chips (EPSG:4326, with rank, score, model and query).")
BAND_ORDERS = {"R, G, B": None, "B, G, R (e.g. Landsat)": (2, 1, 0)}  # None: HARMA_BANDS, else bands 1-3
_UPLOAD = re.compile(r"upload:([0-9a-f]{32})")


def demo_scene_path() -> Optional[Path]:
    found = sorted(DEMO_SCENE_DIR.glob("*.tif*")) if DEMO_SCENE_DIR.is_dir() else []
    return found[0] if found else None


def scene_path(app: AppState, key: Optional[str]) -> Path:
    """The file of scene ``key``: ``demo`` (the bundled scene) or ``upload:<hex>`` (an uploaded one)."""
    if not key or key == DEMO_KEY:
        path = demo_scene_path()
        if path is None:
            raise AppError("no demo scene in assets/demo/scene/ (python -m training.build_demo --scene FILE); "
                           "upload a GeoTIFF instead")
        return path
    m = _UPLOAD.fullmatch(key)
    found = sorted((app.cache_dir / "scene" / "uploads" / m.group(1)).glob("*.tif")) if m else []
    if not found:
        raise AppError("this uploaded scene is gone; upload it again")
    return found[0]


def open_scene(app: AppState, key: Optional[str], band_order: Optional[str] = None) -> Scene:
    """Scene ``key`` read with the band order ``band_order`` (a key of :data:`BAND_ORDERS`)."""
    path = scene_path(app, key)
    bands = BAND_ORDERS.get(band_order or "", None)
    return app.cached(("scene", str(path), bands), lambda: Scene.open(path, bands=bands))


def _grid(app: AppState, scene: Scene, chip_m: float):
    """The scene's chips of ``chip_m`` metres; refused (before any is made) when there could be more than
    :data:`MAX_SCENE_CHIPS` of them."""
    px, py = scene.pixel_size_m
    cw, ch = max(2, round(chip_m / px)), max(2, round(chip_m / py))  # as harma.scene.chip_grid sizes them
    sw, sh = max(1, round(chip_m / 2 / px)), max(1, round(chip_m / 2 / py))
    most = (max(0, scene.width - cw) // sw + 2) * (max(0, scene.height - ch) // sh + 2)
    if most > MAX_SCENE_CHIPS:
        raise AppError(f"{scene.path.name} ({scene.width:,} x {scene.height:,} px of {px:.2f} m) gives up to "
                       f"{most:,} chips of {chip_m:g} m; the app embeds at most {MAX_SCENE_CHIPS:,} per scene: "
                       "choose larger chips, or search it with `python -m training.search_scene --scene FILE`")
    return app.cached(("scene-grid", str(scene.path), scene.bands, chip_m), lambda: chip_grid(scene, chip_m=chip_m))


def _ship_into_cache(app: AppState) -> None:
    """The shipped demo-scene embeddings copied into the cache folder once (SceneIndex finds them there)."""
    if not SHIPPED_SCENE.is_dir():
        return
    dest = app.cache_dir / "scene"
    for src in SHIPPED_SCENE.rglob("*"):
        out = dest / src.relative_to(SHIPPED_SCENE)
        if src.is_file() and not out.exists():  # atomically: a concurrent build may read it
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, src.read_bytes())


def _build(app: AppState, pair, scene: Scene, grid, cache_dir: Path, progress: Any = None) -> list:
    """[baseline, adapted] :class:`SceneIndex` of ``pair`` (a :class:`~.state.ModelPair`) over the grid."""
    out = []
    for s, (side, (model, preprocess, _), ckpt) in enumerate((("baseline", pair.baseline, None),
                                                              ("adapted", pair.adapted, pair.source.adapters))):
        def cb(done: int, total: int, s: int = s, side: str = side) -> None:
            if progress is not None:
                progress((s + done / max(total, 1)) / 2, f"embedding {total:,} chips with the {side} model (cached)")
        out.append(SceneIndex.build(model, preprocess, scene, grid, cache_dir=cache_dir, checkpoint=ckpt,
                                    batch_size=app.config.batch_size, progress=cb))
    return out


def ship_scene(app: AppState, folder: Path = SHIPPED_SCENE, chip_m: float = CHIP_M) -> list[Path]:
    """Ship the default model's (and its baseline's) chip embeddings of the demo scene at the default chip
    size under ``folder`` (about 100 KB), removing anything else there; returns the folders written. For
    ``python -m harma_app.precompute``; nothing without a demo scene."""
    if demo_scene_path() is None:
        return []
    scene = open_scene(app, DEMO_KEY)
    grid = _grid(app, scene, chip_m)
    pair = app.models(app.default_model)
    _build(app, pair, scene, grid, folder)
    written = [folder / cache_key(SceneIndex.cache_parts(model, scene, grid, ckpt))
               for (model, _, _), ckpt in ((pair.baseline, None), (pair.adapted, pair.source.adapters))]
    for old in folder.iterdir():
        if old not in written:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return written


def scene_indexes(app: AppState, scene: Scene, grid, model_key: Optional[str], progress: Any = None) -> tuple:
    """(baseline, adapted) :class:`SceneIndex` of the scene's chips, from memory, the disk cache (where the
    shipped ones are copied first) or computed."""
    key = app.model_key(model_key)

    def build():
        _ship_into_cache(app)
        return tuple(_build(app, app.models(key), scene, grid, app.cache_dir / "scene", progress))

    return app.cached(("scene-index", str(scene.path), scene.bands, key, grid.chip_m), build)


def _heatmap(app: AppState, scene: Scene, grid, scores, tag: str) -> str:
    """The heatmap of ``scores`` over the scene's overview, written once under ``thumbs/``."""
    digest = hashlib.sha256(scores.detach().cpu().numpy().tobytes()).hexdigest()
    out = app.cache_dir / "thumbs" / f"scene-{keyed(app.cache_dir, scene.sha256, scene.bands, grid.chip_m, tag, digest)}.jpg"
    if not out.is_file():
        img = heatmap_image(scene, score_map(scene, grid, scores), max_side=VIEW_SIDE)
        _write_image(img, out)
    return str(out)


def _overview(app: AppState, scene: Scene) -> str:
    out = app.cache_dir / "thumbs" / f"scene-{keyed(app.cache_dir, scene.sha256, scene.bands, VIEW_SIDE)}.jpg"
    if not out.is_file():
        _write_image(scene.overview(max_side=VIEW_SIDE), out)
    return str(out)


def _write_image(img, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=88)
    atomic_write_bytes(out, buf.getvalue())


def _chip_tile(app: AppState, scene: Scene, chip) -> str:
    out = app.cache_dir / "thumbs" / f"scene-{keyed(app.cache_dir, scene.sha256, scene.bands, chip.window)}.jpg"
    if not out.is_file():
        side = min(CHIP_SIDE, max(chip.width, chip.height))
        _write_image(scene.read_rgb((chip.col_off, chip.row_off, chip.width, chip.height), out_size=(side, side)), out)
    return str(out)


def _tiles(app: AppState, scene: Scene, grid, ids: list[int], scores) -> list[tuple[str, str]]:
    tiles = []
    for rank, i in enumerate(ids, 1):
        lon, lat = grid.chips[i].centre_lonlat(scene)
        tiles.append((_chip_tile(app, scene, grid.chips[i]),
                      f"#{rank} · {float(scores[i]):.3f}\nchip {i} · {lat:.5f}, {lon:.5f}"))
    return tiles


def _answer(app: AppState, scene: Scene, grid, model_key: Optional[str], k: int, query: str,
            score_fn, progress: Any) -> tuple:
    """Both models' heatmaps, top-k tiles and one GeoJSON file for scores from ``score_fn(side, index)``."""
    base, adapted = scene_indexes(app, scene, grid, model_key, progress)
    label = app.adapted_label(model_key)
    source = app.sources[app.model_key(model_key)].label
    names = {"baseline": f"baseline (zero-shot) of {source}", "adapted": f"{label}: {source}"}

    def side(name: str, index: Any) -> tuple:
        t0 = time.perf_counter()
        scores = score_fn(name, index)
        ids = top_k(scores, k)
        took = 1000 * (time.perf_counter() - t0)
        return (_heatmap(app, scene, grid, scores, name), _tiles(app, scene, grid, ids, scores),
                to_geojson(scene, grid, ids, scores, names[name], query)["features"], took)

    sides = both_sides(side, base, adapted)  # the two models score the scene at once
    images, galleries, times = [s[0] for s in sides], [s[1] for s in sides], [s[3] for s in sides]
    features = [f for s in sides for f in s[2]]
    collection = {"type": "FeatureCollection", "features": features}
    name = keyed(app.cache_dir, scene.sha256, scene.bands, grid.chip_m, k, query, model_key)
    out = app.cache_dir / "exports" / f"scene-hits-{name}.geojson"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(collection, indent=1).encode())
    status = (f"Top {k} of {len(grid.chips):,} chips of {grid.chip_m:g} m in {scene.path.name} for “{query}” — "
              f"baseline {times[0]:.0f} ms, adapted {times[1]:.0f} ms.")
    return images[0], images[1], galleries[0], galleries[1], str(out), status


def _chip_m(value: Any) -> float:
    try:
        chip_m = CHIP_M if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        chip_m = math.nan
    if not math.isfinite(chip_m) or chip_m <= 0:
        raise AppError(f"chip size {value!r}: give a side in metres above 0 (e.g. {CHIP_M:g})")
    return chip_m


def _failed(e: BaseException) -> tuple:
    return None, None, [], [], None, fail(e)


def search_scene(app: AppState, scene_key: Optional[str], query: Optional[str], k: Any, model_key: Optional[str],
                 chip_m: Any = CHIP_M, band_order: Optional[str] = None, progress: Any = gr.Progress()) -> tuple:
    """Text -> chips of a scene: (baseline heatmap, adapted heatmap, baseline tiles, adapted tiles, GeoJSON
    file, status)."""
    try:
        query = str(query or "").strip()[:MAX_QUERY_CHARS]
        if not query:
            raise AppError("type a query first (e.g. one of the examples)")
        scene = open_scene(app, scene_key, band_order)
        grid = _grid(app, scene, _chip_m(chip_m))
        pair = app.models(model_key)
        tokenizers = {"baseline": pair.baseline[2], "adapted": pair.adapted[2]}

        def score(side, index):
            return index.scores_for_text(tokenizers[side], query)

        return _answer(app, scene, grid, model_key, clamp_k(k), query, score, progress_cb(progress))
    except (AppError, *USER_ERRORS) as e:
        return _failed(e)


def chip_at(scene: Scene, grid, x: float, y: float, view_side: int = VIEW_SIDE) -> int:
    """The chip whose centre is nearest to point (x, y) of the scene's view (longest side ``view_side``)."""
    scale = max(scene.width, scene.height) / min(view_side, max(scene.width, scene.height))
    col, row = x * scale, y * scale
    return min(range(len(grid.chips)), key=lambda i: (grid.chips[i].col_off + grid.chips[i].width / 2 - col) ** 2
               + (grid.chips[i].row_off + grid.chips[i].height / 2 - row) ** 2)


def search_by_click(app: AppState, scene_key: Optional[str], xy: Any, k: Any, model_key: Optional[str],
                    chip_m: Any = CHIP_M, band_order: Optional[str] = None, progress: Any = gr.Progress()) -> tuple:
    """Chip -> chips: the chip under point ``xy`` (x, y) of a heatmap, searched with its own embedding."""
    try:
        scene = open_scene(app, scene_key, band_order)
        grid = _grid(app, scene, _chip_m(chip_m))
        x, y = (float(v) for v in xy)
        i = chip_at(scene, grid, x, y)
        lon, lat = grid.chips[i].centre_lonlat(scene)
        query = f"chip {i} (clicked, at {lat:.5f}, {lon:.5f})"
        return _answer(app, scene, grid, model_key, clamp_k(k), query, lambda side, index: index.scores_for_chip(i),
                       progress_cb(progress))
    except (AppError, *USER_ERRORS, TypeError, ValueError) as e:
        return _failed(e if isinstance(e, (AppError, *USER_ERRORS)) else AppError(f"no point to search by: {e}"))


def use_scene(app: AppState, upload: Any, current: Optional[str],
              band_order: Optional[str] = None) -> tuple[str, Optional[str], Optional[str], str]:
    """An uploaded GeoTIFF becomes the scene (kept under the cache folder's ``scene/uploads/``); returns (scene
    key, its view twice, status). A file that cannot be used leaves the current scene and says why."""
    try:
        if not upload:
            raise AppError("choose a GeoTIFF file first")
        src = Path(str(getattr(upload, "name", upload)))
        size = src.stat().st_size
        if size > MAX_SCENE_BYTES:
            raise AppError(f"{src.name} is {size / 2**20:.1f} MB; upload a scene of at most "
                           f"{MAX_SCENE_BYTES // 2**20} MB, or search a larger one with "
                           "`python -m training.search_scene --scene FILE`")
        Scene.open(src)  # not a raster, no CRS, too small: refused before it is kept
        digest = keyed(app.cache_dir, "upload", file_sha256(src))
        folder = app.cache_dir / "scene" / "uploads" / digest
        out = folder / (safe_name(src.stem) + ".tif")
        if not out.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, src.read_bytes())  # at most MAX_SCENE_BYTES
        (folder / ".complete").touch()  # used now: uploaded scenes expire and are bounded like uploaded galleries
        sweep_uploads(folder.parent, keep=folder)
        return show_scene(app, f"upload:{digest}", band_order)
    except (AppError, *USER_ERRORS) as e:
        return current or DEMO_KEY, gr.update(), gr.update(), fail(e)


def show_scene(app: AppState, key: Optional[str], band_order: Optional[str] = None) -> tuple:
    """Scene ``key`` (``demo``: the bundled one) as the heatmaps' place holds it before a query: (key, its
    view twice, a line about it)."""
    try:
        scene = open_scene(app, key, band_order)
        view = _overview(app, scene)
        what = "the bundled demo, " if key == DEMO_KEY else ""
        return key, view, view, (f"Scene: {what}{scene.path.name} ({scene.width:,} x {scene.height:,} px, "
                                 f"{scene.crs}, {scene.pixel_size_m[0]:.2f} m per pixel"
                                 f"{'; assets/demo/CREDITS.md' if key == DEMO_KEY else ''}). Type a query.")
    except (AppError, *USER_ERRORS) as e:
        return key, None, None, fail(e)


def layout() -> dict[str, Any]:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("Scene search", id="scene") as tab:
        scene_key = gr.State(DEMO_KEY)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    query = gr.Textbox(label="Query", placeholder=EXAMPLES[0], max_length=MAX_QUERY_CHARS, scale=4,
                                       elem_id="scene-query")
                    search = gr.Button("Search the scene", variant="primary", scale=1, elem_id="scene-search")
                examples = gr.Examples([[q] for q in EXAMPLES], inputs=[query], label="Example queries")
                with gr.Row():
                    chip_m = gr.Slider(30, 500, value=CHIP_M, step=5, label="Chip side (m on the ground)", scale=2)
                    band_order = gr.Radio(list(BAND_ORDERS), value=next(iter(BAND_ORDERS)), label="Band order",
                                          scale=1, elem_id="scene-bands")
            with gr.Column(scale=2):
                upload = gr.File(file_types=[".tif", ".tiff"], type="filepath", height=120, elem_id="scene-upload",
                                 label=f"Your own GeoTIFF (at most {MAX_SCENE_BYTES // 2**20} MB)")
                use_demo_btn = gr.Button("Back to the demo scene", size="sm")
        note = gr.Markdown(elem_id="scene-note")
        gr.Markdown(NOTE, elem_classes="harma-note")
        with gr.Row():
            base_map = gr.Image(label="Baseline (zero-shot)", interactive=False, elem_id="scene-baseline-map")
            adapted_map = gr.Image(label="Adapted", interactive=False, elem_id="scene-adapted-map")
        with gr.Row():
            base_gallery = gr.Gallery(label="Baseline: top chips", columns=4, height="auto",
                                      elem_id="scene-baseline-gallery", elem_classes="harma-tiles")
            adapted_gallery = gr.Gallery(label="Adapted: top chips", columns=4, height="auto",
                                         elem_id="scene-adapted-gallery", elem_classes="harma-tiles")
        geojson = gr.File(label="Hits as GeoJSON (both models)", interactive=False, height=80, elem_id="scene-geojson")
    return dict(tab=tab, scene_key=scene_key, query=query, search=search, examples=examples, chip_m=chip_m,
                band_order=band_order,
                upload=upload, use_demo=use_demo_btn, note=note, base_map=base_map, adapted_map=adapted_map,
                base_gallery=base_gallery, adapted_gallery=adapted_gallery, geojson=geojson)


def wire(app: AppState, ui: dict[str, Any], common: list, fast: dict) -> None:
    """Search (API ``/search_scene``), Enter, an example, a click on either heatmap, an upload, the demo button;
    the demo scene's view when the tab opens."""
    k, model = common[0], common[1]
    outputs = [ui["base_map"], ui["adapted_map"], ui["base_gallery"], ui["adapted_gallery"], ui["geojson"], ui["note"]]
    settings = [ui["chip_m"], ui["band_order"]]
    text = dict(fn=partial(search_scene, app), inputs=[ui["scene_key"], ui["query"], k, model, *settings],
                outputs=outputs, **fast)
    ui["search"].click(**text, api_name="search_scene")
    ui["query"].submit(**text, api_visibility="private")
    ui["examples"].load_input_event.then(**text, api_visibility="private")

    def on_click(scene_key, k_, model_, chip_m_, bands_, evt: gr.SelectData, progress=gr.Progress()):
        return search_by_click(app, scene_key, evt.index, k_, model_, chip_m_, bands_, progress)

    for image in (ui["base_map"], ui["adapted_map"]):
        image.select(on_click, [ui["scene_key"], k, model, *settings], outputs, api_visibility="private", **fast)
    views = [ui["scene_key"], ui["base_map"], ui["adapted_map"], ui["note"]]
    cleared = [ui["base_gallery"], ui["adapted_gallery"], ui["geojson"]]

    def view(key, bands_, model_, why=""):  # a scene's view; results of another scene, model or band order go
        label = app.adapted_label(model_)
        key, base_view, adapted_view, note = show_scene(app, key, bands_)
        return (key, base_view, gr.update(value=adapted_view, label=label), f"{why} {note}".strip(), [],
                gr.update(value=[], label=f"{label}: top chips"), None)

    def on_upload(upload, key, bands_, model_):
        new = use_scene(app, upload, key, bands_)
        return view(new[0], bands_, model_) if new[0] != key else (*new, gr.update(), gr.update(), gr.update())

    ui["upload"].upload(on_upload, [ui["upload"], ui["scene_key"], ui["band_order"], model], views + cleared,
                        api_visibility="private")
    ui["use_demo"].click(lambda b, m: view(DEMO_KEY, b, m), [ui["band_order"], model], views + cleared,
                         api_visibility="private")
    ui["band_order"].change(view, [ui["scene_key"], ui["band_order"], model], views + cleared, api_visibility="private")
    model.change(lambda key, b, m: view(key, b, m, f"The model changed to **{app.adapted_label(m)}**: search again."),
                 [ui["scene_key"], ui["band_order"], model], views + cleared, api_visibility="private")

    def on_open(key, bands_, model_, shown):  # the first time: the demo scene's view (later: what was there stays)
        return view(key, bands_, model_) if not shown else (key, *[gr.update()] * 6)

    ui["tab"].select(on_open, [ui["scene_key"], ui["band_order"], model, ui["base_map"]], views + cleared,
                     api_visibility="private")
