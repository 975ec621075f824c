"""Load base CLIP weights from a local file (GeoRSCLIP, RemoteCLIP, our own backbones) strictly.

Files are read safely: safetensors directly, ``.pt``/``.bin``/``.pth`` with
``torch.load(weights_only=True)``. Keys are matched after removing a common wrapper prefix
(``module.``, ``model.``, ``clip.``); anything missing, unexpected or of the wrong shape is an error
that names the keys (the released HarMA code loads with ``strict=False``, method.md §7.19).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import torch
import torch.nn as nn

from .errors import BaseWeightsError
from .io import CONFIG_NAME, WEIGHTS_NAME, file_sha256, read_json, read_safetensors, safetensors_keys

PREFIXES = ("module.", "model.", "clip.", "state_dict.")
IGNORED_KEYS = {"logit_bias"}  # optional scalars some checkpoints carry and open_clip may not
CLIP_PREFIX = "clip."  # HarmaModel's name for its open_clip model


@dataclass
class LoadReport:
    path: str
    sha256: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a pickled torch file (weights only), unwrapping
    ``{"state_dict": ...}``-style containers and a shared key prefix."""
    path = Path(path)
    if not path.is_file():
        raise BaseWeightsError(f"base weights file not found: {path}")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path, BaseWeightsError)
    else:
        try:
            with quiet_pickle_warnings():
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - turn any unpickling failure into one clear message
            raise BaseWeightsError(
                f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "TorchScript archives (e.g. OpenAI JIT files) are not supported: use the open_clip "
                "pretrained tag instead, or re-save the state dict"
            ) from e
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BaseWeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return _strip_prefix(sd)


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_base_weights(clip: nn.Module, path: Union[str, Path], strict: bool = True) -> LoadReport:
    """Load ``path`` into an open_clip model (before adapters are injected).

    ``path`` may also be a harma checkpoint directory of method ``full`` (e.g. the project's
    backbone): its tensors replace the backbone's; weights it does not hold (a text tower that was
    locked during that run) keep what the architecture loaded (e.g. the pretrained MiniLM).

    Raises:
        BaseWeightsError: unreadable file, or (when ``strict``) any missing, unexpected or
            shape-mismatched key; the message lists up to 10 of each.
    """
    if Path(path).is_dir():
        return _load_full_checkpoint(clip, Path(path))
    sd = read_state_dict(path)
    own = clip.state_dict()
    missing = sorted(k for k in own if k not in sd and k not in IGNORED_KEYS)
    unexpected = sorted(k for k in sd if k not in own and k not in IGNORED_KEYS)
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    _refuse_integers(path, sd, own)
    report = LoadReport(str(path), file_sha256(path), 0, missing, unexpected, mismatched)
    if strict and (missing or unexpected or mismatched):
        lines = [f"{path} does not match {type(clip).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:10])}{more}")
        lines.append("  check that the open_clip model name matches the file (e.g. ViT-B-32-quickgelu for GeoRSCLIP)")
        raise BaseWeightsError("\n".join(lines))
    usable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    clip.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _refuse_integers(path: Union[str, Path], sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose tensor is integer or boolean where the model holds floating point: loading
    would cast it and use it as numbers (an integer buffer such as HF ``position_ids`` may stay integer)."""
    for k, t in sd.items():
        if k in own and own[k].is_floating_point() and not t.is_floating_point():
            raise BaseWeightsError(f"{path}: tensor {k} has dtype {str(t.dtype).removeprefix('torch.')} where the "
                                   f"model holds {str(own[k].dtype).removeprefix('torch.')} (is this file from "
                                   "another program?)")


@contextlib.contextmanager
def quiet_pickle_warnings():
    """Silence torch's warning about a file's pickle protocol: the refusal that follows says it all."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
        yield


def open_clip_names(names: Iterable[str]) -> dict[str, str]:
    """``{open_clip state_dict key: name}`` for the ``clip.*`` names of a :class:`harma.HarmaModel`
    state (what a ``full`` checkpoint stores); other names (adapters) are left out."""
    return {n[len(CLIP_PREFIX):]: n for n in names if n.startswith(CLIP_PREFIX)}


def base_weight_keys(path: Union[str, Path]) -> set[str]:
    """The open_clip keys that :func:`load_base_weights` takes from ``path`` (a file or a ``full`` folder)."""
    path = Path(path)
    if path.is_dir():
        return set(open_clip_names(safetensors_keys(path / WEIGHTS_NAME, BaseWeightsError)))
    return set(read_state_dict(path)) - IGNORED_KEYS


def _load_full_checkpoint(clip: nn.Module, directory: Path) -> LoadReport:
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config.is_file() or not weights.is_file():
        raise BaseWeightsError(f"{directory}: a base-weights folder must hold adapter_config.json and "
                               "adapter_model.safetensors (a checkpoint of method 'full')")
    meta = read_json(config, BaseWeightsError)
    method = meta.get("method") if isinstance(meta, dict) else None
    if method != "full":
        raise BaseWeightsError(f"{directory}: base weights must come from a 'full' checkpoint, this one is {method!r}")
    tensors = read_safetensors(weights, BaseWeightsError)
    sd = {key: tensors[name] for key, name in open_clip_names(tensors).items()}
    own = clip.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    _refuse_integers(weights, sd, own)
    if unexpected or mismatched:
        raise BaseWeightsError(f"{directory} does not match {type(clip).__name__}: unexpected {unexpected[:10]}, "
                               f"shape mismatch {mismatched[:10]}")
    clip.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    missing = sorted(k for k in own if k not in sd)
    return LoadReport(str(directory), file_sha256(weights), len(sd), missing=missing)
