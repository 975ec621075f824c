"""The resumable run state: ``last/`` (adapters + ``state.pt``), ``best/``, RNG capture.

A checkpoint directory is written whole into a hidden temporary folder and then swapped in with
``os.replace``, so a kill at any moment leaves either the previous checkpoint or the new one,
never a mix: ``.last.old`` / ``.best.old`` hold the previous one between the two renames, and
:func:`recover_swap` puts it back (on resume, in ``training.cli.resolve_checkpoint``, and before
the next swap). ``state.pt`` holds only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from harma import CheckpointError, HarmaModel, save_adapters
from harma.io import CONFIG_NAME, atomic_write_bytes

STATE_NAME = "state.pt"
STATE_VERSION = 1


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


def write_folder(directory: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` a temporary sibling of ``directory``, then swap it in. If filling fails (a full
    disk: ``OSError``), the temporary folder is removed and ``directory`` is left as it was (used for
    ``last/``, ``best/`` and by ``training.export``)."""
    tmp = _fresh_tmp(directory)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, directory)


def write_adapters_dir(model: HarmaModel, directory: Path, extra: dict[str, Any]) -> None:
    """``save_adapters`` into a temporary folder, then swap it in (used for ``best/``)."""
    _check_finite(model)
    write_folder(directory, lambda tmp: save_adapters(model, tmp, extra=extra))


def write_last(model: HarmaModel, directory: Path, state: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write ``last/adapters/`` and ``last/state.pt`` together, atomically as a folder.

    Args:
        model: the unwrapped model.
        directory: ``<run>/last``.
        state: tensors/primitives only (optimizer, scheduler, counters, RNG, config hash).
        extra: metadata for ``adapter_config.json``.
    """
    _check_finite(model)

    def fill(tmp: Path) -> None:
        save_adapters(model, tmp / "adapters", extra=extra)
        buf = io.BytesIO()
        torch.save({"version": STATE_VERSION, **state}, buf)
        atomic_write_bytes(tmp / STATE_NAME, buf.getvalue())

    write_folder(directory, fill)


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
