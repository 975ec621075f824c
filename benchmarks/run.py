"""Benchmarks: embedding throughput and adapter overhead, training steps, search, UMAP, app start-up.

    python -m benchmarks.run                       # everything, about 8 minutes on a 2-core CPU
    python -m benchmarks.run --only search,umap    # some sections
    python -m benchmarks.run --quick               # tiny sizes (a smoke test, numbers meaningless)

Prints one table per section and writes them all to ``--json`` (default
``benchmarks/results-<device>.json``). Models use random weights (speed does not depend on the
values; adapters are perturbed off their zero init so they compute something), except the app
section, which times the real app on its default model and UCM-Captions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks import fidelity, scene, sections, sides
from training.cli import CliError, pick_device

SECTIONS: dict[str, Callable[..., list[dict]]] = {
    "embed": sections.embedding,
    "train": sections.train_steps,
    "search": sections.search,
    "umap": sections.umap_time,
    "app": sections.app_start,
    "demo": sections.demo_start,
    "fidelity": fidelity.fidelity,
    "gapfig": fidelity.gap_figures_time,
    "scene": scene.scene,
    "sides": sides.sides,
}


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of dict rows (union of keys, in first-seen order)."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)

    table = [[cell(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, width)), "-+-".join("-" * w for w in width)]
    lines += [" | ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w) for v, w in zip(t, width))
              for t in table]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths in seconds")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", dest="json_out", help="results file (default benchmarks/results-<device>.json)")
    p.add_argument("--data", default=os.environ.get("HARMA_BENCH_DATA", str(Path("..") / "shared" / "datasets" / "ucm")),
                   help="UCM-Captions folder for the app section")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"machine": machine(), "device": label, "quick": args.quick, "sections": {}}
    print(f"device: {label}; {results['machine']}", flush=True)
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"\n## {name}", flush=True)
        try:
            rows = SECTIONS[name](device=device, quick=args.quick, data=args.data)
        except sections.Skip as e:
            print(f"skipped: {e}")
            results["sections"][name] = {"skipped": str(e)}
            continue
        print(format_rows(rows))
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        results["sections"][name] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.json_out or Path(__file__).parent / f"results-{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    if not args.quick or args.json_out:
        merged = _merge(out, results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"\nwrote {out} (this run {results['total_seconds']:.0f} s)")
    return 0


def _merge(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Sections of this run replace the same sections of an earlier results file on the same machine; the
    others are kept (so ``--only app`` updates one table). ``total_seconds`` is the sum over sections."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return results
    if old.get("machine") != results["machine"] or old.get("device") != results["device"] or old.get("quick"):
        dropped = sorted(set(old.get("sections", {})) - set(results["sections"]))
        if dropped:
            now = {**results["machine"], "device": results["device"]}
            was = {k: v for k, v in {**old.get("machine", {}), "device": old.get("device")}.items() if now.get(k) != v}
            print(f"note: {out} was measured on another machine or setup ({was}); its sections "
                  f"{', '.join(dropped)} are not kept. Give --json another file to keep it whole.", file=sys.stderr)
        return results
    sections = {**old.get("sections", {}), **results["sections"]}
    total = round(sum(s.get("seconds", 0.0) for s in sections.values()), 1)
    return {**results, "sections": sections, "total_seconds": total}


if __name__ == "__main__":
    sys.exit(main())
