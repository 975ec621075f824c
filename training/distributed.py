"""Process-group setup under ``torchrun`` and the collectives the trainer needs.

Every helper also works in a plain single process (no process group): gathers are the identity,
``barrier`` does nothing and rank 0 is the main process (method.md §7.12).

Gradient arithmetic of :func:`gather_features` (exact, unlike the released code). Every rank
computes the same global loss ``L`` on the gathered batch. The all-gather backward sums, into each
rank's local slice, the gradients that all ranks computed for that slice, so rank ``r`` holds
``world * dL/d(local_r)``; DDP then averages the parameter gradients over ranks, which gives
exactly ``dL/dθ`` of the global-batch loss. The released ``AllGather`` keeps only its own rank's
slice of the gradient, so its effective gradient is ``dL/dθ / world`` (method.md §2.2).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from training.cli import pick_device

# torch 2.x marks the public autograd all_gather deprecated in favour of the private
# _functional_collectives; we keep the public one, whose gloo backward (all-to-all) is tested on CPU
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and join the process group.

    With ``WORLD_SIZE > 1`` the group uses NCCL when the device is CUDA, else gloo. Without those
    variables this is a single process and no group is created. ``device_pref`` is
    ``run.device`` (``auto | cpu | cuda | cuda:N``: ``auto`` and ``cuda`` mean this rank's GPU);
    another name, or CUDA on a machine without it, is a :class:`training.cli.CliError`.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_pref, local_rank, option="run.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group, so NCCL binds this rank to its GPU
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_features(t: Tensor) -> Tensor:
    """All-gather along dim 0 keeping the autograd graph (see the module docstring for the gradient).

    Every rank must pass the same shape (the train loader drops its last incomplete batch).
    """
    if not _active():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_tensor(t: Tensor) -> Tensor:
    """All-gather along dim 0 without gradient (image ids, labels); under NCCL ``t`` must be on the GPU."""
    if not _active():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (for logging)."""
    if not _active():
        return float(value)
    # NCCL only reduces CUDA tensors; gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
