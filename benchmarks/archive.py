"""Archive scale: build and serve a planned index over millions of synthetic 512-d embeddings.

    python -m benchmarks.archive --n 10000000 --work /data/bench-10m     # about 40 minutes on a 2-core CPU
    python -m benchmarks.archive --n 1000000 --work /data/bench-1m
    python -m benchmarks.archive --n 200000 --work /tmp/b --quick         # smoke test (numbers meaningless)

Three stages, each in its own process so that each peak resident memory is its own (VmHWM):

1. ``truth``: exact top-10 of held-out queries over all ``n`` vectors, computed chunk by chunk.
2. ``build``: ``harma.retrieval.plan_index(n, 512, --memory-gb)`` picks the index and
   ``harma.retrieval.build_archive`` builds it from the generated chunks (they are generated again
   for each pass, never all held in memory). ``build_s`` leaves out the time spent generating them
   (``generating_s``), which reading embedding shards from disk replaces in a real build.
3. ``serve``: a fresh process loads the index memory-mapped and answers the held-out queries one
   at a time, twice: ``first_pass_*`` with what the page cache holds (after ``echo 1 >
   /proc/sys/vm/drop_caches``: from disk), ``p50_ms`` etc. with the pages those queries read
   cached; recall@10 against stage 1.

The vectors (:class:`Recipe`) are made to look like CLIP image embeddings rather than uniform
noise: a shared mean direction (CLIP embeddings sit in a narrow cone: random pairs have cosine well
above 0), cluster centres with Zipf-distributed sizes (scenes: a few common, many rare), a 64-d
low-rank component (anisotropy) and isotropic noise, then L2-normalised. The printed statistics (mean cosine of random pairs, mean cosine
of each query's nearest neighbour) describe the set. Queries are held-out draws of the same
distribution. Results go to ``benchmarks/results-archive-<device>.json`` (one row per ``n``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch.nn.functional as F

DIM = 512
CHUNK = 250_000
CLUSTERS = 20_000
K = 10


class Recipe:
    """The fixed parameters of the synthetic distribution (seeded; identical in every process).

    A vector is ``normalize(sqrt(.05) mean + sqrt(.45) centre[k] + sqrt(.48) local + sqrt(.02) noise)``:
    ``mean`` one unit direction shared by all; ``centre[k]`` one of 20,000 unit cluster centres, ``k``
    drawn with Zipf(1.1) weights (a few large scenes, many rare ones); ``local`` a Gaussian in a 6-d
    subspace of the cluster's own (6 of 256 fixed unit directions), so that neighbourhoods are
    low-dimensional as real embeddings' are; ``noise`` isotropic with unit expected norm. The weights
    were calibrated against real embeddings (``--calibrate ../shared/datasets/ucm``): the default
    checkpoint's embeddings of the 1,890 UCM train images and 1,890 draws from 21 clusters (UCM's
    class count) agree on the local intrinsic dimension (Levina-Bickel MLE, k=10: real 6.7, synthetic
    6.5) and the mean cosine of the nearest neighbour (0.90, 0.91) and of the 10th (0.79, 0.79);
    random pairs: 0.075 and 0.12. (A first recipe with a 64-d Gaussian per cluster had dimension 39,
    far harder for an inverted file than real data.)
    """

    WEIGHTS = (0.05, 0.45, 0.48, 0.02)  # variance shares: mean, centre, local, noise
    LOCAL, POOL, SUB = 6, 256, 32_768  # local dimensions, directions they are drawn from, rows per step

    def __init__(self, dim: int = DIM, clusters: int = CLUSTERS, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(1_000_003 * seed + 7)
        self.dim, self.seed = dim, seed
        self.mean = F.normalize(torch.randn(dim, generator=g), dim=0)
        self.centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
        self.pool = F.normalize(torch.randn(self.POOL, dim, generator=g), dim=1)
        self.axes = torch.argsort(torch.rand(clusters, self.POOL, generator=g), dim=1)[:, : self.LOCAL]
        w = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float64) ** 1.1
        self.cdf = torch.cumsum(w / w.sum(), 0).float()

    def draw(self, stream: int, m: int) -> np.ndarray:
        """``m`` vectors from seed stream ``stream`` (float32, L2-normalised)."""
        import torch

        g = torch.Generator().manual_seed(1_000_003 * self.seed + 1_009 * stream + 11)
        which = torch.searchsorted(self.cdf, torch.rand(m, generator=g)).clamp_max(len(self.cdf) - 1)
        z = torch.randn(m, self.LOCAL, generator=g) / self.LOCAL ** 0.5
        noise = torch.randn(m, self.dim, generator=g) / self.dim ** 0.5
        a, b, c, s = (w ** 0.5 for w in self.WEIGHTS)
        x = a * self.mean + b * self.centres[which] + s * noise
        for lo in range(0, m, self.SUB):  # the (rows, 6, dim) gather a step at a time
            hi = min(m, lo + self.SUB)
            x[lo:hi] += c * torch.einsum("mi,mid->md", z[lo:hi], self.pool[self.axes[which[lo:hi]]])
        return F.normalize(x, dim=1).numpy()


def chunks(recipe: Recipe, n: int) -> Iterator[np.ndarray]:
    """The ``n`` vectors of the collection in row order, ``CHUNK`` at a time (chunk ``i`` is seed
    stream ``i + 1``, so every pass and every process sees the same rows)."""
    for i, lo in enumerate(range(0, n, CHUNK)):
        yield recipe.draw(i + 1, min(CHUNK, n - lo))


def queries(recipe: Recipe, q: int) -> np.ndarray:
    """Held-out queries: draws of the same distribution from a seed stream no chunk uses."""
    return recipe.draw(0, q)


def status_memory(pid: Any = "self") -> dict[str, int]:
    """Resident memory of a process from ``/proc/PID/status``, in bytes: ``VmHWM`` (peak) and ``VmRSS``
    (now, anonymous and file-backed pages together), ``RssAnon`` (the process's own) and ``RssFile``
    (mapped files: index pages and libraries)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    return status_memory()["VmHWM"]


def stage_truth(work: Path, n: int, q: int, dim: int) -> dict[str, Any]:
    recipe, t0 = Recipe(dim), time.perf_counter()
    qs = queries(recipe, q)
    best_s = np.full((q, K), -np.inf, dtype=np.float32)
    best_i = np.zeros((q, K), dtype=np.int64)
    pair, lo = [], 0
    for x in chunks(recipe, n):
        s = qs @ x.T  # (q, m)
        part = np.argpartition(-s, K - 1, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + lo], 1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        if lo == 0:
            pair.append(float(np.mean(np.sum(x[: len(x) // 2] * x[len(x) // 2: 2 * (len(x) // 2)], 1))))
        lo += len(x)
    np.save(work / "truth.npy", best_i)
    return {"truth_s": round(time.perf_counter() - t0, 1), "random_pair_cosine": round(pair[0], 3),
            "nn1_cosine": round(float(best_s[:, 0].mean()), 3), "nn10_cosine": round(float(best_s[:, -1].mean()), 3),
            "truth_peak_rss_gb": round(peak_rss_bytes() / 1e9, 2)}


def stage_build(work: Path, n: int, memory_gb: float, dim: int) -> dict[str, Any]:
    from harma.retrieval import build_archive, plan_index

    recipe = Recipe(dim)
    plan = plan_index(n, dim, memory_gb)
    print(f"plan: {plan.factory_string()} ({plan.reason})", flush=True)
    out = work / "index"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ids = (f"chips/{i // 10_000:04d}/{i:08d}.tif" for i in range(n))
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {done:,}/{total:,} ({time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_bytes() / 1e9:.2f} GB)",
                  flush=True)

    generating = [0.0]

    def timed_chunks() -> Iterator[np.ndarray]:  # the time spent making vectors is not the index's
        it = chunks(recipe, n)
        while True:
            t = time.perf_counter()
            x = next(it, None)
            generating[0] += time.perf_counter() - t
            if x is None:
                return
            yield x

    index = build_archive(out, timed_chunks, n, dim, plan, ids, extra={"kind": "synthetic"},
                          progress=progress, log=lambda m: print(f"  {m}", flush=True))
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    total = time.perf_counter() - t0
    return {"index": plan.factory_string(), "build_s": round(total - generating[0], 1),
            "generating_s": round(generating[0], 1),
            "build_peak_rss_gb": round(peak_rss_bytes() / 1e9, 2), "disk_gb": round(disk / 1e9, 2),
            "nprobe": index.nprobe, "rerank": index.rerank}


def stage_serve(work: Path, q: int, dim: int) -> dict[str, Any]:
    import torch

    from harma.retrieval import load_index
    from harma.retrieval.ann import recall_at_k

    t0 = time.perf_counter()
    index = load_index(work / "index")
    load_s = time.perf_counter() - t0
    qs = torch.from_numpy(queries(Recipe(dim), q))
    truth = torch.from_numpy(np.load(work / "truth.npy"))
    passes = []
    for _ in range(2):  # the first pass reads what the page cache lacks from disk; the second finds it cached
        times, found = [], []
        for row in qs:
            t = time.perf_counter()
            _, rows = index.search(row, K)
            times.append(time.perf_counter() - t)
            found.append(rows)
        passes.append(np.array(times) * 1e3)
    first, ms = passes
    return {"load_s": round(load_s, 2), "first_pass_p50_ms": round(float(np.percentile(first, 50)), 2),
            "first_pass_p90_ms": round(float(np.percentile(first, 90)), 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "recall_at_10": round(recall_at_k(torch.stack(found), truth), 4), "queries": q,
            "serve_peak_rss_gb": round(peak_rss_bytes() / 1e9, 2),
            **{f"serve_{k}_gb": round(v / 1e9, 2) for k, v in status_memory().items() if k != "VmHWM"}}


def neighbourhood(x: Any, k: int = 10) -> dict[str, float]:
    """Mean cosine of random pairs and of each row's 1st and ``k``-th neighbour, and the median local
    intrinsic dimension (Levina-Bickel MLE over the ``k`` nearest neighbours' distances)."""
    import torch

    x = F.normalize(torch.as_tensor(x).float(), dim=1)
    s = x @ x.T
    pairs = s[torch.triu_indices(len(x), len(x), 1).unbind()]
    s.fill_diagonal_(-2.0)
    top = s.topk(k, dim=1).values
    d = torch.sqrt((2 - 2 * top).clamp_min(1e-12))
    lid = -1.0 / torch.log(d[:, :-1] / d[:, -1:]).mean(1)
    return {"random_pair_cosine": round(pairs.mean().item(), 3), "nn1_cosine": round(top[:, 0].mean().item(), 3),
            f"nn{k}_cosine": round(top[:, -1].mean().item(), 3), "lid": round(lid.median().item(), 1)}


def calibrate(data: str) -> dict[str, Any]:
    """The synthetic recipe next to real embeddings at the same size and cluster count: the default
    checkpoint (checkpoints/ucm-harma) over UCM-Captions train, and :class:`Recipe` with 21 clusters."""
    import torch

    from harma import load_adapters
    from harma.data import load_split
    from harma.encode import encode_images

    model, _, preprocess, _ = load_adapters(Path(__file__).resolve().parents[1] / "checkpoints" / "ucm-harma")
    images = load_split(data, "train").images
    with torch.inference_mode():
        real = encode_images(model, images, preprocess, batch_size=64)
    synthetic = Recipe(real.shape[1], clusters=21).draw(5, len(images))
    return {"images": len(images), "real": neighbourhood(real), "synthetic": neighbourhood(synthetic)}


STAGES = {"truth": stage_truth, "build": stage_build, "serve": stage_serve}


def run_stage(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One stage in a fresh interpreter; its JSON result comes back on the last stdout line."""
    cmd = [sys.executable, "-m", "benchmarks.archive", "--stage", name, "--n", str(args.n), "--work", str(args.work),
           "--queries", str(args.queries), "--memory-gb", str(args.memory_gb), "--dim", str(args.dim)]
    print(f"## {name}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("{"):
            last = line
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or not last:
        raise SystemExit(f"error: stage {name} failed (rc {proc.returncode})")
    result = json.loads(last)
    print(json.dumps(result), flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.archive", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000_000, help="vectors in the collection")
    p.add_argument("--work", type=Path, help="scratch folder (the 10M index takes about 6 GB)")
    p.add_argument("--dim", type=int, default=DIM, help="vector dimensions (384: the default model's)")
    p.add_argument("--calibrate", metavar="UCM_DIR",
                   help="only compare the synthetic vectors with real ones: the default checkpoint's embeddings of "
                        "this UCM-Captions folder's train images")
    p.add_argument("--queries", type=int, default=300, help="held-out queries (latency and recall)")
    p.add_argument("--memory-gb", type=float, default=8.0, help="the build_index --memory-gb budget")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--stages", default="truth,build,serve",
                   help="run some stages (e.g. truth,build now and serve on a quiet machine later); results are "
                        "merged into the row for this --n")
    p.add_argument("--keep", action="store_true", help="keep the index in --work (e.g. for benchmarks.app_archive)")
    p.add_argument("--quick", action="store_true", help="mark the result as a smoke test")
    p.add_argument("--json", dest="json_out", type=Path, help="results file (default benchmarks/results-archive-cpu.json)")
    args = p.parse_args(argv)
    if args.calibrate:
        print(json.dumps(calibrate(args.calibrate), indent=1))
        return 0
    if args.work is None:
        p.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        fn = STAGES[args.stage]
        kw = {"truth": {"n": args.n, "q": args.queries}, "build": {"n": args.n, "memory_gb": args.memory_gb},
              "serve": {"q": args.queries}}[args.stage]
        kw["dim"] = args.dim
        print(json.dumps(fn(args.work, **kw)), flush=True)
        return 0
    stages = args.stages.split(",")
    if not stages or any(s not in STAGES for s in stages):
        p.error(f"--stages: choose among {', '.join(STAGES)}")
    row: dict[str, Any] = {"n": args.n, "dim": args.dim, "memory_gb": args.memory_gb, "cores": os.cpu_count()}
    for name in ("truth", "build", "serve"):
        if name in stages:
            row.update(run_stage(name, args))
    print(json.dumps(row, indent=1))
    if not args.keep and "serve" in stages:
        shutil.rmtree(args.work / "index", ignore_errors=True)
    if not args.quick or args.json_out:
        out = args.json_out or Path(__file__).parent / "results-archive-cpu.json"
        rows = json.loads(out.read_text()) if out.is_file() else []
        old = next((r for r in rows if (r.get("n"), r.get("dim"), r.get("memory_gb")) == (args.n, args.dim, args.memory_gb)), {})
        rows = [r for r in rows if r is not old] + [{**old, **row}]
        out.write_text(json.dumps(sorted(rows, key=lambda r: (r["n"], r["dim"])), indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
