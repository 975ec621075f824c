"""Shared fixtures: a tiny random open_clip CLIP registered under a test name, and the device.

Tiny = width 64, 2 layers per tower, 32 px images, patch 16, the real BPE tokenizer (offline).
``HARMA_TEST_DEVICE=cuda`` runs the same tests on a GPU when one is lent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on every build

TINY_NAME = "harma-test-tiny"
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_HARMA = {"bottleneck": 16, "attn_heads": 4, "mms_dim": 8, "mms_heads": 2}
TINY_MRS = {"bottleneck": 8, "shared_dim": 8}

SHARED_DATASETS = Path(os.environ.get("HARMA_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("HARMA_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session", autouse=True)
def tiny_arch() -> str:
    from harma import register_model_config

    register_model_config(TINY_NAME, TINY_ARCH)
    return TINY_NAME


def tiny_config(method: str = "harma", **harma):
    from harma import ModelConfig

    return ModelConfig(model_name=TINY_NAME, method=method, harma={**TINY_HARMA, **harma}, mrs=dict(TINY_MRS))


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable parameter off its (zero) init so adapters really change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


@pytest.fixture
def one_thread():
    """One torch thread for in-process training runs: on a busy 2-core box, OpenMP oversubscription
    makes the tiny models 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_inputs(device):
    import open_clip

    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g).to(device)
    tokens = open_clip.get_tokenizer(TINY_NAME)(
        ["many planes parked at an airport", "a river crosses green farmland", "dense residential area", "a stadium"]
    ).to(device)
    return images, tokens
