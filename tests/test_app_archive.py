"""``python app.py --index`` with an archive index (format 2, :func:`harma.retrieval.build_archive`): the app
searches it as it lies on disk, resolves and shows only the rows it answers with, refuses a row leading
outside the image root, says which model has no index instead of encoding the archive, and says plainly
which tabs an archive cannot serve. A format-1 index is still a gallery as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

import harma_app as app
from harma import load_adapters
from harma.encode import encode_images
from harma.retrieval import ArchiveIndex, IndexPlan, Retriever, build_archive, build_image_index, model_identity
from harma.retrieval import retriever as retriever_module
from harma.retrieval.identity import IndexImages
from harma_app import state as app_state
from harma_app import tab_compare, tab_embedding_space, tab_image_to_text, tab_metrics, tab_modality_gap
from harma_app import tab_text_to_image as t2i
from tests.test_app import tiny_setup
from tests.test_app_api import serve

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # gr.Warning outside a request
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

QUERY = "a red square on a grey field"
ROWS = 3000
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (120, 120, 120)]
PLANTED = 100  # rows PLANTED.. PLANTED+4: near the query, one per image file
OUTSIDE = 7  # the query's own vector, with an id leading outside the image root


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An archive of ROWS rows over five image files (ids repeat): the files' real embeddings by the tiny
    adapted model, rows near the query, one row leading outside the root, random filler."""
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    base = tmp_path_factory.mktemp("archive")
    root = base / "root"
    (root / "chips").mkdir(parents=True)
    files = []
    for i, colour in enumerate(COLOURS):
        files.append(root / "chips" / f"c{i}.png")
        Image.new("RGB", (40, 40), colour).save(files[-1])
    Image.new("RGB", (40, 40), (0, 0, 0)).save(base / "outside.png")
    model, _, preprocess, tokenizer = load_adapters(setup["adapters"])
    emb = encode_images(model, files, preprocess).reshape(len(files), -1)
    q = Retriever(model, preprocess, tokenizer, None).encode_text(QUERY)
    x = torch.nn.functional.normalize(torch.from_numpy(np.random.default_rng(0).standard_normal((ROWS, q.numel()))
                                                       .astype(np.float32)), dim=-1)
    x[: len(files)] = emb
    x[PLANTED:PLANTED + len(files)] = torch.nn.functional.normalize(q + 0.3 * emb, dim=-1)
    x[OUTSIDE] = q
    ids = [f"chips/c{i % len(files)}.png" for i in range(ROWS)]
    ids[OUTSIDE] = "../outside.png"
    extra = {"kind": "images", "root": str(root), "model": model_identity(model, setup["adapters"])}
    plan = IndexPlan("ivf_flat", nlist=8, nprobe=8, train_size=ROWS)
    index = build_archive(base / "index", lambda: iter([x.numpy()]), ROWS, x.shape[1], plan, ids, extra=extra)
    return dict(setup=setup, base=base, root=root, files=files, index=index, query=q, model=model,
                preprocess=preprocess)


def test_text_query_answered_from_the_archive_over_http(archive, monkeypatch):
    """The adapted side's tiles are the index's own answer (the planted rows, read from disk, their files
    served as display copies), the row leading outside the root is named and not shown, the baseline side
    (no index of its own) says what to build, and only the answered rows' paths were resolved."""
    resolved = []
    real_path = ArchiveIndex.image_path
    monkeypatch.setattr(ArchiveIndex, "image_path", lambda self, row, follow_links=None: (
        resolved.append(row), real_path(self, row, follow_links))[1])
    monkeypatch.setattr(retriever_module, "encode_images", lambda *a, **k: pytest.fail("the app encoded the archive"))
    setup = archive["setup"]
    config = app.AppConfig(index=str(archive["base"] / "index"), checkpoint=str(setup["adapters"]),
                           cache_dir=str(archive["base"] / "cache"))
    with serve(config) as url:
        base, adapted, status = Client(url, verbose=False).predict(QUERY, 6, api_name="/search_text")
    scores, rows = archive["index"].search(archive["query"], 6)
    assert rows[0] == OUTSIDE and sorted(rows[1:].tolist()) == list(range(PLANTED, PLANTED + 5))
    expected = [f"c{(r - PLANTED) % 5}.png" for r in rows[1:].tolist()]
    assert [item["caption"].split("\n")[1] for item in adapted] == expected
    for item, name, score in zip(adapted, expected, scores[1:].tolist()):
        assert item["caption"].startswith(f"#{expected.index(name) + 2} · {score:.3f}")
        assert Path(item["image"]).read_bytes() == (archive["root"] / "chips" / name).read_bytes()  # over HTTP
    assert "Not shown, 1 image(s)" in status and "#1 ../outside.png" in status and "outside the index" in status
    assert base == [] and "baseline: no index" in status and "--baseline" in status
    assert sorted(resolved) == sorted(rows.tolist())  # the shown rows only, each once


def test_archive_gallery_is_lazy_and_other_tabs_say_why_not(archive, monkeypatch):
    setup = archive["setup"]
    state = app_state.AppState(app.AppConfig(index=str(archive["base"] / "index"), checkpoint=str(setup["adapters"]),
                                             cache_dir=str(archive["base"] / "cache2")))
    gallery = state.gallery("index")
    assert gallery.archive and isinstance(gallery.images, IndexImages) and len(gallery.images) == ROWS
    with pytest.raises(TypeError, match="one row at a time"):
        list(gallery.images)
    assert "3,000 images, an archive index" in gallery.describe() and gallery.classes is None
    assert tab_image_to_text.picker_contents(state, "index") == (tab_image_to_text.NO_PICKER, [])
    picker = tab_image_to_text.picker_view(state, "index")  # the Image -> text tab says why it has no picker
    assert picker["value"] == [] and picker["label"] == tab_image_to_text.NO_PICKER
    notes = [tab_embedding_space.embedding_view(state, None, "index", False, None)[-1],
             tab_embedding_space.map_search(state, None, "index", "red")[-1],
             tab_metrics.metrics_table(state, None, "index", None)[-1],
             tab_modality_gap.modality_gap_view(state, None, "index", None)[-1],
             tab_compare.compare_view(state, None, "index", next(iter(tab_compare.DIRECTIONS)), tab_compare.SORTS[0],
                                      tab_compare.ALL, None)[-1],
             tab_image_to_text.search_image(state, str(archive["files"][0]), 3, None, "index", None)[-1]]
    for tab, note in zip(["Embedding map", "Embedding map", "Metrics", "Modality gap", "Compare", "Image → text"],
                         notes):
        assert f"**{tab}** is not available for an archive index" in note, note
    # a model that built neither index: one message naming both sides, and nothing encoded
    monkeypatch.setattr(retriever_module, "encode_images", lambda *a, **k: pytest.fail("the app encoded the archive"))
    monkeypatch.setattr(retriever_module, "model_identity", lambda model, ckpt=None: {"model_name": "another"})
    _, _, status = t2i.search_text(state, QUERY, 4, None, "index")
    assert "was not indexed by this model" in status and "adapted model: no index of these 3,000 images" in status


def test_format_one_index_is_still_a_gallery(archive, tmp_path):
    """A format-1 index (below the archive size) is loaded whole and searched as before."""
    setup, root = archive["setup"], archive["root"]
    built = build_image_index(archive["model"], archive["preprocess"], archive["files"], tmp_path / "idx", root=root,
                              identity=model_identity(archive["model"], setup["adapters"]))
    state = app_state.AppState(app.AppConfig(index=str(tmp_path / "idx"), checkpoint=str(setup["adapters"]),
                                             cache_dir=str(tmp_path / "c")))
    gallery = state.gallery("index")
    assert not gallery.archive and gallery.images == built.image_paths()
    base, adapted, status = t2i.search_text(state, QUERY, 3, None, "index")
    assert len(base) == len(adapted) == 3 and "⚠️" not in status and f"of {len(built)} images" in status
    assert state.retrievers(None, "index")[1].images is not None and state.retrievers(None, "index")[1].from_cache["images"]
