"""``python -m training.build_index`` under torchrun (2 processes, gloo, CPU) and the merge step.

A 2-process build gives the index of a 1-process one bit for bit (same shards, same batches); a
killed process's shards are encoded by the next run of the same command (in any number of processes)
and only they are; a
``--merge-only`` with shards missing names them and the rank that had them; above the exact-search
size the shards are merged into an archive index without holding all embeddings at once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from harma import create_model, load_adapters, save_adapters
from harma.retrieval import ArchiveIndex, EmbeddingIndex, IndexPlan, build_image_index, list_images, load_index
from harma.retrieval.folder import encode_shards, image_shards, prepare_build
from harma.retrieval.shards import ShardSet, assign
from tests.conftest import TINY_NAME, perturb_, tiny_config
from training.build_index import main

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, SHARD, BIG = 13, 2, 6  # 7 shards of 2; image 6 (shard 3, rank 1's second) is slow to decode


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread in this process, as in the torchrun workers (OMP_NUM_THREADS=1): same sums."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny adapter checkpoint on disk (its backbone as a base-weights file) and an image folder."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    base = tmp / "base.safetensors"
    save_file(open_clip.create_model(TINY_NAME).state_dict(), str(base))
    model = create_model(dataclasses.replace(tiny_config(), base_weights=str(base)))[0]
    perturb_(model)
    adapters = save_adapters(model, tmp / "adapters")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        side = 3000 if i == BIG else 16  # a 3000 x 3000 PNG takes a few hundred ms to decode and resize
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((side, side)).save(images / f"{i:02d}.png", compress_level=1)
    return dict(adapters=adapters, images=images, tmp=tmp)


def _args(s, out, *extra):
    return ["--checkpoint", str(s["adapters"]), "--images", str(s["images"]), "--out", str(out),
            "--shard-size", str(SHARD), "--batch-size", "4", "--num-workers", "0", *extra]


def _torchrun(s, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.build_index", *_args(s, out, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _worker_pid(agent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun worker ``rank`` (a child of ``agent`` with RANK=rank in its environment)."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == agent and f"\0RANK={rank}\0".encode() in b"\0" + (proc / "environ").read_bytes():
                    return int(proc.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker with RANK={rank}")


@pytest.fixture(scope="module")
def one_process(setup):
    """The index a plain 1-process build makes, with one torch thread as the workers have."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(setup, setup["tmp"] / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    return EmbeddingIndex.load(setup["tmp"] / "one")


def _same(index, ref):
    assert index.ids == ref.ids and torch.equal(index.embeddings, ref.embeddings)  # bit for bit
    q = F.normalize(torch.randn(3, ref.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert all(torch.equal(a, b) for a, b in zip(index.search(q, 5), ref.search(q, 5)))


def test_shards_of_two_ranks_merge_into_the_index_of_one(setup, one_process, capsys):
    """Each rank's share (every 2nd shard) encoded on its own, then ``--merge-only``: the 1-process
    index, bit for bit. (The torchrun job of the next test ends in the same comparison.)"""
    model, _, transform, _ = load_adapters(setup["adapters"])
    images = list_images(setup["images"])
    shards = image_shards(images, setup["tmp"] / "ranks", root=setup["images"], shard_size=SHARD)
    todo = prepare_build(shards, {"m": 1})
    parts = assign(todo, 2)
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
    for rank in (1, 0):
        encode_shards(model, transform, shards, parts[rank], pending=todo, batch_size=4)
    merge = ["--images", str(setup["images"]), "--out", str(shards.out)]  # the shard size is read from the shards
    assert main(merge + ["--merge-only", "--memory-gb", "0"]) == 2
    assert main(merge + ["--shard-size", str(SHARD)]) == 2  # a build needs the model
    assert main(merge + ["--merge-only"]) == 0  # no model: the identity is the manifest's
    index = EmbeddingIndex.load(shards.out)
    assert index.extra["model"] == {"m": 1} and not shards.folder.exists()
    _same(index, one_process)
    err = capsys.readouterr().err
    assert "--memory-gb 0.0: must be a positive number" in err and "--checkpoint is required" in err


@pytest.mark.slow  # a torchrun job of 2 processes: most of the time is its start-up
def test_a_killed_rank_resumes_and_merge_only_names_what_is_missing(setup, one_process, capsys):
    out = setup["tmp"] / "killed"
    shards = ShardSet(out, list_images(setup["images"]), [], SHARD)
    proc = _torchrun(setup, out)
    deadline = time.monotonic() + 120
    rank1 = _worker_pid(proc.pid, 1, deadline)
    while not shards.path(1).exists():  # rank 1's first shard; its next one holds the slow image
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before rank 1 wrote a shard"
        time.sleep(0.005)  # well inside the few hundred ms rank 1 spends on the slow image
    os.kill(rank1, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0  # torchrun stops the other rank too
    missing = [s for s in range(len(shards)) if not shards.path(s).exists()]
    assert 3 in missing and 5 in missing and 1 not in missing and not (out / "index.json").exists()

    assert main(["--images", str(setup["images"]), "--out", str(out), "--merge-only"]) == 2
    msg = capsys.readouterr().err
    assert f"{len(missing)} of 7 shards are not encoded" in msg and f"shard {', '.join(map(str, missing))}" in msg
    assert "rank 1 of 2: " + ", ".join(str(s) for s in missing if s % 2) in msg and "run the same build command" in msg

    # the same command again, here in one process (a resumed build need not have the killed one's world size)
    assert main(_args(setup, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming: {7 - len(missing)} of 7 shards already encoded" in err
    encoded = [line.split(": ")[-1] for line in err.splitlines() if f"encoding {len(missing)} of 7 shards: " in line]
    assert [int(s) for s in encoded[0].split(", ")] == missing
    _same(EmbeddingIndex.load(out), one_process)


class _Linear(torch.nn.Module):
    """A stand-in encoder: a fixed random projection of the pixels (encoding thousands is instant)."""

    def __init__(self, d_in: int, dim: int = 32) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_in, dim, bias=False)

    def encode_image(self, x, normalize=True):
        return F.normalize(self.proj(x.flatten(1)), dim=-1)


def test_above_the_exact_size_the_shards_become_an_archive_index(tmp_path):
    """With the plan lowered to IVF-Flat, 3,000 images (one unreadable) go through build_archive: ids in
    row order, the unreadable one listed, every row finds itself, the shards removed."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(images / f"{i:04d}.bmp")
    (images / "1500.bmp").write_bytes(b"not a bitmap")
    torch.manual_seed(0)
    model = _Linear(48)
    to_tensor = (lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
    plan = IndexPlan("ivf_flat", nlist=16, nprobe=4, train_size=2000, reason="lowered for the test")
    messages = []
    index = build_image_index(model, to_tensor, list_images(images), tmp_path / "idx", root=images,
                              identity={"m": 1}, batch_size=256, shard_size=512, plan=plan, log=messages.append)
    assert isinstance(index, ArchiveIndex) and len(index) == 2999
    assert any("IVF16,Flat" in m and "lowered for the test" in m for m in messages)
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, ArchiveIndex) and not (tmp_path / "idx" / ".shards").exists()
    assert loaded.ids_of([0, 1499, 1500, 2998]) == ["0000.bmp", "1499.bmp", "1501.bmp", "2999.bmp"]
    assert [s["id"] for s in loaded.extra["skipped"]] == ["1500.bmp"] and loaded.extra["model"] == {"m": 1}
    rows = [0, 7, 1500, 2998]
    with torch.no_grad():
        pixels = torch.stack([to_tensor(Image.open(images / loaded.id(r)).convert("RGB")) for r in rows])
        query = model.encode_image(pixels)
    _scores, found = loaded.search(query, 1)
    assert found[:, 0].tolist() == rows
