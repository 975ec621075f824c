"""Tuning an archive index's search parameters at build time, against exact neighbours kept during the add pass.

:func:`tune` is autofaiss's tuning, small: from the plan's ``nprobe`` and ``rerank``, raise them
(re-rank deeper while that still gains, else probe twice the lists) until recall@10 of sampled rows
reaches :data:`TARGET_RECALL`, up to caps, and never past a single-query p50 of :data:`MAX_QUERY_MS`
measured on the building machine (autofaiss's ``max_index_query_time_ms``): more lists always add
recall, so without a time budget the tuning would buy its last half point of recall with several
times the query time (10^7 x 512, PQ128: nprobe 256 reaches recall 0.947 at p50 38 ms, nprobe 64
0.927 at 6 ms; ``python -m benchmarks.archive``).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .archive import ArchiveIndex

QUERIES = 256  # sampled rows whose exact top-10 measures the recall at build time
TOPK = 10
TARGET_RECALL = 0.95  # the tuning stops at the first parameters reaching it ...
NPROBE_CAP_FRACTION = 64  # ... or at nprobe = nlist / 64 (at least 16) ...
RERANK_CAP = 4096  # ... and rerank = 4,096 candidates ...
MAX_QUERY_MS = 10.0  # ... and never past a single-query p50 of 10 ms on the building machine
LATENCY_QUERIES = 64  # query rows timed one at a time for that p50
MIN_GAIN = 0.005  # a deeper re-ranking that gains less recall than this: probe more lists instead


class ExactTopK:
    """Exact top-``k`` rows of fixed queries over rows seen chunk by chunk."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.rows = np.zeros((len(queries), 0), np.int64)

    def add(self, start: int, x: np.ndarray) -> None:
        s = self.q @ x.T  # (Q, m)
        r = np.broadcast_to(np.arange(start, start + len(x)), s.shape)
        if s.shape[1] > self.k:  # the chunk's own top-k first: never (Q, m) row numbers in memory
            top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
            s, r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
        s, r = np.concatenate([self.scores, s], 1), np.concatenate([self.rows, r], 1)
        if s.shape[1] > self.k:
            top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
            s, r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
        self.scores, self.rows = s, r

    def best_first(self) -> np.ndarray:
        """The rows found, best first (ties: lower row first)."""
        order = np.lexsort((self.rows, -self.scores), axis=1) if self.rows.size else self.rows
        return np.take_along_axis(self.rows, order, 1) if self.rows.size else self.rows


def recall_excluding_self(found: np.ndarray, exact: np.ndarray, query_rows: np.ndarray, k: int = TOPK) -> float:
    """Recall@k of ``found`` against ``exact`` (both rows, best first) when the queries are rows of
    the index themselves: each query's own row is left out of both lists (finding itself is trivial)."""
    hits = 0
    for f, e, own in zip(found, exact, query_rows):
        e = [r for r in e.tolist() if r != own][:k]
        f = [r for r in f.tolist() if r != own and r >= 0][:k]
        hits += len(set(f) & set(e))
    return hits / max(1, k * len(exact))


def _p50_ms(index: ArchiveIndex, queries: np.ndarray) -> float:
    """Median time of single queries (the first :data:`LATENCY_QUERIES` query rows, one at a time)."""
    times = []
    for q in torch.from_numpy(queries[:LATENCY_QUERIES]):
        t = time.perf_counter()
        index.search(q, TOPK)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def tune(index: ArchiveIndex, queries: np.ndarray, exact: np.ndarray, query_rows: np.ndarray,
          target: float, max_ms: float, say: Callable[[str], None]) -> dict:
    """Raise the search parameters from the plan's until recall@10 >= ``target``, the caps, or a
    single-query p50 over ``max_ms`` on this machine (the last setting within it is kept, as
    autofaiss's ``max_index_query_time_ms``): double ``rerank`` while that still gains (ivf_pq), else
    double ``nprobe``."""
    nlist = index.plan.nlist
    cap = min(nlist, max(16, nlist // NPROBE_CAP_FRACTION))
    pq = index.plan.refine == "sq8"

    def measure(nprobe: int, rerank: int) -> tuple[float, float]:
        index.nprobe, index.rerank = nprobe, rerank
        _, rows = index.search(queries, TOPK + 1)
        r = recall_excluding_self(rows.numpy(), exact, query_rows)
        ms = _p50_ms(index, queries)
        say(f"recall@{TOPK} {r:.3f}, p50 {ms:.1f} ms at nprobe {nprobe}" + (f", rerank {rerank}" if pq else ""))
        return r, ms

    nprobe = max(1, min(index.plan.nprobe or 16, cap))
    rerank = min(RERANK_CAP, max(4 * TOPK, index.plan.rerank or 256)) if pq else 0
    r, ms = measure(nprobe, rerank)
    stop = ""
    while r < target:
        if pq and rerank < RERANK_CAP:
            deeper, t = measure(nprobe, 2 * rerank)
            if t > max_ms:
                stop = f"rerank {2 * rerank} took p50 {t:.1f} ms > {max_ms:g} ms"
                break
            if deeper >= target or deeper - r >= MIN_GAIN:
                rerank, r, ms = 2 * rerank, deeper, t
                continue
        if nprobe >= cap:
            stop = f"nprobe cap {cap}"
            break
        wider, t = measure(min(cap, 2 * nprobe), rerank)
        if t > max_ms:
            stop = f"nprobe {min(cap, 2 * nprobe)} took p50 {t:.1f} ms > {max_ms:g} ms"
            break
        nprobe, r, ms = min(cap, 2 * nprobe), wider, t
    index.nprobe, index.rerank = nprobe, rerank
    if stop:
        say(f"kept nprobe {nprobe}" + (f", rerank {rerank}" if pq else "") + f" (recall@{TOPK} {r:.3f}): {stop}")
    return {"nprobe": nprobe, "rerank": rerank, "recall_at_10": round(r, 4), "p50_ms": round(ms, 2),
            "measured_with": {"nprobe": nprobe, "rerank": rerank, "queries": len(queries), "target": target,
                              "max_query_ms": max_ms, "stopped_by": stop or "target reached",
                              "queries_are": "sampled rows, own row left out"}}
