"""Named presets: a backbone, a method and (optionally) an adapter directory.

Presets are data, shared by the training CLI and the app. The project's own architecture
(``RS-ViT-S16-MiniLM``) is registered in :mod:`harma.archs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import PresetError  # noqa: F401  (raised for presets; re-exported)


@dataclass
class Preset:
    """A backbone and, optionally, the adapters trained on it."""

    name: str
    description: str
    model: dict[str, Any]  # ModelConfig fields (method of the *adapted* model)
    adapters: Optional[str] = None  # adapter directory, relative to the repository root
    needs: list[str] = field(default_factory=list)  # what must be available (network, files)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("rs-minilm-harma", "Project backbone (ViT-S/16 image tower trained on RSICD + frozen MiniLM text) "
               "with HarMA adapters trained on UCM", {"model_name": "RS-ViT-S16-MiniLM",
                                                      "base_weights": "checkpoints/rs-backbone", "method": "harma"},
               adapters="checkpoints/ucm-harma"),
        Preset("clip-vit-b-32-laion", "open_clip ViT-B-32 laion2b_s34b_b79k (HarMA's 'vit' backbone)",
               {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "method": "harma"},
               needs=["network access to the Hugging Face hub (or a warm open_clip cache)"]),
        Preset("georsclip-vit-b-32", "GeoRSCLIP RS5M_ViT-B-32_RET-2.pt on OpenAI ViT-B-32 (HarMA's 'geo' backbone)",
               {"model_name": "ViT-B-32-quickgelu", "pretrained": "openai",
                "base_weights": "pretrained/RS5M_ViT-B-32_RET-2.pt", "method": "harma"},
               needs=["network (openai tag)", "local file pretrained/RS5M_ViT-B-32_RET-2.pt (HF Zilun/GeoRSCLIP)"]),
        Preset("remoteclip-vit-b-32", "RemoteCLIP ViT-B-32 from a local file",
               {"model_name": "ViT-B-32", "base_weights": "pretrained/RemoteCLIP-ViT-B-32.pt", "method": "harma"},
               needs=["local file pretrained/RemoteCLIP-ViT-B-32.pt (HF chendelong/RemoteCLIP)"]),
    ]
}
