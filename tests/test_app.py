"""``harma_app`` handlers on a tiny checkpoint and a synthetic gallery: results, messages for bad input, caching.

The tiny checkpoint is HarMA adapters (perturbed off their zero init) on a random tiny backbone saved as a
base-weights file, so the app's baseline (same backbone, zero-shot) and adapted model differ. The setup is
built once per test session and shared with ``test_app_api.py`` and ``test_app_browser.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import time
from pathlib import Path

import gradio.utils
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import app  # the entry point (test_import_is_cheap_and_loads_no_model executes its file)
from harma import create_model, save_adapters
from harma.data import load_split, write_synthetic_dataset
from harma.encode import evaluate_split
from harma_app import blocks, common, controls
from harma_app import state as app_state
from harma_app import tab_embedding_space as space_tab
from harma_app import tab_image_to_text as i2t
from harma_app import tab_metrics as metrics_tab
from harma_app import tab_text_to_image as t2i
from tests.conftest import TINY_NAME, perturb_, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning


def tiny_setup(base: Path) -> dict:
    """Synthetic gallery (24 train images, 2 captions each) and a tiny adapter directory, built once per folder."""
    data, adapters, weights = base / "data", base / "adapters", base / "base.safetensors"
    if not (base / "ready").is_file():
        write_synthetic_dataset(data, n_images=24, captions_per_image=2, image_size=32)
        torch.manual_seed(0)
        save_file(open_clip.create_model(TINY_NAME).state_dict(), str(weights))
        model = create_model(dataclasses.replace(tiny_config(), base_weights=str(weights)))[0]
        perturb_(model)
        save_adapters(model, adapters)
        (base / "ready").touch()
    config = app_state.AppConfig(data=str(data), split="train", checkpoint=str(adapters), cache_dir=str(base / "cache"))
    return dict(base=base, data=data, adapters=adapters, weights=weights, config=config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")


@pytest.fixture(scope="module")
def state(setup):
    return app_state.AppState(setup["config"])


def _scores(tiles):
    return [float(re.match(r"#(\d+) · (-?[\d.]+)", caption).group(2)) for _, caption in tiles]


def test_import_is_cheap_and_loads_no_model(setup, monkeypatch):
    """Executing app.py (its dependencies already imported) builds nothing; its ``demo``, built on first access,
    is the UI only: no model, no UMAP."""
    calls = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("HARMA_DATA", str(setup["data"]))
    monkeypatch.setenv("HARMA_CHECKPOINT", str(setup["adapters"]))
    had_umap = "umap" in sys.modules
    spec = importlib.util.spec_from_file_location("app_fresh", Path(app.__file__))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "app_fresh", module)  # dataclasses look their module up
    t0 = time.perf_counter()
    spec.loader.exec_module(module)
    elapsed = time.perf_counter() - t0
    assert calls == [] and module.demo.harma_state._models == {} and module.demo.harma_state._galleries == {}
    assert had_umap or "umap" not in sys.modules
    assert elapsed < 5, f"executing app.py took {elapsed:.1f}s"
    assert module.demo.harma_state.default_model == f"checkpoint:{setup['adapters'].name}"


def test_parse_args_overrides_env(monkeypatch):
    monkeypatch.setenv("HARMA_DATA", "/from/env")
    monkeypatch.setenv("HARMA_UMAP_POINTS", "50")
    monkeypatch.setenv("HARMA_CACHE", "/cache/from/env")  # the documented name (not HARMA_CACHE_DIR)
    cfg, args = app_state.parse_args(["--checkpoint", "ck", "--port", "7000"])
    assert cfg.data == "/from/env" and cfg.checkpoint == "ck" and cfg.umap_points == 50 and args.port == 7000
    assert cfg.cache_dir == "/cache/from/env"
    assert app_state.parse_args(["--data", "d"])[0].data == "d"


def test_missing_default_checkpoints_and_no_dataset_are_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(app_state, "ROOT", tmp_path)  # a checkout without checkpoints/
    st = app_state.AppState(app_state.AppConfig(cache_dir=str(tmp_path / "cache")))
    assert st.default_model == "preset:rs-minilm-harma"
    status = controls.status_text(st, None, st.default_gallery)
    assert "checkpoints/rs-backbone" in status and "checkpoints/ucm-harma" in status and "README" in status
    assert "--checkpoint" in status and "No gallery yet" in status and "--data" in status
    base, adapted, msg = t2i.search_text(st, "many planes parked at an airport", 5, None, "")
    assert base == [] and adapted == [] and msg.startswith("⚠️") and "--data" in msg
    st.default_gallery = "data"
    st.config.data = str(tmp_path / "data")  # a gallery exists now; the model is what is missing
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    _, _, msg = t2i.search_text(st, "planes", 5, None, "data")
    assert "checkpoints/ucm-harma" in msg
    _, _, msg = t2i.search_text(st, "planes", 5, "preset:clip-vit-b-32-laion", "data")
    assert "no trained adapters" in msg


def test_search_text_both_models(setup, state):
    base, adapted, status = t2i.search_text(state, "a red square on a grey field", 5, None, "data")
    assert len(base) == len(adapted) == 5 and "⚠️" not in status
    for tiles in (base, adapted):
        assert all(Path(path).is_file() for path, _ in tiles)
        assert [int(c.split()[0][1:]) for _, c in tiles] == [1, 2, 3, 4, 5]
        assert _scores(tiles) == sorted(_scores(tiles), reverse=True)
    assert _scores(base) != _scores(adapted)  # the adapters change the ranking scores
    # the ✓ marks exactly the returned images with a matching ground-truth caption
    split = load_split(setup["data"], "train")
    truth = {i for c, i in zip(split.captions, split.text_to_image) if "a red square on a grey field" in c}
    assert truth and "✓" in status + "".join(c for _, c in base + adapted)
    all_tiles, _, _ = t2i.search_text(state, "a red square on a grey field", 24, None, "data")
    names = [p.name for p in split.images]  # a tile is the app's display copy, named "<key>-<image name>"
    marked = {names.index(Path(p).name.partition("-")[2]) for p, c in all_tiles if "✓" in c}
    assert marked == truth


def test_image_to_text_upload_and_pick(setup, state):
    split = load_split(setup["data"], "train")
    preview, base, adapted, status = i2t.search_image(state, str(split.images[0]), 4, None, "data")
    assert preview == str(split.images[0]) and len(base) == len(adapted) == 4 and "⚠️" not in status
    for rows in (base, adapted):
        scores = [r[1] for r in rows]
        assert [r[0] for r in rows] == [1, 2, 3, 4] and scores == sorted(scores, reverse=True)
    # picking tile 0 of the picker (image 0) ranks all captions from the stored embedding; ✓ = its own captions
    n_pool = len(state.gallery("data").pool)
    preview, base, adapted, _ = i2t.pick_image(state, 0, common.MAX_K, None, "data")
    assert Path(preview).name.endswith("-" + split.images[0].name) and len(base) == min(n_pool, common.MAX_K)
    own = {c.lower().strip(" .") for c, i in zip(split.captions, split.text_to_image) if i == 0}
    assert {r[2].lower().strip(" .") for r in base if r[3] == "✓"} == own
    assert len(i2t.picker_contents(state, "data")[1]) == len(i2t.picker_indices(state.gallery("data"))) == 24


def test_metrics_equal_evaluate_split(setup, state):
    rows, note = metrics_tab.metrics_table(state, None, "data")
    assert [r[0] for r in rows] == ["baseline (zero-shot)", "adapted"] and "24 images" in note
    pair = state.models(None)
    split = load_split(setup["data"], "train")
    for row, (model, preprocess, tokenizer) in zip(rows, (pair.baseline, pair.adapted)):
        ref = evaluate_split(model, split, preprocess, tokenizer, gap=False).metrics
        assert row[1:] == [round(ref[k], 2) for k in metrics_tab.METRIC_KEYS]


def test_embedding_view_is_cached(setup, monkeypatch, tmp_path):
    """Both models' maps come from one layout, computed once and then served from disk, also after a
    restart. The layout is the Procrustes path (fast): this tests the caching and the figures,
    tests/test_projection.py the layouts themselves."""
    import harma.projection

    calls = []
    real = harma.projection.aligned_2d

    def procrustes(base, adapted, seed=0, **_):
        calls.append(len(base))
        return real(base, adapted, seed, use_umap=False)

    monkeypatch.setattr(harma.projection, "aligned_2d", procrustes)
    config = dataclasses.replace(setup["config"], cache_dir=str(tmp_path / "cache"))  # nothing cached yet
    state = app_state.AppState(config)
    base_fig, adapted_fig, move_fig, rows, note = space_tab.embedding_view(state, None, "data")
    assert calls == [24 + 41]  # one layout for both models: 24 images and 41 distinct captions
    # coloured by modality (the default): an image trace and a caption trace, the same items in both maps
    images = base_fig.data[0]
    assert images.name == "images" and len(images.x) == 24 and images.hovertext[0].split(" (")[0].endswith(".png")
    assert [t.name for t in base_fig.data] == [t.name for t in adapted_fig.data]
    assert base_fig.layout.xaxis.range == adapted_fig.layout.xaxis.range  # shared axes
    # the move map starts at the baseline map and carries the adapted one for the page to animate to
    move = move_fig.layout.meta["move"]
    assert list(move_fig.data[0].x) == list(base_fig.data[0].x) == move["base"][0][0]
    assert move["adapted"][0][0] == pytest.approx(list(adapted_fig.data[0].x))
    assert [r[0] for r in rows] == [name for _, name, _ in space_tab.CI_ROWS + space_tab.GAP_ROWS]
    value, low, high = (float(x) for x in rows[1][2].replace("[", "").replace(",", "").replace("]", "").split())
    assert low <= value <= high  # relative modality gap of the adapted model, with its interval
    assert "Procrustes" in note and "coloured by modality" in note and "Map fidelity" in note
    lined = space_tab.embedding_view(state, None, "data", lines=True)[0]
    # one segment per (distinct caption, image it describes) pair: the split's 48 captions
    assert lined.data[0].mode == "lines" and lined.data[0].x.count(None) == 48
    files = list((tmp_path / "cache" / "projections").glob("aligned-*.json"))
    assert len(files) == 1
    fresh = app_state.AppState(config)  # a restarted app: layout and numbers served from disk
    monkeypatch.setattr(space_tab, "gap_with_intervals", lambda *a, **k: pytest.fail("numbers recomputed"))
    again = space_tab.embedding_view(fresh, None, "data")
    assert len(calls) == 1
    assert list(again[0].data[0].x) == list(base_fig.data[0].x) and again[3] == rows
    # the hover thumbnails: every mapped image, as a file the app serves
    assert again[0].layout.meta["thumbs"]["i:3"].endswith(state.gallery("data").images[3].name)


def test_gap_numbers_do_not_depend_on_file_order(setup, monkeypatch, tmp_path):
    """The same gallery with its annotation file listed in reverse: the same numbers and intervals
    (the bootstrap draws images by row, the modality probe samples captions by row)."""
    import shutil

    import harma.projection

    real = harma.projection.aligned_2d  # the Procrustes layout (fast); the numbers do not use it
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda b, a, seed=0, **_: real(b, a, seed, use_umap=False))
    reverse = tmp_path / "reverse"
    shutil.copytree(setup["data"], reverse)
    head, *rows = (reverse / "train.csv").read_text().splitlines()
    (reverse / "train.csv").write_text("\n".join([head, *rows[::-1]]) + "\n")
    got = []
    for data in (setup["data"], reverse):
        config = dataclasses.replace(setup["config"], data=str(data), cache_dir=str(tmp_path / f"cache-{data.name}"))
        got.append(space_tab.embedding_view(app_state.AppState(config), None, "data")[3])
    assert got[0] == got[1] and len(got[0]) == len(space_tab.CI_ROWS + space_tab.GAP_ROWS)


def test_bad_inputs_give_messages(setup, state, tmp_path, monkeypatch):
    for query in ("", "   ", None):
        base, adapted, msg = t2i.search_text(state, query, 5, None, "data")
        assert base == adapted == [] and msg.startswith("⚠️ type a query")
    base, _, msg = t2i.search_text(state, "red " * 200, "not a number", None, "data")
    assert len(base) == 8 and f"cut to {common.MAX_QUERY_CHARS} characters" in msg
    assert t2i.search_text(state, "?!.", 5, None, "data")[2].startswith("⚠️")  # empty after cleaning
    assert "unknown model" in t2i.search_text(state, "red", 5, "preset:nope", "data")[2]

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(load_split(setup["data"], "train").images[0]).read_bytes()[:60])
    for bad, expect in ((None, "upload an image"), (str(text), "cannot read image"),
                        (str(corrupt), "cannot read image"), (str(tmp_path / "gone.png"), "not found")):
        preview, base, adapted, msg = i2t.search_image(state, bad, 5, None, "data")
        assert preview is None and base == adapted == [] and expect in msg, msg
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is now a "bomb"
    assert "decompression bomb" in i2t.search_image(state, str(big), 5, None, "data")[3]
    monkeypatch.undo()

    missing = app_state.AppState(dataclasses.replace(setup["config"], data=str(tmp_path / "nowhere")))
    assert "does not exist" in t2i.search_text(missing, "red", 5, None, "data")[2]
    assert "does not exist" in controls.status_text(missing, None, "data")
    assert i2t.picker_contents(missing, "data")[1] == []
    # the app state still serves after all of that
    assert len(t2i.search_text(state, "a blue circle", 3, None, "data")[0]) == 3


def test_uploaded_gallery(setup, state, tmp_path):
    images = load_split(setup["data"], "train").images[:3]
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 10)
    key, status, picker = controls.use_uploads(state, [str(p) for p in images] + [str(junk)], None, "data")
    assert key.startswith("upload:") and "3 images" in status and "junk.jpg" in status
    assert len(picker["value"]) == 3 and picker["label"] == i2t.PICKER_LABEL
    base, adapted, msg = t2i.search_text(state, "a green triangle", 5, None, key)
    assert len(base) == len(adapted) == 3 and "⚠️" not in msg
    assert "no captions" in i2t.search_image(state, str(images[0]), 3, None, key)[3]
    assert "no captions" in metrics_tab.metrics_table(state, None, key)[1]
    again, _, _ = controls.use_uploads(state, [str(p) for p in images], None, "data")
    assert again == key  # same files, same gallery (and cached embeddings)
    assert controls.use_uploads(state, [str(junk)], None, "data")[0] == "data"  # nothing usable: keep the old gallery
    assert controls.use_dataset(state, None)[0] == "data"
    many = [tmp_path / f"bad{i}.jpg" for i in range(9)]
    for bad in many:
        bad.write_bytes(b"\x00" * 10)
    _, status, _ = controls.use_uploads(state, [str(p) for p in images + many], None, "data")
    assert "Skipped 9 file(s)" in status and "bad4.jpg" in status and "bad5.jpg" not in status and "and 4 more" in status


def test_cache_is_reused_across_restarts(setup, state):
    state.retrievers(None, "data")
    fresh = app_state.AppState(setup["config"])
    base, adapted = fresh.retrievers(None, "data")
    assert base.from_cache == adapted.from_cache == {"images": True, "captions": True}


def test_demo_wires_stable_api_names(setup):
    demo = blocks.build_demo(setup["config"])
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"search_text", "search_image", "embedding_view", "metrics", "status"} <= names
    assert gradio.utils.is_static_file(demo.harma_state.cache_dir / "thumbs" / "tile.jpg")  # served where it is
    opts = blocks.launch_options(demo)
    assert str(setup["data"].resolve()) not in opts["allowed_paths"] and "theme" in opts and "css" in opts
    assert opts["allowed_paths"] == [str(setup["base"].resolve() / "cache" / d) for d in ("thumbs", "uploads", "exports")]
    search = next(fn for fn in demo.fns.values() if fn.api_name == "search_text")
    assert search.concurrency_limit == common.QUERY_CONCURRENCY > 1  # served concurrently, not one at a time


def test_prebuilt_index_gallery_uses_the_matching_index(setup, tmp_path):
    """``--index`` (from training.build_index): the adapted side reads the prebuilt embeddings, the
    baseline side (no index given for it) is encoded by the app; an index for another model is not used."""
    from harma import load_adapters
    from harma.retrieval import build_image_index, list_images, model_identity

    images = setup["data"] / "images"
    model, _, preprocess, _ = load_adapters(setup["adapters"])
    built = build_image_index(model, preprocess, list_images(images), tmp_path / "idx", root=images,
                              identity=model_identity(model, setup["adapters"]))
    built.embeddings[:] = torch.roll(built.embeddings, 1, 0)  # a marker: results must come from this index
    built.save(tmp_path / "idx", extra=built.extra)
    cfg = app_state.AppConfig(index=str(tmp_path / "idx"), checkpoint=str(setup["adapters"]),
                              cache_dir=str(tmp_path / "c"))
    state = app_state.AppState(cfg)
    assert state.default_gallery == "index"
    base, adapted = state.retrievers(None, "index")
    assert torch.equal(adapted.images.embeddings, built.embeddings) and adapted.from_cache["images"]
    assert not base.from_cache["images"] and not torch.equal(base.images.embeddings, built.embeddings)
    tiles_base, tiles_adapted, status = t2i.search_text(state, "a red square", 3, None, "index")
    assert f"of {len(built)} images" in status
    _, rows = built.search(adapted.encode_text("a red square"), 3)
    assert [Path(t[0]).name.partition("-")[2] for t in tiles_adapted] == [built.image_paths()[r].name
                                                                            for r in rows.tolist()]
    # a broken index folder is a message, not a traceback
    cfg_bad = app_state.AppConfig(index=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c"))
    _, _, status = t2i.search_text(app_state.AppState(cfg_bad), "a red square", 3, None, "index")
    assert "--index" in status and "cannot read the index" in status


def test_tiff_tiles_are_converted_once_to_cached_jpegs(setup, tmp_path):
    """Browsers cannot show TIFF (UCM's format): tiles point at JPEG copies written once in the cache."""
    folder = tmp_path / "tifs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (300, 200), (40 * i, 90, 200)).save(folder / f"scene{i}.tif")
    state = app_state.AppState(app_state.AppConfig(data=str(folder), checkpoint=str(setup["adapters"]),
                                                   cache_dir=str(tmp_path / "c")))
    base, adapted, status = t2i.search_text(state, "a scene", 3, None, "data")
    paths = [Path(p) for p, _ in base + adapted]
    assert len(paths) == 6 and all(p.suffix == ".jpg" and p.parent == tmp_path / "c" / "thumbs" for p in paths)
    with Image.open(paths[0]) as img:
        assert max(img.size) == 256
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    again, _, _ = t2i.search_text(state, "a scene", 3, None, "data")
    assert again and all(Path(p).stat().st_mtime_ns == stamps[Path(p)] for p, _ in again)  # not rewritten


def test_one_progress_bar_through_numbered_steps(setup, tmp_path):
    """A cold gallery reports one bar: loading the models, then each model's images and captions, as
    "Step x of 5" with an overall fraction that only grows; a ready gallery reports nothing."""
    config = dataclasses.replace(setup["config"], cache_dir=str(tmp_path / "cache"))
    state, seen = app_state.AppState(config), []
    state.retrievers(None, "data", lambda fraction, desc: seen.append((fraction, desc)))
    fractions = [f for f, _ in seen]
    assert seen[0] == (0.0, "Step 1 of 5: loading the models") and fractions[-1] == pytest.approx(1.0)
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    steps = [d.split(":")[0] for _, d in seen]
    assert list(dict.fromkeys(steps)) == [f"Step {i} of 5" for i in range(1, 6)]
    assert any("captions with the adapted model" in d for _, d in seen if d.startswith("Step 5"))
    seen.clear()
    state.retrievers(None, "data", lambda fraction, desc: seen.append((fraction, desc)))
    assert seen == []
