"""The app's state under stress: malformed adapter folders, a model switch while others are served, a cache
that cannot be written, an unreadable gallery image, and model keys that carry no server path (issue 36)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import threading

import gradio as gr
import pytest

from harma.data import write_synthetic_dataset
from harma.errors import ConfigError
from harma.io import CONFIG_NAME
from harma.retrieval import index as index_module
from harma_app import blocks, controls
from harma_app import state as app_state
from harma_app import tab_text_to_image as t2i
from tests.conftest import TINY_NAME
from tests.test_app import tiny_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warning

MALFORMED = {  # folder -> (adapter_config.json, what the reason names)
    "null-config": (None, "JSON object"),
    "null-base": ({"method": "harma", "model": {"model_name": TINY_NAME}, "base": None}, "base"),
    "bad-harma": ({"method": "harma", "model": {"model_name": TINY_NAME, "harma": "x"},
                   "base": {"model_name": TINY_NAME}}, "harma"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread):
    """The tiny models encode 50x faster on one thread than on two busy cores."""


LOADED: dict = {}  # the tiny models, loaded once for this file's states


def load_once(source, device):
    return LOADED.setdefault(source.adapters, app_state.load_models(source, device))


def fresh_state(setup, tmp_path, loader=load_once, **changes) -> app_state.AppState:
    """An app state on the tiny checkpoint and a gallery of 8 images (2 captions each), with a cache of its own."""
    data = write_synthetic_dataset(tmp_path / "data", n_images=8, captions_per_image=2, image_size=32)
    config = dataclasses.replace(setup["config"], data=str(data), cache_dir=str(tmp_path / "cache"), **changes)
    return app_state.AppState(config, loader)


def test_malformed_adapter_folders_are_listed_unavailable_with_the_reason(tmp_path, monkeypatch):
    for name, (config, _) in MALFORMED.items():
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / CONFIG_NAME).write_text(json.dumps(config))
    monkeypatch.setattr(app_state, "ROOT", tmp_path)
    state = app_state.AppState(app_state.AppConfig(cache_dir=str(tmp_path / "cache")))  # the app starts
    for name, (_, field) in MALFORMED.items():
        source = state.sources[f"checkpoint:{name}"]
        assert source.problem and CONFIG_NAME in source.problem and field in source.problem, source.problem
        assert state.adapted_label(source.key) == "Adapted"
        status = controls.status_text(state, source.key, "")
        assert "⚠️" in status and str(tmp_path) not in status  # the reason, without the server's path
    assert "checkpoints/null-base" in state.sources["checkpoint:null-base"].problem
    with pytest.raises(app_state.AppError, match="base"):
        state.models("checkpoint:null-base")


def test_a_model_switch_does_not_stall_the_loaded_model(setup, tmp_path):
    release, started = threading.Event(), threading.Event()

    def loader(source, device):
        if source.key == "checkpoint:other":  # a slow model: loads until released, then fails
            started.set()
            release.wait(30)
            raise app_state.AppError("cannot load other: gone")
        return load_once(source, device)

    state = app_state.AppState(setup["config"], loader)  # the shared cache: this test is about locks
    loaded = state.model_key(None)
    state.sources["checkpoint:other"] = dataclasses.replace(state.sources[loaded], key="checkpoint:other")
    state.retrievers(loaded, "data")
    failed = []
    switching = threading.Thread(target=lambda: failed.append(t2i.search_text(state, "red", 3, "checkpoint:other",
                                                                               "data")), daemon=True)
    served = []
    query = threading.Thread(target=lambda: served.append(t2i.search_text(state, "a red square", 3, loaded, "data")),
                             daemon=True)
    try:
        switching.start()
        assert started.wait(10)
        query.start()
        query.join(3)  # served while the other model is still loading
        assert not query.is_alive() and len(served[0][0]) == 3
        assert state.models(loaded) is not None and state.cached(("x",), lambda: 1) == 1
    finally:
        release.set()
        switching.join(10)
    assert not switching.is_alive() and "gone" in failed[0][2]
    assert state._making == {}  # a failed load leaves no lock behind: the next try loads again


def test_an_unwritable_cache_serves_from_memory_and_says_so_once(setup, tmp_path, monkeypatch, caplog):
    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(index_module, "atomic_write_bytes", full_disk)
    state = fresh_state(setup, tmp_path)
    with caplog.at_level(logging.WARNING):
        for query in ("a red square", "a blue circle"):
            base, adapted, msg = t2i.search_text(state, query, 4, None, "data")
            assert len(base) == len(adapted) == 4 and "⚠️" not in msg, msg
    warned = [r for r in caplog.records if "not cached" in r.getMessage()]
    assert len(warned) == 1  # the first failed write turned caching off, and said so once
    assert "not cached" in controls.status_text(state, None, "data")
    assert not list((tmp_path / "cache" / "index").glob("*/index.json"))


def test_an_unreadable_image_is_skipped_with_a_count(setup, tmp_path):
    images = fresh_state(setup, tmp_path).gallery("data").images
    bad = images[5]
    bad.write_bytes(b"not an image at all")
    state = fresh_state(setup, tmp_path)  # a fresh start sees the broken file
    gallery = state.gallery("data")
    assert len(gallery.images) == len(images) - 1 and bad not in gallery.images
    assert gallery.split.num_captions == 2 * (len(images) - 1) and len(gallery.pool.images) > 0
    base, adapted, msg = t2i.search_text(state, "a red square", 30, None, "data")
    assert len(base) == len(adapted) == len(images) - 1 and "⚠️" not in msg, msg  # every readable image, ranked
    status = controls.status_text(state, None, "data")
    assert f"skipped 1 of {len(images)} images" in status.lower() and bad.name in status
    assert str(tmp_path) not in status


def test_model_keys_name_folders_and_accept_the_earlier_forms(setup, tmp_path):
    state = app_state.AppState(setup["config"], load_once)
    adapters = setup["adapters"]
    key = f"checkpoint:{adapters.name}"
    assert key in state.sources and all("/" not in k for k in state.sources)
    for given in (adapters.name, key, f"checkpoint:{adapters.resolve()}", str(adapters)):
        assert state.model_key(given) == key
    with pytest.raises(app_state.AppError) as e:
        state.model_key("checkpoint:/srv/elsewhere/x")
    assert "/srv" not in str(e.value) and key in str(e.value)
    with pytest.raises(ConfigError, match="nope"):
        app_state.AppState(dataclasses.replace(state.config, model="nope"))
    demo = blocks.build_demo(dataclasses.replace(state.config, query_concurrency=3))
    assert next(f for f in demo.fns.values() if f.api_name == "search_text").concurrency_limit == 3
    picker = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "model")
    assert all(str(setup["base"]) not in str(value) for _, value in picker.choices)
    old = f"checkpoint:{adapters.resolve()}"  # what API clients sent before
    assert picker.preprocess(old) == old and "⚠️" not in controls.status_text(demo.harma_state, old, "data")
    assert "unknown model" in controls.status_text(demo.harma_state, picker.preprocess("nope"), "data")


def test_find_source_takes_keys_names_and_paths(tmp_path):
    from harma.sources import ModelSource, find_source

    sources = {"preset:rs": ModelSource("preset:rs", "rs (preset)", tmp_path / "checkpoints" / "ucm-harma"),
               "checkpoint:ucm-mrs": ModelSource("checkpoint:ucm-mrs", "ucm-mrs", tmp_path / "checkpoints" / "ucm-mrs")}
    for given, key in (("rs", "preset:rs"), ("ucm-harma", "preset:rs"), ("checkpoint:ucm-harma", "preset:rs"),
                       ("ucm-mrs", "checkpoint:ucm-mrs"), (str(tmp_path / "checkpoints" / "ucm-harma"), "preset:rs"),
                       (f"checkpoint:{tmp_path}/checkpoints/ucm-mrs", "checkpoint:ucm-mrs")):
        assert find_source(sources, given) == key, given
    assert find_source(sources, "nope") is None and find_source(sources, "/etc") is None
