"""The Compare tab: per-query ranks of both models, sorting, class filter, CSV export, a selected row."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from harma_app import state as app_state
from harma_app import tab_compare as compare
from harma_app import tab_metrics as metrics_tab
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning
T2I, I2T = list(compare.DIRECTIONS)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return app_state.AppState(tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")["config"])


def test_ranks_agree_with_the_metrics_tab(state):
    records = compare.query_ranks(state, None, "data", "t2i")
    split = state.gallery("data").split
    assert [r["caption"] for r in records] == split.captions and all(r["adapted"] >= 1 for r in records)
    table, _ = metrics_tab.metrics_table(state, None, "data", progress=None)
    # a caption query's candidates are distinct images, so its scores do not tie: R@1 is the share at rank 1
    for row, side in zip(table, ("baseline", "adapted")):
        r_at_1 = 100 * sum(r[side] == 1 for r in records) / len(records)
        assert row[4] == pytest.approx(r_at_1, abs=0.01)  # columns: model, i2t R@1/5/10, t2i R@1, ...
    images = compare.query_ranks(state, None, "data", "i2t")
    assert [r["image"] for r in images] == [p.name for p in split.images]
    assert all(len(r["captions"].split(" | ")) == 2 for r in images)


def test_sort_filter_and_csv_export(state):
    table, classes, queries, path, note = compare.compare_view(state, None, "data", T2I, compare.SORTS[0], None,
                                                               progress=None)
    rows = table.values.tolist()
    gains = [row[5] for row in rows]
    assert gains == sorted(gains, reverse=True) and len(rows) == len(queries) == 48
    assert "queries: the adapters ranked the right answer higher for" in note
    with open(path, newline="") as f:
        exported = list(csv.reader(f))
    assert exported[0] == compare.HEADERS["t2i"] and len(exported) == 49
    assert [e[0] for e in exported[1:]] == [row[0] for row in rows]
    labels = [c for c in classes.choices if c[0] != compare.ALL]
    assert len(labels) >= 2
    one = labels[0][0]
    table, _, queries, _, _ = compare.compare_view(state, None, "data", I2T, compare.SORTS[1], one, progress=None)
    rows = table.values.tolist()
    assert rows and all(row[1] == one for row in rows)
    losses = [row[5] for row in rows]
    assert losses == sorted(losses)
    assert list(table.columns) == compare.HEADERS["i2t"]


def test_a_selected_row_shows_both_models(state):
    _, _, queries, _, _ = compare.compare_view(state, None, "data", T2I, compare.SORTS[3], None, progress=None)
    base, adapted, preview, base_caps, adapted_caps, status = compare.show_row(state, 3, queries, T2I, 5, None, "data",
                                                                               progress=None)
    caption = state.gallery("data").split.captions[queries[3]]
    assert len(base) == len(adapted) == 5 and preview is None and caption[:20] in status
    _, _, queries, _, _ = compare.compare_view(state, None, "data", I2T, compare.SORTS[3], None, progress=None)
    base, adapted, preview, base_caps, adapted_caps, status = compare.show_row(state, 0, queries, I2T, 4, None, "data",
                                                                               progress=None)
    assert base == [] and preview.endswith(state.gallery("data").split.images[0].name)
    assert len(base_caps) == len(adapted_caps) == 4 and any(row[3] == "✓" for row in adapted_caps + base_caps)
    assert "no row 99" in compare.show_row(state, 99, queries, I2T, 4, None, "data", progress=None)[-1]


def test_views_follow_the_model_and_toasts_are_plain(state):
    from harma_app.common import plain_text

    assert state.adapted_label(None) == "Adapted (HarMA)"  # the tiny adapters are HarMA's
    assert plain_text("Open **Gallery source** or pass `--data DIR`") == "Open Gallery source or pass --data DIR"


def test_a_shipped_map_is_used_only_for_its_models_and_gallery(state, tmp_path, monkeypatch):
    import json

    import harma.projection
    from harma_app import plots
    from harma_app import tab_embedding_space as space_tab

    gallery, retrievers = state.gallery("data"), state.retrievers(None, "data")
    real = harma.projection.aligned_2d
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda b, a, seed=0, **k: real(b, a, seed, use_umap=False))
    fake = plots.aligned_view(retrievers, gallery, 1000, tmp_path / "cache")  # a real map (Procrustes), then marked
    fake["base"][0] = [123.0, 456.0]
    key = plots.layout_key(retrievers, gallery, 1000)
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / f"aligned-{key}.json").write_text(json.dumps(fake))
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fit")))
    assert plots.aligned_view(retrievers, gallery, 1000, tmp_path / "none", tmp_path / "shipped") == fake
    monkeypatch.setattr(space_tab, "PRECOMPUTED", tmp_path / "shipped")
    state._results.clear()
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda b, a, seed=0, **k: real(b, a, seed, use_umap=False))
    other = space_tab.embedding_view(state, None, "data")[0]  # not the bundled gallery: no lookup (no hashing)
    assert 123.0 not in [x for t in other.data for x in t.x]
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fit")))
    monkeypatch.setattr(gallery, "bundled", True)  # shipped maps are looked up for the bundled gallery only
    state._results.clear()
    base_fig = space_tab.embedding_view(state, None, "data")[0]
    assert 123.0 in [x for t in base_fig.data for x in t.x]
    # another sample size (or other weights, or other images) is another key: not the shipped map
    assert plots.layout_key(retrievers, gallery, 999) != key
    assert plots.layout_key(retrievers[::-1], gallery, 1000) != key
    with pytest.raises(AssertionError, match="fit"):
        plots.aligned_view(retrievers, gallery, 999, tmp_path / "none", tmp_path / "shipped")


def test_a_map_pick_shows_the_item_and_a_selection_its_images(state):
    from harma_app import tab_embedding_space as space_tab

    split, pool = state.gallery("data").split, state.gallery("data").pool
    image, text, tiles = space_tab.show_pick(state, "data", '{"kind": "click", "ids": ["i:3"]}')
    own = [c for c, i in zip(split.captions, split.text_to_image) if i == 3]
    assert image.endswith(split.images[3].name) and all(c in text for c in own) and len(tiles) == 1
    image, text, tiles = space_tab.show_pick(state, "data", '{"kind": "click", "ids": ["t:0"]}')
    assert pool.raw[0] in text and len(tiles) == len(pool.images[0])
    assert image.endswith(split.images[pool.images[0][0]].name)
    _, text, tiles = space_tab.show_pick(state, "data", '{"kind": "select", "ids": ["i:1", "i:2", "t:0", "i:1"]}')
    assert len(tiles) == len({1, 2, *pool.images[0]}) and "Selected 2 image(s) and 1 caption(s)" in text
    assert space_tab.show_pick(state, "data", '{"kind": "select", "ids": ["i:999", "x"]}')[2] == []
    assert "cannot be read" in space_tab.show_pick(state, "data", "not json")[1]
    deep = '{"ids": ' + "[" * 100_000 + "]" * 100_000 + "}"  # a visitor's payload nested 100k deep
    assert "cannot be read" in space_tab.show_pick(state, "data", deep)[1]


def test_precompute_ships_what_a_fresh_start_then_reads(state, tmp_path, monkeypatch):
    """``python -m harma_app.precompute``: each model's embeddings and map, stale files removed; a fresh
    app on the bundled gallery answers from them without encoding or fitting anything."""
    import harma.projection
    import harma.retrieval.retriever
    from harma_app import precompute as pre
    from harma_app import tab_embedding_space as space_tab

    shipped = tmp_path / "precomputed"
    monkeypatch.setattr(pre, "PRECOMPUTED", shipped)
    monkeypatch.setattr(pre, "SHIPPED", shipped / "embeddings")
    (shipped / "embeddings" / "stale").mkdir(parents=True)
    (shipped / "aligned-stale.json").write_text("{}")
    real = harma.projection.aligned_2d
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda b, a, seed=0, **k: real(b, a, seed, use_umap=False))
    written = pre.precompute(state, [state.default_model])
    assert len(written) == 6 and sorted(p.name for p in shipped.iterdir())[0].startswith("aligned-")
    assert len(list((shipped / "gap").glob("*.json"))) == 1  # the numbers table, shipped too
    assert not (shipped / "embeddings" / "stale").exists() and not (shipped / "aligned-stale.json").exists()

    fresh = app_state.AppState(dataclasses.replace(state.config, cache_dir=str(tmp_path / "cache")))
    monkeypatch.setattr(app_state, "SHIPPED", shipped / "embeddings")
    monkeypatch.setattr(space_tab, "PRECOMPUTED", shipped)
    monkeypatch.setattr(fresh.gallery("data"), "bundled", True)
    monkeypatch.setattr(harma.retrieval.retriever, "encode_images", lambda *a, **k: pytest.fail("encoded"))
    monkeypatch.setattr(harma.projection, "aligned_2d", lambda *a, **k: pytest.fail("fitted"))
    monkeypatch.setattr(space_tab, "modality_gap", lambda *a, **k: pytest.fail("gap numbers computed"))
    base, adapted = fresh.retrievers(None, "data")
    assert base.from_cache == adapted.from_cache == {"images": True, "captions": True}
    view = space_tab.embedding_view(fresh, None, "data")
    assert view[0] is not None and len(view[3]) > 4  # the maps, and the numbers table from the shipped file
    monkeypatch.setattr(pre, "DEMO_MAX_BYTES", 1000)  # the shipped files no longer fit the demo folder's budget
    with pytest.raises(pre.AppError, match=r"MiB, over its 0 MiB budget: ship fewer models"):
        pre.precompute(state, [state.default_model])
