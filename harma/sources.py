"""Model choices for front ends: the presets, an adapter folder, and the folders under ``checkpoints/``.

Each choice says, without loading anything, whether it can be loaded here and if not why (a
missing file, an unknown architecture, weights that would need a download), so a UI can list it as
unavailable with the reason instead of failing on first use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Union

import open_clip

from .archs import ARCHS, resolve_arch
from .checkpoint import read_adapter_config
from .errors import HarmaError, PresetError, one_line
from .io import CONFIG_NAME
from .presets import PRESETS, Preset

# What a malformed adapter folder can raise while it is read: the library's errors, an unreadable or
# non-UTF-8 file, and JSON nested deeper than Python's parser recurses.
READ_ERRORS = (HarmaError, OSError, UnicodeDecodeError, RecursionError)


@dataclass(frozen=True)
class ModelSource:
    """A model choice: an adapter directory (the baseline is its backbone, zero-shot)."""

    key: str
    label: str
    adapters: Optional[Path]
    base_weights: Optional[str] = None  # local base-weights path overriding the recorded one
    problem: Optional[str] = None  # why it cannot be loaded here; shown instead of a traceback
    adapted_on: Optional[str] = None  # dataset_key of the data its adapters were trained on (adapter_config.json)
    backbone_on: Optional[str] = None  # dataset_key of the data a local backbone checkpoint was trained on


# Dataset folder names as dataset_key reduces them (lower case, letters and digits), and how they are shown.
DATASET_ALIASES = {"ucmcaptions": "ucm", "ucmerced": "ucm", "sydneycaptions": "sydney"}
DATASET_NAMES = {"ucm": "UCM-Captions", "rsicd": "RSICD", "rsitmd": "RSITMD", "sydney": "Sydney-Captions"}


def dataset_key(folder: Union[str, Path]) -> str:
    """A dataset folder's name (``../shared/datasets/ucm``, ``UCM_Captions``) reduced for comparison: its
    last part in lower case, letters and digits only, known spellings mapped to one key (``ucm``)."""
    key = re.sub(r"[^a-z0-9]", "", PurePosixPath(str(folder).replace("\\", "/")).name.lower())
    return DATASET_ALIASES.get(key, key)


def dataset_name(key: str) -> str:
    """How a :func:`dataset_key` is shown: the dataset's name when known, else the key."""
    return DATASET_NAMES.get(key, key)


def trained_on(meta: dict) -> Optional[str]:
    """The :func:`dataset_key` of the data a checkpoint was trained on, from what ``training.train``
    recorded in its adapter_config.json (``extra.data``: the dataset folder as configured); None when
    it records none or trained on generated data."""
    data = (meta.get("extra") or {}).get("data") or {}
    folder = data.get("root_config") or data.get("root")
    if not isinstance(folder, str) or not folder.strip() or folder == "synthetic":
        return None
    return dataset_key(folder.rstrip("/\\")) or None


def provenance(source: ModelSource) -> str:
    """``adapted on UCM-Captions, backbone trained on RSICD`` for a picker label ('' when unknown)."""
    parts = ([f"adapted on {dataset_name(source.adapted_on)}"] if source.adapted_on else []) + (
        [f"backbone trained on {dataset_name(source.backbone_on)}"] if source.backbone_on else [])
    return ", ".join(parts)


def pretrained_cached(model_name: str, tag: str) -> bool:
    """Whether open_clip would find ``model_name``/``tag`` without a download (best effort)."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        names += [str(Path(n).with_suffix(".safetensors")) for n in names]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return True
    url = cfg.get("url", "")
    return bool(url) and (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file()


# How a front end tells its user to do something; a front end passes its own words (its flags).
HOW = {"download": "allow downloads (network access) to fetch them",
       "adapters": "train some (docs/cli.md) and load their adapter directory"}


def backbone_problem(model: dict, base: dict, allow_download: bool, how: Optional[dict] = None) -> Optional[str]:
    """Why the backbone described by a checkpoint's ``model``/``base`` entries cannot be built here."""
    name, tag = model.get("model_name"), model.get("pretrained")
    if name in ARCHS:
        try:
            resolve_arch(ARCHS[name])
        except PresetError as e:
            return f"backbone {name} cannot be built here: {e}"
    else:
        if name not in open_clip.list_models() and not base.get("model_cfg"):
            return f"unknown open_clip model {name!r} (not in open_clip.list_models())"
    if tag and not allow_download and not pretrained_cached(name, tag):
        return (f"backbone {name} needs the open_clip weights `{tag}`, which are not in the local cache; "
                + {**HOW, **(how or {})}["download"])
    return None


def shown_path(path: Union[str, Path], root: Optional[Path] = None) -> str:
    """How a front end names a folder to its visitors, without the server's absolute path: relative to
    ``root`` (the project) or the working directory when inside one, else the folder's name."""
    p = Path(path).expanduser().resolve()
    for base in [b.resolve() for b in (root, Path.cwd()) if b is not None]:
        if p != base and p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return p.name


def _without_paths(msg: str, directory: Path, shown: str) -> str:
    """``msg`` with ``directory`` (as given, absolute and resolved) written as ``shown``."""
    forms = {str(directory), str(directory.absolute()), str(directory.resolve())} - {"", "."}
    for form in sorted(forms, key=len, reverse=True):
        msg = msg.replace(form, shown)
    return msg


def _find_file(path: str, near: Path, root: Path) -> Optional[Path]:
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, root / p, near / p]
    return next((c.resolve() for c in candidates if c.exists()), None)


def checkpoint_source(directory: Path, allow_download: bool, base_weights: Optional[str] = None,
                      key: Optional[str] = None, label: Optional[str] = None,
                      root: Optional[Path] = None, how: Optional[dict] = None) -> ModelSource:
    """A model choice for an adapter directory, with the reason it cannot be loaded (if any).

    A relative base-weights path is looked up from the working directory, ``root`` (the project
    folder) and the adapter directory, in that order.
    """
    directory = Path(directory).expanduser()
    key = key or f"checkpoint:{directory.resolve().name}"
    shown = shown_path(directory, root)
    try:
        meta = read_adapter_config(directory)
    except READ_ERRORS as e:  # listed as unavailable, with the reason
        return ModelSource(key, label or directory.name, directory, None,
                           _without_paths(one_line(e), directory, shown))
    label = label or f"{directory.name} ({meta['method']} on {meta['base'].get('model_name')})"
    wanted = base_weights or meta["model"].get("base_weights")
    found = _find_file(wanted, directory, root or Path.cwd()) if wanted else None
    backbone_on = None
    if found is not None and (found / CONFIG_NAME).is_file():  # a backbone checkpoint of training.train
        try:
            backbone_on = trained_on(read_adapter_config(found))
        except READ_ERRORS:
            pass  # its problem, if any, is the loader's to report; the label just says less
    src = ModelSource(key, label, directory, str(found) if found else None, None, trained_on(meta), backbone_on)
    if src.adapted_on or src.backbone_on:
        src = replace(src, label=f"{label} · {provenance(src)}")
    if wanted and found is None:
        sha = meta["base"].get("base_weights_sha256")
        named = wanted if not Path(wanted).is_absolute() else shown_path(wanted, root)
        return replace(src, problem=f"{shown}: base weights `{named}` not found on this machine (sha256 {sha})")
    return replace(src, problem=backbone_problem(meta["model"], meta["base"], allow_download, how))


def preset_source(preset: Preset, allow_download: bool, root: Path,
                  missing: Optional[Callable[[Preset, str], str]] = None, how: Optional[dict] = None) -> ModelSource:
    """A model choice for a preset whose files live under ``root``; ``missing(preset, names)`` words
    the problem when its checkpoint folders are absent."""
    key, label = f"preset:{preset.name}", f"{preset.name} (preset)"
    if preset.adapters is None:
        needs = f" It also needs: {'; '.join(preset.needs)}." if preset.needs else ""
        return ModelSource(key, label, None, None,
                           f"preset {preset.name} ({preset.description}) has no trained adapters in this repository; "
                           + {**HOW, **(how or {})}["adapters"] + f".{needs}")
    adapters = root / preset.adapters
    bw = preset.model.get("base_weights")
    bw_path = (Path(bw) if Path(bw).is_absolute() else root / bw) if bw else None
    absent = [p for p in (bw_path, adapters) if p is not None and not p.exists()]
    if absent:
        names = " and ".join(f"`{p.relative_to(root) if p.is_relative_to(root) else p}`" for p in absent)
        problem = missing(preset, names) if missing else f"preset {preset.name} needs {names}, which this checkout does not have"
        return ModelSource(key, label, adapters, None, problem)
    return checkpoint_source(adapters, allow_download, str(bw_path) if bw_path else None, key, label, root, how)


def discover_sources(root: Path, checkpoint: Optional[str] = None, allow_download: bool = False,
                     missing: Optional[Callable[[Preset, str], str]] = None,
                     how: Optional[dict] = None) -> dict[str, ModelSource]:
    """``checkpoint``, then the presets, then ``root/checkpoints/*/`` adapter directories (not ``full`` backbones).

    Adapter folders are keyed ``checkpoint:<folder name>`` (``-2``, ``-3``... when two share a name), so
    no key carries a server path. A folder that cannot be read is listed, with its problem.
    ``missing(preset, names)`` words a preset's absent folders and ``how`` (keys of :data:`HOW`) the
    remedies, in the front end's own terms (its flags); the defaults name no front end."""
    sources: dict[str, ModelSource] = {}

    def add(directory: Path) -> None:
        name, n = directory.resolve().name, 1
        while f"checkpoint:{name}" in sources:
            n += 1
            name = f"{directory.resolve().name}-{n}"
        src = checkpoint_source(directory, allow_download, key=f"checkpoint:{name}", root=root, how=how)
        sources[src.key] = src

    if checkpoint:
        add(Path(checkpoint).expanduser())
    for preset in PRESETS.values():
        src = preset_source(preset, allow_download, root, missing, how)
        sources[src.key] = src
    seen = {s.adapters.resolve() for s in sources.values() if s.adapters is not None}
    for cfg_file in sorted((root / "checkpoints").glob(f"*/{CONFIG_NAME}")):
        directory = cfg_file.parent
        if directory.resolve() in seen:
            continue
        try:
            if read_adapter_config(directory)["method"] == "full":
                continue
        except READ_ERRORS:
            pass  # listed, with its problem
        add(directory)
    return sources


def find_source(sources: dict[str, ModelSource], name: str) -> Optional[str]:
    """The key in ``sources`` that ``name`` means: a key (``preset:NAME``, ``checkpoint:FOLDER``), a
    bare preset or folder name (``rs-minilm-harma``, ``ucm-mrs``), or an adapter directory's path, with
    or without ``checkpoint:`` (the keys' earlier form); None when it names none of them."""
    name = name.strip()
    if name in sources:
        return name
    for prefix in ("preset:", "checkpoint:"):
        if prefix + name in sources:
            return prefix + name
    path = name.removeprefix("checkpoint:")
    if not path or not any(sep in path for sep in ("/", os.sep, "~")):  # a folder name, e.g. a preset's
        named = [k for k, s in sources.items() if s.adapters is not None and s.adapters.name == path]
        return named[0] if len(named) == 1 else None
    try:
        wanted = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
    return next((k for k, s in sources.items() if s.adapters is not None and s.adapters.resolve() == wanted), None)
