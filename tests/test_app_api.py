"""The launched app called through ``gradio_client`` by its stable API names (``/search_text``, ``/search_image``)."""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Iterator

import pytest
from gradio_client import Client, handle_file

import harma_app as app
from harma.data import load_split
from tests.test_app import tiny_setup

pytestmark = [  # pandas deprecations raised inside gradio's own queue code
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: app.AppConfig) -> tuple[Any, str]:
    """The app for ``config`` served on a free local port with ``python app.py``'s launch options, for HTTP,
    API and browser tests: (its Blocks, to close afterwards; its URL)."""
    demo = app.build_demo(config)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **app.launch_options(demo))
    return demo, url


@contextlib.contextmanager
def serve(config: app.AppConfig) -> Iterator[str]:
    """:func:`start` for a ``with`` block: yields the URL and closes the app afterwards."""
    demo, url = start(config)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    with serve(setup["config"]) as url:
        yield setup, Client(url, verbose=False)


def test_search_text_returns_both_galleries(served):
    _, client = served
    base, adapted, status = client.predict("a red square on a grey field", 4, api_name="/search_text")
    assert len(base) == len(adapted) == 4 and "⚠️" not in status
    for gallery in (base, adapted):
        scores = [float(item["caption"].split("·")[1].split()[0]) for item in gallery]
        assert scores == sorted(scores, reverse=True) and all(item["image"] for item in gallery)


def test_search_image_with_a_file(served, tmp_path):
    setup, client = served
    image = load_split(setup["data"], "train").images[2]
    preview, base, adapted, status = client.predict(handle_file(str(image)), 3, api_name="/search_image")
    assert preview and len(base["data"]) == len(adapted["data"]) == 3 and "⚠️" not in status
    assert base["headers"] == ["rank", "score", "caption", "✓"]

    # a corrupt file with an image name: a message, and the app keeps serving
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    preview, base, _, status = client.predict(handle_file(str(fake)), 3, api_name="/search_image")
    assert preview is None and base["data"] in ([], [[]]) and "cannot read image" in status
    assert "fake.png" in status and "/" not in status.split("⚠️")[1]  # the file's name, not the server's path
    _, _, status = client.predict("", 4, api_name="/search_text")
    assert "type a query" in status
    assert len(client.predict("a blue circle", 2, api_name="/search_text")[0]) == 2


def test_parallel_queries_all_answer(served):
    """Query events are served concurrently; the model calls are serialised safely (a shared HF-style
    tokenizer and model), so every answer is complete and right."""
    import concurrent.futures

    _, client = served
    ref = client.predict("a red square on a grey field", 4, api_name="/search_text")

    def one(i: int):
        return client.predict("a red square on a grey field", 4, api_name="/search_text")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    for base, adapted, status in answers:
        assert "⚠️" not in status
        assert [x["caption"] for x in base] == [x["caption"] for x in ref[0]]
        assert [x["caption"] for x in adapted] == [x["caption"] for x in ref[1]]


def test_symlinked_images_folder_works_with_follow_links_and_the_cache_is_not_served(tmp_path_factory):
    import shutil

    import httpx

    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    linked = tmp_path_factory.mktemp("linked")
    for f in setup["data"].iterdir():
        if f.is_file():
            shutil.copy(f, linked / f.name)
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(setup["data"] / "images", store / "images")
    (linked / "images").symlink_to(store / "images", target_is_directory=True)
    config = app.AppConfig(data=str(linked), split="train", checkpoint=str(setup["adapters"]),
                           cache_dir=str(linked.parent / "linked-cache"), follow_links=True)
    opts = app.launch_options(app.build_demo(config))
    assert str((store / "images").resolve()) not in opts["allowed_paths"]  # shown through display copies
    assert not any(p.endswith("linked-cache") for p in opts["allowed_paths"])
    with serve(config) as url:
        base, adapted, status = Client(url, verbose=False).predict("a red square on a grey field", 4,
                                                                    api_name="/search_text")
        assert "⚠️" not in status and len(base) == len(adapted) == 4 and all(x["image"] for x in base)
        cached = next((linked.parent / "linked-cache" / "index").rglob("*.safetensors"))
        r = httpx.get(f"{url.rstrip('/')}/gradio_api/file={cached}")
        assert r.status_code in (403, 404), r.status_code


def test_compare_table_and_its_csv_are_served(served):
    _, client = served
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]
    assert [p["parameter_name"] for p in api["parameters"]] == ["model_key", "direction_label", "sort", "cls"]
    table, _, csv_path, note = client.predict(None, "Text → image (each caption)", "largest loss first",
                                              "all classes", api_name="/compare")
    assert table["headers"][:3] == ["caption", "image", "class"] and len(table["data"]) == 48, note
    with open(csv_path) as f:  # downloaded through the server: the export folder is served
        assert f.readline().startswith("caption,image,class,baseline rank")
