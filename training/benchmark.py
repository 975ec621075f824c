"""The whole comparison in one command: train every method for every seed, test it, and regenerate
the README's results table.

    python -m training.benchmark --suite ucm-fixed --seeds 0 1 2 3 4   # the protocol fixed in advance
    python -m training.benchmark --suite ucm-fixed --seeds 0 1 2 3 4 --dry-run  # the runs, CPU time left
    python -m training.benchmark --suite ucm --aggregate-only           # rebuild results/ucm.json + README

Suites: ``ucm-fixed`` (docs/results.md#protocol) trains a fixed 8 epochs on the whole train split and
tests the last epoch, nothing selected; ``ucm``, the earlier protocol, picks each run's epoch on a
validation carve of train. Each (method, seed) trains with ``python -m training.train`` (resumable:
an interrupted run continues from its last checkpoint) and is evaluated with ``python -m
training.evaluate``'s code on the test split (and on the carve, where there is one). Its result is
written at once to ``results/<suite>/runs/<method>-s<seed>.json``; a run whose JSON exists is
skipped, so the command resumes where it stopped. Last, the runs are aggregated (mean and sample
standard deviation over seeds; a suite's paired differences with their 95% t-interval) into
``results/<suite>.json`` and the table between the README's ``<!-- <suite>-table -->`` markers.
Nothing is selected on test.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from harma.errors import HarmaError
from harma.io import CONFIG_NAME, atomic_write_bytes, atomic_write_json, read_json
from harma.metrics import METRIC_KEYS
from harma.sources import dataset_name, trained_on
from training import evaluate as evaluate_cli
from training.benchmark_results import aggregate, loss_curve, val_curve
from training.benchmark_tables import card_section, card_transfer_section, markdown, shipped_markdown, transfer_markdown
from training.cli import USER_ERRORS, run_command, write_json
from training.config import NO_CARVE, load_config
from training.export import export
from training.rundir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TABLE = "ucm-shipped"  # the README's <!-- ucm-shipped-table --> markers: every shipped UCM checkpoint



@dataclass(frozen=True)
class Method:
    """One row of a suite: how it trains (overrides of the suite's config) and how many seeds it gets."""

    key: str
    label: str
    overrides: tuple[str, ...] = ()
    train: bool = True  # False: evaluate the suite's base weights as they are (zero-shot)
    max_seeds: Optional[int] = None  # at most this many of the requested seeds (None: all)
    cpu_minutes: float = 30.0  # wall time of one run on 2 CPU cores, for --dry-run
    ship: Optional[str] = None  # --ship exports the first seed's best/ to checkpoints/<ship> (fp16)


@dataclass(frozen=True)
class Published:
    """A number from a paper, shown beside ours and labelled as theirs."""

    label: str
    test_mR: float
    source: str


@dataclass(frozen=True)
class Suite:
    name: str
    config: str  # training config, relative to the repository root
    data: str  # default dataset folder
    test_split: str
    base_checkpoint: str  # the backbone as a checkpoint folder: the zero-shot row
    methods: tuple[Method, ...]
    published: tuple[Published, ...] = field(default=())
    overrides: tuple[str, ...] = ()  # config overrides of every run of the suite (its protocol)
    paired: tuple[tuple[str, str], ...] = ()  # (a, b): report a - b paired by seed, with a 95% t-interval
    protocol: str = ""  # in a few words, for the shipped-checkpoint table


TUNED = ("model.backbone_dropout=false", "model.learn_temperature=false", "model.temperature_init=0.05",
         "model.also_train=[norms,biases]")
PE_RSITR = "PE-RSITR (Yuan et al. 2023), Table III, UCM test, CLIP ViT-B/32"

SUITES = {
    "ucm": Suite(
        name="ucm",
        config="training/configs/ucm_minilm_harma.yaml",
        data="../shared/datasets/ucm",
        test_split="test",
        base_checkpoint="checkpoints/rs-backbone",
        methods=(
            Method("zeroshot", "zero-shot (backbone alone)", train=False, max_seeds=1, cpu_minutes=0.5),
            Method("harma", "HarMA, as released (MMS in the text tower)", cpu_minutes=28, ship="ucm-harma"),
            Method("full", "full fine-tuning (both towers)", ("model.method=full", "optim.lr=3e-4"), cpu_minutes=30),
            Method("harma_tuned", "HarMA, tuned recipe (no backbone dropout, temperature 0.05, norms and biases)",
                   TUNED, cpu_minutes=30, ship="ucm-harma-tuned"),
            Method("mrs", "MRS-Adapter (PE-RSITR)", ("model.method=mrs", "loss.triplet=0", "loss.intra_image=1",
                                                       "loss.intra_text=1"), max_seeds=1, cpu_minutes=40,
                   ship="ucm-mrs"),
            Method("harma_paper", "HarMA, paper sharing (MMS shared by both towers)",
                   ("model.harma.share_mode=shared",), max_seeds=1, cpu_minutes=30, ship="ucm-harma-paper"),
        ),
        protocol="old: epoch picked on the block carve",
        published=(
            Published("zero-shot, CLIP ViT-B/32 (theirs)", 33.08, PE_RSITR),
            Published("full fine-tuning, CLIP ViT-B/32 (theirs)", 52.43, PE_RSITR),
            Published("MRS-Adapter, CLIP ViT-B/32 (theirs)", 55.71, PE_RSITR),
            Published("RemoteCLIP ViT-B/32 (theirs)", 56.36, "RemoteCLIP (Liu et al. 2024), UCM test"),
        ),
    ),
}
# The protocol fixed in advance (docs/results.md#protocol): 8 epochs on the whole official train split, no
# validation and no selection, the last epoch tested once; five seeds for HarMA and full fine-tuning, one for
# the other trained methods. Time: HarMA and full fine-tuning seed 1, each alone on 2 cores with 2 threads,
# took 53 min; the other methods: their carve-suite train time x 1.45, the ratio those two runs measured.
_FIXED_MINUTES = {"zeroshot": 0.5, "harma": 55, "full": 55, "harma_tuned": 67, "mrs": 95, "harma_paper": 71}
SUITES["ucm-fixed"] = dataclasses.replace(
    SUITES["ucm"], name="ucm-fixed", overrides=("data.carve=none",), paired=(("harma", "full"),),
    protocol="fixed in advance: the last of 8 epochs, nothing selected",
    methods=tuple(dataclasses.replace(m, cpu_minutes=_FIXED_MINUTES[m.key],
                                      max_seeds=m.max_seeds if m.key in ("harma", "full") else 1)
                  for m in SUITES["ucm"].methods))


class BenchmarkError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Run:
    method: Method
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.key}-s{self.seed}"


def plan(suite: Suite, seeds: list[int], only: Optional[list[str]] = None) -> list[Run]:
    """The runs in the order they are made: every method's first seed, then the second, ..."""
    keys = [m.key for m in suite.methods]
    unknown = sorted(set(only or []) - set(keys))
    if unknown:
        raise BenchmarkError(f"--methods {' '.join(unknown)}: not in suite {suite.name} ({', '.join(keys)})")
    if not seeds or len(set(seeds)) != len(seeds):
        raise BenchmarkError(f"--seeds must list distinct seeds, got {seeds}")
    runs = []
    for i, seed in enumerate(seeds):
        for m in suite.methods:
            if (only and m.key not in only) or (m.max_seeds is not None and i >= m.max_seeds):
                continue
            runs.append(Run(m, seed))
    return runs


def train_command(suite: Suite, run: Run, runs_dir: Path, data: str) -> list[str]:
    """The ``python -m training.train`` command of one run (seeded data order and adapter init)."""
    return [sys.executable, "-m", "training.train", "--config", suite.config, *suite.overrides, *run.method.overrides,
            f"data.root={data}", f"run.seed={run.seed}", f"model.init_seed={run.seed}",
            f"run.out_dir={runs_dir.as_posix()}", f"run.name={suite.name}-{run.name}", "run.resume=auto"]


def _evaluate(checkpoint: Path, data: str, split: str, extra: list[str]) -> dict[str, Any]:
    args = evaluate_cli.build_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data", data, "--split", split, "--num-workers", "1", *extra])
    try:
        return evaluate_cli.evaluate(args)
    except USER_ERRORS as e:
        raise BenchmarkError(f"evaluating {checkpoint} on {split}: {e}") from None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("num_images", "num_captions", "split", "carve", "ties")
    return {**{k: result[k] for k in METRIC_KEYS}, "gap": result.get("gap", {}),
            **{k: result[k] for k in keep if k in result}}


def _machine() -> dict[str, Any]:
    """Where a run ran: reruns on another machine move a run by up to about 1 mR (docs/results.md)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(terse=True)}


def _carve_args(cfg) -> list[str]:
    d = cfg.data
    return ["--carve", d.carve, "--val-fraction", str(d.val_fraction), "--carve-seed", str(d.carve_seed)]


def execute(suite: Suite, run: Run, runs_dir: Path, data: str) -> dict[str, Any]:
    """Train (or resume) one run, then evaluate its best checkpoint on val and test."""
    cfg = load_config(ROOT / suite.config, [*suite.overrides, *run.method.overrides, f"data.root={data}"])
    validated = cfg.data.carve != NO_CARVE
    carve = {"mode": cfg.data.carve, "val_fraction": cfg.data.val_fraction, "seed": cfg.data.carve_seed}
    out: dict[str, Any] = {"suite": suite.name, "method": run.method.key, "label": run.method.label,
                           "seed": run.seed, "carve": carve if validated else {"mode": NO_CARVE},
                           "selection": "best validation epoch" if validated else "last epoch (none)",
                           "ties": "expected", "machine": _machine()}
    if not run.method.train:
        checkpoint = ROOT / suite.base_checkpoint
        out.update(command=None, best_epoch=None, val_mR_per_epoch=[], trained_params=0, train_minutes=0.0)
    else:
        cmd = train_command(suite, run, runs_dir, data)
        out["command"] = shlex.join(["python", *cmd[1:]]).replace(f"{ROOT}/", "")  # no machine paths
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            raise BenchmarkError(f"{run.name}: training exited with {proc.returncode} ({out['command']})")
        run_dir = runs_dir / f"{suite.name}-{run.name}"
        checkpoint = run_dir / "best"
        epochs = read_metrics(run_dir)
        meta = read_json(checkpoint / CONFIG_NAME, BenchmarkError)
        out.update(best_epoch=meta["extra"]["epoch"], val_mR_per_epoch=val_curve(epochs),
                   train_loss_per_epoch=loss_curve(epochs),
                   trained_params=meta["trainable_params"],
                   train_minutes=round(sum(e.get("epoch_s", 0.0) for e in epochs) / 60, 1),
                   wall_minutes_this_call=round((time.time() - t0) / 60, 1),
                   run_dir=run_dir.as_posix().replace(f"{ROOT}/", ""))
    out["val"] = _summary(_evaluate(checkpoint, data, "train:val", _carve_args(cfg))) if validated else None
    out["test"] = _summary(_evaluate(checkpoint, data, suite.test_split, []))
    return out


def update_readme(readme: Path, suite: str, table: str) -> bool:
    """Replace the text between ``<!-- SUITE-table -->`` and ``<!-- /SUITE-table -->``; True if changed."""
    start, end = f"<!-- {suite}-table -->", f"<!-- /{suite}-table -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise BenchmarkError(f"{readme}: no {start} ... {end} markers to put the table between")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    new = f"{before}{start}\n{table}\n{end}{after}"
    if new != text:
        atomic_write_bytes(readme, new.encode())
    return new != text


def write_results(suite: Suite, results_dir: Path, readme: Optional[Path]) -> dict[str, Any]:
    results = aggregate(suite, results_dir)
    atomic_write_json(results_dir / f"{suite.name}.json", results, 1)
    if readme is not None:
        update_readme(readme, suite.name, markdown(results))
        if any((results_dir / s.name / "shipped").is_dir() for s in SUITES.values()):
            update_readme(readme, SHIPPED_TABLE, shipped_markdown(results_dir, SUITES.values()))
    return results


def check_shippable(run_dir: Path, epochs: int, record: Optional[Path]) -> None:
    """Refuse a run that has not finished its ``epochs`` (its best/ would be an early pick), and one
    whose validation curve (with no validation, its training-loss curve) is not the one recorded in
    ``record`` (the run JSON the README reports), so a shipped checkpoint is always the run its table
    row describes."""
    done = [e for e in read_metrics(run_dir) if not e.get("partial")]
    if len(done) < epochs:
        raise BenchmarkError(f"{run_dir}: {len(done)} of {epochs} epochs done; let the run finish before shipping it")
    if record is not None and record.is_file():
        saved = read_json(record, BenchmarkError)
        what, recorded, curve = "val mR", saved.get("val_mR_per_epoch"), val_curve(done)
        if not recorded and not curve:  # no validation (data.carve=none): the loss curve identifies the run
            what, recorded, curve = "training loss", saved.get("train_loss_per_epoch"), loss_curve(done)
        if recorded != curve:
            raise BenchmarkError(f"{run_dir}: its {what} per epoch {curve} is not the one in {record} ({recorded}); "
                                 "ship the run that JSON records, or delete the JSON and re-run the benchmark")


def ship(suite: Suite, seed: int, runs_dir: Path, results_dir: Path, data: str,
         methods: Optional[list[str]] = None) -> list[str]:
    """Export the given seed's best/ of every shipped method (or of ``methods``) to ``checkpoints/<name>``
    (fp16, with the run's ``metrics.jsonl``), evaluate the exported files on val and test (with the
    zero-shot baseline), record that in ``results/<suite>/shipped/<name>.json`` and in the model card.
    The seed is fixed in advance (the first one), so nothing is chosen on test. Only finished runs
    whose validation curve is the recorded one ship (:func:`check_shippable`). Returns the names shipped."""
    shipped = []
    for m in suite.methods:
        run_dir = runs_dir / f"{suite.name}-{m.key}-s{seed}"
        if not m.ship or (methods and m.key not in methods):
            continue
        if not (run_dir / "best").is_dir():
            print(f"ship {m.ship}: no {run_dir / 'best'} on this machine, skipped", flush=True)
            continue
        cfg = load_config(ROOT / suite.config, [*suite.overrides, *m.overrides, f"data.root={data}"])
        check_shippable(run_dir, cfg.run.epochs, results_dir / suite.name / "runs" / f"{m.key}-s{seed}.json")
        out = ROOT / "checkpoints" / m.ship
        export(run_dir, out, "fp16")
        shutil.copy(run_dir / "metrics.jsonl", out / "metrics.jsonl")  # every epoch's record, beside the pick
        name = f"checkpoints/{m.ship}"
        val = _evaluate(out, data, "train:val", _carve_args(cfg)) if cfg.data.carve != NO_CARVE else None
        test = _evaluate(out, data, suite.test_split, ["--baseline"])
        meta = read_json(out / CONFIG_NAME, BenchmarkError)
        record = {"suite": suite.name, "method": m.key, "label": m.label, "seed": seed, "checkpoint": name,
                  "best_epoch": meta["extra"]["epoch"],
                  "command": f"python -m training.evaluate --checkpoint {name} --data {data} --split "
                             f"{suite.test_split} --baseline",
                  "weights_sha256": test.get("weights_sha256"),
                  "val": _summary(val) if val else None, "test": _summary(test), "baseline_test": _summary(test["baseline"])}
        write_json(results_dir / suite.name / "shipped" / f"{m.ship}.json", record, indent=1)
        for other in SUITES.values():  # the weights another suite shipped under this name are gone
            old = results_dir / other.name / "shipped" / f"{m.ship}.json"
            if other.name != suite.name and old.is_file():
                old.unlink()
                print(f"ship {m.ship}: replaces the weights {old} recorded", flush=True)
        card = (out / "MODEL_CARD.md").read_text() + card_section(record)
        adapted_on = trained_on(meta)
        card += card_transfer_section(m.ship, dataset_name(adapted_on) if adapted_on else "its training data",
                                      transfer_markdown(results_dir, ROOT))
        atomic_write_bytes(out / "MODEL_CARD.md", card.encode())
        print(f"ship {m.ship}: now its RSICD row: python -m training.evaluate --checkpoint {name} --data "
              f"../shared/datasets/rsicd --split val --json results/rsicd/transfer/{m.ship}.json, then "
              "python -m training.benchmark --transfer", flush=True)
        shipped.append(m.ship)
    return shipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="ucm", choices=sorted(SUITES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds (methods marked for one seed take the first)")
    p.add_argument("--methods", nargs="+", help="only these methods (default: all of the suite)")
    p.add_argument("--data", help="dataset folder (default: the suite's, ../shared/datasets/<name> from a checkout)")
    p.add_argument("--runs-dir", default="runs/benchmark", help="where the run folders go (resumable)")
    p.add_argument("--results-dir", default="results", help="where the run JSONs and the aggregate go")
    p.add_argument("--readme", default="README.md", help="README whose table is regenerated ('' = none)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, done or not, and their CPU time")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the aggregate and the table")
    p.add_argument("--transfer", action="store_true",
                   help="only rewrite the RSICD transfer table (results/rsicd/transfer/*.json) in the README and "
                        "every model card that has its <!-- rsicd-transfer-table --> markers")
    p.add_argument("--ship", action="store_true",
                   help="export the first seed's runs of the shipped methods to checkpoints/ (fp16), evaluate them, "
                        "and rebuild the README's shipped-checkpoint table")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), (BenchmarkError, HarmaError, OSError))


def _run(args: argparse.Namespace) -> None:
    suite = SUITES[args.suite]
    results_dir, runs_dir = Path(args.results_dir), Path(args.runs_dir).resolve()
    readme = Path(args.readme) if args.readme else None
    data = args.data or suite.data
    if args.transfer:
        table = transfer_markdown(results_dir, ROOT)
        cards = sorted((ROOT / "checkpoints").glob("*/MODEL_CARD.md"))
        for path in [*([readme] if readme else []), *cards]:
            if path in cards and "<!-- rsicd-transfer-table -->" not in path.read_text():
                continue
            update_readme(path, "rsicd-transfer", table)
        print(table)
        return
    runs = plan(suite, args.seeds, args.methods)
    todo = [r for r in runs if not (results_dir / suite.name / "runs" / f"{r.name}.json").is_file()]
    if args.dry_run:
        for r in runs:
            state = "done" if r not in todo else f"~{r.method.cpu_minutes:.0f} min on 2 CPU cores"
            print(f"{r.name:<16} {state}")
        total = sum(r.method.cpu_minutes for r in todo)
        print(f"{len(todo)} of {len(runs)} runs to go, about {total / 60:.1f} h on 2 CPU cores")
        return
    if args.ship:
        names = ship(suite, args.seeds[0], runs_dir, results_dir, data, args.methods)
        print(f"shipped: {', '.join(names) or 'nothing'}")
    elif not args.aggregate_only:
        if todo and not Path(data).is_dir():
            raise BenchmarkError(f"dataset folder {data} not found; pass --data DIR")
        for n, r in enumerate(todo, 1):
            print(f"[benchmark {n}/{len(todo)}] {r.name}", flush=True)
            result = execute(suite, r, runs_dir, data)
            path = write_json(results_dir / suite.name / "runs" / f"{r.name}.json", result, indent=1)
            val = f"val mR {result['val']['mR']:.2f}, " if result["val"] else ""
            print(f"[benchmark {n}/{len(todo)}] {r.name}: {val}test mR {result['test']['mR']:.2f} -> {path}", flush=True)
            write_results(suite, results_dir, readme)
    results = write_results(suite, results_dir, readme)
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
