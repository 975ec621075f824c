"""Issue 34, items 5 and 6 at handler level: after a model switch Text -> image and Image -> text re-run or clear
(never the previous model's tiles under the new label); UCM's numbered images named by scene; ``--split all``;
tiles naming file and class; example queries whose check mark means something; precompute ships every model.

The tiny checkpoint and gallery are ``tests/test_app.py``'s (built once per session); a second model is the same
backbone with other adapters, offered as a second model choice.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from harma import load_adapters, save_adapters
from harma.retrieval import CaptionPool
from harma_app import blocks, common, galleries
from harma_app import precompute as pre
from harma_app import state as app_state
from harma_app import tab_image_to_text as i2t
from harma_app import tab_text_to_image as t2i
from tests.conftest import perturb_
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning
QUERY = "a red square on a grey field"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """An app state offering the tiny checkpoint and a second one (other adapter weights, same backbone)."""
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    other = setup["base"] / "adapters-other"
    if not other.is_dir():
        model = load_adapters(setup["adapters"], "cpu", str(setup["weights"]))[0]
        torch.manual_seed(1)
        perturb_(model, seed=7, scale=0.2)
        save_adapters(model, other)
    state = app_state.AppState(setup["config"])
    first = state.default_model
    second = dataclasses.replace(state.sources[first], key="checkpoint:adapters-other", adapters=other,
                                 label="adapters-other")
    state.sources[second.key] = second
    return state, first, second.key


def scores(tiles):
    return [re.match(r"#\d+ · (-?[\d.]+)", caption).group(1) for _, caption in tiles]


def follow(state, *args, **kwargs):
    handler = getattr(blocks, "follow_queries", None)
    assert handler is not None, "no handler re-runs or clears Text -> image / Image -> text on a model switch"
    return handler(state, *args, **kwargs)


def test_a_model_switch_reruns_the_open_text_to_image_query_with_the_new_model(two_models):
    state, first, second = two_models
    before = t2i.search_text(state, QUERY, 4, first, "data", None)
    after = t2i.search_text(state, QUERY, 4, second, "data", None)
    assert scores(before[1]) != scores(after[1])  # the two models answer differently
    (base, adapted, note), (preview, b_rows, a_rows, i_note) = follow(state, "t2i", second, "data", 4, QUERY, None)
    assert scores(adapted) == scores(after[1]) and scores(base) == scores(after[0])
    assert note.startswith("Re-run for") and "Top 4" in note
    assert (preview, b_rows, a_rows, i_note) == (None, [], [], "")  # nothing was asked there


def test_a_model_switch_clears_the_results_of_a_tab_not_open_with_a_note(two_models):
    state, first, second = two_models
    (base, adapted, note), (preview, b_rows, a_rows, i_note) = follow(state, "space", second, "data", 4, QUERY,
                                                                      ("pick", 0))
    assert base == adapted == [] and b_rows == a_rows == [] and preview is None
    assert "Results cleared" in note and "Results cleared" in i_note and "search again" in note


def test_a_model_switch_reruns_the_picked_image_to_text_query(two_models):
    state, first, second = two_models
    want = i2t.pick_image(state, 1, 3, second, "data", None)
    t2i_v, (preview, b_rows, a_rows, note) = follow(state, "i2t", second, "data", 3, "", ("pick", 1))
    assert t2i_v == [[], [], ""] and b_rows == want[1] and a_rows == want[2] and note.startswith("Re-run for")
    assert i2t.pick_image(state, 1, 3, first, "data", None)[2] != a_rows  # the other model's rows differ


def ucm_like(root, ids, classes_file=None):
    """A PE-RSITR txt dataset (test split) of numeric image ids, one caption each (images are never opened)."""
    (root / "images").mkdir(parents=True)
    for i in ids:
        (root / "images" / f"{i}.tif").write_bytes(b"II*\x00")
    (root / "test_filename.txt").write_text("".join(f"{i}.tif\n" for i in ids))
    (root / "test_caps.txt").write_text("".join(f"scene number {i} .\n" for i in ids))
    if classes_file is not None:
        (root / "classes.txt").write_text(classes_file)
    return root


def classes_of(root, split="test"):
    gallery = galleries.dataset_gallery(str(root), split)
    return gallery.classes, gallery


def test_ucm_numbered_images_get_their_scene_names(tmp_path):
    classes, gallery = classes_of(ucm_like(tmp_path / "ucm", [1, 100, 101, 1601, 2100]))
    assert classes == ["agricultural", "agricultural", "airplane", "river", "tennis court"]
    assert t2i.tile_caption(gallery, 3) == "1601.tif · river"  # tiles name the file and its scene
    # ids that do not fill UCM's 21 blocks stay numbered; a documented classes.txt names any blocks
    assert classes_of(ucm_like(tmp_path / "other", [1, 150]))[0] == ["ids 1-100", "ids 101-200"]
    assert classes_of(ucm_like(tmp_path / "named", [1, 150], "fields\nroads\n"))[0] == ["fields", "roads"]
    with pytest.raises(galleries.DatasetError, match=r"classes.txt: 1 class names, but image ids go up to block 2"):
        galleries.scene_names(galleries.load_split(ucm_like(tmp_path / "short", [1, 150], "fields\n"), "test"))


def test_split_all_shows_every_split_together(tmp_path):
    root = ucm_like(tmp_path / "ucm", [91, 2091])
    (root / "train_filename.txt").write_text("1.tif\n2001.tif\n")
    (root / "train_caps.txt").write_text("first field .\nlast court .\n")
    for i in (1, 2001):
        (root / "images" / f"{i}.tif").write_bytes(b"II*\x00")
    classes, gallery = classes_of(root, "all")
    assert [p.name for p in gallery.images] == ["1.tif", "2001.tif", "91.tif", "2091.tif"]
    assert gallery.split.captions[gallery.split.text_to_image.index(3)] == "scene number 2091 ."
    assert classes == ["agricultural", "tennis court", "agricultural", "tennis court"] and len(gallery.pool) == 4
    (root / "test_filename.txt").write_text("1.tif\n2091.tif\n")  # an image in two splits is refused by name
    with pytest.raises(common.AppError, match=r"1.tif is in both the train and the test split"):
        galleries.dataset_gallery(str(root), "all")


def test_every_example_query_gets_a_check_mark_on_the_demo_gallery():
    split = galleries.load_split(common.DEMO, "test")
    pool = CaptionPool.from_captions(split.captions, split.text_to_image)
    queries = t2i.load_examples()
    assert queries == json.loads((common.ASSETS / "examples.json").read_text())["queries"] and len(queries) >= 6
    for q in queries:
        matched = pool.images_matching(q)
        assert 1 <= len(matched) < split.num_images, f"{q!r} matches {len(matched)} images"


def test_precompute_ships_every_available_model_by_default(two_models, monkeypatch, tmp_path):
    state, first, second = two_models
    shipped = []
    monkeypatch.setattr(pre, "PRECOMPUTED", tmp_path / "demo" / "precomputed")  # never the checkout's own folder
    monkeypatch.setattr(pre, "SHIPPED", tmp_path / "demo" / "precomputed" / "embeddings")
    (tmp_path / "demo" / "precomputed" / "embeddings").mkdir(parents=True)
    monkeypatch.setattr(state, "retrievers", lambda key, gallery, progress=None: shipped.append(key) or ())
    monkeypatch.setattr(pre, "aligned_view", lambda *a, **k: {})
    monkeypatch.setattr(pre, "ship_gap_rows", lambda *a, **k: None)
    monkeypatch.setattr(pre, "layout_key", lambda retrievers, gallery, points: str(len(shipped)))
    pre.precompute(state)
    usable = [k for k, s in state.sources.items() if s.problem is None]
    assert shipped == usable and first in usable and second in usable
    assert any(s.problem for s in state.sources.values())  # the unavailable presets (no adapters) are left out
