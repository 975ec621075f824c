"""The Embedding space maps (issue 34, part M), fast: the projection choice (the baseline map depends on the
baseline model only), the map-fidelity table under the maps, the colour-by choices, centroids and gap
arrow, the move figure the page animates, and the map search. On the tiny checkpoint and the synthetic
gallery of tests/test_app.py; layouts use the PCA + Procrustes path (no numba) unless a test stubs UMAP."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

import harma.projection as projection
from harma_app import plots
from harma_app import state as app_state
from harma_app import tab_embedding_space as space_tab
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return app_state.AppState(tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")["config"])


@pytest.fixture
def pca(monkeypatch):
    """Layouts without umap-learn (fast): PCA per model, Procrustes onto the baseline."""
    real = projection.aligned_2d
    monkeypatch.setattr(projection, "aligned_2d", lambda b, a, seed=0, **k: real(
        b, a, seed, use_umap=False, **({"base_xy": k["base_xy"]} if "base_xy" in k else {})))


def _view(state, colour="modality", lines=False):
    state._results.clear()
    more = (None, colour) if colour != "modality" else ()  # the default passes nothing: also runs on older code
    return space_tab.embedding_view(state, None, "data", lines, *more)


def _fake_umap(monkeypatch, fits: list):
    """umap-learn stand-in: ``umap_2d`` is a seeded linear map (recorded), AlignedUMAP fits both sets together."""
    def umap_2d(x, seed=0, n_neighbors=15, min_dist=0.1, init=None):
        fits.append(np.asarray(x).copy())
        return np.asarray(x, dtype=np.float64) @ np.random.default_rng(seed).normal(size=(np.asarray(x).shape[1], 2))

    class AlignedUMAP:  # the old default: each layout depends on both models
        def __init__(self, **kw):
            pass

        def fit(self, xs, relations=None):
            both = np.concatenate(xs).mean(0)
            self.embeddings_ = [umap_2d(x - both) for x in xs]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(AlignedUMAP=AlignedUMAP, UMAP=None))
    monkeypatch.setattr(projection, "umap_2d", umap_2d)


def test_baseline_map_depends_on_the_baseline_model_only(monkeypatch, tmp_path):
    """Each model gets its own layout and the adapted one is Procrustes-aligned onto the baseline's: another
    adapted model leaves the baseline map as it was (and its layout is reused from the cache, not refitted)."""
    fits = []
    _fake_umap(monkeypatch, fits)
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    one = projection.aligned_projection((img, cap), (img + 0.3, cap - 0.2), cache_dir=tmp_path)
    two = projection.aligned_projection((img, cap), (img * 2 + 1, cap), cache_dir=tmp_path)
    assert one["base"] == two["base"] and one["adapted"] != two["adapted"]
    assert one["method"] == projection.SEPARATE == two["method"]
    assert len(fits) == 3  # baseline once, then each adapted model: the baseline layout came from the cache
    # the adapted layout is its own layout, rotated/scaled/shifted onto the baseline's (least squares)
    own = fits[2] @ np.random.default_rng(0).normal(size=(8, 2))
    assert np.allclose(two["adapted"], projection.procrustes_onto(own, np.asarray(two["base"])), atol=1e-6)
    assert projection.MAP_NEIGHBORS == 30  # chosen by map fidelity on the bundled gallery (module docstring)


def test_fidelity_table_under_the_maps_is_map_fidelity_of_the_drawn_layouts(state, pca):
    from harma.map_fidelity import map_fidelity  # new with issue 34: imported here so the other tests run on older code

    base_fig, _, _, _, note = _view(state)
    view = state._results[("aligned", state.model_key(None), "data")]
    gallery, (b, a) = state.gallery("data"), state.retrievers(None, "data")
    n, classes, pool = len(view["img_rows"]), gallery.classes, gallery.pool
    ref = [map_fidelity(r.images.embeddings[view["img_rows"]], r.captions.embeddings[view["txt_rows"]],
                        np.asarray(view[w])[:n], np.asarray(view[w])[n:], [classes[i] for i in view["img_rows"]],
                        [classes[pool.images[j][0]] for j in view["txt_rows"]])
           for r, w in ((b, "base"), (a, "adapted"))]
    row = next(line for line in note.splitlines() if line.startswith("| k-NN modality purity"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    assert cells == pytest.approx([ref[0]["knn_modality_purity"], ref[1]["knn_modality_purity"],
                                   ref[0]["knn_modality_purity_2d"], ref[1]["knn_modality_purity_2d"]], abs=6e-4)
    assert "Map fidelity" in note and "| trustworthiness" in note and "k-NN scene purity" in note
    assert "changes by" in note and "Procrustes" in note  # the sign line, and which projection is shown
    assert "Procrustes" in [a.text for a in base_fig.layout.annotations if a.text][0]  # written on the map too


def test_fidelity_note_flags_a_change_of_the_wrong_sign():
    fid = [dict(knn_modality_purity=0.99, knn_modality_purity_2d=0.97, trustworthiness=0.9),
           dict(knn_modality_purity=0.95, knn_modality_purity_2d=0.99, trustworthiness=0.92)]
    note = space_tab.fidelity_note(fid)
    assert "+0.020 on the maps and -0.040 in the original space (opposite signs" in note
    fid[1]["knn_modality_purity_2d"] = 0.90
    assert "opposite" not in space_tab.fidelity_note(fid) and "0.920" in space_tab.fidelity_note(fid)


def test_colour_by_modality_is_the_default_with_centroids_and_the_gap_arrow(state, pca):
    base_fig, adapted_fig, move_fig, _, note = _view(state)
    names = [t.name for t in base_fig.data]
    assert names[:2] == ["images", "captions"] and "centroids, gap vector" in names
    assert base_fig.data[0].marker.color == plots.IMAGE_COLOR and base_fig.data[1].marker.color == plots.CAPTION_COLOR
    assert len(base_fig.data[0].x) == 24 and all(c.startswith("i:") for c in base_fig.data[0].customdata)
    assert all(c.startswith("t:") for c in base_fig.data[1].customdata)
    cent = base_fig.data[names.index("centroids, gap vector")]
    assert cent.x[0] == pytest.approx(np.mean(base_fig.data[0].x))
    assert cent.y[1] == pytest.approx(np.mean(base_fig.data[1].y))
    arrow = base_fig.layout.annotations[0]  # from the image centroid to the caption centroid
    assert (arrow.ax, arrow.ay, arrow.x, arrow.y) == pytest.approx((cent.x[0], cent.y[0], cent.x[1], cent.y[1]))
    assert base_fig.layout.legend.orientation == "h" and base_fig.layout.height >= 540  # legend under, not beside
    assert "coloured by modality" in note


def test_colour_by_scene_outcome_and_rank_change(state, pca):
    gallery = state.gallery("data")
    scene = _view(state, "scene")[0]
    groups = [t for t in scene.data if t.customdata is not None and t.mode == "markers"]
    assert [t.name for t in groups] == sorted(set(gallery.classes))
    assert len({t.marker.color for t in groups}) == len(groups)  # distinguishable: one colour per class
    assert all(c in plots.PALETTE for c in (t.marker.color for t in groups)) and len(set(plots.PALETTE)) >= 40
    assert {"shape: image", "shape: caption"} <= {t.name for t in scene.data}  # the marker shapes, named
    assert sum(len(t.x) for t in groups) == 24 + len(gallery.pool)

    base_fig, adapted_fig, _, _, _ = _view(state, "outcome")
    retrievers = state.retrievers(None, "data")
    view = state._results[("aligned", state.model_key(None), "data")]
    for fig, r in ((base_fig, retrievers[0]), (adapted_fig, retrievers[1])):
        outcome = {c: t.name for t in fig.data if t.customdata is not None for c in t.customdata}
        assert {t.name for t in fig.data if t.customdata is not None} <= {n for n, _ in plots.OUTCOMES}
        # image 0 against all distinct captions, by brute force
        sims = r.images.embeddings[0] @ r.captions.embeddings.T
        own = [j for j, imgs in enumerate(gallery.pool.images) if 0 in imgs]
        rank = int((sims > sims[own].max()).sum()) + 1
        want = plots.OUTCOMES[0 if rank == 1 else 1 if rank <= 10 else 2][0]
        assert outcome["i:0"] == want
    ranks = [plots.gt_ranks(view, gallery, r) for r in retrievers]
    change = _view(state, "rank")[0]
    got = {c: t.name for t in change.data if t.customdata is not None for c in t.customdata}
    for item, name in got.items():
        better, worse = ranks[1][item] < ranks[0][item], ranks[1][item] > ranks[0][item]
        assert name == plots.CHANGES[0 if better else 2 if worse else 1][0]


def test_move_figure_carries_both_layouts_without_frames(state, pca):
    base_fig, adapted_fig, move_fig, _, _ = _view(state, lines=True)
    assert not move_fig.frames  # Gradio's Plotly.react would drop them
    move = move_fig.layout.meta["move"]
    k = [t.name for t in move_fig.data].index("images")
    m = move["traces"].index(k)
    assert list(move_fig.data[k].x) == list(base_fig.data[k].x) == move["base"][m][0]  # drawn at the baseline
    assert move["adapted"][m][0] == pytest.approx(list(adapted_fig.data[k].x))
    steps = move_fig.layout.sliders[0].steps
    assert steps[0].method == "update" and steps[-1].label == "adapted"
    assert steps[-1].args[0]["x"][m] == pytest.approx(list(adapted_fig.data[k].x))
    lines = [t.name for t in move_fig.data].index("image–caption pairs")
    assert move["adapted"][move["traces"].index(lines)][0] == pytest.approx(list(adapted_fig.data[lines].x))
    assert move_fig.layout.updatemenus[0].buttons[0].method == "skip"  # played by linked_maps.js
    assert plots.RING not in [move_fig.data[i].name for i in move["traces"]]
    assert move_fig.layout.meta["thumbs"]["i:3"].endswith(state.gallery("data").images[3].name)


def test_map_search_rings_matching_captions_and_each_models_top_images(state):
    pool = state.gallery("data").pool
    word = pool.raw[0].split()[-1]
    hits, line = space_tab.map_search(state, None, "data", word.upper())
    hits = json.loads(hits)
    caps = {f"t:{j}" for j, t in enumerate(pool.raw) if word.lower() in t.lower()}
    for plot, r in zip(("baseline-plot", "adapted-plot"), state.retrievers(None, "data")):
        top = {f"i:{h.index}" for h in r.search_text(word.upper(), space_tab.SEARCH_K)}
        assert set(hits[plot]) == caps | top
    assert hits["move-plot"] == hits["adapted-plot"] and f"{len(caps)} caption(s)" in line
    assert space_tab.map_search(state, None, "data", "  ") == ("{}", "")
    assert json.loads(space_tab.map_search(state, None, "no such gallery", "x")[0]) == {}


def test_unknown_colour_falls_back_to_modality(state, pca):
    fig, *_, note = _view(state, "nonsense")
    assert [t.name for t in fig.data][:2] == ["images", "captions"] and "⚠️" not in note
