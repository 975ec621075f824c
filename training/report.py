"""Collect evaluation JSONs and run folders into one results file and a markdown table.

    python -m training.report --out results/ucm.json \\
        "zero-shot=runs/results/harma.json:baseline" \\
        "HarMA (as released)=runs/results/harma.json:runs/ucm_minilm_harma-harma" ...

Each row is ``LABEL=EVAL_JSON:SOURCE``. ``SOURCE`` is a run folder (its ``metrics.jsonl`` gives the
wall time, its ``best/`` checkpoint the trained-parameter count) or ``baseline`` for the
``--baseline`` object of that evaluation (nothing trained). ``--update`` keeps the other rows of an
existing ``--out`` file, so one method can be re-run without the others' run folders. ``--markdown
FILE`` turns a results file back into the table, so the README's table can be checked against the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from harma.errors import CheckpointError, HarmaError
from harma.io import WEIGHTS_NAME, read_json, read_safetensors
from harma.metrics import METRIC_KEYS
from training.cli import run_command, write_json
from training.rundir import read_metrics

GAP_KEYS = ("centroid_distance", "uniformity_joint", "knn_modality_purity", "linear_probe_accuracy")


class ReportError(Exception):
    pass


def _trained_params(checkpoint: Path) -> int:
    return sum(t.numel() for t in read_safetensors(checkpoint / WEIGHTS_NAME, CheckpointError).values())


def row(label: str, eval_json: Path, source: str) -> dict[str, Any]:
    """One table row: metrics and gap numbers from the evaluation, cost from the run folder."""
    result = read_json(eval_json, ReportError)
    if not isinstance(result, dict):
        raise ReportError(f"{eval_json}: not an evaluation JSON (expected an object)")
    if source == "baseline":
        if "baseline" not in result:
            raise ReportError(f"{eval_json}: no baseline object (evaluate with --baseline)")
        res, params, minutes, method = result["baseline"], 0, 0.0, "zeroshot"
    else:
        run = Path(source)
        metrics = run / "metrics.jsonl"
        if not metrics.is_file() or not (run / "best").is_dir():
            raise ReportError(f"{run}: not a run folder (needs metrics.jsonl and best/)")
        epochs = read_metrics(run)
        res, params, method = result, _trained_params(run / "best"), result.get("method")
        minutes = sum(e.get("epoch_s", 0.0) for e in epochs) / 60
    out = {"label": label, "eval": Path(eval_json).stem, "method": method, "trained_params": params, "train_minutes": round(minutes, 1),
           "split": result.get("split"), "num_images": result.get("num_images"),
           "num_captions": result.get("num_captions")}
    out.update({k: res[k] for k in METRIC_KEYS})
    out["gap"] = {k: res["gap"].get(k) for k in GAP_KEYS}
    return out


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each row of ``new`` replacing the row of the same label where it stood, else appended."""
    by_label = {r["label"]: r for r in new}
    merged = [by_label.pop(r["label"], r) for r in old]
    return merged + [r for r in new if r["label"] in by_label]


def markdown(results: dict[str, Any]) -> str:
    """The README table: R@K both ways, mR, gap numbers, trained parameters, training time."""
    head = ("| method | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | mR | centroid gap | k-NN modality purity "
            "| trained params | train time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["rows"]:
        cells = [r["label"]] + [f"{r[k]:.2f}" for k in METRIC_KEYS]
        cells += [f"{r['gap']['centroid_distance']:.3f}", f"{r['gap']['knn_modality_purity']:.3f}",
                  f"{r['trained_params']:,}" if r["trained_params"] else "0",
                  f"{r['train_minutes']:.0f} min" if r["train_minutes"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="*", help="LABEL=EVAL_JSON:SOURCE (SOURCE = run folder or 'baseline')")
    p.add_argument("--out", help="results JSON to write")
    p.add_argument("--markdown", help="print the table of an existing results JSON")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of an existing --out file; given rows replace those with the same label "
                        "(in place) or are appended")
    args = p.parse_args(argv)
    return run_command(lambda: _report(args), (ReportError, HarmaError, OSError, KeyError))


def _report(args: argparse.Namespace) -> None:
    if args.markdown:
        print(markdown(read_json(args.markdown, ReportError)))
        return
    if not args.rows or not args.out:
        raise ReportError("give rows and --out, or --markdown FILE")
    rows = []
    for spec in args.rows:
        label, sep, rest = spec.partition("=")
        eval_json, sep2, source = rest.rpartition(":")
        if not sep or not sep2 or not label:
            raise ReportError(f"{spec!r}: expected LABEL=EVAL_JSON:SOURCE")
        rows.append(row(label, Path(eval_json), source))
    if args.update and Path(args.out).is_file():
        rows = merge_rows(read_json(args.out, ReportError)["rows"], rows)
    results = {"rows": rows}
    write_json(args.out, results, 1)
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
