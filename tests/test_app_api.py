"""The launched app called through ``gradio_client`` by its stable API names (``/search_text``, ``/search_image``)."""

from __future__ import annotations

import socket

import pytest
from gradio_client import Client, handle_file

import app
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    demo = app.build_demo(setup["config"])
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **app.launch_options(demo))
    try:
        yield setup, Client(url, verbose=False)
    finally:
        demo.close()


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
    _, _, status = client.predict("", 4, api_name="/search_text")
    assert "type a query" in status
    assert len(client.predict("a blue circle", 2, api_name="/search_text")[0]) == 2
