"""End-to-end latency of a text query through the running app over an archive index (issue 37: under 150 ms p50
at 10 million images), with the app process's memory.

    python -m benchmarks.app_archive --build 1000000 --work /tmp/app-1m        # a synthetic archive of the demo images
    python -m benchmarks.archive --n 10000000 --work /data/b10m --keep          # then its index, with a 512-d model:
    python -m benchmarks.app_archive --index /data/b10m/index --work /tmp/app-10m --random-vit-b-32

The app runs as users start it, ``python app.py --checkpoint C --index ADAPTED BASELINE`` in a process of its own.
One warm-up query, then ``--queries`` timed ones (the demo's example queries and variations, each asked once,
top 8), asked three ways, one after the other:

- ``p50_ms``, ``p90_ms`` (the figure for the goal): Gradio's HTTP API as a page or ``curl`` uses it
  (``POST /gradio_api/call/search_text``, the answer streamed back as server-sent events). A query's time is
  the whole round trip: both models encode the query and search the archive on disk (at once, one thread
  each), the app makes display copies of the shown tiles, Gradio sends the answer with the tiles' URLs.
- ``gradio_client_*``: the same through the Python ``gradio_client``, which adds its own overhead (about 70 ms
  a call on this machine, measured against an endpoint that returns a string).
- ``browser_*``: typed into the page in headless Chromium (Enter pressed): until the status names the query
  (``browser_answer_p50_ms``) and until both galleries show their 8 images, loaded (``browser_tiles_*``).
  Chromium runs on the same cores as the app, so this is an upper bound for a visitor on another machine.

Also: the app's own time per side (query encoding and search, from its status line), the 1-minute load
average (the machine is shared) and the app process's resident memory (VmHWM, VmRSS: anonymous, and
file-backed, i.e. mapped index pages and libraries).

Both sides need an index by their model. ``--build N``: an archive built here with ``build_archive`` at the
model's dimension (``plan_index``): the first rows the adapted model's embeddings of the 210 demo images,
the rest synthetic (``benchmarks.archive.Recipe``), ids the demo images in turn (root ``assets/demo/images``).
``--index DIR``: any archive (one built by ``--build`` earlier, or the synthetic one of ``benchmarks.archive``,
whose ids name no files). The benchmark then writes *views* under ``--work``: the index's files linked, and an
``index.json`` stamped with a model's identity (and, for an index that is not an image index with a root, an
image root under ``--work`` where a copy of a demo image is placed at the id of every row the timed queries
will show). The baseline's view holds the same
vectors as the adapted one's: this measures speed, not answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from benchmarks.archive import Recipe, status_memory
from benchmarks.archive import chunks as synthetic
from harma.io import INDEX_FILE
from harma_app.common import DEMO, ROOT
from harma_app.tab_text_to_image import load_examples

K = 8
VARIANTS = ("", " seen from above", " in a remote sensing image")


def query_list(n: int) -> list[str]:
    """``n`` + 1 distinct queries (the first is the warm-up): the demo's examples, then with suffixes."""
    return [q + v for v in VARIANTS for q in load_examples()][: n + 1]


def random_vit_b_32(work: Path) -> Path:
    """An adapter folder on a random-weight ViT-B-32 (512-d, as the synthetic archives; speed does not
    depend on the weights), made once under ``work``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from harma import ModelConfig, create_model, save_adapters

    out, weights = work / "vit-b-32-harma", work / "vit-b-32-random.safetensors"
    if not (out / "adapter_config.json").is_file():
        torch.manual_seed(0)
        save_file(open_clip.create_model("ViT-B-32").state_dict(), str(weights))
        save_adapters(create_model(ModelConfig(model_name="ViT-B-32", base_weights=str(weights), method="harma"))[0],
                      out)
    return out


def load_pair(checkpoint: Path) -> Any:
    """The app's models for ``checkpoint`` (adapted and baseline), loaded as the app loads them."""
    from harma_app.state import AppConfig, discover_sources, load_models

    source = next(iter(discover_sources(AppConfig(checkpoint=str(checkpoint))).values()))
    return load_models(source)


def build(n: int, work: Path, pair: Any, memory_gb: float) -> Path:
    """A synthetic archive of ``n`` rows at the model's dimension over the demo images (see the module doc)."""
    from harma.encode import encode_images
    from harma.retrieval import build_archive, model_identity, plan_index

    model, preprocess, _ = pair.adapted
    images = sorted((DEMO / "images").iterdir())
    real = encode_images(model, images, preprocess).reshape(len(images), -1).numpy().astype(np.float32)
    dim = real.shape[1]
    recipe = Recipe(dim=dim)

    def rows():
        yield real[: min(n, len(real))]
        if n > len(real):
            yield from synthetic(recipe, n - len(real))

    plan = plan_index(n, dim, memory_gb)
    print(f"building {plan.factory_string()} over {n:,} rows ({plan.reason})", flush=True)
    out = work / "built"
    shutil.rmtree(out, ignore_errors=True)
    extra = {"kind": "images", "root": str(DEMO / "images"), "model": model_identity(model, pair.source.adapters)}
    t0 = time.perf_counter()
    build_archive(out, rows, n, dim, plan, (images[i % len(images)].name for i in range(n)), extra=extra)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def view(index: Path, out: Path, extra: dict) -> Path:
    """``out``: ``index``'s files linked, its ``index.json`` with ``extra`` merged in."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in index.iterdir():
        if f.is_file() and f.name != INDEX_FILE:
            (out / f.name).symlink_to(f.resolve())
    meta = json.loads((index / INDEX_FILE).read_text())
    meta["extra"] = {**(meta.get("extra") or {}), **extra}
    (out / INDEX_FILE).write_text(json.dumps(meta))
    return out


def place_files(index: Path, pair: Any, queries: list[str], root: Path) -> int:
    """A copy of a demo image at the id of every row the queries will show (either model), under ``root``."""
    from harma.retrieval import Retriever, load_index

    archive = load_index(index)
    demo = sorted((DEMO / "images").iterdir())
    placed = 0
    for bundle in (pair.baseline, pair.adapted):
        r = Retriever(*bundle, archive)
        for q in queries:
            _, rows = archive.search(r.encode_text(q), K)
            for rid in archive.ids_of(rows):
                target = root / rid
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(demo[placed % len(demo)], target)
                    placed += 1
    return placed


def memory(pid: int) -> dict[str, float]:
    """The app process's resident memory (GB): peak (VmHWM), now (VmRSS), anonymous and file-backed."""
    return {f"app_{key}_gb": round(value / 1e9, 3) for key, value in status_memory(pid).items()}


def pct(values: Any, q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def _check(q: str, base: list, adapted: list, status: str) -> list[float]:
    """The app's own ms per side (query encoding and search, from its status); an incomplete answer stops."""
    if "⚠️" in status or len(base) != K or len(adapted) != K:
        raise SystemExit(f"error: incomplete answer for {q!r}: {status}")
    return [float(x) for x in re.findall(r"(?:baseline|adapted) (\d+) ms", status)]


def ask_http(url: str, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each query through Gradio's HTTP API as a page or ``curl`` asks it (``POST /gradio_api/call/search_text``,
    then its answer streamed as server-sent events), one after the other: the round-trip ms and the app's own
    ms per side."""
    import httpx

    call = f"{url}gradio_api/call/search_text"
    params = httpx.get(f"{url}gradio_api/info").json()["named_endpoints"]["/search_text"]["parameters"]
    rest = [prm.get("parameter_default") for prm in params[2:]]  # model and gallery: the page's defaults
    times, searches = [], []
    with httpx.Client(timeout=120) as http:
        for q in queries:
            t = time.perf_counter()
            event_id = http.post(call, json={"data": [q, K, *rest]}).json()["event_id"]
            event, answer = None, None
            with http.stream("GET", f"{call}/{event_id}") as stream:
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: ") and event in ("complete", "error"):
                        answer = json.loads(line[len("data: "):])
                        break
            times.append(1e3 * (time.perf_counter() - t))
            if event != "complete" or not isinstance(answer, list) or len(answer) != 3:
                raise SystemExit(f"error: no answer for {q!r}: {event} {answer}")
            searches.append(_check(q, *answer))
    return np.array(times), np.array(searches)


def ask_client(client: Any, queries: list[str]) -> np.ndarray:
    """Each query's round-trip ms through ``gradio_client`` (Python), one after the other."""
    times = []
    for q in queries:
        t = time.perf_counter()
        answer = client.predict(q, K, api_name="/search_text")
        times.append(1e3 * (time.perf_counter() - t))
        _check(q, *answer)
    return np.array(times)


# in a page: the status names the query (the answer is in), then both galleries show K loaded images
_ANSWERED = "q => (document.querySelector('#status')?.innerText || '').includes('\\u201c' + q + '\\u201d')"
_SHOWN = """q => (%s)(q) && ['#baseline-gallery', '#adapted-gallery'].every(g => {
  const imgs = [...document.querySelectorAll(g + ' img')];
  return imgs.length >= %d && imgs.every(i => i.complete && i.naturalWidth > 0);
})""" % (_ANSWERED, K)


def ask_browser(url: str, queries: list[str]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Each query typed into the page in headless Chromium (on the same cores as the app): ms from Enter to
    the status naming the query, and to both galleries showing their K images, loaded (None without
    Chromium and Playwright)."""
    from benchmarks.browser import CHROMIUM, launch, open_query_page
    try:
        from playwright import sync_api
    except ImportError:
        return None
    if not CHROMIUM.exists():
        return None
    answered, shown = [], []
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page, box = open_query_page(browser, url, K)
            for q in queries:
                box.fill(q)
                t = time.perf_counter()
                box.press("Enter")
                page.wait_for_function(_ANSWERED, arg=q, polling="raf", timeout=60_000)
                answered.append(1e3 * (time.perf_counter() - t))
                page.wait_for_function(_SHOWN, arg=q, polling="raf", timeout=60_000)
                shown.append(1e3 * (time.perf_counter() - t))
        finally:
            browser.close()
    return np.array(answered), np.array(shown)


@contextlib.contextmanager
def serving(cmd: list[str], log_file: Path, env: dict) -> Iterator[tuple[str, subprocess.Popen]]:
    """``cmd`` (a Gradio server taking ``--port``) started on a free port; its URL and process once it answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = log_file.open("w")
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: the server stopped (rc {proc.returncode}); see {log_file}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def measure(url: str, queries: list[str]) -> dict[str, Any]:
    """``queries`` (the first untimed) through the HTTP API, through ``gradio_client`` and in Chromium."""
    from gradio_client import Client

    t = time.perf_counter()
    ask_http(url, queries[:1])
    first = time.perf_counter() - t
    times, searches = ask_http(url, queries[1:])
    row = {"first_query_s": round(first, 2), "queries": len(times), "k": K,
           "p50_ms": pct(times, 50), "p90_ms": pct(times, 90),
           "in_app_p50_ms": {"baseline": pct(searches[:, 0], 50), "adapted": pct(searches[:, 1], 50)}}
    python = ask_client(Client(url, verbose=False, download_files=False), queries[1:])
    row.update(gradio_client_p50_ms=pct(python, 50), gradio_client_p90_ms=pct(python, 90))
    browser = ask_browser(url, queries[1:])
    if browser is not None:
        answered, shown = browser
        row.update(browser_answer_p50_ms=pct(answered, 50), browser_tiles_p50_ms=pct(shown, 50),
                   browser_tiles_p90_ms=pct(shown, 90))
    return row


def serve_and_ask(checkpoint: Path, indexes: list[Path], work: Path, queries: list[str],
                  threads: Optional[int] = None) -> dict[str, Any]:
    """Start ``python app.py`` (``OMP_NUM_THREADS=threads`` when given: torch's and faiss's threads), ask
    ``queries`` (:func:`measure`), stop it."""
    cmd = [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--index", *map(str, indexes),
           "--cache-dir", str(work / "cache"), "--host", "127.0.0.1"]
    shutil.rmtree(work / "cache", ignore_errors=True)  # no display copy from an earlier run
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    with serving(cmd, work / "app.log", env) as (url, proc):
        started = time.perf_counter() - t0
        row = measure(url, queries)
        return {"startup_s": round(started, 1), **row, "load_average": round(os.getloadavg()[0], 1),
                **memory(proc.pid)}


def floor(work: Path, queries: list[str]) -> dict[str, Any]:
    """The same measures against Gradio's floor on this machine: ``python -m benchmarks.gradio_floor``, a bare
    page with the app's query box, galleries and status whose answer (8 + 8 demo images) takes no time."""
    with serving([sys.executable, "-m", "benchmarks.gradio_floor"], work / "floor.log", dict(os.environ)) as (url, _):
        return measure(url, queries)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.app_archive", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", type=Path, help="an archive index folder (format 2)")
    src.add_argument("--build", type=int, metavar="N", help="build a synthetic archive of N rows over the demo images")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (views, placed files, the app's cache)")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "ucm-harma",
                   help="adapter folder the app serves (default: the default model's, 384-d)")
    p.add_argument("--random-vit-b-32", action="store_true", help="serve a random-weight ViT-B-32 (512-d) instead")
    p.add_argument("--queries", type=int, default=20, help="timed queries (after one warm-up)")
    p.add_argument("--memory-gb", type=float, default=8.0, help="--build: the plan's memory budget")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the app (default: unset, torch uses every core)")
    p.add_argument("--floor", action="store_true",
                   help="also measure Gradio's floor: a bare page with the same answer made in no time")
    args = p.parse_args(argv)
    from harma.retrieval import load_index, model_identity

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = random_vit_b_32(args.work) if args.random_vit_b_32 else args.checkpoint
    pair = load_pair(checkpoint)
    queries = query_list(args.queries)
    index = build(args.build, args.work, pair, args.memory_gb) if args.build else args.index
    archive = load_index(index)
    if not hasattr(archive, "plan"):
        raise SystemExit(f"error: {index} is a format-1 index, not an archive")
    extra = {"kind": "images"}
    foreign = archive.extra.get("kind") != "images" or not archive.extra.get("root")  # e.g. benchmarks.archive's
    if foreign:
        extra["root"] = str(args.work / "root")
    views = [view(index, args.work / name, {**extra, "model": model_identity(bundle[0], ckpt)})
             for name, bundle, ckpt in (("adapted", pair.adapted, pair.source.adapters), ("baseline", pair.baseline, None))]
    placed = place_files(views[0], pair, queries, args.work / "root") if foreign else 0
    del pair
    row = {"n": len(archive), "dim": archive.dim, "index": archive.plan.factory_string(), "nprobe": archive.nprobe,
           "rerank": archive.rerank, "model": checkpoint.name, "files_placed": placed, "cores": os.cpu_count(),
           "threads": args.threads, **serve_and_ask(checkpoint, views, args.work, queries, args.threads)}
    if args.floor:
        row["gradio_floor"] = floor(args.work, queries)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
