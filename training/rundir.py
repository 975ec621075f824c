"""The run folder: where a run lives, whether it may be reused, its ``config.yaml`` and ``metrics.jsonl``,
and which config a run and its checkpoints belong to (:func:`config_differences`, :func:`config_hash`).

Layout of ``<run.out_dir>/<run.name>/``::

    config.yaml        resolved TrainConfig (rewritten on resume)
    metrics.jsonl      one JSON line per evaluated epoch (train losses, lr, throughput, temperature, val)
    best/              adapters with the best validation mR, the last epoch with data.carve=none (adapter_config.json + safetensors)
    last/adapters/     adapters of the latest checkpoint
    last/state.pt      optimiser, scheduler, counters, RNG states (for run.resume)
    test_metrics.json  best/ on data.test_split, if set (report only, never used for selection)
    synthetic/         generated dataset, when data.root is "synthetic"
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from harma.config import to_dict
from harma.errors import CheckpointError, one_line
from harma.io import atomic_write_bytes, parse_json
from training.config import TrainConfig, config_to_yaml
from training.state import STATE_NAME, find_best, find_last

log = logging.getLogger("training.train")

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
# A folder holding none of these has no training results (e.g. a run that failed during setup)
# and may be reused without run.resume.
RESULTS = (METRICS_NAME, "last", "best", ".last.old", "test_metrics.json")
# Keys that may change when a run is resumed: they extend/shorten it or are pure logistics
# (the sampler and per-sample seeding make results independent of num_workers).
RESUMABLE_KEYS = ("run.resume", "run.max_steps", "run.epochs", "data.num_workers", "run.log_every")


class RunError(ValueError):
    """The run folder cannot be used as asked (exists without resume, nothing to resume, mismatch)."""


@dataclass
class RunPlan:
    run_dir: Path
    last: Optional[Path]  # checkpoint folder to resume from; None = start fresh
    by_path: bool  # run.resume named the folder explicitly
    saved_config: Optional[dict] = None  # the resumed run's config.yaml as it was (check_resumable's answer)


def default_name(config_path: Optional[str], cfg: TrainConfig) -> str:
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{cfg.model.method}"


def plan_run(cfg: TrainConfig, config_path: Optional[str]) -> RunPlan:
    """Decide the run folder and whether to resume (call on the main rank only: it may rename
    an interrupted checkpoint swap back into place)."""
    resume = cfg.run.resume
    if resume not in ("never", "auto"):
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            raise RunError(f"run.resume={resume}: no such run folder (use run.resume=auto to continue "
                           "the folder named by run.out_dir/run.name)")
        last = find_last(run_dir)
        find_best(run_dir)
        if last is None:
            raise RunError(f"run.resume={resume}: {run_dir} has no last/state.pt to resume from")
        return RunPlan(run_dir, last, True)
    run_dir = Path(cfg.run.out_dir).expanduser() / (cfg.run.name or default_name(config_path, cfg))
    if resume == "auto":
        if not run_dir.is_dir():
            return RunPlan(run_dir, None, False)
        find_best(run_dir)
        last = find_last(run_dir)
        if last is None:
            _check_nothing_lost(run_dir)
        return RunPlan(run_dir, last, False)
    if any((run_dir / name).exists() for name in RESULTS):
        raise RunError(f"run folder {run_dir} already exists; pass run.resume=auto to continue it, "
                       "or choose another run.name / run.out_dir")
    return RunPlan(run_dir, None, False)


def _check_nothing_lost(run_dir: Path) -> None:
    """``run.resume=auto`` on a folder without ``last/state.pt``: refuse when the run had got past its
    first checkpoint (its log records an epoch, or ``last/`` exists without its state), since starting
    over would replace its results; else (stopped before its first checkpoint) warn and start afresh."""
    records = read_metrics(run_dir)
    if records or (run_dir / "last").exists():
        found = [f"{len(records)} epoch(s) in {METRICS_NAME}"] if records else []
        found += [f"{name}/" for name in ("last", "best") if (run_dir / name).exists()]
        raise RunError(f"run.resume=auto: {run_dir} has no last/{STATE_NAME} to resume from, but the run got "
                       f"further ({', '.join(found)}); starting over would replace its results. Restore "
                       "last/, or move the folder away (or choose another run.name) to train afresh")
    found = [name for name in ("best/", CONFIG_NAME) if (run_dir / name).exists()]
    log.warning("run.resume=auto: %s has no last/%s (it holds %s): the run stopped before its first checkpoint, "
                "so it starts from scratch", run_dir, STATE_NAME, ", ".join(found) or "no results")


# -- which config a run belongs to -------------------------------------------------------------
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


def check_resumable(plan: RunPlan, cfg: TrainConfig) -> dict[str, Any]:
    """The saved config of a resumed run; raises unless it equals ``cfg`` up to the resumable keys."""
    path = plan.run_dir / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{plan.run_dir}: has a checkpoint but no {CONFIG_NAME}; cannot check it belongs to this config")
    saved = read_saved_config(path)
    current = to_dict(cfg)
    if plan.by_path:  # the folder is named by run.resume, so its name/out_dir may be given differently
        for key in ("out_dir", "name"):
            current["run"][key] = saved.get("run", {}).get(key)
    diffs = config_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
        raise RunError(f"{path}: the config differs from the run being resumed ({shown}); only "
                       "run.epochs, run.max_steps, run.resume, data.num_workers and run.log_every may change")
    return saved


def read_saved_config(path: Path) -> dict[str, Any]:
    """A run folder's ``config.yaml``: a mapping of the ``TrainConfig`` sections, else :class:`RunError`."""
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        why = getattr(e, "problem", None) or one_line(e)[:200]
        raise RunError(f"{path}: cannot be read ({why}); restore the run's config.yaml, or train afresh in "
                       "another folder") from None
    sections = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved, dict) or any(not isinstance(v, dict) for k, v in saved.items() if k in sections):
        raise RunError(f"{path}: not a run config (expected a mapping of the sections {', '.join(sorted(sections))}"
                       "); restore the run's config.yaml, or train afresh in another folder")
    return saved


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_NAME, config_to_yaml(cfg).encode())


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one line to ``metrics.jsonl``, atomically (the file is rewritten whole: a full disk or a kill
    leaves the previous lines, never half a line)."""
    path = run_dir / METRICS_NAME
    before = path.read_bytes() if path.is_file() else b""
    if before and not before.endswith(b"\n"):
        before += b"\n"
    atomic_write_bytes(path, before + (json.dumps(record) + "\n").encode())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a line that is not a JSON object raises :class:`CheckpointError`
    naming it; a last line cut short, written by an older version killed mid-line, is dropped)."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, CheckpointError, path, line=n)
        except CheckpointError:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: line {n}: expected a JSON object")
        records.append(record)
    return records


def trim_metrics(run_dir: Path, completed_epochs: int) -> None:
    """On resume, drop lines of epochs that will run (again): partial or not yet checkpointed."""
    kept = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= completed_epochs and not r.get("partial")]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write_bytes(run_dir / METRICS_NAME, text.encode())
