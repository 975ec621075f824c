"""The tables ``python -m training.benchmark`` writes: the README's results table (an aggregated
results file), the README's table of shipped checkpoints, and the held-out evaluation section
appended to a shipped checkpoint's model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from harma.checkpoint import read_adapter_config
from harma.errors import HarmaError
from harma.io import read_json
from harma.metrics import METRIC_KEYS
from harma.sources import dataset_name, trained_on

if TYPE_CHECKING:  # type hints only: training.benchmark imports this module
    from training.benchmark import Suite


def _pm(mean: Optional[float], sd: Optional[float]) -> str:
    if mean is None:  # no validation (data.carve=none)
        return "-"
    return f"{mean:.2f} ± {sd:.2f}" if sd is not None else f"{mean:.2f}"


def paired_line(p: dict[str, Any]) -> str:
    """One sentence for a paired difference of an aggregated results file (``results["paired"]``)."""
    a, b = p["a_label"], p["b_label"]
    if p["mean"] is None:
        return f"{a} minus {b}, paired by seed: no seed has both yet."
    seeds = ", ".join(str(s) for s in p["seeds"])
    text = f"{a} minus {b}, test mR paired by seed ({seeds}): **{p['mean']:+.2f}**"
    if p["interval"] is None:
        return text + " (one seed: no interval)."
    lo, hi = p["interval"]
    return (text + f" ± {p['sd']:.2f} (sd of the {len(p['seeds'])} differences), {p['level']:.0%} interval "
            f"[{lo:+.2f}, {hi:+.2f}] (t, {len(p['seeds']) - 1} df).")


def markdown(results: dict[str, Any]) -> str:
    """The README table of an aggregated results file (test first; val, where there is one, selected the epoch)."""
    head = ("| method | seeds | test mR | test i2t R@1 | R@5 | R@10 | test t2i R@1 | R@5 | R@10 | val mR "
            "| test centroid gap | trained params | train time (2 CPU cores) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["rows"]:
        cells = [r["label"], ", ".join(str(s) for s in r["seeds"]) if r["trained_params"] else "-",
                 "**" + _pm(r["test_mR"], r["test_mR_sd"]) + "**"]
        cells += [f"{r[f'test_{d}_R@{k}']:.2f}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        cells += [_pm(r["val_mR"], r["val_mR_sd"]), f"{r['test_centroid_distance']:.3f}",
                  f"{r['trained_params']:,}",
                  f"{r['train_minutes']:.0f} min" if r["train_minutes"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for p in results.get("published", []):
        lines.append(f"| {p['label']} | - | {p['test_mR']:.2f} | | | | | | | | | | |")
    for p in results.get("paired", []):
        lines += ["", paired_line(p)]
    if results.get("pending"):
        lines.append("")
        lines.append("Not yet run on this protocol: " + ", ".join(f"`{k}`" for k in results["pending"]) + ".")
    return "\n".join(lines)


def shipped_records(results_dir: Path, suites: Iterable["Suite"]) -> list[dict[str, Any]]:
    """The record of every shipped checkpoint (``results/<suite>/shipped/<name>.json``), whichever suite
    shipped it, in the suites' method order. A checkpoint holds one set of weights, so it has one record:
    shipping it again under another suite replaces the other's (``training.benchmark --ship``)."""
    order: list[str] = []
    found: dict[str, Path] = {}
    for suite in suites:
        for m in suite.methods:
            if not m.ship:
                continue
            order += [m.ship] if m.ship not in order else []
            path = results_dir / suite.name / "shipped" / f"{m.ship}.json"
            if path.is_file():
                if m.ship in found:
                    raise HarmaError(f"checkpoints/{m.ship} has two records, {found[m.ship]} and {path}: "
                                     "delete the one whose weights are no longer shipped")
                found[m.ship] = path
    return [read_json(found[name], HarmaError) for name in order if name in found]


def shipped_markdown(results_dir: Path, suites: Iterable["Suite"]) -> str:
    """The README table of the shipped checkpoints: exactly what ``training.evaluate`` prints for them,
    with the protocol each was trained under."""
    suites = list(suites)
    protocols = {suite.name: suite.protocol for suite in suites}
    records = shipped_records(results_dir, suites)
    head = ("| checkpoint | protocol | seed | epoch | val mR | test i2t R@1 | R@5 | R@10 | test t2i R@1 | R@5 | R@10 "
            "| test mR |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if records:
        base = records[0]["baseline_test"]
        lines.append("| zero-shot backbone (`--baseline`) | - | - | - | - | "
                     + " | ".join(f"{base[k]:.2f}" for k in METRIC_KEYS) + " |")
    for r in records:
        val = f"{r['val']['mR']:.2f}" if r.get("val") else "-"
        lines.append(f"| `{r['checkpoint']}` | {protocols[r['suite']]} | {r['seed']} | {r['best_epoch']} | {val} | "
                     + " | ".join(f"{r['test'][k]:.2f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)


def card_section(record: dict[str, Any]) -> str:
    """The model card's section on a shipped checkpoint's held-out evaluation (``record``: its shipped JSON)."""
    rows = [(f"test ({record['test']['split']}, {record['test']['num_images']} images)", record["test"]),
            ("test, zero-shot backbone", record["baseline_test"])]
    if record.get("val"):
        carve = record["val"].get("carve") or {}
        rows.insert(0, ("validation (block carve of train, " f"{record['val']['num_images']} images)", record["val"]))
        how = (f"Selected epoch {record['best_epoch']} on the validation carve ({carve.get('mode')}, fraction "
               f"{carve.get('val_fraction')}); test chose no epoch, but the carve itself was chosen after a test score "
               "(docs/results.md#protocol).")
    else:
        how = (f"The last epoch ({record['best_epoch']}) of a fixed schedule on the whole train split: nothing "
               "was selected (docs/results.md#protocol).")
    lines = ["", "## Held-out evaluation of these stored weights", "",
             f"{how} Seed {record['seed']}. R@K with tied scores counted at their expected rank.", "",
             f"`{record['command']}`", "",
             "| split | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in METRIC_KEYS) + " |" for name, r in rows]
    return "\n".join(lines) + "\n"


def card_transfer_section(name: str, adapted_on: str, table: str) -> str:
    """The model card's section on how a shipped adapter checkpoint does on RSICD val, with the
    ``<!-- rsicd-transfer-table -->`` markers that ``training.benchmark --transfer`` rewrites."""
    return (f"\n## Transfer: RSICD val\n\nThese adapters were trained on {adapted_on} only. On other data they can "
            "rank far below the backbone they adapt: on RSICD val (1,800 images, 9,000 captions), which no adapter "
            "saw, every UCM checkpoint scores well below the backbone alone (whose own stage and epoch were selected "
            "on this split, so its row reads optimistically). Compare with the baseline before using them elsewhere."
            f"\n\n`python -m training.evaluate --checkpoint checkpoints/{name} --data ../shared/datasets/rsicd "
            f"--split val --json results/rsicd/transfer/{name}.json` (ties at their expected rank)\n\n"
            f"<!-- rsicd-transfer-table -->\n{table}\n<!-- /rsicd-transfer-table -->\n")


def transfer_markdown(results_dir: Path, root: Path) -> str:
    """The table of the shipped checkpoints on RSICD val (``results_dir/rsicd/transfer/*.json``, written by
    ``training.evaluate --json``), the backbone first; where each was adapted from its adapter_config.json
    under ``root``. The README and every model card show it between ``<!-- rsicd-transfer-table -->`` markers."""
    records = [read_json(p, HarmaError) for p in sorted((results_dir / "rsicd" / "transfer").glob("*.json"))]
    records.sort(key=lambda r: (r["method"] != "full", r["checkpoint"]))
    head = "| checkpoint | adapted on | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSICD val mR |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r["method"] == "full":
            where = "- (the backbone alone: trained on RSICD train, selected on this split)"
        else:
            key = trained_on(read_adapter_config(root / r["checkpoint"]))
            where = dataset_name(key) if key else "?"
        lines.append(f"| `{r['checkpoint']}` | {where} | " + " | ".join(f"{r[k]:.2f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines)
