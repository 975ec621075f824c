"""The benchmark sections of ``python -m benchmarks.run``; each returns a list of table rows."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from harma import HarmaConfig, ModelConfig, create_model
from harma.losses import HarmaLoss, LossConfig
from harma.retrieval import ANN_THRESHOLD, EmbeddingIndex, exact_topk
from harma.retrieval.ann import ANNConfig, ANNIndex, recall_at_k

from .browser import CHROMIUM, launch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCH = "RS-ViT-S16-MiniLM"
# HarMA sizes of the default model's recipe (training/configs/ucm_minilm_harma.yaml); ViT-B-32 uses the released ones
DEFAULT_HARMA = HarmaConfig(bottleneck=128, attn_heads=8, mms_dim=64, mms_heads=8)
CAPTIONS = ["many planes are parked next to a long building in an airport",
            "a baseball field is surrounded by green trees and some buildings",
            "several storage tanks are beside a road", "a river with green banks runs through a dense forest"]


class Skip(Exception):
    """A section that cannot run here (missing checkpoint or data); the reason is printed."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p))
    return model


def _models(arch: str, harma: HarmaConfig, device: torch.device):
    """(base clip, adapted clip, tokenizer, image size): the same random backbone with and without adapters."""
    model, _, _, tokenizer = create_model(ModelConfig(model_name=arch, pretrained=None, method="harma", harma=harma),
                                          device)
    _perturbed(model)
    base = copy.deepcopy(model).unload().eval()
    size = model.clip.visual.image_size
    return base, model.clip.eval(), tokenizer, size[0] if isinstance(size, (tuple, list)) else size


def embedding(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    """Images/s and captions/s with and without HarMA adapters, measured interleaved in one process."""
    rows = []
    archs = [(f"{DEFAULT_ARCH} (default)", DEFAULT_ARCH, DEFAULT_HARMA), ("ViT-B-32", "ViT-B-32", HarmaConfig())]
    reps = 2 if quick else 7
    for label, arch, harma in archs[:1] if quick else archs:
        base, adapted, tokenizer, size = _models(arch, harma, device)
        n_img = 4 if quick else (64 if device.type == "cuda" else 32 if size <= 160 else 16)
        n_txt = 8 if quick else (256 if device.type == "cuda" else 64)
        images = torch.randn(n_img, 3, size, size, device=device)
        tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n_txt)]).to(device)
        with torch.inference_mode():
            for kind, data, n in (("image", images, n_img), ("text", tokens, n_txt)):
                enc = "encode_image" if kind == "image" else "encode_text"
                fb, fa = getattr(base, enc), getattr(adapted, enc)
                fb(data), fa(data)  # warm-up
                tb, ta = [], []
                for _ in range(reps):
                    tb.append(_time(lambda: fb(data), device))
                    ta.append(_time(lambda: fa(data), device))
                mb, ma = statistics.median(tb), statistics.median(ta)
                rows.append({"model": label, "input": kind, "batch": n, "plain /s": n / mb, "harma /s": n / ma,
                             "overhead": ma / mb})
        del base, adapted
    return rows


def _train_setup(method: str, device: torch.device):
    from training.config import OptimConfig
    from training.optim import build_optimizer, build_scheduler

    cfg = ModelConfig(model_name=DEFAULT_ARCH, pretrained=None, method=method, harma=DEFAULT_HARMA)
    model, _, _, tokenizer = create_model(cfg, device)
    loss = LossConfig(contrastive=1.0, triplet=1.0 if method == "harma" else 0.0, triplet_reduction="mean",
                      intra_image=1.0 if method == "mrs" else 0.0, intra_text=1.0 if method == "mrs" else 0.0)
    optim = build_optimizer(model, OptimConfig())
    return model, tokenizer, HarmaLoss(loss), optim, build_scheduler(optim, OptimConfig(), 100)


def train_steps(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    """Training pairs/s per method on the default architecture (fp32 on CPU, bf16 autocast on GPU)."""
    from training.engine import StepSettings, train_step

    rows = []
    batch = 4 if quick else (128 if device.type == "cuda" else 32)
    steps = 1 if quick else 4
    for method in ("harma", "mrs", "full"):
        model, tokenizer, loss_fn, optim, sched = _train_setup(method, device)
        size = model.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        data = (torch.randn(batch, 3, size, size), tokenizer([CAPTIONS[i % 4] for i in range(batch)]),
                torch.arange(batch), torch.arange(batch))
        settings = StepSettings(device=device, augmented_views=method == "mrs",
                                autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
        model.train()
        train_step(model, data, loss_fn, optim, sched, settings, 0)  # warm-up
        times = [_time(lambda: train_step(model, data, loss_fn, optim, sched, settings, 0), device)
                 for _ in range(steps)]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"method": method, "batch": batch, "trainable params": trainable,
                     "pairs/s": batch / statistics.median(times), "step s": statistics.median(times)})
        del model, optim
    return rows


def centres(k: int, d: int = 512, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def clustered(n: int, c: torch.Tensor, noise: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Unit vectors around the centres ``c`` (a stand-in for real embeddings, which cluster by scene):
    a point has cosine ~0.71 with its centre and ~0.5 with a point of the same centre; clusters overlap
    enough that an IVF index misses some true neighbours (recall@10 < 1)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, c.shape[1])
    for lo in range(0, n, 65_536):
        hi = min(n, lo + 65_536)
        x = c[torch.randint(0, len(c), (hi - lo,), generator=g)] + noise * torch.randn(hi - lo, c.shape[1], generator=g) / c.shape[1] ** 0.5
        out[lo:hi] = F.normalize(x, dim=-1)
    return out


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _pct(times: list[float], q: float) -> float:
    s = sorted(times)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


def search(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    """Single-query latency (p50/p99) of exact search and of the faiss IVF index, 512-d, with recall@10
    against exact search; synthetic clustered vectors (:func:`clustered`), queries from the same clusters."""
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        c = centres(max(10, n // 100))  # about 100 items per scene-like cluster
        x, queries = clustered(n, c), clustered(500, c, seed=99)
        index = EmbeddingIndex(range(n), x, normalize=False, backend="exact")
        n_exact = 10 if quick else (20 if n >= 500_000 else 100)
        t = [_time(lambda q=q: index.search(q, 10), device) for q in queries[:n_exact]]
        rows.append({"items": n, "search": "exact", "p50 ms": _pct(t, 0.5), "p99 ms": _pct(t, 0.99),
                     "recall@10": 1.0, "build s": 0.0, "memory MB": x.numel() * 4 / 2**20})
        if n >= (1_000 if quick else ANN_THRESHOLD):
            rss0, t0 = _rss_mb(), time.perf_counter()
            ann = ANNIndex(x.numpy(), ANNConfig())
            build = time.perf_counter() - t0
            mem = _rss_mb() - rss0
            t = [_time(lambda q=q: ann.search(q[None], 10), device) for q in queries]
            n_rec = 20 if quick else 200
            exact = torch.cat([exact_topk(queries[i:i + 50], x, 10)[1] for i in range(0, n_rec, 50)])
            rec = recall_at_k(ann.search(queries[:n_rec], 10)[1], exact)
            rows.append({"items": n, "search": f"faiss IVF{ann.index.nlist},nprobe={ann.index.nprobe}",
                         "p50 ms": _pct(t, 0.5), "p99 ms": _pct(t, 0.99), "recall@10": rec, "build s": build,
                         "memory MB": max(mem, ann.memory_bytes() / 2**20)})
            del ann
        del index, x
    return rows


def umap_time(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    """Seconds for a 2-D cosine UMAP (the app's embedding tab), 384-d points; the first import of umap-learn."""
    from harma.projection import umap_2d

    t0 = time.perf_counter()
    import umap  # noqa: F401

    rows = [{"points": 0, "what": "import umap-learn (numba)", "seconds": time.perf_counter() - t0}]
    for n in [200] if quick else [1_000, 5_000, 20_000]:
        x = clustered(n, centres(64, d=384), seed=n).numpy()
        t0 = time.perf_counter()
        umap_2d(x, seed=0)
        rows.append({"points": n, "what": "UMAP 2-D, cosine", "seconds": time.perf_counter() - t0})
    return rows


# -- app ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(data: Optional[str], cache: Path, port: int) -> subprocess.Popen:
    """``python app.py`` on ``data``'s train split, or with no dataset (the bundled demo gallery)."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HARMA_CACHE": str(cache)}
    gallery = ["--data", data, "--split", "train"] if data else []
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), *gallery,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_up(proc: subprocess.Popen, port: int, timeout: float = 300.0) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise Skip(f"the app exited: {proc.stderr.read()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise Skip(f"the app did not start within {timeout:.0f} s")


def _api(http, base: str, name: str, data: list) -> list:
    """One call of a named event over Gradio's HTTP API (POST, then read the event stream to `complete`)."""
    r = http.post(f"{base}/gradio_api/call/{name}", json={"data": data})
    r.raise_for_status()
    event = None
    with http.stream("GET", f"{base}/gradio_api/call/{name}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise Skip(f"/{name} failed: {line[5:].strip()[:300]}")
                return json.loads(line[5:])
    raise Skip(f"/{name}: the event stream ended without a result")


def _query(i: int) -> str:
    """The i-th timed query: a caption plus a counter, so no answer comes from an earlier identical request."""
    return f"{CAPTIONS[i % len(CAPTIONS)]} {i}"


# Both galleries hold k decoded images and the status line names the query.
_GALLERIES_DONE = """([q, k]) => { const s = document.querySelector('#status');
  const imgs = [...document.querySelectorAll('#baseline-gallery img, #adapted-gallery img')];
  return !!s && s.innerText.includes(q) && imgs.length >= 2 * k && imgs.every(i => i.complete && i.naturalWidth > 0); }"""


def _browser_latency(url: str, n: int, k: int = 8) -> list[float]:
    """Seconds from clicking Search to both galleries showing k decoded images, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            box = page.locator("#query textarea")
            box.wait_for(timeout=60_000)
            times = []
            for i in range(n + 1):  # the first query is a warm-up
                query = _query(i)
                box.fill(query)
                t0 = time.perf_counter()
                page.locator("#search").click()
                page.wait_for_function(_GALLERIES_DONE, arg=[query, k], timeout=120_000, polling=5)
                times.append(time.perf_counter() - t0)
            return times[1:]
        finally:
            browser.close()


QUERY = "many planes parked at an airport"


def _parallel_queries(base: str, n: int, pid: int) -> dict[str, Any]:
    """``n`` text queries sent at the same moment, each on its own connection: latency p50/p99,
    errors, and the app's resident memory afterwards."""
    import concurrent.futures
    import threading

    import httpx

    start = threading.Barrier(n)

    def one(i: int) -> tuple[float, Optional[str]]:
        with httpx.Client(timeout=600) as http:
            start.wait()
            t0 = time.perf_counter()
            try:
                _, _, status = _api(http, base, "search_text", [_query(1000 + i), 8, None])
                return time.perf_counter() - t0, None if "⚠️" not in status else status
            except (Skip, httpx.HTTPError) as e:
                return time.perf_counter() - t0, str(e)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    lat = [t for t, _ in results]
    try:
        rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        rss = float("nan")
    return {f"{n} parallel p50 ms": _pct(lat, 0.5), f"{n} parallel p99 ms": _pct(lat, 0.99),
            f"{n} parallel errors": sum(err is not None for _, err in results), "app RSS MB": rss}


def app_start(device: torch.device, quick: bool, data: str, **_: Any) -> list[dict]:
    """The real app on its default model with UCM train as the gallery: cold start to first answer
    (warm embedding cache), text query latency through the HTTP API and gradio_client, 20 queries
    sent at once (p50/p99, errors, the app's memory), click-to-images in headless Chromium (when
    /usr/bin/chromium exists), embedding tab from cache."""
    from gradio_client import Client

    if quick:
        raise Skip("not in --quick (starts the real app twice)")
    if not (ROOT / "checkpoints" / "rs-backbone").is_dir() or not (ROOT / "checkpoints" / "ucm-harma").is_dir():
        raise Skip("the default model's checkpoints (checkpoints/rs-backbone, checkpoints/ucm-harma) are missing")
    if not Path(data).is_dir():
        raise Skip(f"UCM-Captions not found at {data} (pass --data)")
    cache = ROOT / ".cache" / "bench-app"
    shutil.rmtree(cache, ignore_errors=True)  # the first run fills it from nothing
    rows = []
    for run in ("fill cache", "warm cache"):
        with _started_app(data, cache) as (proc, base, up, first, http):
            t_view = _time(lambda: _api(http, base, "embedding_view", [None, False]), torch.device("cpu"))
            lat = [_time(lambda i=i: _api(http, base, "search_text", [_query(i), 8, None]),
                         torch.device("cpu")) for i in range(20)]
            parallel = _parallel_queries(base, 20, proc.pid)
            client = Client(base + "/", verbose=False, download_files=False)
            lat_client = [_time(lambda i=i: client.predict(_query(i), 8, api_name="/search_text"),
                                torch.device("cpu")) for i in range(10)]
            row = {"run": run, "server up s": up, "first answer s": first, "query p50 ms": _pct(lat, 0.5),
                   "query p99 ms": _pct(lat, 0.99), **parallel, "gradio_client p50 ms": _pct(lat_client, 0.5)}
            if CHROMIUM.is_file():
                row["browser p50 ms"] = _pct(_browser_latency(base + "/", 10), 0.5)
            rows.append({**row, "embedding tab s": t_view})
    return rows


@contextlib.contextmanager
def _started_app(data: Optional[str], cache: Path):
    """``python app.py`` started and asked one text query: yields (process, base URL, seconds until the
    server is up, seconds until the first answer, an HTTP client); the process is stopped after."""
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = _start_app(data, cache, port)
    try:
        _wait_up(proc, port)
        up = time.perf_counter() - t0
        with httpx.Client(timeout=600) as http:
            tiles_base, tiles_adapted, status = _api(http, base, "search_text", [QUERY, 8, None])
            first = time.perf_counter() - t0
            if not tiles_base or not tiles_adapted:
                raise Skip(f"the app answered without results: {status}")
            yield proc, base, up, first, http
    finally:
        proc.terminate()
        proc.wait(30)


def demo_start(device: torch.device, quick: bool, **_: Any) -> list[dict]:
    """``python app.py`` with no arguments, as a fresh clone or a Space starts it: the bundled demo
    gallery, nothing cached. Seconds from the process start to the first answer, then the Embedding
    space tab opened the first time (its maps are shipped in assets/demo/precomputed/)."""

    if quick:
        raise Skip("not in --quick (starts the real app)")
    if not (ROOT / "assets" / "demo" / "test.csv").is_file():
        raise Skip("the bundled demo gallery is missing (python -m training.build_demo)")
    with tempfile.TemporaryDirectory() as cache, _started_app(None, Path(cache)) as (_, base, up, first, http):
        t1 = time.perf_counter()
        _api(http, base, "embedding_view", [None, False])
        view = time.perf_counter() - t1
    return [{"server up s": up, "first answer s": first, "embedding tab s": view}]
