"""The resumable run state: ``last/`` (adapters + ``state.pt``), ``best/``, RNG capture, config checks.

A checkpoint directory is written whole into a hidden temporary folder and then swapped in with
``os.replace``, so a kill at any moment leaves either the previous checkpoint or the new one,
never a mix: ``.last.old`` / ``.best.old`` hold the previous one between the two renames, and
:func:`recover_swap` puts it back (on resume, in ``training.evaluate``, and before the next swap). ``state.pt`` holds only
tensors and plain containers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harma import CheckpointError, HarmaModel, save_adapters
from harma.checkpoint import CONFIG_NAME, atomic_write_bytes

STATE_NAME = "state.pt"
STATE_VERSION = 1
# Keys that may change when a run is resumed: they extend/shorten it or are pure logistics
# (the sampler and per-sample seeding make results independent of num_workers).
RESUMABLE_KEYS = ("run.resume", "run.max_steps", "run.epochs", "data.num_workers", "run.log_every")


# -- RNG ---------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU + CUDA), Python and NumPy RNG states as tensors/lists."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in py_state.tolist()), gauss))
    keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- config comparison --------------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _defaults() -> dict[str, Any]:
    """Every ``TrainConfig`` key with its default value, flattened."""
    from harma.config import to_dict
    from training.config import TrainConfig

    return _flatten(to_dict(TrainConfig()))


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every differing key, ignoring :data:`RESUMABLE_KEYS`.

    A key the saved config lacks counts as equal when the current value is its default: the run
    predates that option and ran with the behaviour its default keeps.
    """
    a, b, defaults = _flatten(saved), _flatten(current), _defaults()
    for k in set(b) - set(a):
        if k in defaults and b[k] == defaults[k]:
            a[k] = b[k]
    keys = sorted((set(a) | set(b)) - set(RESUMABLE_KEYS))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def config_hash(config: dict, legacy: bool = False) -> str:
    """sha256 of the config without the resumable keys, the folder's location (a run folder may be
    moved and resumed by path) and the keys at their default (so adding an option, at a default that
    keeps the old behaviour, does not orphan running jobs): identifies the run a state belongs to.
    ``legacy=True``: the hash states written before that last rule carry (every key hashed)."""
    ignored = {*RESUMABLE_KEYS, "run.out_dir", "run.name"}
    defaults = {} if legacy else _defaults()
    flat = {k: v for k, v in _flatten(config).items()
            if k not in ignored and (k not in defaults or defaults[k] != v)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


# -- checkpoint folders -------------------------------------------------------------------------
def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` (two renames; ``.<name>.old`` bridges the gap)."""
    old = final.parent / f".{final.name}.old"
    if not final.exists() and old.exists():  # an earlier swap was killed between its renames
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _check_finite(model: HarmaModel) -> None:
    bad = [n for n, t in model.trainable_state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to save non-finite parameters ({', '.join(bad[:3])}); "
                              "the previous checkpoint is kept")


def write_adapters_dir(model: HarmaModel, directory: Path, extra: dict[str, Any]) -> None:
    """``save_adapters`` into a temporary folder, then swap it in (used for ``best/``)."""
    _check_finite(model)
    tmp = _fresh_tmp(directory)
    save_adapters(model, tmp, extra=extra)
    _swap_in(tmp, directory)


def write_last(model: HarmaModel, directory: Path, state: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write ``last/adapters/`` and ``last/state.pt`` together, atomically as a folder.

    Args:
        model: the unwrapped model.
        directory: ``<run>/last``.
        state: tensors/primitives only (optimizer, scheduler, counters, RNG, config hash).
        extra: metadata for ``adapter_config.json``.
    """
    _check_finite(model)
    tmp = _fresh_tmp(directory)
    save_adapters(model, tmp / "adapters", extra=extra)
    buf = io.BytesIO()
    torch.save({"version": STATE_VERSION, **state}, buf)
    atomic_write_bytes(tmp / STATE_NAME, buf.getvalue())
    _swap_in(tmp, directory)


def recover_swap(final: Path, marker: str) -> Optional[Path]:
    """``final`` if it holds ``marker``; else, after a swap killed between its two renames, the
    previous version moved back from ``.<name>.old``; else None."""
    old = final.parent / f".{final.name}.old"
    if not (final / marker).is_file() and (old / marker).is_file():
        if final.exists():
            shutil.rmtree(final)
        os.replace(old, final)
    return final if (final / marker).is_file() else None


def find_last(run_dir: Path) -> Optional[Path]:
    """``<run>/last`` if it holds a state, recovering a swap interrupted between its renames."""
    return recover_swap(run_dir / "last", STATE_NAME)


def find_best(run_dir: Path) -> Optional[Path]:
    """``<run>/best`` if it holds adapters, recovering a swap interrupted between its renames."""
    return recover_swap(run_dir / "best", CONFIG_NAME)


def read_state(last: Path) -> dict[str, Any]:
    """Load ``last/state.pt`` (``weights_only=True``: no code runs from the file)."""
    path = last / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: report it as a checkpoint problem
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a training state of version {STATE_VERSION}")
    return state
