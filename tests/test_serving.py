"""What the launched app serves (issue 36): only files it made itself (display copies, uploads, exports),
never a dataset or index folder, nor anything a dataset or index refers to outside its root.

Each probe asks the real server for ``/gradio_api/file=<path>``, as the issue's probe did: the secret or
outside file answers 403, a display copy the app returned answers 200.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from PIL import Image

import harma_app as app
from harma.data import DatasetError, load_split
from harma.errors import IndexFormatError
from harma.retrieval import EmbeddingIndex
from harma_app import galleries
from harma_app import state as app_state
from harma_app import tab_embedding_space as space_tab
from harma_app import tab_text_to_image as t2i
from tests.test_app import tiny_setup
from tests.test_app_api import start

pytestmark = [  # pandas deprecations raised inside gradio's own queue code; gr.Warning outside a request
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
QUERY = "a red square on a grey field"


def http_status(url: str, path) -> int:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Two launched apps over the issue's probe folders.

    ``csv``: a ``--data`` folder whose CSV also lists ``../../…/passwd`` and a symlink to an image outside.
    ``checkout``: ``--data`` on a checkout-like folder (``.git/``, ``.env``, ``runs/x/state.pt``, images,
    and ``shadow.jpg`` linking to a secret outside), with an ``--index`` whose index.json lists ``../../../x``.
    """
    setup = tiny_setup(tmp_path_factory.getbasetemp() / "harma-app")
    top = tmp_path_factory.mktemp("serving")
    outside = top / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (outside / "shadow").write_text("root:$6$secret:19000:0:99999:7:::\n")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(outside / "photo.png")

    data = top / "data"
    shutil.copytree(setup["data"], data)
    (data / "images" / "linked.png").symlink_to(outside / "photo.png")
    with (data / "train.csv").open("a") as f:
        f.write(f"{'../' * 30}{str(outside / 'passwd').lstrip('/')},{QUERY},red square\n"
                f"images/linked.png,{QUERY},red square\n")

    checkout = top / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "config").write_text("[core]\n")
    (checkout / ".env").write_text("HF_TOKEN=secret\n")
    (checkout / "runs" / "x").mkdir(parents=True)
    (checkout / "runs" / "x" / "state.pt").write_bytes(b"PK\x03\x04 optimizer state")
    shutil.copytree(setup["data"] / "images", checkout / "assets")
    (checkout / "assets" / "shadow.jpg").symlink_to(outside / "shadow")

    root = top / "store" / "a" / "b"  # the index's image root: ../../../x is top/x
    shutil.copytree(setup["data"] / "images", root)
    (top / "x").write_text("outside the index's root\n")
    index = EmbeddingIndex(["train_0000.png", "train_0001.png", "../../../x"], torch.randn(3, 32))
    index.save(top / "index", extra={"kind": "images", "root": str(root), "model": {}})

    common = dict(checkpoint=str(setup["adapters"]))
    csv_demo, csv_url = start(app.AppConfig(data=str(data), split="train", cache_dir=str(top / "cache-csv"), **common))
    co_demo, co_url = start(app.AppConfig(data=str(checkout), index=str(top / "index"),
                                           cache_dir=str(top / "cache-checkout"), **common))
    try:
        yield dict(top=top, outside=outside, data=data, checkout=checkout, index=top / "index",
                   csv=(csv_demo, csv_url), co=(co_demo, co_url))
    finally:
        csv_demo.close()
        co_demo.close()


def test_csv_reference_out_of_the_dataset_is_skipped_and_nothing_outside_is_served(probe):
    demo, url = probe["csv"]
    state = demo.harma_state
    for secret in (probe["outside"] / "passwd", probe["outside"] / "photo.png", probe["data"] / "images" / "linked.png",
                   probe["data"] / "images" / "train_0000.png", probe["data"] / "train.csv",
                   state.cache_dir / getattr(galleries, "SECRET_FILE", "secret")):
        assert http_status(url, secret) == 403, secret
    base, adapted, status = Client(url, verbose=False).predict(QUERY, 8, api_name="/search_text")
    assert "⚠️" not in status and "of 24 images" in status  # the two references out of the folder are skipped
    assert len(base) == len(adapted) == 8 and all(x["image"] for x in base)
    tiles, _, _ = t2i.search_text(state, QUERY, 3, None, "data")
    thumbs = [Path(p) for p, _ in tiles]
    assert all(p.parent == state.cache_dir / "thumbs" for p in thumbs)
    assert all(http_status(url, p) == 200 for p in thumbs)  # display copies are served (as the map hovers use)
    # the library refuses such a dataset when it may not drop images, and takes it when told to follow links
    with pytest.raises(DatasetError, match=r"2 of 26 images listed in .*train.csv resolve outside .*follow-links"):
        load_split(probe["data"], "train")
    assert load_split(probe["data"], "train", follow_links=True).num_images == 26


def test_link_out_of_an_image_folder_and_a_checkout_as_data_serve_nothing_of_theirs(probe):
    demo, url = probe["co"]
    state = demo.harma_state
    checkout = probe["checkout"]
    for secret in (probe["outside"] / "shadow", checkout / "assets" / "shadow.jpg", checkout / ".env",
                   checkout / ".git" / "config", checkout / "runs" / "x" / "state.pt",
                   checkout / "assets" / "train_0000.png"):
        assert http_status(url, secret) == 403, secret
    gallery = state.gallery("data")
    own = sorted(p.name for p in (checkout / "assets").iterdir() if not p.is_symlink())
    assert sorted(p.name for p in gallery.images) == own  # not shadow.jpg (nor anything in .git/ or runs/)
    tiles, _, status = t2i.search_text(state, QUERY, 3, None, "data")
    assert "⚠️" not in status and all(http_status(url, p) == 200 for p, _ in tiles)
    hover = space_tab.hover_thumbnails(state, gallery, [0, 5])
    assert all(http_status(url, p) == 200 for p in hover.values())
    assert sorted(app.launch_options(demo)["allowed_paths"]) == sorted(
        str(state.cache_dir / d) for d in ("thumbs", "uploads", "exports"))


def test_index_listing_a_file_outside_its_root_is_refused(probe):
    _, url = probe["co"]  # its default gallery is the index
    assert http_status(url, probe["top"] / "x") == 403
    base, adapted, status = Client(url, verbose=False).predict(QUERY, 3, api_name="/search_text")
    assert base == adapted == [] and "resolve outside" in status and "--follow-links" in status
    assert "Traceback" not in status and str(probe["top"]) not in status  # the file's name, not the server's path
    index = EmbeddingIndex.load(probe["index"])
    with pytest.raises(IndexFormatError, match=r"1 of 3 images .* outside .*: \.\./\.\./\.\./x"):
        index.image_paths()
    assert len(index.image_paths(follow_links=True)) == 3
    rootless = EmbeddingIndex(["/etc/hostname"], torch.randn(1, 4))
    with pytest.raises(IndexFormatError, match="records no image root"):
        rootless.image_paths()


def test_follow_links_flag_and_variable(monkeypatch):
    monkeypatch.delenv("HARMA_FOLLOW_LINKS", raising=False)
    assert app_state.parse_args(["--follow-links"])[0].follow_links
    assert not app_state.parse_args([])[0].follow_links
    assert app_state.AppConfig.from_env({"HARMA_FOLLOW_LINKS": "1"}).follow_links


def test_compare_by_class_from_a_fresh_api_client(probe):
    """The class choices are filled by the first table; a fresh client may filter at once."""
    _, url = probe["csv"]
    table, _, _, note = Client(url, verbose=False).predict(None, "Text → image (each caption)", "file order",
                                                           "red square", api_name="/compare")
    assert table["data"] and {row[2] for row in table["data"]} == {"red square"}, note
    _, _, _, note = Client(url, verbose=False).predict(None, "Text → image (each caption)", "file order", "volcano",
                                                       api_name="/compare")
    assert "no scene class 'volcano'" in note and "red square" in note


def test_display_copies(tmp_path):
    """A browser-ready image is linked (no decoding) and named by a keyed hash of its file; a TIFF becomes a
    small JPEG; a changed file gets a new copy; a text file with an image's name is not copied."""
    cache = tmp_path / "cache"
    png, tif, fake = tmp_path / "a.png", tmp_path / "b.tif", tmp_path / "c.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(png)
    Image.new("RGB", (600, 300), (9, 8, 7)).save(tif)
    fake.write_text("not an image")
    shown = Path(galleries.displayable(png, cache))
    assert shown.parent == cache / "thumbs" and shown.name.endswith("-a.png") and shown.read_bytes() == png.read_bytes()
    assert os.path.samestat(shown.stat(), png.stat())  # a hard link on the same file system
    jpeg = Path(galleries.displayable(tif, cache))
    with Image.open(jpeg) as img:
        assert img.format == "JPEG" and img.size == (256, 128)
    Image.new("RGB", (40, 30), (250, 2, 3)).save(png)
    os.utime(png, ns=(1, 1))
    assert Path(galleries.displayable(png, cache)) != shown
    with pytest.raises(DatasetError, match="cannot read image"):
        galleries.displayable(fake, cache)
