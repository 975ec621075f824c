"""Adapter-only checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout).

The JSON says which base model the adapters belong to (open_clip name, pretrained tag, base-weights
file hash, architecture), so loading them onto another backbone is refused with a message naming
the one they need. Only trainable tensors are stored; a shared module is stored once. Writes are
atomic (temporary file + rename), so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import torch

from .archs import ensure_arch, is_known
from .config import METHODS, ModelConfig, from_dict, to_dict
from .errors import CheckpointError, ConfigError, HarmaError, one_line
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    read_json,
    read_safetensors,
)
from .model import HarmaModel, create_model

FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    from . import __version__  # the package's own attribute: harma/__init__ imports this module

    return {"harma": __version__, "open_clip": open_clip.__version__, "torch": torch.__version__}


def save_adapters(model: HarmaModel, directory: Union[str, Path], extra: Optional[dict[str, Any]] = None,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Save the trainable tensors and the config describing model + base weights.

    Args:
        model: the adapted model.
        directory: created if needed; existing files are replaced atomically.
        extra: JSON-serialisable metadata (metrics, epoch, run name) stored under ``"extra"``.
        dtype: optionally cast floating tensors (e.g. ``torch.float16`` for a shipped backbone).
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.trainable_state_dict().items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "method": model.config.method,
        "model": to_dict(model.config),
        "base": model.base_info,
        "trainable_params": model.num_parameters(trainable_only=True),
        "versions": _versions(),
        "extra": extra or {},
    }
    if model.base_info.get("base_weights"):  # so the folder loads from any working directory
        meta["base"] = {**meta["base"], "base_weights_relative": Path(
            os.path.relpath(Path(model.base_info["base_weights"]).resolve(), directory.resolve())).as_posix()}
    # Weights first, config last: a directory with a config always has matching weights.
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, meta)
    return directory


# fields of "base" (each may be null): what the adapters were trained on
BASE_FIELDS = {"model_name": str, "pretrained": str, "base_weights": str, "base_weights_sha256": str,
               "base_weights_relative": str, "model_cfg": dict}


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words (``null``, ``a list``, ``a string``), for a message."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_adapter_config(directory: Union[str, Path]) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of an adapter directory.

    Raises:
        CheckpointError: no such file, invalid JSON, or a field missing or of the wrong type (the
            message names the file and the field, e.g. ``base`` or ``model.harma``).
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (is this an adapter directory?)")
    meta = read_json(path, CheckpointError)
    check_adapter_config(meta, path)
    return meta


def check_adapter_config(meta: Any, path: Union[str, Path]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the field unless ``meta`` has the structure
    :func:`save_adapters` writes: ``method`` one of :data:`~harma.config.METHODS`, ``model`` a valid
    :class:`~harma.config.ModelConfig` of that method, ``base`` an object of strings, ``extra`` an object."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_kind(meta)}")
    for key in ("method", "model", "base"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing field {key!r}")
    if not isinstance(meta["method"], str) or meta["method"] not in METHODS:
        raise CheckpointError(f"{path}: field 'method' is {str(meta['method'])[:60]!r}, expected one of "
                              f"{', '.join(METHODS)}")
    for key in ("model", "base", "extra"):
        if (key != "extra" or meta.get(key) is not None) and not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: field {key!r} must be an object, got {_kind(meta[key])}")
    for key, kind in BASE_FIELDS.items():
        value = meta["base"].get(key)
        if value is not None and not isinstance(value, kind):
            raise CheckpointError(f"{path}: field 'base.{key}' must be {_kind(kind())} or null, got {_kind(value)}")
    for key in ("format_version", "trainable_params"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CheckpointError(f"{path}: field {key!r} must be a whole number, got {_kind(value)}")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is newer than this harma reads "
                              f"({FORMAT_VERSION}); update harma")
    try:
        cfg = from_dict(ModelConfig, meta["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.method != meta["method"]:
        raise CheckpointError(f"{path}: field 'method' is {meta['method']!r} but 'model.method' is {cfg.method!r}")


def _base_mismatch(needed: dict, have: dict) -> list[str]:
    problems = []
    for key in ("model_name", "pretrained", "base_weights_sha256"):
        if needed.get(key) != have.get(key):
            problems.append(f"{key}: needs {needed.get(key)!r}, model has {have.get(key)!r}")
    if needed.get("model_cfg") and have.get("model_cfg") and needed["model_cfg"] != have["model_cfg"]:
        problems.append("model_cfg: the architecture differs from the one the adapters were trained on")
    return problems


def load_adapter_weights(model: HarmaModel, directory: Union[str, Path], check_base: bool = True) -> None:
    """Load saved tensors into ``model`` (same method and base), strictly."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta["method"] != model.config.method:
        raise CheckpointError(f"{directory}: adapters are for method {meta['method']!r}, model uses {model.config.method!r}")
    if check_base and (problems := _base_mismatch(meta["base"], model.base_info)):
        need = meta["base"]
        raise CheckpointError(
            f"{directory}: these adapters need base model {need.get('model_name')} "
            f"(pretrained={need.get('pretrained')}, base_weights={need.get('base_weights')}); "
            + "; ".join(problems)
        )
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    tensors = read_safetensors(weights, CheckpointError)
    # trained tensors are floating point: an integer or boolean one would be cast and used as numbers
    not_float = next((k for k, t in tensors.items() if not t.is_floating_point()), None)
    if not_float is not None:
        dtype = str(tensors[not_float].dtype).removeprefix("torch.")
        raise CheckpointError(f"{weights}: tensor {not_float} has dtype {dtype}; trained tensors are floating "
                              "point (is this file from another program?)")
    bad_values = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad_values is not None:
        raise CheckpointError(f"{weights}: tensor {bad_values} holds NaN or infinite values; this checkpoint "
                              "cannot give meaningful embeddings (retrain, or use an earlier checkpoint)")
    own = model.trainable_state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{weights}: does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))


def load_adapters(directory: Union[str, Path], device: Union[str, torch.device] = "cpu",
                  base_weights: Optional[str] = None, pretrained: Optional[str] = "__saved__"):
    """Rebuild the base model described in ``adapter_config.json`` and load the adapters.

    Args:
        directory: an adapter directory written by :func:`save_adapters`.
        device: where to build the model.
        base_weights: local path of the base-weights file when it lives elsewhere on this machine
            (its hash must match the one recorded).
        pretrained: override the open_clip tag (default: the saved one).

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)`` as :func:`harma.create_model`.
    """
    meta = read_adapter_config(directory)
    cfg: ModelConfig = from_dict(ModelConfig, meta["model"], "model")
    if base_weights is not None:
        cfg.base_weights = base_weights
    if pretrained != "__saved__":
        cfg.pretrained = pretrained
    if base_weights is None and cfg.base_weights and not Path(cfg.base_weights).exists():
        found = find_base_weights(Path(directory), meta["base"])
        if found is not None:
            cfg.base_weights = str(found)
    if cfg.base_weights and not Path(cfg.base_weights).exists():
        raise CheckpointError(f"{directory}: base weights {cfg.base_weights} not found on this machine; "
                              "pass base_weights=PATH (sha256 " + str(meta["base"].get("base_weights_sha256")) + ")")
    saved_arch = not is_known(meta["base"].get("model_name"))  # built from the checkpoint's own model_cfg
    ensure_arch(meta["base"].get("model_name"), meta["base"].get("model_cfg"))
    try:
        # a `full` folder holds every trained tensor, so a tower open_clip left random is filled next
        out = create_model(cfg, device, weights_follow=cfg.method == "full")
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        if not saved_arch or isinstance(e, HarmaError):
            raise
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: field 'base.model_cfg' is not an open_clip "
                              f"architecture that builds ({type(e).__name__}: {one_line(e)[:200]})") from None
    load_adapter_weights(out[0], directory)
    return out


def weights_sha256(path: Path) -> Optional[str]:
    """sha256 of an adapter folder's weights file (or of a weights file); None when there is none."""
    target = path / WEIGHTS_NAME if path.is_dir() else path
    return file_sha256(target) if target.is_file() else None


def find_base_weights(directory: Path, base: dict) -> Optional[Path]:
    """The base weights of a checkpoint loaded from another working directory: at the path saved
    relative to the checkpoint folder, else a sibling of the folder with the recorded sha256
    (``checkpoints/ucm-harma`` finds ``checkpoints/rs-backbone``)."""
    sha = base.get("base_weights_sha256")
    candidates = []
    if base.get("base_weights_relative"):
        candidates.append(directory / base["base_weights_relative"])
    if directory.parent.is_dir():
        candidates += sorted(p for p in directory.parent.iterdir() if p.resolve() != directory.resolve() and (
            (p / CONFIG_NAME).is_file() or p.suffix in (".safetensors", ".pt", ".pth", ".bin")))
    for path in candidates:
        if path.exists() and (sha is None or weights_sha256(path) == sha):
            return path
    return None
