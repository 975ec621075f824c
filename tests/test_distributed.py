"""DDP + gathered loss on 2 CPU processes (gloo) equals the single-process loss on the global batch.

The exact-gradient claim of training/distributed.py: all-gather backward sums the slices, DDP
averages, and the result is the gradient of the global-batch loss (not 1/world of it).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp

from harma import HarmaLoss, HarmaModel, LossConfig
from tests.conftest import TINY_ARCH, TINY_NAME, perturb_, tiny_config
from training.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    gather_features,
    gather_tensor,
    init_distributed,
    is_main,
)

WORLD = 2
CAPTIONS = [
    "many planes parked at an airport", "a river crosses green farmland", "dense residential area",
    "a stadium", "a bridge over the river", "ships in a harbour", "a baseball field", "bare land",
]
IDS = [0, 1, 2, 3, 3, 4, 5, 0]  # id 3 repeats within rank 1's half, id 0 across the two halves


def _build(state: dict | None = None) -> HarmaModel:
    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config("harma"))
    if state is None:
        perturb_(model, seed=3)
    else:
        model.load_state_dict(state)
    # eval: no dropout, so both runs are deterministic; float64 so that summation-order noise
    # (~1e-7 relative in fp32, large for tiny gate gradients) cannot hide a real mismatch
    return model.eval().double()


def _step(model, images, tokens, ids, gather=lambda t: t, gather_ids=lambda t: t):
    out = model(images, tokens)
    losses = HarmaLoss(LossConfig())(
        gather(out["image_features"]), gather(out["text_features"]), out["temperature"], image_ids=gather_ids(ids)
    )
    loss = sum(losses.values())
    loss.backward()
    return loss.detach()


def _worker(rank: int, port: int, folder: str) -> None:
    from harma import register_model_config

    register_model_config(TINY_NAME, TINY_ARCH)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type) == (rank, WORLD, "cpu")
    assert is_main() == (rank == 0)
    data = torch.load(Path(folder) / "inputs.pt")
    model = _build(data["state"])  # load_state_dict keeps the module's float64
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = slice(rank * 4, rank * 4 + 4)
    loss = _step(ddp, data["images"][half], data["tokens"][half], data["ids"][half], gather_features, gather_tensor)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    helpers = {"bcast": broadcast_object({"from": rank}), "mean": all_reduce_mean(float(rank))}
    torch.save({"loss": loss, "grads": grads, **helpers}, Path(folder) / f"rank{rank}.pt")
    barrier()
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gathered_gradients_match_single_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = open_clip.get_tokenizer(TINY_NAME)(CAPTIONS)
    ids = torch.tensor(IDS)
    model = _build()
    torch.save({"state": model.state_dict(), "images": images, "tokens": tokens, "ids": ids}, tmp_path / "inputs.pt")

    ref_loss = _step(model, images, tokens, ids)
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(ref) > 10

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["bcast"] == {"from": 0} and got["mean"] == 0.5
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-10, atol=0)
        assert got["grads"].keys() == ref.keys()
        for name, r in ref.items():
            err = (got["grads"][name] - r).abs().max().item()
            scale = r.abs().max().item()
            assert scale > 0, f"{name}: zero reference gradient tests nothing"
            assert err <= 1e-10 * scale, f"rank {rank} {name}: max err {err:.3g} vs max |grad| {scale:.3g}"


def test_single_process_helpers_are_identity():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_features(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))
    ids = torch.arange(3)
    assert gather_tensor(ids) is ids
    assert is_main() and broadcast_object([1]) == [1] and all_reduce_mean(2.5) == 2.5
    barrier()
    cleanup()


def test_init_distributed_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
