"""What ``python -m training.benchmark`` computes from its run JSONs: per method the mean and sample
standard deviation over seeds, and for a suite's pairs of methods the difference paired by seed with
its 95% t-interval (docs/results.md#protocol).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from harma.errors import HarmaError
from harma.io import read_json
from harma.metrics import METRIC_KEYS

if TYPE_CHECKING:  # type hints only: training.benchmark imports this module
    from training.benchmark import Suite

# Only the full-set gap number: the run JSONs written before harma.gap.canonical_order hold k-NN purity
# and probe figures from a sample taken in file order (docs/results.md).
GAP_KEYS = ("centroid_distance",)


def mean_sd(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict[str, Any]:
    """``a - b`` over the seeds both have (``{seed: value}``): the mean of the per-seed differences, their
    sample sd and the two-sided t-interval at ``level`` with n - 1 degrees of freedom (None below 2 seeds).
    The t quantile is scipy's (installed with scikit-learn, a runtime dependency)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "differences": diffs, "mean": None, "sd": None, "interval": None,
                           "level": level}
    if not diffs:
        return out
    out["mean"], out["sd"] = mean_sd(diffs)
    if len(diffs) > 1:
        from scipy.stats import t  # only here: importing scipy.stats costs about a second

        half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * out["sd"] / math.sqrt(len(diffs))
        out["interval"] = [out["mean"] - half, out["mean"] + half]
    return out


def val_curve(epochs: list[dict[str, Any]]) -> list[float]:
    """Validation mR per epoch as a run JSON records it (``val_mR_per_epoch``), from ``metrics.jsonl``
    records; empty for a run with no validation (``data.carve=none``)."""
    return [round(e["val"]["mR"], 4) for e in epochs if "val" in e]


def loss_curve(epochs: list[dict[str, Any]]) -> list[float]:
    """Mean training loss per epoch (``train_loss_per_epoch``): the run's fingerprint when nothing is validated."""
    return [round(e["train"]["loss"], 4) for e in epochs if "loss" in e.get("train", {})]


def _runs(suite: Suite, results_dir: Path, key: str) -> list[dict[str, Any]]:
    runs = [read_json(p, HarmaError) for p in sorted((results_dir / suite.name / "runs").glob(f"{key}-s*.json"))]
    return sorted((r for r in runs if r.get("method") == key), key=lambda r: r["seed"])


def aggregate(suite: Suite, results_dir: Path) -> dict[str, Any]:
    """Mean and sample sd over seeds per method (train time: the median run, which a run slowed by another
    on the same cores does not move), in the suite's method order, from the run JSONs; with
    the suite's paired differences of test mR when it names pairs. A run with no validation (``"val":
    null``) leaves the val columns None."""
    rows, by_method = [], {}
    for m in suite.methods:
        runs = _runs(suite, results_dir, m.key)
        if not runs:
            continue
        by_method[m.key] = runs
        row: dict[str, Any] = {"method": m.key, "label": m.label, "seeds": [r["seed"] for r in runs],
                               "trained_params": runs[0]["trained_params"],
                               "train_minutes": round(statistics.median(r["train_minutes"] for r in runs), 1)}
        for part in ("test", "val"):
            parts = [r[part] for r in runs if r.get(part) is not None]
            for k in METRIC_KEYS:
                mean, sd = mean_sd([p[k] for p in parts]) if parts else (None, None)
                row[f"{part}_{k}"] = mean
                if k == "mR":
                    row[f"{part}_mR_sd"] = sd
            for k in GAP_KEYS:
                row[f"{part}_{k}"] = statistics.fmean(p["gap"][k] for p in parts) if parts else None
        row["best_epochs"] = [r["best_epoch"] for r in runs]
        rows.append(row)
    protocol = {}
    if rows:
        one = by_method[rows[0]["method"]][0]
        val = one.get("val") or {}
        protocol = {"val": {k: val.get(k) for k in ("split", "carve", "num_images", "num_captions")} if val else None,
                    "test": {k: one["test"].get(k) for k in ("split", "num_images", "num_captions")},
                    "ties": one["test"].get("ties", "expected")}
    out = {"suite": suite.name, "config": suite.config, "protocol": protocol, "rows": rows,
           "pending": [m.key for m in suite.methods if m.key not in by_method],
           "published": [vars(p) for p in suite.published]}
    if suite.overrides:
        out["overrides"] = list(suite.overrides)
    if suite.paired:
        test_mr = {k: {r["seed"]: r["test"]["mR"] for r in runs} for k, runs in by_method.items()}
        labels = {m.key: m.label for m in suite.methods}
        out["paired"] = [{"a": a, "b": b, "a_label": labels[a], "b_label": labels[b], "metric": "test_mR",
                          **paired_difference(test_mr.get(a, {}), test_mr.get(b, {}))} for a, b in suite.paired]
    return out
