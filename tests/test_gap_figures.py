"""The modality-gap figures' numbers (harma.gap_figures) on hand-made cases and against the plain formulas."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from gradio_client import Client

from harma.errors import HarmaError
from harma.gap_figures import gap_figures
from harma.metrics import retrieval_metrics
from harma_app.tab_modality_gap import REOPEN, on_model_switch
from tests.test_app import tiny_setup
from tests.test_app_api import serve
from tests.test_app_follow import two_models  # noqa: F401  (a fixture: the tiny app with a second model)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_histograms_split_matched_from_unmatched_cosines():
    img = _unit([1, 0, 0], [0, 1, 0])
    txt = _unit([1, 0, 0], [0.6, 0.8, 0], [0, 1, 0])  # captions 0, 1 of image 0; caption 2 of image 1
    h = gap_figures(img, txt, [0, 0, 1], bins=10)["histogram"]
    # matched cosines: 1, 0.6, 1; unmatched: (img1, cap0) 0, (img1, cap1) 0.8, (img0, cap2) 0
    assert h["matched_mean"] == pytest.approx((1 + 0.6 + 1) / 3)
    assert h["unmatched_mean"] == pytest.approx(0.8 / 3)
    assert h["edges"][0] == pytest.approx(0.0) and h["edges"][-1] == pytest.approx(1.0)
    width = h["edges"][1] - h["edges"][0]
    assert sum(h["matched"]) * width == pytest.approx(1.0) and sum(h["unmatched"]) * width == pytest.approx(1.0)
    assert h["unmatched"][0] * width == pytest.approx(2 / 3)  # the two zeros sit in the first bin
    assert h["matched"][-1] * width == pytest.approx(2 / 3)  # the two ones in the last


def test_repeated_captions_count_as_often_as_the_split_has_them():
    """A split repeats captions ("a piece of farmland"): the figures score each distinct row once but count
    it as often as it occurs, so they equal the numbers of the full image x caption matrix."""
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(15, 5, generator=g), dim=-1)
    t2i = [i % 15 for i in range(40)]
    txt = F.normalize(img[t2i] + torch.randn(40, 5, generator=g), dim=-1)
    txt[20:30] = txt[3]  # one caption ten more times, for ten other images
    out = gap_figures(img, txt, t2i, k=6, bins=8)
    sim = img @ txt.T
    own = torch.zeros_like(sim, dtype=torch.bool)
    own[t2i, torch.arange(40)] = True
    h = out["histogram"]
    lo, hi = h["edges"][0], h["edges"][-1]
    expected = torch.histc(sim[~own], bins=8, min=lo, max=hi).double()
    width = h["edges"][1] - h["edges"][0]
    assert torch.allclose(torch.tensor(h["unmatched"], dtype=torch.float64), expected / (expected.sum() * width), atol=1e-9)
    assert h["unmatched_mean"] == pytest.approx(float(sim[~own].double().mean()))
    within = img @ img.T
    within.fill_diagonal_(-float("inf"))
    nearest = torch.cat([within, sim], 1).topk(6, dim=1).indices
    assert out["neighbours"]["all"] == pytest.approx(float((nearest >= 15).double().mean()))
    assert out["neighbours"]["chance"] == pytest.approx(40 / 54)


def test_gap_dimensions_name_the_dimensions_that_carry_the_gap():
    img = _unit([1, 0, 0.1, 0], [1, 0, -0.1, 0])
    txt = _unit([0, 1, 0.1, 0.2], [0, 1, -0.1, 0.2])
    d = gap_figures(img, txt, [0, 1])["dimensions"]
    delta = img.double().mean(0) - txt.double().mean(0)
    assert d["squared_distance"] == pytest.approx(float(delta @ delta))
    assert d["top_dims"][:2] in ([0, 1], [1, 0]) and d["top_dims"][2] == 3
    assert sum(d["top_shares"]) == pytest.approx(1.0)
    assert d["cumulative"][-1] == pytest.approx(d["squared_distance"])
    assert d["dims_for_50"] == 2 and d["dims_for_90"] == 2  # dims 0 and 1 carry about 48% each, dim 3 the rest


@pytest.mark.parametrize("ties", [False, True])
def test_shift_curve_is_r1_of_the_explicitly_shifted_images(ties):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 6, generator=g) + 1.5, dim=-1)
    t2i = [i % 12 for i in range(30)]
    txt = F.normalize(img[t2i] + 0.8 * torch.randn(30, 6, generator=g) - 1.0, dim=-1)
    if ties:  # a caption equal to another: tied scores, counted at their expected rank as in harma.metrics
        txt[5] = txt[17]
    lambdas = [-1.0, 0.0, 0.5, 1.0, 2.0]
    curve = gap_figures(img, txt, t2i, lambdas=lambdas)["shift"]
    delta = img.mean(0) - txt.mean(0)
    for j, lam in enumerate(lambdas):
        m = retrieval_metrics(F.normalize(img - lam * delta, dim=-1) @ txt.T, t2i)
        assert curve["i2t_R@1"][j] == pytest.approx(m["i2t_R@1"], abs=1e-4)
        assert curve["t2i_R@1"][j] == pytest.approx(m["t2i_R@1"], abs=1e-4)
    assert len(set(curve["t2i_R@1"])) > 1  # the shift changes retrieval in this case


def test_caption_share_of_neighbours_per_class():
    # class "apart": images near e0, their captions on e1 (a gap); class "mixed": each caption on its image
    img = _unit([1, 0, 0, 0.1], [1, 0, 0, -0.1], [0, 0, 1, 0.1], [0, 0, 1, -0.1])
    txt = _unit([0, 1, 0, 0.1], [0, 1, 0, -0.1], [0, 0, 1, 0.1], [0, 0, 1, -0.1])
    n = gap_figures(img, txt, [0, 1, 2, 3], ["apart", "apart", "mixed", "mixed"], k=1)["neighbours"]
    assert n["classes"] == ["apart", "mixed"] and n["counts"] == [2, 2]
    assert n["shares"] == pytest.approx([0.0, 1.0])
    assert n["all"] == pytest.approx(0.5) and n["chance"] == pytest.approx(4 / 7)
    assert gap_figures(img, txt, [0, 1, 2, 3], k=1)["neighbours"]["classes"] == []


def test_bad_input_is_a_message():
    img, txt = _unit([1, 0], [0, 1]), _unit([1, 0], [0, 1])
    with pytest.raises(HarmaError, match="every image needs at least one caption"):
        gap_figures(img, txt, [0, 0])
    with pytest.raises(HarmaError, match="one image index"):
        gap_figures(img, txt, [0, 5])
    with pytest.raises(HarmaError, match="3 classes for 2 images"):
        gap_figures(img, txt, [0, 1], ["a", "b", "c"])


# -- the app's tab, through its API name --------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
def test_modality_gap_tab_answers_through_the_api(tmp_path_factory):
    """``/modality_gap`` on the tiny app: four figures of both models (histograms, gap dimensions, the shift
    curve, neighbours per class) and a note; a second call comes from the cache."""
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")  # shared with the other app tests
    with serve(setup["config"]) as url:
        client = Client(url, verbose=False)
        *figs, note = client.predict(api_name="/modality_gap")
        t0 = time.perf_counter()
        client.predict(api_name="/modality_gap")
        again = time.perf_counter() - t0
    assert "⚠️" not in note and "48 captions" in note
    data = [json.loads(f["plot"])["data"] for f in figs]
    assert [len(d) for d in data] == [4, 2, 4, 2]  # (un)matched x 2 models; 2 models; 2 directions x 2; 2
    assert {t["name"] for t in data[3]} == {"Baseline", "Adapted (HarMA)"}
    assert again < 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_tab_follows_the_model_picker(two_models):  # noqa: F811
    """A switch while the tab is open recomputes it for the new model; on another tab it is cleared with a
    note (never the previous model's figures under the new model's name)."""
    state, first, second = two_models
    assert on_model_switch(state, "metrics", second, "data") == (None, None, None, None, REOPEN)
    figs = [on_model_switch(state, "gap", key, "data")[:4] for key in (first, second)]
    hist = [[list(t.y) for t in f[0].data if t.xaxis == "x2"] for f in figs]  # the adapted panel
    assert hist[0] != hist[1]
    assert [t.y for t in figs[0][0].data if t.xaxis == "x"] == [t.y for t in figs[1][0].data if t.xaxis == "x"]
